"""Activation ranges for int8: measured over the calibration images by whatever runtime yields a model's
activations (measure_ranges: min/max, exact percentile, or least quantization error); for TFLite
recorded with the LiteRT interpreter and written into the calibrated model, for ONNX with ONNX Runtime
(backends/onnx.py).

TensorFlow's own calibrator (the converter's representative-dataset pass) has two costs we avoid:
- it runs the model op by op with logging kernels, single-threaded: ~170 ms an image for SSDLite
  MobileNetV2 at 300x300 on this machine, where the interpreter takes ~14 ms with the ranges
  recorded (with XNNPACK: every tensor we need is made an output of the graph; keeping all tensors
  instead, which XNNPACK cannot, takes ~52 ms on the builtin kernels);
- it logs an op's inputs after the op has run, and an ADD computes in place into its first input:
  that input's range (in MobileNetV2, the output of every residual block's projection conv) becomes
  the union with the sum's range (measured on SSDLite MobileNetV2: up to 1.6x wider than the tensor
  ever is), resolution lost on the layers PTQ is most sensitive to.

So the converter calibrates on one image only, which gives the float model with a range slot on
every tensor its quantizer needs (and nothing else of the images); every image then runs through
the interpreter, and each slot gets the range the tensor really took by the variant's method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import MzError
from ..runtime import OPTIMIZED, op_resolver, own_names
from ..tflite_file import model_bytes, op_names, read_model, write_model
from .output_scales import SHAPE_OPS


class _Extremes:
    """The `keep` lowest and highest values one tensor took over all images, so that the value of a given
    rank from either end of all of them (a percentile) is exact, in memory of 2 x keep values."""

    def __init__(self, keep: int):
        self.keep = keep
        self.low = self.high = np.empty(0, np.float32)

    def add(self, values: np.ndarray) -> None:
        flat = _without_nan(values)
        if flat.size == 0:
            return
        if self.keep == 1:  # min/max: no partition
            low, high = flat.min(keepdims=True), flat.max(keepdims=True)
        else:  # once `keep` values are held, only values beyond the held ones can enter
            low = _smallest(flat if self.low.size < self.keep else flat[flat < self.low.max()], self.keep)
            high = -_smallest(-(flat if self.high.size < self.keep else flat[flat > self.high.min()]), self.keep)
        self.low = _smallest(np.concatenate([self.low, low]), self.keep)
        self.high = -_smallest(-np.concatenate([self.high, high]), self.keep)

    def at_rank(self, rank: int) -> tuple[float, float]:
        """The values `rank` places above the minimum and below the maximum of all values seen."""
        low, high = np.sort(self.low), np.sort(self.high)[::-1]
        return float(low[min(rank, low.size - 1)]), float(high[min(rank, high.size - 1)])


def _without_nan(values: np.ndarray) -> np.ndarray:
    """The values, flat, NaN left out (as TensorFlow's calibrator skips them)."""
    flat = values.ravel()
    return flat[~np.isnan(flat)] if np.isnan(flat.min()) else flat


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    return values if values.size <= k else np.partition(values, k - 1)[:k]


class RangeRecorder:
    """The range of each tensor over every image: its min and max, or with `percentile` p the values that
    leave (100 - p) % of all its values (of all images) below and above."""

    def __init__(self, images: int, percentile: float | None = None):
        self.images, self.percentile = images, percentile
        self._extremes: dict[object, _Extremes] = {}
        self._ranks: dict[object, int] = {}

    def add(self, key, values: np.ndarray) -> None:
        """One image's values of tensor `key` (NaN values are skipped, as TensorFlow's calibrator does)."""
        if key not in self._extremes:  # rank from either end, among all values of all images, of the percentile's
            share = (100.0 - self.percentile) / 100.0 if self.percentile else 0.0
            self._ranks[key] = int(share * values.size * self.images)
            self._extremes[key] = _Extremes(self._ranks[key] + 1)
        self._extremes[key].add(values)

    def ranges(self) -> dict[object, tuple[float, float]]:
        """{key: (low, high)}; (inf, -inf) for a tensor that never had a finite value."""
        return {key: extremes.at_rank(self._ranks[key]) if extremes.low.size else (np.inf, -np.inf)
                for key, extremes in self._extremes.items()}


class _MeanExtremes:
    """Each image's min and max of a tensor, averaged over the images (NNCF's estimator for activations): the
    range a typical image takes, not the widest any took; what one image has beyond it is clipped."""

    def __init__(self):
        self._sums: dict[object, list[float]] = {}

    def add(self, key, values: np.ndarray) -> None:
        flat = _without_nan(values)
        sums = self._sums.setdefault(key, [0.0, 0.0, 0])
        if flat.size:
            sums[0] += float(flat.min())
            sums[1] += float(flat.max())
            sums[2] += 1

    def ranges(self) -> dict[object, tuple[float, float]]:
        """{key: (low, high)}; (inf, -inf) for a tensor that never had a finite value."""
        return {key: (low / n, high / n) if n else (np.inf, -np.inf) for key, (low, high, n) in self._sums.items()}


class _Histogram:
    """A tensor's values over all images in BINS bins between its min and max (0 included, as in every
    quantized range), for the range of least quantization error (mse_range)."""

    BINS = 2048

    def __init__(self, low: float, high: float):
        self.low, self.high = min(low, 0.0), max(high, 0.0)
        self.counts = np.zeros(self.BINS, np.int64)

    def add(self, values: np.ndarray) -> None:
        if self.high > self.low:
            self.counts += np.histogram(values, self.BINS, (self.low, self.high))[0]  # NaN is not counted

    def mse_range(self, levels: int = 256, grid: int = 128) -> tuple[float, float]:
        """The (low, high) among `grid` x `grid` shrinkings of each end toward 0 whose `levels`-level uniform
        quantization has the least mean squared error over the histogram: clipping error of the values beyond
        an end, plus step^2 / 12 of rounding for every value."""
        if not self.high > self.low:
            return self.low, self.high
        centers = self.low + (np.arange(self.BINS) + 0.5) * (self.high - self.low) / self.BINS
        fractions = np.arange(1, grid + 1) / grid
        lows, highs = self.low * fractions, self.high * fractions
        below = np.clip(lows[:, None] - centers[None, :], 0, None) ** 2 @ self.counts
        above = np.clip(centers[None, :] - highs[:, None], 0, None) ** 2 @ self.counts
        steps = (highs[None, :] - lows[:, None]) / (levels - 1)
        error = below[:, None] + above[None, :] + self.counts.sum() * steps ** 2 / 12
        i, j = np.unravel_index(np.argmin(error), error.shape)
        return float(lows[i]), float(highs[j])


Activations = Callable[[np.ndarray], Iterator[tuple[object, np.ndarray]]]  # input -> (tensor key, values) ...


def measure_ranges(activations: Activations, tensors: list[np.ndarray], method: str = "minmax",
                   percentile: float | None = None, name_of: Callable[[object], str] = str,
                   whole: Collection = (), bounds: dict[object, Bound] | None = None
                   ) -> dict[object, tuple[float, float]]:
    """{tensor key: (low, high)} over every input in `tensors`, of the tensors `activations` yields for an
    input: with method minmax their min and max, percentile as RangeRecorder, mean_minmax each input's min and
    max averaged (_MeanExtremes), mse the range of least
    quantization error (_Histogram, a second pass over the inputs). The keys in `whole` (the model's
    outputs) get their min and max by every method: a later layer absorbs what a clipped activation loses,
    but a clipped output reaches the user as it is (a classifier's top logits clipped to one value tie, and
    the highest scores are the ones that matter). `bounds` ({key: (low, high)}, saturated_bounds): ranges that
    stop there, and within a bound on both sides their min and max by every method too: what a sigmoid reads,
    clipped below its bound, gives its highest outputs one value (a trained YOLO11n's class logits at the
    99.999th percentile: every score over 0.92 became 0.92, where its detections are the rare largest values),
    and the bound already keeps its steps fine; a bound below only (a SiLU's input) leaves the method its top.
    A tensor with no finite value on any input is an error naming it (`name_of` its key)."""
    clipped = (_MeanExtremes() if method == "mean_minmax"
               else RangeRecorder(len(tensors), percentile if method == "percentile" else None))
    extremes = RangeRecorder(len(tensors))
    kept_whole = set(whole) | {key for key, (_, high) in (bounds or {}).items() if math.isfinite(high)}
    _each_value(activations, tensors,
                lambda key, values: (extremes if key in kept_whole else clipped).add(key, values))
    ranges, outputs = clipped.ranges(), extremes.ranges()
    for key, (low, high) in (ranges | outputs).items():
        if not (np.isfinite(low) and np.isfinite(high)):
            raise MzError(f"calibration: tensor {name_of(key)!r} has no finite value on any calibration image")
    if method == "mse":
        histograms = {key: _Histogram(*bounds) for key, bounds in ranges.items()}
        _each_value(activations, tensors,
                    lambda key, values: key in histograms and histograms[key].add(values))
        ranges = {key: histogram.mse_range() for key, histogram in histograms.items()}
    ranges |= outputs
    return ranges | {key: _within_bound(*ranges[key], bound) for key, bound in (bounds or {}).items() if key in ranges}


def _each_value(activations: Activations, tensors: list[np.ndarray], take: Callable) -> None:
    for tensor in tensors:
        for key, values in activations(tensor):
            take(key, values)
            del values  # a view of a runtime's memory must not outlive its image (LiteRT refuses to invoke)


def interpreter_keeping(model, wanted: list[int], threads: int = 2, kernels: str = OPTIMIZED):
    """A LiteRT interpreter of `model` (a read_model object, left as it was) that keeps the tensors of
    subgraph 0 in `wanted` after every invoke: each is made an output of the graph, so XNNPACK (which
    cannot keep all tensors, as experimental_preserve_all_tensors does) computes it."""
    from ai_edge_litert.interpreter import Interpreter

    graph = model.subgraphs[0]
    outputs = graph.outputs
    graph.outputs = list(outputs) + [i for i in wanted if i not in outputs and i not in graph.inputs]
    try:
        interpreter = Interpreter(model_content=model_bytes(model), num_threads=threads,
                                  experimental_op_resolver_type=op_resolver(kernels))
    finally:
        graph.outputs = outputs
    interpreter.allocate_tensors()
    return interpreter


# TFLite ops that only move values (an output's values are theirs) and ops that join them unchanged
MOVING_OPS = ("RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "CONCATENATION")


def output_tensors(model) -> set[int]:
    """The tensors of subgraph 0 whose values reach the model's outputs unchanged: the outputs and what
    MOVING_OPS make them from."""
    graph = model.subgraphs[0]
    producer = {out: (name, op) for name, op in zip(op_names(model), graph.operators) for out in op.outputs}
    found, pending = set(), list(graph.outputs)
    while pending:
        tensor = pending.pop()
        if tensor in found or tensor < 0:
            continue
        found.add(tensor)
        name, op = producer.get(tensor, ("", None))
        if name in MOVING_OPS:
            pending += list(op.inputs) if name == "CONCATENATION" else [op.inputs[0]]
    return found


# Ops whose 8-bit output stops changing beyond an input bound (TFLite's names, then ONNX's): a sigmoid's output
# steps are 1/256, so sigmoid(x) rounds to 0 below x = -6.2 and to 255/256 above 5.1; a tanh's are 1/128, and
# tanh(x) rounds to +-127/128 beyond |x| = 2.6. The bounds keep a margin.
SIGMOID_BOUND = 8.0
SATURATING_OPS = {"LOGISTIC": SIGMOID_BOUND, "TANH": 4.0, "Sigmoid": SIGMOID_BOUND, "Tanh": 4.0}
SIGMOIDS = ("LOGISTIC", "Sigmoid")
# A SiLU (x * sigmoid(x), every activation of a YOLO): its 8-bit sigmoid rounds to 0 below x = -6.2, so the
# product is 0 there whatever x is, and near x itself above: it stops seeing x below -8 (the sigmoid's bound),
# never above
SILU_LOW = -8.0
PRODUCTS = ("MUL", "Mul")


# Ops that only move or join values, TFLite's and ONNX's: values beyond what bounds their outputs are beyond it
# in their inputs too
VALUE_MOVING_OPS = (*MOVING_OPS, *SHAPE_OPS, "Concat")

Bound = tuple[float, float]  # (low, high): what every reader sees of a tensor; high may be inf


def saturated_bounds(readers: dict[object, list[tuple[str, tuple, tuple]]], outputs: Collection,
                     sigmoid_read: Collection = ()) -> dict[object, Bound]:
    """{tensor: (low, high)} for the tensors (`readers`: each op that reads them, its name, inputs and outputs)
    that are no output of the model and whose every reader stops seeing them beyond (low, high): one of
    SATURATING_OPS (+-its bound), the product of a SiLU (below SILU_LOW), or an op of VALUE_MOVING_OPS whose
    outputs are bounded themselves (a detector's class logits, reshaped and joined level by level before one
    sigmoid). Their values beyond it give those ops no other 8-bit output, so their range can stop there and
    keep finer steps where the op's output still moves (MediaPipe's selfie segmenter: a sigmoid's input measured
    over [-975, 388], 5.3 per step, the mask's edge lost; NudeNet's YOLOv8n: its stem's SiLUs read [-212, 194]).
    Read by several, a tensor takes the widest. The outputs in `sigmoid_read` are decoded through a sigmoid after
    the model (an SSD head's class logits, Postprocess.sigmoid_read_outputs): bounded as a sigmoid's input, and so are
    what moves their values (MediaPipe's pose detector: class logits measured over [-575, 3.6], 2.3 logits a
    step, where a score of 0.3-0.7 is a logit of -0.8 to 0.8)."""
    bounds: dict[object, Bound] = {tensor: (-SIGMOID_BOUND, SIGMOID_BOUND) for tensor in sigmoid_read}
    grown = True
    while grown:  # a join's inputs are bounded once its output is
        grown = False
        for tensor, reads in readers.items():
            if tensor in bounds or tensor in outputs or not reads:
                continue
            found = [_reader_bound(tensor, read, reads, bounds) for read in reads]
            if None not in found:
                bounds[tensor] = (min(low for low, _ in found), max(high for _, high in found))
                grown = True
    return bounds


def _reader_bound(tensor, read: tuple[str, tuple, tuple], reads: list, bounds: dict) -> Bound | None:
    name, inputs, made = read
    if name in SATURATING_OPS:
        return -SATURATING_OPS[name], SATURATING_OPS[name]
    gates = {out for other, _, outs in reads if other in SIGMOIDS for out in outs}  # sigmoid(tensor)
    if name in PRODUCTS and len(inputs) == 2 and tensor in inputs and any(i in gates for i in inputs):
        return SILU_LOW, math.inf
    if name in VALUE_MOVING_OPS and made and all(t in bounds for t in made):
        return min(bounds[t][0] for t in made), max(bounds[t][1] for t in made)
    return None


def _within_bound(low: float, high: float, bound: Bound) -> tuple[float, float]:
    """A measured range stopped at the bound (0 kept inside, as every quantized range holds it)."""
    return min(max(low, bound[0]), 0.0), max(min(high, bound[1]), 0.0)


def readers_of(ops: Iterable[tuple[str, Iterable, Iterable]]) -> dict[object, list[tuple[str, tuple, tuple]]]:
    """{tensor: (name, input tensors, output tensors) of each op that reads it}, from each op's (name, inputs,
    outputs)."""
    readers: dict[object, list[tuple[str, tuple, tuple]]] = {}
    for name, inputs, made in ops:
        inputs = tuple(inputs)
        for tensor in inputs:
            readers.setdefault(tensor, []).append((name, inputs, tuple(made)))
    return readers


def record_ranges(model, tensors: list[np.ndarray], wanted: list[int], method: str = "minmax",
                  percentile: float | None = None, threads: int = 2, sigmoid_read: Collection[str] = (),
                  outputs: list[str] | None = None) -> dict[int, tuple[float, float]]:
    """{tensor index: (low, high)} over every input in `tensors` of the tensors of subgraph 0 in `wanted`
    (of `model`, a read_model object), run by the LiteRT interpreter (see measure_ranges; the model's
    outputs keep their whole range, those named in `sigmoid_read` the part a sigmoid's band holds, named as the
    recipe names the model's `outputs`, where a converter renamed them)."""
    interpreter = interpreter_keeping(model, wanted, threads)
    model_input = interpreter.get_input_details()[0]["index"]
    names = {d["index"]: d["name"] for d in interpreter.get_tensor_details()}

    def activations(tensor: np.ndarray):
        interpreter.set_tensor(model_input, tensor)
        interpreter.invoke()
        for i in wanted:
            yield i, interpreter.tensor(i)()  # a view, no copy

    graph = model.subgraphs[0]
    readers = readers_of(zip(op_names(model), (op.inputs for op in graph.operators),
                             (op.outputs for op in graph.operators)))
    read = own_names([names[i] for i in graph.outputs], outputs, sigmoid_read)
    bounded = [i for i in graph.outputs if names[i] in read]
    return measure_ranges(activations, tensors, method, percentile, names.get, output_tensors(model),
                          saturated_bounds(readers, graph.outputs, bounded))


def calibrate_with_interpreter(marked: Path, tensors: list[np.ndarray], target: Path, method: str = "minmax",
                               percentile: float | None = None, sigmoid_read: Collection[str] = (),
                               outputs: list[str] | None = None) -> Path | None:
    """Write to `target` the model `marked` (calibrated by the converter on one image) with every range
    slot set from all `tensors` (see record_ranges, `sigmoid_read` its outputs read through a sigmoid, by the
    recipe's names of its `outputs`); None when
    the model has control flow (more than one subgraph), which only TensorFlow's calibrator follows."""
    model = read_model(marked)
    if len(model.subgraphs) != 1:
        return None
    slots = {i: t for i, t in enumerate(model.subgraphs[0].tensors)
             if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1}
    ranges = record_ranges(model, tensors, sorted(slots), method, percentile, sigmoid_read=sigmoid_read,
                           outputs=outputs)
    for i, tensor in slots.items():
        tensor.quantization.min, tensor.quantization.max = [ranges[i][0]], [ranges[i][1]]
    return write_model(model, target)
