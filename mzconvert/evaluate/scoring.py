"""Accuracy of several models on the same images: COCO bbox AP (a segmentation head's: and mask AP; a pose head's:
and keypoint AP, where the annotations give keypoints; an oriented-box head's: its rotated boxes' AP instead;
pycocotools) or top-1/top-5, with paired bootstrap intervals of each model's ratio to the baseline (float32, or
the first model), and of the difference within each pair of rows named (one variant under two kernel families)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..recipe import Recipe
from ..tasks.detection import MATCH_IOU, MATCH_SCORE, coco_results, matched_detections
from ..tasks.keypoints import keypoint_sigmas
from .cocometrics import bootstrap_weights, coco_scores, difference_interval, ratio_interval
from .datasets import CocoDataset, Predict, predictions

SOURCE_GRAPH = "source-graph"  # our declared preprocessing + the stripped float model (+ our decode)
SOURCE_TWIN = "source-twin"  # the same with a quantized source's float twin (backends/float_twin.py) for its model


SOURCE_PIPELINE = "source-pipeline"  # the source model end to end, its own pre/post-processing: ground truth


def evaluate_detection(models: dict[str, Predict], recipe: Recipe, dataset: CocoDataset, log=lambda m: None,
                       pairs: dict[str, str] | None = None, parallel: set[str] = frozenset(),
                       aliases: dict[str, str] | None = None) -> dict:
    """AP of every model on the same images, the paired bootstrap interval of each one's AP ratio to float32
    (or the first model), and how far our pipeline is from the source's own, where both ran. `pairs`: row ->
    the row its AP difference is measured to; `parallel`, `aliases`: how rows run (datasets.predictions)."""
    post = recipe.postprocess
    rows = {name: [] for name in models}
    fidelity = {"matched": 0, "total": 0, "worst_image": None, "worst_share": 1.0}
    items = sorted(dataset.images.items())
    found_all = predictions(models, [path for _, path in items], parallel=parallel, aliases=aliases)
    for done, ((image_id, path), (image, found)) in enumerate(zip(items, found_all), 1):
        for name, detections in found.items():
            rows[name] += coco_results(image_id, detections, image.size, post)
        if SOURCE_PIPELINE in found and SOURCE_GRAPH in found:
            matched, total = matched_detections(found[SOURCE_PIPELINE], found[SOURCE_GRAPH])
            fidelity["matched"] += matched
            fidelity["total"] += total
            if total and matched / total < fidelity["worst_share"]:
                fidelity.update(worst_image=path.name, worst_share=matched / total)
        if done % 25 == 0 or done == len(items):
            log(f"eval: {done}/{len(items)} images")
    scored_ids = list(post.category_ids) if len(set(post.category_ids)) < 80 else None
    weights = bootstrap_weights(len(items))
    baseline = _baseline(list(models))
    # an oriented-box head's rotated boxes: as the polygons they are (the annotations' outlines, oriented_datasets)
    scores, resampled = _scored(rows, dataset.annotations, scored_ids, weights, "segm" if post.angles else "bbox")
    results = {name: s.summary | {"images": len(items), "detections": len(rows[name]),
                                  "ratio_interval": ratio_interval(resampled[name], resampled[baseline])}
               for name, s in scores.items()}
    if post.mask_coefficients:  # a segmentation head: its masks scored against the annotations' outlines too
        masks, resampled_masks = _scored(rows, dataset.annotations, scored_ids, weights, "segm")
        for name, s in masks.items():
            results[name] |= {f"mask_{key}": value for key, value in s.summary.items()}
            results[name]["mask_ratio_interval"] = ratio_interval(resampled_masks[name], resampled_masks[baseline])
    if post.keypoints and (points := dataset.keypoint_annotations()):  # a pose head: its keypoints by OKS too
        sigmas = keypoint_sigmas(post.keypoint_shape)
        keypoints, resampled_points = _scored(rows, points, scored_ids, weights, "keypoints", sigmas,
                                              list(dataset.images))
        for name, s in keypoints.items():
            results[name] |= {f"keypoint_{key}": value for key, value in s.summary.items()}
            results[name]["keypoint_ratio_interval"] = ratio_interval(resampled_points[name],
                                                                      resampled_points[baseline])
    elif post.keypoints:
        log(f"eval: keypoints not scored: no annotations in {dataset.annotations.parent} give keypoints for the "
            f"{len(items)} images (boxes are)")
    for name, other in (pairs or {}).items():
        results[name]["difference"] = {"to": other, "value": results[name]["AP"] - results[other]["AP"],
                                       "interval": difference_interval(resampled[name], resampled[other])}
    evaluation = {"results": results, "baseline": baseline, "metric": "AP"}
    if fidelity["total"]:
        evaluation["pipeline_fidelity"] = {
            "ap_difference": results[SOURCE_GRAPH]["AP"] - results[SOURCE_PIPELINE]["AP"],
            "matched_share": fidelity["matched"] / fidelity["total"], "detections_compared": fidelity["total"],
            "worst_image": fidelity["worst_image"], "worst_image_share": fidelity["worst_share"],
            "match": f"same label, IoU >= {MATCH_IOU}, score >= {MATCH_SCORE} in either"}
    return evaluation


def _scored(rows: dict[str, list[dict]], annotations: Path, category_ids: list[int] | None, weights: np.ndarray,
            iou_type: str, sigmas: np.ndarray | None = None, image_ids: list[int] | None = None) -> tuple[dict, dict]:
    """Each model's COCOeval scores and its AP under every bootstrap resample of the images."""
    scores = {name: coco_scores(annotations, r, category_ids, iou_type, sigmas, image_ids)
              for name, r in rows.items()}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # numpy lets go of the GIL on these arrays
        resampled = dict(zip(scores, pool.map(lambda s: s.ap_resampled(weights), scores.values())))
    return scores, resampled


def _baseline(names: list[str]) -> str:
    return "float32" if "float32" in names else names[0]


def evaluate_classification(models: dict[str, Predict], labelled: list[tuple[Path, int]],
                            log=lambda m: None, pairs: dict[str, str] | None = None,
                            parallel: set[str] = frozenset(), aliases: dict[str, str] | None = None) -> dict:
    """Top-1/top-5 of every model on the same images; each model's scores are indexed by label already.
    `pairs`, `parallel` and `aliases` as for evaluate_detection."""
    correct = {name: np.zeros((len(labelled), 2), bool) for name in models}
    top1 = {name: np.zeros(len(labelled), np.int64) for name in models}
    found_all = predictions(models, [path for path, _ in labelled], parallel=parallel, aliases=aliases)
    for i, ((_, label), (_, found)) in enumerate(zip(labelled, found_all)):
        for name, scores in found.items():
            top5 = np.argsort(-scores, kind="stable")[:5]
            correct[name][i] = (top5[0] == label, label in top5)
            top1[name][i] = top5[0]
        if (i + 1) % 100 == 0 or i + 1 == len(labelled):
            log(f"eval: {i + 1}/{len(labelled)} images")
    weights = bootstrap_weights(len(labelled))
    baseline = _baseline(list(models))
    results = {}
    for name, hits in correct.items():
        results[name] = {"top1": float(hits[:, 0].mean()), "top5": float(hits[:, 1].mean()), "images": len(labelled),
                         "ratio_interval": ratio_interval(weights @ hits[:, 0], weights @ correct[baseline][:, 0]),
                         "top1_agreement": float(np.mean(top1[name] == top1[baseline]))}
    for name, other in (pairs or {}).items():
        shares = {row: weights @ correct[row][:, 0] / len(labelled) for row in (name, other)}
        results[name]["difference"] = {"to": other, "value": results[name]["top1"] - results[other]["top1"],
                                       "interval": difference_interval(shares[name], shares[other]),
                                       "top1_agreement": float(np.mean(top1[name] == top1[other]))}
    return {"results": results, "baseline": baseline, "metric": "top1"}
