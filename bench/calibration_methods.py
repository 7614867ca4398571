"""Issue 12: what calibration does to int8 accuracy, measured on the shared sets in one run.

For each real model, int8 variants that differ only in how their activation ranges are calibrated
(method: minmax, percentile, mse or mean_minmax; image count), and for TFLite one with its depthwise weights rounded
to the nearest step instead of fitted (weight_rounding), are built next to float32 and evaluated on
the same images. Printed per variant: the accuracy, its ratio to float32 with the paired bootstrap 95 %
interval, and the paired fidelity to the float model (classifiers: top-1 agreement on the evaluated
images; the detector: detections matched and SQNR of the class logits, on the 32 verify images).
Pedestrian AP is on the 132 COCO val2017 images; MobileNetV2 top-1 on the 500 ImageNet samples,
calibrated on imagenet-calib (disjoint).

Usage: .venv/bin/python bench/calibration_methods.py [--mirror DIR] [--only detector|classifier|classifier-onnx]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
# (recipe, dataset below the mirror, calibration folder below the mirror, extra variant fields, counts)
MODELS = {
    # int8 I/O only: a float-I/O twin of the same calibration answers the same (tests/test_tf_backend.py)
    "detector": ("pedestrian-ssdlite", "coco", "coco/train2017", {}, (100, 200), ("int8",)),
    "classifier": ("mobilenetv2-torchvision", "imagenet-samples", "imagenet-calib", {"target": "tflite"}, (100, 300),
                   ("int8",)),
    # ONNX Runtime's QDQ int8 of the same module (8-bit weights: reduce_range's 7-bit ones lost accuracy here)
    "classifier-onnx": ("mobilenetv2-torchvision", "imagenet-samples", "imagenet-calib",
                        {"target": "onnx"}, (100, 300), ("float32",)),
}
METHODS = (("minmax", None), ("percentile", 99.999), ("percentile", 99.99), ("mse", None), ("mean_minmax", None))


def variants(calibration: Path, extra: dict, counts: tuple[int, ...], io_dtypes: tuple[str, ...]) -> list[dict]:
    out = [{"name": "float32", "mode": "float32"}]
    for io in io_dtypes:
        for method, percentile in METHODS:
            for count in (counts if method == "minmax" else counts[-1:]):
                name = f"int8{'-float-io' if io == 'float32' else ''}-{method}{percentile or ''}-{count}"
                out.append({"name": name.replace(".", "_"), "mode": "int8", "io_dtype": io,
                            "calibration": str(calibration), "calibration_count": count,
                            "calibration_method": method, **extra,
                            **({"calibration_percentile": percentile} if percentile else {})})
        if extra.get("target") != "onnx":  # TFLite: the first of these with nearest weight rounding too
            first = next(v for v in out if v["mode"] == "int8" and v["io_dtype"] == io)
            out.append(first | {"name": first["name"] + "-nearest", "weight_rounding": "nearest"})
    return out


def fidelity(verify: dict, row: dict) -> str:
    """Paired with the float model: top-1 agreement on the evaluated images, or on the verify images the
    matched detections and the SQNR of each output (box encodings, class logits)."""
    if "top1_agreement" in row:
        return f"{row['top1_agreement']:.1%} top-1 agree"
    sqnr = "".join(f", {name} {m['sqnr_db']:.1f} dB" for name, m in verify.items() if isinstance(m, dict))
    return f"{verify.get('matched_detections', 0):.1%} matched{sqnr}"


def cli(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "mzconvert.cli", "--json", *args], capture_output=True,
                            text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"failed: mzconvert {' '.join(args)}\n{result.stderr[-2000:]}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--only", choices=sorted(MODELS))
    args = parser.parse_args()
    mirror = Path(args.mirror)
    work = Path(tempfile.mkdtemp(prefix="mzconvert-calibration-"))
    try:
        for kind, (name, dataset, calibration, extra, counts, io_dtypes) in MODELS.items():
            if args.only and kind != args.only:
                continue
            recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
            recipe["variants"] = variants(mirror / calibration, extra, counts, io_dtypes)
            recipe.pop("targets", None)
            recipe.pop("source_pipeline", None)
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            where = ["--out", str(work / "dist"), "--build-dir", str(work / "build")]
            manifest = cli("--mirror", str(mirror), "build", str(path), *where)[name]
            evaluation = cli("--mirror", str(mirror), "eval", str(path), "--dataset", str(mirror / dataset), *where)
            metric = evaluation["metric"]
            print(f"\n{name}: {metric} on {evaluation['images']} images of {dataset}; int8 calibrated on "
                  f"{calibration}")
            print(f"{'variant':34} {metric:>7} {'of float32':>10} {'95 % interval':>15}  fidelity to float32")
            for variant, row in evaluation["results"].items():
                if variant not in manifest["variants"]:
                    continue
                low, high = row["ratio_interval"]
                base = evaluation["results"][evaluation["baseline"]][metric]
                print(f"{variant:34} {row[metric]:7.4f} {row[metric] / base:10.1%} {low:7.1%} - {high:5.1%}  "
                      f"{fidelity(manifest['variants'][variant].get('verify', {}), row)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
