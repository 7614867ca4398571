"""`format: tflite`: a model someone already converted, quantized or not.

A quantized file is taken as it is: its variant is the file under the variant's name, checked against what
the variant declares (I/O dtypes, full-integer for int8) by the quantize stage, and verified against its float
twin, the float model its integer weights define (float_twin.py). A float file is the float32
variant (with strip, cut at the tensors it names: an Ultralytics head before its Concat, as for its ONNX
export), and the float model the others are quantized from and verified against: int8 by default as a
converted graph is (ranges recorded in range slots this module marks, the converter's quantizer, fitted
depthwise weights: on MobileNetV2 6 points of top-1 above ai-edge-quantizer's, bench/source_routes.py),
dynamic and int16x8 (and int8 on request) by Google's LiteRT quantizer (quant/litert_quantizer.py). Then vela,
eval and bench as for any variant.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..errors import MzError
from ..quant import litert_quantizer
from ..recipe import Recipe, Variant
from ..recipe.schema import CALIBRATED_MODES
from ..runtime import REFERENCE, TFLiteRunner
from ..tflite_file import (
    add_buffer,
    builtin_code,
    drop_import_hints,
    drop_unused_tensors,
    op_names,
    read_model,
    schema,
    write_model,
)
from . import StripResult, check_tensors
from .float_twin import FloatTwinRunner, is_quantized_tflite, write_tflite_float_twin
from .split_head import tflite_split_regressors
from .split_joins import tflite_split_joins_apart


def freeze(source: Path, recipe: Recipe, out_dir: Path) -> Path:
    """The source file, or the same float model in the form int8 quantizes whole, as published MediaPipe
    models need: weights stored sparse (each a DENSIFY) stored dense, weights stored float16 (each a
    DEQUANTIZE to float32) stored float32, MediaPipe's custom Convolution2DTransposeBias as the builtin
    TRANSPOSE_CONV with bias, the parts a slice takes of joined levels never joined (split_joins: an older
    YOLOv8 head's box and class logits), and a MediaPipe-style SSD's box offsets and keypoints made apart before
    they are joined (split_head). A rewritten file must compute what the source does (checked here on
    random inputs)."""
    original = TFLiteRunner(source)  # a file the interpreter cannot load stops here, by name
    target = out_dir / "model.tflite"
    model = read_model(source)
    if not (plain_weights(model) + _builtin_transpose_convs(model) + tflite_split_joins_apart(model)
            + tflite_split_regressors(model)):
        return Path(shutil.copyfile(source, target))
    write_model(model, target)
    _check_same_function(original, TFLiteRunner(target), source)
    return target


def _check_same_function(original: TFLiteRunner, rewritten: TFLiteRunner, source: Path) -> None:
    spec = original.inputs[0]
    for seed in (0, 1):
        x = np.random.RandomState(seed).uniform(-1, 1, spec.shape).astype(np.float32)
        for want, got in zip(original.run(x), rewritten.run(x)):
            scale = max(float(np.abs(want).max()), 1.0)
            if want.shape != got.shape or float(np.abs(want - got).max()) > REWRITE_TOLERANCE * scale:
                raise MzError(f"{source}: rewriting it (its float16 or sparse weights, custom transpose "
                              "convolutions or joined head) changed what it computes; please report this model")


REWRITE_TOLERANCE = 1e-4  # relative: a different summation order, nothing more
# MediaPipe's TfLitePadding (unknown, same, valid) as the TFLite schema's Padding
_MEDIAPIPE_PADDING = {1: 0, 2: 1}


def _builtin_transpose_convs(model) -> int:
    """MediaPipe's custom Convolution2DTransposeBias (input, weights [O, H, W, I], bias; options: padding,
    stride w, stride h as three int32) as TRANSPOSE_CONV (output shape, weights, input, bias), which LiteRT's
    quantizers, the converter and vela know; returns how many were replaced."""
    s = schema()
    replaced = 0
    for graph in model.subgraphs:
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            options = bytes(bytearray(op.customOptions)) if op.customOptions is not None else b""
            if code.customCode != b"Convolution2DTransposeBias" or len(options) != 12:
                continue
            padding, stride_w, stride_h = np.frombuffer(options, "<i4").tolist()
            if padding not in _MEDIAPIPE_PADDING:
                continue
            out_shape = s.TensorT()
            out_shape.name, out_shape.type = b"%s/output_shape" % graph.tensors[op.outputs[0]].name, s.TensorType.INT32
            out_shape.shape = np.array([4], np.int32)
            out_shape.buffer = add_buffer(model, np.asarray(graph.tensors[op.outputs[0]].shape, "<i4").tobytes())
            graph.tensors.append(out_shape)
            conv = s.TransposeConvOptionsT()
            conv.padding, conv.strideW, conv.strideH = _MEDIAPIPE_PADDING[padding], stride_w, stride_h
            op.opcodeIndex = builtin_code(model, s.BuiltinOperator.TRANSPOSE_CONV, version=3)  # 3: with bias
            op.inputs = [len(graph.tensors) - 1, op.inputs[1], op.inputs[0], op.inputs[2]]
            op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.TransposeConvOptions, conv
            op.customOptions = None
            replaced += 1
    return replaced


def plain_weights(model) -> int:
    """`model` (ModelT) with its sparse and float16 weights stored as the float32 constants they compute (the
    tensors keep their indices); how many were replaced."""
    return _dense_weights(model) + _float32_weights(model)


def _dense_weights(model) -> int:
    """Replace every DENSIFY of a sparse constant (subgraph 0) by the dense values LiteRT computes for it (the
    converter's quantizer leaves a densified weight float: MediaPipe's pose detector, 38 of them, then had int8
    convolutions with float filters that LiteRT refuses to load); returns how many were replaced."""
    from ..quant.ranges import interpreter_keeping

    graph = model.subgraphs[0]
    densified = [op for op, name in zip(graph.operators, op_names(model)) if name == "DENSIFY"
                 and graph.tensors[op.inputs[0]].sparsity is not None]
    if not densified:
        return 0
    # the reference kernels: with XNNPACK's delegate a kept DENSIFY output reads as zeros
    interpreter = interpreter_keeping(model, [op.outputs[0] for op in densified], threads=1, kernels=REFERENCE)
    interpreter.invoke()  # on whatever the input holds: a DENSIFY reads only its constant
    for op in densified:
        graph.tensors[op.outputs[0]].buffer = add_buffer(model, interpreter.get_tensor(op.outputs[0]).tobytes())
    graph.operators = [op for op in graph.operators if all(op is not d for d in densified)]
    return len(densified)


def _float32_weights(model) -> int:
    """Replace every DEQUANTIZE of a float16 constant by its float32 values (exact: float16 -> float32 loses
    nothing); returns how many were replaced."""
    s = schema()
    replaced = 0
    for index, graph in enumerate(model.subgraphs):
        kept = []
        for op, name in zip(graph.operators, op_names(model, index)):
            source = graph.tensors[op.inputs[0]] if len(op.inputs) == 1 else None
            data = model.buffers[source.buffer].data if source is not None else None
            if name != "DEQUANTIZE" or source.type != s.TensorType.FLOAT16 or data is None or not len(data):
                kept.append(op)
                continue
            weights = np.frombuffer(bytes(bytearray(data)), np.float16).astype(np.float32)
            graph.tensors[op.outputs[0]].buffer = add_buffer(model, weights.tobytes())
            replaced += 1
        graph.operators = kept
    return replaced


def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    """The float file; with strip, cut at its outputs (a YOLO head's boxes and scores before the Concat that joins
    them, so int8 gives each a scale of its own), the ops none of them needs dropped."""
    target = out_dir / "model.tflite"
    if recipe.strip is None:
        return StripResult(model=Path(shutil.copyfile(frozen, target)))
    model = read_model(frozen)
    graph = model.subgraphs[0]
    names = [t.name.decode() for t in graph.tensors]
    check_tensors(recipe, "strip.inputs", recipe.strip.inputs, [names[i] for i in graph.inputs])
    check_tensors(recipe, "strip.outputs", recipe.strip.outputs, names)
    outputs = [names.index(name) for name in recipe.strip.outputs]
    producers = {tensor: op for op in graph.operators for tensor in op.outputs}
    needed, wanted = set(), list(outputs)
    while wanted:
        op = producers.get(wanted.pop())
        if op is not None and id(op) not in needed:
            needed.add(id(op))
            wanted += [i for i in op.inputs if i >= 0]
    graph.operators = [op for op in graph.operators if id(op) in needed]
    float_outputs = all(graph.tensors[i].type == schema().TensorType.FLOAT32 for i in graph.outputs)
    graph.outputs = outputs
    if float_outputs:  # an integer model with float outputs keeps them: its cut outputs dequantized last
        _dequantized_outputs(model, graph)
    model.signatureDefs = []  # a signature names the outputs the cut removed
    drop_unused_tensors(model)
    return StripResult(model=write_model(model, target))


# DEQUANTIZE's op version for the integer type it reads (TFLite's op_version.cc)
DEQUANTIZE_VERSIONS = {"UINT8": 1, "INT8": 2, "INT16": 4}


def _dequantized_outputs(model, graph) -> None:
    """Each integer output of `graph` made a float one of its name by a DEQUANTIZE at the end (the integer tensor
    renamed <name>/quantized)."""
    s = schema()
    types = {getattr(s.TensorType, name): name for name in DEQUANTIZE_VERSIONS}
    for k, index in enumerate(graph.outputs):
        quantized = graph.tensors[index]
        if quantized.type not in types:
            continue
        output = s.TensorT()
        output.name, output.shape, output.type = quantized.name, quantized.shape, s.TensorType.FLOAT32
        model.buffers.append(s.BufferT())  # no data: computed
        output.shapeSignature, output.buffer = quantized.shapeSignature, len(model.buffers) - 1
        quantized.name += b"/quantized"
        graph.tensors.append(output)
        op = s.OperatorT()
        op.opcodeIndex = builtin_code(model, s.BuiltinOperator.DEQUANTIZE, DEQUANTIZE_VERSIONS[types[quantized.type]])
        op.inputs, op.outputs = [index], [len(graph.tensors) - 1]
        graph.operators.append(op)
        graph.outputs[k] = len(graph.tensors) - 1


def convert(model: Path, recipe: Recipe, variant: Variant, calibration, out_dir: Path) -> Path:
    target = out_dir / f"{recipe.name}_{variant.name}.tflite"
    is_float = _is_float(model)
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


def _is_float(model: Path) -> bool:
    """Float activations and weights (a dynamic-range model's weights are quantized already: int8)."""
    runner = TFLiteRunner(model)
    return runner.inputs[0].dtype == "float32" and runner.float_tensor_count() > 0 and not is_quantized_tflite(model)


def tflite_converter(model: Path, recipe: Recipe):
    raise MzError(f"{recipe.path}: format tflite: the model is converted already; its ranges are recorded by "
                  "LiteRT's interpreter, not by TensorFlow's converter (a .tflite with control flow is not)")


def range_slots(model: Path, recipe: Recipe, tensor, target: Path):
    """The float file with a range slot on every float tensor that is not a constant: what the TFLite converter's
    own calibration marks, so the float .tflite is calibrated and quantized as a converted graph is."""
    if not _is_float(model):
        raise MzError(f"{recipe.path}: variants: {model.name} is quantized already; remove calibration to take it "
                      "as it is")
    s = schema()
    flatbuffer = read_model(model)
    drop_import_hints(flatbuffer)
    for graph in flatbuffer.subgraphs:
        for t in graph.tensors:
            data = flatbuffer.buffers[t.buffer].data
            if t.type == s.TensorType.FLOAT32 and (data is None or not len(data)):
                t.quantization = s.QuantizationParametersT()
                t.quantization.min, t.quantization.max = [0.0], [0.0]
    return write_model(flatbuffer, target), lambda x: x


class GraphRunner(FloatTwinRunner, TFLiteRunner):
    """The source model itself (verify's reference, eval's source row); a quantized file's float twin."""

    is_quantized = staticmethod(is_quantized_tflite)
    write_twin = staticmethod(write_tflite_float_twin)
