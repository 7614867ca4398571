"""Stage strip: cut pre- and post-processing off at the recipe's tensors; export what decoding needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..backends import StripResult, backend_for
from ..recipe import Recipe


def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    if recipe.strip is None:  # the graph is already what we deploy
        model = out_dir / f"stripped{frozen.suffix}"
        shutil.copyfile(frozen, model)
        return StripResult(model=model)
    return backend_for(recipe).strip(frozen, recipe, out_dir)
