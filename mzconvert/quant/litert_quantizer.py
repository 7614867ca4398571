"""Google's LiteRT quantizer (ai-edge-quantizer) on a float .tflite flatbuffer: how a `format: tflite` source
that someone converted but did not quantize gets its dynamic, int8 and int16x8 variants.

The quantizer calibrates through the model's signature runner; a file without a SignatureDef (a frozen-graph
conversion, many MediaPipe models) is given one over its main subgraph's inputs and outputs first. Its
static recipes give integer inputs and outputs: int8 for int8, int16 for int16x8.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError, short_text
from ..tflite_file import drop_import_hints, model_bytes, read_model, schema
from .tflite_converter import tf_module

# mode -> the quantizer's recipe (the I/O dtypes its models have: recipe/rules.py holds variants to them)
RECIPES = {"dynamic": "dynamic_wi8_afp32", "int8": "static_wi8_ai8", "int16x8": "static_wi8_ai16"}
SIGNATURE = "serving_default"


def available() -> bool:
    return importlib.util.find_spec("ai_edge_quantizer") is not None


def with_signature(model_file: Path) -> tuple[bytes, str]:
    """(the flatbuffer, its main signature's input name): given a SignatureDef over subgraph 0 if it has none,
    its operator codes in the field the quantizer reads, and no import hint that hides its weights."""
    model = read_model(model_file)
    upgraded = _current_opcodes(model) | drop_import_hints(model)
    if model.signatureDefs:
        signature = next((s for s in model.signatureDefs if s.signatureKey == SIGNATURE.encode()),
                         model.signatureDefs[0])
        return (model_bytes(model) if upgraded else model_file.read_bytes()), signature.inputs[0].name.decode()
    s = schema()
    graph = model.subgraphs[0]

    def tensor_map(index: int):
        mapped = s.TensorMapT()
        mapped.name, mapped.tensorIndex = graph.tensors[index].name, index
        return mapped

    signature = s.SignatureDefT()
    signature.signatureKey, signature.subgraphIndex = SIGNATURE.encode(), 0
    signature.inputs = [tensor_map(i) for i in graph.inputs]
    signature.outputs = [tensor_map(i) for i in graph.outputs]
    model.signatureDefs = [signature]
    return model_bytes(model), graph.tensors[graph.inputs[0]].name.decode()


def _current_opcodes(model) -> bool:
    """Operator codes written before the schema's 32-bit builtin_code (TFLite before 2.4: MediaPipe's models)
    hold the operator in deprecated_builtin_code only; LiteRT reads the larger of the two, the quantizer reads
    builtin_code alone and took every such operator for ADD (its weights quantized as activations, a model that
    cannot run). Whether any code was moved into builtin_code."""
    moved = False
    for code in model.operatorCodes:
        if code.deprecatedBuiltinCode > code.builtinCode:
            code.builtinCode, moved = code.deprecatedBuiltinCode, True
    return moved


def _min_max_ranges(engine, flatbuffer: bytes, input_name: str,
                    calibration: Callable[[], Iterable[np.ndarray]]) -> dict:
    """{tensor: its min and max over every calibration tensor}, in the quantizer's calibration result. Its own
    calibration keeps a moving average of each tensor's min and max image by image (smoothing 0.95): narrower
    ranges than the tensors take, which clip them (a YOLOv8n's activations at 54-78 % of their largest value:
    its int16x8 matched 93.9 % of float's detections, 98.9 % with the ranges here). So its calibrator, given the
    engine's recipe, joins them with its min_max_update instead: min of the mins and max of the maxes, as the
    converter and ONNX Runtime take them."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(engine.get_quantization_recipe())
    ranges = calibrator.Calibrator(flatbuffer, qsv_update_func=qsv_utils.min_max_update)
    ranges.calibrate({SIGNATURE: [{input_name: tensor} for tensor in calibration()]}, manager)
    return ranges.get_model_qsvs()


def quantize(model_file: Path, mode: str, calibration: Callable[[], Iterable[np.ndarray]] | None,
             target: Path) -> Path:
    """The float .tflite quantized in `mode` (calibrated on the NHWC tensors `calibration` yields)."""
    if not available():
        raise MzError(f"{model_file}: quantizing a float .tflite takes Google's ai-edge-quantizer, which is not "
                      "installed: pip install --no-deps -r requirements-tools.txt (make install does)", EXIT_BAD_INPUT)
    tf_module()  # TensorFlow, which the quantizer imports, quiet first
    from ai_edge_quantizer import quantizer, recipe

    flatbuffer, input_name = with_signature(model_file)
    name = RECIPES[mode]
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # its progress bars and report
            engine = quantizer.Quantizer(flatbuffer)
            engine.load_quantization_recipe(getattr(recipe, name)())
            result = _min_max_ranges(engine, flatbuffer, input_name, calibration) \
                if calibration is not None else None
            quantized = engine.quantize(result, enable_progress_bar=False, enable_progress_report=False)
    except Exception as exc:  # the quantizer raises ValueError, RuntimeError... for what it cannot do
        raise MzError(f"{model_file}: ai-edge-quantizer could not quantize the model ({mode}): "
                      f"{short_text(exc)}") from None
    target.write_bytes(quantized.quantized_model)
    return target
