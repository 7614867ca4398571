"""YOLOv5-style heads (anchors, objectness): the levels init reads from the graph, freeze's split of each level's
Conv into box and score channels, the decode of the split logits, how verify judges them, and the recipe's
errors; on an ONNX graph of the export's layout made here (tests/test_ultralytics_heads.py: the real YOLOv5n)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from mzconvert.preprocess import prepare
from mzconvert.recipe import load_recipe
from mzconvert.runtime import open_model
from mzconvert.tasks.detection import MATCH_SCORE, judged_outputs, raw_detections
from mzconvert.tasks.signal import worst_slice
from tests.conftest import MIRROR, image_folder, run_cli

SIZE = 64
CLASSES = 3
# stride: anchors (w, h in input pixels), two per level
LEVELS = {16: [(12.0, 20.0), (30.0, 18.0)], 32: [(40.0, 52.0), (64.0, 60.0)]}
PER_ANCHOR = 5 + CLASSES


def yolov5_like_onnx(path: Path, names: list[str] | None = None, gain: float = 1.0,
                     export_names: bool = False) -> Path:
    """[1, N, 5 + 3]: per level, a Conv of 2 anchors x (x, y, w, h, objectness, 3 classes) channels, reshaped,
    transposed and put through a Sigmoid, centres (2 s - 0.5 + cell) x stride and sizes (2 s) ** 2 x anchor,
    concatenated, as YOLOv5's Detect exports (Split, Mul, Add, Pow; the grids and anchor sizes constants); the
    Convs' weights and biases times `gain`; with `export_names` the Convs' outputs named as YOLOv5's export names
    them ('/model.24/m.0/Conv_output_0': no TensorFlow node name)."""
    rng = np.random.RandomState(3)
    arrays, nodes, flat = {"two": np.array(2.0), "split": np.array([2, 2, 1 + CLASSES], np.int64)}, [], []
    for index, (stride, anchors) in enumerate(LEVELS.items()):
        side, count, tag = SIZE // stride, len(anchors), f"p{stride}"
        conv = f"/model.24/m.{index}/Conv_output_0" if export_names else f"{tag}_conv"
        weight = rng.normal(0, 0.05, (count * PER_ANCHOR, 3, stride, stride)) * gain
        bias = rng.normal(0, 0.5, count * PER_ANCHOR)
        bias.reshape(count, PER_ANCHOR)[:, 4] += 1.0  # some anchors confident
        bias *= gain
        ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
        grid = np.broadcast_to(np.stack([xs, ys], -1)[None, None] - 0.5, (1, count, side, side, 2))
        arrays |= {f"{tag}_w": weight, f"{tag}_b": bias, f"{tag}_grid": grid, f"{tag}_stride": np.array(float(stride)),
                   f"{tag}_anchors": np.broadcast_to(np.asarray(anchors)[None, :, None, None], (1, count, side, side, 2)),
                   f"{tag}_5d": np.array([1, count, PER_ANCHOR, side, side], np.int64),
                   f"{tag}_rows": np.array([1, -1, PER_ANCHOR], np.int64)}
        nodes += [helper.make_node("Conv", ["images", f"{tag}_w", f"{tag}_b"], [conv], strides=[stride] * 2,
                                   name=f"{tag}_conv"),
                  helper.make_node("Reshape", [conv, f"{tag}_5d"], [f"{tag}_r"]),
                  helper.make_node("Transpose", [f"{tag}_r"], [f"{tag}_t"], perm=[0, 1, 3, 4, 2]),
                  helper.make_node("Sigmoid", [f"{tag}_t"], [f"{tag}_s"]),
                  helper.make_node("Split", [f"{tag}_s", "split"], [f"{tag}_xy", f"{tag}_wh", f"{tag}_conf"], axis=4),
                  helper.make_node("Mul", [f"{tag}_xy", "two"], [f"{tag}_xy2"]),
                  helper.make_node("Add", [f"{tag}_xy2", f"{tag}_grid"], [f"{tag}_xyg"]),
                  helper.make_node("Mul", [f"{tag}_xyg", f"{tag}_stride"], [f"{tag}_xypx"]),
                  helper.make_node("Mul", [f"{tag}_wh", "two"], [f"{tag}_wh2"]),
                  helper.make_node("Pow", [f"{tag}_wh2", "two"], [f"{tag}_whsq"]),
                  helper.make_node("Mul", [f"{tag}_whsq", f"{tag}_anchors"], [f"{tag}_whpx"]),
                  helper.make_node("Concat", [f"{tag}_xypx", f"{tag}_whpx", f"{tag}_conf"], [f"{tag}_rows5"], axis=4),
                  helper.make_node("Reshape", [f"{tag}_rows5", f"{tag}_rows"], [f"{tag}_out"])]
        flat.append(f"{tag}_out")
    nodes.append(helper.make_node("Concat", flat, ["output0"], axis=1))
    rows = sum(len(a) * (SIZE // s) ** 2 for s, a in LEVELS.items())
    graph = helper.make_graph(nodes, "yolov5", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                              [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, rows, PER_ANCHOR])],
                              [numpy_helper.from_array(a if a.dtype == np.int64 else np.ascontiguousarray(a, np.float32),
                                                       n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for key, value in {"stride": "32", "names": str(names or ["cat", "dog", "bird"])}.items():
        model.metadata_props.add(key=key, value=value)  # as YOLOv5's export.py writes them
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def built(tmp_path, mirror) -> tuple[Path, list[str]]:
    """init's recipe for the graph, float32 and int8-tflite, built: (recipe, the folder options)."""
    model = yolov5_like_onnx(tmp_path / "y5.onnx")
    folders = {role: image_folder(tmp_path / role, MIRROR / "coco" / split, 8)
               for role, split in (("calib", "train2017"), ("check", "val2017"))}
    made = run_cli("init", "y5", "--from", str(model), "--to", str(tmp_path), "--calibration", str(folders["calib"]),
                   "--verify", str(folders["check"]))
    assert made.returncode == 0, made.stderr
    path = tmp_path / "y5.yaml"
    recipe = yaml.safe_load(path.read_text())
    recipe["variants"] = [v for v in recipe["variants"] if v["name"] in ("float32", "int8-tflite")]
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(path), *where)
    assert done.returncode == 0, done.stderr[-3000:]
    return path, where


def test_init_reads_the_levels_and_the_split_head_decodes_to_the_exports_own_rows(built, tmp_path):
    path, _ = built
    post = yaml.safe_load(path.read_text())["postprocess"]
    assert post["kind"] == "yolov5" and post["labels"] == ["cat", "dog", "bird"]  # a list, as older exports write
    assert [(level["stride"], level["anchors"]) for level in post["levels"]] == \
        [(stride, [v for pair in anchors for v in pair]) for stride, anchors in LEVELS.items()]
    recipe = load_recipe(path)
    assert recipe.strip.outputs == tuple(part for level in recipe.postprocess.levels for part in level.parts)
    # freeze's split graph computes what the source computes
    source = ort.InferenceSession(str(tmp_path / "y5.onnx"), providers=["CPUExecutionProvider"])
    frozen = ort.InferenceSession(str(tmp_path / "build" / "y5" / "freeze" / "model.onnx"),
                                  providers=["CPUExecutionProvider"])
    cut = open_model(tmp_path / "dist" / "y5" / "y5_float32.onnx", list(recipe.strip.outputs))
    one_output = load_recipe(path)
    from dataclasses import replace

    one_output = replace(one_output.postprocess, levels=(), nms_score_threshold=0.05)
    compared = 0
    for image in sorted((tmp_path / "check").iterdir())[:4]:
        tensor = prepare(image, recipe.preprocess, recipe.input).tensor
        theirs = source.run(None, {"images": tensor})[0]
        np.testing.assert_allclose(frozen.run(["output0"], {"images": tensor})[0], theirs, rtol=1e-5, atol=1e-5)
        ours = raw_detections(cut.run(tensor), list(recipe.strip.outputs),
                              replace(recipe.postprocess, nms_score_threshold=0.05), None, recipe.input.height_width)
        export = raw_detections([theirs], None, one_output, None, recipe.input.height_width)
        np.testing.assert_allclose(ours.boxes, export.boxes, atol=1e-5)
        np.testing.assert_allclose(ours.scores, export.scores, atol=1e-6)
        assert np.array_equal(ours.labels, export.labels)
        compared += len(ours.scores)
    assert compared > 10


def test_int8_boxes_and_scores_get_scales_of_their_own_and_are_judged_by_what_they_mean(built, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    path, _ = built
    recipe = load_recipe(path)
    model = Interpreter(str(tmp_path / "dist" / "y5" / "y5_int8-tflite.tflite"))
    scales = [d["quantization"][0] for d in model.get_output_details()]
    assert len(set(scales)) == len(scales) == 4  # each level's boxes and scores at a scale of its own
    verify = json.loads((tmp_path / "build" / "y5" / "verify" / "int8-tflite" / "result.json").read_text())
    level = recipe.postprocess.levels[0]
    boxes, scores = verify["metrics"][level.parts[0]], verify["metrics"][level.parts[1]]
    assert boxes["worst_slice"]["of"] == 4 and scores["worst_slice"]["of"] == CLASSES  # x, y, w, h; each class


@pytest.mark.parametrize("bounded, export_names", [(True, False), (False, False), (True, True)])
def test_int8_tflite_holds_the_levels_logits_within_a_sigmoids_band(bounded, export_names, tmp_path, mirror):
    """Every value of a level is decoded through a sigmoid: logits far beyond +-8 (the Convs x 30) keep an int8
    range within the band, as a sigmoid in the graph would bound them; with bounded_logits false, their whole
    range. Named as YOLOv5's export names them, the .tflite's outputs are the port's (port_1...), found by their
    order. (The ONNX int8 leaves a graph output's Conv float: nothing to bound there.)"""
    from ai_edge_litert.interpreter import Interpreter

    recipe = _proposed(tmp_path, gain=30.0, export_names=export_names)
    recipe["postprocess"]["bounded_logits"] = bounded
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 8)
    recipe["variants"] = [{"name": "int8-tflite", "mode": "int8", "target": "tflite", "calibration": str(calibration)}]
    path = tmp_path / "y5.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(path), "--out", str(tmp_path / "dist"),
                   "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-3000:]
    ranges = {}
    for detail in Interpreter(str(tmp_path / "dist" / "y5" / "y5_int8-tflite.tflite")).get_output_details():
        step, zero = detail["quantization"]
        ranges[detail["name"]] = step, (-128 - zero) * step, (127 - zero) * step
    assert len(ranges) == 4 and (set(ranges) == set(recipe["strip"]["outputs"])) != export_names, ranges
    within = {name: -8 - step <= low and high <= 8 + step for name, (step, low, high) in ranges.items()}
    assert all(within.values()) if bounded else not any(within.values()), ranges


def test_a_class_lost_in_int8_is_found_whatever_the_levels_size():
    """The scores part is judged class by class (the axis the decode knows), where the shape alone would not
    tell which axis is the classes (80 classes over a level of 300 cells)."""
    from mzconvert.recipe.schema import AnchorLevel, Postprocess

    level = AnchorLevel("head", 32, (10.0, 13.0, 16.0, 30.0, 33.0, 23.0))
    post = Postprocess(kind="yolov5", labels=tuple(f"c{i}" for i in range(80)), category_ids=tuple(range(80)),
                       levels=(level,))
    rng = np.random.RandomState(0)
    reference = rng.normal(-4, 3, (6, 3 * 81, 10, 10))  # 6 images, 3 anchors x (objectness + 80), 10 x 10 cells
    reference[:, 0::81] = 4.0  # confident objectness: scores are the class probabilities
    lost = reference.copy()
    lost[:, 1 + 7::81] = -20  # class 7 never scores
    judged = judged_outputs(level.parts[1], reference, lost, post, (320, 320))
    worst = worst_slice(*judged)
    assert judged[0].shape == (6, 80, 300) and worst["index"] == 7 and worst["sqnr_db"] < 1
    assert (judged[0] == 0).any() and (judged[0][judged[0] > 0] >= MATCH_SCORE).all()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["strip"].update(outputs=r["strip"]["outputs"][1:]),
     "postprocess.levels[0].output: freeze splits 'p16_conv' into its boxes and scores, which strip cuts at: "
     "strip.outputs lacks 'p16_conv/boxes'"),
    (lambda r: r["postprocess"]["levels"][1].update(anchors=[1.0, 2.0, 3.0]),
     "postprocess.levels[1].anchors: expected positive anchor sizes in pairs"),
    (lambda r: r["postprocess"].update(output="output0"),
     "postprocess.output: output is the one concatenated output; levels replace it"),
    (lambda r: r["postprocess"].pop("levels") and r["postprocess"].update(bounded_logits=False),
     "postprocess.bounded_logits: bounded_logits bounds the logits of a yolov5 head cut at its levels: name levels"),
])
def test_a_wrong_levels_section_is_refused_where_it_is(edit, message, tmp_path):
    path = tmp_path / "y5.yaml"
    recipe = _proposed(tmp_path)
    edit(recipe)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    checked = run_cli("validate", str(path))
    assert checked.returncode != 0 and message in checked.stderr, checked.stderr


def test_a_level_that_is_not_a_conv_is_refused_at_freeze(tmp_path):
    recipe = _proposed(tmp_path)
    level = recipe["postprocess"]["levels"][0]
    level["output"] = "p16_r"  # the Reshape after the Conv
    recipe["strip"]["outputs"][:2] = ["p16_r/boxes", "p16_r/scores"]
    recipe["variants"] = [{"name": "float32", "mode": "float32"}]
    path = tmp_path / "y5.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(path), "--out", str(tmp_path / "dist"),
                   "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 2 and "postprocess.levels[0].output: p16_r is made by a Reshape" in done.stderr, \
        done.stderr
    assert not (tmp_path / "dist" / "y5").exists()


def _proposed(tmp_path: Path, gain: float = 1.0, export_names: bool = False) -> dict:
    model = yolov5_like_onnx(tmp_path / "y5.onnx", gain=gain, export_names=export_names)
    made = run_cli("init", "y5", "--from", str(model), "--to", str(tmp_path))
    assert made.returncode == 0, made.stderr
    return yaml.safe_load((tmp_path / "y5.yaml").read_text())


def test_the_one_output_int8_that_crushes_the_scores_is_caught_not_shipped(tmp_path, mirror):
    """Without the cut (the export's one output: pixel boxes up to 64 beside probabilities at one int8 scale),
    verify judges each column apart and the build refuses the int8 model."""
    recipe = _proposed(tmp_path)
    recipe["strip"]["outputs"] = ["output0"]
    recipe["postprocess"].pop("levels")
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 8)
    recipe["variants"] = [{"name": "int8-tflite", "mode": "int8", "target": "tflite", "calibration": str(calibration)}]
    recipe["verify"] = {"images": str(image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 8)), "count": 8}
    path = tmp_path / "y5.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(path), "--out", str(tmp_path / "dist"),
                   "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 1 and "variants[0].min_slice_sqnr_db: int8-tflite: SQNR of output0 channel" in done.stderr, \
        done.stderr[-2000:]
    assert not (tmp_path / "dist" / "y5").exists()
