"""Stage strip: cut pre- and post-processing off at the recipe's tensors; export what decoding needs (the SSD
anchors of the graph, which the backend evaluates, or those the recipe declares)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..backends import StripResult, backend_for, export_anchors
from ..recipe import Recipe
from ..tasks.anchors import declared_anchors


def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    if recipe.strip is None:  # the graph is already what we deploy
        model = out_dir / f"stripped{frozen.suffix}"
        shutil.copyfile(frozen, model)
        result = StripResult(model=model)
    else:
        result = backend_for(recipe).strip(frozen, recipe, out_dir)
    if (anchors := declared_anchors(recipe)) is not None:
        extras, metadata = export_anchors(anchors, recipe, out_dir)
        result = StripResult(result.model, result.extras + extras, result.metadata | metadata)
    return result
