"""dist/<recipe>/ keeps what is still true: `build --variant` touches only that variant, and eval /
bench / report results stay exactly while the artifacts they were measured on keep their bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import MIRROR, run_cli
from tests.tiny_graphs import tiny_recipe_text, write_tiny_detector

TRAIN = MIRROR / "coco" / "train2017"
VARIANTS = f"""  - {{name: f32, mode: float32}}
  - {{name: i8, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: COUNT}}
"""


def md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.suffix == ".tflite"}


def test_build_variant_keeps_the_rest_and_measurements_follow_their_artifacts(tmp_path, mirror):
    model = write_tiny_detector(tmp_path / "graphs")["frozen"]
    recipe = tmp_path / "tiny.yaml"

    def write(count: int) -> None:
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        recipe.write_text(tiny_recipe_text(model, digest, variants=VARIANTS.replace("COUNT", str(count))))

    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    common = ["--cache-dir", str(tmp_path / "cache")]
    dist = tmp_path / "dist" / "tiny"
    write(4)
    assert run_cli(*common, "build", str(recipe), *where).returncode == 0
    assert run_cli(*common, "bench", str(recipe), "--runs", "2", "--warmup", "0", "--variant", "i8",
                   "--out", str(tmp_path / "dist")).returncode == 0
    assert run_cli(*common, "report", str(recipe), "--out", str(tmp_path / "dist")).returncode == 0
    before = md5s(dist)

    # Rebuild one variant with unchanged inputs: everything stays, byte for byte.
    again = run_cli(*common, "build", str(recipe), "--variant", "f32", "--force", *where)
    assert again.returncode == 0, again.stderr[-2000:]
    assert md5s(dist) == before
    assert {"bench.json", "report.json", "report.md", "latency.png"} <= {p.name for p in dist.iterdir()}
    manifest = json.loads((dist / "manifest.json").read_text())
    assert manifest["variant_order"] == ["f32", "i8"]

    # Change i8: f32's bytes stay; the bench and report measured the old i8 and are dropped, with a word.
    write(3)
    changed = run_cli(*common, "build", str(recipe), "--variant", "i8", *where)
    assert changed.returncode == 0, changed.stderr[-2000:]
    after = md5s(dist)
    assert after["tiny_f32.tflite"] == before["tiny_f32.tflite"]
    assert after["tiny_i8.tflite"] != before["tiny_i8.tflite"]
    names = {p.name for p in dist.iterdir()}
    assert "bench.json" not in names and "report.md" not in names and "latency.png" not in names
    assert "dropped bench.json: measured on artifacts that changed (tiny_i8.tflite)" in changed.stderr
    check = subprocess.run(["md5sum", "-c", "MD5SUMS"], cwd=dist, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "tiny_f32.tflite: OK" in check.stdout


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """One tiny detector built with a float32 and an int8 variant: (recipe, --out/--build-dir args, dist folder)."""
    if not MIRROR.is_dir():
        pytest.skip(f"the real-data mirror {MIRROR} is not on this machine")
    root = tmp_path_factory.mktemp("tiny-build")
    model = write_tiny_detector(root / "graphs")["frozen"]
    recipe = root / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(model, hashlib.sha256(model.read_bytes()).hexdigest(),
                                       variants=VARIANTS.replace("COUNT", "4")))
    where = ["--out", str(root / "dist"), "--build-dir", str(root / "build")]
    assert run_cli("--cache-dir", str(root / "c"), "build", str(recipe), *where).returncode == 0
    return recipe, where, root / "dist" / "tiny"


def test_report_works_from_the_build_alone(tiny_build):
    recipe, where, dist = tiny_build
    done = run_cli("report", str(recipe), *where)
    assert done.returncode == 0, done.stderr
    text = (dist / "report.md").read_text()
    assert f"No evaluation yet: `mzconvert eval {recipe} --dataset DIR` adds it." in text  # by path: not in a recipe folder
    assert text.index("| f32 | float32 |") < text.index("| i8 | int8 | int8 |")  # the recipe's order
    assert "accuracy.png" not in text
    assert run_cli("--recipes-dir", str(recipe.parent), "report", "tiny", *where).returncode == 0
    assert "No evaluation yet: `mzconvert eval tiny --dataset DIR` adds it." in (dist / "report.md").read_text()


@pytest.mark.parametrize("line", ["0123456789abcdef0123456789abcdef  ../../etc/passwd",
                                  "not a digest line", "0123456789abcdef0123456789abcdef  /etc/passwd"])
def test_release_refuses_md5sums_naming_files_outside_the_folder(tmp_path, line):
    folder = tmp_path / "dist" / "pedestrian-ssdlite"
    folder.mkdir(parents=True)
    (folder / "MD5SUMS").write_text(line + "\n")
    done = run_cli("release", "pedestrian-ssdlite", "--dist", str(tmp_path / "dist"), "--out", str(tmp_path))
    assert done.returncode == 2 and "MD5SUMS:1: expected '<md5>  <file inside pedestrian-ssdlite>'" in done.stderr
    assert "Traceback" not in done.stderr


def test_predict_draws_each_variant_side_by_side_into_dist(tiny_build):
    from PIL import Image

    recipe, where, dist = tiny_build
    image = sorted((MIRROR / "coco" / "val2017").glob("*.jpg"))[0]
    done = run_cli("predict", str(recipe), str(image), "--min-score", "0", *where)
    assert done.returncode == 0, done.stderr[-2000:]
    picture = dist / "predictions" / f"{image.stem}.png"
    assert Image.open(picture).width == 2 * 480 + 8
    check = subprocess.run(["md5sum", "-c", "MD5SUMS"], cwd=dist, capture_output=True, text=True)
    assert check.returncode == 0 and f"predictions/{picture.name}: OK" in check.stdout
    assert run_cli("report", str(recipe), *where).returncode == 0
    assert f"![{image.stem}](predictions/{picture.name})" in (dist / "report.md").read_text()


def test_a_folder_is_swapped_in_one_step_never_missing(tmp_path, monkeypatch):
    """renameat2(RENAME_EXCHANGE): no instant at which dist/<recipe> does not exist."""
    import os

    from mzconvert import fsio

    target, staging = tmp_path / "x", tmp_path / ".x@new"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")

    def no_rename(*args):
        raise AssertionError("a two-rename swap leaves a moment without the folder")

    monkeypatch.setattr(os, "replace", no_rename)
    fsio.replace_folder(staging, target)
    assert [p.name for p in target.iterdir()] == ["new"] and not staging.exists()


def test_a_kill_between_two_renames_gets_the_old_folder_back(tmp_path):
    from mzconvert.fsio import recover_folder

    old = tmp_path / ".x@old-1234"
    old.mkdir()
    (old / "model.tflite").write_text("old bytes")
    recover_folder(tmp_path / "x")
    assert (tmp_path / "x" / "model.tflite").read_text() == "old bytes" and not old.exists()


def test_dist_has_its_own_lock_across_build_folders(tmp_path, mirror):
    """Two builds of one recipe with other --build-dir but the same --out: the second waits for dist."""
    from mzconvert.fsio import folder_lock

    model = write_tiny_detector(tmp_path / "graphs")["frozen"]
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(model, hashlib.sha256(model.read_bytes()).hexdigest()))
    with folder_lock(tmp_path / "dist", 0, name=".tiny.lock"):  # another build writing dist/tiny
        done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), "--out", str(tmp_path / "dist"),
                       "--build-dir", str(tmp_path / "other-build"), "--lock-timeout", "1")
    assert done.returncode == 4 and "locked by another mzconvert process" in done.stderr
    assert not (tmp_path / "dist" / "tiny").exists()


def test_a_folder_of_own_recipes_works_by_name_everywhere(tiny_build, tmp_path):
    """--recipes-dir (or $MZCONVERT_RECIPES): list, build NAME, release, matrix; the release names what it holds."""
    recipe, where, dist = tiny_build
    own = ["--recipes-dir", str(recipe.parent)]
    listed = run_cli("--json", *own, "list")
    assert [row["name"] for row in json.loads(listed.stdout)] == ["tiny"]
    assert run_cli(*own, "build", "tiny", *where).returncode == 0  # up to date, found by name
    matrix = run_cli("--json", "matrix", env={"MZCONVERT_RECIPES": str(recipe.parent)})
    assert json.loads(matrix.stdout) == {"include": [{"recipe": "tiny"}]}
    done = run_cli("--json", *own, "release", "--all", "--dist", str(dist.parent), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    bundle = Path(json.loads(done.stdout)["bundle"])
    assert bundle.name.startswith("mzconvert-0.4.0-tiny-") and bundle.name.endswith(".tar.gz")
    assert not (recipe.parent / "recipes.lock").exists()  # pinned sources need no lock entry
