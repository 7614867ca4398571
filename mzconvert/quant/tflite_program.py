"""An int8 .tflite model run in torch for weight tuning (quant/tuning.py): each op on the real values its int8
tensors hold, its output rounded to that tensor's scale and zero point as LiteRT's kernels round it (a LOGISTIC's
fixed 1/256 grid, the one scale a CONCATENATION shares with its inputs: the converter wrote them into the
tensors), the int8 weights and int32 biases of its convolutions and fully-connected layers trainable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MzError
from ..runtime import output_order
from ..tflite_file import copied_model, op_names, read_model, rewrite_constant, schema, write_model
from .fake_quant import TrainedIntegers, fake_quantize

# the op, the index of its weights' output-channel axis (TFLite layouts: OHWI, 1HW(I*M), OI)
TRAINED_OPS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}
TYPES = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
         "FLOAT32": np.float32}


class TfliteProgram:
    """A one-subgraph int8 .tflite run in torch: every tensor its real values, the int8 weights of its CONV_2D,
    DEPTHWISE_CONV_2D and FULLY_CONNECTED ops and their int32 biases trainable, in units of each layer's weight
    steps; its outputs in the order of the recipe's `names`."""

    def __init__(self, path: Path, names: list[str]):
        import torch

        self.model = read_model(path)
        if len(self.model.subgraphs) != 1:
            raise MzError(f"tune_steps: {path} has {len(self.model.subgraphs)} subgraphs; tuning runs one")
        self.graph = graph = self.model.subgraphs[0]
        self.ops = op_names(self.model)
        for name in self.ops:  # named before the images are run through the float model and judged
            if name not in OPS:
                raise MzError(f"tune_steps: the model has a {name} op, which tuning does not run (it runs "
                              f"{', '.join(sorted(OPS))})")
        type_names = {value: name for name, value in vars(schema().TensorType).items() if not name.startswith("_")}
        self.types = [np.dtype(TYPES.get(type_names.get(t.type), np.float32)) for t in graph.tensors]
        self.constants = {}
        for index, tensor in enumerate(graph.tensors):
            data = self.model.buffers[tensor.buffer].data if tensor.buffer else None
            if data is not None and len(data):
                self.constants[index] = np.frombuffer(bytes(data), self.types[index]).reshape(_shape(tensor))
        self.tensors = {i: torch.from_numpy(np.array(self._real(i, v))) for i, v in self.constants.items()}
        found = [graph.tensors[i].name.decode() for i in graph.outputs]
        self.outputs = [graph.outputs[i] for i in output_order(found, names)]
        self.trained: dict[int, TrainedIntegers] = {}  # tensor index: its trainable integers
        for op, name in zip(graph.operators, self.ops):
            if name in TRAINED_OPS and op.inputs[1] in self.constants and self.types[op.inputs[1]] == np.int8:
                scale, zero = self._terms(op.inputs[1], TRAINED_OPS[name])
                self._train(op.inputs[1], scale, zero, scale)
                if len(op.inputs) > 2 and op.inputs[2] in self.constants:
                    self._train(op.inputs[2], *self._terms(op.inputs[2], 0), scale.reshape(-1))

    def _quantization(self, index: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        q = self.graph.tensors[index].quantization
        if q is None or q.scale is None or not len(q.scale):
            return None
        zero = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros(len(q.scale)), np.float32)
        return np.asarray(q.scale, np.float32), zero, q.quantizedDimension

    def _terms(self, index: int, axis: int):
        import torch

        scale, zero, _ = self._quantization(index)
        shape = [1] * len(_shape(self.graph.tensors[index]))
        if scale.size > 1:
            shape[axis] = -1
        return torch.from_numpy(np.array(scale.reshape(shape))), torch.from_numpy(np.array(zero.reshape(shape)))

    def _real(self, index: int, values: np.ndarray) -> np.ndarray:
        """A constant as the real values it stands for."""
        quantization = self._quantization(index)
        if quantization is None or values.dtype == np.float32:
            return np.array(values)
        scale, zero, axis = quantization
        shape = [1] * values.ndim
        if scale.size > 1:
            shape[axis] = -1
        return ((values.astype(np.float32) - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)

    def _train(self, index: int, scale, zero, unit) -> None:
        self.trained[index] = TrainedIntegers(self.constants[index], scale, zero, unit)

    def parameters(self) -> list:
        return [trained.value for trained in self.trained.values()]

    def write(self, target: Path) -> None:
        """The model with the tuned integers, to `target` (a constant stored once for several tensors gets a
        buffer of its own)."""
        model = copied_model(self.model)
        graph = model.subgraphs[0]
        for index, trained in self.trained.items():
            rewrite_constant(model, graph.tensors[index], trained.integers().tobytes())
        write_model(model, target)

    def rounded(self, value, index: int):
        """`value` as tensor `index` holds it: on its integer grid, where it has one."""
        quantization = self._quantization(index)
        if quantization is None or self.types[index] not in (np.int8, np.uint8, np.int16):
            return value
        scale, zero, _ = quantization
        return fake_quantize(value, float(scale[0]), float(zero[0]), self.types[index])

    def _value(self, index: int, env: dict):
        """Tensor `index`'s real values: computed, trained or constant (None: an optional input left out)."""
        if index < 0:
            return None
        if index in self.trained:
            return self.trained[index].real()
        return env.get(index, self.tensors.get(index))

    def __call__(self, tensor: np.ndarray) -> list:
        """The outputs (`names`' order) of one image's tensor (in the recipe's layout: NCHW is transposed)."""
        import torch

        graph = self.graph
        (model_input,) = graph.inputs
        shape = tuple(_shape(graph.tensors[model_input]))
        if tensor.ndim == 4 and tensor.shape != shape and tensor.transpose(0, 2, 3, 1).shape == shape:
            tensor = tensor.transpose(0, 2, 3, 1)
        env = {model_input: self.rounded(torch.from_numpy(np.ascontiguousarray(tensor, np.float32)), model_input)}
        for op, name in zip(graph.operators, self.ops):
            inputs = [self._value(i, env) for i in op.inputs]
            produced = OPS[name](op, inputs, [list(_shape(graph.tensors[i])) for i in op.outputs])
            for index, value in zip(op.outputs, produced if isinstance(produced, tuple) else (produced,)):
                env[index] = self.rounded(value, index)
        return [env[index] for index in self.outputs]


def _shape(tensor) -> list[int]:
    return [int(d) for d in (tensor.shape if tensor.shape is not None else [])]


def _activation(value, code: int):
    """A fused activation (ActivationFunctionType): NONE, RELU, RELU_N1_TO_1, RELU6, TANH."""
    import torch

    if code == 0:
        return value
    if code == 1:
        return torch.relu(value)
    if code == 2:
        return value.clamp(-1, 1)
    if code == 3:
        return value.clamp(0, 6)
    if code == 4:
        return torch.tanh(value)
    raise MzError(f"tune_steps: fused activation {code} is not one tuning runs")


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's SAME padding of one spatial axis: (before, after), the odd pixel after."""
    effective = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _padded(x, options, kernel: tuple[int, int], value: float = 0.0):
    """x (NCHW) padded as `options.padding` asks (SAME: 0 = SAME in TFLite's Padding enum)."""
    import torch.nn.functional as F

    if options.padding != 0:
        return x
    dilations = (getattr(options, "dilationHFactor", 1) or 1, getattr(options, "dilationWFactor", 1) or 1)
    (top, bottom), (left, right) = (_same_padding(x.shape[2 + i], kernel[i], (options.strideH, options.strideW)[i],
                                                  dilations[i]) for i in range(2))
    return F.pad(x, (left, right, top, bottom), value=value)


def _conv(op, inputs, shapes):
    import torch.nn.functional as F

    x, weight, bias = inputs[0].permute(0, 3, 1, 2), inputs[1], inputs[2] if len(inputs) > 2 else None
    o = op.builtinOptions
    weight = weight.permute(0, 3, 1, 2)  # OHWI -> OIHW
    x = _padded(x, o, tuple(weight.shape[2:]))
    groups = x.shape[1] // weight.shape[1]
    out = F.conv2d(x, weight, bias, (o.strideH, o.strideW), 0, (o.dilationHFactor, o.dilationWFactor), groups)
    return _activation(out.permute(0, 2, 3, 1), o.fusedActivationFunction)


def _depthwise(op, inputs, shapes):
    import torch.nn.functional as F

    x, weight, bias = inputs[0].permute(0, 3, 1, 2), inputs[1], inputs[2] if len(inputs) > 2 else None
    o = op.builtinOptions
    weight = weight.permute(3, 0, 1, 2)  # 1HW(I*M) -> (I*M)1HW
    x = _padded(x, o, tuple(weight.shape[2:]))
    out = F.conv2d(x, weight, bias, (o.strideH, o.strideW), 0, (o.dilationHFactor, o.dilationWFactor), x.shape[1])
    return _activation(out.permute(0, 2, 3, 1), o.fusedActivationFunction)


def _transpose_conv(op, inputs, shapes):
    """A TRANSPOSE_CONV (a segmentation head's mask upsampling; inputs: output shape, OHWI weights, input, bias)
    run as it is, its weights not tuned: the full transposed convolution cropped to the output as SAME or VALID
    padding crops it (the odd pixel after)."""
    import torch.nn.functional as F

    o = op.builtinOptions
    x, weight = inputs[2].permute(0, 3, 1, 2), inputs[1].permute(3, 0, 1, 2)  # OHWI -> IOHW
    bias = inputs[3] if len(inputs) > 3 else None
    full = F.conv_transpose2d(x, weight, bias, (o.strideH, o.strideW))
    height, width = shapes[0][1:3]
    top, left = ((full.shape[2] - height) // 2, (full.shape[3] - width) // 2) if o.padding == 0 else (0, 0)
    out = full[:, :, top:top + height, left:left + width]
    return _activation(out.permute(0, 2, 3, 1), getattr(o, "fusedActivationFunction", 0) or 0)


def _fully_connected(op, inputs, shapes):
    x, weight = inputs[0], inputs[1]
    out = x.reshape(-1, weight.shape[1]) @ weight.T
    if len(inputs) > 2 and inputs[2] is not None:
        out = out + inputs[2]
    return _activation(out.reshape(shapes[0]), op.builtinOptions.fusedActivationFunction)


def _pool(kind: str):
    def run(op, inputs, shapes):
        import torch.nn.functional as F

        o = op.builtinOptions
        x = inputs[0].permute(0, 3, 1, 2)
        kernel = (o.filterHeight, o.filterWidth)
        if kind == "max":
            out = F.max_pool2d(_padded(x, o, kernel, float("-inf")), kernel, (o.strideH, o.strideW))
        else:
            if o.padding == 0 and x.shape[2:] != _padded(x, o, kernel).shape[2:]:
                raise MzError("tune_steps: an AVERAGE_POOL_2D with SAME padding is not one tuning runs")
            out = F.avg_pool2d(x, kernel, (o.strideH, o.strideW))
        return _activation(out.permute(0, 2, 3, 1), o.fusedActivationFunction)
    return run


def _binary(function: str):
    def run(op, inputs, shapes):
        import torch

        out = getattr(torch, function)(inputs[0], inputs[1])
        return _activation(out, getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0)
    return run


def _concatenation(op, inputs, shapes):
    import torch

    return _activation(torch.cat(inputs, op.builtinOptions.axis), op.builtinOptions.fusedActivationFunction)


def _constant(inputs, position: int) -> np.ndarray:
    return inputs[position].detach().numpy().astype(np.int64)


def _split(op, inputs, shapes):
    import torch

    axis = int(_constant(inputs, 0).reshape(-1)[0])
    return tuple(torch.split(inputs[1], [s[axis] for s in shapes], axis))


def _split_v(op, inputs, shapes):
    import torch

    axis = int(_constant(inputs, 2).reshape(-1)[0])
    return tuple(torch.split(inputs[0], [s[axis] for s in shapes], axis))


def _strided_slice(op, inputs, shapes):
    o = op.builtinOptions
    if o.ellipsisMask or o.newAxisMask:
        raise MzError("tune_steps: a STRIDED_SLICE with an ellipsis or new axis is not one tuning runs")
    x = inputs[0]
    begin, end, strides = (_constant(inputs, i) for i in (1, 2, 3))
    index = []
    for axis in range(x.dim()):
        start = None if o.beginMask >> axis & 1 else int(begin[axis])
        stop = None if o.endMask >> axis & 1 else int(end[axis])
        if o.shrinkAxisMask >> axis & 1:
            index.append(int(begin[axis]))
        else:
            index.append(slice(start, stop, int(strides[axis])))
    return x[tuple(index)]


def _pad(op, inputs, shapes):
    import torch.nn.functional as F

    pads = _constant(inputs, 1)
    return F.pad(inputs[0], [int(v) for pair in pads[::-1] for v in pair])


def _resize_nearest(op, inputs, shapes):
    import torch.nn.functional as F

    x = inputs[0].permute(0, 3, 1, 2)
    size = shapes[0][1:3]
    if op.builtinOptions.alignCorners or size[0] % x.shape[2] or size[1] % x.shape[3]:
        raise MzError("tune_steps: a RESIZE_NEAREST_NEIGHBOR by other than a whole factor is not one tuning runs")
    return F.interpolate(x, size=size, mode="nearest").permute(0, 2, 3, 1)


def _resize_bilinear(op, inputs, shapes):
    import torch.nn.functional as F

    o = op.builtinOptions
    if not (o.alignCorners or o.halfPixelCenters):
        raise MzError("tune_steps: a RESIZE_BILINEAR without half-pixel centers or aligned corners is not one tuning "
                      "runs")
    x = inputs[0].permute(0, 3, 1, 2)
    return F.interpolate(x, size=shapes[0][1:3], mode="bilinear",
                         align_corners=bool(o.alignCorners)).permute(0, 2, 3, 1)


def _depth_to_space(op, inputs, shapes):
    """Each pixel's channels as a block of block x block pixels, channel (row x block + column) x C + c to (row,
    column)'s channel c: TensorFlow's order (DCR)."""
    block = op.builtinOptions.blockSize
    n, h, w, c = inputs[0].shape
    blocks = inputs[0].reshape(n, h, w, block, block, c // block ** 2)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(shapes[0])


def _batch_matmul(op, inputs, shapes):
    o = op.builtinOptions
    x, y = (v.transpose(-1, -2) if adjoint else v for v, adjoint in zip(inputs[:2], (o.adjX, o.adjY)))
    return (x @ y).reshape(shapes[0])


def _mean(op, inputs, shapes):
    axes = [int(a) for a in _constant(inputs, 1).reshape(-1)]
    return inputs[0].mean(axes, keepdim=True).reshape(shapes[0])


OPS = {
    "CONV_2D": _conv, "DEPTHWISE_CONV_2D": _depthwise, "FULLY_CONNECTED": _fully_connected,
    "BATCH_MATMUL": _batch_matmul, "TRANSPOSE_CONV": _transpose_conv,
    "MAX_POOL_2D": _pool("max"), "AVERAGE_POOL_2D": _pool("average"),
    "ADD": _binary("add"), "SUB": _binary("sub"), "MUL": _binary("mul"), "DIV": _binary("div"),
    "MAXIMUM": _binary("maximum"), "MINIMUM": _binary("minimum"),
    "CONCATENATION": _concatenation, "SPLIT": _split, "SPLIT_V": _split_v, "STRIDED_SLICE": _strided_slice,
    "PAD": _pad, "RESIZE_NEAREST_NEIGHBOR": _resize_nearest, "RESIZE_BILINEAR": _resize_bilinear, "MEAN": _mean,
    "DEPTH_TO_SPACE": _depth_to_space,
    "RESHAPE": lambda op, inputs, shapes: inputs[0].reshape(shapes[0]),
    "SQUEEZE": lambda op, inputs, shapes: inputs[0].reshape(shapes[0]),
    "EXPAND_DIMS": lambda op, inputs, shapes: inputs[0].reshape(shapes[0]),
    "TRANSPOSE": lambda op, inputs, shapes: inputs[0].permute(*[int(p) for p in _constant(inputs, 1)]),
    "LOGISTIC": lambda op, inputs, shapes: inputs[0].sigmoid(),
    "TANH": lambda op, inputs, shapes: inputs[0].tanh(),
    "RELU": lambda op, inputs, shapes: inputs[0].relu(),
    "RELU6": lambda op, inputs, shapes: inputs[0].clamp(0, 6),
    "HARD_SWISH": lambda op, inputs, shapes: inputs[0] * (inputs[0] + 3).clamp(0, 6) / 6,
    "LEAKY_RELU": lambda op, inputs, shapes: inputs[0].clamp(min=0)
    + op.builtinOptions.alpha * inputs[0].clamp(max=0),
    "SOFTMAX": lambda op, inputs, shapes: (inputs[0] * op.builtinOptions.beta).softmax(-1),
    "QUANTIZE": lambda op, inputs, shapes: inputs[0],  # rounded to its output's grid as every op is
    "DEQUANTIZE": lambda op, inputs, shapes: inputs[0],
}
