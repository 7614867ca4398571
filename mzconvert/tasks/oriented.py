"""Oriented boxes of an obb head (Ultralytics' obb task): each a centre x, y, width, height and angle (radians),
suppressed and matched by their probabilistic IoU as Ultralytics' NMS and validator do, their bounds and corners,
and mapped back from the letterbox."""

from __future__ import annotations

import numpy as np

from ..preprocess import letterbox_geometry
from ..recipe import Preprocess

# rotated boxes taken at a time in rotated_nms: each block's overlaps with every better box are one array
ROTATED_NMS_BLOCK = 256


def probiou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The probabilistic IoU of rotated boxes (centre x, y, width, height, angle; ... x 5, broadcast) as Ultralytics
    suppresses and validates oriented boxes by (its batch_probiou: 1 - the Hellinger distance of the boxes' Gaussians,
    each a uniform distribution's over the box)."""
    def covariance(boxes):
        a, b = boxes[..., 2] ** 2 / 12, boxes[..., 3] ** 2 / 12
        cos, sin = np.cos(boxes[..., 4]), np.sin(boxes[..., 4])
        return a * cos ** 2 + b * sin ** 2, a * sin ** 2 + b * cos ** 2, (a - b) * cos * sin

    eps = 1e-7
    (a1, b1, c1), (a2, b2, c2) = covariance(a), covariance(b)
    dx, dy = a[..., 0] - b[..., 0], a[..., 1] - b[..., 1]
    determinant = (a1 + a2) * (b1 + b2) - (c1 + c2) ** 2
    t1 = ((a1 + a2) * dy ** 2 + (b1 + b2) * dx ** 2) / (determinant + eps) * 0.25
    t2 = ((c1 + c2) * -dx * dy) / (determinant + eps) * 0.5
    t3 = np.log(determinant / (4 * np.sqrt(np.clip(a1 * b1 - c1 ** 2, 0, None) * np.clip(a2 * b2 - c2 ** 2, 0, None))
                               + eps) + eps) * 0.5
    distance = np.clip(t1 + t2 + t3, eps, 100.0)
    return 1 - np.sqrt(1.0 - np.exp(-distance) + eps)


def rotated_nms(rotated: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float,
                limit: int) -> np.ndarray:
    """Indices of the rotated boxes (N x 5) kept, best first, as Ultralytics' NMS keeps them: each label's boxes
    moved apart from the others', and a box dropped where any better one overlaps it by more than iou_threshold
    (probiou; its "fast NMS": the better one counts even where it is dropped itself); at most `limit`. Taken in
    blocks of ROTATED_NMS_BLOCK in score order, only as many as it takes to keep `limit`."""
    order = np.argsort(-scores, kind="stable")
    apart = rotated[order].astype(np.float64)
    apart[:, :2] += (labels[order] * (2 * float(np.abs(rotated[:, :4]).max(initial=0)) + 1))[:, None]
    kept: list[int] = []
    for start in range(0, len(order), ROTATED_NMS_BLOCK):
        block = np.arange(start, min(start + ROTATED_NMS_BLOCK, len(order)))
        overlap = probiou(apart[:block[-1] + 1, None], apart[None, block])  # every better box x the block
        better = np.arange(block[-1] + 1)[:, None] < block[None, :]
        kept += block[~((overlap > iou_threshold) & better).any(axis=0)].tolist()
        if len(kept) >= limit:
            break
    return order[np.asarray(kept[:limit], np.int64)]


def rotated_bounds(rotated: np.ndarray) -> np.ndarray:
    """Rotated boxes' axis-aligned bounds, as centre x, y, width, height."""
    cos, sin = np.abs(np.cos(rotated[:, 4])), np.abs(np.sin(rotated[:, 4]))
    width, height = rotated[:, 2], rotated[:, 3]
    return np.column_stack([rotated[:, 0], rotated[:, 1], width * cos + height * sin, width * sin + height * cos])


def rotated_corners(rotated: np.ndarray) -> np.ndarray:
    """K x 4 x 2: each rotated box's corners (x, y), in order around it."""
    cos, sin = np.cos(rotated[:, 4]), np.sin(rotated[:, 4])
    corners = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    dx, dy = corners[None, :, 0] * rotated[:, 2:3], corners[None, :, 1] * rotated[:, 3:4]
    return np.stack([rotated[:, 0:1] + dx * cos[:, None] - dy * sin[:, None],
                     rotated[:, 1:2] + dx * sin[:, None] + dy * cos[:, None]], axis=-1)


def rotated_on_image(rotated: np.ndarray, size: tuple[int, int], preprocess: Preprocess) -> np.ndarray:
    """Rotated boxes in input pixels as rotated boxes in the pixels of the original image of `size` (width,
    height): exact where the image was letterboxed (one scale); where it was stretched unevenly each box's sides
    are scaled along their own directions, the angle that of its width (a rectangle's image is then a
    parallelogram: approximately)."""
    height, width = preprocess.resize
    if preprocess.letterbox:
        _, _, left, top, gain = letterbox_geometry(size[0], size[1], height, width)
        return np.column_stack([(rotated[:, 0] - left) / gain, (rotated[:, 1] - top) / gain, rotated[:, 2:4] / gain,
                                rotated[:, 4]])
    sx, sy = size[0] / width, size[1] / height
    cos, sin = np.cos(rotated[:, 4]), np.sin(rotated[:, 4])
    return np.column_stack([rotated[:, 0] * sx, rotated[:, 1] * sy, rotated[:, 2] * np.hypot(sx * cos, sy * sin),
                            rotated[:, 3] * np.hypot(sx * sin, sy * cos), np.arctan2(sy * sin, sx * cos)])
