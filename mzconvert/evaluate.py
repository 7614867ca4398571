"""Accuracy of every artifact on the same images: COCO bbox AP (pycocotools) or top-1/top-5.

Detection outputs are decoded here exactly as the stripped-off TF post-processor did: the SSD
anchors exported by strip, the Faster R-CNN box coder with the recipe's scales, sigmoid scores,
per-class NMS; boxes are normalised, so they map back to the original image by its size.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import MzError
from .preprocess import list_images, prepare
from .recipe import InputSpec, Postprocess, Preprocess, Recipe

SCORE_THRESHOLD = 0.001  # low, as for mAP: the precision/recall curve needs the low-score tail
IOU_THRESHOLD = 0.6  # the TF OD API SSD configs' NMS IoU
MAX_DETECTIONS = 100  # COCO's maxDets


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # K x 4, ymin, xmin, ymax, xmax, normalised
    scores: np.ndarray  # K
    labels: np.ndarray  # K, index into recipe.postprocess.labels


def decode_ssd_boxes(encodings: np.ndarray, anchors: np.ndarray, scales) -> np.ndarray:
    """Faster R-CNN box coder decode: (ty, tx, th, tw) relative to anchors -> (ymin, xmin, ymax, xmax)."""
    ty, tx, th, tw = (encodings[:, i] / scales[i] for i in range(4))
    ya, xa = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    yc, xc = ty * ha + ya, tx * wa + xa
    h, w = np.exp(th) * ha, np.exp(tw) * wa
    return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best first."""
    order = np.argsort(-scores, kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size and len(keep) < limit:
        best, rest = order[0], order[1:]
        keep.append(best)
        top_left = np.maximum(boxes[best, :2], boxes[rest, :2])
        bottom_right = np.minimum(boxes[best, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def ssd_detections(outputs: dict[str, np.ndarray], post: Postprocess, anchors: np.ndarray) -> Detections:
    encodings = outputs[post.box_output].reshape(-1, 4)
    logits = outputs[post.class_output].reshape(encodings.shape[0], -1)
    if post.score == "sigmoid":
        scores = 1 / (1 + np.exp(-logits))
    else:
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = exp / exp.sum(axis=1, keepdims=True)
    if post.background_class:
        scores = scores[:, 1:]
    if scores.shape[1] != len(post.labels):
        raise MzError(f"the model scores {scores.shape[1]} classes but the recipe has {len(post.labels)} labels")
    boxes = decode_ssd_boxes(encodings, anchors, post.box_coder_scales)  # NMS first, clip after, as TF does
    found = []
    for label in range(scores.shape[1]):
        candidates = np.flatnonzero(scores[:, label] > SCORE_THRESHOLD)
        kept = candidates[nms(boxes[candidates], scores[candidates, label], IOU_THRESHOLD, MAX_DETECTIONS)]
        found += [(i, label) for i in kept]
    if not found:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    index, labels = map(np.asarray, zip(*found))
    chosen = scores[index, labels]
    best = np.argsort(-chosen, kind="stable")[:MAX_DETECTIONS]
    return Detections(np.clip(boxes[index[best]], 0.0, 1.0), chosen[best], labels[best])


def postprocessed_detections(outputs: list[np.ndarray]) -> Detections:
    """TFLite_Detection_PostProcess outputs: boxes, classes (0-based), scores, count."""
    boxes, classes, scores, count = (o.reshape(o.shape[1:]) if o.ndim > 1 else o for o in outputs)
    n = int(np.asarray(count).ravel()[0])
    return Detections(np.clip(boxes[:n], 0, 1), scores[:n], classes[:n].astype(np.int64))


def coco_results(image_id: int, detections: Detections, size: tuple[int, int], post: Postprocess) -> list[dict]:
    width, height = size
    rows = []
    for (ymin, xmin, ymax, xmax), score, label in zip(detections.boxes, detections.scores, detections.labels):
        rows.append({"image_id": image_id, "category_id": post.category_ids[int(label)], "score": float(score),
                     "bbox": [float(xmin * width), float(ymin * height),
                              float((xmax - xmin) * width), float((ymax - ymin) * height)]})
    return rows


def coco_ap(annotations: Path, results: list[dict], category_ids: list[int] | None) -> dict:
    """COCOeval bbox; AP, AP50, AP75 over `category_ids` (all categories when None)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(annotations))
        if not results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
        detections = truth.loadRes(results)
        evaluation = COCOeval(truth, detections, "bbox")
        if category_ids is not None:
            evaluation.params.catIds = category_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"AP": float(stats[0]), "AP50": float(stats[1]), "AP75": float(stats[2])}


@dataclass
class CocoDataset:
    images: dict[int, Path]  # image id -> file
    annotations: Path

    @classmethod
    def open(cls, folder: Path, split: str) -> "CocoDataset":
        candidates = sorted((folder / "annotations").glob(f"instances_{split}*.json"))
        if len(candidates) != 1:
            raise MzError(f"{folder}: expected one annotations/instances_{split}*.json, found {len(candidates)}")
        data = json.loads(candidates[0].read_text())
        image_dir = folder / split
        images = {}
        for image in data["images"]:
            path = image_dir / image["file_name"]
            if not path.is_file():
                raise MzError(f"{candidates[0]}: image {image['file_name']} is not in {image_dir}")
            images[image["id"]] = path
        return cls(images=images, annotations=candidates[0])


Runner = Callable[[np.ndarray], list[np.ndarray]]


def evaluate_detection(runners: dict[str, tuple[Runner, list[str]]], recipe: Recipe, dataset: CocoDataset,
                       anchors: np.ndarray | None, log=lambda m: None) -> dict[str, dict]:
    """AP of every runner on the same images; each runner returns outputs named by the second item."""
    post = recipe.postprocess
    results = {name: [] for name in runners}
    items = sorted(dataset.images.items())
    for done, (image_id, path) in enumerate(items, 1):
        prepared = prepare(path, recipe.preprocess, recipe.input)
        for name, (run, output_names) in runners.items():
            outputs = run(prepared.tensor)
            if post.kind == "ssd":
                detections = ssd_detections(dict(zip(output_names, outputs)), post, anchors)
            else:
                detections = postprocessed_detections(outputs)
            results[name] += coco_results(image_id, detections, prepared.original_size, post)
        if done % 25 == 0 or done == len(items):
            log(f"eval: {done}/{len(items)} images")
    scored_ids = list(post.category_ids) if len(set(post.category_ids)) < 80 else None
    return {name: coco_ap(dataset.annotations, rows, scored_ids) | {"images": len(items), "detections": len(rows)}
            for name, rows in results.items()}


def imagenet_label(sorted_index: int) -> int:
    """The imagenet-samples convention: the i-th file in sorted order is class 2*i (every other synset)."""
    return 2 * sorted_index


# Google's published MobileNet TFLite models (the --reference models) take NHWC RGB in [-1, 1]
# after a central 87.5 % crop, and score 1001 classes with background first.
REFERENCE_PREPROCESS = dict(interpolation="tf1-bilinear", channel_order="RGB", mean=(127.5,) * 3, std=(127.5,) * 3,
                            central_crop=0.875)


def reference_inputs(runner) -> tuple[Preprocess, InputSpec]:
    shape = tuple(runner.inputs[0].shape)
    return (Preprocess(resize=(shape[1], shape[2]), **REFERENCE_PREPROCESS),
            InputSpec(name=runner.inputs[0].name, shape=shape, layout="NHWC", dtype="float32"))


def evaluate_classification(runners: dict[str, tuple[Runner, Preprocess, InputSpec]], folder: Path,
                            log=lambda m: None) -> dict[str, dict]:
    """Top-1/top-5 of every runner, each with its own preprocessing; a model scoring 1001 classes has
    background at index 0."""
    images = list_images(folder)
    if not images:
        raise MzError(f"{folder}: no images to evaluate on")
    hits = {name: [0, 0] for name in runners}
    for i, path in enumerate(images):
        label = imagenet_label(i)
        for name, (run, preprocess, model_input) in runners.items():
            logits = run(prepare(path, preprocess, model_input).tensor)[0].ravel()
            top5 = np.argsort(-logits, kind="stable")[:5] - (1 if logits.size == 1001 else 0)
            hits[name][0] += int(top5[0] == label)
            hits[name][1] += int(label in top5)
        if (i + 1) % 100 == 0 or i + 1 == len(images):
            log(f"eval: {i + 1}/{len(images)} images")
    return {name: {"top1": h[0] / len(images), "top5": h[1] / len(images), "images": len(images)}
            for name, h in hits.items()}


def run_eval(recipe: Recipe, dataset: Path, split: str, variants: list[str], references: list[Path],
             dist: Path, build_root: Path, console) -> tuple[dict, dict]:
    """Evaluate the built variants, the float source graph and `references`; writes dist/<recipe>/eval.json."""
    from .backends import backend_for
    from .fsio import write_json_atomic
    from .report import load_manifest
    from .runtime import open_model

    manifest = load_manifest(dist, recipe.name)
    folder = dist / recipe.name
    output_names = list(recipe.strip.outputs) if recipe.strip else None
    if missing := set(variants) - set(manifest["variants"]):
        raise MzError(f"{folder}/manifest.json: no built variant {', '.join(sorted(missing))}")
    chosen = [v.name for v in recipe.variants if v.name in manifest["variants"] and (not variants or v.name in variants)]
    runners = {}
    # The float source graph is the reference row, where the backend can run it (TF cannot run the
    # TFLite_Detection_PostProcess custom op).
    stripped = build_root / recipe.name / "strip" / "stripped.pb"
    if stripped.is_file() and (recipe.postprocess is None or recipe.postprocess.kind == "ssd"):
        runners["source-graph"] = backend_for(recipe).GraphRunner(stripped, recipe).run
    for name in chosen:
        runners[name] = open_model(folder / manifest["variants"][name]["file"], output_names).run
    if recipe.task == "detection":
        for path in references:
            runners[path.stem] = open_model(path, output_names).run
        coco = CocoDataset.open(dataset, split)
        anchors = np.load(folder / "anchors.npy") if recipe.postprocess.kind == "ssd" else None
        named = {name: (run, output_names) for name, run in runners.items()}
        results = evaluate_detection(named, recipe, coco, anchors, console.log)
        scope = "COCO bbox AP" + (f", categories {', '.join(recipe.postprocess.labels)}"
                                  if len(recipe.postprocess.labels) < 80 else "")
        images = len(coco.images)
    else:
        named = {name: (run, recipe.preprocess, recipe.input) for name, run in runners.items()}
        for path in references:
            reference = open_model(path)
            named[path.stem] = (reference.run, *reference_inputs(reference))
        results = evaluate_classification(named, dataset, console.log)
        scope, images = "top-1/top-5, label = 2 x sorted file index", next(iter(results.values()))["images"]
    evaluation = {"recipe": recipe.name, "dataset": str(dataset), "split": split, "images": images,
                  "scope": scope, "results": results}
    write_json_atomic(folder / "eval.json", evaluation)
    return evaluation, manifest
