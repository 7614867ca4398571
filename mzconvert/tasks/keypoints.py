"""Keypoints of a pose head (YOLOv8-pose and its kin): decoded as Ultralytics' head decodes them, and a variant's
judged against the float model's by the object keypoint similarity (OKS) Ultralytics validates with.

A head cut before its keypoint decode (keypoint_encoding grid) gives, per cell, each point's x, y offsets in
strides and its visibility logit: x, y = (2 t + the cell's centre - 0.5) x stride, visibility = sigmoid(t). One
cut after it (pixels) gives those values already.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError

# COCO's 17 keypoints' scales (Ultralytics' OKS_SIGMA); another skeleton's points weigh 1 / points each, as its
# validator weighs them
COCO_KEYPOINT_SIGMAS = np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87,
                                 0.87, 0.89, 0.89]) / 10
VISIBLE = 0.5  # a point shown and judged: its visibility probability at least this


def keypoint_sigmas(shape: tuple[int, int]) -> np.ndarray:
    """The per-point scales OKS weighs distances by, for a head's (points, values): COCO's for its 17 points with
    visibility, 1 / points otherwise (as Ultralytics' pose validator)."""
    points = shape[0]
    return COCO_KEYPOINT_SIGMAS if tuple(shape) == (17, 3) else np.full(points, 1 / points)


def decoded_keypoints(values: np.ndarray, shape: tuple[int, int], encoding: str, grid: np.ndarray,
                      cells: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
    """K x points x values: the keypoints of the head's `cells`, x and y normalised to the input (as boxes are),
    then the visibility probability where the head has one. `values`: the head's output of one image, [points x
    values, N] (or [N, points x values]); `grid`: head_grid's (N, 3) cell centres and strides."""
    points, per_point = shape
    count = grid.shape[0]
    if values.size != count * points * per_point:
        raise InputError(f"postprocess.keypoints: {values.size} values, not {points} x {per_point} for each of "
                         f"{count} cells")
    rows = values.reshape(-1, count) if values.shape[-1] == count else values.reshape(count, -1).T
    chosen = rows[:, cells].reshape(points, per_point, -1).astype(np.float64)  # points, values, K
    xy = chosen[:, :2]
    if encoding == "grid":
        xy = (xy * 2 + grid[cells, :2].T[None] - 0.5) * grid[cells, 2][None, None]
    height, width = input_hw
    decoded = [xy[:, 0] / width, xy[:, 1] / height]
    if per_point == 3:
        decoded.append(1 / (1 + np.exp(-chosen[:, 2])) if encoding == "grid" else chosen[:, 2])
    return np.stack(decoded, axis=-1).transpose(1, 0, 2)


def keypoint_similarity(reference: np.ndarray, candidate: np.ndarray, box: np.ndarray,
                        input_hw: tuple[int, int]) -> float | None:
    """OKS of a candidate's keypoints (points x values, normalised) against a reference's, over the points the
    reference shows (all where it has no visibility), as Ultralytics' kpt_iou: exp(-d^2 / (8 sigma^2 area)) with
    area 0.53 x the reference's box (ymin, xmin, ymax, xmax normalised), in input pixels. None where it shows none."""
    height, width = input_hw
    scale = np.array([width, height])
    distance = (((reference[:, :2] - candidate[:, :2]) * scale) ** 2).sum(-1)
    points = reference.shape[0]
    sigmas = keypoint_sigmas(reference.shape)
    area = (box[2] - box[0]) * height * (box[3] - box[1]) * width * 0.53
    shown = reference[:, 2] >= VISIBLE if reference.shape[1] == 3 else np.ones(points, bool)
    if not shown.any():
        return None
    return float(np.exp(-distance / ((2 * sigmas) ** 2 * (area + 1e-7) * 2))[shown].mean())
