"""ONNX sources (and PyTorch modules exported to ONNX), quantized with onnxruntime.quantization."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError, RecipeError, short_text
from ..quant.output_scales import mixed_range_outputs, reaching_outputs
from ..quant.tflite_converter import converter_range_slots, run_converter
from ..recipe import Recipe, Variant
from ..recipe.schema import FITTED_ROUNDINGS, TORCH_FORMATS
from ..runtime import OnnxRunner
from . import StripResult, check_tensors, export_anchors, nhwc_port, torch_sources
from .split_head import split_levels


def _load(path: Path):
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
        raise MzError(f"{path}: not a valid ONNX model: {short_text(exc)}", EXIT_BAD_INPUT) from None
    return model


def _save(model, path: Path) -> Path:
    import onnx

    onnx.save(model, str(path))
    return path


# -- freeze --------------------------------------------------------------------------------------
def freeze(source: Path, recipe: Recipe, out_dir: Path) -> Path:
    """A checked, shape-inferred ONNX model; torch sources are built, loaded and exported first; a YOLOv5
    head's levels split into boxes and scores (split_head)."""
    import onnx

    target = out_dir / "model.onnx"
    if recipe.format in TORCH_FORMATS:
        torch_sources.export_onnx(source, recipe, target)
        model = _load(target)
    else:
        model = _load(source)  # a corrupt download is reported by its own name
    model = _at_least_opset(_with_input_shape(model, recipe, source), PER_CHANNEL_OPSET, source)
    model = split_levels(model, recipe)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return _save(inferred, target)


PER_CHANNEL_OPSET = 13  # DequantizeLinear's axis (per-channel weights) came with opset 13


def _with_input_shape(model, recipe: Recipe, source: Path):
    """The model at the recipe's input.shape: dynamic dimensions of its input (['batch', 3, 'height', 'width'])
    fixed, the outputs' symbolic dimensions cleared for shape inference to fill in."""
    graph_input = next((i for i in model.graph.input if i.name == recipe.input.name), None)
    if graph_input is None:
        return model  # strip names the missing input with its close matches
    dims = graph_input.type.tensor_type.shape.dim
    if len(dims) != len(recipe.input.shape):
        raise RecipeError(f"{recipe.path}: input.shape: {list(recipe.input.shape)}, but {source.name}'s input "
                          f"{recipe.input.name} has {len(dims)} dimensions")
    for dim, wanted in zip(dims, recipe.input.shape):
        if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != wanted:
            raise RecipeError(f"{recipe.path}: input.shape: {list(recipe.input.shape)}, but {source.name}'s input "
                              f"{recipe.input.name} is fixed at {[d.dim_value or d.dim_param for d in dims]}")
        dim.Clear()
        dim.dim_value = wanted
    for output in model.graph.output:
        for dim in output.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.Clear()
    return model


def _at_least_opset(model, opset: int, source: Path):
    """The model converted up to `opset` (onnx's version converter) when it is older: per-channel QDQ needs it,
    and ONNX Runtime's quantizer writes an older model that fails to load only after the whole quantization."""
    from onnx import version_converter

    current = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    if current >= opset:
        return model
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises its own errors for ops it cannot adapt
        raise MzError(f"{source}: opset {current} is older than {opset}, which per-channel int8 needs, and onnx's "
                      f"version converter cannot convert it: {short_text(exc)}") from None


# -- strip ---------------------------------------------------------------------------------------
def _tensor_names(model) -> list[str]:
    graph = model.graph
    names = {i.name for i in graph.input} | {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return sorted(n for n in names if n)


def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    import onnx.utils

    names = _tensor_names(_load(frozen))
    check_tensors(recipe, "strip.inputs", recipe.strip.inputs, names)
    check_tensors(recipe, "strip.outputs", recipe.strip.outputs, names)
    target = out_dir / "stripped.onnx"
    onnx.utils.extract_model(str(frozen), str(target), list(recipe.strip.inputs), list(recipe.strip.outputs))
    result = StripResult(model=target)
    if recipe.postprocess is not None and recipe.postprocess.anchors_tensor:
        anchors_name = recipe.postprocess.anchors_tensor
        check_tensors(recipe, "postprocess.anchors_tensor", [anchors_name], names)
        extras, metadata = export_anchors(_evaluate(frozen, anchors_name, recipe), recipe, out_dir)
        result = StripResult(model=target, extras=extras, metadata=metadata)
    if (frozen.parent / nhwc_port.KERAS_PORT).is_file():  # the whole network: classifiers end at their logits
        shutil.copyfile(frozen.parent / nhwc_port.KERAS_PORT, out_dir / nhwc_port.KERAS_PORT)
    elif any(v.target == "tflite" for v in recipe.variants):
        nhwc_port.write_onnx2tf_port(target, recipe, out_dir)
    return result


def _evaluate(model: Path, tensor: str, recipe: Recipe) -> np.ndarray:
    """One named output of the model on a zero input (the anchors do not depend on the image)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run([tensor], {recipe.input.name: np.zeros(recipe.input.shape, np.float32)})[0]


class GraphRunner(OnnxRunner):
    """The float ONNX model: the reference every variant is compared with."""

    def __init__(self, model: Path, recipe: Recipe, threads: int = 1):
        super().__init__(model, list(recipe.strip.outputs) if recipe.strip else None, threads)
        self.output_names = [o.name for o in self.outputs]


# -- convert -------------------------------------------------------------------------------------
class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over the recipe's preprocessed images."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self._feeds = ({input_name: b} for b in batches)

    def get_next(self):
        return next(self._feeds, None)


def convert(model: Path, recipe: Recipe, variant: Variant,
            calibration: Callable[[], Iterable[np.ndarray]] | None, out_dir: Path) -> Path:
    from onnxruntime import quantization as q

    if variant.target == "tflite":  # from the NHWC port; calibration images arrive in the recipe's layout
        converter, to_port = tflite_converter(model, recipe)
        port_calibration = (lambda: (to_port(t) for t in calibration())) if calibration else None
        return run_converter(converter, model, recipe, variant, port_calibration, out_dir)
    target = out_dir / f"{recipe.name}_{variant.name}.onnx"
    if variant.mode == "float32":
        shutil.copyfile(model, target)
    elif variant.mode == "float16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # keep_io_types: callers feed and read float32, as with every other variant
        _save(_topologically_sorted(convert_float_to_float16(_load(model), keep_io_types=True)), target)
    elif variant.mode in ("dynamic", "int8", "int16x8"):
        prepared = out_dir / "preprocessed.onnx"
        # skip_symbolic_shape: symbolic inference needs sympy and the shapes here are static anyway
        q.quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        _save(_named_nodes(_load(prepared)), prepared)
        _quantize_prepared(prepared, target, variant, recipe, calibration)
        prepared.unlink()
    else:
        raise MzError(f"{recipe.path}: variants: {variant.name}: mode {variant.mode} is not supported for ONNX")
    _check_quantized(target, variant)
    return target


def tflite_converter(model: Path, recipe: Recipe):
    """(a TFLite converter of the NHWC port, what turns recipe input tensors into its inputs)."""
    return nhwc_port.converter(model, recipe), nhwc_port.to_port_layout(recipe)


def range_slots(model: Path, recipe: Recipe, tensor: np.ndarray, target: Path):
    return converter_range_slots(*tflite_converter(model, recipe), model, tensor, target)


def _quantize_prepared(prepared: Path, target: Path, variant: Variant, recipe: Recipe, calibration) -> None:
    from onnxruntime import quantization as q

    if variant.mode == "dynamic":
        q.quantize_dynamic(str(prepared), str(target), weight_type=q.QuantType.QInt8,
                           per_channel=variant.per_channel, reduce_range=variant.reduce_range,
                           nodes_to_exclude=_grouped_convs(prepared))
        return
    tensors = list(calibration())
    method = "minmax" if variant.calibration_method == "entropy" else variant.calibration_method  # entropy: ORT's
    ranges = _recorded_ranges(prepared, tensors, method, variant.calibration_percentile)
    model = _load(prepared)
    float_nodes = mixed_range_outputs(model, ranges) if variant.separate_output_scales else []
    float_nodes += _known_nodes(model, variant.float_layers, recipe)
    # int8 activations as uint8: asymmetric, the same 256 steps of each range (the model computes the same), and
    # the type ONNX Runtime's x86 kernels take: its graph optimizations fuse every Conv (depthwise ones too) and Add
    # into integer kernels, where with int8 activations 15 of MobileNetV2's 52 Convs and its 10 Adds stay float
    # between Dequantize and Quantize (bench/peers.py: "ORT integer convs")
    options = dict(quant_format=q.QuantFormat.QDQ, per_channel=variant.per_channel, reduce_range=variant.reduce_range,
                   activation_type=q.QuantType.QInt16 if variant.mode == "int16x8" else q.QuantType.QUInt8,
                   weight_type=q.QuantType.QInt8, nodes_to_exclude=float_nodes)
    if variant.calibration_method == "entropy":  # ONNX Runtime's own calibrator
        q.quantize_static(str(prepared), str(target), _Calibration(recipe.input.name, tensors),
                          calibrate_method=q.CalibrationMethod.Entropy, **options)
    else:
        # min/max, percentile and mse ranges are recorded here (ranges.py) and handed to the quantizer as its
        # calibration cache: exact percentiles in bounded memory, the same ranges as the TFLite path's, where ONNX
        # Runtime's histogram calibrators hold every activation of every image and read a percentile off a bin
        # edge (splitting the share outside between both ends); and its min/max with CalibMaxIntermediateOutputs
        # drops each full chunk of outputs unmeasured.
        cache = target.with_name("ranges.json")
        _write_ranges(ranges, cache)
        q.quantize_static(str(prepared), str(target), None, calibrate_method=q.CalibrationMethod.MinMax,
                          calibration_cache_path=str(cache), **options)
        cache.unlink()
    if variant.separate_output_scales:
        _save(_float_outputs(_load(target)), target)
    if variant.weight_rounding in FITTED_ROUNDINGS:
        _fit_weights(prepared, target, tensors, every_layer=variant.fits_every_layer)
    if variant.bias_correction:
        _correct_biases(prepared, target, tensors)


def _float_outputs(model):
    """`model` (QDQ) with no QuantizeLinear -> DequantizeLinear pair in front of a graph output: the outputs
    are float, so rounding them to 8 bits only loses resolution (a classifier's top logits tie), and ONNX
    Runtime's fused integer kernels (QGemm, QLinearConv) write float outputs directly."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    for output in outputs:
        dequantize = producer.get(output)
        quantize = producer.get(dequantize.input[0]) if dequantize is not None else None
        if (dequantize is None or dequantize.op_type != "DequantizeLinear" or quantize is None
                or quantize.op_type != "QuantizeLinear" or readers.get(quantize.output[0]) != 1
                or quantize.input[0] in outputs or quantize.input[0] not in producer):
            continue
        computed = quantize.input[0]  # its producer now writes the output; its other readers read that
        for node in graph.node:
            node.input[:] = [output if name == computed else name for name in node.input]
            node.output[:] = [output if name == computed else name for name in node.output]
        graph.node.remove(quantize)
        graph.node.remove(dequantize)
    used = {name for node in graph.node for name in node.input}
    for unused in [i for i in graph.initializer if i.name not in used]:  # the pairs' scales and zero points
        graph.initializer.remove(unused)
    return model


def _recorded_ranges(model: Path, tensors: list[np.ndarray], method: str = "minmax",
                     percentile: float | None = None) -> dict[str, tuple[float, float]]:
    """{tensor name: (low, high)} of every float activation of `model` over `tensors` (see measure_ranges; the
    outputs keep their whole range, a sigmoid's or tanh's input stops where its output saturates)."""
    import onnx
    import onnxruntime as ort

    from ..quant.ranges import measure_ranges, readers_of, saturated_bounds

    augmented = _load(model)
    graph = augmented.graph
    whole = reaching_outputs(graph)  # before every activation is made an output
    outputs = {o.name for o in graph.output}
    bounds = saturated_bounds(readers_of((node.op_type, node.input, node.output) for node in graph.node), outputs)
    computed = {name for node in graph.node if node.op_type != "Constant" for name in node.output}
    graph.output.extend(v for v in graph.value_info if v.name in computed and v.name not in outputs
                        and v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT)
    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name

    def activations(tensor: np.ndarray):
        yield input_name, tensor
        yield from zip(names, session.run(names, {input_name: tensor}))

    return measure_ranges(activations, tensors, method, percentile, whole=whole, bounds=bounds)


ACTIVATIONS = ("Relu", "Clip", "Sigmoid", "HardSigmoid", "LeakyRelu")


def _known_nodes(model, names: tuple[str, ...], recipe: Recipe) -> list[str]:
    """The nodes float_layers names: a node, or a tensor as `mzconvert debug` lists them (its producer; an
    activation's with the conv or matmul before it, which QDQ quantizes as one)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    by_name = {node.name: node for node in graph.node}
    check_tensors(recipe, "variants[].float_layers", names, list(by_name) + list(producer))
    found = []
    for name in names:
        node = by_name.get(name) or producer[name]
        found.append(node.name)
        if node.op_type in ACTIVATIONS and (before := producer.get(node.input[0])) is not None:
            found.append(before.name)
    return found


def _write_ranges(ranges: dict[str, tuple[float, float]], path: Path) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.float32(low), highest=np.float32(high)) for name, (low, high) in ranges.items()}),
        path)


def _named_nodes(model):
    """Every node named: the quantizers select and exclude nodes by name, and an unnamed node matches ''."""
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def _ints(node, name: str, default: list[int]) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), default)


def _int(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _window(node, shape: tuple[int, int], kernel: tuple[int, int]):
    """The rounding.Window of an ONNX Conv with a `kernel` (height, width) over an input plane of `shape`."""
    from ..quant.rounding import Window

    strides, dilations = tuple(_ints(node, "strides", [1, 1])), tuple(_ints(node, "dilations", [1, 1]))
    auto_pad = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return Window.same(shape, kernel, strides, dilations, odd_pixel_after=auto_pad == "SAME_UPPER")
    pads = [0, 0, 0, 0] if auto_pad == "VALID" else _ints(node, "pads", [0, 0, 0, 0])
    return Window.padded(shape, kernel, strides, dilations, tuple(pads[:2]), tuple(pads[2:]))


def _fit_weights(prepared: Path, quantized: Path, tensors: list[np.ndarray], every_layer: bool) -> None:
    """weight_rounding fitted for a QDQ model: the int8 weight initializer of every depthwise Conv (every_layer:
    of every Conv, and of every Gemm whose weights are a transposed initializer, torch's Linear) refitted to its
    float twin in `prepared` on the float model's inputs to it over the first tensors (rounding.refit), the mean
    error left taken out of its int32 bias initializer."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from ..quant.rounding import MOMENT_IMAGES, PatchMoments, corrected_bias, refit

    floats = _load(prepared)
    weights = {i.name: i for i in floats.graph.initializer}

    def fitted(node) -> bool:
        """A depthwise 2-D Conv; every_layer: also one not grouped, or a Gemm (x W^T)."""
        if len(node.input) < 2 or node.input[1] not in weights:
            return False
        dims, group = weights[node.input[1]].dims, _int(node, "group", 1)
        if node.op_type == "Conv" and len(dims) == 4:
            return (group > 1 and dims[1] == 1) or (every_layer and group == 1)
        return every_layer and node.op_type == "Gemm" and _int(node, "transB", 0) == 1 and _int(node, "transA", 0) == 0

    layers = {n.name: n for n in floats.graph.node if fitted(n)}
    if not layers:
        return
    reads = list(dict.fromkeys(n.input[0] for n in layers.values()))
    known = {o.name for o in floats.graph.output}
    floats.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                               for name in reads if name not in known)
    session = ort.InferenceSession(floats.SerializeToString(), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    moments = PatchMoments()
    for tensor in tensors[:MOMENT_IMAGES]:
        values = dict(zip(reads, session.run(reads, {input_name: tensor})))
        for name, node in layers.items():
            if node.op_type == "Gemm":
                moments.add_dense(name, values[node.input[0]])
                continue
            plane = values[node.input[0]][0].transpose(1, 2, 0)  # NCHW -> (height, width, channels)
            kernel = tuple(weights[node.input[1]].dims[2:])
            window = _window(node, plane.shape[:2], kernel)
            if _int(node, "group", 1) > 1:  # depthwise
                moments.add(name, plane, window)
            else:
                moments.add_conv(name, plane, window, channel_major=True)
    model = _load(quantized)
    dequantized = _Dequantized(model)
    for node in model.graph.node:
        twin, stats = layers.get(node.name), moments.get(node.name)
        weight, scales = dequantized(node.input[1]) if twin is not None and stats is not None else (None, None)
        if weight is None or weight.data_type != onnx.TensorProto.INT8:
            continue
        nearest = numpy_helper.to_array(weight)
        channels = nearest.shape[0]
        w = numpy_helper.to_array(weights[twin.input[1]]).reshape(channels, -1).astype(np.float64)
        fitted_weights, mean_error, _, _ = refit(w, nearest.reshape(channels, -1).astype(np.float64),
                                                 np.broadcast_to(scales, (channels,)), stats)
        weight.CopyFrom(numpy_helper.from_array(fitted_weights.reshape(nearest.shape).astype(np.int8), weight.name))
        bias, steps = dequantized(node.input[2]) if len(node.input) > 2 else (None, None)
        if bias is not None and bias.data_type == onnx.TensorProto.INT32:
            bias.CopyFrom(numpy_helper.from_array(corrected_bias(numpy_helper.to_array(bias), mean_error, steps),
                                                  bias.name))
    _save(model, quantized)


class _Dequantized:
    """The quantized initializers of a QDQ model behind its symmetric DequantizeLinears: `(initializer, scales)`
    of the one feeding a tensor name, or (None, None); editing the initializer edits the model."""

    def __init__(self, model):
        self.stored = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}

    def __call__(self, name: str):
        from onnx import numpy_helper

        node, stored = self.producer.get(name), self.stored
        if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in stored or (
                len(node.input) > 2 and np.any(numpy_helper.to_array(stored[node.input[2]]) != 0)):
            return None, None
        return stored[node.input[0]], numpy_helper.to_array(stored[node.input[1]]).astype(np.float64)


BIAS_IMAGES = 64  # calibration images bias correction measures on (MobileNetV2: +0.8 dB on 500 images not among them)


def _correct_biases(prepared: Path, quantized: Path, tensors: list[np.ndarray]) -> None:
    """bias_correction: each Conv's and Gemm's int32 bias in the QDQ model, in graph order, shifted by the mean
    (per output channel, over the first BIAS_IMAGES calibration tensors and every position) by which its output
    differs from its float twin's in `prepared`, the error of the layers before it included, as NNCF's bias
    correction does. A shift is kept only where it lowers the model's output error on those tensors (each output's
    squared error relative to its float power): a mean measured before a ReLU is not the mean the next layer
    sees, and on MobileNetV2 correcting every layer regardless lost 8.9 dB of logits SQNR where the kept ones
    gained 0.8."""
    import onnx
    from onnx import numpy_helper

    images = tensors[:BIAS_IMAGES]
    floats, model = _load(prepared), _load(quantized)
    twins = {n.name: n for n in floats.graph.node if n.op_type in ("Conv", "Gemm")}
    dequantized = _Dequantized(model)
    layers = []
    for node in model.graph.node:
        bias, steps = dequantized(node.input[2]) if node.name in twins and len(node.input) > 2 else (None, None)
        if bias is not None and bias.data_type == onnx.TensorProto.INT32:
            layers.append((node, twins[node.name], bias, steps))
    if not layers:
        return
    outputs = [o.name for o in model.graph.output]
    means = [twin.output[0] for _, twin, _, _ in layers]
    reference, float_means = [], {name: 0.0 for name in means}
    for run in _runs(floats, outputs + means, images):  # image by image: every layer's output of one at a time
        reference.append(run[:len(outputs)])
        for name, values in zip(means, run[len(outputs):]):
            float_means[name] = float_means[name] + _channel_means(values) / len(images)
    power = [max(float(np.mean([np.mean(r[i] ** 2) for r in reference])), 1e-30) for i in range(len(outputs))]

    def measure(start: int) -> tuple[float, dict[int, np.ndarray]]:
        """One pass of the QDQ model as it is now: its output error (each output's squared error relative to its
        float power) and the per-channel output mean of every layer from `start` on ({layer index: mean}). A layer's
        mean is read from the latest pass over the model as it stands when its turn comes: one pass per shift tried,
        none per layer."""
        names = [node.output[0] for node, _, _, _ in layers[start:]]
        errors, means = [[] for _ in outputs], [[] for _ in names]
        for got, want in zip(_runs(model, outputs + names, images, defined=True), reference):
            for i in range(len(outputs)):
                errors[i].append(np.mean((got[i] - want[i]) ** 2))
            for j in range(len(names)):
                means[j].append(_channel_means(got[len(outputs) + j]))
        return (sum(np.mean(errors[i]) / power[i] for i in range(len(outputs))),
                {start + j: np.mean(means[j], axis=0) for j in range(len(names))})

    best, means = measure(0)
    for index, (node, twin, bias, steps) in enumerate(layers):
        shift = np.round((float_means[twin.output[0]] - means[index]) / steps).astype(np.int64)
        if not shift.any():
            continue
        before = numpy_helper.to_array(bias)
        bias.CopyFrom(numpy_helper.from_array((before + shift).astype(np.int32), bias.name))
        tried, tried_means = measure(index + 1)
        if tried < best:
            best, means = tried, tried_means
        else:
            bias.CopyFrom(numpy_helper.from_array(before, bias.name))
    _save(model, quantized)


def _runs(model, names: list[str], tensors: list[np.ndarray], defined: bool = False):
    """`names` (graph outputs or any tensors) of `model`, for each of `tensors`; `defined`: a QDQ model as its
    ops define it (OnnxRunner)."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in dict.fromkeys(names) if name not in known)
    options = ort.SessionOptions()
    if defined:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    return (session.run(names, {feed: tensor}) for tensor in tensors)


def _channel_means(values: np.ndarray) -> np.ndarray:
    """Per channel (axis 1 of NCHW, or of a Gemm's (batch, features)), over the batch and every position."""
    return values.swapaxes(0, 1).reshape(values.shape[1], -1).mean(axis=1, dtype=np.float64)


def _grouped_convs(model: Path) -> list[str]:
    """Grouped (depthwise) convolutions, which dynamic quantization leaves float: ONNX Runtime's ConvInteger
    runs the groups one after another (measured on MobileNetV2: the whole model 2x slower than with them
    float), and their weights are a small share of a model's size."""
    return [node.name for node in _load(model).graph.node if node.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in node.attribute)]


def _topologically_sorted(model):
    """ORT's float16 converter appends its input Casts at the end; ONNX requires producers first."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise MzError(f"graph {graph.name!r} has a cycle or a missing input")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    graph.ClearField("node")
    graph.node.extend(ordered)
    return model


def _check_quantized(path: Path, variant: Variant) -> None:
    """The quantizers skip what they cannot handle without a word: count what they inserted."""
    graph = _load(path).graph
    ops = [node.op_type for node in graph.node]
    expected = {"int8": ("DequantizeLinear",), "int16x8": ("DequantizeLinear",),
                "dynamic": ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul")
                }.get(variant.mode)
    if expected and not any(op in expected for op in ops):
        raise MzError(f"{path}: variant {variant.name!r} ({variant.mode}) has no {' or '.join(expected)} node: "
                      "nothing was quantized")
    if variant.mode == "float16":
        import onnx

        if not any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer):
            raise MzError(f"{path}: variant {variant.name!r} (float16) has no float16 weights")
