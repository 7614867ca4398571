"""Fitted rounding of depthwise int8 weights (mzconvert/quant/rounding.py), on values and models made here."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from mzconvert.quant.rounding import fitted_rounding, patches, tflite_window
from tests.conftest import run_cli
from tests.test_init import TRAIN, VAL, image_folder


def _cost(q, scales, weights, second):
    error = q * scales[:, None] - weights
    return np.einsum("ci,cij,cj->c", error, second, error)


def test_fitted_rounding_is_the_best_of_every_floor_ceil_choice():
    rng = np.random.default_rng(3)
    channels, k = 64, 9
    weights = rng.normal(size=(channels, k)) * rng.uniform(0.1, 5, (channels, 1))
    weights[0, 4] = 127.0 * np.abs(weights[0]).max() / 127  # a weight exactly on the top step
    scales = np.abs(weights).max(axis=1) / 127
    x = rng.normal(size=(channels, 400, k)) + rng.normal(size=(channels, 1, k))  # correlated, not centred
    second = np.einsum("cni,cnj->cij", x, x) / 400
    fitted = fitted_rounding(weights, scales, second)
    floor = np.floor(weights / scales[:, None])
    every = np.array(list(itertools.product((0.0, 1.0), repeat=k)))
    for c in range(channels):
        candidates = np.clip(floor[c] + every, -127, 127)
        costs = _cost(candidates, np.full(len(every), scales[c]), np.tile(weights[c], (len(every), 1)),
                      np.tile(second[c], (len(every), 1, 1)))
        assert _cost(fitted[c:c + 1], scales[c:c + 1], weights[c:c + 1], second[c:c + 1])[0] == pytest.approx(costs.min())
    assert fitted.min() >= -127 and fitted.max() <= 127
    nearest = np.round(weights / scales[:, None])
    assert np.all(_cost(fitted, scales, weights, second) <= _cost(nearest, scales, weights, second) + 1e-12)
    assert _cost(fitted, scales, weights, second).sum() < 0.8 * _cost(nearest, scales, weights, second).sum()


def test_larger_kernels_get_a_rounding_no_single_flip_improves():
    """5x5 depthwise (MobileNetV3, EfficientNet): 2^25 choices are too many; the search from nearest
    rounding ends where flipping any one weight between floor and ceil would add error."""
    rng = np.random.default_rng(4)
    channels, k = 48, 25
    weights = rng.normal(size=(channels, k)) * rng.choice([1.0, 20.0], size=(channels, k), p=[0.9, 0.1])
    scales = np.abs(weights).max(axis=1) / 127
    x = rng.normal(size=(channels, 2000, k)) + 0.5 * rng.normal(size=(channels, 2000, 1))  # shared component
    second = np.einsum("cni,cnj->cij", x, x) / 2000
    fitted = fitted_rounding(weights, scales, second)
    nearest = np.round(weights / scales[:, None])
    cost = _cost(fitted, scales, weights, second)
    assert np.all(cost <= _cost(nearest, scales, weights, second) + 1e-12)
    assert cost.sum() < 0.9 * _cost(nearest, scales, weights, second).sum()
    floor = np.floor(weights / scales[:, None])
    for c in range(channels):
        for i in range(k):
            flipped = fitted[c].copy()
            flipped[i] = floor[c, i] + (fitted[c, i] == floor[c, i])
            if flipped[i] <= 127:
                assert _cost(flipped[None], scales[c:c + 1], weights[c:c + 1], second[c:c + 1])[0] >= cost[c] - 1e-12


def _depthwise_model(path, seed=0):
    """A Keras model with the depthwise geometries a user's model can have, as a float .tflite."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((23, 21, 4), batch_size=1, name="pixels")
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="same")(inputs)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, name="strided")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="valid", dilation_rate=2, name="dilated")(x)
    x = keras.layers.DepthwiseConv2D((1, 3), strides=(1, 2), padding="valid", name="wide")(x)
    x = keras.layers.DepthwiseConv2D(5, strides=2, padding="same", name="large")(x)
    model = keras.Model(inputs, x)
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    return path


def test_patches_reproduce_every_depthwise_convolution_of_a_real_model(tmp_path):
    """Σ patch · weight + bias at sampled positions equals what LiteRT computed, for SAME and VALID padding,
    strides, dilation and a depth multiplier: the patches are the op's own."""
    from mzconvert.quant.ranges import interpreter_keeping
    from mzconvert.tflite_file import op_names, read_model

    model = read_model(_depthwise_model(tmp_path / "dw.tflite"))
    graph = model.subgraphs[0]
    ops = [op for op, name in zip(graph.operators, op_names(model)) if name == "DEPTHWISE_CONV_2D"]
    assert len(ops) == 5
    interpreter = interpreter_keeping(model, sorted({i for op in ops for i in (op.inputs[0], op.outputs[0])}))
    rng = np.random.default_rng(1)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           rng.normal(size=(1, 23, 21, 4)).astype(np.float32))
    interpreter.invoke()
    for op in ops:
        weight = graph.tensors[op.inputs[1]]
        kernel = tuple(weight.shape[1:3])
        values = interpreter.tensor(op.inputs[0])()[0].copy()
        output = interpreter.tensor(op.outputs[0])()[0].copy()
        window = tflite_window(values.shape, op, kernel)
        assert window.out == output.shape[:2]
        taken = patches(values, window, np.arange(output.shape[0] * output.shape[1]))  # (in channels, n, k)
        w = np.frombuffer(bytes(model.buffers[weight.buffer].data), np.float32).reshape(-1, weight.shape[3]).T
        bias = np.frombuffer(bytes(model.buffers[graph.tensors[op.inputs[2]].buffer].data), np.float32)
        source = np.arange(weight.shape[3]) // (weight.shape[3] // values.shape[2])
        ours = np.einsum("cnk,ck->nc", taken[source], w) + bias
        np.testing.assert_allclose(ours, output.reshape(-1, output.shape[2]), rtol=1e-4, atol=1e-4)


def _layer_errors(build, variant: str) -> dict[str, float]:
    """Per convolution and fully-connected layer of a built int8 variant: the mean squared error its int8
    weights and bias add to the layer's output, on the float model's own inputs to the layer over the verify
    images (never calibrated on); depthwise layers through our patches (checked against LiteRT above), the
    others through TensorFlow's own convolution and matrix product."""
    import tensorflow as tf

    from mzconvert.quant.ranges import interpreter_keeping
    from mzconvert.tflite_file import op_names, read_model

    floats = read_model(next(build.glob("calibrate/*/calibrated.tflite")))
    quantized = read_model(next(build.glob(f"quantize/{variant}/*.tflite")))
    graph, qgraph = floats.subgraphs[0], quantized.subgraphs[0]
    ops = [(op, name) for op, name in zip(graph.operators, op_names(floats))
           if name in ("DEPTHWISE_CONV_2D", "CONV_2D", "FULLY_CONNECTED")]
    twins = {qgraph.tensors[op.outputs[0]].name: op for op in qgraph.operators}
    interpreter = interpreter_keeping(floats, [op.inputs[0] for op, _ in ops])
    with np.load(next(build.glob("reference/*/reference.npz"))) as saved:
        inputs = [saved[key] for key in saved.files if key.startswith("input_")]

    def stored(model, graph, index, dtype):
        tensor = graph.tensors[index]
        values = np.frombuffer(bytes(model.buffers[tensor.buffer].data), dtype).astype(np.float64)
        return values.reshape(tensor.shape), tensor.quantization

    errors = {}
    for op, kind in ops:
        twin = twins[graph.tensors[op.outputs[0]].name]
        w_float, _ = stored(floats, graph, op.inputs[1], np.float32)
        w_int8, weight_steps = stored(quantized, qgraph, twin.inputs[1], np.int8)
        axis = 3 if kind == "DEPTHWISE_CONV_2D" else 0  # the output channels
        steps = np.asarray(weight_steps.scale).reshape([-1 if a == axis else 1 for a in range(w_int8.ndim)])
        delta = w_int8 * steps - w_float
        bias_error = 0.0  # a layer without a bias (Keras drops a zero one) has none to correct
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            bias_int32, bias_steps = stored(quantized, qgraph, twin.inputs[2], np.int32)
            bias_float, _ = stored(floats, graph, op.inputs[2], np.float32)
            bias_error = bias_int32 * np.asarray(bias_steps.scale) - bias_float
        squared = []
        for tensor in inputs:
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], tensor)
            interpreter.invoke()
            x = interpreter.tensor(op.inputs[0])().copy()
            if kind == "FULLY_CONNECTED":
                out = x.reshape(-1, delta.shape[1]) @ delta.T
            elif kind == "CONV_2D":
                options = op.builtinOptions
                out = tf.nn.conv2d(x.astype(np.float64), delta.transpose(1, 2, 3, 0),
                                   strides=(options.strideH, options.strideW),
                                   padding="SAME" if options.padding == 0 else "VALID").numpy()
            else:
                window = tflite_window(x.shape[1:], op, tuple(delta.shape[1:3]))
                taken = patches(x[0], window, np.arange(window.out[0] * window.out[1]))
                out = np.einsum("cnk,ck->nc", taken, delta.reshape(-1, delta.shape[3]).T)
            squared.append(((out + bias_error) ** 2).ravel())
        errors[graph.tensors[op.outputs[0]].name.decode()] = float(np.concatenate(squared).mean())
    return errors


def test_fitted_layers_are_closer_to_the_float_model_than_nearest_rounding(tmp_path, mirror):
    """A Keras classifier with BN-folded-like weights (a few large ones per channel), built three ways: on images
    never calibrated on, each convolution's int8 weights and bias (depthwise or not, fitted-all) change its
    output less when fitted than when rounded to the nearest step, the last layer, one input an image, keeps
    nearest weights (too few samples to fit them); `fitted` fits the depthwise ones alone and shares its
    calibration with nearest."""
    import keras

    keras.utils.set_random_seed(5)
    inputs = keras.Input((32, 32, 3), name="photo")
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu6", name="conv1")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu6", name="dw1")(x)
    x = keras.layers.Conv2D(24, 1, activation="relu6", name="conv2")(x)
    x = keras.layers.DepthwiseConv2D(3, strides=2, padding="same", activation="relu6", name="dw2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(6, name="logits")(x))
    rng = np.random.default_rng(2)
    for name in ("conv1", "dw1", "conv2", "dw2"):
        layer = model.get_layer(name)
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * rng.choice([1.0, 40.0], size=kernel.shape, p=[0.8, 0.2]), bias])
    keras_file = tmp_path / "dw.keras"
    model.save(keras_file)
    calibration, verify = image_folder(tmp_path / "calib", TRAIN, 12), image_folder(tmp_path / "check", VAL, 8)
    assert run_cli("init", "dw", "--from", str(keras_file), "--calibration", str(calibration), "--verify", str(verify),
                   "--to", str(tmp_path / "recipes")).returncode == 0
    path = tmp_path / "recipes" / "dw.yaml"
    recipe = yaml.safe_load(path.read_text())
    int8 = next(v for v in recipe["variants"] if v["mode"] == "int8") | {"calibration_method": "minmax"}  # one
    recipe["variants"] = [{"name": "float32", "mode": "float32"}, int8 | {"name": "all", "weight_rounding": "fitted-all"},
                          int8 | {"name": "fitted"}, int8 | {"name": "nearest", "weight_rounding": "nearest"}]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = run_cli("--json", "--cache-dir", str(tmp_path / "cache"), "build", str(path),
                   "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "all: 5 layers' weights fitted to the calibration images" in done.stderr
    assert "fitted: 2 layers' weights fitted to the calibration images" in done.stderr
    assert "[dw] nearest: " not in done.stderr
    # one calibration for fitted and nearest, one with every layer's moments for fitted-all
    assert len([line for line in done.stderr.splitlines() if "calibrate/" in line and line.endswith("running")]) == 2
    every, depthwise, nearest = (_layer_errors(tmp_path / "build" / "dw", name) for name in ("all", "fitted", "nearest"))
    assert len(every) == 5 and every.keys() == depthwise.keys() == nearest.keys()
    ratios = {name: every[name] / nearest[name] for name in every}
    last = next(name for name in ratios if "logits" in name)
    assert all(ratios[name] < (0.7 if "dw" in name else 0.85) for name in ratios if name != last), ratios
    assert ratios[last] <= 1.0 + 1e-9, ratios
    assert all(depthwise[name] < 0.7 * nearest[name] if "dw" in name else depthwise[name] == nearest[name]
               for name in nearest), [(depthwise[n], nearest[n]) for n in nearest]


def test_weight_rounding_fitted_is_refused_where_nothing_can_fit_it(tmp_path):
    from mzconvert.errors import RecipeError
    from mzconvert.recipe import load_recipe

    text = (Path(__file__).parent.parent / "recipes" / "mobilenetv2-torchvision.yaml").read_text()
    data = yaml.safe_load(text)
    onnx_int8 = next(v for v in data["variants"] if v["name"] == "int8")
    onnx_int8 |= {"weight_rounding": "fitted", "reduce_range": True}  # 7-bit weights: not what refit rounds to
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match=r"variants\[\d\]\.weight_rounding: weight_rounding fitted applies to int8"):
        load_recipe(tmp_path / "r.yaml")
    onnx_int8.pop("weight_rounding")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    resolved = {v.name: v.weight_rounding for v in load_recipe(tmp_path / "r.yaml").variants}
    assert (resolved["float32"], resolved["dynamic"], resolved["int8"], resolved["int8-tflite"]) == (
        "nearest", "nearest", "nearest", "fitted-all")  # 7-bit weights: nearest; the TFLite int8 as declared
    onnx_int8 |= {"reduce_range": False}  # ONNX QDQ with 8-bit weights: fitted by default
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_recipe(tmp_path / "r.yaml").variant("int8").weight_rounding == "fitted"


def _grouped_onnx(path):
    """An ONNX model of depthwise Convs in the layouts exporters write: explicit symmetric and asymmetric
    pads, stride 2, dilation 2, auto_pad SAME_UPPER, a depth multiplier of 2, a 5x5 kernel."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(6)
    layers = [("a", 4, 4, (3, 3), {"pads": [1, 1, 1, 1]}),
              ("b", 4, 8, (3, 3), {"strides": [2, 2], "pads": [0, 1, 1, 0]}),
              ("c", 8, 8, (3, 3), {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
              ("d", 8, 8, (3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
              ("e", 8, 8, (5, 5), {"pads": [2, 2, 2, 2]})]
    nodes, init, previous = [], [], "input"
    for name, cin, cout, kernel, attributes in layers:
        weights = rng.normal(size=(cout, 1, *kernel)) * rng.choice([1.0, 40.0], size=(cout, 1, *kernel), p=[0.8, 0.2])
        weights /= np.linalg.norm(weights.reshape(cout, -1), axis=1).reshape(cout, 1, 1, 1)  # outputs stay O(1)
        init += [numpy_helper.from_array(weights.astype(np.float32), f"w{name}"),
                 numpy_helper.from_array(rng.normal(size=cout).astype(np.float32), f"b{name}")]
        nodes.append(helper.make_node("Conv", [previous, f"w{name}", f"b{name}"], [name], name=f"conv_{name}",
                                      group=cin, kernel_shape=list(kernel), **attributes))
        previous = name
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, 23, 21])],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, [n.name for n in nodes]


def test_patches_reproduce_every_grouped_onnx_convolution(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from mzconvert.quant.qdq_refits import _window

    path, _ = _grouped_onnx(tmp_path / "grouped.onnx")
    model = onnx.load(str(path))
    names = [n.output[0] for n in model.graph.node]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names[:-1])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(7).normal(size=(1, 4, 23, 21)).astype(np.float32)
    values = dict(zip(names, session.run(names, {"input": x}))) | {"input": x}
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        plane = values[node.input[0]][0].transpose(1, 2, 0)
        window = _window(node, plane.shape[:2], weights[node.input[1]].shape[2:])
        output = values[node.output[0]][0]
        assert window.out == output.shape[1:], node.name
        taken = patches(plane, window, np.arange(window.out[0] * window.out[1]))
        w = weights[node.input[1]].reshape(len(output), -1)
        source = np.arange(len(output)) // (len(output) // plane.shape[2])
        ours = np.einsum("cnk,ck->cn", taken[source], w) + weights[node.input[2]][:, None]
        np.testing.assert_allclose(ours, output.reshape(len(output), -1), rtol=1e-4, atol=1e-4)


def _quantized_both_ways(path: Path, roundings: tuple[str, str], seed: int) -> tuple[Path, dict[str, Path], list]:
    """ONNX Runtime's QDQ int8 of the model at `path` with each of two weight roundings, from the same ranges of 8
    smooth inputs (neighbouring pixels alike, as in images): (the prepared float model, the int8 model of each
    rounding, 4 inputs never calibrated on)."""
    import onnx
    from onnxruntime import quantization as q

    from mzconvert.backends.onnx import _load, _named_nodes, _quantize_prepared, _save
    from mzconvert.recipe import Variant

    prepared = path.with_name("prepared.onnx")
    q.quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
    _save(_named_nodes(_load(prepared)), prepared)
    _, channels, height, width = (d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim)
    rng = np.random.default_rng(seed)

    def smooth():
        blocks = rng.normal(size=(1, channels, -(-height // 4), -(-width // 4)))
        return (np.kron(blocks, np.ones((4, 4)))[:, :, :height, :width] + 0.5).astype(np.float32)

    calibration, unseen = [smooth() for _ in range(8)], [smooth() for _ in range(4)]
    base = Variant(name="i8", mode="int8", io_dtype="float32", calibration="x", calibration_count=None,
                   quantized_input_stats=(128.0, 128.0), min_cosine=None, min_sqnr_db=None, member=None,
                   target="onnx")
    built = {}
    for rounding in roundings:
        built[rounding] = path.with_name(f"{rounding}.onnx")
        _quantize_prepared(prepared, built[rounding], replace(base, weight_rounding=rounding), None,
                           lambda: iter(calibration))
    return prepared, built, unseen


def test_onnx_int8_depthwise_weights_fitted_lower_the_layer_error(tmp_path):
    """ONNX Runtime's QDQ int8 of the grouped model, fitted and nearest, from the same ranges: on inputs never
    calibrated on, every fitted layer's int8 weights and bias change its output less."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from mzconvert.quant.qdq_refits import _window

    path, convs = _grouped_onnx(tmp_path / "grouped.onnx")
    prepared, built, unseen = _quantized_both_ways(path, ("fitted", "nearest"), seed=8)
    floats = onnx.load(str(prepared))
    reads = [n.input[0] for n in floats.graph.node if n.name in convs]
    floats.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                               for n in reads if n != "input")
    session = ort.InferenceSession(floats.SerializeToString(), providers=["CPUExecutionProvider"])
    fetched = [n for n in reads if n != "input"]
    inputs = [dict(zip(fetched, session.run(fetched, {"input": x}))) | {"input": x} for x in unseen]
    float_weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in floats.graph.initializer}
    errors = {}
    for rounding, path in built.items():
        model = onnx.load(str(path))
        stored = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        errors[rounding] = []
        for node in (n for n in model.graph.node if n.name in convs):
            twin = next(n for n in floats.graph.node if n.name == node.name)
            dq_w, dq_b = producer[node.input[1]], producer[node.input[2]]
            w = (stored[dq_w.input[0]] * stored[dq_w.input[1]].reshape(-1, 1, 1, 1)).reshape(len(stored[dq_w.input[1]]), -1)
            bias_error = stored[dq_b.input[0]] * stored[dq_b.input[1]] - float_weights[twin.input[2]]
            squared = []
            for values in inputs:
                plane = values[twin.input[0]][0].transpose(1, 2, 0)
                window = _window(twin, plane.shape[:2], float_weights[twin.input[1]].shape[2:])
                taken = patches(plane, window, np.arange(window.out[0] * window.out[1]))
                source = np.arange(len(w)) // (len(w) // plane.shape[2])
                delta = w - float_weights[twin.input[1]].reshape(len(w), -1)
                squared.append(((np.einsum("cnk,ck->cn", taken[source], delta) + bias_error[:, None]) ** 2).ravel())
            errors[rounding].append(float(np.concatenate(squared).mean()))
    assert len(errors["fitted"]) == len(convs)
    assert all(f < 0.9 * n for f, n in zip(errors["fitted"], errors["nearest"])), errors
    assert sum(errors["fitted"]) < 0.5 * sum(errors["nearest"]), errors


def _dense_onnx(path):
    """Ungrouped convolutions (3x3, padded, stride 2; 1x1) and a Linear (Gemm, transB) as torch exports them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(9)

    def outliers(*shape):  # BN-folded-like: a few large weights per channel, each channel's norm 1
        w = rng.normal(size=shape) * rng.choice([1.0, 40.0], size=shape, p=[0.8, 0.2])
        return (w / np.linalg.norm(w.reshape(shape[0], -1), axis=1).reshape(-1, *[1] * (len(shape) - 1))).astype(np.float32)

    init = [numpy_helper.from_array(outliers(8, 3, 3, 3), "wp"), numpy_helper.from_array(np.full(8, 0.1, np.float32), "bp"),
            numpy_helper.from_array(outliers(16, 8, 1, 1), "wq"), numpy_helper.from_array(np.zeros(16, np.float32), "bq"),
            numpy_helper.from_array(outliers(5, 16), "wr"), numpy_helper.from_array(np.zeros(5, np.float32), "br")]
    nodes = [helper.make_node("Conv", ["input", "wp", "bp"], ["p"], name="conv_p", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Relu", ["p"], ["p_relu"], name="relu_p"),
             helper.make_node("Conv", ["p_relu", "wq", "bq"], ["q"], name="conv_q", kernel_shape=[1, 1]),
             helper.make_node("GlobalAveragePool", ["q"], ["pooled"], name="pool"),
             helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "wr", "br"], ["r"], name="linear_r", transB=1)]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 24, 24])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_int8_every_layer_fitted_lowers_each_convolutions_error(tmp_path):
    """ONNX Runtime's QDQ int8 of a model with ungrouped convolutions and a Linear, fitted-all and nearest, from the
    same ranges: on inputs never calibrated on, each convolution's int8 weights and bias change its output less
    (measured by ONNX Runtime's own Conv on the weight and bias errors); the Linear, one input an image, keeps the
    nearest weights."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper


    path = _dense_onnx(tmp_path / "dense.onnx")
    prepared, built, unseen = _quantized_both_ways(path, ("fitted-all", "nearest"), seed=10)
    floats = onnx.load(str(prepared))
    float_nodes = {n.name: n for n in floats.graph.node}
    float_weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in floats.graph.initializer}
    reads = ["p_relu", "flat"]
    floats.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in reads)
    session = ort.InferenceSession(floats.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = [dict(zip(reads, session.run(reads, {"input": x}))) | {"input": x} for x in unseen]

    def conv_error(twin, delta, bias_error, x):
        """What the int8 weights and bias add to the Conv's output: the Conv of the errors, by ONNX Runtime."""
        error = helper.make_node("Conv", ["x", "w", "b"], ["y"], **{a.name: helper.get_attribute_value(a)
                                                                   for a in twin.attribute})
        graph = helper.make_graph([error], "error", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                                  [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(delta.astype(np.float32), "w"),
                                   numpy_helper.from_array(bias_error.astype(np.float32), "b")])
        runner = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                      .SerializeToString(), providers=["CPUExecutionProvider"])
        return runner.run(["y"], {"x": x})[0].astype(np.float64)

    errors, linear = {}, {}
    for rounding, artifact in built.items():
        model = onnx.load(str(artifact))
        stored = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
        producer = {o: n for n in model.graph.node for o in n.output}
        errors[rounding] = {}
        for node in (n for n in model.graph.node if n.op_type in ("Conv", "Gemm")):
            twin, (dq_w, dq_b) = float_nodes[node.name], (producer[node.input[1]], producer[node.input[2]])
            w_float = float_weights[twin.input[1]]
            steps = stored[dq_w.input[1]].reshape(-1, *[1] * (w_float.ndim - 1))
            delta = stored[dq_w.input[0]] * steps - w_float
            bias_error = stored[dq_b.input[0]] * stored[dq_b.input[1]] - float_weights[twin.input[2]]
            if node.op_type == "Gemm":
                linear[rounding] = stored[dq_w.input[0]]
                continue
            x = "input" if twin.input[0] == "input" else "p_relu"
            errors[rounding][node.name] = float(np.mean([np.mean(conv_error(twin, delta, bias_error, v[x]) ** 2)
                                                         for v in inputs]))
    assert errors["nearest"].keys() == {"conv_p", "conv_q"}
    ratios = {name: errors["fitted-all"][name] / errors["nearest"][name] for name in errors["nearest"]}
    assert all(r < 0.85 for r in ratios.values()), ratios
    np.testing.assert_array_equal(linear["fitted-all"], linear["nearest"])
