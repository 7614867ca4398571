"""int8 weights of depthwise convolutions rounded to fit the calibration images, not to the nearest step.

Rounding every weight to its nearest int8 step minimises each weight's own error, not the error of
the layer's output. A depthwise output channel sums a few weights (3x3, 5x5) times the same input
channel, so the rounding that changes that sum least on the calibration images can be searched:
for weights w (float), per-channel step s and input patches x, the output error of integer weights
q is (s q - w)^T M (s q - w) with M = E[x x^T], the patches' second moments (AdaRound's objective).
For a 3x3 kernel each of the 2^9 floor/ceil choices is tried and the least kept; larger kernels
start from nearest rounding and flip single weights while that lowers the error. The mean error
left, (s q - w)^T E[x], is taken out of the int32 bias. Nearest rounding is one of the choices (the
start of the search), so no channel's error on the calibration images grows.

Measured (docs/results.md): SSDLite MobileNetV2 int8 against float32 on 132 val images,
box-encoding SQNR 20.7 -> 24.0 dB, class logits 26.3 -> 32.7 dB.

The moments come from the float model on the first MOMENT_IMAGES calibration images, at
MOMENT_POSITIONS output positions per image and layer drawn with a fixed seed, so a build gives the
same bytes every time. The math serves both runtimes; the TFLite side is at the end of this module
(the moments kept by calibrate, the refit per variant), the ONNX QDQ side in backends/onnx.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tflite_file import op_names, read_model, schema, write_model

MOMENT_IMAGES = 32
MOMENT_POSITIONS = 32  # 1,024 patches a channel: SSDLite's fitted int8 kept the SQNR it had from 8,192
MOMENTS = "depthwise_moments.npz"  # beside calibrate's calibrated.tflite
MAX_ENUMERATED = 9  # weights per output channel up to which all 2^k roundings are tried (3x3)
DEPTHWISE = "DEPTHWISE_CONV_2D"
_SAME = 0  # schema Padding.SAME


@dataclass(frozen=True)
class Window:
    """Where a convolution reads its input: kernel, strides and dilations (height, width), the padding
    before the first row and column, and the output plane."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pad: tuple[int, int]
    out: tuple[int, int]

    @classmethod
    def padded(cls, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
               dilations: tuple[int, int], before: tuple[int, int], after: tuple[int, int]) -> Window:
        """Over an input plane of `size`, padded explicitly (`before` and `after` each axis; VALID: none)."""
        out = tuple((n + b + a - (k - 1) * d - 1) // s + 1
                    for n, b, a, k, d, s in zip(size, before, after, kernel, dilations, strides))
        return cls(kernel, strides, dilations, tuple(before), out)

    @classmethod
    def same(cls, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
             dilations: tuple[int, int], odd_pixel_after: bool = True) -> Window:
        """SAME padding: the output is ceil(size / stride); an odd padding's extra pixel goes after (TFLite,
        ONNX SAME_UPPER) or before (ONNX SAME_LOWER)."""
        out = tuple(-(-n // s) for n, s in zip(size, strides))
        total = [max((o - 1) * s + (k - 1) * d + 1 - n, 0)
                 for o, s, k, d, n in zip(out, strides, kernel, dilations, size)]
        return cls(kernel, strides, dilations, tuple(t // 2 if odd_pixel_after else t - t // 2 for t in total), out)


def patches(values: np.ndarray, window: Window, positions: np.ndarray) -> np.ndarray:
    """The input patch under the kernel at each of `positions` (flat indices into the output plane) of
    `values` (height, width, channels): (channels, len(positions), kh * kw), contiguous, zero where the
    window reaches into the padding."""
    (height, width), (kh, kw), (sh, sw), (dh, dw) = values.shape[:2], window.kernel, window.strides, window.dilations
    rows, cols = np.divmod(positions, window.out[1])
    ys = rows[:, None] * sh - window.pad[0] + np.repeat(np.arange(kh) * dh, kw)[None, :]  # (n, kh*kw)
    xs = cols[:, None] * sw - window.pad[1] + np.tile(np.arange(kw) * dw, kh)[None, :]
    taken = values[np.clip(ys, 0, height - 1), np.clip(xs, 0, width - 1)]  # (n, kh*kw, channels)
    taken *= ((ys >= 0) & (ys < height) & (xs >= 0) & (xs < width))[:, :, None]  # the padding's zeros
    return np.ascontiguousarray(taken.transpose(2, 0, 1))


class PatchMoments:
    """Per input channel, the second moments and means of a convolution's input patches, at
    MOMENT_POSITIONS output positions an image drawn with a fixed seed (the same bytes every build)."""

    def __init__(self):
        self._rng = np.random.default_rng(0)
        self._sums: dict[str, list] = {}

    def add(self, key: str, values: np.ndarray, window: Window) -> None:
        """`values`: one image's input to the convolution (height, width, channels)."""
        plane = window.out[0] * window.out[1]
        x = patches(values, window, self._rng.integers(0, plane, MOMENT_POSITIONS))  # (channels, n, k)
        entry = self._sums.setdefault(key, [0.0, 0.0, 0])
        entry[0] = entry[0] + np.matmul(x.transpose(0, 2, 1), x)  # batched BLAS
        entry[1] = entry[1] + x.sum(axis=1)
        entry[2] += x.shape[1]

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(second moments (channels, k, k), means (channels, k)) of `key`, if measured."""
        if key not in self._sums:
            return None
        second, first, count = self._sums[key]
        return np.asarray(second, np.float64) / count, np.asarray(first, np.float64) / count

    def save(self, target: Path) -> Path:
        np.savez(target, **{f"{key}\t{part}": value for key in self._sums
                            for part, value in zip(("second", "mean"), self.get(key))})
        return target

    @classmethod
    def load(cls, path: Path) -> PatchMoments:
        moments = cls()
        with np.load(path, allow_pickle=False) as saved:
            for name in saved.files:
                key, part = name.rsplit("\t", 1)
                if part == "second":
                    moments._sums[key] = [saved[name], saved[f"{key}\tmean"], 1]
        return moments


def refit(weights: np.ndarray, nearest: np.ndarray, scales: np.ndarray, moments: tuple[np.ndarray, np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """For a depthwise convolution's float `weights` (out channels, k), its `nearest` int8 weights with
    per-channel `scales` and the `moments` of its input channels (out channel c reads input channel
    c // depth multiplier): (fitted int8 weights, the mean output error they leave per channel, to take
    out of the bias, the summed output error of nearest, of fitted)."""
    second, mean = moments
    source = np.arange(len(weights)) // (len(weights) // len(second))
    second, mean = second[source], mean[source]
    fitted = fitted_rounding(weights, scales, second)
    mean_error = ((fitted * scales[:, None] - weights) * mean).sum(axis=1)
    errors = (_output_error(rounded, scales, weights, second) for rounded in (nearest, fitted))
    return fitted, mean_error, *errors


def corrected_bias(values: np.ndarray, mean_error: np.ndarray, steps) -> np.ndarray:
    """An int32 bias (its steps: input scale x weight scale) with each channel's mean output error taken out."""
    steps = np.broadcast_to(np.asarray(steps, np.float64), values.shape)
    return np.clip(values.astype(np.int64) - np.round(mean_error / steps), -2 ** 31, 2 ** 31 - 1).astype(np.int32)


def _output_error(q: np.ndarray, scales: np.ndarray, weights: np.ndarray, second: np.ndarray) -> float:
    error = q * scales[:, None] - weights
    return float(np.einsum("ci,cij,cj->", error, second, error))


def fitted_rounding(weights: np.ndarray, scales: np.ndarray, second: np.ndarray) -> np.ndarray:
    """int8 weights (channels, k) of float `weights` (channels, k) with per-channel `scales`: for each
    channel the floor/ceil choice b of least (s q - w)^T M (s q - w), q = floor + b, M its second-moment
    matrix (channels, k, k). With e0 = s floor - w that cost is e0^T M e0 + 2 s b^T M e0 + s^2 b^T M b.
    Up to MAX_ENUMERATED weights every b is tried (two matrix products for all channels); above, from
    nearest rounding, the single flip that lowers the cost most is made until none does."""
    floor = np.floor(weights / scales[:, None])
    linear = np.einsum("cij,cj->ci", second, floor * scales[:, None] - weights)  # M e0
    capped = floor >= 127  # no step above 127
    if weights.shape[1] <= MAX_ENUMERATED:
        best = _enumerated(linear, second, scales, capped)
    else:
        best = _local_search(linear, second, scales, capped, (weights / scales[:, None] - floor >= 0.5) & ~capped)
    return np.clip(floor + best, -127, 127)


def _enumerated(linear, second, scales, capped) -> np.ndarray:
    k = linear.shape[1]
    choices = np.array(list(itertools.product((0.0, 1.0), repeat=k)))  # (2^k, k)
    pairs = np.einsum("ni,nj->nij", choices, choices).reshape(len(choices), k * k)
    quadratic = pairs @ second.reshape(len(second), k * k).T  # (2^k, channels): b^T M b
    cost = 2 * scales * (choices @ linear.T) + scales ** 2 * quadratic
    cost[(choices @ capped.T) > 0] = np.inf
    return choices[np.argmin(cost, axis=0)]


def _local_search(linear, second, scales, capped, start: np.ndarray) -> np.ndarray:
    b = start.astype(np.float64)
    rows = np.arange(len(b))
    diagonal = np.einsum("cii->ci", second)
    for _ in range(8 * b.shape[1]):
        direction = 1 - 2 * b  # flipping weight i moves b_i by this
        change = (2 * scales[:, None] * linear * direction
                  + scales[:, None] ** 2 * (2 * direction * np.einsum("cij,cj->ci", second, b) + diagonal))
        change[capped & (direction > 0)] = np.inf
        flip = np.argmin(change, axis=1)
        improving = change[rows, flip] < -1e-15
        if not improving.any():
            break
        b[rows[improving], flip[improving]] = 1 - b[rows[improving], flip[improving]]
    return b


# -- TFLite ----------------------------------------------------------------------------------------
def _depthwise_ops(model) -> list:
    """The depthwise convolutions of subgraph 0."""
    return [op for op, name in zip(model.subgraphs[0].operators, op_names(model)) if name == DEPTHWISE]


def _output_name(graph, op) -> str:
    return graph.tensors[op.outputs[0]].name.decode()


def tflite_window(shape: tuple[int, ...], op, kernel: tuple[int, int]) -> Window:
    """The window of a TFLite convolution `op` over an input of `shape` (height, width, ...)."""
    options = op.builtinOptions
    strides, dilations = (options.strideH, options.strideW), (options.dilationHFactor, options.dilationWFactor)
    if options.padding == _SAME:
        return Window.same(shape[:2], kernel, strides, dilations)
    return Window.padded(shape[:2], kernel, strides, dilations, (0, 0), (0, 0))


def depthwise_moments(calibrated: Path, tensors: list[np.ndarray], target: Path, threads: int = 2) -> Path | None:
    """Write to `target` (npz) the PatchMoments of every depthwise convolution's input in the float
    model `calibrated` over the first MOMENT_IMAGES `tensors`, keyed by the op's output tensor; None
    when the model has none (or control flow)."""
    from .ranges import interpreter_keeping

    model = read_model(calibrated)
    if len(model.subgraphs) != 1:
        return None
    graph, ops = model.subgraphs[0], _depthwise_ops(model)
    if not ops:
        return None
    interpreter = interpreter_keeping(model, sorted({op.inputs[0] for op in ops}), threads)
    model_input = interpreter.get_input_details()[0]["index"]
    moments = PatchMoments()
    for tensor in tensors[:MOMENT_IMAGES]:
        interpreter.set_tensor(model_input, tensor)
        interpreter.invoke()
        for op in ops:
            values = interpreter.tensor(op.inputs[0])()[0]
            moments.add(_output_name(graph, op), values,
                        tflite_window(values.shape, op, tuple(graph.tensors[op.inputs[1]].shape[1:3])))
            del values  # a view of the interpreter's memory must not outlive the image
    return moments.save(target)


def fit_depthwise_weights(quantized: Path, calibrated: Path, moments: Path, target: Path) -> dict:
    """Rewrite `quantized` (an int8 model of `calibrated`) to `target` with every depthwise convolution
    that `moments` describes refitted (refit): int8 weights and int32 bias.
    Returns {"layers": refitted count, "error_ratio": the summed output error after / before on the
    calibration moments}."""
    model, floats = read_model(quantized), read_model(calibrated)
    graph, float_graph = model.subgraphs[0], floats.subgraphs[0]
    float_ops = {_output_name(float_graph, op): op for op in float_graph.operators}
    measured = PatchMoments.load(moments)
    before = after = 0.0
    layers = 0
    for op in _depthwise_ops(model):
        name = _output_name(graph, op)
        weight, twin, stats = graph.tensors[op.inputs[1]], float_ops.get(name), measured.get(name)
        if stats is None or twin is None or weight.quantization is None or weight.type != schema().TensorType.INT8 \
                or np.any(np.asarray(weight.quantization.zeroPoint) != 0):
            continue
        channels, k = weight.shape[3], int(np.prod(weight.shape[1:3]))
        scales = np.broadcast_to(np.asarray(weight.quantization.scale, np.float64), (channels,))
        float_weight = float_graph.tensors[twin.inputs[1]]
        w = np.frombuffer(bytes(floats.buffers[float_weight.buffer].data), np.float32).reshape(k, channels).T
        buffer = model.buffers[weight.buffer]
        nearest = np.frombuffer(bytes(buffer.data), np.int8).reshape(k, channels).T.astype(np.float64)
        fitted, mean_error, was, now = refit(w.astype(np.float64), nearest, scales, stats)
        before, after = before + was, after + now
        buffer.data = np.frombuffer(fitted.T.astype(np.int8).tobytes(), np.uint8)
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            _correct_bias(model, graph.tensors[op.inputs[2]], mean_error)
        layers += 1
    write_model(model, target)
    return {"layers": layers, "error_ratio": after / before if before else 1.0}


def _correct_bias(model, bias, mean_error: np.ndarray) -> None:
    if bias.type != schema().TensorType.INT32 or bias.quantization is None or bias.quantization.scale is None:
        return
    buffer = model.buffers[bias.buffer]
    corrected = corrected_bias(np.frombuffer(bytes(buffer.data), np.int32), mean_error, bias.quantization.scale)
    buffer.data = np.frombuffer(corrected.tobytes(), np.uint8)
