"""Accuracy of every artifact on the same images: COCO bbox AP (pycocotools) or top-1/top-5.

Detection outputs are decoded here exactly as the stripped-off TF post-processor did: the SSD
anchors exported by strip, the Faster R-CNN box coder with the recipe's scales, sigmoid scores,
per-class NMS; boxes are normalised, so they map back to the original image by its size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .cocometrics import bootstrap_weights, coco_scores, ratio_interval
from .errors import EXIT_BAD_INPUT, MzError, short_text
from .labels import class_offset, labelled_images
from .preprocess import load_image, model_tensor
from .recipe import ClassLabels, InputSpec, Postprocess, Preprocess, Recipe


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # K x 4, ymin, xmin, ymax, xmax, normalised
    scores: np.ndarray  # K
    labels: np.ndarray  # K, index into recipe.postprocess.labels


def load_anchors(path: Path) -> np.ndarray:
    """anchors.npy as N x 4 float32; anything else (an object array, another shape) is a named error."""
    try:
        anchors = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise MzError(f"{path}: not an anchors array ({short_text(exc)})", EXIT_BAD_INPUT) from None
    if not isinstance(anchors, np.ndarray):  # an .npz archive
        raise MzError(f"{path}: not an anchors array (an .npz archive)", EXIT_BAD_INPUT)
    if anchors.ndim != 2 or anchors.shape[1] != 4 or not np.issubdtype(anchors.dtype, np.floating):
        raise MzError(f"{path}: anchors must be N x 4 floats, got {anchors.dtype} {list(anchors.shape)}",
                      EXIT_BAD_INPUT)
    return anchors.astype(np.float32)


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
    for label in range(scores.shape[1]):  # per-class NMS, as TFLite_Detection_PostProcess's regular NMS
        candidates = np.flatnonzero(scores[:, label] > post.nms_score_threshold)
        kept = candidates[nms(boxes[candidates], scores[candidates, label], post.nms_iou_threshold,
                              post.max_detections)]
        found += [(i, label) for i in kept]
    if not found:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    index, labels = map(np.asarray, zip(*found))
    chosen = scores[index, labels]
    best = np.argsort(-chosen, kind="stable")[:post.max_detections]
    return Detections(np.clip(boxes[index[best]], 0.0, 1.0), chosen[best], labels[best])


def postprocessed_detections(boxes, classes, scores, count, class_offset: int = 0) -> Detections:
    """Post-processed outputs (TFLite_Detection_PostProcess, a TF OD API graph): the first `count` rows;
    class ids minus `class_offset` are indices into the recipe's labels."""
    boxes, classes, scores = (np.asarray(o).reshape(-1, *np.asarray(o).shape[2:]) for o in (boxes, classes, scores))
    n = int(np.asarray(count).ravel()[0])
    return Detections(np.clip(boxes[:n], 0, 1), scores[:n], np.rint(classes[:n]).astype(np.int64) - class_offset)


def coco_results(image_id: int, detections: Detections, size: tuple[int, int], post: Postprocess) -> list[dict]:
    width, height = size
    rows = []
    for (ymin, xmin, ymax, xmax), score, label in zip(detections.boxes, detections.scores, detections.labels):
        rows.append({"image_id": image_id, "category_id": post.category_ids[int(label)], "score": float(score),
                     "bbox": [float(xmin * width), float(ymin * height),
                              float((xmax - xmin) * width), float((ymax - ymin) * height)]})
    return rows


class LoadedImage:
    """One dataset image, decoded once and preprocessed once per distinct preprocessing, for every model."""

    def __init__(self, path: Path):
        self.path = path
        self.image = load_image(path)
        self._tensors: dict = {}

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def pixels(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)

    def tensor(self, preprocess: Preprocess, model_input: InputSpec) -> np.ndarray:
        key = (preprocess, model_input)
        if key not in self._tensors:
            self._tensors[key] = model_tensor(self.image, preprocess, model_input)
        return self._tensors[key]


Runner = Callable[[np.ndarray], list[np.ndarray]]  # a model: input tensor -> outputs
Predict = Callable[[LoadedImage], object]  # Detections for detectors, a score vector for classifiers

SOURCE_GRAPH = "source-graph"  # our declared preprocessing + the stripped float model (+ our decode)
SOURCE_PIPELINE = "source-pipeline"  # the source model end to end, its own pre/post-processing: ground truth
MATCH_IOU = 0.9
MATCH_SCORE = 0.3  # detections a person would be shown


def predictions(models: dict[str, Predict], paths: list[Path], chunk: int = 32):
    """(image, {model: prediction}) for every path in order. Models run one after another over a chunk of
    images, not image by image: each runtime's thread pool then runs back to back instead of contending
    with the other runtime's pool (ONNX Runtime's threads spin for a while after each run)."""
    for start in range(0, len(paths), chunk):
        images = [LoadedImage(path) for path in paths[start:start + chunk]]
        found = {name: [predict(image) for image in images] for name, predict in models.items()}
        for i, image in enumerate(images):
            yield image, {name: found[name][i] for name in models}


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)


def matched_detections(a: Detections, b: Detections) -> tuple[int, int]:
    """(matched, total) over the detections of a and of b scoring >= MATCH_SCORE: each counts as matched
    when the other set has one of the same label with IoU >= MATCH_IOU (at any score)."""
    matched = total = 0
    for mine, theirs in ((a, b), (b, a)):
        for box, label in zip(mine.boxes[mine.scores >= MATCH_SCORE], mine.labels[mine.scores >= MATCH_SCORE]):
            same = theirs.boxes[theirs.labels == label]
            total += 1
            if same.size:
                top_left = np.maximum(box[:2], same[:, :2])
                bottom_right = np.minimum(box[2:], same[:, 2:])
                inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
                iou = inter / np.maximum(_area(box) + _area(same) - inter, 1e-12)
                matched += int(iou.max() >= MATCH_IOU)
    return matched, total


def evaluate_detection(models: dict[str, Predict], recipe: Recipe, dataset: "CocoDataset",
                       log=lambda m: None) -> dict:
    """AP of every model on the same images, the paired bootstrap interval of each one's AP ratio to float32
    (or the first model), and how far our pipeline is from the source's own, where both ran."""
    post = recipe.postprocess
    rows = {name: [] for name in models}
    fidelity = {"matched": 0, "total": 0, "worst_image": None, "worst_share": 1.0}
    items = sorted(dataset.images.items())
    found_all = predictions(models, [path for _, path in items])
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
    scores = {name: coco_scores(dataset.annotations, r, scored_ids) for name, r in rows.items()}
    weights = bootstrap_weights(len(items))
    baseline = _baseline(list(models))
    resampled = {name: np.array([s.ap(w) for w in weights]) for name, s in scores.items()}
    results = {name: s.summary | {"images": len(items), "detections": len(rows[name]),
                                  "ratio_interval": ratio_interval(resampled[name], resampled[baseline])}
               for name, s in scores.items()}
    evaluation = {"results": results, "baseline": baseline, "metric": "AP"}
    if fidelity["total"]:
        evaluation["pipeline_fidelity"] = {
            "ap_difference": results[SOURCE_GRAPH]["AP"] - results[SOURCE_PIPELINE]["AP"],
            "matched_share": fidelity["matched"] / fidelity["total"], "detections_compared": fidelity["total"],
            "worst_image": fidelity["worst_image"], "worst_image_share": fidelity["worst_share"],
            "match": f"same label, IoU >= {MATCH_IOU}, score >= {MATCH_SCORE} in either"}
    return evaluation


def _baseline(names: list[str]) -> str:
    return "float32" if "float32" in names else names[0]


def evaluate_classification(models: dict[str, Predict], labelled: list[tuple[Path, int]],
                            log=lambda m: None) -> dict:
    """Top-1/top-5 of every model on the same images; each model's scores are indexed by label already."""
    correct = {name: np.zeros((len(labelled), 2), bool) for name in models}
    top1 = {name: np.zeros(len(labelled), np.int64) for name in models}
    found_all = predictions(models, [path for path, _ in labelled])
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
    return {"results": results, "baseline": baseline, "metric": "top1"}


@dataclass
class CocoDataset:
    images: dict[int, Path]  # image id -> file
    annotations: Path

    @classmethod
    def open(cls, folder: Path, split: str) -> "CocoDataset":
        candidates = sorted((folder / "annotations").glob(f"instances_{split}*.json"))
        if len(candidates) != 1:
            raise MzError(f"{folder}: expected one annotations/instances_{split}*.json, found {len(candidates)}")
        try:
            data = json.loads(candidates[0].read_text())
            entries = [(image["id"], image["file_name"]) for image in data["images"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise MzError(f"{candidates[0]}: not COCO instances annotations ({exc.__class__.__name__}: {exc})") from None
        image_dir = folder / split
        images = {}
        for image_id, file_name in entries:
            path = image_dir / file_name
            if not path.is_file():
                raise MzError(f"{candidates[0]}: image {file_name} is not in {image_dir}")
            images[image_id] = path
        return cls(images=images, annotations=candidates[0])


def _scores_by_label(run, labels: ClassLabels, model: str, background_allowed: bool):
    """A predictor returning the model's scores indexed like the recipe's labels (background dropped)."""
    offset = None

    def scores(tensor: np.ndarray) -> np.ndarray:
        nonlocal offset
        logits = run(tensor)[0].ravel()
        if offset is None:
            spare = logits.size - len(labels.names)
            fits_background = background_allowed and spare == 1
            offset = 1 if fits_background else class_offset(logits.size, labels, model)
        return logits[offset:offset + len(labels.names)]

    return scores


# Google's published MobileNet TFLite models (the --reference models) take NHWC RGB in [-1, 1] after
# TF-slim's central 87.5 % crop and TF1 bilinear resize, and score 1001 classes with background first.
REFERENCE_PREPROCESS = dict(interpolation="tf1-bilinear", channel_order="RGB", mean=(127.5,) * 3, std=(127.5,) * 3,
                            central_crop=0.875)


def reference_inputs(runner) -> tuple[Preprocess, InputSpec]:
    shape = tuple(runner.inputs[0].shape)
    return (Preprocess(resize=(shape[1], shape[2]), **REFERENCE_PREPROCESS),
            InputSpec(name=runner.inputs[0].name, shape=shape, layout="NHWC", dtype="float32"))


def dataset_identity(dataset: Path, split: str, labels_file: Path | None, images: list[Path]) -> dict:
    """What an eval was run on, and a key naming exactly that (paths, sizes and the labels' bytes)."""
    listing = [[str(p.relative_to(dataset)) if p.is_relative_to(dataset) else str(p), p.stat().st_size]
               for p in images]
    label_bytes = labels_file.read_bytes() if labels_file else b""
    digest = hashlib.sha256(json.dumps([listing, split]).encode() + label_bytes).hexdigest()
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.resolve().name.lower()).strip("-") or "dataset"
    return {"path": str(dataset.resolve()), "name": dataset.resolve().name, "split": split,
            "key": f"{slug}-{digest[:12]}"}


def built_stage_model(build_root: Path, recipe: Recipe, stage: str) -> Path | None:
    """The model a stage of the last build wrote (build/<recipe>/<stage>/), if it is there."""
    try:
        result = json.loads((build_root / recipe.name / stage / "result.json").read_text())
    except (OSError, ValueError):
        return None
    path = build_root / recipe.name / stage / result.get("model", "")
    return path if path.is_file() else None


def run_eval(recipe: Recipe, dataset: Path, split: str, variants: list[str], references: list[Path],
             dist: Path, build_root: Path, console, labels_file: Path | None = None) -> tuple[dict, dict]:
    """Evaluate the built variants, the float source model, the source pipeline (where declared) and
    `references` on the same images; writes dist/<recipe>/eval/<dataset key>.json."""
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
    threads = os.cpu_count() or 1  # eval is throughput: every model runs on every core
    runners = {}
    # The float source model is the reference row, where the backend can run it (TF cannot run the
    # TFLite_Detection_PostProcess custom op).
    stripped = built_stage_model(build_root, recipe, "strip")
    if stripped is not None and (recipe.postprocess is None or recipe.postprocess.kind == "ssd"):
        runners[SOURCE_GRAPH] = backend_for(recipe).GraphRunner(stripped, recipe, threads).run
    for name in chosen:
        runners[name] = open_model(folder / manifest["variants"][name]["file"], output_names, threads).run
    pipeline = None
    if recipe.source_pipeline is not None and (frozen := built_stage_model(build_root, recipe, "freeze")):
        pipeline = backend_for(recipe).SourcePipelineRunner(frozen, recipe)
    if recipe.task == "detection":
        for path in references:
            runners[path.stem] = open_model(path, output_names, threads).run
        coco = CocoDataset.open(dataset, split)
        models = predictors(recipe, runners, folder, manifest)
        if pipeline is not None:
            models[SOURCE_PIPELINE] = lambda image: pipeline.detections(image.pixels())
        evaluation = evaluate_detection(models, recipe, coco, console.log)
        scope = "COCO bbox AP" + (f", categories {', '.join(recipe.postprocess.labels)}"
                                  if len(recipe.postprocess.labels) < 80 else "")
        images, label_source = list(coco.images.values()), f"COCO annotations {coco.annotations.name}"
    else:
        models = predictors(recipe, runners, folder, manifest)
        labelled = labelled_images(dataset, recipe.labels, labels_file)
        if pipeline is not None:
            its_labels = ClassLabels(recipe.labels.names, recipe.source_pipeline.class_offset)
            scores = _scores_by_label(pipeline.run, its_labels, SOURCE_PIPELINE, background_allowed=False)
            models[SOURCE_PIPELINE] = lambda image, s=scores: s(image.pixels())
        for path in references:
            reference = open_model(path, threads=threads)
            preprocess, model_input = reference_inputs(reference)
            scores = _scores_by_label(reference.run, recipe.labels, path.stem, background_allowed=True)
            models[path.stem] = lambda image, s=scores, p=preprocess, i=model_input: s(image.tensor(p, i))
        evaluation = evaluate_classification(models, labelled.images, console.log)
        scope, images, label_source = "top-1/top-5", [p for p, _ in labelled.images], labelled.source
    from .dist import measured_artifacts

    identity = dataset_identity(dataset, split, labels_file, images)
    files = [manifest["variants"][name]["file"] for name in chosen] + ["anchors.npy"]
    evaluation = {"recipe": recipe.name, "dataset": identity, "images": len(images), "labels": label_source,
                  "scope": scope, **evaluation, "models": list(evaluation["results"]),
                  "artifacts": measured_artifacts(manifest, files)}
    write_json_atomic(folder / "eval" / f"{identity['key']}.json", evaluation)
    return evaluation, manifest


def predictors(recipe: Recipe, runners: dict[str, Runner], folder: Path, manifest: dict) -> dict[str, Predict]:
    """What each model of `runners` (fed the recipe's preprocessing) predicts on an image: detections,
    decoded as the recipe says or read from an attached post-processor, or scores indexed like the
    recipe's labels. `folder`/`manifest`: the dist the variants come from."""
    if recipe.task == "detection":
        anchors = load_anchors(folder / "anchors.npy") if recipe.postprocess.kind == "ssd" else None
        attached = {n for n, v in manifest["variants"].items() if v.get("postprocess_attached")}
        output_names = list(recipe.strip.outputs) if recipe.strip else None
        return {name: _detector(run, recipe, anchors, output_names, name in attached) for name, run in runners.items()}
    if recipe.labels is None:
        raise MzError(f"{recipe.path}: labels: a classifier needs its labels to be evaluated or shown "
                      "(a list, a file of names, or 'imagenet' for the 1000 ImageNet synsets)")
    models = {}
    for name, run in runners.items():
        scores = _scores_by_label(run, recipe.labels, name, background_allowed=False)
        models[name] = lambda image, s=scores: s(image.tensor(recipe.preprocess, recipe.input))
    return models


def _detector(run, recipe: Recipe, anchors, output_names, attached: bool = False) -> Predict:
    """Detections of a model: raw SSD outputs decoded here, or a model's own post-processor read."""
    post = recipe.postprocess

    def predict(image: LoadedImage) -> Detections:
        outputs = run(image.tensor(recipe.preprocess, recipe.input))
        if post.kind == "ssd" and not attached:
            return ssd_detections(dict(zip(output_names, outputs)), post, anchors)
        return postprocessed_detections(*outputs)

    return predict
