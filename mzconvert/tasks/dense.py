"""Dense outputs (task: dense): maps of the image's size or a fraction of it, such as segmentation logits, text
probability maps or depth. A variant agrees with the float model where it marks the same pixels: with one
channel, the pixels above the recipe's threshold; with several, each pixel's highest channel (its class).
"""

from __future__ import annotations

import numpy as np

from .signal import slice_axis


def _classes_axis(shape: tuple[int, ...]) -> int | None:
    """The axis of a map's classes (one image, batch axis first), or None for a single-channel map."""
    axis = slice_axis(shape)
    return None if axis is None or shape[axis] == 1 else axis


def masks(output: np.ndarray, threshold: float) -> np.ndarray:
    """Per-pixel labels of one image's map: 0/1 at `threshold` for a single channel, else the argmax class."""
    axis = _classes_axis(output.shape)
    if axis is None:
        return (output > threshold).astype(np.int64).ravel()
    return np.argmax(output, axis=axis).ravel()


def mask_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> float:
    """Mean IoU of the pixels each label marks, over all images (images x one image's output shape), labels
    being the classes either map marks (a single-channel map: its foreground only); 1.0 when neither marks
    anything."""
    ref = np.concatenate([masks(r, threshold) for r in reference])
    got = np.concatenate([masks(c, threshold) for c in candidate])
    labels = set(np.unique(ref)) | set(np.unique(got))
    if _classes_axis(reference.shape[1:]) is None:
        labels -= {0}
    if not labels:
        return 1.0
    return float(np.mean([np.sum((ref == k) & (got == k)) / np.sum((ref == k) | (got == k)) for k in sorted(labels)]))


def pixel_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean absolute per-pixel difference, as a share of the float map's range."""
    span = float(reference.max() - reference.min()) or 1.0
    return float(np.mean(np.abs(reference.astype(np.float64) - candidate)) / span)
