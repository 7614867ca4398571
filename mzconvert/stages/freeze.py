"""Stage freeze: the fetched source (checkpoint, SavedModel, frozen graph, ONNX, torch) -> one graph file."""

from __future__ import annotations

from pathlib import Path

from ..backends import backend_for
from ..recipe import Recipe


def freeze(source: Path, recipe: Recipe, out_dir: Path) -> Path:
    return backend_for(recipe).freeze(source, recipe, out_dir)
