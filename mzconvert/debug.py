"""Per-layer quantization error of a TFLite int8 variant, worst layers first (`mzconvert debug`).

TensorFlow's QuantizationDebugger quantizes the float model as the variant was (the same ranges,
recorded on the same calibration images, see ranges.py), then runs every quantized op next to its float twin on the verify images.
A layer's error is reported in quantization steps: RMSE / scale is about 0.29 for pure rounding
noise (1 / sqrt(12)); layers far above it lose information (clipped ranges, outlier weights) and are
where a user should look first, e.g. to keep them float.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from .backends import backend_for
from .errors import MzError
from .preprocess import prepare
from .recipe import Recipe, Variant

ROUNDING_NOISE = 1 / math.sqrt(12)  # RMSE / scale of uniform rounding


def layer_errors(stripped: Path, recipe: Recipe, variant: Variant, calibration: list[Path],
                 images: list[Path]) -> list[dict]:
    """One row per quantized layer output: name, op, RMSE in quantization steps, max abs error, worst first."""
    if variant.mode != "int8" or variant.target != "tflite":
        raise MzError(f"{recipe.path}: variants: {variant.name}: debug explains TFLite int8 variants, "
                      f"not {variant.mode} ({variant.target})")
    import tempfile

    from .backends.tf import _tf, int8_converter
    from .quantize import calibrate

    tf = _tf()
    debug_tensors = [prepare(p, recipe.preprocess, recipe.input).tensor for p in images]
    with tempfile.TemporaryDirectory() as work:
        calibrated = calibrate(stripped, recipe, variant, calibration, Path(work)).read_bytes()  # the variant's ranges
    converter, to_input = backend_for(recipe).tflite_converter(stripped, recipe)
    int8_converter(converter, lambda: [to_input(debug_tensors[0])])  # a quick calibration, replaced below
    try:
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([to_input(t)] for t in debug_tensors))
        debugger.calibrated_model = calibrated
        debugger.options = debugger.options  # re-quantizes from calibrated_model
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
    except Exception as exc:  # the debugger raises whatever its converter and interpreter raise
        raise MzError(f"{stripped}: the quantization debugger failed: {str(exc).strip().splitlines()[0]}") from None
    rows = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"]) if row.get("scale") else 0.0
        mse = float(row["mean_squared_error"])
        if scale <= 0 or not math.isfinite(mse):
            continue
        rows.append({"layer": row["tensor_name"], "op": row["op_name"], "rmse_steps": math.sqrt(mse) / scale,
                     "max_abs_error": float(row["max_abs_error"]), "scale": scale,
                     "stddev": float(row["stddev"]) if row.get("stddev") else None})
    if not rows:
        raise MzError(f"{stripped}: the quantization debugger reported no quantized layer")
    return sorted(rows, key=lambda r: -r["rmse_steps"])


def debug_table(result: dict, rows: int = 15) -> str:
    lines = [f"{result['recipe']} {result['variant']}: per-layer error on {result['images']} verify images, in "
             f"quantization steps (rounding alone: {ROUNDING_NOISE:.2f}); worst first",
             f"{'layer':60} {'op':20} {'RMSE steps':>10} {'max abs err':>12}"]
    for r in result["layers"][:rows]:
        lines.append(f"{_tail(r['layer'], 60):60} {r['op'][:20]:20} {r['rmse_steps']:10.2f} {r['max_abs_error']:12.4g}")
    return "\n".join(lines)


def plot_layers(result: dict, target: Path, rows: int = 20) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = result["layers"][:rows]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.32 * len(worst)), dpi=100)
    ax.barh([_tail(r["layer"], 48) for r in worst], [r["rmse_steps"] for r in worst], color="#aa3377")
    ax.axvline(ROUNDING_NOISE, color="black", linestyle="--", linewidth=1, label="rounding noise alone")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("RMSE against the float layer, in quantization steps")
    ax.set_title(f"{result['recipe']} {result['variant']}: worst {len(worst)} layers", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(target, metadata={"Software": None})
    plt.close(fig)
    return target


def _tail(name: str, width: int) -> str:
    """The end of a long layer name, which is the part that tells layers apart."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def summary(layers: list[dict]) -> dict:
    steps = np.array([r["rmse_steps"] for r in layers])
    return {"layers": len(layers), "median_rmse_steps": float(np.median(steps)),
            "above_1_step": int(np.sum(steps > 1.0))}
