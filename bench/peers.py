"""Issue 26: our int8 next to ONNX Runtime's quantizer (and NNCF, where installed), measured in one run.

The float32 ONNX model a classifier recipe builds (default: mobilenetv2-torchvision) is quantized by ONNX Runtime's
`quantize_static` (QDQ, per-channel int8 weights; MinMax, Percentile 99.999 and Entropy calibration, and MinMax with
uint8 activations) and, when `nncf` is importable, by NNCF's `quantize` (its defaults), all from the same
calibration images and preprocessing as the recipe's int8 variants (its `int8` calibration set). Every model then
runs on the same labelled images with the recipe's preprocessing: ONNX QDQ models as their ops define them (as our
eval runs them), our TFLite int8 under LiteRT's reference kernels (its NPU target's) and its optimized ones.
Printed per quantizer: top-1 and its ratio to float32, the paired bootstrap 95 % interval of its top-1 difference
to our ONNX int8, top-1 agreement with float32, logits SQNR to float32, the same two under ORT's fused integer
kernels on this CPU (what a deployment here computes), quantizer seconds, 1-thread latency (ORT's fused kernels,
LiteRT's XNNPACK) and how many of the model's convolutions ORT runs as integer kernels.

A detector recipe (--recipe pedestrian-ssdlite; no peer quantizes its TF graph) prints its shipped int8 against
its float32 on the COCO val images (--dataset, default MIRROR/coco), under the kernels the int8's target computes
with: each raw output's SQNR (whole, and its worst coordinate or class), the float model's detections matched
(same label, IoU >= 0.9, score >= 0.3 in either) and AP with its ratio to float32 and paired interval (`eval`).

Usage: .venv/bin/python bench/peers.py [--recipe NAME] [--dataset DIR] [--count N] [--mirror DIR]
(needs `mzconvert build RECIPE` into ./dist first, or builds it there)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


class Feeds:
    """ONNX Runtime's CalibrationDataReader over preprocessed images."""

    def __init__(self, name: str, tensors: list[np.ndarray]):
        self.name, self.tensors, self.i = name, tensors, 0

    def get_next(self):
        if self.i >= len(self.tensors):
            return None
        self.i += 1
        return {self.name: self.tensors[self.i - 1]}

    def rewind(self):
        self.i = 0


def ort_quantized(prepared: Path, target: Path, tensors: list[np.ndarray], name: str, method: str,
                  activations: str) -> float:
    """quantize_static as its documentation sets it up for CNNs; returns the seconds it took."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"CalibPercentile": 99.999} if method == "Percentile" else {}
    start = time.perf_counter()
    quantize_static(str(prepared), str(target), Feeds(name, tensors), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, method),
                    extra_options=extra)
    return time.perf_counter() - start


def nncf_quantized(float_model: Path, target: Path, tensors: list[np.ndarray], name: str) -> float | None:
    try:
        import nncf
        import onnx
    except ImportError:
        return None
    start = time.perf_counter()
    model = nncf.quantize(onnx.load(str(float_model)), nncf.Dataset(tensors, lambda t: {name: t}),
                          subset_size=len(tensors))
    onnx.save(model, str(target))
    return time.perf_counter() - start


def timed(model: Path) -> dict:
    """mzconvert's latency measurement of `model` (median_ms; integer_convs: ONNX Runtime's integer convolutions
    of an ONNX model, of all), in a process of its own."""
    done = subprocess.run([sys.executable, "-m", "mzconvert.evaluate.latency", str(model), "--runs", "30",
                           "--threads", "1"], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="mobilenetv2-torchvision")
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--dataset", default=None, help="labelled images [MIRROR/imagenet-samples]")
    parser.add_argument("--count", type=int, default=None, help="only the first N images")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from onnxruntime.quantization import quant_pre_process

    from mzconvert.evaluate.cocometrics import bootstrap_weights, difference_interval
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import FUSED, OPTIMIZED, REFERENCE, open_model
    from mzconvert.sources.fetch import FetchConfig, Fetcher, default_cache_dir
    from mzconvert.sources.imagesets import load_image_set
    from mzconvert.tasks.classification import labelled_images
    from mzconvert.tasks.signal import compare

    recipe = load_recipe(args.recipe)
    manifest_file = ROOT / "dist" / recipe.name / "manifest.json"
    if not manifest_file.is_file():
        subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", "--mirror", args.mirror, "build",
                        recipe.name], cwd=ROOT, check=True)
    built = json.loads(manifest_file.read_text())["variants"]
    dist = manifest_file.parent
    if recipe.task == "detection":
        detector(recipe, dist, built, Path(args.dataset or Path(args.mirror) / "coco"), args)
        return
    ours = recipe.variant("int8")
    image_set = load_image_set(ours.calibration, recipe.path)
    fetcher = Fetcher(FetchConfig(cache_dir=default_cache_dir(), mirrors=[args.mirror]))
    calibration = image_set.paths(fetcher, image_set.count(ours.calibration_count, 300))
    tensors = [prepare(p, recipe.preprocess, recipe.input).tensor for p in calibration]
    name = recipe.input.name

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        float_model = dist / built["float32"]["file"]
        prepared = tmp / "prepared.onnx"
        quant_pre_process(str(float_model), str(prepared), skip_symbolic_shape=True)
        models = {"float32": (float_model, None, None), "ours, ONNX int8": (dist / built["int8"]["file"], None, None)}
        if "int8-tflite" in built:
            tflite = dist / built["int8-tflite"]["file"]
            models |= {"ours, TFLite int8 (reference kernels)": (tflite, REFERENCE, None),
                       "ours, TFLite int8 (optimized kernels)": (tflite, OPTIMIZED, None)}
        for method, activations in (("MinMax", "int8"), ("Percentile", "int8"), ("Entropy", "int8"),
                                    ("MinMax", "uint8")):
            target = tmp / f"ort-{method}-{activations}.onnx"
            seconds = ort_quantized(prepared, target, tensors, name, method, activations)
            models[f"ONNX Runtime quantize_static, {method}, {activations} activations"] = (target, None, seconds)
        if (seconds := nncf_quantized(float_model, tmp / "nncf.onnx", tensors, name)) is not None:
            models["NNCF (defaults)"] = (tmp / "nncf.onnx", None, seconds)

        dataset = Path(args.dataset) if args.dataset else Path(args.mirror) / "imagenet-samples"
        images = labelled_images(dataset, recipe.labels).images[:args.count]
        runners = {label: open_model(path, list(recipe.strip.outputs), threads=2, kernels=kernels or OPTIMIZED)
                   for label, (path, kernels, _) in models.items()}
        # what a deployment on this CPU computes: ORT's fused integer kernels (their 16-bit pair sums saturate
        # on x86 without VNNI)
        fused = {label: open_model(path, list(recipe.strip.outputs), threads=2, kernels=FUSED)
                 for label, (path, _, _) in models.items() if path.suffix == ".onnx" and label != "float32"}
        logits = {label: [] for label in [*runners, *(f"{label} fused" for label in fused)]}
        for path, _ in images:
            tensor = prepare(path, recipe.preprocess, recipe.input).tensor
            for label, runner in runners.items():
                logits[label].append(runner.run(tensor)[0].reshape(-1))
            for label, runner in fused.items():
                logits[f"{label} fused"].append(runner.run(tensor)[0].reshape(-1))
        stacked = {label: np.stack(rows) for label, rows in logits.items()}
        truth = np.array([label for _, label in images])
        # labels index the recipe's label list; logits index the model's outputs (label_offset first)
        correct = {k: rows.argmax(1) - recipe.labels.label_offset == truth for k, rows in stacked.items()}
        weights = bootstrap_weights(len(images))
        reference = correct["ours, ONNX int8"]
        base = stacked["float32"]
        print(f"{recipe.name}: {len(images)} images of {dataset.name}, the recipe's preprocessing; calibration "
              f"{len(calibration)} images of {ours.calibration}; ONNX QDQ models run as their ops define them")
        print("| quantizer | kernels | top-1 | vs float32 | difference to ours, ONNX int8 (95 % paired interval) | "
              "agreement with float32 | logits SQNR | ORT fused kernels: agreement, SQNR | quantizer s | "
              "1-thread latency ms | ORT integer convs |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, (path, kernels, seconds) in models.items():
            hits = correct[label]
            low, high = difference_interval(weights @ hits / len(images), weights @ reference / len(images))
            agreement = np.mean(stacked[label].argmax(1) == base.argmax(1))
            sqnr = compare(base, stacked[label])["sqnr_db"] if label != "float32" else float("inf")
            timing = timed(path) if kernels != REFERENCE else {"median_ms": float("nan")}
            convs = timing.get("integer_convs")  # None: not ONNX
            on_this_cpu = "-"
            if label in fused:
                rows = stacked[f"{label} fused"]
                on_this_cpu = f"{np.mean(rows.argmax(1) == base.argmax(1)):.1%}, {compare(base, rows)['sqnr_db']:.1f} dB"
            print(f"| {label} | {kernels or 'ONNX Runtime'} | {hits.mean():.1%} | "
                  f"{hits.mean() / correct['float32'].mean():.1%} | "
                  f"{(hits.mean() - reference.mean()) * 100:+.1f} points ({low * 100:+.1f} to {high * 100:+.1f}) | "
                  f"{agreement:.1%} | {sqnr:.1f} dB | {on_this_cpu} | {f'{seconds:.0f}' if seconds else '-'} | "
                  f"{timing['median_ms']:.2f} | "
                  f"{f'{convs[0]} of {convs[1]}' if convs else '-'} |")


def detector(recipe, dist: Path, built: dict, dataset: Path, args) -> None:
    """The shipped int8 of a detector recipe against its float32 (see the module's docstring), judged by the
    build's own verify (stages/verify.py) on the dataset's images."""
    from types import SimpleNamespace

    from mzconvert.preprocess import list_images
    from mzconvert.runtime import OPTIMIZED, open_model, target_kernels
    from mzconvert.stages.verify import reference_outputs, verify_variant

    kernels = next(iter(target_kernels(recipe, recipe.variant("int8"))), OPTIMIZED)
    names = list(recipe.strip.outputs)
    anchors = dist / "anchors.npy" if (dist / "anchors.npy").is_file() else None
    images = list_images(dataset / "val2017")[:args.count]
    float32 = open_model(dist / built["float32"]["file"], names, threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        # reference_outputs reads the float model's outputs by the names the build's graph runner carries
        reference = reference_outputs(SimpleNamespace(run=float32.run, output_names=names), recipe, images,
                                      Path(tmp), anchors)
        metrics = verify_variant(dist / built["int8"]["file"], reference, names, recipe, anchors, 2, kernels)
    print(f"{recipe.name}: int8 ({kernels} kernels) against float32 on {len(images)} images of {dataset}")
    for name in names:
        worst = metrics[name].get("worst_slice")
        print(f"  output {name}: SQNR {metrics[name]['sqnr_db']:.1f} dB"
              + (f" (worst channel {worst['index']} of {worst['of']}: {worst['sqnr_db']:.1f} dB)" if worst else ""))
    print(f"  float32's detections matched: {metrics['matched_detections']:.1%} of {metrics['detections_compared']}")
    done = subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", "--json", "--mirror", args.mirror, "eval",
                           recipe.name, "--dataset", str(dataset), "--variant", "float32", "--variant", "int8"],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    results = json.loads(done.stdout)["results"]
    low, high = results["int8"]["ratio_interval"]
    print(f"  AP: float32 {results['float32']['AP']:.4f}, int8 {results['int8']['AP']:.4f} "
          f"({results['int8']['AP'] / results['float32']['AP']:.1%} of float32, paired 95 % interval "
          f"{low:.1%} - {high:.1%})")


if __name__ == "__main__":
    main()
