"""Issue 24: where a YOLO head's box branch is cut for int8, measured on a real Ultralytics graph in one run.

YOLOv8n is built from the `ultralytics` package's model YAML and exported to ONNX as the tests do
(tests/ultralytics_export.py, in .venv-ultralytics: `make ultralytics-env`; the weights are not trained, see
that script), or --onnx names an export of your own (a YOLO26's, whose head has no DFL: bench/yolo_trained.py
trains one). `mzconvert init` writes its recipe (cut before the DFL, `box_encoding: dfl`, or before the grid
decode of a head without one, `distances`); a twin recipe cuts where the export's pixel boxes are made
(`box_encoding: pixels`). Both build int8 (ONNX QDQ) and int8-tflite from the same calibration images. On the
verify images, every cell's box (before NMS) of each int8 model is compared with the float export's own box:
mean IoU, the share of cells at IoU >= 0.9 and >= 0.95, mean absolute error in pixels, and the paired bootstrap
95 % interval of the mean-IoU difference (init's cut - pixels). Untrained class scores are near-ties, so
detections matched and AP say nothing here; boxes do not depend on them.

Usage: .venv/bin/python bench/yolo_box_cut.py [--mirror DIR] [--onnx EXPORT.onnx]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"int8": "ONNX Runtime, as defined", "int8-tflite": "LiteRT reference kernels"}


def mz(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", *args], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"mzconvert {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def export(work: Path, mirror: Path) -> Path:
    python = ROOT / ".venv-ultralytics" / "bin" / "python"
    env = os.environ | {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "false",
                        "YOLO_CONFIG_DIR": str(work / "settings")}
    subprocess.run([str(python), str(ROOT / "tests" / "ultralytics_export.py"), "yolov8n.yaml",
                    str(mirror / "coco" / "train2017")], cwd=work, env=env, check=True, capture_output=True)
    return work / "yolov8n.onnx"


def recipes(model: Path, work: Path, mirror: Path) -> dict[str, Path]:
    """init's recipe and its twin cut at the pixel boxes, int8 floors lowered (untrained scores)."""
    mz("init", "init", "--from", str(model), "--to", str(work), "--calibration", str(mirror / "coco" / "train2017"),
       "--verify", str(mirror / "coco" / "val2017"))
    from mzconvert.sources.inspection import inspect_onnx

    recipe = yaml.safe_load((work / "init.yaml").read_text())
    recipe["variants"] = [v | {"min_matched": 0, "min_slice_sqnr_db": -100}
                          for v in recipe["variants"] if v["name"] in VARIANTS]
    (work / "init.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    pixels = inspect_onnx(model)["concat_outputs"]["output0"][0]["name"]
    recipe["name"] = "pixels"
    recipe["strip"]["outputs"][0] = recipe["postprocess"]["box_output"] = pixels
    del recipe["postprocess"]["box_encoding"]
    (work / "pixels.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return {name: work / f"{name}.yaml" for name in ("init", "pixels")}


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes given as rows of centre x, y, width, height."""
    low = np.maximum(a[:, :2] - a[:, 2:] / 2, b[:, :2] - b[:, 2:] / 2)
    high = np.minimum(a[:, :2] + a[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    return inter / np.maximum(np.prod(a[:, 2:], 1) + np.prod(b[:, 2:], 1) - inter, 1e-12)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--onnx", help="an Ultralytics detection export (default: an untrained YOLOv8n's)")
    args = parser.parse_args()
    mirror = Path(args.mirror)
    import onnxruntime as ort

    from mzconvert.evaluate.cocometrics import bootstrap_weights, difference_interval
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import OPTIMIZED, REFERENCE, open_model
    from mzconvert.tasks.detection import head_boxes

    work = Path(tempfile.mkdtemp(prefix="mzconvert-yolo-box-cut-"))
    model = Path(args.onnx) if args.onnx else export(work, mirror)
    paths = recipes(model, work, mirror)
    whole = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    per_image: dict[tuple[str, str], np.ndarray] = {}
    print("| cut | variant | kernels | mean IoU with the export's boxes | cells IoU >= 0.9 | cells IoU >= 0.95 | "
          "mean abs error px |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cut, path in paths.items():
        mz("build", str(path), "--out", str(work / "dist"), "--build-dir", str(work / "build"))
        recipe = load_recipe(path)
        images = sorted((mirror / "coco" / "val2017").glob("*.jpg"))[:recipe.verify.count]
        for variant in VARIANTS:
            suffix = "tflite" if variant.endswith("tflite") else "onnx"
            # a TFLite variant ships ending in the attached NMS: its raw outputs are the model before it
            raw = sorted((work / "build" / cut / "quantize" / variant / "raw").glob("*.tflite"))
            runner = open_model(raw[0] if raw else work / "dist" / cut / f"{cut}_{variant}.{suffix}",
                                list(recipe.strip.outputs), kernels=REFERENCE if suffix == "tflite" else OPTIMIZED)
            ious, errors = [], []
            for image in images:
                tensor = prepare(image, recipe.preprocess, recipe.input).tensor
                theirs = whole.run(None, {whole.get_inputs()[0].name: tensor})[0][0, :4].T
                boxes = runner.run(tensor)[0]
                ours = (head_boxes(boxes[0], recipe.postprocess, recipe.input.height_width) if cut == "init"
                        else boxes.reshape(4, -1).T)
                ious.append(iou(ours, theirs))
                errors.append(np.abs(ours - theirs).mean())
            cells = np.concatenate(ious)
            per_image[cut, variant] = np.array([i.mean() for i in ious])
            print(f"| {cut if cut == 'pixels' else f'init ({recipe.postprocess.box_encoding})'} | {variant} | {VARIANTS[variant]} | {cells.mean():.4f} | {np.mean(cells >= 0.9):.1%} | "
                  f"{np.mean(cells >= 0.95):.1%} | {np.mean(errors):.2f} |", flush=True)
    for variant in VARIANTS:
        cut, pixels = per_image["init", variant], per_image["pixels", variant]
        weights = bootstrap_weights(len(cut))
        low, high = difference_interval(weights @ cut / len(cut), weights @ pixels / len(pixels))
        print(f"{variant}: mean IoU init's cut - pixels {cut.mean() - pixels.mean():+.4f} (95 % paired interval "
              f"{low:+.4f} to {high:+.4f}), {len(cut)} images")
    print(f"(work folder: {work})")


if __name__ == "__main__":
    main()
