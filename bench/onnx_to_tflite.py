"""Issue 23: ONNX -> TFLite through onnx2tf against the Keras port, on the same real classifier, in one run.

The float32 ONNX that `mobilenetv2-torchvision` builds is taken as a user's ONNX file: a recipe of format onnx
converts it to LiteRT float32 and int8 through onnx2tf's NHWC port, with the shipped int8-tflite variant's
calibration (imagenet-calib, 300 images, percentile 99.99). Both int8 models and both float models are then
run on the same ImageNet samples with the recipe's preprocessing (LiteRT's optimized kernels, as eval). Printed:
top-1 of each with the paired bootstrap 95 % interval of its difference to the Keras port's, top-1 agreement
with the float ONNX model, logits SQNR, and the float TFLite's cosine to the ONNX model over every image.

Usage: .venv/bin/python bench/onnx_to_tflite.py [--mirror DIR] [--count N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = "mobilenetv2-torchvision"


def route_recipe(shipped: dict, onnx_file: Path) -> dict:
    """The shipped recipe as a user's ONNX file would have it: the same input, preprocessing, cut, labels,
    calibration and verify images; the source the float32 ONNX it builds."""
    int8 = next(v for v in shipped["variants"] if v["name"] == "int8-tflite")
    return {"name": "mobilenetv2-onnx2tf", "task": "classification", "description": "bench: the ONNX route",
            "license": shipped["license"],
            "source": {"url": onnx_file.as_uri(), "sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest()},
            "format": "onnx", "input": shipped["input"], "preprocess": shipped["preprocess"],
            "strip": shipped["strip"], "labels": shipped["labels"],
            "variants": [{"name": "float32", "mode": "float32"},
                         {"name": "float32-tflite", "mode": "float32", "target": "tflite"},
                         {k: v for k, v in int8.items() if k != "min_cosine"}],
            "verify": shipped["verify"]}


def mz(*args: str, mirror: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", "--mirror", mirror, *args],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mzconvert {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--count", type=int, default=None, help="evaluate on the first N samples only")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mzconvert.evaluate.cocometrics import bootstrap_weights
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.classification import labelled_images
    from mzconvert.tasks.signal import compare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        where = ["--out", str(tmp / "dist"), "--build-dir", str(tmp / "build")]
        mz("build", SHIPPED, *where, mirror=args.mirror)
        built = json.loads((tmp / "dist" / SHIPPED / "manifest.json").read_text())["variants"]
        onnx_file = tmp / "dist" / SHIPPED / built["float32"]["file"]
        shipped = yaml.safe_load((ROOT / "recipes" / f"{SHIPPED}.yaml").read_text())
        recipe_path = tmp / "route.yaml"
        recipe_path.write_text(yaml.safe_dump(route_recipe(shipped, onnx_file), sort_keys=False))
        start = time.perf_counter()
        mz("build", str(recipe_path), *where, mirror=args.mirror)
        route_seconds = time.perf_counter() - start
        routed = json.loads((tmp / "dist" / "mobilenetv2-onnx2tf" / "manifest.json").read_text())["variants"]
        files = {"float32 ONNX": onnx_file,
                 "int8 TFLite, Keras port (shipped)": tmp / "dist" / SHIPPED / built["int8-tflite"]["file"],
                 "float32 TFLite, onnx2tf": tmp / "dist" / "mobilenetv2-onnx2tf" / routed["float32-tflite"]["file"],
                 "int8 TFLite, onnx2tf": tmp / "dist" / "mobilenetv2-onnx2tf" / routed["int8-tflite"]["file"]}

        recipe = load_recipe(SHIPPED)
        images = labelled_images(Path(args.mirror) / "imagenet-samples", recipe.labels).images[:args.count]
        runners = {name: open_model(path, list(recipe.strip.outputs), threads=2) for name, path in files.items()}
        logits = {name: [] for name in files}
        for path, _ in images:
            tensor = prepare(path, recipe.preprocess, recipe.input).tensor
            for name, runner in runners.items():
                logits[name].append(runner.run(tensor)[0].reshape(-1))
        labels = np.array([label for _, label in images])
        stacked = {name: np.stack(rows) for name, rows in logits.items()}
        correct = {name: rows.argmax(1) == labels for name, rows in stacked.items()}
        weights = bootstrap_weights(len(images))
        base, keras = "float32 ONNX", "int8 TFLite, Keras port (shipped)"
        print(f"{SHIPPED}: {len(images)} ImageNet samples, preprocessing of the recipe, LiteRT optimized kernels "
              f"(XNNPACK), ONNX Runtime for the ONNX model; the ONNX route's build took {route_seconds:.0f} s")
        print("| model | size | top-1 | difference to the Keras port's int8 (95 % paired interval) | "
              "agreement with float ONNX | logits SQNR | cosine |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, hits in correct.items():
            diff = weights @ (hits.astype(float) - correct[keras]) / len(images)
            low, high = np.percentile(diff, [2.5, 97.5])
            signal = compare(stacked[base], stacked[name])
            agreement = np.mean(stacked[name].argmax(1) == stacked[base].argmax(1))
            print(f"| {name} | {files[name].stat().st_size / 1e6:.1f} MB | {hits.mean():.1%} | "
                  f"{(hits.mean() - correct[keras].mean()) * 100:+.1f} points ({low * 100:+.1f} to {high * 100:+.1f}) | "
                  f"{agreement:.1%} | {signal['sqnr_db']:.1f} dB | {signal['cosine']:.6f} |")


if __name__ == "__main__":
    main()
