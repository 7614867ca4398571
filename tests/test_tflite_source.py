"""A float .tflite as users bring it (converted, never quantized): init proposes int8, the build quantizes it with
ai-edge-quantizer on the user's images, verifies it against the float file and compiles it for the NPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mzconvert.quant.litert_quantizer import with_signature
from mzconvert.tflite_file import read_model
from tests.conftest import MIRROR, image_folder, run_cli


def float_tflite(path: Path, nchw: bool = False) -> Path:
    """A small float classifier converted from a concrete function: a .tflite with no SignatureDef, as frozen-graph
    conversions and many published files are; with `nchw` its input channels first, as litert-torch keeps a PyTorch
    model's (Ultralytics' .tflite exports since 8.4.83)."""
    import tensorflow as tf

    rng = np.random.RandomState(7)
    w1 = tf.constant(rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32))
    dw = tf.constant(rng.normal(0, 0.3, (3, 3, 8, 1)).astype(np.float32))
    w2 = tf.constant(np.abs(rng.normal(0, 0.3, (8, 5))).astype(np.float32))  # logits that do not cancel out

    @tf.function(input_signature=[tf.TensorSpec([1, 3, 32, 32] if nchw else [1, 32, 32, 3], tf.float32,
                                                name="image")])
    def model(x):
        if nchw:
            x = tf.transpose(x, [0, 2, 3, 1])
        y = tf.nn.relu6(tf.nn.conv2d(x, w1, 2, "SAME"))
        y = tf.nn.relu6(tf.nn.depthwise_conv2d(y, dw, [1, 1, 1, 1], "SAME"))
        return tf.matmul(tf.reduce_mean(y, [1, 2]), w2)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()])
    path.write_bytes(converter.convert())
    return path


def test_a_signature_is_added_where_the_file_has_none(tmp_path):
    model = float_tflite(tmp_path / "m.tflite")
    model_object = read_model(model)
    model_object.signatureDefs = []
    from mzconvert.tflite_file import write_model

    write_model(model_object, model)
    flatbuffer, input_name = with_signature(model)
    signed = tmp_path / "signed.tflite"
    signed.write_bytes(flatbuffer)
    (signature,) = read_model(signed).signatureDefs
    assert signature.signatureKey == b"serving_default" and signature.inputs[0].name.decode() == input_name
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(signed)).get_signature_runner("serving_default")
    out = runner(**{input_name: np.zeros((1, 32, 32, 3), np.float32)})
    assert next(iter(out.values())).shape == (1, 5)


@pytest.mark.parametrize("mode", ["int16x8", "dynamic"])
def test_a_file_of_the_old_schema_is_quantized_with_integer_weights(tmp_path, mode):
    """Operator codes in deprecated_builtin_code only (files written before TFLite 2.4, MediaPipe's): Google's
    quantizer reads builtin_code, took every op for ADD and quantized weights as activations (int16 weights and
    bias: a model LiteRT refuses). Given the codes where it reads them, the weights are int8."""
    from ai_edge_litert.interpreter import Interpreter

    from mzconvert.quant.litert_quantizer import quantize
    from mzconvert.tflite_file import op_names, write_model

    model = read_model(float_tflite(tmp_path / "m.tflite"))
    for code in model.operatorCodes:
        code.deprecatedBuiltinCode, code.builtinCode = max(code.builtinCode, code.deprecatedBuiltinCode), 0
    old = write_model(model, tmp_path / "old.tflite")
    rng = np.random.RandomState(0)
    out = quantize(old, mode, lambda: [rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32) for _ in range(4)],
                   tmp_path / "q.tflite")
    Interpreter(model_path=str(out)).allocate_tensors()
    quantized = read_model(out)
    graph, names = quantized.subgraphs[0], op_names(quantized)
    conv = graph.operators[names.index("CONV_2D")]
    assert graph.tensors[conv.inputs[1]].type == 9  # INT8 weights


def test_google_quantizers_ranges_hold_every_value_the_calibration_images_gave(tmp_path):
    """ai-edge-quantizer keeps a moving average of each tensor's min and max image by image: after one bright image
    and fifteen dim ones its ranges were about half the largest values, which the model then clipped (a trained
    YOLOv8n's int16x8: 93.9 % of float's detections matched, 98.9 % with the ranges below). Each range now holds
    the min and max over every calibration image."""
    from ai_edge_litert.interpreter import Interpreter

    from mzconvert.quant.litert_quantizer import quantize
    from mzconvert.runtime import TFLiteRunner

    model = float_tflite(tmp_path / "m.tflite")
    rng = np.random.RandomState(0)
    images = [rng.uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)] + \
        [rng.uniform(0, 0.1, (1, 32, 32, 3)).astype(np.float32) for _ in range(15)]
    largest = max(float(np.abs(TFLiteRunner(model).run(x)[0]).max()) for x in images)
    out = quantize(model, "int16x8", lambda: images, tmp_path / "q.tflite")
    (output,) = Interpreter(model_path=str(out)).get_output_details()
    scale, zero_point = output["quantization"]
    assert zero_point == 0 and scale * 32767 >= 0.99 * largest, (scale * 32767, largest)


def with_buffers_after(path: Path, target: Path) -> Path:
    """The model with every buffer's data stored after the flatbuffer, each found by its offset from the start of
    the file: the layout ai-edge-quantizer writes for a model of 256 KiB of weights or more (and so Ultralytics'
    int8 `.tflite`)."""
    from mzconvert.tflite_file import model_bytes

    model = read_model(path)
    stored = {i: bytes(b.data) for i, b in enumerate(model.buffers) if b.data is not None and len(b.data)}
    for i in stored:  # placeholders first: the flatbuffer's length, where the data will start
        model.buffers[i].data, model.buffers[i].offset, model.buffers[i].size = None, 1, 1
    position, layout = -(-len(model_bytes(model)) // 16) * 16, {}
    for i, data in stored.items():
        layout[i] = position
        model.buffers[i].offset, model.buffers[i].size = position, len(data)
        position = -(-(position + len(data)) // 16) * 16
    flatbuffer = bytearray(model_bytes(model))  # the same length: the fields were written as placeholders
    content = flatbuffer + bytes(position - len(flatbuffer))
    for i, data in stored.items():
        content[layout[i]:layout[i] + len(data)] = data
    target.write_bytes(bytes(content))
    return target


def test_buffers_stored_after_the_flatbuffer_are_kept_when_a_file_is_rewritten(tmp_path):
    """A file read and written again (strip, attach) kept its buffers' offsets and not their bytes: LiteRT refused
    it ("Constant buffer 24 specified an out of range offset"), for Ultralytics' int8 `.tflite` among others. It
    now computes what it did."""
    from ai_edge_litert.interpreter import Interpreter

    from mzconvert.tflite_file import write_model

    original = float_tflite(tmp_path / "m.tflite")
    stored_after = with_buffers_after(original, tmp_path / "after.tflite")
    rewritten = write_model(read_model(stored_after), tmp_path / "rewritten.tflite")
    image = np.random.RandomState(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)

    def outputs(path: Path) -> np.ndarray:
        interpreter = Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    np.testing.assert_array_equal(outputs(stored_after), outputs(original))
    np.testing.assert_array_equal(outputs(rewritten), outputs(original))


@pytest.mark.slow
def test_a_float_tflite_inits_and_builds_to_a_verified_int8_for_the_npu(tmp_path, mirror):
    model = float_tflite(tmp_path / "float.tflite")
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 16)
    verify = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 8)
    made = run_cli("init", "ftl", "--from", str(model), "--to", str(tmp_path), "--calibration", str(calibration),
                   "--verify", str(verify))
    assert made.returncode == 0, made.stderr[-2000:]
    recipe = yaml.safe_load((tmp_path / "ftl.yaml").read_text())
    assert [v["mode"] for v in recipe["variants"]] == ["float32", "int8"] and recipe["targets"]["vela"]
    # the LiteRT quantizer's 16-bit activations too, and a variant taking the quantized file as it is refused
    recipe["variants"] += [{"name": "int8-aeq", "mode": "int8", "io_dtype": "int8", "calibration": str(calibration),
                            "quantizer": "ai-edge-quantizer"},
                           {"name": "int16x8", "mode": "int16x8", "io_dtype": "int16", "calibration": str(calibration)}]
    (tmp_path / "ftl.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "ftl.yaml"), *where)
    assert built.returncode == 0, built.stderr[-3000:]
    variants = json.loads(built.stdout)["ftl"]["variants"]
    int8, aeq, int16 = variants["int8"], variants["int8-aeq"], variants["int16x8"]
    assert int8["inputs"][0]["dtype"] == aeq["inputs"][0]["dtype"] == "int8" and int16["inputs"][0]["dtype"] == "int16"
    # the converter's int8, as for any graph: the depthwise weights fitted to the calibration images
    assert "int8: 1 layers' weights fitted" in built.stderr
    (output,) = [k for k, v in int8["verify"].items() if isinstance(v, dict)]
    # 8-bit weights bound them here (30 dB): 16-bit activations are checked to run and verify, not to gain
    assert min(v["verify"][output]["sqnr_db"] for v in (int8, aeq, int16)) > 20
    (npu,) = int8["vela"].values()
    assert npu["cpu_op_count"] == 0 and npu["npu_ops"] > 0
    # debug compares the built int8 with the float file tensor by tensor (no converter to re-quantize it with)
    debugged = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "debug", str(tmp_path / "ftl.yaml"),
                       "--variant", "int8", *where)
    assert debugged.returncode == 0, debugged.stderr[-2000:]
    layers = json.loads(debugged.stdout)["layers"]
    assert {row["op"] for row in layers} >= {"CONV_2D", "DEPTHWISE_CONV_2D"}
    assert all(row["accumulated_steps"] >= row["rmse_steps"] >= 0 for row in layers)
    # the int8 file taken as the source: calibrating it again is refused by name
    quantized = tmp_path / "dist" / "ftl" / int8["file"]
    again = run_cli("init", "again", "--from", str(quantized), "--to", str(tmp_path))
    assert again.returncode == 0, again.stderr
    again_recipe = yaml.safe_load((tmp_path / "again.yaml").read_text())
    assert again_recipe["variants"] == [{"name": "int8", "mode": "int8", "io_dtype": "int8"}]
    again_recipe["variants"][0]["calibration"] = str(calibration)
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(again_recipe, sort_keys=False))
    refused = run_cli("build", str(tmp_path / "again.yaml"), *where)
    assert refused.returncode == 1 and "is quantized already; remove calibration" in refused.stderr, refused.stderr
    # debug names layers as float_layers takes them (the fused conv's name has its activation's after ';')
    worst = next(row["layer"] for row in layers if ";" in row["layer"])
    recipe["variants"] = [recipe["variants"][1] | {"name": "int8-float-worst", "float_layers": [worst]}]
    (tmp_path / "ftl.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    kept = run_cli("build", str(tmp_path / "ftl.yaml"), "--out", str(tmp_path / "kept"), "--build-dir",
                   str(tmp_path / "build"))
    assert kept.returncode == 0, kept.stderr[-3000:]


BIAS = np.array([0.5, -0.25, 1.0, 0.0], "<f4")


def _as_mediapipe_file(path: Path, target: Path) -> Path:
    """A converted Conv2DTranspose model in the form MediaPipe publishes: its TRANSPOSE_CONV as the custom
    Convolution2DTransposeBias (input, weights, bias; padding, stride w, stride h as three int32)."""
    from mzconvert.tflite_file import add_buffer, schema, write_model

    s = schema()
    model = read_model(path)
    graph = model.subgraphs[0]
    (op,) = [o for o in graph.operators
             if model.operatorCodes[o.opcodeIndex].builtinCode == s.BuiltinOperator.TRANSPOSE_CONV]
    code = s.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.customCode, code.version = (
        s.BuiltinOperator.CUSTOM, s.BuiltinOperator.CUSTOM, b"Convolution2DTransposeBias", 1)
    model.operatorCodes.append(code)
    options = op.builtinOptions
    bias = s.TensorT()
    bias.name, bias.type, bias.shape = b"bias", s.TensorType.FLOAT32, np.array([4], np.int32)
    bias.buffer = add_buffer(model, BIAS.tobytes())
    graph.tensors.append(bias)
    op.opcodeIndex = len(model.operatorCodes) - 1
    op.inputs = [op.inputs[2], op.inputs[1], len(graph.tensors) - 1]
    op.customOptions = np.frombuffer(np.array([{0: 1, 1: 2}[options.padding], options.strideW, options.strideH],
                                              "<i4").tobytes(), np.uint8)
    op.builtinOptionsType, op.builtinOptions = 0, None
    return write_model(model, target)


def test_float16_weights_and_mediapipes_transpose_conv_freeze_to_the_same_float_model(tmp_path):
    """Published MediaPipe files store weights float16 (a DEQUANTIZE each) and upsample with a custom op: frozen,
    they are the same function in ops every quantizer and vela know."""
    import tensorflow as tf

    from mzconvert.backends.tflite import freeze
    from mzconvert.runtime import TFLiteRunner
    from mzconvert.tflite_file import op_names

    tf.keras.utils.set_random_seed(5)
    keras_model = tf.keras.Sequential([tf.keras.Input((16, 16, 3), batch_size=1),
                                       tf.keras.layers.Conv2D(8, 3, padding="same"),
                                       tf.keras.layers.Conv2DTranspose(4, 2, strides=2, padding="same", use_bias=False)])
    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]
    (tmp_path / "fp16.tflite").write_bytes(converter.convert())
    published = _as_mediapipe_file(tmp_path / "fp16.tflite", tmp_path / "published.tflite")
    assert {"DEQUANTIZE", "Convolution2DTransposeBias"} <= set(op_names(read_model(published)))

    (tmp_path / "frozen").mkdir()
    frozen = freeze(published, None, tmp_path / "frozen")
    ops = op_names(read_model(frozen))
    assert "DEQUANTIZE" not in ops and "Convolution2DTransposeBias" not in ops and "TRANSPOSE_CONV" in ops
    x = np.random.RandomState(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    (want,), (got,) = TFLiteRunner(published).run(x), TFLiteRunner(frozen).run(x)
    assert got.shape == (1, 32, 32, 4) and np.allclose(want, got, atol=1e-5)
    assert np.allclose(want, keras_model(x).numpy() + BIAS, atol=2e-2)  # float16 weights: the same model


def test_init_takes_the_normalization_a_tflite_declares_in_its_metadata(tmp_path, mirror):
    """Published TFLite files (Coral, MediaPipe, Model Maker) declare their input normalization in the TFLite
    metadata: init proposes it instead of a convention; a file without metadata gets the convention, marked CHECK."""
    published = next(MIRROR.rglob("coral-mobilenet_v2_1.0_224_quant.tflite"))
    made = run_cli("init", "coral", "--from", str(published), "--to", str(tmp_path))
    assert made.returncode == 0, made.stderr[-2000:]
    text = (tmp_path / "coral.yaml").read_text()
    recipe = yaml.safe_load(text)
    assert recipe["preprocess"]["mean"] == [127.5] * 3 and recipe["preprocess"]["std"] == [127.5] * 3
    assert "from the model's TFLite metadata" in text
    listed = run_cli("inspect", str(published))
    assert "input normalization in its metadata: (pixel - [127.5]) / [127.5]" in listed.stdout

    plain = float_tflite(tmp_path / "plain.tflite")
    made = run_cli("init", "plain", "--from", str(plain), "--to", str(tmp_path))
    assert made.returncode == 0 and "CHECK the preprocess block" in (tmp_path / "plain.yaml").read_text()


def sparse_tflite(path: Path) -> Path:
    """A float .tflite with weights stored sparse (DENSIFY, as the converter's EXPERIMENTAL_SPARSITY writes them)
    and a DEPTH_TO_SPACE upsampling: the two things MediaPipe's pose detector has that int8 did not survive."""
    import tensorflow as tf

    rng = np.random.RandomState(3)
    weights = rng.normal(0, 0.3, (3, 3, 3, 16)).astype(np.float32)
    weights[rng.uniform(size=weights.shape) < 0.8] = 0  # pruned: stored sparse

    @tf.function(input_signature=[tf.TensorSpec([1, 32, 32, 3], tf.float32, name="image")])
    def model(x):
        return tf.nn.depth_to_space(tf.nn.relu6(tf.nn.conv2d(x, weights, 1, "SAME")), 2)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    path.write_bytes(converter.convert())
    return path


@pytest.mark.slow
def test_sparse_weights_and_depth_to_space_build_to_an_int8_the_reference_kernels_verify(tmp_path, mirror):
    """Sparse weights are stored dense at freeze (the converter's quantizer left a densified weight float: an int8
    convolution with a float filter, which LiteRT refuses), and the int8 DEPTH_TO_SPACE (version 2) loads under
    LiteRT's reference kernels, whose resolver registers version 1 only: the build verifies under them."""
    from mzconvert.runtime import OPTIMIZED, REFERENCE, TFLiteRunner
    from mzconvert.tflite_file import op_names

    model = sparse_tflite(tmp_path / "sparse.tflite")
    assert "DENSIFY" in op_names(read_model(model))
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 8)
    verify = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 4)
    made = run_cli("init", "sparse", "--from", str(model), "--to", str(tmp_path), "--calibration", str(calibration),
                   "--verify", str(verify))
    assert made.returncode == 0, made.stderr[-2000:]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "sparse.yaml"),
                    "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert built.returncode == 0, built.stderr[-3000:]
    frozen = tmp_path / "build" / "sparse" / "freeze" / "model.tflite"
    assert op_names(read_model(frozen)) == ["CONV_2D", "DEPTH_TO_SPACE"]
    int8 = json.loads(built.stdout)["sparse"]["variants"]["int8"]
    assert int8["verify"]["kernels"] == REFERENCE
    artifact = tmp_path / "dist" / "sparse" / int8["file"]
    x = np.random.RandomState(0).randint(-128, 128, (1, 32, 32, 3)).astype(np.int8)
    # DEPTH_TO_SPACE moves values: what the optimized and the reference kernels compute differs only in the conv
    optimized, reference = (TFLiteRunner(artifact, kernels=k).run(x)[0] for k in (OPTIMIZED, REFERENCE))
    assert optimized.shape == reference.shape == (1, 64, 64, 4)
    assert np.abs(optimized.astype(np.float64) - reference).max() <= 3 * TFLiteRunner(artifact).outputs[0].scale


def joined_head_tflite(path: Path) -> Path:
    """A float .tflite whose one output joins two branches as a detector's head does: boxes in pixels (0-64) and
    probabilities (0-1), concatenated."""
    import tensorflow as tf

    rng = np.random.RandomState(3)
    w_box, w_score = (tf.constant(rng.normal(0, 0.5, (3, 3, 3, c)).astype(np.float32)) for c in (4, 2))

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="image")])
    def model(x):
        boxes = tf.reshape(tf.nn.relu(tf.nn.conv2d(x, w_box, 4, "SAME")), [1, 16, 4]) * 64.0
        scores = tf.sigmoid(tf.reshape(tf.nn.conv2d(x, w_score, 4, "SAME"), [1, 16, 2]))
        return tf.concat([boxes, scores], axis=2)

    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()]).convert())
    return path


def test_strip_cuts_a_tflite_at_the_tensors_it_names(tmp_path, mirror):
    """strip on a .tflite: its outputs become the tensors named (here the two parts of a joined output, as
    inspect finds them), the ops after them gone, and what it computes up to them unchanged; a name the file
    has no tensor of is refused by name, with the close ones."""
    from mzconvert.runtime import TFLiteRunner
    from mzconvert.sources.inspection import inspect_file

    model = joined_head_tflite(tmp_path / "joined.tflite")
    report = inspect_file(model)
    ((joined, parts),) = report["concat_outputs"].items()
    assert [p["shape"] for p in parts] == [[1, 16, 4], [1, 16, 2]]
    made = run_cli("init", "joined", "--from", str(model), "--to", str(tmp_path))
    assert made.returncode == 0, made.stderr[-2000:]
    recipe = yaml.safe_load((tmp_path / "joined.yaml").read_text())
    recipe["strip"] = {"inputs": [recipe["input"]["name"]], "outputs": [p["name"] for p in parts]}
    recipe["verify"] = {"images": str(image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 2))}
    (tmp_path / "joined.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "joined.yaml"), *where)
    assert built.returncode == 0, built.stderr[-3000:]
    cut = TFLiteRunner(tmp_path / "dist" / "joined" / json.loads(built.stdout)["joined"]["variants"]["float32"]["file"])
    assert [o.name for o in cut.outputs] == [p["name"] for p in parts]
    assert "CONCATENATION" not in inspect_file(tmp_path / "dist" / "joined" / "joined_float32.tflite")["ops"]
    x = np.random.RandomState(0).uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
    (whole,) = TFLiteRunner(model).run(x)
    boxes, scores = cut.run(x)
    np.testing.assert_array_equal(np.concatenate([boxes, scores], axis=2), whole)
    recipe["strip"]["outputs"][1] += "x"
    (tmp_path / "joined.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    refused = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "joined.yaml"), *where)
    assert refused.returncode == 2 and f"strip.outputs: tensor '{parts[1]['name']}x' is not in the graph; did you " \
        f"mean '{parts[1]['name']}'" in refused.stderr, refused.stderr[-2000:]


def test_an_exporters_metadata_json_reads_as_onnx_metadata_props():
    """Ultralytics appends metadata.json to the .tflite it exports (JSON: its names' keys are strings); read as
    its ONNX export's metadata_props are (strings, Python literals), for the same proposers."""
    from mzconvert.sources.inspection import _exporter_metadata
    from mzconvert.sources.scaffold import carried_labels

    data = json.dumps({"task": "detect", "imgsz": [320, 320], "stride": 32, "names": {"0": "person", "1": "car"}})
    metadata = _exporter_metadata(data.encode())
    assert metadata == {"task": "detect", "imgsz": "[320, 320]", "stride": "32", "names": "{0: 'person', 1: 'car'}"}
    assert carried_labels({"metadata": metadata}, 2) == ["person", "car"]
    assert _exporter_metadata(b"[1, 2]") == {} and _exporter_metadata(b"\xff not json") == {}
    assert _exporter_metadata(None) == {}


def litert_torch_tflite(path: Path) -> Path:
    """A float .tflite as litert-torch writes it (Ultralytics' `format=tflite` since 8.4.83): input channels first,
    and the metadata entry keep_stablehlo_constant, which tells an MLIR import of the file to keep its constants as
    StableHLO's."""
    from mzconvert.tflite_file import add_buffer, schema, write_model

    model = read_model(float_tflite(path, nchw=True))
    hint = schema().MetadataT()
    hint.name, hint.buffer = b"keep_stablehlo_constant", add_buffer(model, b"true")
    model.metadata = [*(model.metadata or []), hint]
    return write_model(model, path)


def test_a_litert_torch_tflite_is_proposed_channels_first_and_quantized_to_full_integer(tmp_path, mirror):
    """init proposed NHWC for every .tflite, a recipe that failed to validate ("320 channels"): the layout is now
    read from the input's shape. Both quantizers left each convolution of such a file float, reading int8 weights
    through a DEQUANTIZE (the import hint hid its weights): the build refused the int8 as "not fully quantized", and
    ai-edge-quantizer's did not load. Both now quantize it whole, and the file builds and predicts as it is."""
    import zipfile

    model = litert_torch_tflite(tmp_path / "m.tflite")
    with zipfile.ZipFile(model, "a") as appended:
        appended.writestr("metadata.json", json.dumps({"task": "classify", "imgsz": [32, 32],
                                                       "names": {str(i): f"class {i}" for i in range(5)}}))
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 8)
    made = run_cli("init", "m", "--from", str(model), "--to", str(tmp_path / "r"), "--calibration", str(calibration),
                   "--verify", str(image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 4)))
    assert made.returncode == 0, made.stderr
    recipe = yaml.safe_load((tmp_path / "r" / "m.yaml").read_text())
    assert recipe["input"]["layout"] == "NCHW" and recipe["input"]["shape"] == [1, 3, 32, 32], recipe["input"]
    assert [v["mode"] for v in recipe["variants"]] == ["float32", "int8"]
    aeq = {k: v for k, v in recipe["variants"][1].items() if k != "calibration_method"}  # the converter's ranges
    recipe["variants"].append(aeq | {"name": "int8-aeq", "quantizer": "ai-edge-quantizer"})
    (tmp_path / "r" / "m.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    built = run_cli("--json", "build", str(tmp_path / "r" / "m.yaml"), "--out", str(tmp_path / "dist"),
                    "--build-dir", str(tmp_path / "build"))
    assert built.returncode == 0, built.stderr[-2000:]
    for name in ("int8", "int8-aeq"):
        quantized = read_model(tmp_path / "dist" / "m" / json.loads(built.stdout)["m"]["variants"][name]["file"])
        graph = quantized.subgraphs[0]
        assert not [t.name for t in graph.tensors if t.type == 0], name  # no float tensor, weights or activations
    drawn = run_cli("predict", str(tmp_path / "r" / "m.yaml"), str(sorted((MIRROR / "imagenet-samples").glob("*.JPEG"))[0]),
                    "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert drawn.returncode == 0 and Path(drawn.stdout.strip()).is_file(), drawn.stderr[-2000:]


@pytest.mark.parametrize("task", ["classify", "pose"])
def test_init_proposes_an_ultralytics_tflite_export_as_its_onnx_export(tmp_path, task):
    """A float .tflite with the metadata.json Ultralytics appends gets its task's preprocessing, as its ONNX export
    does: a classifier Ultralytics' transforms and its names, a pose head (no kind decodes it) `other` with the
    letterbox; not MobileNet's [-1, 1] convention of .tflite files."""
    import zipfile

    model = float_tflite(tmp_path / "m.tflite")
    names = {str(i): f"class {i}" for i in range(5)}
    with zipfile.ZipFile(model, "a") as appended:
        appended.writestr("metadata.json", json.dumps({"task": task, "imgsz": [32, 32], "names": names}))
    made = run_cli("init", "m", "--from", str(model), "--to", str(tmp_path / "r"))
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "r" / "m.yaml").read_text()
    recipe = yaml.safe_load(text)
    preprocess = recipe["preprocess"]
    assert preprocess["scale"] == pytest.approx(1 / 255) and preprocess["offset"] == 0 and "strip" not in recipe
    assert recipe["input"]["layout"] == "NHWC" and recipe["variants"] == [{"name": "float32", "mode": "float32"}]
    if task == "classify":
        assert recipe["task"] == "classification" and preprocess["interpolation"] == "torchvision"
        assert recipe["labels"] == list(names.values())
    else:
        assert recipe["task"] == "other" and preprocess["letterbox"] is True
        assert "an Ultralytics pose export: no postprocess kind decodes its head yet" in text
