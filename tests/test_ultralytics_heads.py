"""Real Ultralytics heads beside YOLOv8n's (tests/test_ultralytics.py): YOLO11n's attention blocks, YOLO26n without a
DFL and NMS-free, segmentation, pose and oriented boxes, RT-DETR's query head and YOLOv5n's anchors, each exported
by its package as users export it (the session's `exports`, tests/conftest.py), then init -> build -> ... with the
recipe init writes. The weights are not trained: what is asserted does not depend on training (see
tests/test_ultralytics.py)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from bench.ultralytics_tflite import tflite_exports
from tests.conftest import ROOT, run_cli
from tests.test_ultralytics import (
    TUNE_STEPS,
    built,
    built_without_npu,
    decodes_as_the_export,
    initialised,
    kept,
    proposed,
    rows_of,
)

pytestmark = pytest.mark.slow


def test_a_yolo11n_export_with_attention_blocks_converts_to_the_npu_and_ends_in_nms(exports, tmp_path):
    """YOLO11's C2PSA attention (MatMul, Softmax) through onnx2tf to TFLite and vela; cut where its pixel boxes
    are made, its TFLite ends in TFLite_Detection_PostProcess, which eval reads."""
    path, post = initialised("yolo11n", exports, tmp_path, {"float32-tflite", "int8-tflite"}, cut="pixels")
    where = built(path, post, tmp_path)
    from tests.test_build_real import coco_subset

    evaluated = run_cli("--json", "eval", str(path), "--dataset", str(coco_subset(tmp_path / "coco", 8)), "--variant",
                        "int8-tflite", *where)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["results"]["int8-tflite"]["detections"] > 0


def test_a_yolo26n_export_without_a_dfl_is_cut_before_its_grid_decode_and_goes_to_the_npu(exports, tmp_path):
    """YOLO26 has no DFL (reg_max 1): its box branch gives each side's distance from the cell's centre, which the
    export decodes to pixels. init cuts there (the distances, per level in strides, keep int8 steps a level's
    size; pixels would share one scale over the whole image), the cut decodes to the export's boxes, and its
    TFLite ends in TFLite_Detection_PostProcess with every other op on the NPU."""
    path, post = initialised("yolo26n", exports, tmp_path, {"float32", "float32-tflite", "int8-tflite"},
                             encoding="distances")
    assert post["nms_iou_threshold"] == 0.7  # exported with its one-to-many head: NMS as Ultralytics validates
    built(path, post, tmp_path)
    decodes_as_the_export(path, exports / "yolo26n.onnx", tmp_path)


def test_an_nms_free_yolo26n_export_gives_its_own_top_k_rows_in_float_and_with_attached_nms(exports, tmp_path):
    """Exported end to end (nms=False: [1, 300, 6] rows of x1, y1, x2, y2, score, class out of its own TopK,
    no NMS), init cuts at its head (the distances and class probabilities) and proposes what the export does:
    no box suppresses another (nms_iou_threshold 1.0), the 300 best (box, class) scores. Every row the export
    gives is a detection of our decode, and of the TFLite model ending in TFLite_Detection_PostProcess, with
    its box and score."""
    import numpy as np

    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import postprocessed_detections, yolov8_detections

    path, recipe = proposed("yolo26n-e2e", exports, tmp_path)
    post = recipe["postprocess"]
    assert (post["kind"], post["box_encoding"], post["nms_iou_threshold"], post["max_detections"]) == \
        ("yolov8", "distances", 1.0, 300)
    assert recipe["strip"]["outputs"] == [post["box_output"], post["class_output"]] and post["attach"] is True
    built_without_npu(path, recipe, {"float32", "float32-tflite"}, tmp_path)
    loaded = load_recipe(path)
    names = list(loaded.strip.outputs)
    dist = tmp_path / "dist" / path.stem
    cut = open_model(dist / f"{path.stem}_float32.onnx", names)
    attached = open_model(dist / f"{path.stem}_float32-tflite.tflite")
    height, width = loaded.input.height_width
    compared = 0
    for image, tensor, rows in rows_of(exports / "yolo26n-e2e.onnx", loaded, tmp_path):
        # above the threshold our decode keeps, and above the 300th score (its ties may fall either way)
        rows = rows[(rows[:, 4] > loaded.postprocess.nms_score_threshold) & (rows[:, 4] > rows[:, 4].min())]
        outputs = cut.run(tensor)
        ours = yolov8_detections(outputs, dict(zip(names, outputs)), loaded.postprocess, None, (height, width))
        for detections, op in ((ours, False), (postprocessed_detections(*attached.run(tensor)), True)):
            boxes = detections.boxes[:, [1, 0, 3, 2]] * [width, height, width, height]
            for *box, score, label in rows:
                # (the TFLite model is onnx2tf's port: its scores within 1e-3 of the export's)
                same = (detections.labels == int(label)) & (np.abs(detections.scores - score) < 1e-3)
                assert same.any(), (image, score, label)
                if op:  # the op's coding has no negative size: a box whose sides cross is empty at its centre
                    centre, size = (np.add(box[:2], box[2:]) / 2, np.maximum(np.subtract(box[2:], box[:2]), 0))
                    box = [*(centre - size / 2), *(centre + size / 2)]
                clipped = np.clip(box, 0, [width, height, width, height])  # boxes are clipped to the image
                assert np.abs(boxes[same] - clipped).max(axis=1).min() < 0.05, (image, box)
        compared += len(rows)
    assert compared > 100


@pytest.mark.parametrize("model", ["yolov8n-seg", "yolov8n-pose", "yolov8n-obb"])
def test_a_segment_pose_or_obb_export_ending_in_its_own_nms_is_cut_at_its_head(model, exports, tmp_path):
    """Exported with nms=True (rows of box, score, class and the head's more per box out of its own NMS; an obb
    head's rotated NMS ends in a TopK), init proposes what it proposes for the plain export (used to be task
    other on the NMS rows): the same cut, before the DFL and the head's Concat (a segment head's prototypes
    kept), the same postprocess. Every row the export's NMS keeps (score >= 0.25, its threshold) is a (box, class)
    pair of our decode of that cut, with its box and score."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.tasks.detection import raw_detections
    from mzconvert.tasks.oriented import probiou

    (tmp_path / "plain").mkdir()
    _, plain = proposed(model, exports, tmp_path / "plain")
    path, recipe = proposed(f"{model}-nms", exports, tmp_path)
    assert recipe["task"] == "detection" and len(recipe["strip"]["outputs"]) == len(plain["strip"]["outputs"])
    tensors = {"box_output", "class_output", "mask_coefficients", "keypoints", "angles"}  # named inside its wrapper
    assert {key: value for key, value in recipe["postprocess"].items() if key not in tensors} == \
        {key: value for key, value in plain["postprocess"].items() if key not in tensors}
    assert set(recipe["postprocess"]) & tensors == set(plain["postprocess"]) & tensors
    loaded = load_recipe(path)
    names = list(loaded.strip.outputs)
    graph = onnx.load(str(exports / f"{model}-nms.onnx"))
    known = {o.name for o in graph.graph.output}
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names if name not in known)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    every_pair = replace(loaded.postprocess, nms_score_threshold=0.25, nms_iou_threshold=1.0, max_detections=10 ** 5)
    compared = 0
    for image in sorted((tmp_path / "check").iterdir()):
        values = dict(zip([o.name for o in session.get_outputs()],
                          session.run(None, {"images": prepare(image, loaded.preprocess, loaded.input).tensor})))
        ours = raw_detections([values[name] for name in names], names, every_pair, None, (320, 320))
        for row in values["output0"][0]:
            if row[4] < every_pair.nms_score_threshold:  # (the export's rows below its threshold are padding)
                continue
            same = np.flatnonzero((ours.labels == int(row[5])) & (np.abs(ours.scores - row[4]) < 1e-4))
            assert same.size, (image.name, row[:6])
            if ours.rotated is not None:  # x, y, w, h, score, class, angle
                assert probiou(ours.rotated[same], row[[0, 1, 2, 3, 6]]).max() > 0.999, (image.name, row)
            else:  # x1, y1, x2, y2 in input pixels (ours clipped to the input)
                box = np.clip(np.array([row[1], row[0], row[3], row[2]]) / 320, 0, 1)
                assert np.abs(ours.boxes[same] - box).max(axis=1).min() < 1e-4, (image.name, row)
            compared += 1
    assert compared > 0, compared


def test_an_obb_export_is_built_as_the_oriented_box_detector_it_is(exports, tmp_path):
    """An obb export's output0 joins its boxes (centre and size in input pixels, rotated by dist2rbox), class
    probabilities and each box's angle (radians): init proposes the detector, cut before its DFL and that Concat,
    the angles an output of their own and no NMS attached (its op's boxes are axis-aligned). Our decode of the cut
    gives, for every box it keeps, the export's own rotated box, angle and score, and (of each box's best class)
    the very detections Ultralytics' own predictor gives (its NMS by probiou); predict draws them; eval scores
    them against oriented annotations."""
    import numpy as np
    import onnxruntime as ort

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import on_image, yolov8_detections
    from mzconvert.tasks.oriented import probiou, rotated_corners

    path, recipe = proposed("yolov8n-obb", exports, tmp_path)
    post, outputs = recipe["postprocess"], recipe["strip"]["outputs"]
    assert recipe["task"] == "detection" and post["kind"] == "yolov8" and post["box_encoding"] == "dfl"
    assert outputs == [post["box_output"], post["class_output"], post["angles"]] and "attach" not in post
    built_without_npu(path, recipe, {"float32"}, tmp_path)
    loaded = load_recipe(path)
    cut = open_model(tmp_path / "dist" / path.stem / f"{path.stem}_float32.onnx", outputs)
    whole = ort.InferenceSession(str(exports / "yolov8n-obb.onnx"), providers=["CPUExecutionProvider"])
    compared = 0
    for image in sorted((tmp_path / "check").iterdir()):
        tensor = prepare(image, loaded.preprocess, loaded.input).tensor
        theirs = whole.run(None, {"images": tensor})[0][0]  # [4 + classes + 1, N]
        ours = cut.run(tensor)
        found = yolov8_detections(ours, dict(zip(outputs, ours)), loaded.postprocess, None, (320, 320))
        for rotated, score, label, cell in zip(found.rotated, found.scores, found.labels, found.cells):
            np.testing.assert_allclose(rotated[:4], theirs[:4, cell], atol=1e-3)
            assert abs(rotated[4] - theirs[-1, cell]) < 1e-5 and abs(score - theirs[4 + label, cell]) < 1e-5
        compared += len(found.cells)
    assert compared > 50
    predicted = 0  # each box's best class only, as its predictor keeps them: then the very same detections
    for name, theirs, ours in as_ultralytics_predicts(path, exports / "yolov8n-obb.onnx", "obb", tmp_path, True):
        pairs = ours_among(theirs, ours)
        assert len(pairs) == len(theirs["scores"]) == len(ours.scores), (name, len(pairs), len(ours.scores))
        for i, k in pairs:  # their angles are regularised (the longer side the width, in [0, pi)): the same box
            assert probiou(ours.rotated[k], theirs["rotated"][i]) > 0.999, (name, ours.rotated[k], theirs["rotated"][i])
        predicted += len(pairs)
    assert predicted > 50, predicted
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    drawn = run_cli("predict", str(path), str(image), *where)
    assert drawn.returncode == 0 and Path(drawn.stdout.strip()).is_file(), drawn.stderr[-2000:]
    # eval on oriented annotations (DOTA's layout) of the float model's own rotated boxes: it finds them all,
    # through predict's path (the letterbox undone, each box's polygon scored), so AP 1 less what rasterises
    dota = tmp_path / "dota"
    for folder in ("images", "labelTxt"):
        (dota / folder).mkdir(parents=True)
    objects = 0
    for image in sorted((tmp_path / "check").iterdir())[:4]:
        prepared = prepare(image, loaded.preprocess, loaded.input)
        ours = cut.run(prepared.tensor)
        found = on_image(yolov8_detections(ours, dict(zip(outputs, ours)), loaded.postprocess, None, (320, 320)),
                         prepared.original_size, loaded.preprocess)
        shown = found.scores >= 0.3
        (dota / "images" / image.name).write_bytes(image.read_bytes())
        (dota / "labelTxt" / f"{image.stem}.txt").write_text("".join(
            " ".join(f"{v:.1f}" for v in corners.ravel()) + f" {loaded.postprocess.labels[label]} 0\n"
            for corners, label in zip(rotated_corners(found.rotated[shown]), found.labels[shown])))
        objects += int(shown.sum())
    assert objects > 10, objects
    evaluated = run_cli("--json", "eval", str(path), "--dataset", str(dota), *where)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    evaluation = json.loads(evaluated.stdout)
    assert evaluation["scope"].startswith("oriented-box AP"), evaluation["scope"]
    assert evaluation["results"]["float32"]["AP50"] > 0.95 and evaluation["results"]["float32"]["AP"] > 0.8, \
        evaluation["results"]["float32"]


def test_an_rtdetr_export_is_cut_at_its_query_head_and_decodes_to_its_own_rows(exports, tmp_path):
    """RT-DETR's export ends in its own TopK of (query, class) scores: [1, 300, 6] rows of box (centre and size
    normalised), score and class, which init used to take for a YOLOv5 head of one class. Now init cuts at its
    query head (each query's box and class probabilities: kind detr, nothing suppressed, the 300 best pairs),
    preprocesses as Ultralytics' RT-DETR predictor does (the image stretched, no letterbox) and proposes ONNX
    variants only (onnx2tf fails on its decoder). Every row the export gives is a detection of our decode of the
    cut, with its box and score; the recipe builds, evaluates and predicts as written. No YOLO export is read as
    a query head."""
    import numpy as np

    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.sources.inspection import inspect_onnx
    from mzconvert.tasks.detection import detr_detections
    from tests.test_build_real import coco_subset

    for model in ("yolov8n", "yolov5n", "yolo26n-e2e", "yolov8n-seg", "yolov8n-pose", "yolov8n-obb"):
        assert "query_head" not in inspect_onnx(exports / f"{model}.onnx"), model
    path, recipe = proposed("rtdetr-l", exports, tmp_path)
    post = recipe["postprocess"]
    assert recipe["task"] == "detection" and post["kind"] == "detr" and len(post["labels"]) == 80
    assert (post["nms_iou_threshold"], post["max_detections"]) == (1.0, 300)
    assert recipe["strip"]["outputs"] == [post["box_output"], post["class_output"]]
    assert "letterbox" not in recipe["preprocess"] and "targets" not in recipe
    assert [v["name"] for v in recipe["variants"]] == ["float32", "int8"]
    built_without_npu(path, recipe, {"float32"}, tmp_path)
    loaded = load_recipe(path)
    names = list(loaded.strip.outputs)
    cut = open_model(tmp_path / "dist" / path.stem / f"{path.stem}_float32.onnx", names)
    compared = 0
    for image, tensor, rows in rows_of(exports / "rtdetr-l.onnx", loaded, tmp_path):
        outputs = cut.run(tensor)
        ours = detr_detections(outputs, dict(zip(names, outputs)), loaded.postprocess, None, (320, 320))
        assert len(ours.scores) == len(rows) == 300
        for x, y, w, h, score, label in rows[rows[:, 4] > rows[:, 4].min()]:  # the 300th's ties may fall either way
            same = (ours.labels == int(label)) & (np.abs(ours.scores - score) < 1e-5)
            box = np.clip([y - h / 2, x - w / 2, y + h / 2, x + w / 2], 0, 1)  # ours are clipped to the image
            assert same.any() and np.abs(ours.boxes[same] - box).max(axis=1).min() < 1e-4, (image, score, label)
            compared += 1
    assert compared > 800
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    evaluated = run_cli("eval", str(path), "--dataset", str(coco_subset(tmp_path / "coco", 4)), *where)
    assert evaluated.returncode == 0 and "COCO bbox AP" in evaluated.stdout, evaluated.stderr[-2000:]
    drawn = run_cli("predict", str(path), str(sorted((tmp_path / "check").iterdir())[0]), *where)
    assert drawn.returncode == 0 and Path(drawn.stdout.strip()).is_file(), drawn.stderr[-2000:]


@pytest.mark.parametrize("model", ["yolov8n-seg", "yolov8n-pose"])
def test_a_segment_or_pose_export_is_built_as_the_detector_it_is_its_extra_parts_outputs_of_their_own(model, exports,
                                                                                                    tmp_path):
    """A segment (pose) export's output0 concatenates boxes, class probabilities and mask coefficients (keypoints,
    decoded to pixels and visibilities): init proposes the detector, cut before the DFL and that Concat, each
    extra part an output of its own (the keypoints before their decode), a segment head's prototypes too, and no
    NMS attached (its op's outputs would replace them). The cut decodes to the export's boxes and probabilities,
    the extra part (as Ultralytics decodes keypoints) to the export's own, and its detections are drawn; the
    pose model's int8 has every output, and every op on the NPU."""
    import numpy as np
    import onnxruntime as ort

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import head_boxes

    path, recipe = proposed(model, exports, tmp_path)
    post, outputs = recipe["postprocess"], recipe["strip"]["outputs"]
    assert recipe["task"] == "detection" and post["kind"] == "yolov8" and post["box_encoding"] == "dfl"
    assert "attach" not in post and outputs[:2] == [post["box_output"], post["class_output"]]
    if model.endswith("seg"):
        assert len(outputs) == 4 and outputs[3] == "output1" and len(post["labels"]) == 80
        assert (post["mask_coefficients"], post["mask_prototypes"]) == tuple(outputs[2:])
    else:  # one class, named as COCO's person: scored as that category
        assert len(outputs) == 3 and post["labels"] == ["person"] and post["category_ids"] == [1]
        assert (post["keypoints"], post["keypoint_shape"], post["keypoint_encoding"]) == (outputs[2], [17, 3], "grid")
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    if model.endswith("seg"):  # its float model only: the int8 route is the pose model's, below
        built_without_npu(path, recipe, {"float32"}, tmp_path)
    else:
        kept(path, recipe, {"float32", "int8-tflite"})
        done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(path), *where)
        assert done.returncode == 0, done.stderr[-3000:]
        int8 = json.loads(done.stdout)[path.stem]["variants"]["int8-tflite"]
        assert set(outputs) <= set(int8["verify"]) and not int8["postprocess_attached"], int8["verify"]
        assert int8["tuned"]["steps"] == TUNE_STEPS and "not_run" not in int8["tuned"], int8["tuned"]  # every op
        (npu,) = int8["vela"].values()
        assert npu["cpu_op_count"] == 0 and npu["npu_ops"] > 100, npu

    loaded = load_recipe(path)
    cut = open_model(tmp_path / "dist" / path.stem / f"{path.stem}_float32.onnx", outputs)
    whole = ort.InferenceSession(str(exports / f"{model}.onnx"), providers=["CPUExecutionProvider"])
    for image in sorted((tmp_path / "check").iterdir())[:3]:
        tensor = prepare(image, loaded.preprocess, loaded.input).tensor
        theirs = whole.run(None, {"images": tensor})
        logits, probabilities, extra, *prototypes = cut.run(tensor)
        classes = len(post["labels"])
        np.testing.assert_allclose(head_boxes(logits[0], loaded.postprocess, (320, 320)), theirs[0][0, :4].T, atol=1e-3)
        np.testing.assert_allclose(probabilities[0], theirs[0][0, 4:4 + classes], atol=1e-6)
        if prototypes:  # mask coefficients as they are, and the prototypes
            np.testing.assert_allclose(extra[0], theirs[0][0, 4 + classes:], atol=1e-5)
            np.testing.assert_allclose(prototypes[0], theirs[1], atol=1e-5)
        else:  # keypoints, decoded here as the export decodes them
            np.testing.assert_allclose(keypoints_decoded(extra[0], loaded.postprocess, (320, 320)),
                                       theirs[0][0, 4 + classes:], atol=1e-3)
    drawn = run_cli("predict", str(path), str(image), "--variant", "float32", *where)
    assert drawn.returncode == 0 and Path(drawn.stdout.strip()).is_file(), drawn.stderr[-2000:]
    if model.endswith("seg"):
        masks_as_ultralytics_predicts_them(path, exports, tmp_path)
        from tests.test_build_real import coco_subset

        dataset = coco_subset(tmp_path / "coco", 8)  # the route: boxes and masks scored (untrained: AP near 0)
        evaluated = run_cli("eval", str(path), "--dataset", str(dataset), "--variant", "float32", *where)
        assert evaluated.returncode == 0, evaluated.stderr[-2000:]
        assert "masks (COCO segm AP" in evaluated.stdout, evaluated.stdout
        (written,) = (tmp_path / "dist" / path.stem / "eval").glob("*.json")
        results = json.loads(written.read_text())["results"]
        assert {"AP", "mask_AP", "mask_AP50", "mask_ratio_interval"} <= set(results["float32"]), results
    else:  # COCO's instances files give no keypoints: its boxes are scored, and eval says what is not
        from tests.test_build_real import coco_subset

        dataset = coco_subset(tmp_path / "coco", 4)
        evaluated = run_cli("eval", str(path), "--dataset", str(dataset), "--variant", "float32", *where)
        assert evaluated.returncode == 0 and "keypoints not scored" in evaluated.stderr, evaluated.stderr[-2000:]


def test_a_pose_tflite_export_is_cut_before_its_keypoint_decode_as_its_onnx_export_is(exports, tmp_path):
    """onnx2tf's port of a pose export, with Ultralytics' metadata.json: init finds its keypoints' decode in the
    .tflite too and cuts before it; the cut decodes to the file's own keypoints."""
    import numpy as np

    from mzconvert.layout import built_stage_model
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import TFLiteRunner


    user = tflite_exports(exports / "yolov8n-pose.onnx", tmp_path / "export")["float32"]
    (tmp_path / "pose.tflite").write_bytes(user.read_bytes())
    path, recipe = proposed("pose", tmp_path, tmp_path, suffix=".tflite")
    outputs = recipe["strip"]["outputs"]
    assert recipe["task"] == "detection" and len(outputs) == 3 and "attach" not in recipe["postprocess"]
    built_without_npu(path, recipe, {"float32"}, tmp_path)
    loaded = load_recipe(path)
    cut = TFLiteRunner(built_stage_model(tmp_path / "build", loaded, "strip"), outputs)
    whole = TFLiteRunner(user)
    for image in sorted((tmp_path / "check").iterdir())[:3]:
        tensor = prepare(image, loaded.preprocess, loaded.input).tensor
        (theirs,) = whole.run(tensor)
        raw = cut.run(tensor)[2]
        np.testing.assert_allclose(keypoints_decoded(raw[0], loaded.postprocess, loaded.input.height_width),
                                   theirs[0, 5:], atol=2e-3)


def test_a_yolov5n_export_goes_init_build_eval_predict_vela(exports, tmp_path):
    """YOLOv5 (anchors, objectness; the `yolov5` package's graph): init cuts at its head's three Convs, each split
    into box and score channels (an int8 scale for each), decoded here as the export decodes them; every op of
    its int8 TFLite on the NPU."""
    import numpy as np
    import onnxruntime as ort

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import level_boxes, level_scores

    path, recipe = proposed("yolov5n", exports, tmp_path)
    post = recipe["postprocess"]
    assert recipe["task"] == "detection" and recipe["preprocess"]["letterbox"] is True
    assert post["kind"] == "yolov5" and len(post["labels"]) == 80 and post["labels"][0] == "person"
    assert post["category_ids"][-1] == 90  # COCO names: COCO's category ids
    # the anchors of YOLOv5's model YAML, read from the exported graph's constants
    assert [(level["stride"], level["anchors"][:2]) for level in post["levels"]] == [(8, [10, 13]), (16, [30, 61]),
                                                                                     (32, [116, 90])]
    kept(path, recipe, {"float32", "float32-tflite", "int8-tflite"})
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(path), *where)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout)[path.stem]["variants"]
    loaded = load_recipe(path)
    parts = [part for level in loaded.postprocess.levels for part in level.parts]
    assert all(variants["float32-tflite"]["verify"][part]["sqnr_db"] > 60 for part in parts)  # onnx2tf's port
    int8 = variants["int8-tflite"]["verify"]
    assert all(int8[level.parts[0]]["worst_slice"]["of"] == 4 for level in loaded.postprocess.levels), int8
    (npu,) = variants["int8-tflite"]["vela"].values()
    assert npu["cpu_op_count"] == 0 and npu["npu_ops"] > 100, npu
    # the float32 model's split logits, decoded here, are the export's own rows
    cut = open_model(tmp_path / "dist" / "yolov5n" / "yolov5n_float32.onnx", parts)
    whole = ort.InferenceSession(str(exports / "yolov5n.onnx"), providers=["CPUExecutionProvider"])
    for image in sorted((tmp_path / "check").iterdir())[:3]:
        tensor = prepare(image, loaded.preprocess, loaded.input).tensor
        theirs = whole.run(None, {"images": tensor})[0][0]
        outputs = dict(zip(parts, cut.run(tensor)))
        size = loaded.input.height_width
        levels = loaded.postprocess.levels
        np.testing.assert_allclose(np.concatenate([level_boxes(outputs[lv.parts[0]], lv, size) for lv in levels]),
                                   theirs[:, :4], atol=1e-3)
        np.testing.assert_allclose(np.concatenate([level_scores(outputs[lv.parts[1]], lv, size) for lv in levels]),
                                   theirs[:, 4:], atol=1e-5)
    from tests.test_build_real import coco_subset

    evaluated = run_cli("--json", "eval", str(path), "--dataset", str(coco_subset(tmp_path / "coco", 8)), "--variant",
                        "int8-tflite", *where)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["results"]["int8-tflite"]["detections"] > 0
    drawn = run_cli("predict", str(path), str(sorted((tmp_path / "check").iterdir())[0]), "--variant", "int8-tflite",
                    *where)
    assert drawn.returncode == 0 and Path(drawn.stdout.strip()).is_file(), drawn.stderr[-2000:]


def as_ultralytics_predicts(path: Path, export: Path, task: str, tmp_path: Path, best_class_only: bool = False):
    """For each verify image, letterboxed to the model's input and saved (Ultralytics' predictor then letterboxes
    it to itself: both read the same pixels): its name, what Ultralytics' own predictor finds in it (conf 0.25,
    tests/ultralytics_predict.py: scores, classes, and the segment head's masks or the obb head's rotated boxes)
    and our detections of the built float32 (threshold 0.25, on the image); `best_class_only`: of each box's best
    class only, as its predictor keeps them (every other class's probability set to 0)."""
    import numpy as np
    from PIL import Image

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import on_image, raw_detections

    recipe = load_recipe(path)
    post = replace(recipe.postprocess, nms_score_threshold=0.25, max_detections=300)
    inputs = tmp_path / "letterboxed"
    inputs.mkdir()
    for image in sorted((tmp_path / "check").iterdir()):
        tensor = prepare(image, recipe.preprocess, recipe.input).tensor
        Image.fromarray(np.rint(tensor[0].transpose(1, 2, 0) * 255).astype(np.uint8)).save(inputs / f"{image.stem}.png")
    python = Path(os.environ.get("ULTRALYTICS_PYTHON", ROOT / ".venv-ultralytics" / "bin" / "python"))
    done = subprocess.run([str(python), str(ROOT / "tests" / "ultralytics_predict.py"), str(export), task,
                           *map(str, sorted(inputs.glob("*.png")))], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"YOLO_OFFLINE": "true", "YOLO_CONFIG_DIR": str(tmp_path / "settings")})
    assert done.returncode == 0, done.stderr[-3000:]
    names = list(recipe.strip.outputs)
    run = open_model(tmp_path / "dist" / path.stem / f"{path.stem}_float32.onnx", names).run
    for image in sorted(inputs.glob("*.png")):
        outputs = run(prepare(image, recipe.preprocess, recipe.input).tensor)
        if best_class_only:
            scores = outputs[names.index(post.class_output)]
            outputs[names.index(post.class_output)] = np.where(scores == scores.max(axis=1, keepdims=True), scores, 0)
        ours = on_image(raw_detections(outputs, names, post, None, (320, 320)), (320, 320), recipe.preprocess)
        yield image.name, np.load(image.with_suffix(".npz")), ours


def ours_among(theirs, ours) -> list[tuple[int, int]]:
    """(i, k): each of Ultralytics' detections i found among ours (k) by class and score. Its NMS keeps each box's
    best class, ours every (box, class) pair (a box whose best class is another's second can be suppressed in
    ours), so not every one of theirs need be found."""
    import numpy as np

    found = []
    for i, (score, label) in enumerate(zip(theirs["scores"], theirs["classes"])):
        distance = np.where(ours.labels == label, np.abs(ours.scores - score), np.inf)
        if distance[k := int(np.argmin(distance))] < 1e-5:
            found.append((i, k))
    return found


def masks_as_ultralytics_predicts_them(path: Path, exports: Path, tmp_path: Path) -> None:
    """Our masks of the built float32 equal those of Ultralytics' own predictor on the export: its detections
    found among ours (on these images 200 of 378), each mask equal."""
    import numpy as np

    compared = 0
    for name, theirs, ours in as_ultralytics_predicts(path, exports / "yolov8n-seg.onnx", "segment", tmp_path):
        for i, k in ours_among(theirs, ours):
            np.testing.assert_array_equal(ours.masks.on_image(k), theirs["masks"][i], err_msg=f"{name} detection {k}")
            compared += 1
    assert compared >= 50, compared


def keypoints_decoded(raw, post, input_hw: tuple[int, int]):
    """A pose head's raw keypoints of one image, [points x values, N], decoded by the recipe's postprocess (every
    cell's) as the export lays its own out: [points x values, N], x and y in input pixels."""
    import numpy as np

    from mzconvert.tasks.detection import head_grid
    from mzconvert.tasks.keypoints import decoded_keypoints

    count = raw.shape[-1]
    decoded = decoded_keypoints(raw, post.keypoint_shape, post.keypoint_encoding, head_grid(input_hw, count, None),
                                np.arange(count), input_hw)
    decoded[..., :2] *= np.array(input_hw[::-1])
    return decoded.reshape(count, -1).T
