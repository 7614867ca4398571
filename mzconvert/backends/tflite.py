"""`format: tflite`: a model someone already converted, quantized or not.

A quantized file is taken as it is: its variant is the file under the variant's name, checked against what
the variant declares (I/O dtypes, full-integer for int8) by the quantize stage. A float file is the float32
variant, and the float model the others are quantized from (dynamic, int8 and int16x8, by Google's LiteRT
quantizer: quant/litert_quantizer.py) and verified against. Then vela, eval and bench as for any variant.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import MzError
from ..quant import litert_quantizer
from ..recipe import Recipe, Variant
from ..recipe.schema import CALIBRATED_MODES
from ..runtime import TFLiteRunner
from . import StripResult


def freeze(source: Path, recipe: Recipe, out_dir: Path) -> Path:
    TFLiteRunner(source)  # a file the interpreter cannot load stops here, by name
    return Path(shutil.copyfile(source, out_dir / "model.tflite"))


def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    return StripResult(model=Path(shutil.copyfile(frozen, out_dir / "model.tflite")))


def convert(model: Path, recipe: Recipe, variant: Variant, calibration, out_dir: Path) -> Path:
    target = out_dir / f"{recipe.name}_{variant.name}.tflite"
    source = TFLiteRunner(model)
    is_float = source.inputs[0].dtype == "float32" and source.float_tensor_count() > 0
    if variant.mode == "float32" or not is_float:  # the file as it is (quantize checks it is what it says)
        if variant.calibration and not is_float:
            raise MzError(f"{recipe.path}: variants: {variant.name}: {model.name} is quantized already; remove "
                          "calibration to take it as it is")
        return Path(shutil.copyfile(model, target))
    if variant.mode in CALIBRATED_MODES and not variant.calibration:
        raise MzError(f"{model}: variant {variant.name!r} ({variant.mode}) is not what the recipe asked for: the "
                      "model is float; give the variant calibration images to quantize it")
    if variant.mode not in litert_quantizer.RECIPES:
        raise MzError(f"{recipe.path}: variants: {variant.name}: a float .tflite is quantized to "
                      f"{', '.join(litert_quantizer.RECIPES)} (ai-edge-quantizer), not {variant.mode}")
    return litert_quantizer.quantize(model, variant.mode, calibration, target)


def tflite_converter(model: Path, recipe: Recipe):
    raise MzError(f"{recipe.path}: format tflite: the model is converted already; there is nothing to calibrate")


class GraphRunner(TFLiteRunner):
    """The source model itself (eval's source row)."""

    def __init__(self, model: Path, recipe: Recipe, threads: int = 1):
        super().__init__(model, list(recipe.strip.outputs) if recipe.strip else None, threads)
        self.output_names = [o.name for o in self.outputs]
