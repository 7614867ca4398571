"""The float twin of a quantized model (.tflite, ONNX QDQ): the network its integer weights define, in float.

A file quantized by someone else (onnx2tf's or Ultralytics' int8, ONNX Runtime's QDQ, a published uint8 model)
comes without the float model it was made from, so there was nothing to verify it against: a file whose int8
outputs round every class score to 0 would be built and shipped. Its twin is that float model as far as the file
still holds it: every integer weight and bias at its dequantized value, every activation float (no rounding, no
clipping to the activation ranges), each QUANTIZE and DEQUANTIZE (QuantizeLinear, DequantizeLinear) gone. What the
file's integer arithmetic loses against the twin is its quantization's loss, which verify judges by the floors it
judges our own variants by.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError
from ..tflite_file import add_buffer, op_names, read_model, schema, write_model

# the integer tensor types a quantized file's weights and activations take, as numpy reads their buffers
_INTEGER_TYPES = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64}


class FloatTwinRunner:
    """A backend's GraphRunner (mixed in before its runner class): the source model, or where `is_quantized(path)`
    its float twin (`is_twin`), which `write_twin(source, target)` writes into a temporary folder that lives as long
    as the runner; run at the recipe's cut outputs."""

    is_quantized: Callable[[Path], bool]
    write_twin: Callable[[Path, Path], Path]

    def __init__(self, model: Path, recipe, threads: int = 1):
        self.is_twin = self.is_quantized(model)
        if self.is_twin:
            self._twin_folder = tempfile.TemporaryDirectory(prefix="mzconvert-twin-")
            model = self.write_twin(model, Path(self._twin_folder.name) / model.name)
        super().__init__(model, recipe.cut_outputs, threads)
        self.output_names = [o.name for o in self.outputs]


def is_quantized_tflite(path: Path) -> bool:
    """Whether any tensor of the file carries a quantization scale (full-integer, int16x8 or dynamic-range)."""
    s = schema()
    model = s.Model.GetRootAsModel(path.read_bytes(), 0)
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            q = graph.Tensors(t).Quantization()
            if q is not None and q.ScaleLength():
                return True
    return False


def write_tflite_float_twin(source: Path, target: Path) -> Path:
    """`target`: the float twin of the quantized `source` (see the module's docstring), its inputs, outputs and
    tensor names those of the source."""
    s = schema()
    model = read_model(source)
    types = {getattr(s.TensorType, name): dtype for name, dtype in _INTEGER_TYPES.items()}
    for index, graph in enumerate(model.subgraphs):
        for tensor in graph.tensors:
            scales = _scales(tensor)
            if scales is None:
                continue
            if tensor.type not in types:
                raise MzError(f"{source}: tensor {tensor.name.decode()!r} is quantized in a type the float twin "
                              f"cannot read (TensorType {tensor.type}); verify needs a float model to compare with")
            data = model.buffers[tensor.buffer].data
            if data is not None and len(data):  # a weight or a bias: its dequantized values
                q = tensor.quantization
                values = np.frombuffer(bytes(bytearray(data)), types[tensor.type]).astype(np.float64)
                values = values.reshape([int(d) for d in tensor.shape]) if tensor.shape is not None else values
                zero_points = np.asarray(q.zeroPoint if q.zeroPoint is not None else [0], np.float64)
                if scales.size > 1:  # per channel, along the quantized dimension
                    shape = [1] * values.ndim
                    shape[q.quantizedDimension] = scales.size
                    scales, zero_points = scales.reshape(shape), zero_points.reshape(shape)
                tensor.buffer = add_buffer(model, ((values - zero_points) * scales).astype(np.float32).tobytes())
            tensor.type, tensor.quantization = s.TensorType.FLOAT32, None
        _drop_conversions(model, index)
    model.signatureDefs = []  # the twin is run by its graph's inputs and outputs, never shipped
    return write_model(model, target)


def _scales(tensor) -> np.ndarray | None:
    q = tensor.quantization
    if q is None or q.scale is None or not len(q.scale):
        return None
    return np.asarray(q.scale, np.float64)


def _drop_conversions(model, subgraph: int) -> None:
    """Each QUANTIZE and DEQUANTIZE of `graph` (float <-> integer at the edges, integer rescales inside, integer
    weights read as float), float to float in the twin, taken out: what read its output reads its input. Where its
    output is one of the graph's, the op that made its input writes that output instead, so the graph's outputs
    keep their tensors and names."""
    graph = model.subgraphs[subgraph]
    conversions = [op for op, name in zip(graph.operators, op_names(model, subgraph))
                   if name in ("QUANTIZE", "DEQUANTIZE")]
    graph.operators = [op for op in graph.operators if all(op is not c for c in conversions)]
    producers = {t: op for op in graph.operators for t in op.outputs}
    for k, op in enumerate(conversions):
        source, output = op.inputs[0], op.outputs[0]
        data = model.buffers[graph.tensors[source].buffer].data
        producer = producers.get(source)
        readers = sum(source in other.inputs for other in graph.operators + conversions[k + 1:])
        if data is not None and len(data):  # a constant read through the op: the constant itself
            graph.tensors[output].buffer = graph.tensors[source].buffer
        elif output in graph.outputs and producer is not None and source not in graph.outputs and not readers:
            producer.outputs = [output if t == source else t for t in producer.outputs]
            producers[output] = producer
        else:
            for other in graph.operators + conversions[k + 1:]:
                other.inputs = [source if t == output else t for t in other.inputs]
            graph.outputs = [source if t == output else t for t in graph.outputs]


# ONNX ops of quantized graphs the twin cannot read back to float ops: dynamic quantization, QOperator kernels
_INTEGER_ONNX_OPS = ("DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
                     "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearConcat", "QLinearAveragePool",
                     "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSoftmax", "QGemm")


def onnx_float_twin(model, source: Path):
    """The float twin (see the module's docstring) of a QDQ ONNX model (ModelProto, edited in place and returned):
    each DequantizeLinear of a stored weight or bias the float initializer it computes, each other
    QuantizeLinear and DequantizeLinear taken out (what read its output reads its input; a graph output it made
    names the tensor the pair was made from), but for the clamp of an activation ONNX Runtime folded into a
    quantization range (_folded_activation)."""
    from onnx import TensorProto, helper, numpy_helper

    integer_types = (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16)
    graph = model.graph
    if integer := sorted({n.op_type for n in graph.node} & set(_INTEGER_ONNX_OPS)):
        raise MzError(f"{source}: quantized with {', '.join(integer)}: only a QDQ graph (QuantizeLinear and "
                      "DequantizeLinear around float ops, ONNX Runtime's QuantFormat.QDQ) has a float twin to verify "
                      "it against; give its float export", EXIT_BAD_INPUT)
    stored = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    stored |= {n.output[0]: numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"}
    producers = {output: n.op_type for n in graph.node for output in n.output}
    weights, standing_for, kept = [], {}, []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in stored:
            weights.append(numpy_helper.from_array(_dequantized(node, stored), node.output[0]))
        elif node.op_type == "QuantizeLinear" and producers.get(node.input[0]) in _ACTIVATION_HOSTS \
                and (bounds := _folded_activation(node, stored)) is not None:
            names = [f"{node.output[0]}/twin_{end}" for end in ("min", "max")]
            weights += [numpy_helper.from_array(np.float32(bound), name) for bound, name in zip(bounds, names)]
            kept.append(helper.make_node("Clip", [node.input[0], *names], [node.output[0]]))
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            standing_for[node.output[0]] = node.input[0]
        else:
            kept.append(node)

    def resolved(name: str) -> str:
        while name in standing_for:
            name = standing_for[name]
        return name

    for node in kept:
        node.input[:] = [resolved(name) for name in node.input]
    ends = {i.name for i in graph.input} | {o.name for o in graph.output}
    for output in (o.name for o in graph.output if o.name in standing_for):
        made = resolved(output)
        if made in ends:  # the graph's input or another output: an Identity gives it this output's name
            kept.append(helper.make_node("Identity", [made], [output]))
            continue
        for node in kept:  # the tensor its Q/DQ pair was made from takes the output's name, as a float export has it
            node.input[:] = [output if name == made else name for name in node.input]
            node.output[:] = [output if name == made else name for name in node.output]
    read = {name for node in kept for name in node.input}
    initializers = [i for i in graph.initializer if i.name in read] + [w for w in weights if w.name in read]
    for value in [*graph.input, *graph.output]:  # an integer input or output of the file: float in the twin
        if value.type.tensor_type.elem_type in integer_types:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.node[:], graph.initializer[:], graph.value_info[:]
    graph.node.extend(n for n in kept if n.op_type != "Constant" or n.output[0] in read)
    graph.initializer.extend(initializers)
    return model


# the ops whose Relu or Clip ONNX Runtime's QDQ quantizer folds into the range of their output
_ACTIVATION_HOSTS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add")
# each integer type's lowest and highest value, as a QuantizeLinear saturates to them
_INTEGER_RANGES = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127), np.dtype(np.uint16): (0, 65535),
                   np.dtype(np.int16): (-32768, 32767)}


def _folded_activation(node, stored: dict) -> tuple[float, float] | None:
    """The clamp a QuantizeLinear of an _ACTIVATION_HOSTS output whose range starts at exactly 0 (its zero point the
    type's lowest value) stands for, (0, its range's top); else None. ONNX Runtime's QDQ quantizer removes a Relu or
    Clip after such an op and lets that range do its work (its ranges are the activation's outputs), so without the
    clamp the twin would compute another function. The top is the calibrated one (a Clip's own bound is gone):
    values above it the twin clips as the file does."""
    if len(node.input) < 3 or node.input[2] not in stored or node.input[1] not in stored:
        return None
    zero_point, scale = stored[node.input[2]], stored[node.input[1]]
    if zero_point.size != 1 or scale.size != 1 or zero_point.dtype not in _INTEGER_RANGES:
        return None
    low, high = _INTEGER_RANGES[zero_point.dtype]
    if int(zero_point) != low:
        return None
    return 0.0, float((high - low) * scale.astype(np.float64))


def _dequantized(node, stored: dict) -> np.ndarray:
    """A DequantizeLinear of stored values: (x - zero point) x scale, per tensor or along its `axis`."""
    values = stored[node.input[0]].astype(np.float64)
    scale = stored[node.input[1]].astype(np.float64)
    zero_point = stored[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    if scale.ndim == 1 and values.ndim > 1:  # per channel, along its axis (1 unless the node says)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % values.ndim
        shape = [1] * values.ndim
        shape[axis] = scale.size
        scale = scale.reshape(shape)
        zero_point = np.reshape(zero_point, shape) if np.ndim(zero_point) else zero_point
    return ((values - zero_point) * scale).astype(np.float32)
