"""A model someone else quantized (a .tflite, an ONNX QDQ file) is verified against its float twin, the float model
its integer weights define: a file whose one int8 output rounds every class score away is refused, not shipped; one
that keeps its detections builds with its fidelity reported."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mzconvert.backends.float_twin import is_quantized_tflite, write_tflite_float_twin
from mzconvert.runtime import TFLiteRunner
from tests.conftest import MIRROR, image_folder, run_cli

SIZE = 320  # an Ultralytics export size: boxes in pixels up to 320 beside probabilities up to 1
STRIDE = SIZE // 8


def _images(folder: Path, count: int) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32)[None] / 255
            for p in sorted(folder.glob("*.jpg"))[:count]]


def yolov8_like_int8_tflite(path: Path, joined: bool) -> Path:
    """A YOLOv8-layout head as a full-integer .tflite, quantized by TensorFlow's converter on COCO images: per cell
    of an 8x8 grid a box in input pixels (from the cell's corner, at least a cell in size) and two class
    probabilities; `joined`: one [1, 6, 64] output, as an Ultralytics export's Concat makes it (one int8 scale for
    pixels up to 320 and probabilities up to 1), else boxes [1, 4, 64] and scores [1, 2, 64] apart."""
    import tensorflow as tf

    rng = np.random.RandomState(5)
    w_box, w_class = (tf.constant(rng.normal(0, 0.02, (STRIDE, STRIDE, 3, c)).astype(np.float32)) for c in (4, 2))
    cells = np.ones((1, 8, 8, 4), np.float32)  # each cell's corner and a cell's size, in strides
    cells[0, ..., 0], cells[0, ..., 1] = np.meshgrid(np.arange(8), np.arange(8))

    @tf.function(input_signature=[tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32, name="images")])
    def model(x):
        # (sigmoid(b) + cells) * STRIDE, as the ONNX head of test_yolo.py: this converter rounds the Add before
        # the Mul at the Mul's output scale (boxes in steps of 49 pixels), a file the twin refuses as well
        boxes = tf.nn.relu(tf.nn.conv2d(x, w_box * 10, STRIDE, "VALID")) + cells * STRIDE
        scores = tf.sigmoid(tf.nn.conv2d(x, w_class, STRIDE, "VALID"))
        boxes, scores = (tf.transpose(tf.reshape(t, [1, 64, c]), [0, 2, 1]) for t, c in ((boxes, 4), (scores, 2)))
        return tf.concat([boxes, scores], axis=1) if joined else (boxes, scores)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x] for x in _images(MIRROR / "coco" / "train2017", 16))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())
    return path


def _recipe(path: Path, model: Path, outputs: list[str], check: Path) -> Path:
    post = "" if len(outputs) == 1 else f", box_output: {outputs[0]}, class_output: {outputs[1]}"
    path.write_text(f"""name: {path.stem}
task: detection
description: a YOLOv8-layout head someone quantized, taken as it is
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
format: tflite
input: {{name: images, shape: [1, {SIZE}, {SIZE}, 3], layout: NHWC}}
preprocess: {{interpolation: pil-bilinear, scale: 0.00392156862745098, offset: 0.0}}
postprocess: {{kind: yolov8, labels: [person, car], category_ids: [1, 3]{post}}}
variants:
  - {{name: int8, mode: int8, io_dtype: int8}}
verify: {{images: {check}, count: 16}}
""")
    return path


@pytest.mark.slow
def test_a_quantized_tflite_whose_joined_output_rounds_its_scores_away_is_refused_against_its_float_twin(
        tmp_path, mirror):
    check = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 16)
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    joined = yolov8_like_int8_tflite(tmp_path / "joined.tflite", joined=True)
    (output,) = [o.name for o in TFLiteRunner(joined).outputs]
    refused = run_cli("--cache-dir", str(tmp_path / "c"), "build",
                      str(_recipe(tmp_path / "joined.yaml", joined, [output], check)), *where)
    # boxes in pixels and probabilities under one scale of ~1.2: each score is 0 or 1.2, caught by the floors
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "min_slice_sqnr_db" in refused.stderr and "min_matched" in refused.stderr, refused.stderr[-3000:]
    assert "not shipped: int8" in refused.stderr, refused.stderr[-3000:]
    # said as what it is: the file against its twin, and where a better int8 comes from
    assert "int8 vs float twin: " in refused.stderr and "its float export" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "dist" / "joined" / "joined_int8.tflite").exists()
    apart = yolov8_like_int8_tflite(tmp_path / "apart.tflite", joined=False)
    rows = {o.shape[1]: o.name for o in TFLiteRunner(apart).outputs}  # boxes 4, class scores 2
    outputs = [rows[4], rows[2]]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build",
                    str(_recipe(tmp_path / "apart.yaml", apart, outputs, check)), *where)
    assert built.returncode == 0, built.stderr[-3000:]
    verified = json.loads(built.stdout)["apart"]["variants"]["int8"]["verify"]
    assert verified["detections_compared"] > 20 and verified["matched_detections"] >= 0.8, verified
    # debug explains the file layer by layer against its twin (it read the file's own integers as the float model's
    # values: thousands of steps; and the optimized kernels' delegate left the layers' tensors unwritten)
    explained = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "debug", str(tmp_path / "apart.yaml"),
                        "--variant", "int8", *where)
    assert explained.returncode == 0, explained.stderr[-3000:]
    layers = json.loads(explained.stdout)["layers"]
    assert layers and not {row["op"] for row in layers} & {"DELEGATE", "QUANTIZE", "DEQUANTIZE"}, layers
    assert max(row["rmse_steps"] for row in layers) < 3, layers[:3]


def test_the_float_twin_of_an_integer_file_computes_its_float_model(tmp_path):
    """The twin holds no integer tensor, keeps the file's input and output names and computes what the float
    model does up to its weights' rounding, where the integer file itself rounds every activation too."""
    import tensorflow as tf

    rng = np.random.RandomState(1)
    w1, w2 = tf.constant(rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32)), \
        tf.constant(rng.normal(0, 0.3, (8, 4)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="image")])
    def model(x):
        return tf.matmul(tf.reduce_mean(tf.nn.relu6(tf.nn.conv2d(x, w1, 2, "SAME")), [1, 2]), w2) + 0.5

    inputs = [rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32) for _ in range(8)]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x] for x in inputs)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    quantized = tmp_path / "int8.tflite"
    quantized.write_bytes(converter.convert())
    twin = write_tflite_float_twin(quantized, tmp_path / "twin.tflite")
    assert is_quantized_tflite(quantized) and not is_quantized_tflite(twin)
    integer, floating = TFLiteRunner(quantized), TFLiteRunner(twin)
    assert [s.name for s in floating.inputs + floating.outputs] == [s.name for s in integer.inputs + integer.outputs]
    assert floating.inputs[0].dtype == floating.outputs[0].dtype == "float32"
    want = np.stack([model(tf.constant(x)).numpy() for x in inputs])
    got, rounded = (np.stack([runner.run(x)[0] for x in inputs]) for runner in (floating, integer))
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    assert ((got - want) ** 2).mean() < ((rounded - want) ** 2).mean()  # the weights rounded, not the activations


@pytest.mark.slow
def test_published_quantized_mobilenets_agree_with_their_float_twins(tmp_path, mirror):
    """Google's quantization-aware-trained uint8 MobileNetV2 and its post-training int8: each file's top-1 is its
    twin's on nearly every ImageNet sample (what a good quantization keeps)."""
    images = sorted((MIRROR / "imagenet-samples").glob("*.JPEG"))[:100]
    for name in ("coral-mobilenet_v2_1.0_224_quant.tflite", "coral-tf2_mobilenet_v2_1.0_224_ptq.tflite"):
        published = MIRROR / "anchors" / name
        integer, floating = TFLiteRunner(published), TFLiteRunner(write_tflite_float_twin(published, tmp_path / name))
        agreed = 0
        for path in images:
            x = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)[None]
            agreed += int(np.argmax(integer.run(x / 127.5 - 1)[0]) == np.argmax(floating.run(x / 127.5 - 1)[0]))
        assert agreed >= 95, (name, agreed)


def qdq_onnx(float_model: Path, target: Path, inputs: list[np.ndarray]) -> Path:
    """`float_model` quantized as ONNX Runtime's static QDQ quantization does by default (what Ultralytics'
    `format=onnx, int8=True` writes): min/max ranges of `inputs`, int8 weights per channel, uint8 activations."""
    from onnxruntime import quantization as q

    class Images(q.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"images": x} for x in inputs])

        def get_next(self):
            return next(self.feeds, None)

    q.quantize_static(str(float_model), str(target), Images(), quant_format=q.QuantFormat.QDQ, per_channel=True)
    return target


def test_a_qdq_onnx_is_built_as_it_is_and_refused_where_its_one_output_loses_the_scores(tmp_path, mirror):
    """An ONNX model quantized already (QDQ) used to be refused. init now proposes it as it is, one int8 variant,
    verified against its float twin: where the export's one output joins boxes in pixels and probabilities under one
    int8 scale, the build refuses it (exit 1); cut before that Concat, as init proposes for an Ultralytics export,
    it builds, and eval scores it against its twin's row. A float or calibrated variant of it is refused by name
    (exit 2)."""
    from tests.test_yolo import SIZE as YOLO_SIZE
    from tests.test_yolo import with_ultralytics_metadata, yolov8_like_onnx

    images = [np.ascontiguousarray(x.transpose(0, 3, 1, 2)) for x in _images(MIRROR / "coco" / "train2017", 16)]
    assert YOLO_SIZE == SIZE
    float_model = with_ultralytics_metadata(yolov8_like_onnx(tmp_path / "float.onnx"), {0: "person", 1: "car"},
                                            dynamic=False)
    quantized = qdq_onnx(float_model, tmp_path / "yolo_int8.onnx", images)
    check = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 16)
    made = run_cli("init", "yolo-int8", "--from", str(quantized), "--to", str(tmp_path), "--verify", str(check))
    assert made.returncode == 0, made.stderr[-2000:]
    recipe = yaml.safe_load((tmp_path / "yolo-int8.yaml").read_text())
    assert recipe["variants"] == [{"name": "int8", "mode": "int8", "io_dtype": "float32"}], recipe
    assert "targets" not in recipe, recipe
    assert recipe["postprocess"]["kind"] == "yolov8" and len(recipe["strip"]["outputs"]) == 2, recipe
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "yolo-int8.yaml"), *where)
    assert built.returncode == 0, built.stderr[-3000:]
    verified = json.loads(built.stdout)["yolo-int8"]["variants"]["int8"]["verify"]
    assert verified["detections_compared"] > 20 and verified["matched_detections"] >= 0.8, verified
    evaluated = run_cli("--json", "eval", str(tmp_path / "yolo-int8.yaml"), "--dataset", str(MIRROR / "coco"), *where)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    evaluation = json.loads(evaluated.stdout)  # the twin is the row the file is judged against, named as it is
    assert evaluation["baseline"] == "source-twin" and {"source-twin", "int8"} <= set(evaluation["results"]), \
        evaluation["results"].keys()
    # debug explains the file against its twin: a few steps at most in a head this shallow
    explained = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "debug", str(tmp_path / "yolo-int8.yaml"),
                        "--variant", "int8", *where)
    assert explained.returncode == 0, explained.stderr[-3000:]
    steps = [row["accumulated_steps"] for row in json.loads(explained.stdout)["layers"]]
    assert steps and 0.1 < max(steps) < 5, steps
    whole = recipe | {"name": "yolo-whole"}
    whole.pop("strip")
    whole["postprocess"] = {k: v for k, v in recipe["postprocess"].items() if k not in ("box_output", "class_output", "attach")}
    (tmp_path / "yolo-whole.yaml").write_text(yaml.safe_dump(whole, sort_keys=False))
    refused = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "yolo-whole.yaml"), *where)
    assert refused.returncode == 1 and "min_matched" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "dist" / "yolo-whole").exists()
    again = recipe | {"variants": [{"name": "float32", "mode": "float32"}]}
    (tmp_path / "yolo-int8.yaml").write_text(yaml.safe_dump(again, sort_keys=False))
    wrong = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "yolo-int8.yaml"), *where)
    assert wrong.returncode == 2 and "variants: float32: the source is quantized already" in wrong.stderr, \
        wrong.stderr[-2000:]


def test_the_float_twin_of_a_qdq_onnx_computes_its_float_model(tmp_path):
    """ONNX Runtime's QDQ of a small classifier (per-channel weights, biases as int32): the twin has no Quantize or
    Dequantize node, the file's input and output names, and computes the float model up to its weights' rounding,
    closer to it than the file's own 8-bit activations do."""
    import onnx
    import onnxruntime as ort

    from mzconvert.backends.float_twin import onnx_float_twin
    from tests.test_onnx_backend import tiny_onnx

    float_model = tiny_onnx(tmp_path / "float.onnx")
    rng = np.random.RandomState(2)
    inputs = [rng.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32) for _ in range(8)]
    from onnxruntime import quantization as q

    class Inputs(q.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"input": x} for x in inputs])

        def get_next(self):
            return next(self.feeds, None)

    quantized = tmp_path / "qdq.onnx"
    q.quantize_static(str(float_model), str(quantized), Inputs(), quant_format=q.QuantFormat.QDQ, per_channel=True)
    twin = onnx_float_twin(onnx.load(str(quantized)), quantized)
    onnx.checker.check_model(twin)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in twin.graph.node}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    run = {name: ort.InferenceSession(m, options, providers=["CPUExecutionProvider"]) for name, m in
           (("float", str(float_model)), ("qdq", str(quantized)), ("twin", twin.SerializeToString()))}
    assert [o.name for o in run["twin"].get_outputs()] == [o.name for o in run["qdq"].get_outputs()] == ["probabilities"]
    got = {name: np.stack([s.run(None, {"input": x})[0] for x in inputs]) for name, s in run.items()}
    twin_error, qdq_error = (float(((got[k] - got["float"]) ** 2).mean()) for k in ("twin", "qdq"))
    assert np.abs(got["twin"] - got["float"]).max() < 0.02 * np.abs(got["float"]).max()
    assert twin_error < qdq_error, (twin_error, qdq_error)
