"""Accuracy as the target computes it: an NPU-targeted int8 variant is verified under LiteRT's reference kernels
(the arithmetic a microcontroller's kernels follow) and evaluated under both families, each figure the one LiteRT
itself gives with that resolver for the same file and preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mzconvert.errors import MzError
from mzconvert.preprocess import prepare
from mzconvert.recipe import load_recipe
from mzconvert.runtime import OPTIMIZED, REFERENCE, TensorSpec, TFLiteRunner, _quantize, open_model
from tests.conftest import MIRROR, image_folder, run_cli
from tests.test_tflite_source import float_tflite


def test_the_reference_quantize_rounds_as_litert_reference_kernel_does():
    """The int8 input fed to an integer-I/O model is what the float-I/O twin's QUANTIZE computes under the same
    kernels: LiteRT's reference kernel divides and rounds half away from zero, XNNPACK multiplies by the
    reciprocal and rounds half to even."""
    import tensorflow as tf

    spec = TensorSpec("x", (1, 6), "int8", scale=0.5, zero_point=0)
    x = np.array([[0.25, 0.75, -0.25, -0.75, 1.25, 100.0]], np.float32)
    assert _quantize(x, spec, REFERENCE).tolist() == [[1, 2, -1, -2, 3, 127]]
    assert _quantize(x, spec, OPTIMIZED).tolist() == [[0, 2, -0, -2, 2, 127]]

    @tf.function(input_signature=[tf.TensorSpec([1, 6], tf.float32)])
    def positive(v):
        return tf.nn.relu(v)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([positive.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([np.array([[-64.0, 0, 0, 0, 0, 63.5]], np.float32)] for _ in range(2))
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=converter.convert(), experimental_preserve_all_tensors=True,
                              experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    quantize = interpreter._get_ops_details()[0]
    assert quantize["op_name"] == "QUANTIZE"
    detail = interpreter.get_tensor_details()[quantize["outputs"][0]]
    own = TensorSpec("q", (1, 6), "int8", *detail["quantization"])
    ties = (np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5]]) * own.scale).astype(np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], ties)
    interpreter.invoke()
    computed = interpreter.get_tensor(quantize["outputs"][0])
    assert np.array_equal(_quantize(ties, own, REFERENCE), computed)
    assert not np.array_equal(_quantize(ties, own, OPTIMIZED), computed)


def test_the_reference_kernels_run_apart_so_an_input_they_abort_on_is_an_error(tmp_path):
    """LiteRT's reference int8 SOFTMAX aborts the process where a row's exps sum to 512 or more (512 of 1000
    scores tied at the top, as an untrained or broken classifier gives): run in a child process, that is an error
    naming the model, and the caller goes on; other inputs give exactly what the in-process interpreter gives."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 1000], tf.float32)])
    def probabilities(logits):
        return tf.nn.softmax(logits)

    converter = tf.lite.TFLiteConverter.from_concrete_functions([probabilities.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.RandomState(0)
    converter.representative_dataset = lambda: ([rng.uniform(-5, 5, (1, 1000)).astype(np.float32)] for _ in range(4))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    model = tmp_path / "softmax.tflite"
    model.write_bytes(converter.convert())
    runner = open_model(model, kernels=REFERENCE)
    logits = rng.uniform(-5, 5, (1, 1000)).astype(np.float32)
    np.testing.assert_array_equal(runner.run(logits)[0], TFLiteRunner(model, kernels=REFERENCE).run(logits)[0])
    with pytest.raises(MzError, match=r"softmax.tflite: LiteRT's reference kernels ended their process running it "
                                      r"on an input \(signal 6; a known cause: an int8 SOFTMAX"):
        runner.run(np.zeros((1, 1000), np.float32))  # every score tied
    assert open_model(model, kernels=REFERENCE).run(logits)[0].shape == (1, 1000)  # this process goes on


def test_debug_under_the_reference_kernels_names_an_input_they_abort_on(tmp_path, mirror):
    """`mzconvert debug` reads every tensor of an NPU-targeted int8 .tflite under the reference kernels in its own
    process: an input they abort on (a 1000-class softmax whose scores all tie) is found in a child first, so
    debug ends with the error build gives, not killed without a word."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="image")])
    def untrained(x):  # every class scored alike, whatever the image
        return tf.nn.softmax(tf.reduce_mean(x, [1, 2]) @ tf.zeros([3, 1000]) + 1.0)

    model = tmp_path / "untrained.tflite"
    converter = tf.lite.TFLiteConverter.from_concrete_functions([untrained.get_concrete_function()])
    model.write_bytes(converter.convert())
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 4)
    verify = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 2)
    made = run_cli("init", "untrained", "--from", str(model), "--to", str(tmp_path), "--calibration",
                   str(calibration), "--verify", str(verify))
    assert made.returncode == 0, made.stderr[-2000:]
    recipe = tmp_path / "untrained.yaml"
    recipe.write_text(recipe.read_text().replace("calibration_method: auto", "calibration_method: minmax"))
    where = ["--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "b")]
    aborted = "untrained_int8.tflite: LiteRT's reference kernels ended their process running it on an input"
    built = run_cli(*where[:2], "build", str(recipe), *where[2:])
    assert built.returncode == 1 and aborted in built.stderr, built.stderr[-2000:]
    explained = run_cli(*where[:2], "debug", str(recipe), "--variant", "int8", *where[2:])
    assert explained.returncode == 1 and aborted in explained.stderr, (explained.returncode, explained.stderr[-2000:])


@pytest.mark.slow
def test_npu_int8_is_verified_and_evaluated_under_the_targets_kernels(tmp_path, mirror):
    model = float_tflite(tmp_path / "float.tflite")
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 16)
    verify = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 8)
    made = run_cli("init", "npu", "--from", str(model), "--to", str(tmp_path), "--calibration", str(calibration),
                   "--verify", str(verify))
    assert made.returncode == 0, made.stderr[-2000:]
    recipe_file = tmp_path / "npu.yaml"
    recipe = yaml.safe_load(recipe_file.read_text())
    assert recipe["targets"]["vela"] and [v["name"] for v in recipe["variants"]] == ["float32", "int8"]
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(recipe_file), *where)
    assert built.returncode == 0, built.stderr[-3000:]
    variants = json.loads(built.stdout)["npu"]["variants"]
    assert variants["int8"]["verify"]["kernels"] == REFERENCE and "int8 (reference kernels) vs float" in built.stderr
    assert variants["float32"]["verify"]["kernels"] == OPTIMIZED

    # a dataset labelled by index: five class folders of ImageNet samples
    dataset = tmp_path / "labelled"
    samples = sorted((MIRROR / "imagenet-samples").glob("*.JPEG"))[:40]
    for i, path in enumerate(samples):
        (dataset / str(i % 5)).mkdir(parents=True, exist_ok=True)
        (dataset / str(i % 5) / path.name).write_bytes(path.read_bytes())
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "eval", str(recipe_file), "--dataset", str(dataset),
                   *where)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)["results"]
    reference, optimized = results["int8"], results["int8 (optimized kernels)"]
    assert (reference["kernels"], optimized["kernels"]) == (REFERENCE, OPTIMIZED)
    assert optimized["difference"]["to"] == "int8"

    # the same numbers from LiteRT directly, each resolver, the same file and preprocessing
    parsed = load_recipe(recipe_file)
    artifact = tmp_path / "dist" / "npu" / variants["int8"]["file"]
    labelled = [(p, int(p.parent.name)) for p in sorted(dataset.rglob("*.JPEG"))]
    for kernels, row in ((REFERENCE, reference), (OPTIMIZED, optimized)):
        runner = TFLiteRunner(artifact, kernels=kernels)
        top1 = [int(np.argmax(runner.run(prepare(p, parsed.preprocess, parsed.input).tensor)[0])) == label
                for p, label in labelled]
        assert row["top1"] == pytest.approx(np.mean(top1)), kernels
    assert Path(artifact).is_file()
