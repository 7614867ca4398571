"""Activation ranges (ranges.py) on values made here: the methods' choices, whatever runtime yields them."""

from __future__ import annotations

import numpy as np
import pytest

from mzconvert.quant.ranges import measure_ranges


def ranges_of(images: list[np.ndarray], method: str, percentile: float | None = None) -> tuple[float, float]:
    return measure_ranges(lambda tensor: iter([("t", tensor)]), images, method, percentile)["t"]


def quantization_error(values: np.ndarray, low: float, high: float) -> float:
    """Mean squared error of 8-bit uniform quantization of `values` over [low, high] (clipping included)."""
    step = (high - low) / 255
    return float(np.mean((values - (np.clip(np.round((values - low) / step), 0, 255) * step + low)) ** 2))


def test_mse_range_clips_long_tails_and_quantizes_them_better_than_minmax():
    images = [np.random.RandomState(i).laplace(0, 1, 50_000).astype(np.float32) for i in range(4)]
    values = np.concatenate(images)
    minmax, mse = ranges_of(images, "minmax"), ranges_of(images, "mse")
    assert minmax == (values.min(), values.max())
    assert minmax[0] < mse[0] < 0 < 0.5 * minmax[1] < mse[1] < 0.9 * minmax[1]  # the longer tail clipped more
    assert quantization_error(values, *mse) < 0.85 * quantization_error(values, *minmax)


def test_mse_range_keeps_the_range_of_values_without_outliers():
    images = [np.random.RandomState(i).uniform(-1, 3, 50_000).astype(np.float32) for i in range(4)]
    low, high = ranges_of(images, "mse")
    assert low == pytest.approx(-1, rel=0.03) and high == pytest.approx(3, rel=0.03)


def test_mse_range_of_values_on_one_side_of_zero_starts_at_zero():
    images = [np.random.RandomState(i).uniform(2, 6, 10_000).astype(np.float32) for i in range(3)]
    low, high = ranges_of(images, "mse")
    assert low == 0.0 and high == pytest.approx(6, rel=0.03)  # quantized ranges always hold 0


def test_mean_minmax_averages_each_images_extremes():
    """NNCF's estimator for activations: the range a typical image takes; NaN skipped."""
    images = [np.array([-1.0, 0.0, np.nan]), np.array([0.0, 3.0]), np.array([1.0, 6.0])]
    assert ranges_of(images, "mean_minmax") == (0.0, 3.0)
    assert ranges_of(images, "minmax") == (-1.0, 6.0)


def test_percentile_is_exact_over_all_images():
    images = [np.random.RandomState(i).normal(0, 1, 1000).astype(np.float32) for i in range(5)]
    values = np.sort(np.concatenate(images))
    assert ranges_of(images, "percentile", 99.0) == (values[50], values[-51])


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse", "mean_minmax"])
def test_a_tensor_with_no_finite_value_is_named(method):
    from mzconvert.errors import MzError

    images = [np.zeros(10, np.float32) for _ in range(2)]
    activations = lambda tensor: iter([(0, tensor), (1, tensor * np.nan)])  # noqa: E731
    with pytest.raises(MzError, match="calibration: tensor 'head/logits' has no finite value on any calibration"):
        measure_ranges(activations, images, method, 99.0, {0: "stem", 1: "head/logits"}.get)


@pytest.mark.parametrize("method, percentile", [("percentile", 99.0), ("mse", None), ("mean_minmax", None)])
def test_an_output_keeps_its_whole_range_by_every_method(method, percentile):
    """A later layer absorbs a clipped activation; a clipped output reaches the user (top logits tie)."""
    images = [np.random.RandomState(i).laplace(0, 1, 5_000).astype(np.float32) for i in range(4)]
    values = np.concatenate(images)
    activations = lambda tensor: iter([("inside", tensor), ("output", tensor)])  # noqa: E731
    ranges = measure_ranges(activations, images, method, percentile, whole={"output"})
    assert ranges["output"] == (values.min(), values.max())
    assert values.min() < ranges["inside"][0] and ranges["inside"][1] < values.max()


@pytest.mark.parametrize("method, percentile", [("percentile", 99.99), ("mse", None), ("mean_minmax", None)])
def test_what_a_sigmoid_reads_keeps_its_largest_values_within_the_bound(method, percentile):
    """A detector's class logits: background far below, its detections the rare largest values. Clipped below
    the sigmoid's bound, every confident score would become one; within the bound the range is their min and max
    by every method (and stops at the bound where they pass it)."""
    rng = np.random.RandomState(0)
    images = [np.concatenate([rng.normal(-5, 0.4, 20_000), rng.uniform(1, 5, 3)]).astype(np.float32) for _ in range(4)]
    values = np.concatenate(images)
    activations = lambda tensor: iter([("logits", tensor), ("wide", tensor * 4)])  # noqa: E731
    ranges = measure_ranges(activations, images, method, percentile, bounds={"logits": (-8.0, 8.0), "wide": (-8.0, 8.0)})
    assert ranges["logits"] == (values.min(), values.max())
    assert ranges["wide"] == (-8.0, 8.0)
    assert measure_ranges(activations, images, method, percentile)["logits"][1] < values.max()  # unbounded: clipped


def test_tflite_outputs_are_followed_back_through_ops_that_only_move_values(tmp_path):
    """The tensors whose values a .tflite's outputs are (RESHAPE, CONCATENATION): they keep their whole range."""
    import tensorflow as tf

    from mzconvert.quant.ranges import output_tensors
    from mzconvert.tflite_file import read_model

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 3], tf.float32)])
    def head(x):
        conv = tf.nn.relu(tf.nn.conv2d(x, tf.ones([1, 1, 3, 2]), 1, "VALID"))
        boxes = tf.reshape(conv * 2.0, [1, -1])
        scores = tf.reshape(tf.sigmoid(conv), [1, -1])
        return tf.concat([boxes, scores], axis=1)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([head.get_concrete_function()], head)
    path = tmp_path / "head.tflite"
    path.write_bytes(converter.convert())
    model = read_model(path)
    graph = model.subgraphs[0]
    names = {i: graph.tensors[i].name.decode() for i in output_tensors(model)}
    producers = {out: op for op in graph.operators for out in op.outputs}
    assert len(names) == 5, names  # the output, the two reshapes and what they reshape (mul, logistic)
    assert graph.outputs[0] in names
    assert not any(graph.tensors[i].name == graph.tensors[graph.inputs[0]].name for i in names)
    assert all(i in producers for i in names)


def ranges_by_readers(calibrated) -> dict[frozenset, tuple[float, float]]:
    """{the builtin codes of the ops that read a tensor: its recorded range} of a calibrated model's subgraph 0."""
    graph = calibrated.subgraphs[0]
    readers = {}
    for op in graph.operators:
        code = calibrated.operatorCodes[op.opcodeIndex]
        for i in op.inputs:
            readers.setdefault(i, set()).add(max(code.builtinCode, code.deprecatedBuiltinCode))
    return {frozenset(readers.get(i, ())): (t.quantization.min[0], t.quantization.max[0])
            for i, t in enumerate(graph.tensors) if t.quantization is not None and t.quantization.min is not None}


def test_a_tensor_only_a_sigmoid_or_tanh_reads_stops_at_their_saturation(tmp_path):
    """Beyond +-8 (LOGISTIC) and +-4 (TANH) the int8 output no longer changes: the range stops there, and keeps
    finer steps where the output moves. A tensor another op reads too keeps its measured range."""
    import tensorflow as tf

    from mzconvert.backends.tflite import range_slots
    from mzconvert.quant.ranges import calibrate_with_interpreter
    from mzconvert.recipe import Recipe
    from mzconvert.tflite_file import read_model

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 3], tf.float32)])
    def head(x):
        gate = tf.nn.conv2d(x, tf.fill([1, 1, 3, 2], 100.0), 1, "VALID", name="gate")  # over +-300
        shared = tf.nn.conv2d(x, tf.fill([1, 1, 3, 2], -50.0), 1, "VALID", name="shared")
        return tf.sigmoid(gate) * tf.tanh(shared * 3.0) + tf.sigmoid(shared)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([head.get_concrete_function()], head)
    path = tmp_path / "head.tflite"
    path.write_bytes(converter.convert())
    marked, _ = range_slots(path, Recipe.__new__(Recipe), None, tmp_path / "marked.tflite")
    images = [np.random.RandomState(i).uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32) for i in range(4)]
    ranges = ranges_by_readers(read_model(calibrate_with_interpreter(marked, images, tmp_path / "calibrated.tflite")))
    logistic, tanh = 14, 28  # BuiltinOperator
    assert ranges[frozenset({logistic})] == (-8.0, 8.0)
    assert ranges[frozenset({tanh})] == (-4.0, 4.0)
    shared = next(r for readers_, r in ranges.items() if logistic in readers_ and len(readers_) > 1)
    assert shared[0] < -100 and shared[1] > 100


def test_the_bound_reaches_back_through_ops_that_only_move_values():
    """A detector's class logits, level by level, reshaped and joined before one sigmoid: each level's logits are
    bounded as the sigmoid's input is (TFLite's and ONNX's op names); a tensor another op also reads keeps its
    range; read by a sigmoid and a tanh, a tensor takes the wider bound (clipping at the tanh's would move the
    sigmoid's output)."""
    from mzconvert.quant.ranges import readers_of, saturated_bounds

    for reshape, concat, sigmoid, tanh, add in (("RESHAPE", "CONCATENATION", "LOGISTIC", "TANH", "ADD"),
                                                ("Reshape", "Concat", "Sigmoid", "Tanh", "Add")):
        ops = [(reshape, ["level1", "shape"], ["flat1"]), (reshape, ["level2", "shape"], ["flat2"]),
               (concat, ["flat1", "flat2"], ["logits"]), (sigmoid, ["logits"], ["scores"]),
               (reshape, ["level3", "shape"], ["flat3"]), (concat, ["flat3", "flat1"], ["joined"]),
               (add, ["joined", "bias"], ["sum"]), (sigmoid, ["both"], ["p"]), (tanh, ["both"], ["t"])]
        bounds = saturated_bounds(readers_of(ops), {"scores", "sum", "p", "t"})
        assert bounds["logits"] == bounds["flat2"] == bounds["level2"] == (-8.0, 8.0)
        assert "level1" not in bounds and "flat1" not in bounds  # also joined into what an add reads
        assert "level3" not in bounds and "joined" not in bounds
        assert bounds["both"] == (-8.0, 8.0)


def test_a_silus_input_stops_below_where_its_product_no_longer_moves():
    """x * sigmoid(x) is 0 below x = -6.2 in 8 bits (its sigmoid rounds to 0 there), near x itself above: a tensor
    only a SiLU reads (its sigmoid and the product of the two, in either order) is bounded below only; a tensor a product reads with a
    sigmoid of another tensor, or with a constant, or that a third op reads too keeps its range."""
    from mzconvert.quant.ranges import readers_of, saturated_bounds

    for sigmoid, mul, add in (("LOGISTIC", "MUL", "ADD"), ("Sigmoid", "Mul", "Add")):
        ops = [(sigmoid, ["x"], ["gate"]), (mul, ["x", "gate"], ["silu"]),
               (sigmoid, ["y"], ["y_gate"]), (mul, ["y_gate", "y"], ["y_silu"]),
               (sigmoid, ["z"], ["z_gate"]), (mul, ["z", "z_gate"], ["z_silu"]), (add, ["z", "bias"], ["z_sum"]),
               (sigmoid, ["u"], ["u_gate"]), (mul, ["v", "u_gate"], ["gated"]), (mul, ["w", "scale"], ["scaled"])]
        bounds = saturated_bounds(readers_of(ops), {"silu", "y_silu", "z_silu", "z_sum", "gated", "scaled"})
        assert bounds["x"] == bounds["y"] == (-8.0, np.inf)
        assert bounds["u"] == (-8.0, 8.0)  # only its sigmoid reads it
        assert not {"z", "v", "w"} & set(bounds)


def test_a_silus_input_range_stops_below_at_minus_8_and_keeps_its_top(tmp_path):
    """In the calibrated TFLite model, a convolution's output only its SiLU reads (measured down to below -100)
    stops at -8 and keeps its measured top by min/max (by percentile its top clipped, as any activation's is);
    one a mean reads too keeps its measured range."""
    import tensorflow as tf

    from mzconvert.backends.tflite import range_slots
    from mzconvert.quant.ranges import calibrate_with_interpreter
    from mzconvert.recipe import Recipe
    from mzconvert.tflite_file import read_model

    weights = np.array([[100.0, -100.0], [-100.0, 100.0], [50.0, 50.0]], np.float32).reshape(1, 1, 3, 2)

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
    def blocks(x):
        y = tf.nn.conv2d(x, weights, 1, "VALID")
        z = tf.nn.conv2d(x, -weights, 1, "VALID")
        return y * tf.sigmoid(y) + z * tf.sigmoid(z) + tf.reduce_mean(z)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([blocks.get_concrete_function()], blocks)
    path = tmp_path / "blocks.tflite"
    path.write_bytes(converter.convert())
    marked, _ = range_slots(path, Recipe.__new__(Recipe), None, tmp_path / "marked.tflite")
    images = [np.random.RandomState(i).uniform(-1, 1, (1, 8, 8, 3)).astype(np.float32) for i in range(4)]
    measured = np.concatenate([np.tensordot(i, weights[0, 0], 1).ravel() for i in images])
    assert measured.min() < -100
    logistic, mul, mean = 14, 18, 40  # BuiltinOperator
    for method, percentile in (("minmax", None), ("percentile", 90.0)):
        ranges = ranges_by_readers(read_model(calibrate_with_interpreter(
            marked, images, tmp_path / f"{method}.tflite", method, percentile)))
        low, high = ranges[frozenset({logistic, mul})]
        assert low == -8.0
        if method == "minmax":
            assert high == pytest.approx(float(measured.max()), rel=1e-5)
        else:
            assert high < 0.9 * float(measured.max())
        assert ranges[frozenset({logistic, mul, mean})][0] < -100
