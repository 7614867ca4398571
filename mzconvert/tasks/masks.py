"""Instance masks of a segmentation head (YOLOv8-seg and its kin): each detection's mask coefficients times the
prototypes, as Ultralytics' own decode makes them.

On the model's input (Ultralytics' process_mask with upsample, as its predictor calls it): the prototypes'
weighted sum upsampled bilinearly to the input size (torch's F.interpolate, half-pixel centres), the pixels above
0 (sigmoid 0.5), cropped to the detection's box (columns x1 <= c < x2, rows y1 <= r < y2). On the original image
(as its scale_masks does): the letterboxed content cut out and resized bilinearly to the image's size, the pixels
above 0.5. Only the box's region is computed (a mask is 0 outside its box): an eval decodes up to 100 masks an
image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from ..errors import InputError


@lru_cache(maxsize=32)
def bilinear_weights(size_in: int, size_out: int, dtype=np.float64) -> np.ndarray:
    """(size_out x size_in): the weights F.interpolate(mode='bilinear', align_corners=False) reads each output
    row (or column) with: the source coordinate (i + 0.5) x in / out - 0.5, clamped at 0, between two pixels."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    fraction = source - low
    weights = np.zeros((size_out, size_in))
    np.add.at(weights, (np.arange(size_out), low), 1 - fraction)
    np.add.at(weights, (np.arange(size_out), high), fraction)
    return weights.astype(dtype)


@dataclass(frozen=True)
class InstanceMasks:
    """The masks of K detections, decoded on demand, one at a time (`on_input`, `on_image`)."""

    logits: np.ndarray  # K x h x w: coefficients times prototypes, at the prototypes' resolution
    boxes: np.ndarray  # K x 4: x1, y1, x2, y2 in input pixels, the boxes the masks are cropped to
    input_hw: tuple[int, int]
    # where the image lies in the input (top, left, height, width) and the image's (width, height), for on_image:
    # the whole input until `placed` says otherwise
    content: tuple[int, int, int, int]
    image_size: tuple[int, int]

    def placed(self, content: tuple[int, int, int, int], image_size: tuple[int, int]) -> InstanceMasks:
        """The masks of an image of `image_size` (width, height) that fills `content` of the input."""
        return replace(self, content=content, image_size=image_size)

    def on_input(self, k: int) -> tuple[slice, slice, np.ndarray]:
        """Mask k on the input: the rows and columns of its box, and the mask (bool) over them."""
        height, width = self.input_hw
        x1, y1, x2, y2 = self.boxes[k]
        rows = slice(int(np.clip(np.ceil(y1), 0, height)), int(np.clip(np.ceil(y2), 0, height)))
        columns = slice(int(np.clip(np.ceil(x1), 0, width)), int(np.clip(np.ceil(x2), 0, width)))
        mh, mw = self.logits.shape[1:]
        up_rows = bilinear_weights(mh, height)[rows]
        up_columns = bilinear_weights(mw, width)[columns]
        return rows, columns, (up_rows @ self.logits[k].astype(np.float64) @ up_columns.T) > 0

    def on_input_canvas(self, k: int) -> np.ndarray:
        """Mask k on the whole input (bool)."""
        canvas = np.zeros(self.input_hw, bool)
        rows, columns, mask = self.on_input(k)
        canvas[rows, columns] = mask
        return canvas

    def on_image(self, k: int) -> np.ndarray:
        """Mask k on the original image (height x width, bool)."""
        width, height = self.image_size
        top, left, content_height, content_width = self.content
        rows, columns, mask = self.on_input(k)
        full = np.zeros((height, width), bool)
        row_index = np.arange(rows.start, rows.stop) - top
        column_index = np.arange(columns.start, columns.stop) - left
        inside_rows, inside_columns = (row_index >= 0) & (row_index < content_height), \
            (column_index >= 0) & (column_index < content_width)
        if not mask.size or not inside_rows.any() or not inside_columns.any():
            return full
        # in float32, as torch resizes the mask (and faster than in float64)
        down_rows = bilinear_weights(content_height, height, np.float32)[:, row_index[inside_rows]]
        down_columns = bilinear_weights(content_width, width, np.float32)[:, column_index[inside_columns]]
        touched_rows, touched_columns = np.flatnonzero(down_rows.any(1)), np.flatnonzero(down_columns.any(1))
        inside = mask[np.ix_(inside_rows, inside_columns)].astype(np.float32)
        region = down_rows[touched_rows] @ inside @ down_columns[touched_columns].T
        full[np.ix_(touched_rows, touched_columns)] = region > 0.5
        return full


def instance_masks(coefficients: np.ndarray, prototypes: np.ndarray, cells: np.ndarray, boxes: np.ndarray,
                   input_hw: tuple[int, int]) -> InstanceMasks:
    """The masks of the detections of `cells` (indices into the head's N cells), whose boxes are `boxes` (K x 4,
    ymin, xmin, ymax, xmax normalised to the input). `coefficients`: [1, masks, N] (or [1, N, masks]);
    `prototypes`: [1, masks, h, w] (or channels last, a .tflite's [1, h, w, masks])."""
    count = prototypes.shape[1] if prototypes.shape[1] in coefficients.shape[1:] else prototypes.shape[-1]
    if count not in coefficients.shape[1:]:
        raise InputError(f"mask coefficients {list(coefficients.shape)} do not weigh prototypes "
                         f"{list(prototypes.shape)}: no axis of {count}")
    per_cell = coefficients.reshape(count, -1).T if coefficients.shape[1] == count else \
        coefficients.reshape(-1, count)
    planes = prototypes[0] if prototypes.shape[1] == count else np.moveaxis(prototypes[0], -1, 0)
    logits = (per_cell[cells].astype(np.float32) @ planes.reshape(count, -1).astype(np.float32))
    height, width = input_hw
    xyxy = np.asarray(boxes, np.float64)[:, [1, 0, 3, 2]] * [width, height, width, height]
    return InstanceMasks(logits.reshape(len(cells), *planes.shape[1:]), xyxy, input_hw,
                         content=(0, 0, height, width), image_size=(width, height))


def mask_overlap(reference: InstanceMasks, k: int, candidate: InstanceMasks, j: int) -> tuple[int, int]:
    """(intersection, union) in input pixels of the reference's mask k and the candidate's mask j."""
    mine, theirs = reference.on_input_canvas(k), candidate.on_input_canvas(j)
    return int(np.count_nonzero(mine & theirs)), int(np.count_nonzero(mine | theirs))
