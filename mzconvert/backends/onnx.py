"""ONNX sources (and PyTorch modules exported to ONNX), quantized with onnxruntime.quantization."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError, RecipeError, short_text
from ..quant.output_scales import mixed_range_outputs, reaching_outputs
from ..quant.qdq_refits import correct_biases, fit_weights
from ..quant.tflite_converter import converter_range_slots, run_converter
from ..recipe import Recipe, Variant
from ..recipe.schema import CALIBRATED_MODES, FITTED_ROUNDINGS, TORCH_FORMATS
from ..runtime import OnnxRunner, is_quantized_onnx
from . import StripResult, check_tensors, export_anchors, nhwc_port, torch_sources
from .float_twin import FloatTwinRunner, onnx_float_twin
from .onnx_float16 import as_float32, topologically_sorted
from .split_head import split_levels
from .split_joins import onnx_split_joins_apart


def _load(path: Path, widen_float16: bool = False):
    """The model, checked; with widen_float16 one stored in float16 as the float32 model it rounds (onnx_float16:
    ORT's float16 converter leaves the graph unsorted, which the checker refuses)."""
    import onnx

    try:
        model = onnx.load(str(path))
        if widen_float16:
            model = as_float32(model)
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
    """A checked, shape-inferred ONNX model; torch sources are built, loaded and exported first; a float16 model
    read as float32 (onnx_float16); a YOLOv5 head's levels split into boxes and scores (split_head), and a Split of
    what Concats joined made of the parts, never joined (split_joins: an older YOLOv8 head's box and class logits)."""
    import onnx

    target = out_dir / "model.onnx"
    if recipe.format in TORCH_FORMATS:
        torch_sources.export_onnx(source, recipe, target)
        model = _load(target)
    else:
        model = _load(source, widen_float16=True)  # a corrupt download is reported by its own name
    model = _at_least_opset(_with_input_shape(model, recipe, source), PER_CHANNEL_OPSET, source)
    model = onnx_split_joins_apart(split_levels(model, recipe))
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


class GraphRunner(FloatTwinRunner, OnnxRunner):
    """The float ONNX model: the reference every variant is compared with; a QDQ source's float twin."""

    is_quantized = staticmethod(is_quantized_onnx)

    @staticmethod
    def write_twin(source: Path, target: Path) -> Path:
        return _save(onnx_float_twin(_load(source), source), target)


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

    if is_quantized_onnx(model):  # a quantized source: the file as it is, verified against its float twin
        if variant.mode not in ("int8", "int16x8") or variant.calibration or variant.target == "tflite":
            raise RecipeError(f"{recipe.path}: variants: {variant.name}: the source is quantized already: it is "
                              "taken as it is, one ONNX int8 variant without calibration; a float, calibrated or "
                              "TFLite variant is made from its float export (Ultralytics: without int8=True)")
        target = Path(shutil.copyfile(model, out_dir / f"{recipe.name}_{variant.name}.onnx"))
        _check_quantized(target, variant)
        return target
    if variant.mode in CALIBRATED_MODES and not variant.calibration:
        raise RecipeError(f"{recipe.path}: variants: {variant.name}: missing calibration: the source is float, and "
                          f"{variant.mode} is calibrated on images (a quantized source, QDQ, is taken as it is)")
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
        _save(topologically_sorted(convert_float_to_float16(_load(model), keep_io_types=True)), target)
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
    ranges = _recorded_ranges(prepared, tensors, method, variant.calibration_percentile,
                              recipe.sigmoid_read_outputs if recipe else ())
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
        fit_weights(prepared, target, tensors, every_layer=variant.fits_every_layer)
    if variant.bias_correction:
        correct_biases(prepared, target, tensors)


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
                     percentile: float | None = None, sigmoid_read: tuple[str, ...] = ()
                     ) -> dict[str, tuple[float, float]]:
    """{tensor name: (low, high)} of every float activation of `model` over `tensors` (see measure_ranges; the
    outputs keep their whole range, those in `sigmoid_read` the part a sigmoid's band holds, a sigmoid's or
    tanh's input stops where its output saturates)."""
    import onnx
    import onnxruntime as ort

    from ..quant.ranges import measure_ranges, readers_of, saturated_bounds

    augmented = _load(model)
    graph = augmented.graph
    whole = reaching_outputs(graph)  # before every activation is made an output
    outputs = {o.name for o in graph.output}
    bounds = saturated_bounds(readers_of((node.op_type, node.input, node.output) for node in graph.node), outputs,
                              [name for name in sigmoid_read if name in outputs])
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


def _grouped_convs(model: Path) -> list[str]:
    """Grouped (depthwise) convolutions, which dynamic quantization leaves float: ONNX Runtime's ConvInteger
    runs the groups one after another (measured on MobileNetV2: the whole model 2x slower than with them
    float), and their weights are a small share of a model's size."""
    return [node.name for node in _load(model).graph.node if node.op_type == "Conv"
            and any(a.name == "group" and a.i > 1 for a in node.attribute)]


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
