"""`format: tflite`: a model someone already converted (and maybe quantized), taken as it is.

Nothing is converted: each variant is the source file under the variant's name, checked against
what the variant declares (I/O dtypes, full-integer for int8) by the quantize stage, then compiled
by vela, evaluated and benchmarked like any built variant. There is no float model to verify it
against, so such recipes declare no verify section.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import MzError
from ..recipe import Recipe, Variant
from ..runtime import TFLiteRunner
from . import StripResult


def freeze(source: Path, recipe: Recipe, out_dir: Path) -> Path:
    TFLiteRunner(source)  # a file the interpreter cannot load stops here, by name
    return Path(shutil.copyfile(source, out_dir / "model.tflite"))


def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    return StripResult(model=Path(shutil.copyfile(frozen, out_dir / "model.tflite")))


def convert(model: Path, recipe: Recipe, variant: Variant, calibration, out_dir: Path) -> Path:
    return Path(shutil.copyfile(model, out_dir / f"{recipe.name}_{variant.name}.tflite"))


def tflite_converter(model: Path, recipe: Recipe):
    raise MzError(f"{recipe.path}: format tflite: the model is converted already; there is nothing to calibrate")


class GraphRunner(TFLiteRunner):
    """The source model itself (eval's source row)."""

    def __init__(self, model: Path, recipe: Recipe, threads: int = 1):
        super().__init__(model, list(recipe.strip.outputs) if recipe.strip else None, threads)
        self.output_names = [o.name for o in self.outputs]
