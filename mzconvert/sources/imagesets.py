"""Declared image sets (calibration/<name>.yaml): file names, sizes and sha256 of real images.

Images are fetched through the same cache -> mirrors -> origin machinery as model sources, so a
calibration is reproducible byte for byte. A recipe may also name a local folder instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import RecipeError
from ..fsio import sha256_bytes, sha256_file, write_bytes_atomic
from ..preprocess import list_images
from ..recipe import SAFE_NAME
from ..recipe.reader import Reader
from ..shipped import shipped_dir
from ..yamlsafe import load_yaml
from .fetch import Fetcher, Pin

SETS_DIR = shipped_dir("calibration")
# Any name a file can have in a folder (upper case, spaces), but no path: it is joined to a folder and a URL.
FILE_NAME = re.compile(r"^(?!\.)[^/\\\x00-\x1f]{1,255}$")
SELECTION_RULE = "the {count} files with the lowest sha256 digests among the {pool} images of the pool"
EXCLUSION_RULE = ", after removing {excluded} whose bytes are also in {folders}"


@dataclass(frozen=True)
class ImageSet:
    name: str
    key: str  # sha256 naming the exact set (the set file's text, or a folder's names and hashes)
    pins: tuple[Pin, ...]  # empty for a local folder
    base_url: str | None  # where the origin serves the files; None: only the cache and mirrors have them
    folder: Path | None

    @property
    def size(self) -> int:
        return len(list_images(self.folder)) if self.folder is not None else len(self.pins)

    def count(self, wanted: int | None, at_most: int | None = None) -> int | None:
        """How many images to take: `wanted`; without a number, all of the set, or at most `at_most`."""
        return wanted if wanted is not None or at_most is None else min(at_most, self.size)

    def window_after(self, used: int, wanted: int) -> tuple[int, int]:
        """(start, count) of `wanted` images from the set's `used`-th on; where the set ends before, its last
        `wanted` (or all of it)."""
        stop = min(self.size, used + wanted)
        start = max(0, stop - wanted)
        return start, stop - start

    def names(self, count: int | None = None, start: int = 0) -> list[str]:
        """The images' own file names (fetched images sit in the cache under their digests)."""
        if self.folder is not None:
            return [p.name for p in list_images(self.folder)[start:_stop(start, count)]]
        return [pin.name for pin in self.pins[start:_stop(start, count)]]

    def paths(self, fetcher: Fetcher, count: int | None = None, log=lambda m: None, start: int = 0) -> list[Path]:
        """`count` images (all, without one) from the set's `start`-th on."""
        if count is not None and start + count > self.size:
            raise RecipeError(f"{self.name}: {self.size} images, fewer than the {count} asked for "
                              "(calibration_count / verify.count)")
        if self.folder is not None:
            return list_images(self.folder)[start:_stop(start, count)]
        pins = self.pins[start:_stop(start, count)]
        paths = []
        for i, pin in enumerate(pins, 1):
            paths.append(fetcher.fetch(pin, [self.base_url + pin.name] if self.base_url else []))
            if i % 25 == 0 or i == len(pins):
                log(f"image set {self.name}: {i}/{len(pins)} images ready")
        return paths


def _stop(start: int, count: int | None) -> int | None:
    return None if count is None else start + count


def load_image_set(spec: str, recipe_path: Path | None = None) -> ImageSet:
    """`spec` is a set name from calibration/ or a folder of images; a relative folder is taken from the
    recipe's own folder, so a build means the same images from whatever folder it is run in."""
    folder = Path(spec)
    if recipe_path is not None and not folder.is_absolute():
        folder = recipe_path.parent / folder
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
    data = load_yaml(path, text)
    r = Reader(path, data).mapping(("name", "description", "selection", "base_url", "images"))
    if r.string("name") != spec:
        raise RecipeError(f"{path}: name: must be {spec!r}, the file name")
    r.string("description")
    r.string("selection")
    base_url = r.string("base_url", required=False)

    def image(item: Reader) -> Pin:
        item.mapping(("file", "size", "sha256"))
        name = item.string("file", pattern=FILE_NAME, pattern_text="a plain file name")
        return Pin(name=name, checksums={"sha256": item.string("sha256")}, size=item.integer("size", minimum=1))

    return ImageSet(name=spec, key=sha256_bytes(text.encode()), pins=tuple(r.list_of("images", image)),
                    base_url=base_url, folder=None)


def write_image_set(name: str, pool: Path, count: int, base_url: str | None, description: str,
                    exclude: list[Path] = (), sets_dir: Path = SETS_DIR) -> Path:
    """Choose `count` images of `pool` by a content rule (lowest sha256) and write <sets_dir>/<name>.yaml.

    Images whose bytes also occur in an `exclude` folder (the evaluation and verify images) are never
    chosen, so a calibration set stays disjoint from what it is judged on, whatever the files are called.
    """
    if not SAFE_NAME.match(name):
        raise RecipeError(f"{name!r}: not a safe image set name (lower case, digits, '.', '_', '-')")
    if not pool.is_dir():
        raise RecipeError(f"{pool}: not a folder of images")
    forbidden = {sha256_file(p) for folder in exclude for p in list_images(folder)}
    pool_images = sorted((sha256_file(p), p) for p in list_images(pool))
    candidates = [(digest, p) for digest, p in pool_images if digest not in forbidden]
    if len(candidates) < count:
        raise RecipeError(f"{pool}: {len(candidates)} usable images, fewer than the {count} asked for")
    chosen = sorted(candidates[:count], key=lambda c: c[1].name)
    selection = SELECTION_RULE.format(count=count, pool=len(candidates))
    if excluded := len(pool_images) - len(candidates):
        selection += EXCLUSION_RULE.format(excluded=excluded, folders=", ".join(f.name for f in exclude))
    doc = {
        "name": name,
        "description": description,
        "selection": selection,
        **({"base_url": base_url} if base_url else {}),
        "images": [{"file": p.name, "size": p.stat().st_size, "sha256": digest} for digest, p in chosen],
    }
    target = sets_dir / f"{name}.yaml"
    write_bytes_atomic(target, yaml.safe_dump(doc, sort_keys=False, width=120).encode())
    return target
