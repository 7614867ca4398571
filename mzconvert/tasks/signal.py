"""What every output of a variant is judged by against the float model, whatever the task: cosine similarity,
SQNR and max abs error, over the whole output and over each of its slices.

A whole-output figure is dominated by its largest values: a detector head that concatenates box coordinates
in pixels (0-320) with class probabilities (0-1) keeps a cosine of 0.9995 when int8 has set every probability
to 0. So an output with a channel axis (`slice_axis`) is also judged slice by slice, and by its worst slice.
"""

from __future__ import annotations

import numpy as np

# A slice is judged by at least this many values that are not 0 in one model or the other (a detector's class
# scores are judged only where a detection is shown): the noise power of 16 values is known within -3.6 / +2.6 dB
# (95 %, chi-square with 16 degrees of freedom); one or two values, a class seen once in the verify images, would
# decide a build on one rounding.
MIN_SLICE_VALUES = 16
# An axis is a channel axis when it is at least this many times shorter than every other axis of the output
# (YOLO [1, 84, 2100]: 84 of 2100; SSD [1, 1917, 4]: 4 of 1917; a map [1, 21, 128, 128]: 21 of 128).
CHANNEL_AXIS_RATIO = 4


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    ref = reference.astype(np.float64).ravel()
    got = candidate.astype(np.float64).ravel()
    noise = np.sum((ref - got) ** 2)
    signal = np.sum(ref ** 2)
    norms = np.linalg.norm(ref) * np.linalg.norm(got)
    return {
        "cosine": float(ref @ got / norms) if norms else (1.0 if noise == 0 else 0.0),
        "sqnr_db": sqnr_db(signal, noise),
        "max_abs_error": float(np.max(np.abs(ref - got))) if ref.size else 0.0,
    }


def sqnr_db(signal: float, noise: float) -> float:
    if not noise:
        return float("inf")
    return float(10 * np.log10(signal / noise)) if signal else float("-inf")


def slice_axis(shape: tuple[int, ...]) -> int | None:
    """The channel axis of one image's output (batch axis first), or None: the shortest axis of length >= 2,
    when it is CHANNEL_AXIS_RATIO times shorter than every other axis of length >= 2."""
    axes = [(n, i) for i, n in enumerate(shape) if i > 0 and n >= 2]
    if len(axes) < 2:
        return None
    (shortest, axis), *others = sorted(axes)
    return axis if all(n >= CHANNEL_AXIS_RATIO * shortest for n, _ in others) else None


def worst_slice(reference: np.ndarray, candidate: np.ndarray, axis: int | None = None) -> dict | None:
    """The slice (along `axis` of one image's output, else its channel axis) with the lowest SQNR over all
    images, of those with MIN_SLICE_VALUES values or more: {axis, index, of, sqnr_db, cosine}, or None when the
    output has no channel axis or no such slice. `reference`, `candidate`: images x output shape."""
    axis = slice_axis(reference.shape[1:]) if axis is None else axis
    if axis is None:
        return None
    axis += 1  # images first
    ref = np.moveaxis(reference.astype(np.float64), axis, 0).reshape(reference.shape[axis], -1)
    got = np.moveaxis(candidate.astype(np.float64), axis, 0).reshape(reference.shape[axis], -1)
    judged = np.flatnonzero(np.count_nonzero((ref != 0) | (got != 0), axis=1) >= MIN_SLICE_VALUES)
    if not judged.size:
        return None
    signal, noise = (ref ** 2).sum(axis=1), ((ref - got) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(noise > 0, signal / np.where(noise > 0, noise, 1), np.inf)
    index = int(judged[np.argmin(ratio[judged])])
    norms = np.linalg.norm(ref[index]) * np.linalg.norm(got[index])
    cosine = float(ref[index] @ got[index] / norms) if norms else (1.0 if noise[index] == 0 else 0.0)
    return {"axis": axis - 1, "index": index, "of": int(reference.shape[axis]),
            "sqnr_db": sqnr_db(signal[index], noise[index]), "cosine": cosine}


def slice_name(output: str, worst: dict) -> str:
    """How a log line names a slice: the output, the channel index and the channel axis (batch axis 0)."""
    return f"{output} channel {worst['index']} of {worst['of']} (axis {worst['axis']})"
