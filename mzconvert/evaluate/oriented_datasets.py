"""Oriented-box datasets, read as COCO instances whose outlines are the boxes' polygons: an oriented-box head's
rotated boxes are then scored by pycocotools' segm AP, each detection's polygon overlapping each annotation's
(COCOeval's IoU thresholds 0.5:0.95; a rotated box's IoU, computed on the image's pixel grid).

Two layouts, as users have them:
- DOTA: `images/` and `labelTxt/` (in `<split>/`, or the folder itself), a line per object
  `x1 y1 x2 y2 x3 y3 x4 y4 category difficult` in pixels, after optional `imagesource:` and `gsd:` lines; a
  difficult object is one a detection may find or miss (COCO's crowd: not counted either way).
- Ultralytics' OBB: `images/<split>/` and `labels/<split>/`, a line per object `class x1 y1 ... x4 y4`, the class
  an index into the model's labels and the corners normalised to the image; an image without a label file has no
  object.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError
from ..preprocess import list_images
from .datasets import CocoDataset, category_key

DOTA_HEADERS = ("imagesource:", "gsd:")


def open_oriented(folder: Path, split: str, labels: tuple[str, ...], category_ids: tuple[int, ...]) -> CocoDataset:
    """The dataset as COCO instances (written to a scratch folder that lives as long as the dataset): each label
    of the model its category under its id; a DOTA category no label names gets an id after them."""
    names = dict(zip(category_ids, labels))
    category_of = {category_key(label): i for label, i in zip(labels, category_ids)}
    if found := _dota_folders(folder, split):
        images, annotation_dir = found
        sizes = _sizes(images)
        objects = {path: _dota_objects(annotation_dir / f"{path.stem}.txt") for path in sizes}
        unnamed = sorted({name for rows in objects.values() for name, *_ in rows} - set(category_of))
        for k, name in enumerate(unnamed, max(category_ids, default=0) + 1):
            category_of[name], names[k] = k, name
    elif found := _ultralytics_folders(folder, split):
        images, annotation_dir = found
        sizes = _sizes(images)
        objects = {path: _ultralytics_objects(annotation_dir / f"{path.stem}.txt", labels, size)
                   for path, size in sizes.items()}
    else:
        raise InputError(f"{folder}: not an oriented-box dataset: expected DOTA's {split}/images and "
                         f"{split}/labelTxt (or images/ and labelTxt/), or Ultralytics' images/{split} and "
                         f"labels/{split}")
    if not objects:
        raise InputError(f"{images}: no images in it")
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in sorted(names.items())]}
    for image_id, (path, rows) in enumerate(objects.items(), 1):
        width, height = sizes[path]
        coco["images"].append({"id": image_id, "file_name": path.name, "width": width, "height": height})
        for name, corners, difficult in rows:
            xs, ys = corners[:, 0], corners[:, 1]
            area = 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": category_of[name],
                "segmentation": [corners.ravel().tolist()], "area": area, "iscrowd": int(difficult),
                "bbox": [float(xs.min()), float(ys.min()), float(xs.max() - xs.min()), float(ys.max() - ys.min())]})
    scratch = Path(tempfile.mkdtemp(prefix="mzconvert-oriented-"))
    annotations = scratch / f"instances_{split}.json"
    annotations.write_text(json.dumps(coco))
    dataset = CocoDataset(images={i + 1: path for i, path in enumerate(objects)}, annotations=annotations,
                          split=split, categories=names, with_keypoints=False)
    weakref.finalize(dataset, shutil.rmtree, scratch, True)
    return dataset


def _sizes(folder: Path) -> dict[Path, tuple[int, int]]:
    """{image: (width, height)} of the folder's images, read from their headers."""
    sizes = {}
    for path in list_images(folder):
        try:
            with Image.open(path) as image:
                sizes[path] = image.size
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f"{path}: not a decodable image ({exc.__class__.__name__})") from None
    return sizes


def _dota_folders(folder: Path, split: str) -> tuple[Path, Path] | None:
    for root in (folder / split, folder):
        if (root / "images").is_dir() and (root / "labelTxt").is_dir():
            return root / "images", root / "labelTxt"
    return None


def _ultralytics_folders(folder: Path, split: str) -> tuple[Path, Path] | None:
    images, labels = folder / "images" / split, folder / "labels" / split
    return (images, labels) if images.is_dir() and labels.is_dir() else None


def _dota_objects(path: Path) -> list[tuple[str, np.ndarray, bool]]:
    """(category, 4 x 2 corners in pixels, difficult) of each object of a DOTA label file."""
    if not path.is_file():
        raise InputError(f"{path}: missing: DOTA gives every image a label file (an empty one where it has no object)")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields or (number <= 2 and fields[0].startswith(DOTA_HEADERS)):
            continue
        try:
            corners = np.array([float(v) for v in fields[:8]], np.float64).reshape(4, 2)
            difficult = len(fields) > 9 and int(fields[9]) != 0
        except ValueError:
            corners = None
        if corners is None or len(fields) < 9 or not np.isfinite(corners).all():
            raise InputError(f"{path}:{number}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]', "
                             f"got {line.strip()[:80]!r}")
        rows.append((category_key(fields[8]), corners, difficult))
    return rows


def _ultralytics_objects(path: Path, labels: tuple[str, ...], size: tuple[int, int]) -> list:
    """(label's key, 4 x 2 corners in pixels, False) of each object of an Ultralytics OBB label file (none
    without one)."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            index = int(fields[0])
            corners = np.array([float(v) for v in fields[1:9]], np.float64).reshape(4, 2) * np.array(size)
        except ValueError:
            index, corners = -1, None
        if corners is None or len(fields) != 9 or not 0 <= index < len(labels) or not np.isfinite(corners).all():
            raise InputError(f"{path}:{number}: expected 'class x1 y1 x2 y2 x3 y3 x4 y4' (class 0-{len(labels) - 1}, "
                             f"corners normalised), got {line.strip()[:80]!r}")
        rows.append((category_key(labels[index]), corners, False))
    return rows
