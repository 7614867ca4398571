"""Where recipes are: the shipped ones, or a folder the user names; RECIPE on the command line."""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import RecipeError
from ..shipped import shipped_dir
from ..yamlsafe import short
from .schema import SAFE_NAME, Recipe

SHIPPED_RECIPES = shipped_dir("recipes")
_chosen_recipes_dir: Path | None = None  # --recipes-dir / $MZCONVERT_RECIPES


def use_recipes_dir(folder: Path | None) -> None:
    """Recipe names (build NAME, list, release, matrix) are looked up in `folder` instead of the shipped ones."""
    global _chosen_recipes_dir
    _chosen_recipes_dir = folder


def recipes_dir() -> Path:
    return _chosen_recipes_dir or SHIPPED_RECIPES




def is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def resolve_recipe_path(name_or_path: str) -> Path:
    """RECIPE on the command line: a name from recipes/ or a path to a YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"{name_or_path}: no such recipe file")
        return path
    if not SAFE_NAME.match(name_or_path):
        raise RecipeError(f"{short(name_or_path)}: not a safe recipe name (lower case, digits, '.', '_', '-')")
    path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(name_or_path, available_recipes(), n=1)
        raise RecipeError(f"{name_or_path}: no recipe of that name in {recipes_dir()}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return path


def command_argument(recipe: Recipe) -> str:
    """RECIPE as a command given to a user should name it: its name when the recipe folder has it, else its path."""
    return recipe.name if is_within(recipe.path, recipes_dir()) else str(recipe.path)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


