"""int8 weights of depthwise convolutions (weight_rounding fitted), or of every convolution and fully-connected
layer (fitted-all), rounded to fit the calibration images, not to the nearest step.

Rounding every weight to its nearest int8 step minimises each weight's own error, not the error of
the layer's output. For weights w (float) of one output channel, its step s and input patches x, the
output error of integer weights q is (s q - w)^T M (s q - w) with M = E[x x^T], the patches' second
moments (AdaRound's objective), and the rounding that changes the output least on the calibration
images can be searched:
- a depthwise channel sums a few weights (3x3, 5x5) times one input channel: M is per channel, and for
  a 3x3 kernel each of the 2^9 floor/ceil choices is tried and the least kept; larger kernels start
  from nearest rounding and flip single weights while that lowers the error;
- every other convolution and fully-connected layer (fitted-all) reads all its input channels: one M for the layer
  (patch length kh x kw x channels), shared by its output channels; from nearest rounding, sweeps over
  the weights flip each, for every channel at once, where that lowers the error.
The mean error left, (s q - w)^T E[x], is taken out of the int32 bias. Nearest rounding is the start of
each search, so no channel's error on the calibration images grows.

Measured (docs/results.md, docs/stages.md): SSDLite MobileNetV2 int8 against float32 on 132 val images,
depthwise layers fitted: box-encoding SQNR 20.7 -> 24.0 dB, class logits 26.3 -> 32.7 dB; every layer
fitted: 24.8 and 33.7 dB; MobileNetV2's int8, every layer fitted against depthwise ones: logits SQNR
20.5 -> 21.4 dB (ONNX), 20.4 -> 21.2 dB (TFLite) on 500 ImageNet images never calibrated on.

The moments come from the float model on the first MOMENT_IMAGES calibration images, at output
positions drawn with a fixed seed (MOMENT_POSITIONS an image for a depthwise layer; for a layer's shared M
enough for SAMPLES_PER_INPUT samples per patch element over the images, or all), so a build gives the
same bytes every time. The math serves both runtimes; the TFLite side is at the end of this module
(the moments kept by calibrate, the refit per variant), the ONNX QDQ side in qdq_refits.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tflite_file import op_names, read_model, rewrite_constant, schema, write_model

MOMENT_IMAGES = 32
MOMENT_POSITIONS = 32  # 1,024 patches a channel: SSDLite's fitted int8 kept the SQNR it had from 8,192
SAMPLES_PER_INPUT = 4  # a shared M of n x n from at least 4 n patches (or all the images have)
MAX_SWEEPS = 4  # MobileNetV2's layers stop flipping after 2-3
MOMENTS = "weight_moments.npz"  # beside calibrate's calibrated.tflite
MAX_ENUMERATED = 9  # weights per output channel up to which all 2^k roundings are tried (3x3)
DEPTHWISE = "DEPTHWISE_CONV_2D"
FITTED_OPS = (DEPTHWISE, "CONV_2D", "FULLY_CONNECTED")
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
    """The second moments and means of a layer's input patches: per input channel for a depthwise
    convolution (add), one for the whole patch for other convolutions (add_conv) and fully-connected layers
    (add_dense); positions drawn with a fixed seed (the same bytes every build)."""

    def __init__(self):
        self._rng = np.random.default_rng(0)
        self._sums: dict[str, list] = {}

    def add(self, key: str, values: np.ndarray, window: Window) -> None:
        """`values`: one image's input to a depthwise convolution (height, width, channels)."""
        plane = window.out[0] * window.out[1]
        x = patches(values, window, self._rng.integers(0, plane, MOMENT_POSITIONS))  # (channels, n, k)
        self._accumulate(key, np.matmul(x.transpose(0, 2, 1), x), x.sum(axis=1), x.shape[1])  # batched BLAS

    def add_conv(self, key: str, values: np.ndarray, window: Window, channel_major: bool) -> None:
        """`values`: one image's input to a convolution (height, width, channels), whose weights per output
        channel are laid out channel-major (ONNX's OIHW) or position-major (TFLite's OHWI)."""
        k = values.shape[2] * window.kernel[0] * window.kernel[1]
        x = patches(values, window, self._positions(window.out[0] * window.out[1], k))  # (channels, n, kh * kw)
        self._add_rows(key, x.transpose((1, 0, 2) if channel_major else (1, 2, 0)).reshape(x.shape[1], k))

    def add_dense(self, key: str, rows: np.ndarray) -> None:
        """`rows`: one image's inputs to a fully-connected layer (n, inputs)."""
        self._add_rows(key, rows[self._positions(len(rows), rows.shape[1])])

    def _positions(self, plane: int, k: int) -> np.ndarray:
        """All of a plane's positions, or enough for SAMPLES_PER_INPUT samples per patch element over
        MOMENT_IMAGES images."""
        wanted = max(MOMENT_POSITIONS, -(-SAMPLES_PER_INPUT * k // MOMENT_IMAGES))
        return np.arange(plane) if wanted >= plane else np.sort(self._rng.choice(plane, wanted, replace=False))

    def _add_rows(self, key: str, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64)
        self._accumulate(key, rows.T @ rows, rows.sum(axis=0), len(rows))

    def _accumulate(self, key: str, second, first, count: int) -> None:
        entry = self._sums.setdefault(key, [0.0, 0.0, 0])
        entry[0], entry[1], entry[2] = entry[0] + second, entry[1] + first, entry[2] + count

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(second moments, means) of `key`, if measured: per channel (channels, k, k), (channels, k), or
        for the whole patch (k, k), (k,). A whole patch's M measured on fewer than SAMPLES_PER_INPUT k patches
        (a fully-connected layer after a global pooling: one an image) is only its diagonal: under it the
        fitted rounding is the nearest one, and the bias still takes out the mean error."""
        if key not in self._sums:
            return None
        second, first, count = self._sums[key]
        second, mean = np.asarray(second, np.float64) / count, np.asarray(first, np.float64) / count
        if second.ndim == 2 and count < SAMPLES_PER_INPUT * len(second):
            second = np.diag(np.diag(second))
        return second, mean

    def save(self, target: Path) -> Path:
        np.savez(target, **{f"{key}\t{part}": value for key, (second, first, count) in self._sums.items()
                            for part, value in (("second", second), ("sum", first), ("count", np.int64(count)))})
        return target

    @classmethod
    def load(cls, path: Path) -> PatchMoments:
        moments = cls()
        with np.load(path, allow_pickle=False) as saved:
            for name in saved.files:
                key, part = name.rsplit("\t", 1)
                if part == "second":
                    moments._sums[key] = [saved[name], saved[f"{key}\tsum"], int(saved[f"{key}\tcount"])]
        return moments


def refit(weights: np.ndarray, nearest: np.ndarray, scales: np.ndarray, moments: tuple[np.ndarray, np.ndarray]
          ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """For a layer's float `weights` (out channels, k), its `nearest` int8 weights with per-channel `scales`
    and the `moments` of its input patches (PatchMoments.get: per input channel for a depthwise layer, whose
    out channel c reads input channel c // depth multiplier; else one for the layer): (fitted int8 weights,
    the mean output error they leave per channel, to take out of the bias, the summed output error of
    nearest, of fitted)."""
    second, mean = moments
    if second.ndim == 3:
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
    if second.ndim == 2:
        return float(np.einsum("ci,ij,cj->", error, second, error))
    return float(np.einsum("ci,cij,cj->", error, second, error))


def fitted_rounding(weights: np.ndarray, scales: np.ndarray, second: np.ndarray) -> np.ndarray:
    """int8 weights (channels, k) of float `weights` (channels, k) with per-channel `scales`: for each
    channel the floor/ceil choice b of least (s q - w)^T M (s q - w), q = floor + b, M its second-moment
    matrix (channels, k, k), or the layer's (k, k) shared by every channel. With e0 = s floor - w that cost
    is e0^T M e0 + 2 s b^T M e0 + s^2 b^T M b. Per-channel M up to MAX_ENUMERATED weights: every b is tried
    (two matrix products for all channels); above, from nearest rounding, the single flip that lowers the
    cost most is made until none does. A shared M: sweeps from nearest rounding (_swept)."""
    if second.ndim == 2:
        return _swept(weights, scales, second)
    floor = np.floor(weights / scales[:, None])
    linear = np.einsum("cij,cj->ci", second, floor * scales[:, None] - weights)  # M e0
    capped = floor >= 127  # no step above 127
    if weights.shape[1] <= MAX_ENUMERATED:
        best = _enumerated(linear, second, scales, capped)
    else:
        best = _local_search(linear, second, scales, capped, (weights / scales[:, None] - floor >= 0.5) & ~capped)
    return np.clip(floor + best, -127, 127)


def _swept(weights: np.ndarray, scales: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Up to MAX_SWEEPS passes over the k weights of every channel at once: weight i moves to the other of its
    floor and ceil where that lowers the channel's cost, 2 s d (M e)_i + s^2 M_ii for a move d; M e, kept for
    all channels (channels, k), takes the move's column of M. A pass with no move ends the search."""
    ratio = weights / scales[:, None]
    floor = np.floor(ratio)
    q = np.clip(np.round(ratio), -127, 127)
    gradient = (q * scales[:, None] - weights) @ second  # M e per channel (M is symmetric)
    diagonal = np.diag(second)
    for _ in range(MAX_SWEEPS):
        moved = False
        for i in range(weights.shape[1]):
            direction = np.where(q[:, i] > floor[:, i], -1.0, 1.0)
            change = scales * (2 * direction * gradient[:, i] + scales * diagonal[i])
            take = (change < -1e-15) & (np.abs(q[:, i] + direction) <= 127)
            if take.any():
                step = np.where(take, direction, 0.0)
                q[:, i] += step
                gradient += np.outer(step * scales, second[i])
                moved = True
        if not moved:
            break
    return q


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
def _fitted_ops(model, every_layer: bool) -> list[tuple[object, str]]:
    """(op, its name) of the depthwise convolutions of subgraph 0, or with `every_layer` of its convolutions
    and fully-connected layers, whose weights are constants (not a grouped CONV_2D: its patch is not the
    weights' layout)."""
    graph = model.subgraphs[0]
    found = []
    for op, name in zip(graph.operators, op_names(model)):
        if name not in (FITTED_OPS if every_layer else (DEPTHWISE,)) or len(op.inputs) < 2 or op.inputs[1] < 0:
            continue
        weight = graph.tensors[op.inputs[1]]
        data = model.buffers[weight.buffer].data
        if data is None or len(data) == 0:
            continue
        if name == "CONV_2D" and graph.tensors[op.inputs[0]].shape[-1] != weight.shape[-1]:
            continue
        found.append((op, name))
    return found


def _output_name(graph, op) -> str:
    return graph.tensors[op.outputs[0]].name.decode()


def tflite_window(shape: tuple[int, ...], op, kernel: tuple[int, int]) -> Window:
    """The window of a TFLite convolution `op` over an input of `shape` (height, width, ...)."""
    options = op.builtinOptions
    strides, dilations = (options.strideH, options.strideW), (options.dilationHFactor, options.dilationWFactor)
    if options.padding == _SAME:
        return Window.same(shape[:2], kernel, strides, dilations)
    return Window.padded(shape[:2], kernel, strides, dilations, (0, 0), (0, 0))


def weight_moments(calibrated: Path, tensors: list[np.ndarray], target: Path, every_layer: bool,
                   threads: int = 2) -> Path | None:
    """Write to `target` (npz) the PatchMoments of every fitted layer's input (_fitted_ops) in the float
    model `calibrated` over the first MOMENT_IMAGES `tensors`, keyed by the op's output tensor; None when
    the model has none (or control flow)."""
    from .ranges import interpreter_keeping

    model = read_model(calibrated)
    if len(model.subgraphs) != 1:
        return None
    graph, ops = model.subgraphs[0], _fitted_ops(model, every_layer)
    if not ops:
        return None
    interpreter = interpreter_keeping(model, sorted({op.inputs[0] for op, _ in ops}), threads)
    model_input = interpreter.get_input_details()[0]["index"]
    moments = PatchMoments()
    for tensor in tensors[:MOMENT_IMAGES]:
        interpreter.set_tensor(model_input, tensor)
        interpreter.invoke()
        for op, name in ops:
            key, values = _output_name(graph, op), interpreter.tensor(op.inputs[0])()
            if name == "FULLY_CONNECTED":
                moments.add_dense(key, values.reshape(-1, graph.tensors[op.inputs[1]].shape[1]))
            else:
                window = tflite_window(values.shape[1:], op, tuple(graph.tensors[op.inputs[1]].shape[1:3]))
                if name == DEPTHWISE:
                    moments.add(key, values[0], window)
                else:
                    moments.add_conv(key, values[0], window, channel_major=False)
            del values  # a view of the interpreter's memory must not outlive the image
    return moments.save(target)


def fit_weights(quantized: Path, calibrated: Path, moments: Path, target: Path, every_layer: bool) -> dict:
    """Rewrite `quantized` (an int8 model of `calibrated`) to `target` with every depthwise layer (every_layer:
    every layer) that `moments` describes refitted (refit): int8 weights and int32 bias.
    Returns {"layers": refitted count, "error_ratio": the summed output error after / before on the
    calibration moments}."""
    model, floats = read_model(quantized), read_model(calibrated)
    graph, float_graph = model.subgraphs[0], floats.subgraphs[0]
    float_ops = {_output_name(float_graph, op): op for op in float_graph.operators}
    measured = PatchMoments.load(moments)
    before = after = 0.0
    layers = 0
    for op, name in _fitted_ops(model, every_layer):
        key = _output_name(graph, op)
        weight, twin, stats = graph.tensors[op.inputs[1]], float_ops.get(key), measured.get(key)
        if stats is None or twin is None or weight.quantization is None or weight.type != schema().TensorType.INT8 \
                or np.any(np.asarray(weight.quantization.zeroPoint) != 0):
            continue
        # per output channel: depthwise weights are (1, kh, kw, channels), the others (channels, ...)
        shape = tuple(weight.shape)
        channels = shape[3] if name == DEPTHWISE else shape[0]
        scales = np.broadcast_to(np.asarray(weight.quantization.scale, np.float64), (channels,))
        float_weight = float_graph.tensors[twin.inputs[1]]
        w = _per_channel(np.frombuffer(bytes(floats.buffers[float_weight.buffer].data), np.float32), name, shape)
        nearest = _per_channel(np.frombuffer(bytes(model.buffers[weight.buffer].data), np.int8), name, shape)
        fitted, mean_error, was, now = refit(w.astype(np.float64), nearest.astype(np.float64), scales, stats)
        before, after = before + was, after + now
        stored = fitted.T if name == DEPTHWISE else fitted
        rewrite_constant(model, weight, np.ascontiguousarray(stored).astype(np.int8).tobytes())
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            _correct_bias(model, graph.tensors[op.inputs[2]], mean_error)
        layers += 1
    write_model(model, target)
    return {"layers": layers, "error_ratio": after / before if before else 1.0}


def _per_channel(values: np.ndarray, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A TFLite weight buffer as (output channels, weights of each)."""
    if name == DEPTHWISE:
        return values.reshape(-1, shape[3]).T
    return values.reshape(shape[0], -1)


def _correct_bias(model, bias, mean_error: np.ndarray) -> None:
    if bias.type != schema().TensorType.INT32 or bias.quantization is None or bias.quantization.scale is None:
        return
    stored = np.frombuffer(bytes(model.buffers[bias.buffer].data), np.int32)
    rewrite_constant(model, bias, corrected_bias(stored, mean_error, bias.quantization.scale).tobytes())
