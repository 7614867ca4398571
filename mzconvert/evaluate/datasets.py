"""The images an evaluation runs on: a COCO folder, images decoded once for every model, chunked runs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..preprocess import load_image, model_tensor
from ..recipe import InputSpec, Preprocess


class LoadedImage:
    """One dataset image, decoded once and preprocessed once per distinct preprocessing, for every model."""

    def __init__(self, path: Path):
        self.path = path
        self.image = load_image(path)
        self._tensors: dict = {}
        self._lock = threading.Lock()  # models running in threads ask for the same tensor

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def pixels(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)

    def tensor(self, preprocess: Preprocess, model_input: InputSpec) -> np.ndarray:
        key = (preprocess, model_input)
        with self._lock:
            if key not in self._tensors:
                self._tensors[key] = model_tensor(self.image, preprocess, model_input)
            return self._tensors[key]


Runner = Callable[[np.ndarray], list[np.ndarray]]  # a model: input tensor -> outputs


Predict = Callable[[LoadedImage], object]  # Detections for detectors, a score vector for classifiers


def predictions(models: dict[str, Predict], paths: list[Path], chunk: int = 32, parallel: set[str] = frozenset(),
                aliases: dict[str, str] | None = None):
    """(image, {model: prediction}) for every path in order. Models run one after another over a chunk of
    images, not image by image: each runtime's thread pool then runs back to back instead of contending
    with the other runtime's pool (ONNX Runtime's threads spin for a while after each run). The models named
    in `parallel` (single-threaded kernels, one interpreter per thread) run over the chunk's images in a
    pool meanwhile, filling the cores the others leave idle; a model in `aliases` is not run: its
    predictions are those of the model it names (the same integer computation)."""
    from concurrent.futures import ThreadPoolExecutor

    aliases = aliases or {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), chunk):
            images = [LoadedImage(path) for path in paths[start:start + chunk]]
            pending = {name: [pool.submit(models[name], image) for image in images]
                       for name in models if name in parallel and name not in aliases}
            found = {name: [predict(image) for image in images] for name, predict in models.items()
                     if name not in parallel and name not in aliases}
            found |= {name: [future.result() for future in futures] for name, futures in pending.items()}
            found |= {name: found[aliases[name]] for name in models if name in aliases}
            for i, image in enumerate(images):
                yield image, {name: found[name][i] for name in models}


@dataclass
class CocoDataset:
    images: dict[int, Path]  # image id -> file
    annotations: Path
    split: str
    categories: dict[int, str]  # category id -> name
    with_keypoints: bool  # its annotations give keypoints (a pose dataset's instances file)

    @classmethod
    def open(cls, folder: Path, split: str) -> CocoDataset:
        candidates = sorted((folder / "annotations").glob(f"instances_{split}*.json"))
        if len(candidates) != 1:
            raise InputError(f"{folder}: expected one annotations/instances_{split}*.json, found {len(candidates)}")
        try:
            data = json.loads(candidates[0].read_text())
            entries = [(image["id"], image["file_name"]) for image in data["images"]]
            categories = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
            with_keypoints = any("keypoints" in a for a in data.get("annotations", []))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{candidates[0]}: not COCO instances annotations "
                          f"({exc.__class__.__name__}: {exc})") from None
        image_dir = folder / split
        images = {}
        for image_id, file_name in entries:
            path = image_dir / file_name
            if not path.is_file():
                raise InputError(f"{candidates[0]}: image {file_name} is not in {image_dir}")
            images[image_id] = path
        return cls(images=images, annotations=candidates[0], split=split, categories=categories,
                   with_keypoints=with_keypoints)

    def scored_category_ids(self, labels: tuple[str, ...], ids: tuple[int, ...], log) -> tuple[int, ...]:
        """The category each label is scored as. The recipe's `ids` (category_ids, else 1, 2, ... in label
        order) where no label names another of these categories than its id's; where every label names one
        of them, by name (a model trained on this dataset with its classes in another order than its
        ids'). A label that names another category while some other label names none is an error: no
        mapping can be told from them."""
        named = {category_key(name): i for i, name in self.categories.items()}
        if len(named) < len(self.categories):  # two categories of one name: a name tells no id
            return ids
        found = {label: named.get(category_key(label)) for label in labels}
        crossed = [(label, i, found[label]) for label, i in zip(labels, ids) if found[label] not in (None, i)]
        unnamed = [label for label in labels if found[label] is None]
        where = f"{self.annotations.name}'s categories"
        if crossed and unnamed:
            label, i, other = crossed[0]
            more = f" and {len(unnamed) - 1} more" if len(unnamed) > 1 else ""
            raise InputError(f"{self.annotations}: label {label!r} is category {other} there, not {i}, while "
                             f"{unnamed[0]!r}{more} name none of its categories: set postprocess.category_ids to "
                             "the category id of each label")
        if crossed:
            log(f"eval: labels scored as the categories they name in {where}: {len(crossed)} of them under "
                f"another id than the recipe's (e.g. {crossed[0][0]!r}: {crossed[0][2]}, not {crossed[0][1]})")
            return tuple(found[label] for label in labels)
        if len(unnamed) == len(labels) and self.categories:
            shown = ", ".join(f"{label!r} as {i} {self.categories.get(i, '(none)')!r}"
                              for label, i in list(zip(labels, ids))[:3])
            log(f"eval: no label names one of {where}; scored by category id: {shown}, ...")
        return ids

    def keypoint_annotations(self) -> Path | None:
        """The annotations that give keypoints for every one of these images: the instances file where its
        annotations carry them, else the one other annotations/*<split>*.json that does (as COCO's
        person_keypoints_<split>.json); None where none does."""
        if self.with_keypoints:
            return self.annotations
        others = sorted(set(self.annotations.parent.glob(f"*{self.split}*.json")) - {self.annotations})
        found = []
        for path in others:
            try:
                data = json.loads(path.read_text())
                ids = {image["id"] for image in data["images"]}
                with_points = any("keypoints" in a for a in data["annotations"])
            except (ValueError, KeyError, TypeError):
                continue  # not COCO annotations (captions have no keypoints either)
            if with_points and set(self.images) <= ids:
                found.append(path)
        if len(found) > 1:
            raise InputError(f"{self.annotations.parent}: {len(found)} files give keypoints for the {self.split} "
                             f"images ({', '.join(p.name for p in found)}); expected one")
        return found[0] if found else None


def category_key(name: str) -> str:
    """A category name as compared with a label: case, spaces, hyphens and underscores aside."""
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


def dataset_identity(dataset: Path, split: str, labels_file: Path | None, images: list[Path]) -> dict:
    """What an eval was run on, and a key naming exactly that (paths, sizes and the labels' bytes)."""
    listing = [[str(p.relative_to(dataset)) if p.is_relative_to(dataset) else str(p), p.stat().st_size]
               for p in images]
    label_bytes = labels_file.read_bytes() if labels_file else b""
    digest = hashlib.sha256(json.dumps([listing, split]).encode() + label_bytes).hexdigest()
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.resolve().name.lower()).strip("-") or "dataset"
    return {"path": str(dataset.resolve()), "name": dataset.resolve().name, "split": split,
            "key": f"{slug}-{digest[:12]}"}
