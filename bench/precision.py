"""Issue 25: precision where the model needs it, measured in one run: for each real model its NPU int8 variant,
the same at int16x8 (16-bit activations), and the same with `max_drop` (the build keeps float the fewest of
`mzconvert debug`'s worst layers for it to agree with the float model on at least 1 - max_drop of the images it
chooses by: as many as verify judges by, from the calibration set, build._choosing_images), side by side.

Per variant: paired fidelity to the float model on the verify images (top-1 agreement or detections matched,
as verify judges it; for classifiers also the top-1 agreement on the evaluated images, after the slash), accuracy on the evaluation set with its ratio to float32 and the paired bootstrap 95 %
interval (under the kernels the variant's target computes with: LiteRT's reference kernels for the NPU's
variants), size, 1-thread CPU latency (LiteRT's optimized kernels), and per Ethos-U target the estimated
inference time and the operators left to the CPU. Pedestrian AP is on the 132 COCO val2017 images; MobileNetV2
top-1 on the 500 ImageNet samples, calibrated on imagenet-calib (disjoint).

Usage: .venv/bin/python bench/precision.py [--mirror DIR] [--only detector|classifier] [--max-drop 0.005]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import yaml
from calibration_methods import cli

ROOT = Path(__file__).resolve().parent.parent
# (recipe, dataset below the mirror, its NPU int8 variant)
MODELS = {"detector": ("pedestrian-ssdlite", "coco", "int8"),
          "classifier": ("mobilenetv2-torchvision", "imagenet-samples", "int8-tflite")}


def paired_fidelity(verify: dict, row: dict) -> str:
    """What verify judges, on the verify images; for classifiers also the agreement on the evaluated ones."""
    if "matched_detections" in verify:
        return f"{verify['matched_detections']:.1%} matched"
    agreement = [m["top1_agreement"] for m in verify.values() if isinstance(m, dict) and "top1_agreement" in m]
    text = f"{min(agreement):.1%}" if agreement else "-"
    return text + (f" / {row['top1_agreement']:.1%}" if "top1_agreement" in row else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--only", choices=sorted(MODELS))
    parser.add_argument("--max-drop", type=float, default=0.005)
    args = parser.parse_args()
    mirror = ["--mirror", args.mirror]
    work = Path(tempfile.mkdtemp(prefix="mzconvert-precision-"))
    try:
        for kind, (name, dataset, int8_name) in MODELS.items():
            if args.only and kind != args.only:
                continue
            recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
            int8 = next(v for v in recipe["variants"] if v["name"] == int8_name)
            recipe["variants"] = [v for v in recipe["variants"] if v["name"] in ("float32", int8_name)]
            recipe.pop("source_pipeline", None)
            vela = recipe["targets"]["vela"]
            for target in vela if isinstance(vela, list) else [vela]:  # reported here, not judged
                target.pop("max_cpu_ops", None)
                target.pop("max_inference_ms", None)
            path = work / f"{name}.yaml"
            recipe["variants"] += [
                {**{k: v for k, v in int8.items() if k != "weight_rounding"},  # int8 weights fitted: int8 only
                 "name": "int16x8", "mode": "int16x8", "io_dtype": "int16"},
                {**int8, "name": "int8-searched", "max_drop": args.max_drop}]  # the build searches its layers
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            where = ["--out", str(work / "dist"), "--build-dir", str(work / "build")]
            manifest = cli(*mirror, "build", str(path), *where)[name]["variants"]
            evaluation = cli(*mirror, "eval", str(path), "--dataset", str(Path(args.mirror) / dataset), *where)
            bench = cli(*mirror, "bench", str(path), "--runs", "30", *where)["results"]
            search = manifest["int8-searched"]["search"]
            chosen = search["chosen"]["float_layers"]
            metric, results = evaluation["metric"], evaluation["results"]
            met = "within" if search["met"] else "NOT within (the best found)"
            print(f"\n{name}: {metric} on {evaluation['images']} images of {dataset}; search for a drop of at most "
                  f"{args.max_drop:.1%} on {search['images']} images of the calibration set: {len(chosen)} layers kept float, "
                  f"{met}")
            print(f"{'variant':14} {'kernels':9} {'fidelity':>18} {metric:>7} {'of float32':>10} {'95 % interval':>15} "
                  f"{'bytes':>9} {'CPU ms':>7}  NPU (ms, CPU ops)")
            for variant in ("float32", int8_name, "int16x8", "int8-searched"):
                row, built = results[variant], manifest[variant]
                low, high = row["ratio_interval"]
                base = results[evaluation["baseline"]][metric]
                npu = ", ".join(f"{t}: {v['inference_time_ms']:.1f} ms, {v['cpu_op_count']} CPU ops"
                                for t, v in built.get("vela", {}).items()) or "-"
                size = (work / "dist" / name / built["file"]).stat().st_size
                print(f"{variant:14} {row.get('kernels', '-'):9} {paired_fidelity(built.get('verify', {}), row):>18} "
                      f"{row[metric]:7.4f} {row[metric] / base:10.1%} {low:7.1%} - {high:5.1%} {size:9d} "
                      f"{bench[variant]['median_ms']:7.2f}  {npu}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
