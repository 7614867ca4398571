"""`format: tflite`: a model someone already converted, quantized or not.

A quantized file is taken as it is: its variant is the file under the variant's name, checked against what
the variant declares (I/O dtypes, full-integer for int8) by the quantize stage. A float file is the float32
variant, and the float model the others are quantized from and verified against: int8 by default as a
converted graph is (ranges recorded in range slots this module marks, the converter's quantizer, fitted
depthwise weights: on MobileNetV2 6 points of top-1 above ai-edge-quantizer's, bench/source_routes.py),
dynamic and int16x8 (and int8 on request) by Google's LiteRT quantizer (quant/litert_quantizer.py). Then vela,
eval and bench as for any variant.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import MzError
from ..quant import litert_quantizer
from ..recipe import Recipe, Variant
from ..recipe.schema import CALIBRATED_MODES
from ..runtime import TFLiteRunner
from ..tflite_file import read_model, schema, write_model
from . import StripResult


def freeze(source: Path, recipe: Recipe, out_dir: Path) -> Path:
    TFLiteRunner(source)  # a file the interpreter cannot load stops here, by name
    return Path(shutil.copyfile(source, out_dir / "model.tflite"))


def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    return StripResult(model=Path(shutil.copyfile(frozen, out_dir / "model.tflite")))


def convert(model: Path, recipe: Recipe, variant: Variant, calibration, out_dir: Path) -> Path:
    target = out_dir / f"{recipe.name}_{variant.name}.tflite"
    is_float = _is_float(TFLiteRunner(model))
    if variant.mode == "float32" or not is_float:  # the file as it is (quantize checks it is what it says)
        if variant.calibration and not is_float:
            raise MzError(f"{recipe.path}: variants: {variant.name}: {model.name} is quantized already; remove "
                          "calibration to take it as it is")
        return Path(shutil.copyfile(model, target))
    if variant.mode in CALIBRATED_MODES and not variant.calibration:
        raise MzError(f"{model}: variant {variant.name!r} ({variant.mode}) is not what the recipe asked for: the "
                      "model is float; give the variant calibration images to quantize it")
    if variant.quantizer != "ai-edge-quantizer":  # the converter's int8 is calibrated in one piece (calibrate)
        raise MzError(f"{recipe.path}: variants: {variant.name}: this .tflite (custom ops) is quantized by "
                      "ai-edge-quantizer only: set quantizer: ai-edge-quantizer")
    if variant.mode not in litert_quantizer.RECIPES:
        raise MzError(f"{recipe.path}: variants: {variant.name}: a float .tflite is quantized to "
                      f"{', '.join(litert_quantizer.RECIPES)} (ai-edge-quantizer), not {variant.mode}")
    return litert_quantizer.quantize(model, variant.mode, calibration, target)


def _is_float(runner: TFLiteRunner) -> bool:
    return runner.inputs[0].dtype == "float32" and runner.float_tensor_count() > 0


def tflite_converter(model: Path, recipe: Recipe):
    raise MzError(f"{recipe.path}: format tflite: the model is converted already; its ranges are recorded by "
                  "LiteRT's interpreter, not by TensorFlow's converter (a .tflite with control flow is not)")


def range_slots(model: Path, recipe: Recipe, tensor, target: Path):
    """The float file with a range slot on every float tensor that is not a constant: what the TFLite converter's
    own calibration marks, so the float .tflite is calibrated and quantized as a converted graph is."""
    if not _is_float(TFLiteRunner(model)):
        raise MzError(f"{recipe.path}: variants: {model.name} is quantized already; remove calibration to take it "
                      "as it is")
    s = schema()
    flatbuffer = read_model(model)
    for graph in flatbuffer.subgraphs:
        for t in graph.tensors:
            data = flatbuffer.buffers[t.buffer].data
            if t.type == s.TensorType.FLOAT32 and (data is None or not len(data)):
                t.quantization = s.QuantizationParametersT()
                t.quantization.min, t.quantization.max = [0.0], [0.0]
    return write_model(flatbuffer, target), lambda x: x


class GraphRunner(TFLiteRunner):
    """The source model itself (eval's source row)."""

    def __init__(self, model: Path, recipe: Recipe, threads: int = 1):
        super().__init__(model, list(recipe.strip.outputs) if recipe.strip else None, threads)
        self.output_names = [o.name for o in self.outputs]
