"""Precision where the model needs it, searched, each candidate quantized as the build quantizes the variant and
verified as the build verifies it, on the images given: top-1 agreement for classifiers, detections matched
for detectors (and their masks' IoU, keypoints' OKS), mask IoU for maps. The build gives images of the
calibration set that are not the verify images (build._choosing_images): the verify figure it then reports of
the chosen candidate is not the best of several on the same images (on a YOLOv8n trained here, the range method
chosen on the verify images matched 93.1 % of float's detections there and 88.6 % on other images,
docs/results.md). `mzconvert debug --search` searches on the verify images it explains.

- The ranges (`calibration_method: auto`): each of AUTO_CALIBRATION_METHODS recorded on the variant's
  calibration images, among those within the variant's floors when any is: a method that agrees a few
  detections more on a few dozen and loses a class's scores would be refused by the build where the next would
  ship (a YOLOv8n trained briefly here: mean min/max 85.9 % matched at 7.2 dB, min/max 79.2 % at 15.7 dB against
  a 10 dB floor). The first of them (min/max, the converters' own) is kept unless another agrees with the float
  model better on significantly more images than worse (best_ranges): a few dozen images do not tell methods
  apart that differ by a few points (a YOLOv8n trained here: percentile matched 93.4 % where min/max matched
  86.3 %, then 88.3 % against 88.6 % on 73 other images, its worst class's scores 2-8 dB below min/max's). No one
  method is best for every model: MediaPipe's selfie segmenter keeps its mask only with percentile ranges
  (docs/results.md).
- The layers kept float (float_layers): the fewest, taken in the order `mzconvert debug` ranks them, for the
  variant to agree with the float model within a budget (`mzconvert debug --search MAX_DROP`, or a variant's
  `max_drop` in the build). The variant as declared first; then candidates double the layers kept float (1, 2,
  4, ...) up to MAX_LAYERS; the first within the budget is the answer, with what it costs: size, operators left
  float (on the CPU beside an NPU).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..backends import backend_for
from ..errors import EXIT_BAD_INPUT, MzError
from ..evaluate.cocometrics import sign_test
from ..recipe import Recipe, Variant
from ..recipe.schema import AUTO_CALIBRATION_METHODS
from ..runtime import target_kernels
from .calibrate import calibrate, shares_calibration
from .quantize import quantize
from .verify import floor_failures, reference_outputs, verify_variant

MAX_LAYERS = 32
# the one-sided sign-test p below which a range method's wins over the first method tried are not chance
SIGNIFICANT = 0.025


# a detector's agreement with the float model: its detections matched, and where its head has them the masks'
# IoU and the keypoints' OKS of those matched (boxes that all match can carry keypoints that are lost)
DETECTION_AGREEMENT = ("matched_detections", "matched_mask_iou", "matched_keypoint_oks")


def paired_fidelity(metrics: dict, recipe: Recipe) -> float:
    """What the budget is on: the share of top-1 answers the variant shares with the float model; for detectors
    the least of DETECTION_AGREEMENT; for maps the mask IoU with the float model's (the worst output's)."""
    if "matched_detections" in metrics:
        return min(metrics[key] for key in DETECTION_AGREEMENT if key in metrics)
    for key in ("top1_agreement", "mask_iou"):
        if found := [m[key] for m in metrics.values() if isinstance(m, dict) and key in m]:
            return min(found)
    raise MzError(f"{recipe.path}: task: the search keeps a share of top-1 answers (classification), of "
                  "detections (detection) decoded here, or the mask IoU of maps (dense); this recipe has none",
                  EXIT_BAD_INPUT)


def _worst_sqnr(metrics: dict) -> float:
    return min(m.get("worst_slice", m)["sqnr_db"] for m in metrics.values() if isinstance(m, dict))


Reference = tuple[Path, list[str]]  # the float model's outputs on the images searched (reference_outputs), names


class _Trial:
    """Candidates of one variant quantized and verified in a scratch folder, against the float model's outputs
    on the images searched (the build's `reference` of them, or computed once here); candidates with the same
    ranges share one calibration."""

    def __init__(self, stripped: Path, recipe: Recipe, calibration: list[Path], images: list[Path], work: Path,
                 reference: Reference | None):
        self.stripped, self.recipe, self.calibration, self.work = stripped, recipe, calibration, work
        self.anchors = stripped.with_name("anchors.npy") if stripped.with_name("anchors.npy").is_file() else None
        if reference is None:
            runner = backend_for(recipe).GraphRunner(stripped, recipe)
            reference = reference_outputs(runner, recipe, images, work, self.anchors), list(runner.output_names)
        self.saved, self.output_names = reference
        self.calibrated: dict[tuple, Path] = {}

    def __call__(self, candidate: Variant, name: str) -> tuple[dict, Path]:
        """(what the candidate measured: fidelity (and image by image), worst SQNR, whether the build would ship
        it (within the variant's floors), bytes, float ops; the model verified). Candidates are compared untuned
        (tune_steps): tuning each would multiply a search's time, and the one chosen is tuned when it is built."""
        candidate = replace(candidate, tune_steps=0)
        calibrated = None
        if shares_calibration(self.recipe, candidate):
            key = (candidate.calibration_method, candidate.calibration_percentile)
            if key not in self.calibrated:
                folder = self.work / f"calibrate-{len(self.calibrated)}"
                folder.mkdir()
                self.calibrated[key] = calibrate(self.stripped, self.recipe, candidate, self.calibration, folder)
            calibrated = self.calibrated[key]
        out = self.work / name
        out.mkdir()
        built = quantize(self.stripped, self.recipe, candidate, None if calibrated else self.calibration, out,
                         self.anchors, calibrated)
        verified = built.raw_model or built.model  # raw: before NMS is attached, as the build verifies
        metrics = verify_variant(verified, self.saved, self.output_names, self.recipe, self.anchors,
                                 kernels=next(iter(target_kernels(self.recipe, candidate)), None), per_image=True)
        return {"fidelity": paired_fidelity(metrics, self.recipe), "per_image": metrics["per_image"],
                "worst_sqnr_db": _worst_sqnr(metrics),
                "within_floors": not floor_failures(self.recipe, candidate, metrics),
                "bytes": built.model.stat().st_size, "float_ops": _float_ops(built.model)}, verified


def search_calibration_method(stripped: Path, recipe: Recipe, variant: Variant, calibration: list[Path],
                              images: list[Path], log, reference: Reference | None = None) -> dict:
    """Each of AUTO_CALIBRATION_METHODS tried for the variant; best_ranges of them chosen."""
    steps = []
    with tempfile.TemporaryDirectory(prefix="mzconvert-ranges-") as tmp:
        trial = _Trial(stripped, recipe, calibration, images, Path(tmp), reference)
        for method in AUTO_CALIBRATION_METHODS:
            step, _ = trial(replace(variant, calibration_method=method), method)
            steps.append({"calibration_method": method, **step})
            log(f"ranges {method}: fidelity {step['fidelity']:.1%}, worst SQNR {step['worst_sqnr_db']:.1f} dB"
                + ("" if step["within_floors"] else ", below the variant's floors"))
    chosen = best_ranges(steps)
    for step in steps:  # the choice made; the stage records what each method measured and how it compared
        del step["per_image"]
    return {"images": len(images), "steps": steps, "chosen": chosen}


def best_ranges(steps: list[dict]) -> dict:
    """Of the range methods tried (each with `per_image`, its paired fidelity image by image), among those within
    the variant's floors when any is: the first, unless others agree with the float model better on significantly
    more images than worse (sign_test below SIGNIFICANT), then the one of highest fidelity (then worst output
    SQNR) of those. Each of the others gets {against_first: [images better, images worse, p]}."""
    first, *others = [s for s in steps if s["within_floors"]] or steps
    for step in others:
        step["against_first"] = list(sign_test(step["per_image"], first["per_image"]))
    better = [s for s in others if s["against_first"][2] < SIGNIFICANT]
    return max(better, key=lambda s: (s["fidelity"], s["worst_sqnr_db"])) if better else first


def search_float_layers(stripped: Path, recipe: Recipe, variant: Variant,
                        ranked: list[str] | Callable[[Path], list[str]], calibration: list[Path], images: list[Path],
                        max_drop: float, log, reference: Reference | None = None) -> dict:
    """Candidates with the first 0, 1, 2, 4... of `ranked` (layer names, worst first; or what ranks them, given
    the variant as declared, called only when that is not within the budget) kept float, each quantized and
    verified (under its target's kernels, as the build verifies); the first whose paired fidelity is at least
    1 - max_drop is chosen (the variant as declared, if it is within already; else the best)."""
    target = 1 - max_drop
    steps, count = [], 0
    with tempfile.TemporaryDirectory(prefix="mzconvert-search-") as tmp:
        trial = _Trial(stripped, recipe, calibration, images, Path(tmp), reference)
        while True:
            candidate = replace(variant, float_layers=tuple(ranked[:count]) if count else ())
            step, model = trial(candidate, f"keep-{count}")
            step = {"float_layers": list(candidate.float_layers), **step}
            del step["per_image"]  # the budget is on the share over all images
            steps.append(step)
            log(f"search: {count} layers float: fidelity {step['fidelity']:.1%}, worst SQNR "
                f"{step['worst_sqnr_db']:.1f} dB, {step['bytes']} bytes")
            if step["fidelity"] >= target:
                break
            if callable(ranked):
                ranked = ranked(model)
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
