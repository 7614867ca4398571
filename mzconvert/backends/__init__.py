"""Backends: the per-format implementation of freeze, strip, convert and the float reference run.

The recipe's `format` picks one; the stage modules and the planner never branch on format.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import RecipeError
from ..recipe import Recipe, Variant


@dataclass
class StripResult:
    model: Path
    extras: list[Path] = field(default_factory=list)  # artifacts shipped beside the model (anchors.npy)
    metadata: dict = field(default_factory=dict)


def export_anchors(anchors, recipe: Recipe, out_dir: Path) -> tuple[list[Path], dict]:
    """anchors.npy (N x 4, ymin/xmin/ymax/xmax normalised) and its manifest entry, for decoding raw SSD outputs."""
    import numpy as np

    anchors = np.asarray(anchors, np.float32).reshape(-1, 4)
    path = out_dir / "anchors.npy"
    np.save(path, anchors, allow_pickle=False)
    post = recipe.postprocess
    metadata = {"anchors": {"count": int(anchors.shape[0]), "layout": "ymin,xmin,ymax,xmax (normalised)",
                            "box_coder": "faster_rcnn" if post.box_coding == "exponential" else "linear",
                            "box_order": post.box_order, "box_coder_scales": list(post.box_coder_scales)}}
    return [path], metadata


def check_tensors(recipe: Recipe, field: str, names: Iterable[str], known: Iterable[str],
                  key: Callable[[str], str] = lambda name: name) -> None:
    """Every name (as `key` maps it) must be in the graph; otherwise say which and list close matches."""
    known = list(known)
    known_set = set(known)
    for name in names:
        if key(name) not in known_set:
            wanted = key(name)
            # a scope too many ('import/x', what tf.import_graph_def adds) or too few ('input' for 'a/b/input'),
            # or a scope for the node: a Keras layer ('stem' for 'model/stem_1/Relu'), its last node (the
            # layer's output) first
            in_scope = re.compile(rf"(^|/){re.escape(wanted)}(_\d+)?(/|$)")
            scoped = [k for k in reversed(known) if wanted.endswith("/" + k) or in_scope.search(k)]
            close = list(dict.fromkeys(scoped + difflib.get_close_matches(wanted, known, n=3, cutoff=0.6)))[:3]
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RecipeError(f"{recipe.path}: {field}: tensor {name!r} is not in the graph{hint}")


_BY_FORMAT = {
    "tf-frozen-graph": "tf",
    "tf-checkpoint": "tf",
    "tf-saved-model": "tf",
    "keras": "tf",
    "onnx": "onnx",
    "torch": "onnx",
    "torchscript": "onnx",
    "torch-export": "onnx",
    "tflite": "tflite",
}


class Backend(Protocol):
    """What every backend module implements (tf, onnx, tflite); the stages call nothing else of it.
    `SourcePipelineRunner` (the source end to end, for source_pipeline recipes) only where a format has one."""

    def freeze(self, source: Path, recipe: Recipe, out_dir: Path) -> Path:
        """The source as one self-contained model file in out_dir (weights folded in, graph edits applied)."""

    def strip(self, frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
        """The model cut at the recipe's input and outputs, and what ships beside it (anchors.npy)."""

    def convert(self, model: Path, recipe: Recipe, variant: Variant,
                calibration: Callable[[], Iterable] | None, out_dir: Path) -> Path:
        """The variant's artifact, converted in its mode (calibrated on `calibration` for int8)."""

    def tflite_converter(self, model: Path, recipe: Recipe) -> tuple[object, Callable]:
        """(a TFLite converter of the stripped model, what turns recipe input tensors into its inputs)."""

    def range_slots(self, model: Path, recipe: Recipe, tensor, target: Path) -> tuple[Path, Callable]:
        """(the float .tflite with a range slot on every tensor int8 needs, written to target, what turns recipe
        input tensors into its inputs): what calibrate records ranges into (quant/ranges.py)."""

    # GraphRunner(model, recipe, threads): the stripped float model (.is_twin: a quantized one's float twin,
    # float_twin.py), .run(tensor) -> outputs
    GraphRunner: type


def backend_for(recipe: Recipe) -> Backend:
    """The backend module for the recipe's format."""
    return importlib.import_module(f"{__name__}.{_BY_FORMAT[recipe.format]}")
