"""The recipe: its typed shape (schema), located reading (reader), one parser per section (sections), the
rules between sections (rules), parsing a file (parse) and finding recipes by name (lookup)."""

from .lookup import (
    SHIPPED_RECIPES,
    available_recipes,
    command_argument,
    recipes_dir,
    resolve_recipe_path,
    use_recipes_dir,
)
from .parse import load_recipe, parse_recipe
from .schema import (
    ACCELERATORS,
    MODES,
    PYPI_REQUIREMENT,
    SAFE_NAME,
    ClassLabels,
    InputSpec,
    Postprocess,
    Preprocess,
    Recipe,
    Source,
    SourcePipeline,
    Strip,
    TorchSpec,
    Variant,
    VelaTarget,
    VerifySpec,
)

__all__ = ["ACCELERATORS", "MODES", "PYPI_REQUIREMENT", "SAFE_NAME", "SHIPPED_RECIPES", "ClassLabels", "InputSpec",
           "Postprocess", "Preprocess", "Recipe", "Source", "SourcePipeline", "Strip", "TorchSpec", "Variant",
           "VelaTarget", "VerifySpec", "available_recipes", "command_argument", "load_recipe", "parse_recipe",
           "recipes_dir", "resolve_recipe_path", "use_recipes_dir"]
