"""The exit-code table of docs/cli.md, row by row: each documented case is run through the real CLI and must
end with its code and a one-line message (no traceback)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from mzconvert.fsio import folder_lock
from tests.conftest import MIRROR, ROOT, image_folder, run_cli
from tests.test_onnx_backend import tiny_onnx

DOCUMENTED = re.findall(r"^\| (\d) \| (.+) \|$", (ROOT / "docs" / "cli.md").read_text(), re.M)


def classifier_recipe(folder: Path, variants: str, name: str = "tiny-cls", relu_as: str = "Relu") -> Path:
    model = tiny_onnx(folder / "tiny.onnx")
    if relu_as != "Relu":  # its first activation another op
        import onnx

        graph = onnx.load(str(model))
        next(node for node in graph.graph.node if node.op_type == "Relu").op_type = relu_as
        onnx.save(graph, str(model))
    recipe = folder / f"{name}.yaml"
    recipe.write_text(f"""name: {name}
task: classification
description: tiny ONNX classifier
license: test
source:
  url: {model.as_uri()}
  sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}
format: onnx
input: {{name: input, shape: [1, 3, 32, 32], layout: NCHW}}
preprocess: {{interpolation: pil-bilinear, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375]}}
strip: {{inputs: [input], outputs: [logits]}}
variants:
{variants}verify: {{images: {MIRROR / 'coco' / 'val2017'}, count: 2}}
""")
    return recipe


def where(folder: Path) -> list[str]:
    return ["--out", str(folder / "dist"), "--build-dir", str(folder / "build")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A float32 classifier without labels, built once."""
    if not MIRROR.is_dir():
        pytest.skip(f"the real-data mirror {MIRROR} is not on this machine")
    folder = tmp_path_factory.mktemp("built")
    recipe = classifier_recipe(folder, "  - {name: float32, mode: float32}\n")
    done = run_cli("--cache-dir", str(folder / "cache"), "build", str(recipe), *where(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def ok(tmp_path, built):
    return run_cli("show", "pedestrian-ssdlite")


def below_threshold(tmp_path, built):
    recipe = classifier_recipe(tmp_path, "  - {name: float32, mode: float32}\n"
                                         "  - {name: dynamic, mode: dynamic, min_sqnr_db: 300}\n")
    return run_cli("--cache-dir", str(tmp_path / "cache"), "build", "--verify", str(recipe), *where(tmp_path))


def refused(tmp_path, built):
    recipe = classifier_recipe(tmp_path, "  - {name: float32, mode: float32}\n"
                                         "  - {name: dynamic, mode: dynamic, min_slice_sqnr_db: 300}\n")
    done = run_cli("--cache-dir", str(tmp_path / "cache"), "build", str(recipe), *where(tmp_path))
    shipped = sorted(p.name for p in (tmp_path / "dist" / "tiny-cls").glob("*.onnx"))
    assert shipped == ["tiny-cls_float32.onnx"], shipped  # the variant that passed, and only it
    return done


def unmade(tmp_path, built):
    """A classifier with a HardSwish, whose TFLite port's ops the converter has no 16x8 kernel for: its int16x8
    variant cannot be made, its float32 ships."""
    recipe = classifier_recipe(tmp_path, "  - {name: float32, mode: float32}\n  - {name: int16x8-tflite, mode: "
                                         f"int16x8, target: tflite, calibration: {MIRROR / 'coco' / 'train2017'}, "
                                         "calibration_count: 4}\n", relu_as="HardSwish")
    done = run_cli("--cache-dir", str(tmp_path / "cache"), "build", str(recipe), *where(tmp_path))
    shipped = sorted(p.name for p in (tmp_path / "dist" / "tiny-cls").glob("*.*"))
    assert "tiny-cls_float32.onnx" in shipped and not any("int16x8" in name for name in shipped), shipped
    manifest = json.loads((tmp_path / "dist" / "tiny-cls" / "manifest.json").read_text())
    assert "not yet supported for op" in manifest["refused"]["int16x8-tflite"]  # the converter's reason, kept
    return done


def disk_full(tmp_path, built):
    out = tmp_path / "out"
    out.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        fill_disk(out)
        return run_cli("--cache-dir", str(built / "cache"), "build", str(built / "tiny-cls.yaml"),
                       "--out", str(out), "--build-dir", str(built / "build"))
    finally:
        subprocess.run(["umount", str(out)], check=True)


def fill_disk(folder: Path) -> None:
    """Write into `folder` until its disk is full."""
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:  # full
        pass


def bad_field(tmp_path, built):
    text = (ROOT / "recipes" / "pedestrian-ssdlite.yaml").read_text().replace("[1, 300, 300, 3]", "[1, 0, 300, 3]")
    (tmp_path / "pedestrian-ssdlite.yaml").write_text(text)
    return run_cli("show", str(tmp_path / "pedestrian-ssdlite.yaml"))


def unknown_variant(tmp_path, built):
    return run_cli("--cache-dir", str(built / "cache"), "build", str(built / "tiny-cls.yaml"), "--variant", "int4",
                   *where(built))


def overlapping_folders(tmp_path, built):
    stages = sorted(p.name for p in (built / "build" / "tiny-cls").iterdir())
    done = run_cli("--cache-dir", str(built / "cache"), "build", str(built / "tiny-cls.yaml"), "--out",
                   str(built / "build"), "--build-dir", str(built / "build"))
    assert sorted(p.name for p in (built / "build" / "tiny-cls").iterdir()) == stages  # no stage output replaced
    return done


def imageless_folder(tmp_path, built):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("no image here")
    return run_cli("init", "again", "--from", str(built / "tiny.onnx"), "--to", str(tmp_path / "r"),
                   "--verify", str(tmp_path / "photos"))


def unlabelled_eval(tmp_path, built):
    images = image_folder(tmp_path / "photos", MIRROR / "coco" / "val2017", 2)  # no label in folder or name
    return run_cli("--cache-dir", str(built / "cache"), "eval", str(built / "tiny-cls.yaml"), "--dataset",
                   str(images), *where(built))


def crossed_categories_eval(tmp_path, built):
    """A detector labelled person and car, on a dataset whose categories are car (under another id than the
    recipe's) and bus: which category its person is cannot be told."""
    from tests.test_evaluate import coco_folder
    from tests.test_yolo import yolov8_like_onnx

    model = yolov8_like_onnx(tmp_path / "yolo.onnx")
    recipe = tmp_path / "yolo.yaml"
    recipe.write_text(f"""name: yolo
task: detection
description: a YOLOv8-layout head
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
format: onnx
input: {{name: images, shape: [1, 3, 320, 320], layout: NCHW}}
preprocess: {{interpolation: cv2-linear, letterbox: true, scale: 0.00392156862745098, offset: 0.0}}
postprocess: {{kind: yolov8, labels: [person, car], category_ids: [1, 3]}}
variants:
  - {{name: float32, mode: float32}}
""")
    done = run_cli("--cache-dir", str(tmp_path / "cache"), "build", str(recipe), *where(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    dataset = coco_folder(tmp_path / "coco", [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}])
    return run_cli("eval", str(recipe), "--dataset", str(dataset), "--split", "val", *where(tmp_path))


def nothing_to_compile(tmp_path, built):
    return run_cli("--cache-dir", str(built / "cache"), "vela", str(built / "tiny-cls.yaml"), *where(built))


def checksum_differs(tmp_path, built):
    recipe = (built / "tiny-cls.yaml").read_text()
    digest = re.search(r"sha256: (\w+)", recipe).group(1)
    (tmp_path / "tiny-cls.yaml").write_text(recipe.replace(digest, "e" * 64))
    return run_cli("--cache-dir", str(tmp_path / "cache"), "fetch", str(tmp_path / "tiny-cls.yaml"))


def offline_missing(tmp_path, built):
    return run_cli("--offline", "--cache-dir", str(tmp_path / "cache"), "fetch", "pedestrian-ssdlite",
                   env={"MZCONVERT_MIRRORS": ""})


def locked(tmp_path, built):
    with folder_lock(built / "build" / "tiny-cls", wait_seconds=0):
        return run_cli("--cache-dir", str(built / "cache"), "build", str(built / "tiny-cls.yaml"),
                       "--lock-timeout", "0", *where(built))


CASES = {
    "the command did what it was asked": ok,
    "a stage ran and failed: a variant below its declared threshold with `build --verify`": below_threshold,
    "a variant below its fidelity floor: not shipped; the recipe's other variants are written to its dist folder":
    refused,
    "a variant its converter or quantizer cannot make (an op without a kernel at its precision): not shipped; the "
    "recipe's other variants are written to its dist folder": unmade,
    "the disk of a folder the user chose (`--out`, `--build-dir`, `--cache-dir`) is full or read-only: the message "
    "names the folder and its option": disk_full,
    "a recipe field is wrong: each problem once, located (`file: field: what is expected`)": bad_field,
    "an argument names what the recipe does not have (`--variant`)": unknown_variant,
    "`build --out` and `--build-dir` where the recipe's dist folder would replace its build folder (or lie in it)":
    overlapping_folders,
    "a folder `init` is given holds no image (`--calibration`, `--verify`)": imageless_folder,
    "`eval` of a classifier on images whose labels cannot be told": unlabelled_eval,
    "`eval` of a detector some of whose labels name the dataset's categories under other ids while others name "
    "none (`postprocess.category_ids` says which is which)": crossed_categories_eval,
    "a stage with nothing to do: `vela` of a recipe without NPU targets": nothing_to_compile,
    "no source served the pinned file, or it differs from its checksum": checksum_differs,
    "`--offline` and the file is not in the cache or a directory mirror": offline_missing,
    "another process holds the recipe's build folder (`--lock-timeout`)": locked,
}
# What each case's one line must name.
NAMED = {disk_full: "the --out folder", bad_field: "input.shape[1]", unknown_variant: "'int4'", imageless_folder: "--verify",
         overlapping_folders: "overlap",
         unlabelled_eval: "photo 0.JPG", crossed_categories_eval: "postprocess.category_ids",
         nothing_to_compile: "targets.vela", checksum_differs: "sha256",
         below_threshold: "dynamic", locked: "locked", refused: "variants[1].min_slice_sqnr_db: dynamic",
         unmade: "variants[1]: int16x8-tflite could not be made"}
ERROR_LINES = {refused: 2, unmade: 2}  # its floor missed, then what was and was not shipped


def test_the_table_documents_exactly_the_cases_run_here():
    assert sorted(when for _, when in DOCUMENTED) == sorted(CASES)


@pytest.mark.parametrize("code, when", DOCUMENTED, ids=[w[:40] for _, w in DOCUMENTED])
def test_each_documented_case_ends_with_its_code(code, when, tmp_path, built):
    case = CASES[when]
    done = case(tmp_path, built)
    assert done.returncode == int(code), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("mzconvert: error:")]
    assert len(errors) == (0 if code == "0" else ERROR_LINES.get(case, 1)), done.stderr[-2000:]
    if case in NAMED:
        assert NAMED[case] in errors[0], errors
