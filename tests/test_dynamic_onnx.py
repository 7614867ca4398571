"""ONNX files as users bring them: dynamic dimensions and an old opset, through inspect, init and build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import MIRROR, ROOT, image_folder, run_cli


def dynamic_opset12_onnx(path: Path) -> Path:
    """A small classifier exported with ['batch', 3, 'height', 'width'] and opset 12 (before per-channel QDQ)."""
    rng = np.random.RandomState(3)
    arrays = {"w": rng.normal(0, 0.4, (8, 3, 3, 3)), "b": rng.normal(0, 0.1, 8), "fc": rng.normal(0, 0.4, (8, 6)),
              "fcb": rng.normal(0, 0.1, 6)}
    nodes = [helper.make_node("Conv", ["images", "w", "b"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"])]
    graph = helper.make_graph(nodes, "dynamic",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                             ["batch", 3, "height", "width"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(path))
    return path


def test_inspect_names_the_opset_and_the_dynamic_dimensions(tmp_path):
    done = run_cli("inspect", str(dynamic_opset12_onnx(tmp_path / "m.onnx")))
    assert done.returncode == 0, done.stderr
    assert "opset 12" in done.stdout
    assert "dynamic dimensions: images ['batch', 3, 'height', 'width']; logits ['batch', 6]" in done.stdout


def test_init_at_a_given_shape_builds_per_channel_int8_from_an_opset_12_model(tmp_path, mirror):
    model = dynamic_opset12_onnx(tmp_path / "m.onnx")
    refused = run_cli("init", "dyn", "--from", str(model), "--to", str(tmp_path))
    assert refused.returncode == 2 and "--input-shape" in refused.stderr
    bad = run_cli("init", "dyn", "--from", str(model), "--to", str(tmp_path), "--input-shape", "1,4,32,32")
    assert bad.returncode == 2 and "does not fit its image input" in bad.stderr and not (tmp_path / "dyn.yaml").exists()
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 8)
    verify = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 4)
    made = run_cli("init", "dyn", "--from", str(model), "--to", str(tmp_path), "--input-shape", "1,3,32,32",
                   "--calibration", str(calibration), "--verify", str(verify))
    assert made.returncode == 0, made.stderr
    recipe = yaml.safe_load((tmp_path / "dyn.yaml").read_text())
    assert recipe["input"]["shape"] == [1, 3, 32, 32] and recipe["task"] == "classification"
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "dyn.yaml"),
                   "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout)["dyn"]["variants"]
    int8 = onnx.load(str(tmp_path / "dist" / "dyn" / variants["int8"]["file"]))
    assert max(o.version for o in int8.opset_import if o.domain in ("", "ai.onnx")) >= 13
    per_channel = [n for n in int8.graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel  # the conv's weights, one scale per output channel
    assert variants["int8"]["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert variants["int8"]["verify"]["logits"]["cosine"] > 0.99
    assert "labels" not in recipe  # 6 classes: nothing names them
    # onnx2tf's NHWC port: LiteRT float32 equal to the ONNX model, int8 full-integer, compiled for the NPU
    assert variants["float32-tflite"]["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert variants["float32-tflite"]["verify"]["logits"]["cosine"] >= 0.9999
    tflite = variants["int8-tflite"]
    assert tflite["file"].endswith(".tflite") and tflite["inputs"][0]["dtype"] == "int8"
    assert tflite["verify"]["logits"]["sqnr_db"] > 20
    (npu,) = tflite["vela"].values()
    assert npu["cpu_op_count"] == 0 and npu["npu_ops"]
    drawn = run_cli("predict", str(tmp_path / "dyn.yaml"), str(sorted(verify.iterdir())[0]),
                    "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert "labels: none declared; classes are shown as their indices 0-5" in drawn.stderr
    assert Path(drawn.stdout.strip()).is_file()


def test_a_batch_fixed_at_other_than_one_is_refused_by_init_and_by_the_recipe(tmp_path):
    model = onnx.load(str(dynamic_opset12_onnx(tmp_path / "m.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4  # as `export(batch=4)` writes it
    onnx.save(model, str(tmp_path / "b4.onnx"))
    refused = run_cli("init", "b4", "--from", str(tmp_path / "b4.onnx"), "--to", str(tmp_path),
                      "--input-shape", "4,3,32,32")
    assert refused.returncode == 2 and "has a fixed batch of 4" in refused.stderr and "batch 1" in refused.stderr
    assert not (tmp_path / "b4.yaml").exists()
    shipped = (ROOT / "recipes" / "mobilenetv2-onnx.yaml").read_text()
    assert "shape: [1, 3, 224, 224]" in shipped
    recipe = tmp_path / "b4.yaml"
    recipe.write_text(shipped.replace("shape: [1, 3, 224, 224]", "shape: [4, 3, 224, 224]"))
    loaded = run_cli("build", str(recipe))
    assert loaded.returncode == 2
    assert "b4.yaml: input.shape: shape [4, 3, 224, 224] has a batch of 4; expected 1" in loaded.stderr


def dynamic_text_map_onnx(path: Path) -> Path:
    """A text detector as PaddleOCR's exporter writes one: any image size in, a probability map of the same size
    out, whose dimensions carry other names than the input's (so nothing in the file ties the two)."""
    rng = np.random.RandomState(5)
    arrays = {"w": rng.normal(0, 0.4, (4, 3, 3, 3)), "head": rng.normal(0, 0.4, (1, 4, 1, 1)),
              "roi": np.zeros(0), "scales": np.array([1, 1, 2, 2])}
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("Conv", ["relu", "head"], ["logits"]),
             helper.make_node("Resize", ["logits", "roi", "scales"], ["up"], mode="nearest"),
             helper.make_node("Sigmoid", ["up"], ["sigmoid_0.tmp_0"])]
    graph = helper.make_graph(nodes, "text-map",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.0", 3, "p2o.1", "p2o.2"])],
                              [helper.make_tensor_value_info("sigmoid_0.tmp_0", TensorProto.FLOAT,
                                                             ["p2o.3", 1, "p2o.4", "p2o.5"])],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(path))
    return path


def test_a_map_of_dynamic_size_is_proposed_as_dense_at_the_given_shape_without_a_crop(tmp_path):
    model = dynamic_text_map_onnx(tmp_path / "det.onnx")
    made = run_cli("init", "det", "--from", str(model), "--to", str(tmp_path), "--input-shape", "1,3,64,96")
    assert made.returncode == 0, made.stderr
    recipe = yaml.safe_load((tmp_path / "det.yaml").read_text())
    # the map's size read at the given input, 64 x 96 as the input: a dense map, not a signal judged as "other"
    assert recipe["task"] == "dense" and recipe["strip"]["outputs"] == ["sigmoid_0.tmp_0"]
    assert recipe["preprocess"]["resize"] == [64, 96] and "central_crop" not in recipe["preprocess"]
    # a classifier of the same dynamic input keeps its crop: only a map covers the whole image
    made = run_cli("init", "cls", "--from", str(dynamic_opset12_onnx(tmp_path / "m.onnx")), "--to", str(tmp_path),
                   "--input-shape", "1,3,32,32")
    assert made.returncode == 0, made.stderr
    assert yaml.safe_load((tmp_path / "cls.yaml").read_text())["preprocess"]["central_crop"] == 0.875
