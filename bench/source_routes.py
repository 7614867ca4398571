"""Issue 23: every source kind's route to TFLite, measured on one real classifier in one run.

The torchvision MobileNetV2 that `mobilenetv2-torchvision` builds (its state dict, through our Keras port: the
shipped route) is saved the ways users bring a model: the float32 ONNX the recipe builds, a TorchScript archive
and a torch.export archive (.pt2) of the same module, and the float TFLite the ONNX route makes. Each is built by
a recipe of its format with the shipped recipe's input, preprocessing, labels and the int8-tflite variant's
calibration (imagenet-calib, 300 images, mean_minmax; ai-edge-quantizer, which records min/max, quantizes
the float .tflite beside our path). Every model then runs on the same ImageNet samples with the recipe's preprocessing (LiteRT's
optimized kernels, as eval). Printed per route: the float TFLite's cosine and SQNR to the float ONNX model over
all images, int8 top-1 with the paired bootstrap 95 % interval of its difference to the shipped route's,
top-1 agreement with the float model, logits SQNR, and the build time of the route's recipe.

Usage: .venv/bin/python bench/source_routes.py [--mirror DIR] [--count N]
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


def route_recipe(name: str, shipped: dict, source: Path, fmt: str) -> dict:
    """The shipped recipe as a user's file of `fmt` would have it: the same input, preprocessing, cut, labels,
    calibration and verify images; float32 and int8 TFLite."""
    int8 = {k: v for k, v in next(v for v in shipped["variants"] if v["name"] == "int8-tflite").items()
            if k != "min_cosine"}
    if fmt == "tflite":  # NHWC input, the file itself is the float variant; int8 by the converter (the default)
        # and by ai-edge-quantizer (min/max ranges)
        int8 = {k: v for k, v in int8.items() if k != "target"}
        aeq = {k: v for k, v in int8.items()  # Google's quantizer: its own ranges and weights
               if k not in ("calibration_method", "calibration_percentile", "weight_rounding")}
        variants = [{"name": "float32-tflite", "mode": "float32"}, int8,
                    aeq | {"name": "int8-aeq", "quantizer": "ai-edge-quantizer"}]
        model_input = {**shipped["input"], "shape": [1, 224, 224, 3], "layout": "NHWC"}
    else:
        variants = [{"name": "float32-tflite", "mode": "float32", "target": "tflite"}, int8]
        model_input = shipped["input"]
    return {"name": name, "task": "classification", "description": f"bench: the {fmt} route",
            "license": shipped["license"],
            "source": {"url": source.as_uri(), "sha256": hashlib.sha256(source.read_bytes()).hexdigest()},
            "format": fmt, "input": model_input, "preprocess": shipped["preprocess"],
            **({"strip": shipped["strip"]} if fmt != "tflite" else {}), "labels": shipped["labels"],
            "variants": variants, "verify": shipped["verify"]}


def mz(*args: str, mirror: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", "--mirror", mirror, *args],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mzconvert {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done


def torch_archives(weights: Path, folder: Path) -> dict[str, Path]:
    """The shipped module with its real weights, saved as TorchScript and as a torch.export archive."""
    import torch

    from mzconvert.backends.torch_models import MobileNetV2, load_state

    module = MobileNetV2(num_classes=1000)
    module.load_state_dict(load_state(weights))
    module.eval()
    example = torch.zeros(1, 3, 224, 224)
    torch.jit.save(torch.jit.trace(module, example), folder / "mobilenetv2.pt")
    torch.export.save(torch.export.export(module, (example,)), folder / "mobilenetv2.pt2")
    return {"torchscript": folder / "mobilenetv2.pt", "torch-export": folder / "mobilenetv2.pt2"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--count", type=int, default=None, help="evaluate on the first N samples only")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mzconvert.evaluate.cocometrics import bootstrap_weights, difference_interval
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.classification import labelled_images
    from mzconvert.tasks.signal import compare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        where = ["--out", str(tmp / "dist"), "--build-dir", str(tmp / "build")]
        start = time.perf_counter()
        mz("build", SHIPPED, *where, mirror=args.mirror)
        seconds = {"torch state dict (shipped: our Keras port)": time.perf_counter() - start}
        dist = tmp / "dist"
        built = json.loads((dist / SHIPPED / "manifest.json").read_text())["variants"]
        shipped = yaml.safe_load((ROOT / "recipes" / f"{SHIPPED}.yaml").read_text())
        recipe = load_recipe(SHIPPED)
        onnx_file = dist / SHIPPED / built["float32"]["file"]
        models = {"float32 ONNX": onnx_file, "torch state dict (shipped: our Keras port)":
                  (None, dist / SHIPPED / built["int8-tflite"]["file"])}
        sources = {"onnx": onnx_file, **torch_archives(next((tmp / "build").rglob("*.pth")), tmp)}
        for fmt, source in [*sources.items(), ("tflite", None)]:
            if fmt == "tflite":  # the ONNX route's float TFLite, as a user's float .tflite
                source = models["onnx (onnx2tf)"][0]
            label = {"onnx": "onnx (onnx2tf)", "torchscript": "TorchScript (ONNX export, onnx2tf)",
                     "torch-export": ".pt2 (ONNX export, onnx2tf)",
                     "tflite": "float .tflite (our ranges, the converter's quantizer)"}[fmt]
            name = f"route-{fmt}"
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(route_recipe(name, shipped, source, fmt),
                                                             sort_keys=False))
            start = time.perf_counter()
            mz("build", str(tmp / f"{name}.yaml"), *where, mirror=args.mirror)
            seconds[label] = time.perf_counter() - start
            routed = json.loads((dist / name / "manifest.json").read_text())["variants"]
            models[label] = (dist / name / routed["float32-tflite"]["file"], dist / name / routed["int8-tflite"]["file"])
            if "int8-aeq" in routed:
                models["float .tflite (ai-edge-quantizer 0.10)"] = (None, dist / name / routed["int8-aeq"]["file"])
                seconds["float .tflite (ai-edge-quantizer 0.10)"] = seconds[label]

        images = labelled_images(Path(args.mirror) / "imagenet-samples", recipe.labels).images[:args.count]
        runs = {"float32 ONNX": open_model(onnx_file, threads=2)}
        for label, pair in models.items():
            if label != "float32 ONNX":
                runs |= {(label, kind): open_model(path, threads=2) for kind, path in zip(("float", "int8"), pair)
                         if path is not None}
        logits = {key: [] for key in runs}
        for path, _ in images:
            tensor = prepare(path, recipe.preprocess, recipe.input).tensor
            for key, runner in runs.items():
                logits[key].append(runner.run(tensor)[0].reshape(-1))
        stacked = {key: np.stack(rows) for key, rows in logits.items()}
        labels = np.array([label for _, label in images])
        base = stacked["float32 ONNX"]
        correct = {key: rows.argmax(1) == labels for key, rows in stacked.items()}
        shipped_int8 = correct[("torch state dict (shipped: our Keras port)", "int8")]
        weights = bootstrap_weights(len(images))
        print(f"{SHIPPED}: {len(images)} ImageNet samples, the recipe's preprocessing, LiteRT optimized kernels "
              f"(XNNPACK); float32 ONNX (ONNX Runtime) top-1 {correct['float32 ONNX'].mean():.1%}")
        print("| source kind | float TFLite vs float ONNX: cosine, SQNR | int8 top-1 | difference to the shipped "
              "route (95 % paired interval) | int8 agreement with float | int8 logits SQNR | build s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label in [k for k in models if k != "float32 ONNX"]:
            floats = compare(base, stacked[(label, "float")]) if (label, "float") in stacked else None
            hits = correct[(label, "int8")]
            low, high = difference_interval(weights @ hits / len(images), weights @ shipped_int8 / len(images))
            signal = compare(base, stacked[(label, "int8")])
            agreement = np.mean(stacked[(label, "int8")].argmax(1) == base.argmax(1))
            float_text = f"{floats['cosine']:.6f}, {floats['sqnr_db']:.1f} dB" if floats else "(no float TFLite)"
            print(f"| {label} | {float_text} | {hits.mean():.1%} | {(hits.mean() - shipped_int8.mean()) * 100:+.1f} "
                  f"points ({low * 100:+.1f} to {high * 100:+.1f}) | {agreement:.1%} | {signal['sqnr_db']:.1f} dB | "
                  f"{seconds[label]:.0f} |")


if __name__ == "__main__":
    main()
