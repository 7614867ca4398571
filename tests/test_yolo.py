"""Ultralytics-style detectors: a YOLOv8 head's one output decoded here, letterboxed images mapped back, and
int8 that keeps the class scores at their own scale (an ONNX graph of the export's layout, made here)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from mzconvert.errors import EXIT_BAD_INPUT
from mzconvert.preprocess import letterbox_geometry, model_tensor
from mzconvert.recipe import InputSpec, Postprocess
from mzconvert.recipe.schema import DEFAULT_FLOORS, Preprocess
from mzconvert.sources.scaffold import TUNE_STEPS
from mzconvert.stages.verify import below_floors
from mzconvert.tasks.detection import Detections, on_image, yolov8_detections
from tests.conftest import MIRROR, image_folder, run_cli

SIZE = 320  # an Ultralytics export size: boxes in pixels up to 320 beside probabilities up to 1
STRIDE = SIZE // 8


def yolov8_like_onnx(path: Path) -> Path:
    """[1, 4 + 2, 64]: per cell of an 8x8 grid, a box centred within the cell and at most a cell in size, in
    input pixels, then two class probabilities, concatenated as Ultralytics' Detect head exports them."""
    rng = np.random.RandomState(5)
    cells = np.zeros((1, 4, 8, 8), np.float32)
    cells[0, 0], cells[0, 1] = np.meshgrid(np.arange(8), np.arange(8))
    arrays = {"wb": rng.normal(0, 0.02, (4, 3, STRIDE, STRIDE)), "wc": rng.normal(0, 0.02, (2, 3, STRIDE, STRIDE)),
              "cells": cells, "stride": np.array(float(STRIDE)),
              "shape_b": np.array([1, 4, 64], np.int64), "shape_c": np.array([1, 2, 64], np.int64)}
    nodes = [helper.make_node("Conv", ["images", "wb"], ["b"], strides=[STRIDE, STRIDE]),
             helper.make_node("Sigmoid", ["b"], ["b01"]), helper.make_node("Add", ["b01", "cells"], ["bcell"]),
             helper.make_node("Mul", ["bcell", "stride"], ["bpx"]),
             helper.make_node("Reshape", ["bpx", "shape_b"], ["boxes"]),
             helper.make_node("Conv", ["images", "wc"], ["c"], strides=[STRIDE, STRIDE]),
             helper.make_node("Sigmoid", ["c"], ["cp"]), helper.make_node("Reshape", ["cp", "shape_c"], ["scores"]),
             helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "yolo", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 64])],
                              [numpy_helper.from_array(a if a.dtype == np.int64 else a.astype(np.float32), n)
                               for n, a in arrays.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def reference_decode(output: np.ndarray, threshold: float, iou: float) -> list[tuple]:
    """The export's output decoded the plain way: every (box, class) above the threshold, greedy per-class NMS."""
    rows = output[0].T
    kept = []
    for label in range(rows.shape[1] - 4):
        candidates = sorted(((float(r[4 + label]), i) for i, r in enumerate(rows) if r[4 + label] > threshold),
                            reverse=True)
        chosen = []
        for score, i in candidates:
            x, y, w, h = rows[i, :4]
            box = (x - w / 2, y - h / 2, x + w / 2, y + h / 2)
            overlaps = [_iou(box, other) for other, _ in chosen]
            if all(o <= iou for o in overlaps):
                chosen.append((box, score))
        kept += [(label, round(score, 5), tuple(round(float(v) / SIZE, 5) for v in box)) for box, score in chosen]
    return sorted(kept)


def _iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def test_yolov8_decode_is_the_plain_decode(tmp_path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(yolov8_like_onnx(tmp_path / "y.onnx")), providers=["CPUExecutionProvider"])
    output = session.run(None, {"images": np.random.RandomState(0).uniform(-2, 2, (1, 3, SIZE, SIZE))
                                .astype(np.float32)})[0]
    post = Postprocess(kind="yolov8", labels=("a", "b"), category_ids=(1, 2), nms_score_threshold=0.3,
                       nms_iou_threshold=0.5, max_detections=1000)
    found = yolov8_detections([output], {}, post, None, (SIZE, SIZE))
    ours = sorted((int(label), round(float(s), 5), (round(float(b[1]), 5), round(float(b[0]), 5),
                                                     round(float(b[3]), 5), round(float(b[2]), 5)))
                  for b, s, label in zip(np.clip(found.boxes, -1, 2), found.scores, found.labels))
    expected = reference_decode(output, 0.3, 0.5)
    assert len(expected) > 3
    assert [(lb, s) for lb, s, _ in ours] == [(lb, s) for lb, s, _ in expected]
    for (_, _, mine), (_, _, theirs) in zip(ours, expected):
        assert np.allclose(np.clip(mine, 0, 1), np.clip(theirs, 0, 1), atol=1e-5)


@pytest.mark.parametrize("size, fill", [((640, 480), 114), ((300, 500), 114), ((64, 64), 114), ((640, 480), 0)])
def test_letterbox_pads_with_its_fill_and_maps_boxes_back(size, fill, mirror):
    """Ultralytics' gray 114 by default; MediaPipe's black (letterbox_fill 0)."""
    image = Image.open(sorted((MIRROR / "coco" / "val2017").glob("*.jpg"))[0]).convert("RGB").resize(size)
    preprocess = Preprocess(resize=(SIZE, SIZE), interpolation="cv2-linear", channel_order="RGB", mean=(0.0,) * 3,
                            std=(1.0,) * 3, letterbox=True, letterbox_fill=fill)
    tensor = model_tensor(image, preprocess, InputSpec("images", (1, SIZE, SIZE, 3), "NHWC", "float32"))[0]
    new_w, new_h, left, top, gain = letterbox_geometry(*size, SIZE, SIZE)
    assert (new_w == SIZE or new_h == SIZE) and abs(new_w / new_h - size[0] / size[1]) < 0.1
    pad = np.ones((SIZE, SIZE), bool)
    pad[top:top + new_h, left:left + new_w] = False
    assert pad.any() == (size[0] != size[1])
    assert np.all(tensor[pad] == fill) and not np.all(tensor[~pad] == fill)
    # a box around the image's content in the input maps to the whole image
    inner = Detections(np.array([[top / SIZE, left / SIZE, (top + new_h) / SIZE, (left + new_w) / SIZE]]),
                       np.ones(1), np.zeros(1, np.int64))
    assert np.allclose(on_image(inner, size, preprocess).boxes, [[0, 0, 1, 1]], atol=0.02)


def test_a_yolov8_export_builds_verifies_evaluates_and_draws(tmp_path, mirror):
    model = yolov8_like_onnx(tmp_path / "yolo.onnx")
    train, val = MIRROR / "coco" / "train2017", MIRROR / "coco" / "val2017"
    (tmp_path / "yolo.yaml").write_text(f"""name: yolo
task: detection
description: a YOLOv8-layout head made in the test
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
format: onnx
input: {{name: images, shape: [1, 3, {SIZE}, {SIZE}], layout: NCHW}}
preprocess: {{interpolation: cv2-linear, letterbox: true, scale: 0.00392156862745098, offset: 0.0}}
postprocess: {{kind: yolov8, labels: [person, car], category_ids: [1, 3], nms_iou_threshold: 0.7}}
variants:
  - {{name: float32, mode: float32}}
  - {{name: int8, mode: int8, io_dtype: float32, calibration: {train}, calibration_count: 16}}
  - {{name: int8-one-scale, mode: int8, io_dtype: float32, calibration: {train}, calibration_count: 16,
     separate_output_scales: false, min_matched: 0, min_slice_sqnr_db: -1000}}
verify: {{images: {val}, count: 16}}
""")
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "yolo.yaml"), *where)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout)["yolo"]["variants"]
    kept, shared = variants["int8"]["verify"], variants["int8-one-scale"]["verify"]
    assert kept["detections_compared"] > 20 and kept["matched_detections"] >= 0.8, kept
    # the export's one output under one int8 scale: a class channel at 0 dB, caught by the default floors
    assert shared["output0"]["worst_slice"]["sqnr_db"] < 1, shared
    assert shared["matched_detections"] < kept["matched_detections"] - 0.1, (shared, kept)
    assert {field for field, _, _ in below_floors(shared, DEFAULT_FLOORS, "int8")} == {"min_slice_sqnr_db", "min_matched"}
    evaluated = run_cli("--json", "eval", str(tmp_path / "yolo.yaml"), "--dataset", str(MIRROR / "coco"), *where)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads(evaluated.stdout)["results"]
    assert {"source-graph", "float32", "int8"} <= set(results) and results["float32"]["detections"] > 0
    assert results["source-graph"]["AP"] == results["float32"]["AP"]
    # the same images under other category ids (a dataset of its own numbering): scored by the names
    renumbered = with_categories_renumbered(MIRROR / "coco", "val2017", tmp_path / "renumbered")
    again = run_cli("--json", "eval", str(tmp_path / "yolo.yaml"), "--dataset", str(renumbered), "--variant",
                    "float32", *where)
    assert again.returncode == 0 and "under another id than the recipe's" in again.stderr, again.stderr[-2000:]
    assert json.loads(again.stdout)["results"]["float32"]["AP"] == results["float32"]["AP"]
    drawn = run_cli("predict", str(tmp_path / "yolo.yaml"), str(sorted(val.glob("*.jpg"))[0]), "--min-score", "0.5",
                    *where)
    assert drawn.returncode == 0 and Path(drawn.stdout.strip()).is_file(), drawn.stderr[-2000:]


def with_categories_renumbered(coco: Path, split: str, folder: Path) -> Path:
    """A COCO folder of the same images and annotations, each category under another id (in reverse order)."""
    (folder / "annotations").mkdir(parents=True)
    (folder / split).symlink_to(coco / split)
    (source,) = (coco / "annotations").glob(f"instances_{split}*.json")
    data = json.loads(source.read_text())
    ids = sorted(c["id"] for c in data["categories"])
    new_id = dict(zip(ids, reversed(ids)))
    for category in data["categories"]:
        category["id"] = new_id[category["id"]]
    for annotation in data["annotations"]:
        annotation["category_id"] = new_id[annotation["category_id"]]
    (folder / "annotations" / source.name).write_text(json.dumps(data))
    return folder


def with_ultralytics_metadata(path: Path, names: dict, dynamic: bool = True, task: str = "detect",
                              size: int = SIZE) -> Path:
    """The export as Ultralytics writes it: dynamic batch and size (dynamic=True), its metadata_props."""
    model = onnx.load(str(path))
    if dynamic:
        for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, ["batch", None, "height", "width"]):
            if name:
                dim.Clear()
                dim.dim_param = name
    for key, value in {"task": task, "names": str(names), "imgsz": f"[{size}, {size}]", "stride": "32",
                       "author": "Ultralytics"}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def test_init_reads_an_ultralytics_export_and_the_recipe_builds_and_evaluates_as_written(tmp_path, mirror):
    model = with_ultralytics_metadata(yolov8_like_onnx(tmp_path / "yolo.onnx"), {0: "person", 1: "car"})
    inspected = run_cli("inspect", str(model))
    assert "metadata task: detect" in inspected.stdout and "dynamic dimensions: images ['batch'" in inspected.stdout
    folders = {role: image_folder(tmp_path / role, MIRROR / "coco" / split, 16)
               for role, split in (("calib", "train2017"), ("check", "val2017"))}
    made = run_cli("init", "yolo", "--from", str(model), "--to", str(tmp_path), "--calibration",
                   str(folders["calib"]), "--verify", str(folders["check"]))
    assert made.returncode == 0, made.stderr
    recipe = __import__("yaml").safe_load((tmp_path / "yolo.yaml").read_text())
    assert recipe["task"] == "detection" and recipe["input"]["shape"] == [1, 3, SIZE, SIZE]
    # cut before the head's Concat: boxes in pixels and probabilities each get an int8 scale of their own; its
    # TFLite variants end in NMS; its classes, named as COCO's, are scored as those categories
    assert recipe["postprocess"] == {"kind": "yolov8", "labels": ["person", "car"], "nms_iou_threshold": 0.7,
                                     "category_ids": [1, 3], "box_output": "boxes", "class_output": "scores",
                                     "attach": True}
    assert recipe["strip"]["outputs"] == ["boxes", "scores"]
    assert recipe["preprocess"]["letterbox"] is True and recipe["preprocess"]["interpolation"] == "cv2-linear"
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "yolo.yaml"), *where)
    assert built.returncode == 0, built.stderr[-3000:]
    variants = json.loads(built.stdout)["yolo"]["variants"]
    assert variants["float32-tflite"]["verify"]["matched_detections"] == 1.0
    for name in ("int8", "int8-tflite"):  # ONNX QDQ, and full-integer LiteRT through onnx2tf
        assert variants[name]["verify"]["matched_detections"] >= 0.8, (name, variants[name]["verify"])
        assert variants[name]["verify"]["scores"]["worst_slice"]["sqnr_db"] > 15, variants[name]["verify"]
    assert variants["int8-tflite"]["postprocess_attached"] and not variants["int8"]["postprocess_attached"]
    # and 16-bit activations for the NPU (raw outputs: the attached op reads 8-bit or float scores)
    sixteen = variants["int16x8-tflite"]
    assert not sixteen["postprocess_attached"] and sixteen["verify"]["matched_detections"] >= 0.8, sixteen
    assert next(iter(sixteen["vela"].values()))["cpu_op_count"] == 0, sixteen["vela"]
    (npu,) = variants["int8-tflite"]["vela"].values()
    assert npu["cpu_op_count"] == ATTACHED_HEADS["pixels"][-1] and npu["npu_ops"]
    evaluated = run_cli("--json", "eval", str(tmp_path / "yolo.yaml"), "--dataset", str(MIRROR / "coco"), *where)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


def ending_in_own_nms(path: Path, joined: bool = True) -> Path:
    """The export as Ultralytics' nms=True writes it: the head's [1, 4 + classes, N] read by the graph's own
    NonMaxSuppression (boxes [1, N, 4], scores [1, classes, N]), whose selections are the graph's output; with
    `joined` false the NMS reads the boxes and scores that no Concat joins."""
    model = onnx.load(str(path))
    graph = model.graph
    head = "output0" if joined else None
    if not joined:  # the NMS reads the head's two branches as they are, the Concat gone
        graph.node.remove(next(n for n in graph.node if n.op_type == "Concat"))
    graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                              (("start_b", [0]), ("end_b", [4]), ("start_c", [4]), ("end_c", [6]), ("axis", [2]),
                               ("keep", [300]))] + [numpy_helper.from_array(np.array([v], np.float32), n)
                                                    for n, v in (("iou", 0.7), ("conf", 0.25))])
    if joined:
        graph.node.extend([helper.make_node("Transpose", [head], ["rows"], perm=[0, 2, 1]),
                           helper.make_node("Slice", ["rows", "start_b", "end_b", "axis"], ["nms_boxes"]),
                           helper.make_node("Slice", ["rows", "start_c", "end_c", "axis"], ["nms_scores_t"]),
                           helper.make_node("Transpose", ["nms_scores_t"], ["nms_scores"], perm=[0, 2, 1])])
    else:
        graph.node.extend([helper.make_node("Transpose", ["boxes"], ["nms_boxes"], perm=[0, 2, 1]),
                           helper.make_node("Identity", ["scores"], ["nms_scores"])])
    graph.node.append(helper.make_node("NonMaxSuppression", ["nms_boxes", "nms_scores", "keep", "iou", "conf"],
                                       ["selected"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("selected", TensorProto.INT64, ["selected", 3]))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("joined", [True, False], ids=["head-joined", "branches-apart"])
def test_init_cuts_an_export_that_ends_in_its_own_nms_before_it(tmp_path, joined):
    """An export that ends in NMS (Ultralytics' nms=True) is cut where its head is joined, as the plain export;
    where no joined head is found, init says so in one line and writes nothing (no guess from the NMS's rows)."""
    model = with_ultralytics_metadata(ending_in_own_nms(yolov8_like_onnx(tmp_path / "yolo.onnx"), joined),
                                      {0: "person", 1: "car"}, dynamic=False)
    inspected = run_cli("inspect", str(model))
    assert ("ends in its own NonMaxSuppression, which reads the head output0  float32 [1, 6, 64]" in inspected.stdout) \
        == joined, inspected.stdout
    made = run_cli("init", "yolo", "--from", str(model), "--to", str(tmp_path / "r"))
    if not joined:
        assert made.returncode == EXIT_BAD_INPUT and not (tmp_path / "r" / "yolo.yaml").exists(), made.stderr
        (line,) = made.stderr.strip().splitlines()
        assert model.name in line and "ends in its own NMS" in line and "strip.outputs" in line, line
        return
    assert made.returncode == 0, made.stderr
    recipe = __import__("yaml").safe_load((tmp_path / "r" / "yolo.yaml").read_text())
    assert recipe["task"] == "detection" and recipe["strip"]["outputs"] == ["boxes", "scores"]
    assert recipe["postprocess"]["kind"] == "yolov8" and recipe["postprocess"]["labels"] == ["person", "car"]
    assert (recipe["postprocess"]["box_output"], recipe["postprocess"]["class_output"]) == ("boxes", "scores")


@pytest.mark.parametrize("task", ["classify", "pose", "segment", "obb"])
def test_init_proposes_ultralytics_preprocessing_for_every_task_it_names(tmp_path, task):
    """An Ultralytics classifier is proposed with its own transforms (shorter side resized, centre cropped, RGB in
    [0, 1]: no ImageNet mean and std); an oriented-box head, which no postprocess kind decodes, or a pose or
    segmentation head with nothing after its classes, as `other` (judged channel by channel) with its letterbox,
    never as a detector of its rows as classes."""
    from tests.test_onnx_backend import tiny_onnx

    names = {i: f"class {i}" for i in range(10 if task == "classify" else 2)}
    made_model = tiny_onnx(tmp_path / "m.onnx", size=32) if task == "classify" else yolov8_like_onnx(tmp_path / "m.onnx")
    model = with_ultralytics_metadata(made_model, names, task=task, size=32 if task == "classify" else SIZE)
    made = run_cli("init", "m", "--from", str(model), "--to", str(tmp_path / "r"))
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "r" / "m.yaml").read_text()
    recipe = __import__("yaml").safe_load(text)
    preprocess = recipe["preprocess"]
    assert preprocess["scale"] == pytest.approx(1 / 255) and preprocess["offset"] == 0 and "mean" not in preprocess
    if task == "classify":
        assert recipe["task"] == "classification" and recipe["input"]["shape"] == [1, 3, 32, 32]
        assert preprocess["interpolation"] == "torchvision" and preprocess["central_crop"] == 1.0
        assert recipe["labels"] == list(names.values())
    else:
        assert recipe["task"] == "other" and "postprocess" not in recipe and preprocess["letterbox"] is True
        assert recipe["input"]["shape"] == [1, 3, SIZE, SIZE]  # the dynamic size at the exported imgsz
        assert f"an Ultralytics {task} export: no postprocess kind decodes its head yet" in text


def pose_like_onnx(path: Path, points: int = 2) -> Path:
    """yolov8_like_onnx's head with keypoints after its classes, as Ultralytics' Pose head exports them: raw values
    (x, y, visibility per point) joined by a Concat, then decoded (here: sigmoid, times the stride) into the part
    output0 concatenates third."""
    model = onnx.load(str(yolov8_like_onnx(path)))
    rng = np.random.RandomState(6)
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(rng.normal(0, 0.02, (3 * points, 3, STRIDE, STRIDE))
                                                      .astype(np.float32), "wk"),
                              numpy_helper.from_array(np.array([1, 3 * points, 64], np.int64), "shape_k")])
    concat = graph.node[len(graph.node) - 1]
    graph.node.remove(concat)
    graph.node.extend([helper.make_node("Conv", ["images", "wk"], ["k"], strides=[STRIDE, STRIDE]),
                       helper.make_node("Reshape", ["k", "shape_k"], ["k_level"]),
                       helper.make_node("Concat", ["k_level"], ["keypoints_raw"], axis=2),
                       helper.make_node("Sigmoid", ["keypoints_raw"], ["k01"]),
                       helper.make_node("Mul", ["k01", "stride"], ["keypoints"]),
                       helper.make_node("Concat", ["boxes", "scores", "keypoints"], ["output0"], axis=1)])
    graph.output[0].type.tensor_type.shape.dim[1].dim_value = 6 + 3 * points
    onnx.save(model, str(path))
    return path


def test_a_pose_head_is_proposed_as_its_detector_with_its_keypoints_before_their_decode_and_no_nms(tmp_path):
    """A pose export (metadata task pose, kpt_shape): the detector's cut, its keypoints before their decode an
    output of their own, no NMS attached; its class names that are COCO's scored as their COCO categories. Its
    layout is read from the parts its output joins (12 values a cell over 64 cells, which the output's proportions
    read as neither layout, as a YOLOv8n's [1, 84, 525] at 160 px). A recipe attaching NMS to it is refused: the
    op's outputs would replace the keypoints."""
    from mzconvert.errors import RecipeError
    from mzconvert.recipe import load_recipe

    model = with_ultralytics_metadata(pose_like_onnx(tmp_path / "pose.onnx"), {0: "person", 1: "car"}, task="pose")
    onnx_model = onnx.load(str(model))
    onnx_model.metadata_props.add(key="kpt_shape", value="[2, 3]")
    onnx.save(onnx_model, str(model))
    made = run_cli("init", "pose", "--from", str(model), "--to", str(tmp_path))
    assert made.returncode == 0, made.stderr
    text = (tmp_path / "pose.yaml").read_text()
    recipe = __import__("yaml").safe_load(text)
    post = recipe["postprocess"]
    assert recipe["task"] == "detection" and post["kind"] == "yolov8" and "attach" not in post
    assert recipe["strip"]["outputs"] == ["boxes", "scores", "keypoints_raw"]
    assert post["category_ids"] == [1, 3] and "keypoints (keypoints_raw) are outputs" in text
    post["attach"] = True
    (tmp_path / "pose.yaml").write_text(__import__("yaml").safe_dump(recipe))
    with pytest.raises(RecipeError, match=r"postprocess.attach: .* strip.outputs also keeps keypoints_raw: set "
                                          r"attach: false to keep them"):
        load_recipe(tmp_path / "pose.yaml")


def test_coco_names_get_coco_category_ids():
    from mzconvert.coco import coco_categories
    from mzconvert.sources.scaffold import propose_recipe

    names = [name for _, name in coco_categories()]
    report = {"file": "yolov8n.onnx", "format": "onnx", "size": 1, "sha256": "0" * 64,
              "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 640, 640]}],
              "outputs": [{"name": "output0", "dtype": "float32", "shape": [1, 84, 8400]}],
              "metadata": {"task": "detect", "names": str(dict(enumerate(names))), "imgsz": "[640, 640]"}}
    text = propose_recipe("yolov8n", report, {"url": "https://example.com/yolov8n.onnx"}, None, None, None)
    post = __import__("yaml").safe_load(text)["postprocess"]
    assert post["labels"][:3] == ["person", "bicycle", "car"] and len(post["labels"]) == 80
    assert post["category_ids"][:3] == [1, 2, 3] and post["category_ids"][-1] == 90 and 12 not in post["category_ids"]


@pytest.mark.parametrize("shape, kind", [([1, 84, 525], "yolov8"), ([1, 525, 85], "yolov5")])
def test_a_heads_layout_is_read_from_the_classes_its_metadata_names(shape, kind):
    """A 160 px export of 80 classes (525 cells) whose join init cannot see: its output's proportions read as
    neither layout; the side that holds 4 + (5 +) the 80 classes the metadata names says which it is."""
    from mzconvert.sources.scaffold import propose_recipe

    report = {"file": "yolo.onnx", "format": "onnx", "size": 1, "sha256": "0" * 64,
              "inputs": [{"name": "images", "dtype": "float32", "shape": [1, 3, 160, 160]}],
              "outputs": [{"name": "output0", "dtype": "float32", "shape": shape}],
              "metadata": {"task": "detect", "names": str({i: f"c{i}" for i in range(80)}), "imgsz": "[160, 160]"}}
    text = propose_recipe("yolo", report, {"url": "https://example.com/yolo.onnx"}, None, None, None)
    post = __import__("yaml").safe_load(text)["postprocess"]
    assert post["kind"] == kind and len(post["labels"]) == 80 and post["labels"][-1] == "c79"


def test_nms_attaches_only_to_a_yolov8_head_cut_before_its_concat(tmp_path):
    from mzconvert.errors import RecipeError
    from mzconvert.recipe import load_recipe

    model = yolov8_like_onnx(tmp_path / "yolo.onnx")
    (tmp_path / "yolo.yaml").write_text(f"""name: yolo
task: detection
description: one concatenated output
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
format: onnx
input: {{name: images, shape: [1, 3, {SIZE}, {SIZE}], layout: NCHW}}
postprocess: {{kind: yolov8, labels: [person, car], attach: true}}
variants:
  - {{name: float32, mode: float32}}
""")
    with pytest.raises(RecipeError, match=r"postprocess.attach: TFLite_Detection_PostProcess attaches to a yolov8 "
                                          r"head cut before its Concat: name box_output and class_output"):
        load_recipe(tmp_path / "yolo.yaml")


DFL_SIZE, DFL_STRIDES, BINS = 64, (8, 16, 32), 16


def yolov8_dfl_onnx(path: Path, classes: int = 3, bins: int = BINS) -> Path:
    """A YOLOv8 head as Ultralytics exports it, over three levels: per level a box branch of 4 x 16 distribution
    logits and a class branch, concatenated over the levels; the DFL (Reshape, Transpose, Softmax over the 16
    bins, a 1x1 Conv of weights 0..15), dist2bbox from each cell's centre, times its stride; then one Concat.
    With `bins` 1 a head without a DFL, as YOLO26's: the box branch's 4 channels are the distances dist2bbox reads.
    A constant is a Constant node, as unsimplified exports have them."""
    rng = np.random.RandomState(3)
    arrays, nodes, boxes, scores, centres, strides = {}, [], [], [], [], []
    for s in DFL_STRIDES:
        cells = DFL_SIZE // s
        arrays[f"wb{s}"] = rng.normal(0, 0.05, (4 * bins, 3, s, s)) * (1.0 if bins > 1 else 0.1)
        arrays[f"wc{s}"] = rng.normal(0, 0.05, (classes, 3, s, s))
        arrays[f"flat_b{s}"] = np.array([1, 4 * bins, cells * cells], np.int64)
        arrays[f"flat_c{s}"] = np.array([1, classes, cells * cells], np.int64)
        arrays[f"bb{s}"] = np.full(4 * bins, 0.0 if bins > 1 else 1.0)  # distances: about a stride each way
        nodes += [helper.make_node("Conv", ["images", f"wb{s}", f"bb{s}"], [f"b{s}"], strides=[s, s]),
                  helper.make_node("Reshape", [f"b{s}", f"flat_b{s}"], [f"box{s}"]),
                  helper.make_node("Conv", ["images", f"wc{s}"], [f"c{s}"], strides=[s, s]),
                  helper.make_node("Reshape", [f"c{s}", f"flat_c{s}"], [f"cls{s}"])]
        boxes.append(f"box{s}")
        scores.append(f"cls{s}")
        for row in range(cells):
            for column in range(cells):
                centres.append((column + 0.5, row + 0.5))
                strides.append(s)
    count = len(centres)
    arrays |= {"dfl_shape": np.array([1, 4, bins, count], np.int64),
               "dfl_w": np.arange(bins, dtype=np.float32).reshape(1, bins, 1, 1),
               "sides": np.array([1, 4, count], np.int64), "centres": np.array(centres).T[None],
               "strides": np.array(strides, np.float32)[None, None],
               "lt_start": np.array([0], np.int64), "lt_end": np.array([2], np.int64),
               "rb_end": np.array([4], np.int64), "axis1": np.array([1], np.int64)}
    nodes += [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
              helper.make_node("Concat", boxes, ["box_logits" if bins > 1 else "distances"], axis=2),
              helper.make_node("Concat", scores, ["class_logits"], axis=2),
              helper.make_node("Sigmoid", ["class_logits"], ["probabilities"])]
    if bins > 1:
        nodes += [helper.make_node("Reshape", ["box_logits", "dfl_shape"], ["dfl_bins"]),
                  helper.make_node("Transpose", ["dfl_bins"], ["dfl_t"], perm=[0, 2, 1, 3]),
                  helper.make_node("Softmax", ["dfl_t"], ["dfl_p"], axis=1),
                  helper.make_node("Conv", ["dfl_p", "dfl_w"], ["dfl_e"]),
                  helper.make_node("Reshape", ["dfl_e", "sides"], ["distances"])]
    nodes += [helper.make_node("Slice", ["distances", "lt_start", "lt_end", "axis1"], ["lt"]),
              helper.make_node("Slice", ["distances", "lt_end", "rb_end", "axis1"], ["rb"]),
              helper.make_node("Sub", ["centres", "lt"], ["x1y1"]), helper.make_node("Add", ["centres", "rb"], ["x2y2"]),
              helper.make_node("Add", ["x1y1", "x2y2"], ["sum"]), helper.make_node("Div", ["sum", "two"], ["cxy"]),
              helper.make_node("Sub", ["x2y2", "x1y1"], ["wh"]),
              helper.make_node("Concat", ["cxy", "wh"], ["xywh"], axis=1),
              helper.make_node("Mul", ["xywh", "strides"], ["pixels"]),
              helper.make_node("Concat", ["pixels", "probabilities"], ["output0"], axis=1)]
    graph = helper.make_graph(nodes, "yolo-dfl", [helper.make_tensor_value_info(
        "images", TensorProto.FLOAT, [1, 3, DFL_SIZE, DFL_SIZE])], [helper.make_tensor_value_info(
            "output0", TensorProto.FLOAT, [1, 4 + classes, count])],
        [numpy_helper.from_array(a if a.dtype == np.int64 else a.astype(np.float32), n) for n, a in arrays.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def with_outputs(path: Path, names: list[str], target: Path) -> Path:
    """The model with more of its tensors as graph outputs."""
    model = onnx.load(str(path))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    onnx.save(model, str(target))
    return target


# (the head, its input size, where it is cut, how its boxes are encoded, the float ops it leaves the CPU)
ATTACHED_HEADS = {
    # dequantize, reorder (2 gathers), sizes clamped at 0, their log, join, the op
    "pixels": (yolov8_like_onnx, 320, ["boxes", "scores"], "pixels", 7),
    # dequantize, bins grouped, softmax, flattened, two fully-connected, sizes clamped, log, join, the op
    "dfl": (yolov8_dfl_onnx, 64, ["box_logits", "probabilities"], "dfl", 10),
    # dequantize, two fully-connected, sizes clamped, log, join, the op
    "distances": (partial(yolov8_dfl_onnx, bins=1), 64, ["distances", "probabilities"], "distances", 7),
}


@pytest.mark.parametrize("head", ATTACHED_HEADS)
def test_nms_attached_to_a_yolov8_head_gives_our_decode_and_runs_beside_the_npu(head, tmp_path, mirror):
    """TFLite_Detection_PostProcess at the end of a yolov8 head cut before its Concat (unit anchors and log
    sizes for pixel boxes; for a head cut before its DFL, the softmax and expectation in float and anchors at the
    cells' centres; for one cut before its grid decode, the distances so): the float model's detections are our decode's of the same model's raw outputs, the int8
    model's those of its own raw outputs, and vela leaves only the post-processing on the CPU."""
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import postprocessed_detections

    make, size, (boxes, scores), encoding, cpu_ops = ATTACHED_HEADS[head]
    model = make(tmp_path / "yolo.onnx")
    labels = ["person", "car", "dog"][:2 if encoding == "pixels" else 3]
    train, val = MIRROR / "coco" / "train2017", MIRROR / "coco" / "val2017"
    (tmp_path / "yolo.yaml").write_text(f"""name: yolo
task: detection
description: a YOLOv8-layout head made in the test, cut before its Concat
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
format: onnx
input: {{name: images, shape: [1, 3, {size}, {size}], layout: NCHW}}
preprocess: {{interpolation: cv2-linear, letterbox: true, scale: 0.00392156862745098, offset: 0.0}}
strip: {{inputs: [images], outputs: [{boxes}, {scores}]}}
postprocess: {{kind: yolov8, labels: {labels}, category_ids: {[1, 3, 18][:len(labels)]}, box_output: {boxes},
              class_output: {scores}, box_encoding: {encoding}, nms_score_threshold: 0.2, nms_iou_threshold: 0.5,
              attach: true}}
variants:
  - {{name: float32, mode: float32}}
  - {{name: raw, mode: float32, target: tflite, attach_postprocess: false}}
  - {{name: f32, mode: float32, target: tflite}}
  - {{name: i8, mode: int8, target: tflite, io_dtype: int8, calibration: {train}, calibration_count: 16,
      tune_steps: 10}}
targets:
  vela: {{accelerator: ethos-u55-128, system_config: Ethos_U55_High_End_Embedded, memory_mode: Shared_Sram}}
verify: {{images: {val}, count: 8}}
""")
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "yolo.yaml"), *where)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout)["yolo"]["variants"]
    # its weights tuned (tune_steps) before the NMS was attached, and said so (the build's report, the manifest)
    tuned = variants["i8"]["tuned"]
    assert tuned["steps"] == 10 and tuned["kept"] == (tuned["error_after"] < tuned["error_before"]), tuned
    assert "i8: weights tuned for 10 steps" in done.stderr
    assert [variants[n]["postprocess_attached"] for n in ("float32", "raw", "f32", "i8")] == [False, False, True, True]
    (npu,) = variants["i8"]["vela"].values()
    assert npu["npu_ops"] > 0 and npu["cpu_op_count"] == cpu_ops, npu["cpu_ops"]
    assert all(op.split()[2].startswith(("postprocess/box", "detection_boxes")) for op in npu["cpu_ops"]), npu
    recipe = load_recipe(tmp_path / "yolo.yaml")
    dist = tmp_path / "dist" / "yolo"
    raw_i8 = next((tmp_path / "build" / "yolo" / "quantize" / "i8" / "raw").glob("*.tflite"))
    pairs = [(open_model(dist / "yolo_f32.tflite"), open_model(dist / "yolo_raw.tflite")),
             (open_model(dist / "yolo_i8.tflite"), open_model(raw_i8))]
    compared = 0
    for path in sorted(val.glob("*.jpg"))[:6]:
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        for attached, raw in pairs:
            theirs = postprocessed_detections(*attached.run(tensor))
            outputs = raw.run(tensor)
            ours = yolov8_detections(outputs, dict(zip([o.name for o in raw.outputs], outputs)), recipe.postprocess,
                                     None, (size, size))
            assert len(theirs.scores) == len(ours.scores)
            assert np.array_equal(theirs.labels, ours.labels)
            np.testing.assert_allclose(theirs.boxes, ours.boxes, atol=1e-4)
            np.testing.assert_allclose(theirs.scores, ours.scores, rtol=1e-5)
            compared += len(ours.scores)
    assert compared > 20


@pytest.mark.parametrize("bins, cut, encoding", [(BINS, "box_logits", "dfl"), (1, "distances", "distances")])
def test_a_head_cut_before_its_box_decode_decodes_to_the_exports_own_boxes(bins, cut, encoding, tmp_path):
    """init finds the DFL (a Softmax read by a 1x1 Conv of weights 0..15), or in a head without one (YOLO26) the
    distances its grid decode reads (halves taken from and added to the cells' centres), and cuts there; our
    decode of the cut (softmax and expectation; the grid inferred from the head's size) gives the boxes of the
    export's own decode, and the same detections as its one output."""
    import onnxruntime as ort

    from mzconvert.sources.inspection import inspect_onnx
    from mzconvert.tasks.detection import head_boxes

    model = yolov8_dfl_onnx(tmp_path / "yolo.onnx", bins=bins)
    report = inspect_onnx(model)
    assert report.get("dfl_input") == ({"name": cut, "bins": bins} if encoding == "dfl" else None)
    assert report["distances_input"] == "distances"  # a DFL's output is such distances too: init cuts before it
    said = run_cli("inspect", str(model)).stdout
    assert (f"DFL ({bins} bins) reads {cut}" if encoding == "dfl" else f"reads the distances {cut}") in said, said
    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 4)
    made = run_cli("init", "yolo", "--from", str(model), "--to", str(tmp_path / "recipe"), "--calibration",
                   str(calibration))
    assert made.returncode == 0, made.stderr
    import yaml

    recipe = yaml.safe_load((tmp_path / "recipe" / "yolo.yaml").read_text())
    proposed = recipe["postprocess"]
    assert (proposed["box_encoding"], proposed["box_output"]) == (encoding, cut)
    # its int8 variants' weights tuned to the float model's outputs (README: what that keeps on a trained YOLOv8n)
    assert {v["name"]: v.get("tune_steps") for v in recipe["variants"] if v["mode"] == "int8"} == \
        {"int8": TUNE_STEPS, "int8-tflite": TUNE_STEPS}, recipe["variants"]
    session = ort.InferenceSession(str(with_outputs(model, [cut, "probabilities"], tmp_path / "all.onnx")),
                                   providers=["CPUExecutionProvider"])
    post = Postprocess(kind="yolov8", labels=("a", "b", "c"), category_ids=(1, 2, 3), nms_score_threshold=0.4,
                       nms_iou_threshold=0.5, max_detections=1000)
    cut_post = replace(post, box_output=cut, class_output="probabilities", box_encoding=encoding)
    compared = 0
    for seed in range(3):
        image = np.random.RandomState(seed).uniform(0, 1, (1, 3, DFL_SIZE, DFL_SIZE)).astype(np.float32)
        output, boxes, probabilities = session.run(None, {"images": image})
        np.testing.assert_allclose(head_boxes(boxes[0], cut_post, (DFL_SIZE, DFL_SIZE)), output[0, :4].T, atol=1e-4)
        theirs = yolov8_detections([output], {}, post, None, (DFL_SIZE, DFL_SIZE))
        ours = yolov8_detections([boxes, probabilities], {cut: boxes, "probabilities": probabilities}, cut_post,
                                 None, (DFL_SIZE, DFL_SIZE))
        assert np.array_equal(ours.labels, theirs.labels) and np.allclose(ours.scores, theirs.scores)
        np.testing.assert_allclose(ours.boxes, theirs.boxes, atol=1e-6)
        compared += len(ours.scores)
    assert compared > 10


def test_a_float16_export_is_read_as_the_float32_model_its_weights_round(tmp_path, mirror):
    """An export stored in float16 (Ultralytics' quantize=16: onnxruntime's converter, float32 inputs and outputs
    behind Casts) is read as the float32 model its weights round: no Cast between the two is left, the outputs
    keep their names, it computes what the file computes (to float16's rounding), init finds its head as in the
    float32 file, and it builds to int8 as a float32 export does."""
    import onnxruntime as ort
    import yaml
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from mzconvert.backends.onnx_float16 import as_float32
    from mzconvert.sources.inspection import inspect_onnx

    stored = tmp_path / "yolo.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(yolov8_dfl_onnx(tmp_path / "yolo32.onnx"))), keep_io_types=True),
              str(stored))
    assert any(i.data_type == TensorProto.FLOAT16 for i in onnx.load(str(stored)).graph.initializer)
    read = as_float32(onnx.load(str(stored)))
    onnx.checker.check_model(read, full_check=True)
    assert "Cast" not in {n.op_type for n in read.graph.node} and [o.name for o in read.graph.output] == ["output0"]
    assert not any(i.data_type == TensorProto.FLOAT16 for i in read.graph.initializer)
    image = np.random.RandomState(0).uniform(0, 1, (1, 3, DFL_SIZE, DFL_SIZE)).astype(np.float32)
    (theirs,), (ours,) = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"images": image})
                          for m in (str(stored), read.SerializeToString()))
    np.testing.assert_allclose(ours, theirs, atol=0.05, rtol=0.01)
    report = inspect_onnx(stored)
    assert report["float16"] and report["dfl_input"] == {"name": "box_logits", "bins": BINS}
    made = run_cli("init", "yolo", "--from", str(stored), "--to", str(tmp_path), "--calibration",
                   str(image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 8)), "--verify",
                   str(image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 4)))
    assert made.returncode == 0, made.stderr
    recipe = yaml.safe_load((tmp_path / "yolo.yaml").read_text())
    assert recipe["strip"]["outputs"] == ["box_logits", "probabilities"]
    recipe["variants"] = [{"name": "float32", "mode": "float32"},
                          {"name": "int8", "mode": "int8", "io_dtype": "float32", "calibration": str(tmp_path / "calib"),
                           "min_matched": 0}]
    recipe.pop("targets", None)
    (tmp_path / "yolo.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "yolo.yaml"), "--out",
                   str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["yolo"]["variants"]["int8"]["verify"]["box_logits"]["sqnr_db"] > 10


@pytest.mark.parametrize("joined_in_view", [True, False])
def test_an_anchor_free_head_transposed_to_yolov5s_layout_is_cut_as_exported_or_refused_not_misread(tmp_path,
                                                                                                  joined_in_view):
    """A YOLOv8 head whose output a deployment script transposed to [1, N, 4 + classes] has YOLOv5's layout: read
    as objectness and classes, every score would be wrong. Where the output is a view of the head's Concat, init
    cuts before it as in the export as Ultralytics writes it (the same recipe); where something else stands
    between (here a Mul), its DFL says it is anchor-free: init refuses it in one line, exit 2, and writes no
    recipe."""
    made = run_cli("init", "yolo", "--from", str(yolov8_dfl_onnx(tmp_path / "yolo.onnx")), "--to", str(tmp_path / "a"))
    assert made.returncode == 0, made.stderr
    model = onnx.load(str(tmp_path / "yolo.onnx"))
    model.graph.node[-1].output[0] = "joined"
    if not joined_in_view:
        model.graph.initializer.append(numpy_helper.from_array(np.array(1, np.float32), "one"))
        model.graph.node.append(helper.make_node("Mul", ["joined", "one"], ["scaled"]))
    model.graph.node.append(helper.make_node("Transpose", ["joined" if joined_in_view else "scaled"], ["output0"],
                                             perm=[0, 2, 1]))
    rows = model.graph.output[0].type.tensor_type.shape.dim
    rows[1].dim_value, rows[2].dim_value = rows[2].dim_value, rows[1].dim_value
    onnx.save(model, str(tmp_path / "transposed.onnx"))
    made = run_cli("init", "yolo", "--from", str(tmp_path / "transposed.onnx"), "--to", str(tmp_path / "r"))
    if joined_in_view:
        assert made.returncode == 0, made.stderr
        exported, transposed = (__import__("yaml").safe_load((tmp_path / folder / "yolo.yaml").read_text())
                                for folder in ("a", "r"))
        assert transposed["postprocess"]["kind"] == "yolov8" and transposed["postprocess"]["box_encoding"] == "dfl"
        for section in ("strip", "postprocess", "preprocess", "variants"):
            assert transposed[section] == exported[section], section
        return
    assert made.returncode == EXIT_BAD_INPUT and not (tmp_path / "r" / "yolo.yaml").exists(), made.stderr
    assert "transposed.onnx: an anchor-free head (a DFL or grid decode) whose output [1, 84, 7] is transposed " \
        "from Ultralytics' [1, 4 + classes, N]" in made.stderr, made.stderr


def test_the_grid_of_a_dfl_head_is_inferred_or_named_when_it_cannot_be():
    from mzconvert.errors import InputError
    from mzconvert.tasks.detection import head_grid

    grid = head_grid((640, 480), 80 * 60 + 40 * 30 + 20 * 15, None)  # P3-P5 of a 640x480 input
    assert grid[0].tolist() == [0.5, 0.5, 8] and grid[80 * 60].tolist() == [0.5, 0.5, 16]
    assert grid[-1].tolist() == [14.5, 19.5, 32]
    with pytest.raises(InputError, match=r"a head of 1000 cells over a 640x480 input: no one run of strides fits"):
        head_grid((640, 480), 1000, None)
    with pytest.raises(InputError, match=r"postprocess.strides \[8, 16\] grid a 64x64 input into 80 cells; the head has 84"):
        head_grid((64, 64), 84, (8, 16))


def test_class_scores_are_judged_where_a_detection_is_shown():
    """8-bit probabilities of a class no verify image holds (a trained detector's rare classes) round to 0 and
    1/256: their slice's SQNR is noise, judged only where either model scores MATCH_SCORE or more. A class
    whose shown scores int8 loses is still caught."""
    from mzconvert.tasks.detection import MATCH_SCORE, judged_outputs
    from mzconvert.tasks.signal import worst_slice

    rng = np.random.RandomState(0)
    reference = rng.exponential(0.002, (8, 1, 3, 500)).astype(np.float32)  # 3 classes, 500 cells, 8 images
    reference[:, 0, 0, :5] = 0.9  # class 0: a few detections
    candidate = np.round(reference * 256) / 256  # LiteRT's int8 sigmoid output
    post = Postprocess(kind="yolov8", labels=("a", "b", "c"), category_ids=(1, 2, 3), box_output="boxes",
                       class_output="scores")
    assert worst_slice(reference, candidate)["sqnr_db"] < 10  # the rare classes' rounding
    judged = judged_outputs("scores", reference, candidate, post, (SIZE, SIZE))
    assert worst_slice(*judged)["sqnr_db"] > 40
    assert np.all(judged[0][reference < MATCH_SCORE] == 0)
    lost = candidate.copy()
    lost[:, 0, 0, :5] = 0.0  # int8 drops class 0's detections
    assert worst_slice(*judged_outputs("scores", reference, lost, post, (SIZE, SIZE)))["sqnr_db"] < 1
    boxes = rng.uniform(0, 300, (8, 1, 4, 500))
    assert np.array_equal(judged_outputs("boxes", boxes, boxes + 1, post, (SIZE, SIZE))[1], boxes + 1)  # as they are
