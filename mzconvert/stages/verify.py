"""Fidelity of a variant against the float model on the verify images, judged by what each output means.

Every output: cosine, SQNR and max abs error, whole and by its worst slice (tasks/signal.py). Then by task:
classifiers the top-1 agreement, detectors the share of detections matched (same label, IoU >= 0.9), dense
maps the mask IoU and per-pixel error. A variant below a floor (DEFAULT_FLOORS, or the recipe's own) fails
the build: a fidelity figure that a broken model passes is worse than none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..backends import backend_for
from ..errors import MzError
from ..evaluate.cocometrics import share_interval
from ..preprocess import load_image, prepare
from ..recipe import Recipe, Variant, command_argument
from ..recipe.schema import DEFAULT_FLOORS
from ..runtime import OPTIMIZED, open_model
from ..tasks.dense import mask_iou, pixel_error
from ..tasks.detection import (
    RAW_DECODERS,
    Detections,
    judged_outputs,
    load_anchors,
    matched_detections,
    matched_pairs,
    raw_detections,
)
from ..tasks.keypoints import keypoint_similarity
from ..tasks.masks import mask_overlap
from ..tasks.signal import compare, slice_name, worst_slice


def reference_outputs(reference, recipe: Recipe, images: list[Path], out_dir: Path,
                      anchors: Path | None = None) -> Path:
    """One pass of the float model over the verify images: every input tensor and output, for all
    variants' verify to compare against (reference.npz; arrays only, loaded without pickle). A detector whose
    raw outputs are decoded here (an SSD with its `anchors`, a YOLO head) also gets its decoded detections
    (boxes_i, scores_i, labels_i; an oriented-box head's rotated_i), or why they cannot be decoded
    (detections_error): decoded once, for every variant's verify and the source-pipeline check."""
    arrays = {}
    for i, path in enumerate(images):
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        arrays[f"input_{i}"] = tensor
        for j, output in enumerate(reference.run(tensor)):
            arrays[f"output_{i}_{j}"] = output
    if decodes_detections(recipe, anchors):
        arrays |= _float_detections(arrays, reference.output_names, recipe, anchors, len(images))
    target = out_dir / "reference.npz"
    np.savez(target, **arrays)
    return target


def decodes_detections(recipe: Recipe, anchors: Path | None) -> bool:
    """The recipe's raw detector outputs are decoded here (an SSD needs its anchors)."""
    post = recipe.postprocess
    return post is not None and post.kind in RAW_DECODERS and (post.kind != "ssd" or anchors is not None)


def _decoded(outputs: list[np.ndarray], output_names: list[str], recipe: Recipe, anchors) -> Detections:
    return raw_detections(outputs, output_names, recipe.postprocess, anchors, recipe.input.height_width)


def _float_detections(arrays: dict, output_names: list[str], recipe: Recipe, anchors: Path | None,
                      count: int) -> dict:
    boxes = load_anchors(anchors) if anchors is not None else None
    decoded = {}
    try:
        for i in range(count):
            found = _decoded([arrays[f"output_{i}_{j}"] for j in range(len(output_names))], output_names, recipe,
                             boxes)
            decoded |= {f"boxes_{i}": found.boxes, f"scores_{i}": found.scores, f"labels_{i}": found.labels}
            if found.rotated is not None:  # an oriented-box head's: what its detections are matched by
                decoded[f"rotated_{i}"] = found.rotated
    except MzError as exc:  # e.g. labels that do not fit the model: eval refuses it; the build says so
        return {"detections_error": np.array(str(exc))}
    return decoded


def saved_detections(saved, i: int):
    """The float model's detections on verify image i, from reference.npz (reference_outputs); an error
    saying why when they could not be decoded."""
    if "detections_error" in saved.files:
        raise MzError(str(saved["detections_error"]))
    return Detections(saved[f"boxes_{i}"], saved[f"scores_{i}"], saved[f"labels_{i}"],
                      rotated=saved[f"rotated_{i}"] if f"rotated_{i}" in saved.files else None)


def verify_variant(model: Path, reference: Path, output_names: list[str], recipe: Recipe,
                   anchors: Path | None = None, threads: int = 1, kernels: str | None = None,
                   per_image: bool = False) -> dict:
    """Run `model` on the inputs of `reference` (reference_outputs), a .tflite with LiteRT's `kernels` (its
    target's); metrics per output over all images, and what a user sees: top-1 agreement (classifiers), the
    share of detections matched (detectors whose outputs are decoded here). With `per_image`, also
    {per_image: that agreement image by image} (a map's: its worst output's mask IoU), what searches compare
    candidates by, pair by pair (stages/fallback.best_ranges)."""
    runner = open_model(model, output_names, threads, kernels=kernels or OPTIMIZED)
    with np.load(reference, allow_pickle=False) as saved:
        count = sum(1 for key in saved.files if key.startswith("input_"))
        ref_outputs = [[saved[f"output_{i}_{j}"] for i in range(count)] for j in range(len(output_names))]
        got_outputs: list[list[np.ndarray]] = [[] for _ in output_names]
        for i in range(count):
            for j, got in enumerate(runner.run(saved[f"input_{i}"])):
                got_outputs[j].append(got.reshape(ref_outputs[j][i].shape))
        metrics, agreements = {}, []  # the paired measure image by image (a map's per output, the worst kept)
        stacked = {name: (np.stack(ref_outputs[j]), np.stack(got_outputs[j])) for j, name in enumerate(output_names)}
        for name, (ref, got) in stacked.items():  # each output as what it means (tasks/detection.judged_outputs)
            ref, got, axis = judged_outputs(name, ref, got, recipe.postprocess, recipe.input.height_width, stacked)
            metrics[name] = _output_metrics(ref, got, recipe, axis)
            if per_image and recipe.task == "dense":  # each image's masks again: only where a search asks
                agreements.append([mask_iou(r[None], g[None], recipe.dense.threshold) for r, g in zip(ref, got)])
        if decodes_detections(recipe, anchors):  # do the variant's detections match the float model's?
            found, counts = _matched_detections(saved, got_outputs, output_names, recipe, anchors)
            metrics |= found
            if counts is not None:
                agreements = [np.divide(counts[:, 0], counts[:, 1], out=np.ones(count), where=counts[:, 1] > 0)]
    if recipe.task == "classification":  # does the variant pick the same class as the float model?
        ref, got = (np.stack(o[0]).reshape(count, -1) for o in (ref_outputs, got_outputs))
        agreements = [ref.argmax(1) == got.argmax(1)]
        metrics[output_names[0]]["top1_agreement"] = float(np.mean(agreements[0]))
    if per_image and agreements:
        metrics["per_image"] = np.min(agreements, axis=0).astype(float).tolist()
    return metrics | {"images": count, **({"kernels": kernels} if kernels else {})}


def _output_metrics(reference: np.ndarray, candidate: np.ndarray, recipe: Recipe, axis: int | None = None) -> dict:
    """One output over all images (images x output shape): the signal measures, whole and by the worst slice
    (along `axis` of one image's output, where the decode knows what each slice means);
    for dense maps the mask IoU and per-pixel error; whether the float model answers the same whatever the
    image (then no figure says anything)."""
    metrics = compare(reference, candidate)
    if (worst := worst_slice(reference, candidate, axis)) is not None:
        metrics["worst_slice"] = worst
    if recipe.task == "dense":
        metrics |= {"mask_iou": mask_iou(reference, candidate, recipe.dense.threshold),
                    "pixel_error": pixel_error(reference, candidate)}
    metrics["constant_reference"] = bool(np.allclose(reference, reference[:1], rtol=1e-5, atol=1e-7))
    return metrics


def _matched_detections(saved, got_outputs: list[list[np.ndarray]], output_names: list[str], recipe: Recipe,
                        anchors: Path | None) -> tuple[dict, np.ndarray | None]:
    """({matched_detections: share} of the variant's detections against the float model's saved ones, or
    {detections_not_compared: why} when the float model's outputs could not be decoded; the counts, images x
    (matched, compared))."""
    try:
        floats = [saved_detections(saved, i) for i in range(len(got_outputs[0]))]
    except MzError as exc:  # e.g. labels that do not fit the model: eval refuses it; the build says so
        return {"detections_not_compared": str(exc)}, None
    boxes = load_anchors(anchors) if anchors is not None else None
    candidates = [_decoded([got[i] for got in got_outputs], output_names, recipe, boxes) for i in range(len(floats))]
    counts = np.array(list(map(matched_detections, floats, candidates)), np.float64).reshape(-1, 2)
    matched, total = counts.sum(0)
    found = {"matched_detections": float(matched / total) if total else 1.0, "detections_compared": int(total),
             **({"matched_interval": share_interval(counts)} if total else {})}
    post = recipe.postprocess
    if post.mask_coefficients or post.keypoints:  # and the masks, keypoints of those matched
        references = [_decoded([saved[f"output_{i}_{j}"] for j in range(len(output_names))], output_names, recipe,
                               boxes) for i in range(len(floats))]  # the saved detections have neither
        found |= matched_parts(references, candidates, recipe.input.height_width)
    return found, counts


def matched_parts(references: list[Detections], candidates: list[Detections], input_hw: tuple[int, int]) -> dict:
    """A segmentation head's masks, a pose head's keypoints, of the detections matched with the float model's:
    the masks' IoU (their pixels summed over every pair), the keypoints' mean OKS (over pairs with a point shown)."""
    intersection = union = 0
    similarities = []
    for reference, candidate in zip(references, candidates):
        for k, j in matched_pairs(reference, candidate):
            if reference.masks is not None:
                common, either = mask_overlap(reference.masks, k, candidate.masks, j)
                intersection, union = intersection + common, union + either
            if reference.keypoints is not None:
                similarity = keypoint_similarity(reference.keypoints[k], candidate.keypoints[j],
                                                 reference.boxes[k], input_hw)
                similarities += [] if similarity is None else [similarity]
    found = {}
    if references and references[0].masks is not None:
        found["matched_mask_iou"] = intersection / union if union else 1.0
    if references and references[0].keypoints is not None:
        found |= {"matched_keypoint_oks": float(np.mean(similarities)) if similarities else 1.0,
                  "keypoints_compared": len(similarities)}
    return found


def matched_share_text(metrics: dict) -> str:
    """A variant's share of the float model's detections matched, with its 95 % interval over image resamples
    where it has one (verify images with detections)."""
    low, high = metrics.get("matched_interval") or (None, None)
    return f"{metrics['matched_detections']:.1%}" + (
        "" if low is None else f" (95 % interval {low:.1%}-{high:.1%} over image resamples)")


def matched_parts_text(metrics: dict, frame: str) -> str:
    """What a segmentation or pose head's matched detections say besides being matched (their masks' IoU, their
    keypoints' OKS), put in `frame` (a format string); "" for other heads."""
    parts = [f"masks' IoU {metrics['matched_mask_iou']:.3f}"] if "matched_mask_iou" in metrics else []
    if "matched_keypoint_oks" in metrics:
        parts.append(f"keypoints' OKS {metrics['matched_keypoint_oks']:.3f} over {metrics['keypoints_compared']} "
                     "detections")
    return frame.format(", ".join(parts)) if parts else ""


def share_upper_bound(share: float, count: int, z: float = 1.96) -> float:
    """The upper end of the 95 % (Wilson) interval of a share measured on `count` trials: a share floor fails
    only where the verify images show the share is below it, not where a few images happened to differ (on 3
    images one disagreement is 33 points; a variant agreeing on 96 % falls below 90 % on 4 % of 32-image
    samples)."""
    if count <= 0:
        return 1.0
    centre = (share + z * z / (2 * count)) / (1 + z * z / count)
    spread = z * ((share * (1 - share) / count + z * z / (4 * count * count)) ** 0.5) / (1 + z * z / count)
    return min(1.0, centre + spread)


def below_floors(metrics: dict, floors: dict, mode: str) -> list[tuple[str, str, float]]:
    """(floor field, what is below it, its value shown) for each figure of `metrics` (verify_variant's, of a
    variant in `mode`) below `floors` ({min_* field: floor}): each output's worst slice (or whole output) SQNR,
    a float32 variant's cosine, and what its task judges; a share (agreement, detections matched) when even its
    interval's upper end is below (Wilson's over the detections: image resamples, which verify prints, reach 100 %
    where a few images hold the detections, and would pass a variant that loses them all on one image)."""
    found = []

    def below(field: str, value: float, what: str, shown: str, count: int | None = None) -> None:
        bound = value if count is None else share_upper_bound(value, count)
        if bound < floors[field]:
            found.append((field, what, shown if count is None else f"{shown} (95 % interval up to {bound:.1%}, "
                                                                    f"{count} compared)"))

    for name, m in metrics.items():
        if not isinstance(m, dict):
            continue
        worst = m.get("worst_slice")
        sqnr, part = (worst["sqnr_db"], slice_name(name, worst)) if worst else (m["sqnr_db"], f"output {name}")
        below("min_slice_sqnr_db", sqnr, f"SQNR of {part}", f"{sqnr:.1f} dB")
        if mode == "float32":
            below("min_float_cosine", m["cosine"], f"cosine of output {name}", f"{m['cosine']:.6f}")
        if "top1_agreement" in m:
            below("min_agreement", m["top1_agreement"], f"top-1 agreement with the float model ({name})",
                  f"{m['top1_agreement']:.1%}", metrics["images"])
        if "mask_iou" in m:
            below("min_mask_iou", m["mask_iou"], f"mask IoU with the float model's ({name})", f"{m['mask_iou']:.3f}")
    if "matched_detections" in metrics:
        below("min_matched", metrics["matched_detections"], "share of the float model's detections matched",
              f"{metrics['matched_detections']:.1%}", metrics.get("detections_compared", 0))
    if "matched_mask_iou" in metrics:
        below("min_mask_iou", metrics["matched_mask_iou"], "mask IoU of the detections matched with the float "
              "model's", f"{metrics['matched_mask_iou']:.3f}")
    if "matched_keypoint_oks" in metrics:
        below("min_keypoint_oks", metrics["matched_keypoint_oks"], "keypoint OKS of the detections matched with the "
              "float model's", f"{metrics['matched_keypoint_oks']:.3f}")
    return found


def floor_failures(recipe: Recipe, variant: Variant, metrics: dict) -> list[str]:
    """The variant's fidelity below its floors (the recipe's min_* fields, DEFAULT_FLOORS where it sets none),
    a located line each, naming the output (and slice) and what to do."""
    floors = {field: getattr(variant, field) for field in DEFAULT_FLOORS}
    where = f"{recipe.path}: variants[{recipe.variant_index(variant.name)}]"
    debug = f"`mzconvert debug {command_argument(recipe)} --variant {variant.name}` shows which layers lose it"
    return [f"{where}.{field}: {variant.name}: {what} {shown} is below the floor {floors[field]} (the recipe may "
            f"lower it); {debug}" for field, what, shown in below_floors(metrics, floors, variant.mode)]


def threshold_failures(variant: Variant, metrics: dict) -> list[str]:
    failures = []
    for name, m in metrics.items():
        if not isinstance(m, dict):
            continue
        if variant.min_cosine is not None and m["cosine"] < variant.min_cosine:
            failures.append(f"{variant.name}/{name}: cosine {m['cosine']:.4f} < {variant.min_cosine}")
        if variant.min_sqnr_db is not None and m["sqnr_db"] < variant.min_sqnr_db:
            failures.append(f"{variant.name}/{name}: SQNR {m['sqnr_db']:.1f} dB < {variant.min_sqnr_db}")
    return failures


def source_pipeline_fidelity(frozen: Path, reference: Path, recipe: Recipe, images: list[Path],
                             names: list[str]) -> dict:
    """How closely our declared preprocessing + stripped float model (+ our decode) reproduce the source
    run end to end with its own pre- and post-processing, on real images: the share of detections
    matched (detectors) or the top-1 agreement (classifiers). Ours are the float model's outputs on the
    same images in `reference` (reference_outputs)."""
    pipeline = backend_for(recipe).SourcePipelineRunner(frozen, recipe)
    per_image = []
    with np.load(reference, allow_pickle=False) as saved:
        for i, path in enumerate(images):
            pixels = np.asarray(load_image(path), dtype=np.uint8)
            if recipe.task == "detection":
                per_image.append(matched_detections(pipeline.detections(pixels), saved_detections(saved, i)))
            else:
                theirs = int(np.argmax(pipeline.run(pixels)[0])) - recipe.source_pipeline.class_offset
                offset = recipe.labels.label_offset if recipe.labels else 0
                mine = int(np.argmax(saved[f"output_{i}_0"])) - offset  # the first output: the logits
                per_image.append((int(theirs == mine), 1))
    matched, total = (sum(column) for column in zip(*per_image))
    shares = [m / t if t else 1.0 for m, t in per_image]
    worst = int(np.argmin(shares))
    return {"matched_share": matched / total if total else 1.0, "compared": total, "images": len(images),
            "worst_image": names[worst] if shares[worst] < 1 else None, "worst_image_share": shares[worst],
            "what": "detections matched (same label, IoU >= 0.9)" if recipe.task == "detection" else "top-1 agreement"}
