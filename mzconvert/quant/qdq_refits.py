"""A QDQ model's quantized initializers refitted to the float model it was quantized from (ONNX int8, after ONNX
Runtime's quantizer wrote it): int8 weights rounded to fit the calibration images (weight_rounding, the math in
rounding.py) and int32 biases corrected for the mean error of the layers before them (bias_correction). Each
reads the float twin of a layer by its node name, which the quantizer keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _ints(node, name: str, default: list[int]) -> list[int]:
    return next((list(a.ints) for a in node.attribute if a.name == name), default)


def _int(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _window(node, shape: tuple[int, int], kernel: tuple[int, int]):
    """The rounding.Window of an ONNX Conv with a `kernel` (height, width) over an input plane of `shape`."""
    from .rounding import Window

    strides, dilations = tuple(_ints(node, "strides", [1, 1])), tuple(_ints(node, "dilations", [1, 1]))
    auto_pad = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return Window.same(shape, kernel, strides, dilations, odd_pixel_after=auto_pad == "SAME_UPPER")
    pads = [0, 0, 0, 0] if auto_pad == "VALID" else _ints(node, "pads", [0, 0, 0, 0])
    return Window.padded(shape, kernel, strides, dilations, tuple(pads[:2]), tuple(pads[2:]))


def fit_weights(prepared: Path, quantized: Path, tensors: list[np.ndarray], every_layer: bool) -> None:
    """weight_rounding fitted for a QDQ model: the int8 weight initializer of every depthwise Conv (every_layer:
    of every Conv, and of every Gemm whose weights are a transposed initializer, torch's Linear) refitted to its
    float twin in `prepared` on the float model's inputs to it over the first tensors (rounding.refit), the mean
    error left taken out of its int32 bias initializer."""
    import onnx
    from onnx import numpy_helper

    from .rounding import MOMENT_IMAGES, PatchMoments, corrected_bias, refit

    floats = onnx.load(str(prepared))
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
    moments = PatchMoments()
    for run in _runs(floats, reads, tensors[:MOMENT_IMAGES]):
        values = dict(zip(reads, run))
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
    model = onnx.load(str(quantized))
    dequantized = Dequantized(model)
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
    onnx.save(model, str(quantized))


class Dequantized:
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


def correct_biases(prepared: Path, quantized: Path, tensors: list[np.ndarray]) -> None:
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
    floats, model = onnx.load(str(prepared)), onnx.load(str(quantized))
    twins = {n.name: n for n in floats.graph.node if n.op_type in ("Conv", "Gemm")}
    dequantized = Dequantized(model)
    layers = []
    for node in model.graph.node:
        bias, steps = dequantized(node.input[2]) if node.name in twins and len(node.input) > 2 else (None, None)
        if bias is not None and bias.data_type == onnx.TensorProto.INT32:
            layers.append((node, twins[node.name], bias, steps))
    if not layers:
        return
    outputs = [o.name for o in model.graph.output]
    twin_outputs = [twin.output[0] for _, twin, _, _ in layers]
    reference, float_means = [], {name: 0.0 for name in twin_outputs}
    for run in _runs(floats, outputs + twin_outputs, images):  # image by image: every layer's output of one at a time
        reference.append(run[:len(outputs)])
        for name, values in zip(twin_outputs, run[len(outputs):]):
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
    for index, (_, twin, bias, steps) in enumerate(layers):
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
    onnx.save(model, str(quantized))


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
