"""Declared image sets: calibration never touches what variants are judged on.

Checked by content (sha256), not by file name: a calibration pool once held val2017 images under
train2017 names, and only the bytes told.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mzconvert.errors import RecipeError
from mzconvert.fsio import sha256_file
from mzconvert.recipe import available_recipes, load_recipe
from mzconvert.sources.imagesets import SETS_DIR, load_image_set, write_image_set
from tests.conftest import run_cli

# Every folder of the mirror that some recipe evaluates or verifies on.
EVALUATION_FOLDERS = ("coco/val2017", "imagenet-samples")


def _declared_sets() -> list[str]:
    return sorted(p.stem for p in SETS_DIR.glob("*.yaml"))


def _calibration_sets() -> set[str]:
    return {v.calibration for name in available_recipes() for v in load_recipe(name).variants if v.calibration}


def _verify_sets() -> set[str]:
    return {r.verify.images for r in map(load_recipe, available_recipes()) if r.verify}


def test_every_set_a_recipe_names_is_declared():
    assert (_calibration_sets() | _verify_sets()) <= set(_declared_sets())


def test_no_calibration_image_is_an_evaluation_or_verify_image(mirror):
    judged = {sha256_file(p) for folder in EVALUATION_FOLDERS for p in (mirror / folder).iterdir()
              if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    for name in _verify_sets():
        judged |= {pin.checksums["sha256"] for pin in load_image_set(name).pins}
    assert len(judged) > 600  # 132 val + 500 ImageNet samples: the folders were really read
    for name in _calibration_sets():
        overlap = [pin.name for pin in load_image_set(name).pins if pin.checksums["sha256"] in judged]
        assert not overlap, f"calibration set {name} holds evaluation/verify images: {overlap}"


def test_coco_calibration_images_are_train2017_by_their_annotations(mirror):
    entries = {}
    for split in ("train2017", "val2017"):
        data = json.loads((mirror / "coco" / "annotations" / f"instances_{split}_subset.json").read_text())
        for image in data["images"]:
            entries.setdefault(image["file_name"], []).append(image["coco_url"])
    checked = 0
    for name in _calibration_sets():
        for pin in load_image_set(name).pins:
            for url in entries.get(pin.name, []):
                assert "/train2017/" in url, f"{name}: {pin.name} is annotated as {url}"
                checked += 1
    assert checked >= 100


def test_every_declared_image_is_in_the_mirror_with_its_digest(mirror, tmp_path):
    """`make demo` and the tests fetch these from the mirror: a set naming a removed image breaks both."""
    from mzconvert.sources.fetch import FetchConfig, Fetcher

    fetcher = Fetcher(FetchConfig(cache_dir=tmp_path / "cache", mirrors=[str(mirror)], offline=True))
    for name in _declared_sets():
        image_set = load_image_set(name)
        paths = image_set.paths(fetcher)
        assert len(paths) == len(image_set.pins)


def _write_images(folder: Path, seeds: range) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        pixels = np.random.RandomState(seed).randint(0, 256, (12, 16, 3), dtype=np.uint8)
        path = folder / f"img_{seed:03d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def test_write_image_set_skips_images_whose_bytes_are_in_an_excluded_folder(tmp_path):
    pool = _write_images(tmp_path / "pool", range(10))
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    # Two pool images reappear under other names in the evaluation folder.
    for i, path in enumerate(pool[:2]):
        (evaluation / f"renamed_{i}.png").write_bytes(path.read_bytes())
    target = write_image_set("calib-8", tmp_path / "pool", 8, None, "test", [evaluation], tmp_path)
    declared = yaml.safe_load(target.read_text())
    assert declared["selection"].endswith("among the 8 images of the pool, after removing 2 whose bytes are also in eval")
    assert {image["file"] for image in declared["images"]} == {p.name for p in pool[2:]}
    with pytest.raises(RecipeError, match="8 usable images, fewer than the 9 asked for"):
        write_image_set("calib-9", tmp_path / "pool", 9, None, "test", [evaluation], tmp_path)


def test_imageset_command_writes_a_set_fetchable_from_a_mirror(tmp_path):
    _write_images(tmp_path / "pool", range(5))
    result = run_cli("--quiet", "imageset", "tiny-3", str(tmp_path / "pool"), "--count", "3",
                     "--sets-dir", str(tmp_path / "sets"))
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "sets" / "tiny-3.yaml").read_text()
    assert "base_url" not in text and text.count("sha256: ") == 3


def test_a_relative_image_folder_is_taken_from_the_recipes_folder(tmp_path):
    _write_images(tmp_path / "project" / "calib", range(3))
    image_set = load_image_set("calib", tmp_path / "project" / "recipe.yaml")
    assert image_set.folder == tmp_path / "project" / "calib" and len(image_set.names()) == 3
    with pytest.raises(RecipeError, match="recipe.yaml: no image set 'nowhere' in "):
        load_image_set("nowhere", tmp_path / "project" / "recipe.yaml")


@pytest.mark.parametrize("pool, expected", [(14, range(8, 12)), (10, range(6, 10)), (3, range(0, 3))])
def test_the_images_after_those_calibrated_on_are_those_after_them_else_the_last(tmp_path, pool, expected):
    """What a search chooses by (build._choosing_images): 4 images after the first 8, from a folder of 14 all
    unseen; of 10, two calibrated on; of 3, all there are. The same names from the paths as from names()."""
    _write_images(tmp_path / "calib", range(pool))
    image_set = load_image_set(str(tmp_path / "calib"))
    start, count = image_set.window_after(8, 4)
    every = image_set.names()
    assert image_set.names(count, start) == [every[i] for i in expected]
    assert [p.name for p in image_set.paths(None, count, start=start)] == [every[i] for i in expected]


def test_a_declared_sets_window_is_fetched_by_its_pins(mirror, tmp_path):
    """A declared set of 100 calibrated on whole: the 32 a search chooses by are its last, each fetched by its own
    digest (the cache names a file by its sha256)."""
    from mzconvert.sources.fetch import FetchConfig, Fetcher

    fetcher = Fetcher(FetchConfig(cache_dir=tmp_path / "cache", mirrors=[str(mirror)], offline=True))
    image_set = load_image_set("coco-train2017-100")
    start, count = image_set.window_after(100, 32)
    assert (start, count) == (68, 32)
    paths = image_set.paths(fetcher, count, start=start)
    assert [sha256_file(p) for p in paths] == [pin.checksums["sha256"] for pin in image_set.pins[68:]]
    assert image_set.names(count, start) == [pin.name for pin in image_set.pins[68:]]
