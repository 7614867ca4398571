"""Where a build's files are: build/<recipe>/<stage>/ (a stage's files, with its result and stamp), and
where a recipe's last build put dist/ and build/, so eval, bench and report find them from any folder.

A build records its absolute output folders under the cache (keyed by the recipe file's absolute
path); a later command without --out/--build-dir uses ./dist when it holds the recipe's build, else
that record.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .fsio import write_json_atomic
from .manifest import MANIFEST
from .recipe import Recipe

# build/<recipe>/<stage>/: the stage's files, RESULT (what it reported, with every file's sha256) and STAMP
# (the key of its inputs), written last.
STAMP = "stamp.json"
RESULT = "result.json"


def recipe_build_folder(build_root: Path, recipe_name: str) -> Path:
    return build_root / recipe_name


def _record_path(cache_dir: Path, recipe: Recipe) -> Path:
    key = hashlib.sha256(str(recipe.path.resolve()).encode()).hexdigest()[:16]
    return cache_dir / "builds" / f"{recipe.name}-{key}.json"


def record_build(cache_dir: Path, recipe: Recipe, out_root: Path, build_root: Path) -> None:
    write_json_atomic(_record_path(cache_dir, recipe), {"recipe": str(recipe.path.resolve()),
                                                        "dist": str(out_root.resolve()),
                                                        "build": str(build_root.resolve())})


def build_roots(cache_dir: Path, recipe: Recipe, out: Path | None, build_dir: Path | None) -> tuple[Path, Path]:
    """(dist root, build root) for a command that reads a build: explicit options first, then ./dist when
    it holds this recipe's build, then where the last build of this recipe file wrote."""
    if out is not None or (Path("dist") / recipe.name / MANIFEST).is_file():
        return out or Path("dist"), build_dir or Path("build")
    try:
        recorded = json.loads(_record_path(cache_dir, recipe).read_text())
        return Path(recorded["dist"]), build_dir or Path(recorded["build"])
    except (OSError, ValueError, KeyError, TypeError):
        return Path("dist"), build_dir or Path("build")


def built_stage_result(build_root: Path, recipe: Recipe, stage: str) -> dict | None:
    """What a stage of the last build reported (build/<recipe>/<stage>/), if it is there."""
    try:
        return json.loads((recipe_build_folder(build_root, recipe.name) / stage / RESULT).read_text())
    except (OSError, ValueError):
        return None


def built_stage_model(build_root: Path, recipe: Recipe, stage: str, key: str = "model") -> Path | None:
    """The model a stage of the last build wrote (build/<recipe>/<stage>/), if it is there; `key` names another
    of its files (quantize's raw_model: the model before post-processing was attached)."""
    result = built_stage_result(build_root, recipe, stage)
    if result is None or key not in result:
        return None
    path = recipe_build_folder(build_root, recipe.name) / stage / result[key]
    return path if path.is_file() else None
