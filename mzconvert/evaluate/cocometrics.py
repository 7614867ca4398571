"""COCO bbox, mask and keypoint AP (pycocotools) and paired bootstrap intervals of accuracy ratios.

On 80-500 images an accuracy moves by a few percent from sampling alone, so a ratio to float is
printed with its paired bootstrap 95 % interval: the same resampled images for both models. For AP
the resampling reuses COCOeval's per-image matches: an image drawn k times weighs k in the
precision/recall sums, which is what concatenating it k times would give (tested against pycocotools).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

BOOTSTRAP_SAMPLES = 1000
_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass
class _CategoryMatches:
    image: np.ndarray  # D, image index of each detection, in score order (as COCOeval sorts them)
    true_positive: np.ndarray  # T x D
    false_positive: np.ndarray  # T x D
    positives: np.ndarray  # per image: ground-truth boxes that count


@dataclass
class CocoScores:
    summary: dict  # AP, AP50, AP75 as pycocotools reports them
    categories: list[_CategoryMatches]
    image_count: int

    def ap(self, weights: np.ndarray) -> float:
        """AP (IoU .50:.95, all areas, 100 detections) with image i counted weights[i] times."""
        return float(self.ap_resampled(weights[None, :])[0])

    def ap_resampled(self, weights: np.ndarray, block: int = 8) -> np.ndarray:
        """ap() of every row of `weights` (resamples x images): `block` rows at a time in numpy operations over
        whole arrays, not a Python loop a row (blocks keep the arrays in cache: a detector's 100 detections
        an image make rows of 10^4)."""
        if weights.shape[0] > block:
            return np.concatenate([self.ap_resampled(weights[i:i + block], block)
                                   for i in range(0, weights.shape[0], block)])
        samples = weights.shape[0]
        per_category = []
        for c in self.categories:
            positives = weights @ c.positives
            counted = positives > 0  # COCOeval leaves a category without ground truth out (-1)
            detections = c.image.size
            total = np.zeros(samples)
            w = weights[:, c.image]
            for t in range(c.true_positive.shape[0] if detections else 0):
                tp, fp = np.cumsum(c.true_positive[t] * w, axis=1), np.cumsum(c.false_positive[t] * w, axis=1)
                recall = np.where(counted[:, None], tp / np.where(counted, positives, 1.0)[:, None], 0.0)
                precision = tp / (tp + fp + np.spacing(1))
                envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
                index = np.stack([np.searchsorted(row, _RECALL_POINTS, side="left") for row in recall])
                found = index < detections
                picked = np.take_along_axis(envelope, np.minimum(index, detections - 1), axis=1)
                total += np.where(found, picked, 0.0).mean(axis=1)
            depth = c.true_positive.shape[0] if detections else 1
            per_category.append(np.where(counted, total / depth, np.nan))
        if not per_category:
            return np.zeros(samples)
        stacked = np.array(per_category)
        present = ~np.isnan(stacked)
        return np.where(present.any(axis=0), np.nansum(stacked, axis=0) / np.maximum(present.sum(axis=0), 1), 0.0)


def coco_scores(annotations: Path, results: list[dict], category_ids: list[int] | None,
                iou_type: str = "bbox", sigmas: np.ndarray | None = None,
                image_ids: list[int] | None = None) -> CocoScores:
    """COCOeval bbox (or segm: the results' masks against the annotations' outlines; keypoints: their points by
    OKS with the per-point `sigmas`) over `category_ids` (all when None) and `image_ids` (all the annotations'
    when None), keeping per-image matches for the bootstrap."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(annotations))
        if iou_type == "keypoints":
            _check_points(annotations, truth, len(sigmas))
        if not results:
            return CocoScores({"AP": 0.0, "AP50": 0.0, "AP75": 0.0}, [], len(image_ids or truth.getImgIds()))
        evaluation = COCOeval(truth, truth.loadRes(results), iou_type)
        if category_ids is not None:
            evaluation.params.catIds = category_ids
        if sigmas is not None:
            evaluation.params.kpt_oks_sigmas = np.asarray(sigmas)
        if image_ids is not None:
            evaluation.params.imgIds = sorted(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    params = evaluation.params
    images, areas, max_detections = len(params.imgIds), len(params.areaRng), params.maxDets[-1]
    categories = []
    for k in range(len(params.catIds)):
        rows = [(i, e) for i in range(images) if (e := evaluation.evalImgs[k * areas * images + i]) is not None]
        positives = np.zeros(images)
        image, scores, matched, ignored = [], [], [], []
        for i, e in rows:
            positives[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            n = len(e["dtScores"][:max_detections])
            image += [i] * n
            scores += list(e["dtScores"][:max_detections])
            matched.append(np.asarray(e["dtMatches"])[:, :max_detections].reshape(len(params.iouThrs), n))
            ignored.append(np.asarray(e["dtIgnore"])[:, :max_detections].reshape(len(params.iouThrs), n))
        order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
        matched = np.concatenate(matched, axis=1)[:, order] if matched else np.zeros((len(params.iouThrs), 0))
        ignored = np.concatenate(ignored, axis=1)[:, order].astype(bool) if ignored else matched.astype(bool)
        categories.append(_CategoryMatches(
            image=np.asarray(image, np.int64)[order], true_positive=(matched != 0) & ~ignored,
            false_positive=(matched == 0) & ~ignored, positives=positives))
    return CocoScores({"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2])}, categories, images)


def _check_points(annotations: Path, truth, points: int) -> None:
    """Keypoint annotations must have the model's number of points (pycocotools would fail on a broadcast)."""
    for annotation in truth.dataset["annotations"]:
        if "keypoints" in annotation and len(annotation["keypoints"]) != 3 * points:
            raise InputError(f"{annotations}: annotation {annotation.get('id')}: keypoints: "
                             f"{len(annotation['keypoints']) // 3} points (x, y, v each); the model gives {points}")


def coco_ap(annotations: Path, results: list[dict], category_ids: list[int] | None) -> dict:
    """COCOeval bbox; AP, AP50, AP75 over `category_ids` (all categories when None)."""
    return coco_scores(annotations, results, category_ids).summary


def bootstrap_weights(images: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """samples x images: how often each image is drawn in each resample (with replacement)."""
    draws = np.random.default_rng(seed).integers(0, images, (samples, images))
    return np.stack([np.bincount(row, minlength=images) for row in draws]).astype(np.float64)


def difference_interval(candidate: np.ndarray, other: np.ndarray) -> list[float]:
    """95 % percentile interval of candidate - other over paired resamples (the same images drawn for both)."""
    low, high = np.percentile(candidate - other, [2.5, 97.5])
    return [float(low), float(high)]


def sign_test(candidate, baseline) -> tuple[int, int, float]:
    """(images where `candidate` is the higher, where it is the lower, the one-sided sign-test p of so many
    wins among the images that differ when either is as likely to win): whether one model agrees with a third
    on more images than another does beyond chance, paired image by image."""
    from math import comb

    wins = sum(c > b for c, b in zip(candidate, baseline))
    losses = sum(c < b for c, b in zip(candidate, baseline))
    differing = wins + losses
    return wins, losses, sum(comb(differing, k) for k in range(wins, differing + 1)) / 2 ** differing


def share_interval(counts: np.ndarray) -> list[float]:
    """95 % interval of a share counted image by image (`counts`: images x (hits, trials)) over image resamples:
    one image's hits move together (a detector's detections of one scene), which an interval over the trials as
    if independent leaves out."""
    weights = bootstrap_weights(len(counts))
    return ratio_interval(weights @ counts[:, 0], weights @ counts[:, 1])


def ratio_interval(candidate: np.ndarray, baseline: np.ndarray) -> list[float]:
    """95 % percentile interval of candidate / baseline over paired resamples."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(baseline > 0, candidate / baseline, np.nan)
    if np.all(np.isnan(ratios)):
        return [float("nan"), float("nan")]
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return [float(low), float(high)]
