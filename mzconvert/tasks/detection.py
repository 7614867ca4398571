"""Detection outputs: SSD decode, NMS, the rows of a post-processor, and matching two models' detections.

Detection outputs are decoded here exactly as the stripped-off TF post-processor did: the SSD
anchors exported by strip, the Faster R-CNN box coder with the recipe's scales, sigmoid scores,
per-class NMS; boxes are normalised, so they map back to the original image by its size.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, InputError, MzError, short_text
from ..preprocess import letterbox_geometry
from ..quant.ranges import SIGMOID_BOUND
from ..recipe import Postprocess, Preprocess
from ..recipe.schema import AnchorLevel
from .keypoints import decoded_keypoints
from .masks import InstanceMasks, instance_masks
from .oriented import probiou, rotated_bounds, rotated_corners, rotated_nms, rotated_on_image


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # K x 4, ymin, xmin, ymax, xmax, normalised
    scores: np.ndarray  # K
    labels: np.ndarray  # K, index into recipe.postprocess.labels
    cells: np.ndarray | None = None  # K, the head's cell (anchor) each came from, where decoded here
    masks: InstanceMasks | None = None  # a segmentation head's: the K masks
    keypoints: np.ndarray | None = None  # a pose head's: K x points x (x, y normalised as boxes, visibility)
    # an oriented-box head's: K x (centre x, y, width, height in the pixels of the frame the boxes are normalised
    # to, angle in radians); its boxes are then each rotated box's axis-aligned bounds
    rotated: np.ndarray | None = None


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


def decode_ssd_boxes(encodings: np.ndarray, anchors: np.ndarray, scales, coding: str = "exponential",
                     order: str = "yxhw") -> np.ndarray:
    """Box encodings relative to anchors -> (ymin, xmin, ymax, xmax). `coding` exponential: TF's Faster R-CNN
    box coder (sizes as exp(t / scale) x anchor size); linear: MediaPipe's TensorsToDetections default (t / scale
    x anchor size). `order`: the encodings' (yxhw, or MediaPipe's reverse_output_order xywh); scales are
    (y, x, h, w) either way."""
    if order == "xywh":
        encodings = encodings[:, [1, 0, 3, 2]]
    ty, tx, th, tw = (encodings[:, i] / scales[i] for i in range(4))
    ya, xa = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    ha, wa = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    yc, xc = ty * ha + ya, tx * wa + xa
    size = np.exp if coding == "exponential" else (lambda t: t)
    h, w = size(th) * ha, size(tw) * wa
    return np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], axis=1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, limit: int) -> np.ndarray:
    """Greedy non-maximum suppression; indices of kept boxes, best first. Candidates are taken in blocks of
    NMS_BLOCK in score order, each first checked against the boxes kept so far, then greedily among
    themselves: the same boxes as one at a time, and only as many blocks as it takes to keep `limit`."""
    order = np.argsort(-scores, kind="stable")
    areas = _areas(boxes)
    keep: list[int] = []
    for start in range(0, order.size, NMS_BLOCK):
        block = order[start:start + NMS_BLOCK]
        if keep:
            block = block[(_iou(boxes, areas, np.asarray(keep)[None, :], block[:, None]) <= iou_threshold).all(1)]
        while block.size and len(keep) < limit:
            best, block = block[0], block[1:]
            keep.append(best)
            block = block[_iou(boxes, areas, best, block) <= iou_threshold]
        if len(keep) >= limit:
            break
    return np.asarray(keep, dtype=np.int64)


NMS_BLOCK = 256


def _areas(boxes: np.ndarray) -> np.ndarray:
    """Each (ymin, xmin, ymax, xmax) box's area, 0 where its sides cross."""
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _iou(boxes: np.ndarray, areas: np.ndarray, kept, others) -> np.ndarray:
    """IoU of the boxes indexed `kept` with those indexed `others` (broadcast)."""
    top_left = np.maximum(boxes[kept, :2], boxes[others, :2])
    bottom_right = np.minimum(boxes[kept, 2:], boxes[others, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=-1)
    return inter / np.maximum(areas[kept] + areas[others] - inter, 1e-12)


def ssd_detections(outputs: dict[str, np.ndarray], post: Postprocess, anchors: np.ndarray) -> Detections:
    # a head may encode more than the box per anchor (BlazeFace: 4 box values, then 6 keypoints): the box first
    encodings = outputs[post.box_output].reshape(anchors.shape[0], -1)[:, :4]
    scores = ssd_scores(outputs[post.class_output].reshape(encodings.shape[0], -1), post)
    if scores.shape[1] != len(post.labels):
        raise InputError(f"the model scores {scores.shape[1]} classes but the recipe has {len(post.labels)} labels")
    boxes = decode_ssd_boxes(encodings, anchors, post.box_coder_scales, post.box_coding, post.box_order)
    # NMS first, clip after, as TF does
    return SUPPRESSIONS[post.nms_algorithm](boxes, scores, post)


def ssd_scores(logits: np.ndarray, post: Postprocess) -> np.ndarray:
    """An ssd head's class logits (classes last) as its classes' scores: sigmoid or softmax, the background's
    column dropped."""
    if post.score == "sigmoid":
        with np.errstate(over="ignore"):  # a logit far below 0 (MediaPipe's face detector: -29776) scores 0
            scores = 1 / (1 + np.exp(-logits))
    else:
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = exp / exp.sum(axis=-1, keepdims=True)
    return scores[..., 1:] if post.background_class else scores


def _selected(boxes: np.ndarray, scores: np.ndarray, post: Postprocess) -> Detections:
    """Per-class NMS of normalised boxes (N x 4) by their class scores (N x classes), the best first, at most
    max_detections: as TFLite_Detection_PostProcess's regular NMS. One greedy pass over every (box, class)
    above the threshold in score order, each class's boxes moved apart from the others' so that only its own
    suppress them: the same detections as one NMS per class (ties: lower class, then lower box index, first),
    and it stops at max_detections kept (a YOLO head at eval's 0.001 threshold has thousands of candidates in
    each of 80 classes: one NMS per class took 0.14 s an image, this 0.007 s)."""
    labels, index = np.nonzero(scores.T > post.nms_score_threshold)  # class-major, boxes in order
    if not index.size:
        return Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64))
    chosen = scores[index, labels]
    span = 2 * float(np.abs(boxes[index]).max()) + 1
    apart = boxes[index].astype(np.float64) + (labels * span)[:, None]
    kept = nms(apart, chosen, post.nms_iou_threshold, post.max_detections)
    return Detections(np.clip(boxes[index[kept]], 0.0, 1.0), chosen[kept], labels[kept].astype(np.int64),
                      index[kept])


def _selected_weighted(boxes: np.ndarray, scores: np.ndarray, post: Postprocess) -> Detections:
    """MediaPipe's weighted NMS (its detector graphs' NonMaxSuppressionCalculator, algorithm WEIGHTED): each box
    with its best class, where that scores above the threshold, in score order whatever the class; the best box
    left takes every box left whose IoU with it exceeds the threshold (itself among them) and is their mean,
    weighted by their scores, with its own score, class and anchor; the others go on. At most max_detections.
    Where a box overlaps none (not even itself: no area) MediaPipe stops, and so does this."""
    labels = scores.argmax(axis=1)
    best = scores[np.arange(scores.shape[0]), labels]
    above = np.nonzero(best > post.nms_score_threshold)[0]
    left = above[np.argsort(-best[above], kind="stable")]
    areas = _areas(boxes)
    kept, merged = [], []
    while left.size and len(kept) < post.max_detections:
        taken = _iou(boxes, areas, left[0], left) > post.nms_iou_threshold
        kept.append(left[0])
        if not taken.any():  # a box without area: kept as it is, and the last
            merged.append(boxes[left[0]])
            break
        members = left[taken]
        merged.append((boxes[members] * best[members, None]).sum(axis=0) / best[members].sum())
        left = left[~taken]
    kept = np.asarray(kept, dtype=np.int64)
    return Detections(np.clip(np.asarray(merged, np.float64).reshape(-1, 4), 0.0, 1.0), best[kept],
                      labels[kept].astype(np.int64), kept)


# postprocess.nms_algorithm -> the suppression an ssd head's boxes go through
SUPPRESSIONS = {"greedy": _selected, "weighted": _selected_weighted}


def _selected_rotated(rotated: np.ndarray, scores: np.ndarray, post: Postprocess,
                      input_hw: tuple[int, int]) -> Detections:
    """An oriented-box head's detections (rotated: N x 5 centre x, y, width, height in input pixels, angle; scores:
    N x classes): every (box, class) above the threshold, suppressed as Ultralytics' NMS suppresses rotated boxes
    (oriented.rotated_nms), the best max_detections; each detection's box the rotated box's bounds."""
    labels, index = np.nonzero(scores.T > post.nms_score_threshold)
    chosen = scores[index, labels]
    kept = rotated_nms(rotated[index], chosen, labels, post.nms_iou_threshold, post.max_detections)
    boxes = rotated[index[kept]]
    return Detections(_centre_boxes(rotated_bounds(boxes), input_hw), chosen[kept], labels[kept].astype(np.int64),
                      index[kept], rotated=boxes)


def _yolo_output(outputs: list[np.ndarray], by_name: dict, post: Postprocess) -> np.ndarray:
    """The head's one output; for a head cut before its Concat, the two parts joined as the export joins them."""
    if post.box_output:
        boxes, scores = by_name[post.box_output], by_name[post.class_output]
        return np.concatenate([boxes.reshape(4, -1), scores.reshape(-1, boxes.size // 4)])
    return by_name[post.output] if post.output else outputs[0]


def _check_classes(found: int, post: Postprocess) -> None:
    if found != len(post.labels):
        raise InputError(f"the model scores {found} classes but the recipe has {len(post.labels)} labels")


def _centre_boxes(xywh: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """Box centres and sizes in input pixels (x, y, w, h) as normalised (ymin, xmin, ymax, xmax)."""
    height, width = input_hw
    x, y, w, h = (xywh[:, i] for i in range(4))
    return np.stack([(y - h / 2) / height, (x - w / 2) / width, (y + h / 2) / height, (x + w / 2) / width], axis=1)


def head_grid(input_hw: tuple[int, int], count: int, strides: tuple[int, ...] | None) -> np.ndarray:
    """(N, 3): the centre x, y of each of a YOLOv8 head's N cells, in strides, and its stride, level by level,
    rows then columns (Ultralytics' make_anchors). Without `strides`, the one run of doubling strides (from 8,
    16, 32 or 64, up to 5 levels) whose grids over the input have N cells."""
    height, width = input_hw

    def cells(levels) -> int:
        return sum(-(-height // s) * -(-width // s) for s in levels)

    if strides is None:
        runs = [tuple(first * 2 ** k for k in range(n)) for first in (8, 16, 32, 64) for n in range(1, 6)]
        fitting = [run for run in runs if cells(run) == count]
        if len(fitting) != 1:
            raise InputError(f"a head of {count} cells over a {height}x{width} input: no one run of strides fits "
                             "it; declare postprocess.strides")
        strides = fitting[0]
    if cells(strides) != count:
        raise InputError(f"postprocess.strides {list(strides)} grid a {height}x{width} input into "
                         f"{cells(strides)} cells; the head has {count}")
    grids = []
    for s in strides:
        ys, xs = np.meshgrid(np.arange(-(-height // s)) + 0.5, np.arange(-(-width // s)) + 0.5, indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, s, np.float64)], axis=1))
    return np.concatenate(grids)


def dfl_distances(logits: np.ndarray) -> np.ndarray:
    """A YOLOv8 box branch before its DFL, [4 x bins, N], as its DFL makes it: [4, N], each side's distance (left,
    top, right, bottom) from its cell's centre, in strides, the expectation of a softmax over 0 .. bins - 1."""
    count = logits.shape[-1]
    bins = logits.reshape(4, -1, count).astype(np.float64)
    weights = np.exp(bins - bins.max(axis=1, keepdims=True))
    return (weights * np.arange(bins.shape[1])[None, :, None]).sum(1) / weights.sum(1)


def grid_boxes(distances: np.ndarray, input_hw: tuple[int, int], strides: tuple[int, ...] | None,
               angles: np.ndarray | None = None) -> np.ndarray:
    """[4, N] distances (left, top, right, bottom) from each cell's centre, in strides, as an Ultralytics head's
    own decode makes them boxes (dist2bbox, times the stride): N x 4 centre x, y, width, height in input pixels.
    With `angles` (N, radians: an oriented-box head's) as its dist2rbox: the centre's offset from the cell's
    rotated by each box's angle."""
    left, top, right, bottom = distances.reshape(4, -1).astype(np.float64)
    x, y, stride = head_grid(input_hw, left.size, strides).T
    dx, dy = (right - left) / 2, (bottom - top) / 2
    if angles is not None:
        cos, sin = np.cos(angles), np.sin(angles)
        dx, dy = dx * cos - dy * sin, dx * sin + dy * cos
    return np.stack([(x + dx) * stride, (y + dy) * stride, (left + right) * stride, (top + bottom) * stride], axis=1)


def dfl_boxes(logits: np.ndarray, input_hw: tuple[int, int], strides: tuple[int, ...] | None) -> np.ndarray:
    """A YOLOv8 box branch before its DFL, [4 x bins, N], as the export's own decode makes it: N x 4 centre x, y,
    width and height in input pixels."""
    return grid_boxes(dfl_distances(logits), input_hw, strides)


def head_boxes(values: np.ndarray, post: Postprocess, input_hw: tuple[int, int],
               angles: np.ndarray | None = None) -> np.ndarray:
    """A yolov8 head's box_output of one image cut before its decode (box_encoding dfl or distances) as the export
    decodes it: N x 4 centre x, y, width, height in input pixels (an oriented-box head's rotated by `angles`)."""
    count = values.shape[-1]
    distances = dfl_distances(values.reshape(-1, count)) if post.box_encoding == "dfl" else values.reshape(4, count)
    return grid_boxes(distances, input_hw, post.strides, angles)


def judged_outputs(name: str, reference: np.ndarray, candidate: np.ndarray, post: Postprocess | None,
                   input_hw: tuple[int, int], outputs: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, int | None]:
    """An output of the float model and of a variant (images first) as what they mean, where that is not the raw
    tensor, and the axis of one image's judged output whose slices mean one thing each (None: signal.slice_axis
    finds it): the distribution logits of a head cut before its DFL, or the distances of one cut before its grid
    decode, as the boxes they decode to (images x 1 x 4 x N, centre and size in input pixels, as the export's own
    box output); a YOLOv5 level's box logits as its boxes (images x 4 x N) and its score logits as the class
    scores (images x classes x N); a YOLO or query head's class probabilities (and YOLOv5's objectness) only where
    either model scores MATCH_SCORE or more, the scores a person is shown (8-bit probabilities of a class no image
    holds round to 0 and 1/256: noise a trained detector's rare classes would be judged by, where no detection
    changes); an ssd head's class logits whose int8 range stops at a sigmoid's band (Postprocess.sigmoid_read_outputs)
    as the scores they decode to, shown likewise (beyond the band a logit's error moves no score a person sees),
    and its other outputs of values per anchor (boxes, keypoints) at the anchors whose score either model shows,
    given both models' `outputs` ({name: (reference, candidate)}): a box or keypoint where nothing is detected
    is never seen (MediaPipe's face detector: box offsets of -11000 on a COCO image without a face, where the
    calibration images reached -47). Else the outputs as they are."""
    bounded_ssd = post is not None and post.kind == "ssd" and post.sigmoid_read_outputs
    if bounded_ssd and name in post.sigmoid_read_outputs:
        return (*_shown(*(ssd_scores(v.astype(np.float64), post) for v in (reference, candidate))), None)
    if bounded_ssd and outputs and post.class_output in outputs:
        scores = (ssd_scores(v.astype(np.float64), post) for v in outputs[post.class_output])
        shown = np.max(np.maximum(*scores), axis=-1) >= MATCH_SCORE
        shown = shown.reshape(shown.shape[0], -1)  # images x anchors
        if reference[0].size % shown.shape[1] == 0:
            return (*(np.where(shown[:, :, None], v.reshape(*shown.shape, -1), 0).reshape(v.shape)
                      for v in (reference, candidate)), None)
    if post is None or post.kind not in ("yolov8", "yolov5", "detr"):
        return reference, candidate, None
    if post.box_encoding != "pixels" and name == post.box_output:
        return (*(np.stack([head_boxes(v, post, input_hw).T[None] for v in values])
                  for values in (reference, candidate)), None)
    for level in post.levels:
        if name in level.parts:
            decode = level_boxes if name == level.parts[0] else _level_class_scores
            reference, candidate = (np.stack([decode(v, level, input_hw).T for v in values])
                                    for values in (reference, candidate))
            return (reference, candidate, 0) if name == level.parts[0] else (*_shown(reference, candidate), 0)
    if name == post.class_output:
        return (*_shown(reference, candidate), None)
    if post.class_output is None and post.output in (None, name):  # the one output: its score columns
        return (*_shown(reference, candidate, np.s_[..., 4:, :] if post.kind == "yolov8" else np.s_[..., 4:]), None)
    return reference, candidate, None


def tuning_weights(outputs: dict[str, np.ndarray], post: Postprocess | None,
                   input_hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """What weight tuning (quant/tuning.py) gives each value of the float model's `outputs` of one image, where not
    all alike. A box counts only where its cell or anchor detects something: a yolov8 head cut before its box
    decode, its box values at each cell by the cell's best class probability (on NudeNet's YOLOv8n, a one-off
    trial in docs/results.md: tuned to the unweighted error, 87.5 % of the boxes at the cells float32 scores 0.3
    or more kept IoU >= 0.9 with float32's, 88.8 % untuned; to this one, 91.9 %); a yolov5 level's box logits and
    an ssd head's values per anchor (boxes, keypoints) beside bounded class logits likewise, by the best score of
    their anchor. A logit read through a sigmoid whose int8 range stops at its band (Postprocess.
    sigmoid_read_outputs) counts only where the float model's is within it: beyond, int8 holds it at the band's
    edge, where no score moves and no weight can take it (its error there would only swamp the rest)."""
    if post is None:
        return {}
    if post.kind == "yolov8":
        if post.box_encoding == "pixels" or post.class_output not in outputs or post.box_output not in outputs:
            return {}
        return {post.box_output: outputs[post.class_output].max(axis=-2, keepdims=True)}
    weights = {name: (np.abs(outputs[name]) <= SIGMOID_BOUND).astype(np.float32)
               for name in post.sigmoid_read_outputs if name in outputs}
    if post.kind == "yolov5":
        for level in post.levels:
            boxes, scores = level.parts
            if boxes in weights and scores in outputs:  # channels: anchor by anchor its x, y, w, h; then cells
                best = _level_class_scores(outputs[scores], level, input_hw).max(axis=1)
                by_anchor = np.repeat(best.reshape(len(level.anchors) // 2, 1, -1), 4, axis=1)
                weights[boxes] = weights[boxes] * by_anchor.reshape(outputs[boxes].shape)
    elif post.kind == "ssd" and post.class_output in weights:  # anchor by anchor its values
        best = ssd_scores(outputs[post.class_output].astype(np.float64), post).max(axis=-1).reshape(-1, 1)
        for name, values in outputs.items():
            if name != post.class_output and values.size % best.size == 0:
                weights[name] = np.repeat(best, values.size // best.size, axis=1).reshape(values.shape)
    return weights


def _shown(reference: np.ndarray, candidate: np.ndarray, scores=np.s_[...]) -> tuple[np.ndarray, np.ndarray]:
    """Both models' values with the scores (`scores`, an index into them) that neither gives MATCH_SCORE set to 0."""
    judged = np.zeros(reference.shape, bool)
    judged[scores] = True
    hidden = judged & (np.maximum(reference, candidate) < MATCH_SCORE)
    return np.where(hidden, 0.0, reference), np.where(hidden, 0.0, candidate)


def yolov8_detections(outputs, by_name, post: Postprocess, anchors, input_hw) -> Detections:
    """Ultralytics YOLOv8 / YOLO11 / YOLO26 exports: [1, 4 + classes, N], box centre and size in input pixels (the
    DFL decode inside the export), then each class's probability; or cut before the DFL (box_encoding dfl), the
    box branch's distribution logits decoded here, or before the grid decode of a head without a DFL
    (box_encoding distances), its distances from each cell's centre decoded here (head_boxes). An oriented-box
    head's (postprocess.angles) boxes are rotated by its angles and suppressed as rotated boxes."""
    if post.box_encoding != "pixels" or post.angles:
        probabilities = by_name[post.class_output]
        probabilities = probabilities.reshape(-1, probabilities.shape[-1])
        _check_classes(probabilities.shape[0], post)
        if post.angles:  # the export's own rotated boxes where cut after their decode (pixels)
            angles = by_name[post.angles].reshape(-1).astype(np.float64)
            boxes = by_name[post.box_output].reshape(4, -1).T.astype(np.float64) if post.box_encoding == "pixels" \
                else head_boxes(by_name[post.box_output], post, input_hw, angles)
            return _selected_rotated(np.column_stack([boxes, angles]), probabilities.T, post, input_hw)
        boxes = head_boxes(by_name[post.box_output], post, input_hw)
        found = _selected(_centre_boxes(boxes, input_hw), probabilities.T, post)
        if post.mask_coefficients:
            found = replace(found, masks=instance_masks(by_name[post.mask_coefficients],
                                                        by_name[post.mask_prototypes], found.cells, found.boxes,
                                                        input_hw))
        if post.keypoints:
            grid = head_grid(input_hw, probabilities.shape[-1], post.strides)
            found = replace(found, keypoints=decoded_keypoints(by_name[post.keypoints], post.keypoint_shape,
                                                               post.keypoint_encoding, grid, found.cells, input_hw))
        return found
    out = _yolo_output(outputs, by_name, post)
    rows = out.reshape(-1, out.shape[-1])
    _check_classes(rows.shape[0] - 4, post)
    return _selected(_centre_boxes(rows[:4].T, input_hw), rows[4:].T, post)


def _level_grid(level: AnchorLevel, input_hw: tuple[int, int], values: np.ndarray, per_anchor: int | None):
    """A level's logits as (anchors, per_anchor, rows, columns) sigmoids, and its anchor sizes (anchors x 2)."""
    rows, columns = (-(-side // level.stride) for side in input_hw)
    anchors = np.asarray(level.anchors, np.float64).reshape(-1, 2)
    cells = anchors.shape[0] * rows * columns
    if values.size % cells or (per_anchor is not None and values.size != cells * per_anchor):
        raise InputError(f"postprocess.levels: {level.output} holds {values.size} values, not {anchors.shape[0]} "
                         f"anchors x {rows} x {columns} cells (stride {level.stride} over {input_hw[0]}x"
                         f"{input_hw[1]}) x {per_anchor or 'the channels of each'}")
    logits = values.astype(np.float64).reshape(anchors.shape[0], -1, rows, columns)
    return 1 / (1 + np.exp(-logits)), anchors


def level_boxes(logits: np.ndarray, level: AnchorLevel, input_hw: tuple[int, int]) -> np.ndarray:
    """A YOLOv5 level's box logits (anchors x 4 channels, rows, columns) as the export decodes them: N x 4
    centre x, y and width, height in input pixels, N in the export's order (anchor, row, column); the centre
    (2 sigmoid - 0.5 + cell) x stride, the size (2 sigmoid) ** 2 x the anchor's."""
    t, anchors = _level_grid(level, input_hw, logits, 4)
    ys, xs = np.meshgrid(np.arange(t.shape[2]), np.arange(t.shape[3]), indexing="ij")
    boxes = [(t[:, 0] * 2 - 0.5 + xs) * level.stride, (t[:, 1] * 2 - 0.5 + ys) * level.stride,
             (t[:, 2] * 2) ** 2 * anchors[:, 0, None, None], (t[:, 3] * 2) ** 2 * anchors[:, 1, None, None]]
    return np.stack(boxes, axis=-1).reshape(-1, 4)


def level_scores(logits: np.ndarray, level: AnchorLevel, input_hw: tuple[int, int]) -> np.ndarray:
    """A YOLOv5 level's score logits (anchors x (1 + classes) channels) as N x (1 + classes) probabilities:
    objectness, then each class's."""
    t, _ = _level_grid(level, input_hw, logits, None)
    return t.transpose(0, 2, 3, 1).reshape(-1, t.shape[1])


def _level_class_scores(logits: np.ndarray, level: AnchorLevel, input_hw: tuple[int, int]) -> np.ndarray:
    """N x classes: objectness x each class's probability, the scores YOLOv5's detections carry."""
    probabilities = level_scores(logits, level, input_hw)
    return probabilities[:, 1:] * probabilities[:, :1]


def yolov5_detections(outputs, by_name, post: Postprocess, anchors, input_hw) -> Detections:
    """Ultralytics YOLOv5 exports: [1, N, 5 + classes], box centre and size in input pixels, objectness, then
    each class's probability; a class's score is objectness x its probability. Or cut at its levels' split
    Convs (postprocess.levels): boxes and scores decoded here from their logits, as the export decodes them."""
    if post.levels:
        boxes = np.concatenate([level_boxes(by_name[level.parts[0]], level, input_hw) for level in post.levels])
        scores = np.concatenate([_level_class_scores(by_name[level.parts[1]], level, input_hw)
                                 for level in post.levels])
        _check_classes(scores.shape[1], post)
        return _selected(_centre_boxes(boxes, input_hw), scores, post)
    out = _yolo_output(outputs, by_name, post)
    rows = out.reshape(-1, out.shape[-1])
    _check_classes(rows.shape[1] - 5, post)
    return _selected(_centre_boxes(rows[:, :4], input_hw), rows[:, 5:] * rows[:, 4:5], post)


def detr_detections(outputs, by_name, post: Postprocess, anchors, input_hw) -> Detections:
    """A query detector's head (Ultralytics' RT-DETR export, cut before its own TopK): each of Q queries' box,
    [1, Q, 4] centre x, y, width and height normalised to the input, and its classes' probabilities [1, Q,
    classes]; selected as the export selects them (the best max_detections (query, class) pairs, none suppressed
    where nms_iou_threshold is 1.0)."""
    boxes = by_name[post.box_output].reshape(-1, 4).astype(np.float64)
    probabilities = by_name[post.class_output].reshape(boxes.shape[0], -1)
    _check_classes(probabilities.shape[1], post)
    return _selected(_centre_boxes(boxes, (1, 1)), probabilities, post)  # already normalised to the input


def _ssd(outputs, by_name, post: Postprocess, anchors, input_hw) -> Detections:
    return ssd_detections(by_name, post, anchors)


# postprocess.kind -> the decode of a model's raw outputs (what the stripped or exported graph leaves to us)
RAW_DECODERS = {"ssd": _ssd, "yolov8": yolov8_detections, "yolov5": yolov5_detections, "detr": detr_detections}


def raw_detections(outputs: list[np.ndarray], names: list[str] | None, post: Postprocess, anchors,
                   input_hw: tuple[int, int]) -> Detections:
    """Detections decoded from a model's raw outputs as the recipe's postprocess.kind says, boxes normalised to
    the model's input."""
    return RAW_DECODERS[post.kind](outputs, dict(zip(names or [], outputs)), post, anchors, input_hw)


def on_image(detections: Detections, size: tuple[int, int], preprocess: Preprocess) -> Detections:
    """Detections with boxes normalised to the model's input as boxes normalised to the original image of
    `size` (width, height): the same numbers, unless the image was letterboxed into the input."""
    masks = detections.masks
    if detections.rotated is not None:
        detections = replace(detections, rotated=rotated_on_image(detections.rotated, size, preprocess))
    if not preprocess.letterbox:  # the image fills the input
        return detections if masks is None else replace(detections, masks=masks.placed((0, 0, *masks.input_hw), size))
    height, width = preprocess.resize
    new_width, new_height, left, top, gain = letterbox_geometry(size[0], size[1], height, width)
    ymin, xmin, ymax, xmax = (detections.boxes[:, i] for i in range(4))
    ys = [(v * height - top) / gain / size[1] for v in (ymin, ymax)]
    xs = [(v * width - left) / gain / size[0] for v in (xmin, xmax)]
    boxes = np.clip(np.stack([ys[0], xs[0], ys[1], xs[1]], axis=1), 0.0, 1.0) if len(detections.boxes) else \
        detections.boxes
    keypoints = detections.keypoints
    if keypoints is not None:
        keypoints = keypoints.copy()
        keypoints[..., 0] = (keypoints[..., 0] * width - left) / gain / size[0]
        keypoints[..., 1] = (keypoints[..., 1] * height - top) / gain / size[1]
    return replace(detections, boxes=boxes, keypoints=keypoints,
                   masks=None if masks is None else masks.placed((top, left, new_height, new_width), size))


def postprocessed_detections(boxes, classes, scores, count, class_offset: int = 0) -> Detections:
    """Post-processed outputs (TFLite_Detection_PostProcess, a TF OD API graph): the first `count` rows;
    class ids minus `class_offset` are indices into the recipe's labels."""
    boxes, classes, scores = (np.asarray(o).reshape(-1, *np.asarray(o).shape[2:]) for o in (boxes, classes, scores))
    n = int(np.asarray(count).ravel()[0])
    return Detections(np.clip(boxes[:n], 0, 1), scores[:n], np.rint(classes[:n]).astype(np.int64) - class_offset)


def coco_results(image_id: int, detections: Detections, size: tuple[int, int], post: Postprocess) -> list[dict]:
    """COCO result rows of an image's detections; with masks, each its mask as COCO's run-length encoding (with
    rotated boxes, each's polygon so); with keypoints, each's points as x, y in image pixels and the head's
    visibility (1 where it has none)."""
    from pycocotools import mask as coco_mask

    width, height = size
    polygons = rotated_corners(detections.rotated).reshape(-1, 8).tolist() if detections.rotated is not None else []
    rows = []
    for k, ((ymin, xmin, ymax, xmax), score, label) in enumerate(zip(detections.boxes, detections.scores,
                                                                    detections.labels)):
        rows.append({"image_id": image_id, "category_id": post.category_ids[int(label)], "score": float(score),
                     "bbox": [float(xmin * width), float(ymin * height),
                              float((xmax - xmin) * width), float((ymax - ymin) * height)]})
        if detections.masks is not None:
            rows[-1]["segmentation"] = coco_mask.encode(np.asfortranarray(detections.masks.on_image(k), np.uint8))
        if polygons:
            rows[-1]["segmentation"] = coco_mask.merge(coco_mask.frPyObjects([polygons[k]], height, width))
        if detections.keypoints is not None:
            points = detections.keypoints[k]
            visibility = points[:, 2] if points.shape[1] == 3 else np.ones(points.shape[0])
            rows[-1]["keypoints"] = np.stack([points[:, 0] * width, points[:, 1] * height, visibility],
                                             axis=1).ravel().tolist()
    return rows


MATCH_IOU = 0.9


MATCH_SCORE = 0.3  # detections a person would be shown


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[..., 2:] - boxes[..., :2], 0, None), axis=-1)


def matched_detections(a: Detections, b: Detections, min_score: float = MATCH_SCORE) -> tuple[int, int]:
    """(matched, total) over the detections of a and of b scoring >= min_score: each counts as matched
    when the other set has one of the same label with IoU >= MATCH_IOU (at any score)."""
    matched = total = 0
    for mine, theirs in ((a, b), (b, a)):
        shown = mine.scores >= min_score
        for box, label in zip(_compared_boxes(mine)[shown], mine.labels[shown]):
            total += 1
            matched += int(_same_object(box, label, theirs) is not None)
    return matched, total


def _compared_boxes(detections: Detections) -> np.ndarray:
    """What two models' detections are matched by: rotated boxes where the head gives them, else the boxes."""
    return detections.boxes if detections.rotated is None else detections.rotated


def _same_object(box: np.ndarray, label: int, theirs: Detections) -> int | None:
    """The index of the detection of `theirs` of the same label whose box overlaps `box` most, where that is
    IoU >= MATCH_IOU (the very same box matches itself even where it has no area: a head's box clipped to
    nothing); else None. Rotated boxes (`box` then one of Detections.rotated) overlap by their probiou."""
    same = np.flatnonzero(theirs.labels == label)
    if not same.size:
        return None
    if theirs.rotated is not None:
        boxes = theirs.rotated[same]
        iou = probiou(box[None], boxes)
    else:
        boxes = theirs.boxes[same]
        top_left = np.maximum(box[:2], boxes[:, :2])
        bottom_right = np.minimum(box[2:], boxes[:, 2:])
        inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=1)
        iou = inter / np.maximum(_area(box) + _area(boxes) - inter, 1e-12)
    best = int(np.argmax(iou))
    if iou[best] >= MATCH_IOU:
        return int(same[best])
    identical = np.flatnonzero(np.all(boxes == box, axis=1))
    return int(same[identical[0]]) if identical.size else None


def matched_pairs(reference: Detections, candidate: Detections) -> list[tuple[int, int]]:
    """(k, j) for each detection k of the reference scoring >= MATCH_SCORE and the candidate's detection j it
    matches (matched_detections' rule): where their masks and keypoints are compared."""
    pairs = []
    for k in np.flatnonzero(reference.scores >= MATCH_SCORE):
        if (j := _same_object(_compared_boxes(reference)[k], reference.labels[k], candidate)) is not None:
            pairs.append((int(k), j))
    return pairs
