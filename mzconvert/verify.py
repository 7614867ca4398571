"""Fidelity of a variant: per-output cosine similarity, SQNR and max abs error against the float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .preprocess import load_image, model_tensor, prepare
from .recipe import Recipe, Variant
from .runtime import open_model


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


def verify_variant(model: Path, reference, recipe: Recipe, images: list[Path]) -> dict:
    """Run `model` and the float `reference` on `images`; metrics per output over all images."""
    runner = open_model(model, reference.output_names)
    ref_outputs: list[list[np.ndarray]] = [[] for _ in reference.output_names]
    got_outputs: list[list[np.ndarray]] = [[] for _ in reference.output_names]
    for path in images:
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        for i, (ref, got) in enumerate(zip(reference.run(tensor), runner.run(tensor))):
            ref_outputs[i].append(ref)
            got_outputs[i].append(got.reshape(ref.shape))
    metrics = {name: compare(np.stack(ref_outputs[i]), np.stack(got_outputs[i]))
               for i, name in enumerate(reference.output_names)}
    if recipe.task == "classification":  # does the variant pick the same class as the float model?
        ref, got = (np.stack(o[0]).reshape(len(images), -1) for o in (ref_outputs, got_outputs))
        metrics[reference.output_names[0]]["top1_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
    return metrics | {"images": len(images)}


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


def source_pipeline_fidelity(frozen: Path, stripped: Path, anchors: Path | None, recipe: Recipe,
                             images: list[Path], names: list[str]) -> dict:
    """How closely our declared preprocessing + stripped float model (+ our decode) reproduce the source
    run end to end with its own pre- and post-processing, on real images: the share of detections
    matched (detectors) or the top-1 agreement (classifiers)."""
    import numpy as np

    from .backends import backend_for
    from .evaluate import load_anchors, matched_detections, ssd_detections

    backend = backend_for(recipe)
    pipeline, ours = backend.SourcePipelineRunner(frozen, recipe), backend.GraphRunner(stripped, recipe)
    anchor_boxes = load_anchors(anchors) if anchors else None
    per_image = []
    for path in images:
        image = load_image(path)
        pixels = np.asarray(image, dtype=np.uint8)
        outputs = ours.run(model_tensor(image, recipe.preprocess, recipe.input))
        if recipe.task == "detection":
            mine = ssd_detections(dict(zip(ours.output_names, outputs)), recipe.postprocess, anchor_boxes)
            per_image.append(matched_detections(pipeline.detections(pixels), mine))
        else:
            theirs = int(np.argmax(pipeline.run(pixels)[0])) - recipe.source_pipeline.class_offset
            mine = int(np.argmax(outputs[0])) - (recipe.labels.label_offset if recipe.labels else 0)
            per_image.append((int(theirs == mine), 1))
    matched, total = (sum(column) for column in zip(*per_image))
    shares = [m / t if t else 1.0 for m, t in per_image]
    worst = int(np.argmin(shares))
    return {"matched_share": matched / total if total else 1.0, "compared": total, "images": len(images),
            "worst_image": names[worst] if shares[worst] < 1 else None, "worst_image_share": shares[worst],
            "what": "detections matched (same label, IoU >= 0.9)" if recipe.task == "detection" else "top-1 agreement"}
