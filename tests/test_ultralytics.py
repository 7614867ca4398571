"""Real Ultralytics detectors: YOLOv8n and YOLO11n built by the `ultralytics` package, YOLOv5n by the `yolov5`
package, from their model YAML and exported to ONNX as users export them (tests/ultralytics_export.py,
tests/yolov5_export.py, in the packages' own environment, made by `make ultralytics-env`), then init -> build ->
eval -> predict -> vela with the recipe init writes.

The weights are not trained (none can be had here; see the export script): the graph's ops, layout and
metadata are Ultralytics', and what is asserted is what does not depend on training: the recipe init
proposes, a TFLite port that computes what the export computes, an int8 model whose boxes keep their
resolution, and every op but the attached NMS on the NPU. Untrained class scores are near-ties among 80 classes, so int8's
detections matched are no measure of a trained model's; the test lowers those floors and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from bench.ultralytics_tflite import tflite_exports
from tests.conftest import MIRROR, ROOT, image_folder, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> Path:
    if not MIRROR.is_dir():
        pytest.skip(f"the real-data mirror {MIRROR} is not on this machine")
    python = Path(os.environ.get("ULTRALYTICS_PYTHON", ROOT / ".venv-ultralytics" / "bin" / "python"))
    if not python.is_file():
        pytest.fail(f"{python}: the Ultralytics tool environment is missing: run `make ultralytics-env`")
    folder = tmp_path_factory.mktemp("ultralytics")
    env = os.environ | {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "false",
                        "YOLO_CONFIG_DIR": str(folder / "settings")}
    for script, config, *options in (("ultralytics_export.py", "yolov8n.yaml", "--nms", "--opset", "12", "--dynamic"),
                                     ("ultralytics_export.py", "yolo11n.yaml"),
                                     ("ultralytics_export.py", "yolo26n.yaml", "--end2end"),
                                     ("ultralytics_export.py", "yolov8n-seg.yaml", "--nms"),
                                     ("ultralytics_export.py", "yolov8n-pose.yaml", "--nms"),
                                     ("ultralytics_export.py", "yolov8n-obb.yaml", "--nms"),
                                     ("ultralytics_export.py", "rtdetr-l.yaml"),
                                     ("yolov5_export.py", "yolov5n.yaml")):
        done = subprocess.run([str(python), str(ROOT / "tests" / script), config, str(MIRROR / "coco" / "train2017"),
                               *options], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return folder


def proposed(model: str, exports: Path, tmp_path: Path, suffix: str = ".onnx") -> tuple[Path, dict]:
    """The recipe `mzconvert init` writes for the export (calibration: train images; verify: val images)."""
    folders = {role: image_folder(tmp_path / role, MIRROR / "coco" / split, count)
               for role, split, count in (("calib", "train2017", 16), ("check", "val2017", 8))}
    made = run_cli("init", model, "--from", str(exports / f"{model}{suffix}"), "--to", str(tmp_path), "--calibration",
                   str(folders["calib"]), "--verify", str(folders["check"]))
    assert made.returncode == 0, made.stderr
    path = tmp_path / f"{model}.yaml"
    return path, yaml.safe_load(path.read_text())


def kept(path: Path, recipe: dict, variants: set[str]) -> None:
    """The recipe with only `variants` of those init proposes, its int8 floors lowered (untrained scores: see the
    module's docstring)."""
    assert variants <= {v["name"] for v in recipe["variants"]}, recipe["variants"]
    recipe["variants"] = [v for v in recipe["variants"] if v["name"] in variants]
    for variant in recipe["variants"]:
        if variant["mode"] == "int8":
            variant.update(min_matched=0, min_mask_iou=0, min_keypoint_oks=0, min_slice_sqnr_db=-100)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def built_without_npu(path: Path, recipe: dict, variants: set[str], tmp_path: Path) -> dict:
    """The recipe `kept` with `variants` and no NPU target, built: its variants' build report."""
    recipe.pop("targets", None)
    kept(path, recipe, variants)
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(path), "--out", str(tmp_path / "dist"),
                   "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)[path.stem]["variants"]


def rows_of(export: Path, recipe, tmp_path: Path):
    """For each verify image: its name, the tensor the recipe's preprocessing makes of it and the rows the export
    ends in (its own selection of detections: box, score, class)."""
    import onnxruntime as ort

    from mzconvert.preprocess import prepare

    whole = ort.InferenceSession(str(export), providers=["CPUExecutionProvider"])
    for image in sorted((tmp_path / "check").iterdir()):
        tensor = prepare(image, recipe.preprocess, recipe.input).tensor
        yield image.name, tensor, whole.run(None, {whole.get_inputs()[0].name: tensor})[0][0]


def initialised(model: str, exports: Path, tmp_path: Path, variants: set[str], cut: str = "dfl",
                encoding: str = "dfl") -> tuple[Path, dict]:
    """init's recipe for a YOLOv8 / YOLO11 export (cut before the head's DFL, its TFLite variants ending in
    TFLite_Detection_PostProcess; a YOLO26's, `encoding` distances, before its grid decode), `kept`; with `cut`
    pixels cut instead where the export's pixel boxes are made."""
    path, recipe = proposed(model, exports, tmp_path)
    post = recipe["postprocess"]
    assert recipe["task"] == "detection" and recipe["input"]["shape"] == [1, 3, 320, 320]
    assert post["kind"] == "yolov8" and len(post["labels"]) == 80  # names from the export's metadata
    assert recipe["strip"]["outputs"] == [post["box_output"], post["class_output"]]  # cut before the Concat
    assert post["box_encoding"] == encoding  # and the box branch before its DFL (or grid decode)
    assert post["attach"] is True
    assert recipe["preprocess"]["letterbox"] is True
    if cut == "pixels":
        from mzconvert.sources.inspection import inspect_onnx

        pixels = inspect_onnx(exports / f"{model}.onnx")["concat_outputs"]["output0"][0]["name"]
        recipe["strip"]["outputs"][0] = post["box_output"] = pixels
        post.pop("box_encoding")
    kept(path, recipe, variants)
    return path, post


def built(path: Path, post: dict, tmp_path: Path) -> list[str]:
    """Build the recipe and check what does not depend on training; the folder options used. Attached
    post-processing leaves its box encodings' float ops and the op itself on the CPU (tests/test_yolo.py)."""
    from tests.test_yolo import ATTACHED_HEADS

    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(path), *where)
    assert done.returncode == 0, done.stderr[-3000:]
    variants = json.loads(done.stdout)[path.stem]["variants"]
    port = variants["float32-tflite"]["verify"]  # onnx2tf's port, converted: what the export computes
    assert port[post["box_output"]]["sqnr_db"] > 60 and port[post["class_output"]]["sqnr_db"] > 60, port
    int8 = variants["int8-tflite"]["verify"]
    assert int8[post["box_output"]]["worst_slice"]["sqnr_db"] > 15, int8
    (npu,) = variants["int8-tflite"]["vela"].values()
    assert npu["cpu_op_count"] == ATTACHED_HEADS[post.get("box_encoding", "pixels")][-1] and npu["npu_ops"] > 100, npu
    assert variants["int8-tflite"]["postprocess_attached"]
    return where


def test_a_yolov8n_export_goes_init_build_eval_predict_vela(exports, tmp_path):
    path, post = initialised("yolov8n", exports, tmp_path, {"float32", "float32-tflite", "int8-tflite"})
    where = built(path, post, tmp_path)
    decodes_as_the_export(path, exports / "yolov8n.onnx", tmp_path)
    from tests.test_build_real import coco_subset

    dataset = coco_subset(tmp_path / "coco", 24)  # the route, not the untrained weights' AP, is under test
    evaluated = run_cli("--json", "eval", str(path), "--dataset", str(dataset), "--variant", "float32-tflite", *where)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads(evaluated.stdout)["results"]
    assert results["float32-tflite"]["detections"] > 0, results
    drawn = run_cli("predict", str(path), str(sorted((tmp_path / "check").iterdir())[0]), "--variant",
                    "float32-tflite", *where)
    assert drawn.returncode == 0 and Path(drawn.stdout.strip()).is_file(), drawn.stderr[-2000:]


def decodes_as_the_export(path: Path, export: Path, tmp_path: Path) -> None:
    """The built float32 model's box branch, decoded here (DFL or distances, grid, strides), gives the export's
    own boxes."""
    import numpy as np
    import onnxruntime as ort

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import head_boxes

    recipe = load_recipe(path)
    cut = open_model(tmp_path / "dist" / path.stem / f"{path.stem}_float32.onnx", list(recipe.strip.outputs))
    whole = ort.InferenceSession(str(export), providers=["CPUExecutionProvider"])
    for image in sorted((tmp_path / "check").iterdir())[:3]:
        tensor = prepare(image, recipe.preprocess, recipe.input).tensor
        theirs = whole.run(None, {whole.get_inputs()[0].name: tensor})[0][0]
        logits, probabilities = cut.run(tensor)
        boxes = head_boxes(logits[0], recipe.postprocess, recipe.input.height_width)
        np.testing.assert_allclose(boxes, theirs[:4].T, atol=1e-3)
        np.testing.assert_allclose(probabilities.reshape(theirs[4:].shape), theirs[4:], atol=1e-6)


def test_an_opset_12_export_is_cut_before_its_dfl_as_a_later_opset_export_is(exports, tmp_path):
    """Before opset 13 an ONNX Softmax works on the last axis only, so the export puts a Transpose between the
    DFL's Softmax and its Conv: init still finds the DFL (not only the pixel boxes after it), and the cut computes
    the export's boxes, in ONNX and in its TFLite port."""
    import onnx

    assert {o.version for o in onnx.load(str(exports / "yolov8n-opset12.onnx")).opset_import} == {12}
    path, recipe = proposed("yolov8n-opset12", exports, tmp_path)
    post = recipe["postprocess"]
    assert post["kind"] == "yolov8" and post["box_encoding"] == "dfl"
    assert recipe["strip"]["outputs"] == [post["box_output"], post["class_output"]]
    port = built_without_npu(path, recipe, {"float32", "float32-tflite"}, tmp_path)["float32-tflite"]["verify"]
    assert port[post["box_output"]]["sqnr_db"] > 60 and port[post["class_output"]]["sqnr_db"] > 60, port
    decodes_as_the_export(path, exports / "yolov8n-opset12.onnx", tmp_path)


def test_a_dynamic_export_is_built_at_the_size_it_was_exported_at_and_decodes_as_the_export(exports, tmp_path):
    """Exported with dynamic=True (batch, height and width dynamic) at a size that is not square: init fixes the
    input at the size its metadata says, letterboxed into it, and cuts before the DFL as for a fixed export; the
    cut gives the export's boxes at that size, in ONNX and in its TFLite port."""
    path, recipe = proposed("yolov8n-dynamic", exports, tmp_path)
    post = recipe["postprocess"]
    assert recipe["input"]["shape"] == [1, 3, 256, 320] and recipe["preprocess"]["resize"] == [256, 320]
    assert recipe["preprocess"]["letterbox"] and post["box_encoding"] == "dfl"
    port = built_without_npu(path, recipe, {"float32", "float32-tflite"}, tmp_path)["float32-tflite"]["verify"]
    assert port[post["box_output"]]["sqnr_db"] > 60 and port[post["class_output"]]["sqnr_db"] > 60, port
    decodes_as_the_export(path, exports / "yolov8n-dynamic.onnx", tmp_path)


def test_a_yolov8n_export_ending_in_its_own_nms_is_cut_before_it_and_decodes_to_its_detections(exports, tmp_path):
    """Exported with nms=True (rows of box, score and class out of the graph's own NonMaxSuppression): init cuts
    where it cuts the plain export (before the DFL), and every detection the export's own NMS keeps is a box and
    class score our decode of the cut gives. (Which of them NMS keeps differs: the export keeps each box's best
    class, as Ultralytics predicts, ours every class above the threshold, as it validates; on a YOLOv8n trained
    here, 98.5 % of 593 detections on 105 images the same, docs/results.md.)"""
    import numpy as np

    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import MATCH_SCORE, dfl_boxes

    path, recipe = proposed("yolov8n-nms", exports, tmp_path)
    post = recipe["postprocess"]
    assert post["kind"] == "yolov8" and post["box_encoding"] == "dfl" and len(post["labels"]) == 80
    assert recipe["strip"]["outputs"] == [post["box_output"], post["class_output"]]
    built_without_npu(path, recipe, {"float32"}, tmp_path)  # the float model is what is compared with the export
    loaded = load_recipe(path)
    names = list(loaded.strip.outputs)
    cut = open_model(tmp_path / "dist" / path.stem / f"{path.stem}_float32.onnx", names)
    height, width = loaded.input.height_width
    compared = 0
    for _, tensor, rows in rows_of(exports / "yolov8n-nms.onnx", loaded, tmp_path):
        rows = rows[rows[:, 4] >= MATCH_SCORE]
        logits, probabilities = cut.run(tensor)
        probabilities = probabilities.reshape(80, -1)
        x, y, w, h = dfl_boxes(logits.reshape(-1, probabilities.shape[1]), (height, width), None).T
        for x1, y1, x2, y2, score, label in rows:  # each is one cell's box and class score, decoded here
            cell = int(np.abs(probabilities[int(label)] - score).argmin())
            np.testing.assert_allclose([x[cell] - w[cell] / 2, y[cell] - h[cell] / 2, x[cell] + w[cell] / 2,
                                        y[cell] + h[cell] / 2], [x1, y1, x2, y2], atol=0.05)
            assert abs(probabilities[int(label), cell] - score) < 1e-4
        compared += len(rows)
    assert compared > 0


@pytest.fixture(scope="module")
def yolov8n_tflites(exports, tmp_path_factory) -> dict[str, Path]:
    """The YOLOv8n export as the float and integer .tflite files a user could bring (bench/ultralytics_tflite.py),
    calibrated on 32 train images."""
    return tflite_exports(exports / "yolov8n.onnx", tmp_path_factory.mktemp("tflite") / "export",
                          sorted((MIRROR / "coco" / "train2017").glob("*.jpg"))[:32])


@pytest.mark.parametrize("model, encoding", [("yolov8n", "dfl"), ("yolo26n", "distances")])
def test_a_tflite_export_is_cut_as_its_onnx_export_is(model, encoding, exports, tmp_path, request):
    """A YOLOv8n (YOLO26n) a user exported to .tflite: init reads the metadata Ultralytics appends and the head in
    the file, and cuts it as the ONNX export (before the DFL, or YOLO26's grid decode, and the Concat of boxes and
    scores; it used to propose task other with MobileNet's preprocessing); the cut decodes to the file's own
    boxes and probabilities; the YOLOv8n's int8 keeps its boxes and runs on the NPU, the attached NMS on the
    CPU (the YOLO26n's float model only: its int8 route is the ONNX export's, tested above)."""
    import numpy as np

    from mzconvert.layout import built_stage_model
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import TFLiteRunner
    from mzconvert.tasks.detection import head_boxes
    from tests.test_yolo import ATTACHED_HEADS

    user = (request.getfixturevalue("yolov8n_tflites") if model == "yolov8n" else
            tflite_exports(exports / f"{model}.onnx", tmp_path / "export"))["float32"]
    (tmp_path / f"{model}.tflite").write_bytes(user.read_bytes())
    path, recipe = proposed(model, tmp_path, tmp_path, suffix=".tflite")
    post = recipe["postprocess"]
    assert recipe["task"] == "detection" and recipe["format"] == "tflite" and recipe["input"]["layout"] == "NHWC"
    assert post["kind"] == "yolov8" and post["box_encoding"] == encoding and len(post["labels"]) == 80
    assert recipe["strip"]["outputs"] == [post["box_output"], post["class_output"]] and post["attach"] is True
    assert recipe["preprocess"]["letterbox"] is True and recipe["preprocess"]["scale"] == 1 / 255
    assert [v["mode"] for v in recipe["variants"]] == ["float32", "int8"]
    quantized = model == "yolov8n"
    if quantized:
        kept(path, recipe, {"float32", "int8"})
        done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(path), "--out",
                       str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
        assert done.returncode == 0, done.stderr[-3000:]
        variants = json.loads(done.stdout)[model]["variants"]
    else:
        variants = built_without_npu(path, recipe, {"float32"}, tmp_path)
    loaded = load_recipe(path)
    assert variants["float32"]["postprocess_attached"]  # what ships; the cut is what it was made from
    cut = TFLiteRunner(built_stage_model(tmp_path / "build", loaded, "strip"), list(loaded.strip.outputs))
    whole = TFLiteRunner(user)
    for image in sorted((tmp_path / "check").iterdir())[:3]:
        tensor = prepare(image, loaded.preprocess, loaded.input).tensor
        (theirs,) = whole.run(tensor)
        boxes, probabilities = cut.run(tensor)
        theirs = theirs[0]
        np.testing.assert_allclose(head_boxes(boxes[0], loaded.postprocess, loaded.input.height_width), theirs[:4].T,
                                   atol=2e-3)
        np.testing.assert_allclose(probabilities.reshape(theirs[4:].shape), theirs[4:], atol=1e-5)
    if quantized:
        int8 = variants["int8"]
        assert int8["verify"][post["box_output"]]["worst_slice"]["sqnr_db"] > 15, int8["verify"]
        (npu,) = int8["vela"].values()
        assert npu["cpu_op_count"] == ATTACHED_HEADS[encoding][-1] and npu["npu_ops"] > 100, npu
        assert int8["postprocess_attached"]


def test_an_integer_tflite_export_is_the_detector_it_is_cut_where_its_scores_keep_a_scale_of_their_own(
        yolov8n_tflites, tmp_path):
    """A YOLOv8n a user exported to an integer .tflite, as Ultralytics' TensorFlow export quantizes it: full-integer,
    integer with float I/O, dynamic-range (Ultralytics' <model>_int8.tflite). init used to propose task other with
    MobileNet's preprocessing for each. Each is now the detector it is, with Ultralytics' preprocessing and labels,
    cut before the Concat of its boxes and scores, and built as it is (not quantized again: the dynamic-range one
    used to be, into a file LiteRT cannot load). In the integer files the converter requantizes the scores to that
    Concat's one scale, a box-sized step: every class probability of the file as it is reads 0. The cut takes them
    before, at the sigmoid's own step (1/256), and the model with float I/O keeps float outputs."""
    import numpy as np

    from mzconvert.layout import built_stage_model
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import TFLiteRunner

    float_export = TFLiteRunner(yolov8n_tflites["float32"])
    modes = {"full_integer_quant": ("int8", "int8"), "integer_quant": ("int8", "float32"),
             "dynamic_range_quant": ("dynamic", None)}
    probabilities = {}
    for kind, (mode, io) in modes.items():
        work = tmp_path / kind
        work.mkdir()
        user = work / f"{kind}.tflite"
        user.write_bytes(yolov8n_tflites[kind].read_bytes())
        path, recipe = proposed(kind, work, work, suffix=".tflite")
        post = recipe["postprocess"]
        assert recipe["task"] == "detection" and post["kind"] == "yolov8" and len(post["labels"]) == 80, recipe
        assert recipe["preprocess"]["letterbox"] is True and recipe["preprocess"]["scale"] == 1 / 255
        assert recipe["strip"]["outputs"] == [post["box_output"], post["class_output"]]
        assert [(v["mode"], v.get("io_dtype")) for v in recipe["variants"]] == [(mode, io)]
        assert ("# A quantized export" in path.read_text()) == (mode == "int8")  # why it is cut
        built_without_npu(path, recipe, {mode}, work)
        loaded = load_recipe(path)
        cut = TFLiteRunner(built_stage_model(work / "build", loaded, "strip"), list(loaded.strip.outputs))
        assert {o.dtype for o in cut.outputs} == {io or "float32"}, cut.outputs  # its I/O as the file's
        whole, found = TFLiteRunner(user), []
        for image in sorted((work / "check").iterdir()):  # the best class probability of each image
            tensor = prepare(image, loaded.preprocess, loaded.input).tensor
            (theirs,) = whole.run(tensor)
            (float_model,) = float_export.run(tensor)
            found.append((float_model[0, 4:].max(), theirs[0, 4:].max(), cut.run(tensor)[1].max()))
        probabilities[kind] = np.array(found)
        if kind == "full_integer_quant":
            assert whole.outputs[0].scale > 1 and cut.outputs[1].scale == 1 / 256, (whole.outputs, cut.outputs)
    shown = probabilities["integer_quant"][:, 0] > 0.5  # images where the float model finds something
    assert shown.any(), probabilities
    for kind in ("full_integer_quant", "integer_quant"):  # the file as it is: no probability above 0; the cut's
        assert (probabilities[kind][:, 1] == 0).all() and (probabilities[kind][shown, 2] > 0.3).all(), probabilities
    assert (probabilities["dynamic_range_quant"][shown, 1] > 0.3).all()  # float activations: its scores survive
    np.testing.assert_array_equal(probabilities["integer_quant"], probabilities["full_integer_quant"])


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
    the very detections Ultralytics' own predictor gives (its NMS by probiou); predict draws them; eval refuses
    them, saying why (no oriented annotations)."""
    import numpy as np
    import onnxruntime as ort

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import yolov8_detections
    from mzconvert.tasks.oriented import probiou
    from tests.test_build_real import coco_subset

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
    refused = run_cli("eval", str(path), "--dataset", str(coco_subset(tmp_path / "coco", 2)), *where)
    assert refused.returncode == 2 and "oriented annotations" in refused.stderr, refused.stderr[-2000:]


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
