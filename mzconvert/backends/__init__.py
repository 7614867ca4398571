"""Backends: the per-format implementation of freeze, strip, convert and the float reference run.

The recipe's `format` picks one; the stage modules and the planner never branch on format.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..recipe import Recipe


@dataclass
class StripResult:
    model: Path
    extras: list[Path] = field(default_factory=list)  # artifacts shipped beside the model (anchors.npy)
    metadata: dict = field(default_factory=dict)


_BY_FORMAT = {
    "tf-frozen-graph": "tf",
    "tf-checkpoint": "tf",
    "tf-saved-model": "tf",
    "onnx": "onnx",
    "torch": "onnx",
}


def backend_for(recipe: Recipe) -> ModuleType:
    """The module implementing `freeze`, `strip`, `convert` and `GraphRunner` for the recipe's format."""
    return importlib.import_module(f"{__name__}.{_BY_FORMAT[recipe.format]}")
