"""Fidelity of a variant: per-output cosine similarity, SQNR and max abs error against the float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MzError
from ..preprocess import load_image, prepare
from ..recipe import Recipe, Variant
from ..runtime import open_model


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    noise = np.sum((ref - got) ** 2)
    signal = np.sum(ref ** 2)
    norms = np.linalg.norm(ref) * np.linalg.norm(got)
    return {
        "cosine": float(ref @ got / norms) if norms else (1.0 if noise == 0 else 0.0),
        "sqnr_db": float(10 * np.log10(signal / noise)) if noise else float("inf"),
        "max_abs_error": float(np.max(np.abs(ref - got))) if ref.size else 0.0,
    }


def reference_outputs(reference, recipe: Recipe, images: list[Path], out_dir: Path,
                      anchors: Path | None = None) -> Path:
    """One pass of the float model over the verify images: every input tensor and output, for all
    variants' verify to compare against (reference.npz; arrays only, loaded without pickle). With an SSD's
    `anchors`, also its decoded detections (boxes_i, scores_i, labels_i), or why they cannot be decoded
    (detections_error): decoded once, for every variant's verify and the source-pipeline check."""
    arrays = {}
    for i, path in enumerate(images):
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        arrays[f"input_{i}"] = tensor
        for j, output in enumerate(reference.run(tensor)):
            arrays[f"output_{i}_{j}"] = output
    if anchors is not None:
        arrays |= _float_detections(arrays, reference.output_names, recipe, anchors, len(images))
    target = out_dir / "reference.npz"
    np.savez(target, **arrays)
    return target


def _float_detections(arrays: dict, output_names: list[str], recipe: Recipe, anchors: Path, count: int) -> dict:
    from ..tasks.detection import load_anchors, ssd_detections

    boxes = load_anchors(anchors)
    decoded = {}
    try:
        for i in range(count):
            found = ssd_detections({name: arrays[f"output_{i}_{j}"] for j, name in enumerate(output_names)},
                                   recipe.postprocess, boxes)
            decoded |= {f"boxes_{i}": found.boxes, f"scores_{i}": found.scores, f"labels_{i}": found.labels}
    except MzError as exc:  # e.g. labels that do not fit the model: eval refuses it; the build says so
        return {"detections_error": np.array(str(exc))}
    return decoded


def saved_detections(saved, i: int):
    """The float model's detections on verify image i, from reference.npz (reference_outputs); an error
    saying why when they could not be decoded."""
    from ..tasks.detection import Detections

    if "detections_error" in saved.files:
        raise MzError(str(saved["detections_error"]))
    return Detections(saved[f"boxes_{i}"], saved[f"scores_{i}"], saved[f"labels_{i}"])


def verify_variant(model: Path, reference: Path, output_names: list[str], recipe: Recipe,
                   anchors: Path | None = None, threads: int = 1) -> dict:
    """Run `model` on the inputs of `reference` (reference_outputs); metrics per output over all images,
    and what a user sees: top-1 agreement (classifiers), the share of detections matched (SSD detectors)."""
    runner = open_model(model, output_names, threads)
    with np.load(reference, allow_pickle=False) as saved:
        count = sum(1 for key in saved.files if key.startswith("input_"))
        ref_outputs = [[saved[f"output_{i}_{j}"] for i in range(count)] for j in range(len(output_names))]
        got_outputs: list[list[np.ndarray]] = [[] for _ in output_names]
        for i in range(count):
            for j, got in enumerate(runner.run(saved[f"input_{i}"])):
                got_outputs[j].append(got.reshape(ref_outputs[j][i].shape))
        metrics = {name: compare(np.stack(ref_outputs[j]), np.stack(got_outputs[j]))
                   for j, name in enumerate(output_names)}
        if anchors is not None:  # do the variant's detections match the float model's?
            metrics |= _matched_detections(saved, got_outputs, output_names, recipe, anchors)
    for j, name in enumerate(output_names):  # a float model that answers the same whatever the image
        stacked = np.stack(ref_outputs[j])
        metrics[name]["constant_reference"] = bool(np.allclose(stacked, stacked[:1], rtol=1e-5, atol=1e-7))
    if recipe.task == "classification":  # does the variant pick the same class as the float model?
        ref, got = (np.stack(o[0]).reshape(count, -1) for o in (ref_outputs, got_outputs))
        metrics[output_names[0]]["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return metrics | {"images": count}


def _matched_detections(saved, got_outputs: list[list[np.ndarray]], output_names: list[str], recipe: Recipe,
                        anchors: Path) -> dict:
    """{matched_detections: share} of the variant's detections against the float model's saved ones, or
    {detections_not_compared: why} when the float model's outputs could not be decoded."""
    from ..tasks.detection import load_anchors, matched_detections, ssd_detections

    try:
        floats = [saved_detections(saved, i) for i in range(len(got_outputs[0]))]
    except MzError as exc:  # e.g. labels that do not fit the model: eval refuses it; the build says so
        return {"detections_not_compared": str(exc)}
    boxes = load_anchors(anchors)
    pairs = [matched_detections(found, ssd_detections({name: got_outputs[j][i] for j, name in enumerate(output_names)},
                                                      recipe.postprocess, boxes))
             for i, found in enumerate(floats)]
    matched, total = (sum(column) for column in zip(*pairs))
    return {"matched_detections": matched / total if total else 1.0}


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
    from ..backends import backend_for
    from ..tasks.detection import matched_detections

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
