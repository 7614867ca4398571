"""Precision where the model needs it, searched: the fewest layers of an int8 variant kept float (float_layers),
taken in the order `mzconvert debug` ranks them, for the variant to agree with the float model within a budget
(`mzconvert debug --search MAX_DROP`, or a variant's `max_drop` in the build).

Each candidate is quantized as the build quantizes the variant (the same calibration, ranges and rounding, its
float_layers added) and verified as the build verifies it, on the verify images: top-1 agreement for classifiers,
detections matched for detectors, mask IoU for maps. The variant as declared first; then candidates double the
layers kept float (1, 2, 4, ...) up to MAX_LAYERS; the first within the budget is the answer, with what it costs:
size, operators left float (on the CPU beside an NPU). A variant's `max_drop` runs it in the build.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..backends import backend_for
from ..errors import EXIT_BAD_INPUT, MzError
from ..recipe import Recipe, Variant
from ..runtime import target_kernels
from .calibrate import calibrate, shares_calibration
from .quantize import quantize
from .verify import reference_outputs, verify_variant

MAX_LAYERS = 32


def paired_fidelity(metrics: dict, recipe: Recipe) -> float:
    """What the budget is on: the share of top-1 answers or detections the variant shares with the float model,
    or for maps the mask IoU with the float model's (the worst output's)."""
    if "matched_detections" in metrics:
        return metrics["matched_detections"]
    for key in ("top1_agreement", "mask_iou"):
        if found := [m[key] for m in metrics.values() if isinstance(m, dict) and key in m]:
            return min(found)
    raise MzError(f"{recipe.path}: task: the search keeps a share of top-1 answers (classification), of "
                  "detections (detection) decoded here, or the mask IoU of maps (dense); this recipe has none",
                  EXIT_BAD_INPUT)


def _worst_sqnr(metrics: dict) -> float:
    return min(m.get("worst_slice", m)["sqnr_db"] for m in metrics.values() if isinstance(m, dict))


def search_float_layers(stripped: Path, recipe: Recipe, variant: Variant,
                        ranked: list[str] | Callable[[Path], list[str]], calibration: list[Path], images: list[Path],
                        max_drop: float, log) -> dict:
    """Candidates with the first 0, 1, 2, 4... of `ranked` (layer names, worst first; or what ranks them, given
    the variant as declared, called only when that is not within the budget) kept float, each quantized and
    verified (under its target's kernels, as the build verifies); the first whose paired fidelity is at least
    1 - max_drop is chosen (the variant as declared, if it is within already; else the best)."""
    anchors = stripped.with_name("anchors.npy") if stripped.with_name("anchors.npy").is_file() else None
    target = 1 - max_drop
    steps, count = [], 0
    with tempfile.TemporaryDirectory(prefix="mzconvert-search-") as tmp:
        work = Path(tmp)
        reference = backend_for(recipe).GraphRunner(stripped, recipe)
        saved = reference_outputs(reference, recipe, images, work, anchors)
        calibrated = None
        if shares_calibration(recipe, variant):
            (work / "calibrate").mkdir()
            calibrated = calibrate(stripped, recipe, variant, calibration, work / "calibrate")
        while True:
            candidate = replace(variant, float_layers=tuple(ranked[:count]) if count else ())
            out = work / f"keep-{count}"
            out.mkdir()
            built = quantize(stripped, recipe, candidate, None if calibrated else calibration, out, anchors,
                             calibrated)
            metrics = verify_variant(built.model, saved, reference.output_names, recipe, anchors,
                                     kernels=next(iter(target_kernels(recipe, variant)), None))
            step = {"float_layers": list(candidate.float_layers), "fidelity": paired_fidelity(metrics, recipe),
                    "worst_sqnr_db": _worst_sqnr(metrics), "bytes": built.model.stat().st_size,
                    "float_ops": _float_ops(built.model)}
            steps.append(step)
            log(f"search: {count} layers float: fidelity {step['fidelity']:.1%}, worst SQNR "
                f"{step['worst_sqnr_db']:.1f} dB, {step['bytes']} bytes")
            if step["fidelity"] >= target:
                break
            if callable(ranked):
                ranked = ranked(built.model)
            count = 2 * count or 1
            if count > min(len(ranked), MAX_LAYERS):
                break
    chosen = next((s for s in steps if s["fidelity"] >= target), max(steps, key=lambda s: s["fidelity"]))
    return {"max_drop": max_drop, "target_fidelity": target, "images": len(images), "steps": steps,
            "chosen": chosen, "met": chosen["fidelity"] >= target}


def _float_ops(model: Path) -> int:
    """Operators of a .tflite whose outputs are float (what an NPU leaves to the CPU); 0 for ONNX QDQ, where
    every op is float between its quantize and dequantize by design."""
    if model.suffix != ".tflite":
        return 0
    from ..tflite_file import read_model, schema

    flatbuffer = read_model(model)
    graph = flatbuffer.subgraphs[0]
    return sum(1 for op in graph.operators
               if any(graph.tensors[i].type == schema().TensorType.FLOAT32 for i in op.outputs))


def search_table(result: dict) -> str:
    lines = [f"{'layers float':>12}  {'fidelity':>8}  {'worst SQNR':>10}  {'bytes':>9}  float ops"]
    for step in result["steps"]:
        lines.append(f"{len(step['float_layers']):>12}  {step['fidelity']:>8.1%}  {step['worst_sqnr_db']:>7.1f} dB  "
                     f"{step['bytes']:>9}  {step['float_ops']}")
    chosen = result["chosen"]
    verdict = "within" if result["met"] else "not within (the best found)"
    lines.append(f"{verdict} the budget (fidelity >= {result['target_fidelity']:.1%} on {result['images']} verify "
                 f"images): float_layers: [{', '.join(chosen['float_layers'])}]")
    return "\n".join(lines)
