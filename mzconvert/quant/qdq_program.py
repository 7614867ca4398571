"""An ONNX int8 (QDQ) graph run in torch for weight tuning (quant/tuning.py): every QuantizeLinear ->
DequantizeLinear pair the rounding it is, its weights trainable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MzError
from ..runtime import output_order
from .fake_quant import TrainedIntegers, fake_quantize


def _attribute(node, name: str, default=None):
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class QdqProgram:
    """A QDQ graph run in torch: its int8 weights (the initializers the DequantizeLinears in front of its Conv and
    Gemm nodes read) and their int32 biases trainable, in units of each layer's weight steps."""

    def __init__(self, path: Path, names: list[str]):
        import onnx
        import torch
        from onnx import numpy_helper

        self.model = onnx.load(str(path))
        graph = self.model.graph
        for node in graph.node:  # named before the images are run through the float model and judged
            if node.op_type not in OPS:
                raise MzError(f"tune_steps: the QDQ graph has a {node.op_type} node ({node.name}), which tuning "
                              f"does not run (it runs {', '.join(sorted(OPS))})")
        self.constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.tensors = {name: torch.from_numpy(np.array(value)) for name, value in self.constants.items()}
        outputs = [o.name for o in graph.output]
        self.outputs = [outputs[i] for i in output_order(outputs, names)]
        self.trained: dict[str, tuple[str, TrainedIntegers]] = {}  # a DequantizeLinear's output: its initializer
        producer = {out: node for node in graph.node for out in node.output}
        for node in graph.node:
            weight = producer.get(node.input[1]) if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 else None
            if weight is None or weight.op_type != "DequantizeLinear" or weight.input[0] not in self.constants:
                continue
            scale, zero = self._terms(weight)
            self._train(weight, scale, zero, scale)
            bias = producer.get(node.input[2]) if len(node.input) > 2 else None
            if bias is not None and bias.op_type == "DequantizeLinear" and bias.input[0] in self.constants:
                self._train(bias, *self._terms(bias), scale.reshape(-1))  # a bias per output channel

    def _terms(self, node):
        import torch

        return tuple(torch.from_numpy(terms) for terms in _scale_and_zero(node, self.constants))

    def _train(self, node, scale, zero, unit) -> None:
        self.trained[node.output[0]] = (node.input[0], TrainedIntegers(self.constants[node.input[0]], scale, zero,
                                                                       unit))

    def parameters(self) -> list:
        return [trained.value for _, trained in self.trained.values()]

    def write(self, target: Path) -> None:
        """The model with the tuned integers, to `target`."""
        import onnx
        from onnx import numpy_helper

        tuned = onnx.ModelProto()
        tuned.CopyFrom(self.model)
        stored = {i.name: i for i in tuned.graph.initializer}
        for initializer, trained in self.trained.values():
            stored[initializer].CopyFrom(numpy_helper.from_array(trained.integers(), initializer))
        onnx.save(tuned, str(target))

    def __call__(self, tensor: np.ndarray) -> list:
        """The outputs (`names`' order) of one image's tensor."""
        import torch

        graph = self.model.graph
        env = {graph.input[0].name: torch.from_numpy(tensor)}
        for node in graph.node:
            if node.output[0] in self.trained:
                env[node.output[0]] = self.trained[node.output[0]][1].real()
                continue
            inputs = [env[n] if n in env else self.tensors.get(n) for n in node.input]
            produced = OPS[node.op_type](node, inputs, self.constants)
            for name, value in zip(node.output, produced if isinstance(produced, tuple) else (produced,)):
                env[name] = value
        return [env[name] for name in self.outputs]


def _scale_and_zero(node, constants) -> tuple[np.ndarray, np.ndarray]:
    """The scale and zero point of a DequantizeLinear of a constant, shaped to broadcast to it (per axis)."""
    rank = constants[node.input[0]].ndim
    scale = constants[node.input[1]].astype(np.float32)
    zero = constants[node.input[2]].astype(np.float32) if len(node.input) > 2 else np.zeros_like(scale)
    shape = [1] * rank
    if scale.size > 1:
        shape[_attribute(node, "axis", 1) if rank > 1 else 0] = -1
    return scale.reshape(shape), zero.reshape(shape)


def _dequantize(node, inputs, constants):
    """A DequantizeLinear: after a QuantizeLinear, its input's real values already (_quantize); of a constant
    tuning does not train (a ConvTranspose's weights), the constant's."""
    import torch

    if node.input[0] not in constants:
        return inputs[0]
    scale, zero = _scale_and_zero(node, constants)
    return torch.from_numpy(np.asarray((constants[node.input[0]].astype(np.float32) - zero) * scale, np.float32))


def _quantize(node, inputs, constants):
    """QuantizeLinear with its DequantizeLinear folded in (a Q value is only ever dequantized in a QDQ graph)."""
    zero = constants[node.input[2]] if len(node.input) > 2 else np.uint8(0)
    return fake_quantize(inputs[0], float(constants[node.input[1]]), float(zero), zero.dtype)


def _conv(node, inputs, constants):
    import torch.nn.functional as F

    pads = _attribute(node, "pads", [0, 0, 0, 0])
    if _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:2] != pads[2:]:
        raise MzError(f"tune_steps: Conv {node.name} pads unevenly or by auto_pad, which tuning does not run")
    return F.conv2d(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None, _attribute(node, "strides", [1, 1]),
                    pads[:2], _attribute(node, "dilations", [1, 1]), _attribute(node, "group", 1))


def _conv_transpose(node, inputs, constants):
    """A ConvTranspose (a segmentation head's mask upsampling) run as it is, its weights not tuned."""
    import torch.nn.functional as F

    pads = _attribute(node, "pads", [0, 0, 0, 0])
    if _attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:2] != pads[2:] \
            or _attribute(node, "output_shape") is not None:
        raise MzError(f"tune_steps: ConvTranspose {node.name} pads unevenly, by auto_pad or to an output_shape, "
                      "which tuning does not run")
    return F.conv_transpose2d(inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None,
                              _attribute(node, "strides", [1, 1]), pads[:2],
                              _attribute(node, "output_padding", [0, 0]), _attribute(node, "group", 1),
                              _attribute(node, "dilations", [1, 1]))


def _gemm(node, inputs, constants):
    a, b = inputs[0], inputs[1]
    a = a.T if _attribute(node, "transA", 0) else a
    b = b.T if _attribute(node, "transB", 0) else b
    out = _attribute(node, "alpha", 1.0) * (a @ b)
    return out + _attribute(node, "beta", 1.0) * inputs[2] if len(inputs) > 2 and inputs[2] is not None else out


def _concat(node, inputs, constants):
    import torch

    return torch.cat(inputs, _attribute(node, "axis"))


def _split(node, inputs, constants):
    import torch

    sizes = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else _attribute(node, "split")
    axis = _attribute(node, "axis", 0)
    if sizes is None:
        sizes = inputs[0].shape[axis] // len(node.output)
    return tuple(torch.split(inputs[0], sizes, axis))


def _max_pool(node, inputs, constants):
    import torch.nn.functional as F

    kernel, pads = _attribute(node, "kernel_shape"), _attribute(node, "pads", [0, 0, 0, 0])
    return F.max_pool2d(inputs[0], kernel, _attribute(node, "strides", kernel), pads[:2],
                        ceil_mode=bool(_attribute(node, "ceil_mode", 0)))


def _average_pool(node, inputs, constants):
    import torch.nn.functional as F

    kernel, pads = _attribute(node, "kernel_shape"), _attribute(node, "pads", [0, 0, 0, 0])
    return F.avg_pool2d(inputs[0], kernel, _attribute(node, "strides", kernel), pads[:2],
                        count_include_pad=bool(_attribute(node, "count_include_pad", 0)))


def _resize(node, inputs, constants):
    import torch.nn.functional as F

    mode = _attribute(node, "mode", b"nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = _attribute(node, "coordinate_transformation_mode", b"half_pixel")
    transform = transform.decode() if isinstance(transform, bytes) else transform
    scales = inputs[2] if len(inputs) > 2 and inputs[2] is not None and inputs[2].numel() else None
    size = [int(v) for v in inputs[3].tolist()[2:]] if scales is None else None
    factor = [float(v) for v in scales.tolist()[2:]] if scales is not None else None
    if mode == "nearest" and transform == "asymmetric":
        return F.interpolate(inputs[0], size=size, scale_factor=factor, mode="nearest")
    if mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return F.interpolate(inputs[0], size=size, scale_factor=factor, mode="bilinear",
                             align_corners=transform == "align_corners")
    raise MzError(f"tune_steps: Resize {node.name} ({mode}, {transform}) is not one tuning runs")


def _reshape(node, inputs, constants):
    shape = [int(v) for v in inputs[1].tolist()]
    return inputs[0].reshape([inputs[0].shape[i] if v == 0 else v for i, v in enumerate(shape)])


def _clip(node, inputs, constants):
    import torch

    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else _attribute(node, "min", -np.inf)
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else _attribute(node, "max", np.inf)
    return torch.clamp(inputs[0], float(low), float(high))


def _elementwise(function: str):
    def run(node, inputs, constants):
        import torch

        return getattr(torch, function)(*inputs)
    return run


def _activation(function: str):
    def run(node, inputs, constants):
        import torch.nn.functional as F

        return getattr(F, function)(inputs[0])
    return run


OPS = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _elementwise("matmul"),
    "Add": _elementwise("add"), "Sub": _elementwise("sub"), "Mul": _elementwise("mul"), "Div": _elementwise("div"),
    "Relu": _activation("relu"), "Sigmoid": _activation("sigmoid"), "Tanh": _activation("tanh"),
    "HardSwish": _activation("hardswish"), "Clip": _clip,
    "HardSigmoid": lambda node, inputs, constants: (inputs[0] * _attribute(node, "alpha", 0.2)
                                                    + _attribute(node, "beta", 0.5)).clamp(0, 1),
    "LeakyRelu": lambda node, inputs, constants: inputs[0].clamp(min=0)
    + _attribute(node, "alpha", 0.01) * inputs[0].clamp(max=0),
    "Softmax": lambda node, inputs, constants: inputs[0].softmax(_attribute(node, "axis", -1)),
    "Concat": _concat,
    "Split": _split,
    "MaxPool": _max_pool, "AveragePool": _average_pool,
    "GlobalAveragePool": lambda node, inputs, constants: inputs[0].mean((2, 3), keepdim=True),
    "Reshape": _reshape,
    "Flatten": lambda node, inputs, constants: inputs[0].reshape(
        int(np.prod(inputs[0].shape[:_attribute(node, "axis", 1)])), -1),
    "Transpose": lambda node, inputs, constants: inputs[0].permute(
        *(_attribute(node, "perm") or reversed(range(inputs[0].dim())))),
    "Resize": _resize,
    "Identity": lambda node, inputs, constants: inputs[0],
}
