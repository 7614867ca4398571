"""SSD anchors that are not in the graph: generated from the anchor options a model was trained with (MediaPipe's
SsdAnchorsCalculator: BlazeFace, the MediaPipe detectors), or read from a file beside the recipe. Either way they
become anchors.npy, (ymin, xmin, ymax, xmax) normalised, as the anchors strip evaluates from a graph.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..recipe import Recipe
from ..recipe.schema import ANCHOR_GENERATOR_DEFAULTS


def _scale(min_scale: float, max_scale: float, index: int, count: int) -> float:
    if count == 1:
        return (min_scale + max_scale) / 2
    return min_scale + (max_scale - min_scale) * index / (count - 1)


def generated_anchors(options: dict) -> np.ndarray:
    """N x 4 anchors as MediaPipe's SsdAnchorsCalculator generates them from `options`: layers of one stride
    share a grid, each cell holding their anchors in layer order (aspect ratios, then the interpolated scale)."""
    o = ANCHOR_GENERATOR_DEFAULTS | options
    strides, count = list(o["strides"]), len(o["strides"])
    anchors = []
    layer = 0
    while layer < count:
        scales, ratios = [], []
        last = layer
        while last < count and strides[last] == strides[layer]:
            scale = _scale(o["min_scale"], o["max_scale"], last, count)
            if last == 0 and o["reduce_boxes_in_lowest_layer"]:
                ratios += [1.0, 2.0, 0.5]
                scales += [0.1, scale, scale]
            else:
                ratios += list(o["aspect_ratios"])
                scales += [scale] * len(o["aspect_ratios"])
                if o["interpolated_scale_aspect_ratio"] > 0:
                    following = 1.0 if last == count - 1 else _scale(o["min_scale"], o["max_scale"], last + 1, count)
                    scales.append(math.sqrt(scale * following))
                    ratios.append(o["interpolated_scale_aspect_ratio"])
            last += 1
        sizes = [(s / math.sqrt(r), s * math.sqrt(r)) for s, r in zip(scales, ratios)]  # (height, width)
        rows = math.ceil(o["input_size_height"] / strides[layer])
        columns = math.ceil(o["input_size_width"] / strides[layer])
        for y in range(rows):
            for x in range(columns):
                yc, xc = (y + o["anchor_offset_y"]) / rows, (x + o["anchor_offset_x"]) / columns
                for height, width in sizes:
                    h, w = (1.0, 1.0) if o["fixed_anchor_size"] else (height, width)
                    anchors.append((yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2))
        layer = last
    return np.asarray(anchors, np.float32)


def declared_anchors(recipe: Recipe) -> np.ndarray | None:
    """The anchors an SSD recipe declares (anchor_generator, anchors_file), or None: from the graph or none."""
    from .detection import load_anchors

    post = recipe.postprocess
    if post is None or post.kind != "ssd":
        return None
    if post.anchor_generator is not None:
        return generated_anchors(post.anchor_generator)
    if post.anchors_file is not None:
        return load_anchors(anchors_file(recipe))
    return None


def anchors_file(recipe: Recipe) -> Path:
    return (recipe.path.parent / recipe.postprocess.anchors_file).resolve()
