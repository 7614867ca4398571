"""What the onnx2tf port is made of before TFLite converts it: what real exports need (Ultralytics' C2f splits,
box decodes whose slice bounds the graph computes from shapes)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mzconvert.backends.nhwc_port import _constants_folded, _int32_split_sizes
from mzconvert.errors import MzError
from mzconvert.quant.tflite_converter import _convert, tf_module


def test_shape_computed_slice_bounds_are_constants_before_onnx2tf(tmp_path):
    """The box decode's chunk(2) as an unsimplified export writes it: Slice bounds from Shape -> Gather -> Div."""
    arrays = {"one": np.array([1], np.int64), "two": np.array(2, np.int64), "zero": np.array([0], np.int64),
              "end": np.array([1 << 30], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
             helper.make_node("Div", ["c", "two"], ["h"]),
             helper.make_node("Slice", ["x", "zero", "h", "one"], ["lt"]),
             helper.make_node("Slice", ["x", "h", "end", "one"], ["rb"]),
             helper.make_node("Sub", ["rb", "lt"], ["y"])]
    graph = helper.make_graph(nodes, "decode", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6])],
                              [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    source = tmp_path / "decode.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    folded = onnx.load(str(_constants_folded(source, tmp_path / "folded.onnx")))
    assert {n.op_type for n in folded.graph.node} == {"Slice", "Sub"}
    constants = {t.name for t in folded.graph.initializer}
    assert all(set(n.input[1:]) <= constants for n in folded.graph.node if n.op_type == "Slice")

    import onnxruntime as ort

    x = np.random.RandomState(0).normal(0, 1, (1, 4, 6)).astype(np.float32)
    want, got = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                 for p in (source, tmp_path / "folded.onnx"))
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_int64_split_sizes_convert_to_tflite(tmp_path):
    """onnx2tf's tf.split with an ONNX Split's int64 sizes: TFLite has no SPLIT_V for them."""
    tf = tf_module()
    from mzconvert.backends.tf import frozen_function

    @tf.function(input_signature=[tf.TensorSpec([1, 4, 4, 8], tf.float32)])
    def block(x):
        a, b = tf.split(x, tf.constant([3, 5], tf.int64), axis=3)
        return tf.concat([tf.nn.relu(b), a], axis=3)

    graph_def = frozen_function(block.get_concrete_function(), "x", ["y"])

    def converted(graph):
        path = tmp_path / "g.pb"
        path.write_bytes(graph.SerializeToString())
        converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(str(path), ["x"], ["y"], {"x": [1, 4, 4, 8]})
        return _convert(converter, path, "(test)")

    with pytest.raises(MzError, match="SplitV"):
        converted(graph_def)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=converted(_int32_split_sizes(graph_def)))
    interpreter.allocate_tensors()
    x = np.random.RandomState(0).normal(0, 1, (1, 4, 4, 8)).astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(got, np.concatenate([np.maximum(x[..., 3:], 0), x[..., :3]], axis=3))


def test_a_port_is_judged_by_its_error_against_the_outputs_size_and_the_layout_is_found():
    """A port's output is taken as the ONNX model's when its largest error is within 0.001 of outputs up to 1,
    or its error power 60 dB below theirs (float32 rounding of a deep graph: YOLO11's probabilities are 0.001
    off); the layout that makes it so is found; a wrong layout or a changed value is refused."""
    from pathlib import Path

    from mzconvert.backends.nhwc_port import _axes_order

    rng = np.random.RandomState(0)
    probabilities = rng.uniform(0, 1, (1, 80, 2100)).astype(np.float32)
    rounding = probabilities + rng.normal(0, 1e-4, probabilities.shape).astype(np.float32)
    rounding[0, 3, 7] += 0.0012  # one value past 0.001, the rest within float32 rounding of a deep graph
    assert _axes_order(rounding, probabilities, Path("m.onnx"), "p") == [0, 1, 2]
    nhwc = rng.normal(0, 3, (1, 20, 20, 8)).astype(np.float32)
    assert _axes_order(nhwc, nhwc.transpose(0, 3, 1, 2), Path("m.onnx"), "f") == [0, 3, 1, 2]
    changed = probabilities.copy()
    changed[0, 5, :50] = 1 - changed[0, 5, :50]  # one class's scores wrong at 50 cells
    with pytest.raises(MzError, match=r"m.onnx: onnx2tf's conversion differs from the ONNX model at output 'p'"):
        _axes_order(changed, probabilities, Path("m.onnx"), "p")
    square = rng.normal(0, 1, (1, 16, 16)).astype(np.float32)
    with pytest.raises(MzError, match="differs"):  # a transposed map, of the same shape either way
        _axes_order(square.transpose(0, 2, 1) + 0.1, square, Path("m.onnx"), "s")
