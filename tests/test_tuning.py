"""tune_steps (ONNX int8, quant/tuning.py): the QDQ model's weights tuned to the float model's outputs on the
calibration images, its activations quantized as ONNX Runtime quantizes them; kept only where that lowers the
model's output error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from mzconvert.errors import MzError, RecipeError
from mzconvert.quant import tuning
from mzconvert.quant.qdq_program import QdqProgram
from mzconvert.quant.tflite_program import TfliteProgram
from mzconvert.recipe import load_recipe
from mzconvert.recipe.schema import Postprocess
from mzconvert.runtime import REFERENCE, open_model
from mzconvert.tasks.detection import tuning_weights
from tests.conftest import MIRROR, run_cli
from tests.test_bias_correction import ROOT, output_error, quantized_tiny
from tests.test_onnx_backend import recipe_text, run, tiny_onnx


def images(count: int, seed: int) -> list[np.ndarray]:
    return [np.random.RandomState(seed + i).normal(0, 1, (1, 3, 32, 32)).astype(np.float32) for i in range(count)]


def held_out_images() -> list[np.ndarray]:
    return images(16, 100)


def tune(prepared, quantized, tensors, steps, log=lambda line: None):
    """The tiny model's int8 tuned to its float model's output."""
    float_model = open_model(prepared, ["probabilities"])
    return tuning.tune_weights(quantized, float_model.run, ["probabilities"], tensors, steps, lambda outputs: {},
                               log)


def test_the_qdq_graph_runs_in_torch_as_onnx_runtime_defines_it(tmp_path):
    """Tuning moves the weights of the model ONNX Runtime runs: its torch program (depthwise and plain Conv, ReLU,
    pooling, Flatten, Gemm, Softmax, every Quantize/Dequantize pair) computes what ONNX Runtime computes."""
    import torch

    _, quantized, _ = quantized_tiny(tmp_path)
    program = QdqProgram(quantized, ["probabilities"])
    held_out = held_out_images()
    runner = open_model(quantized, ["probabilities"])  # as ONNX defines the ops
    for image in held_out:
        with torch.no_grad():
            (got,) = program(image)
        (want,) = runner.run(image)
        assert np.abs(got.numpy() - want).max() < 1e-5, np.abs(got.numpy() - want).max()


def test_a_head_s_other_ops_run_as_onnx_runtime_runs_them(tmp_path):
    """Ops of YOLO heads beyond the classifier's: a Conv of one output channel (a pose head's visibility: its
    per-channel weight scale one value, its bias still one per channel), a Mul by a constant the quantizer stored
    as integers (a dequantized constant, not its integers), a ConvTranspose (a segmentation head's mask
    upsampling, run as it is)."""
    import torch
    from onnxruntime import quantization as q

    from tests.test_bias_correction import _Calibration

    rng = np.random.RandomState(0)
    weights = {"w": rng.normal(0, 0.3, (1, 3, 3, 3)).astype(np.float32), "b": np.array([0.2], np.float32),
               "gain": np.array(1.7, np.float32), "up": rng.normal(0, 0.5, (1, 2, 2, 2)).astype(np.float32),
               "up_bias": np.array([0.1, -0.1], np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["one"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["one", "gain"], ["scaled"]),
             helper.make_node("ConvTranspose", ["scaled", "up", "up_bias"], ["out"], strides=[2, 2])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 64, 64])],
                              [numpy_helper.from_array(a, n) for n, a in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "f.onnx"))
    quantized = tmp_path / "int8.onnx"
    q.quantize_static(str(tmp_path / "f.onnx"), str(quantized), _Calibration("input", iter(images(8, 0))),
                      quant_format=q.QuantFormat.QDQ, per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8)
    ops = [node.op_type for node in onnx.load(str(quantized)).graph.node]
    assert {"Mul", "ConvTranspose"} <= set(ops) and ops.count("DequantizeLinear") >= 6, ops  # constants stored as integers
    runner, program = open_model(quantized, ["out"]), QdqProgram(quantized, ["out"])
    for image in held_out_images()[:4]:
        with torch.no_grad():
            (got,) = program(image)
        want = runner.run(image)[0]
        assert np.abs(got.numpy() - want).max() < 1e-5 * max(1.0, np.abs(want).max())


def test_tuned_weights_lower_the_output_error_on_images_they_were_not_tuned_on(tmp_path):
    prepared, quantized, _ = quantized_tiny(tmp_path)
    untuned = onnx.load(str(quantized))
    held_out = held_out_images()
    before = output_error(prepared, quantized, held_out)

    lines = []
    error_before, error_after, kept = tune(prepared, quantized, images(64, 1000), 100, lines.append)

    assert kept and error_after < 0.8 * error_before  # on the 16 of the 64 images not tuned on
    assert [line.split(",")[0] for line in lines] == [f"tuning weights: step {s}/100" for s in range(10, 100, 10)]
    assert all(" to go" in line for line in lines), lines  # a long tuning says how long it will take yet
    assert output_error(prepared, quantized, held_out) < 0.8 * before
    tuned = onnx.load(str(quantized))
    changed = 0
    for old, new in zip(untuned.graph.initializer, tuned.graph.initializer):
        a, b = numpy_helper.to_array(old), numpy_helper.to_array(new)
        assert old.name == new.name and a.dtype == b.dtype and a.shape == b.shape
        if a.dtype in (np.float32, np.uint8) or old.name.endswith("zero_point"):
            assert np.array_equal(a, b), old.name  # scales, zero points: as the quantizer set them
        changed += int(not np.array_equal(a, b))
    assert changed >= 4  # the weights and biases of the three convolutions and the Gemm


def test_tuning_runs_on_one_torch_thread_and_gives_the_callers_back(tmp_path, monkeypatch):
    """Gradients summed over threads round differently with their count (NudeNet's YOLOv8n tuned on 1 and 2
    threads: judged error 0.1063 and 0.1160, docs/results.md), so a release built on a host of 2 cores or 8 tunes
    to the same bytes only on one thread; the caller's thread count is back after."""
    import torch

    programs = tuning._programs()
    seen = []

    class Counted(programs[".onnx"]):
        def __call__(self, tensor):
            seen.append(torch.get_num_threads())
            return super().__call__(tensor)

    monkeypatch.setattr(tuning, "_programs", lambda: {".onnx": Counted})
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        prepared, quantized, _ = quantized_tiny(tmp_path)
        tune(prepared, quantized, images(16, 1000), 5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}


def test_tuned_weights_that_do_not_lower_the_output_error_are_not_kept(tmp_path, monkeypatch):
    prepared, quantized, _ = quantized_tiny(tmp_path)
    untuned = quantized.read_bytes()
    monkeypatch.setattr(tuning, "LEARNING_RATE", 50.0)  # steps of 50 weight steps: every weight thrown far off

    error_before, error_after, kept = tune(prepared, quantized, images(16, 1000), 3)

    assert not kept and error_after > error_before
    assert quantized.read_bytes() == untuned


def test_a_graph_with_an_op_tuning_does_not_run_is_refused_by_name(tmp_path):
    graph = helper.make_graph([helper.make_node("Erf", ["input"], ["out"], name="the_erf")], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "erf.onnx"
    onnx.save(helper.make_model(graph), str(path))

    with pytest.raises(MzError, match=r"tune_steps: the QDQ graph has a Erf node \(the_erf\)"):
        QdqProgram(path, ["out"])(np.zeros((1, 4), np.float32))


def test_an_int8_with_an_op_tuning_does_not_run_ships_as_quantized_and_says_why(tmp_path, mirror):
    """tune_steps (which init proposes for YOLO heads) on a model with an op the programs do not run: the variant
    is the int8 as quantized, its record and the build's log name the op; it is not refused."""
    model = tiny_onnx(tmp_path / "elu.onnx")
    edited = onnx.load(str(model))
    [n for n in edited.graph.node if n.op_type == "Relu"][-1].op_type = "Elu"
    onnx.save(edited, str(model))
    train = MIRROR / "coco" / "train2017"
    extra = f"  - {{name: tuned, mode: int8, io_dtype: float32, calibration: {train}, calibration_count: 8, " \
            "calibration_method: percentile, tune_steps: 3}\n"
    manifest = run(tmp_path, recipe_text(model, extra_variant=extra))
    tuned = manifest["variants"]["tuned"]["tuned"]
    assert tuned["kept"] is False and "Elu node" in tuned["not_run"], tuned
    dist = tmp_path / "dist" / "tiny-onnx"
    assert (dist / manifest["variants"]["tuned"]["file"]).read_bytes() == \
        (dist / manifest["variants"]["int8"]["file"]).read_bytes()  # the same quantization, untuned


def test_a_build_says_how_far_its_tuning_is(tmp_path, mirror):
    """Tuning takes minutes of one core for a YOLO head: the build's log says at each tenth of the steps (each step
    where there are fewer than ten) how many are done and how long the rest will take."""
    train = MIRROR / "coco" / "train2017"
    extra = f"  - {{name: tuned, mode: int8, io_dtype: float32, calibration: {train}, calibration_count: 8, " \
            "calibration_method: percentile, tune_steps: 3}\n"
    (tmp_path / "tiny-onnx.yaml").write_text(recipe_text(tiny_onnx(tmp_path / "tiny.onnx"), extra_variant=extra))
    done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "tiny-onnx.yaml"), "--variant", "tuned",
                   "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line.split("] ", 1)[1].split(",")[0] for line in done.stderr.splitlines() if "tuning weights" in line]
    assert steps == ["tuned: tuning weights: step 1/3", "tuned: tuning weights: step 2/3"], done.stderr[-2000:]


def test_a_yolov8_heads_boxes_are_weighed_by_the_best_class_score_of_their_cell():
    rng = np.random.default_rng(0)
    boxes, scores = rng.normal(size=(1, 64, 21)), rng.uniform(size=(1, 3, 21))
    post = Postprocess(kind="yolov8", labels=("a", "b", "c"), category_ids=(1, 2, 3), box_encoding="dfl", box_output="box",
                       class_output="cls")
    weights = tuning_weights({"box": boxes, "cls": scores}, post, (64, 64))
    assert list(weights) == ["box"]
    assert np.array_equal(np.broadcast_to(weights["box"], boxes.shape), np.broadcast_to(scores.max(1), boxes.shape))
    pixels = Postprocess(kind="yolov8", labels=("a", "b", "c"), category_ids=(1, 2, 3), box_encoding="pixels", box_output="box",
                         class_output="cls")
    assert tuning_weights({"box": boxes, "cls": scores}, pixels, (64, 64)) == {}  # boxes in pixels: judged alike


def test_a_yolov5_levels_boxes_count_by_their_anchors_score_and_its_logits_within_the_band():
    """A level of 2 anchors x 2 classes over 2 x 3 cells (stride 16 of 32 x 48): each box logit weighs as its
    (anchor, cell)'s best score, objectness x class probability; a logit beyond +-8 (where int8 holds the band's
    edge) not at all; with bounded_logits false, every value alike."""
    from dataclasses import replace

    from mzconvert.recipe.schema import AnchorLevel

    level = AnchorLevel("head", 16, (10.0, 13.0, 16.0, 30.0))
    post = Postprocess(kind="yolov5", labels=("a", "b"), category_ids=(1, 2), levels=(level,))
    boxes_name, scores_name = level.parts
    scores = np.full((1, 2 * 3, 2, 3), -20.0)
    scores[0, 0, 1, 2], scores[0, 2, 1, 2] = 0.0, 2.0  # anchor 0, cell (1, 2): objectness 0.5, class b 0.88
    scores[0, 3, 0, 0], scores[0, 4, 0, 0] = 3.0, 1.0  # anchor 1, cell (0, 0): objectness 0.95, class a 0.73
    boxes = np.zeros((1, 2 * 4, 2, 3))
    boxes[0, 5, 0, 0] = 9.0  # anchor 1's y logit at cell (0, 0): beyond the band
    weights = tuning_weights({boxes_name: boxes, scores_name: scores}, post, (32, 48))
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    want = np.zeros_like(boxes)
    want[0, 0:4, 1, 2] = sigmoid(0.0) * sigmoid(2.0)
    want[0, 4:8, 0, 0] = sigmoid(3.0) * sigmoid(1.0)
    want[0, 5, 0, 0] = 0
    assert np.allclose(weights[boxes_name], want)
    assert np.array_equal(weights[scores_name], (np.abs(scores) <= 8).astype(np.float32))
    assert tuning_weights({boxes_name: boxes, scores_name: scores}, replace(post, bounded_logits=False),
                          (32, 48)) == {}


def test_an_ssd_heads_keypoints_count_by_their_anchors_score_beside_bounded_logits():
    post = Postprocess(kind="ssd", labels=("face",), category_ids=(1,), box_output="boxes", class_output="logits",
                       background_class=False)
    logits = np.array([[[-575.0], [0.0], [3.0]]])
    keypoints = np.arange(3 * 6, dtype=float).reshape(1, 3, 6)
    weights = tuning_weights({"boxes": keypoints[..., :4], "keypoints": keypoints, "logits": logits}, post, (64, 64))
    assert np.array_equal(weights["logits"], [[[0.0], [1.0], [1.0]]])
    for name, width in (("boxes", 4), ("keypoints", 6)):
        assert weights[name].shape == (1, 3, width)
        assert np.allclose(weights[name][0, :, 0], [0.0, 0.5, 1 / (1 + np.exp(-3.0))])
        assert (weights[name] == weights[name][..., :1]).all()


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny classifier built with an ONNX int8 and a TFLite int8 variant tuned, beside the same variants
    untuned; the TFLite ones with ranges chosen by `auto`, whose search compares its candidates untuned."""
    folder = tmp_path_factory.mktemp("tuned")
    train = MIRROR / "coco" / "train2017"
    tuned = "".join(f"  - {{name: {name}, mode: int8, io_dtype: {io}, calibration: {train}, calibration_count: 32, "
                    f"calibration_method: {method}{extra}}}\n"
                    for name, io, method, extra in (
                        ("int8-tuned", "float32", "minmax", ", tune_steps: 30"),
                        ("int8-tflite", "int8", "auto", ", target: tflite"),
                        ("int8-tflite-tuned", "int8", "auto", ", target: tflite, tune_steps: 30")))
    return folder, run(folder, recipe_text(tiny_onnx(folder / "tiny.onnx"), extra_variant=tuned))


def quantized_model(folder: Path, variant: str) -> Path:
    return next(p for p in (folder / "build" / "tiny-onnx" / "quantize" / variant).iterdir()
                if p.suffix in (".onnx", ".tflite"))


def test_a_build_tunes_an_onnx_int8_variant_and_says_by_how_much(built):
    folder, manifest = built
    result = json.loads((folder / "build" / "tiny-onnx" / "quantize" / "int8-tuned" / "result.json").read_text())
    assert result["tuned"]["steps"] == 30 and result["tuned"]["kept"], result["tuned"]
    assert result["tuned"]["error_after"] < result["tuned"]["error_before"]
    assert "tuned" not in json.loads((folder / "build" / "tiny-onnx" / "quantize" / "int8" / "result.json").read_text())
    assert manifest["variants"]["int8-tuned"]["verify"]["logits"]["cosine"] > 0.9


def test_a_tflite_int8_is_tuned_and_kept_only_where_the_reference_kernels_err_less(built):
    """The tiny classifier's TFLite int8 errs mostly by its int8 output's rounding, which no weight changes: its
    tuned weights are not kept, and the variant is the untuned one's model, byte for byte."""
    folder, _ = built
    result = json.loads((folder / "build" / "tiny-onnx" / "quantize" / "int8-tflite-tuned" / "result.json")
                        .read_text())["tuned"]
    assert result["steps"] == 30 and result["kept"] == (result["error_after"] < result["error_before"])
    tuned, untuned = (quantized_model(folder, v).read_bytes() for v in ("int8-tflite-tuned", "int8-tflite"))
    assert (tuned != untuned) == result["kept"]


def test_the_integers_a_tflite_program_writes_are_the_ones_it_computed_with(built, tmp_path):
    """Weights moved by a few steps each, written and read back: the same integers in the same places (LiteRT's
    reference kernels compute the written model's outputs as the program did, to a step)."""
    import torch

    from mzconvert.preprocess import list_images, prepare

    folder, _ = built
    recipe = load_recipe(folder / "tiny-onnx.yaml")
    program = TfliteProgram(quantized_model(folder, "int8-tflite"), ["logits"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in program.parameters():
            value += torch.randint(-3, 4, value.shape, generator=generator).float()
    program.write(tmp_path / "moved.tflite")
    reread = TfliteProgram(tmp_path / "moved.tflite", ["logits"])
    assert sorted(reread.trained) == sorted(program.trained)
    for index, trained in program.trained.items():
        assert np.array_equal(reread.trained[index].integers(), trained.integers()), index
    runner = open_model(tmp_path / "moved.tflite", ["logits"], kernels=REFERENCE)
    tensor = prepare(list_images(MIRROR / "coco" / "val2017")[0], recipe.preprocess, recipe.input).tensor
    with torch.no_grad():
        (got,) = program(tensor)
    (want,) = runner.run(tensor)
    assert np.abs(got.numpy().reshape(want.shape) - want).max() <= 1.01 * runner.outputs[0].scale


def test_the_tflite_program_computes_what_litert_reference_kernels_compute(built):
    """Tuning moves the weights of the model the NPU runs: the torch program of the built TFLite int8 (its
    QUANTIZE, CONV_2D with fused ReLU, MEAN, FULLY_CONNECTED, DEQUANTIZE...) gives LiteRT's reference kernels'
    outputs, to a step of the output's grid where their fixed-point rounding differs."""
    import torch

    from mzconvert.preprocess import list_images, prepare

    folder, _ = built
    recipe = load_recipe(folder / "tiny-onnx.yaml")
    model = quantized_model(folder, "int8-tflite")
    program = TfliteProgram(model, ["logits"])
    runner = open_model(model, ["logits"], kernels=REFERENCE)
    step = runner.outputs[0].scale
    for image in list_images(MIRROR / "coco" / "val2017")[:8]:
        tensor = prepare(image, recipe.preprocess, recipe.input).tensor
        with torch.no_grad():
            (got,) = program(tensor)
        (want,) = runner.run(tensor)
        assert np.abs(got.numpy().reshape(want.shape) - want).max() <= 1.01 * step


def test_tune_steps_is_refused_where_it_does_not_apply(tmp_path):
    data = yaml.safe_load((ROOT / "recipes" / "mobilenetv2-torchvision.yaml").read_text())
    next(v for v in data["variants"] if v["name"] == "float16")["tune_steps"] = 10
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match=r"variants\[1\]\.tune_steps: tune_steps applies to int8 variants calibrated"):
        load_recipe(tmp_path / "r.yaml")


def test_depth_to_space_runs_as_litert_reference_kernels_run_it(tmp_path):
    """A head that ends in DEPTH_TO_SPACE (MediaPipe's pose and face detectors do): the program's outputs are the
    reference kernels', to a step (each block's channels in another order are not)."""
    import tensorflow as tf
    import torch
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.RandomState(0)
    kernel = tf.constant(rng.normal(0, 0.3, (3, 3, 3, 16)).astype(np.float32))

    @tf.function(input_signature=[tf.TensorSpec([1, 8, 8, 3], tf.float32)])
    def model(x):
        return tf.nn.depth_to_space(tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME")), 2) * 2.0 - 1.0

    def representative():
        for i in range(16):
            yield [np.random.RandomState(i).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    path = tmp_path / "d2s.tflite"
    path.write_bytes(converter.convert())
    (name,) = [o["name"] for o in Interpreter(str(path)).get_output_details()]
    program = TfliteProgram(path, [name])
    assert "DEPTH_TO_SPACE" in program.ops
    runner = open_model(path, [name], kernels=REFERENCE)
    for seed in range(4):
        tensor = np.random.RandomState(50 + seed).uniform(0, 1, (1, 8, 8, 3)).astype(np.float32)
        with torch.no_grad():
            (got,) = program(tensor)
        (want,) = runner.run(tensor)
        assert want.shape == (1, 16, 16, 4)
        assert np.abs(got.numpy().reshape(want.shape) - want).max() <= 1.01 * runner.outputs[0].scale
