"""Declared image sets (calibration/<name>.yaml): file names, sizes and sha256 of real images.

Images are fetched through the same cache -> mirrors -> origin machinery as model sources, so a
calibration is reproducible byte for byte. A recipe may also name a local folder instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import RecipeError
from .fetch import Fetcher, Pin
from .fsio import sha256_bytes, sha256_file, write_bytes_atomic
from .preprocess import list_images
from .recipe import SAFE_NAME, _Reader

SETS_DIR = Path(__file__).resolve().parent.parent / "calibration"
SELECTION_RULE = "the {count} files with the lowest sha256 digests among the {pool} images of the pool"


@dataclass(frozen=True)
class ImageSet:
    name: str
    key: str  # sha256 naming the exact set (the set file's text, or a folder's names and hashes)
    pins: tuple[Pin, ...]  # empty for a local folder
    base_url: str | None
    folder: Path | None

    def paths(self, fetcher: Fetcher, count: int | None = None, log=lambda m: None) -> list[Path]:
        if self.folder is not None:
            return list_images(self.folder)[:count]
        pins = self.pins[:count]
        paths = []
        for i, pin in enumerate(pins, 1):
            paths.append(fetcher.fetch(pin, [self.base_url + pin.name]))
            if i % 25 == 0 or i == len(pins):
                log(f"image set {self.name}: {i}/{len(pins)} images ready")
        return paths


def load_image_set(spec: str, recipe_path: Path | None = None) -> ImageSet:
    """`spec` is a set name from calibration/ or a folder of images."""
    folder = Path(spec)
    if not SAFE_NAME.match(spec) or folder.is_dir():
        if not folder.is_dir():
            raise RecipeError(f"{recipe_path or spec}: image set {spec!r} is neither a set in {SETS_DIR} nor a folder")
        images = list_images(folder)
        if not images:
            raise RecipeError(f"{folder}: no .jpg/.jpeg/.png/.bmp images in this folder")
        listing = [[p.name, sha256_file(p)] for p in images]
        return ImageSet(name=str(folder), key=sha256_bytes(json.dumps(listing).encode()), pins=(),
                        base_url=None, folder=folder)
    path = SETS_DIR / f"{spec}.yaml"
    if not path.is_file():
        raise RecipeError(f"{recipe_path or spec}: no image set {spec!r} in {SETS_DIR}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: malformed YAML: {exc}") from None
    r = _Reader(path, data).mapping(("name", "description", "selection", "base_url", "images"))
    if r.string("name") != spec:
        raise RecipeError(f"{path}: name: must be {spec!r}, the file name")
    r.string("description")
    r.string("selection")
    base_url = r.string("base_url")

    def image(item: _Reader) -> Pin:
        item.mapping(("file", "size", "sha256"))
        name = item.string("file", pattern=SAFE_NAME, pattern_text="a plain file name")
        return Pin(name=name, checksums={"sha256": item.string("sha256")}, size=item.integer("size", minimum=1))

    return ImageSet(name=spec, key=sha256_bytes(text.encode()), pins=tuple(r.list_of("images", image)),
                    base_url=base_url, folder=None)


def write_image_set(name: str, pool: Path, count: int, base_url: str, description: str) -> Path:
    """Choose `count` images of `pool` by a content rule (lowest sha256) and write calibration/<name>.yaml."""
    candidates = sorted((sha256_file(p), p) for p in list_images(pool))
    if len(candidates) < count:
        raise RecipeError(f"{pool}: {len(candidates)} images, fewer than the {count} asked for")
    chosen = sorted(candidates[:count], key=lambda c: c[1].name)
    doc = {
        "name": name,
        "description": description,
        "selection": SELECTION_RULE.format(count=count, pool=len(candidates)),
        "base_url": base_url,
        "images": [{"file": p.name, "size": p.stat().st_size, "sha256": digest} for digest, p in chosen],
    }
    target = SETS_DIR / f"{name}.yaml"
    write_bytes_atomic(target, yaml.safe_dump(doc, sort_keys=False, width=120).encode())
    return target
