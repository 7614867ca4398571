"""Real Ultralytics YOLOv8n graphs, built by the `ultralytics` package from its model YAML and exported as users
export them (the session's `exports`, tests/conftest.py: tests/ultralytics_export.py in the package's own environment,
made by `make ultralytics-env`): ONNX at the current opset and at 12, of a dynamic size, ending in its own NMS, and
the .tflite files a user converts it to (float and integer), then init -> build -> eval -> predict -> vela with the
recipe init writes. The other heads (YOLO11n, YOLO26n, segmentation, pose, oriented boxes, RT-DETR, YOLOv5n):
tests/test_ultralytics_heads.py, with the helpers here.

The weights are not trained (none can be had here; see the export script): the graph's ops, layout and
metadata are Ultralytics', and what is asserted is what does not depend on training: the recipe init
proposes, a TFLite port that computes what the export computes, an int8 model whose boxes keep their
resolution, and every op but the attached NMS on the NPU. Untrained class scores are near-ties among 80 classes, so int8's
detections matched are no measure of a trained model's; the test lowers those floors and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bench.ultralytics_tflite import tflite_exports
from mzconvert.errors import EXIT_BAD_INPUT
from tests.conftest import MIRROR, image_folder, run_cli

pytestmark = pytest.mark.slow


def proposed(model: str, exports: Path, tmp_path: Path, suffix: str = ".onnx") -> tuple[Path, dict]:
    """The recipe `mzconvert init` writes for the export (calibration: train images; verify: val images)."""
    folders = {role: image_folder(tmp_path / role, MIRROR / "coco" / split, count)
               for role, split, count in (("calib", "train2017", 16), ("check", "val2017", 8))}
    made = run_cli("init", model, "--from", str(exports / f"{model}{suffix}"), "--to", str(tmp_path), "--calibration",
                   str(folders["calib"]), "--verify", str(folders["check"]))
    assert made.returncode == 0, made.stderr
    path = tmp_path / f"{model}.yaml"
    return path, yaml.safe_load(path.read_text())


TUNE_STEPS = 2  # init's tune_steps on untrained weights: that the tuning runs every op of the head is under test


def kept(path: Path, recipe: dict, variants: set[str]) -> None:
    """The recipe with only `variants` of those init proposes, its quantized variants' floors lowered (untrained
    scores: see the module's docstring; even 16-bit activations lose them, the untrained features at 3-4 dB after
    the 8-bit weights; a quantized file as it is is verified against its float twin), the int8 variants init
    tunes tuned for TUNE_STEPS steps."""
    assert variants <= {v["name"] for v in recipe["variants"]}, recipe["variants"]
    recipe["variants"] = [v for v in recipe["variants"] if v["name"] in variants]
    for variant in recipe["variants"]:
        if variant["mode"] in ("int8", "int16x8", "dynamic"):
            variant.update(min_matched=0, min_mask_iou=0, min_keypoint_oks=0, min_slice_sqnr_db=-100)
        if variant.get("tune_steps"):
            variant["tune_steps"] = TUNE_STEPS
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
    tuned = variants["int8-tflite"]["tuned"]  # init's proposal: every op of its port run in the tuning program
    assert tuned["steps"] == TUNE_STEPS and "not_run" not in tuned, tuned
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


def test_an_ultralytics_checkpoint_is_refused_unloaded_naming_the_export_that_builds(exports, tmp_path):
    """The checkpoint Ultralytics saves (as `yolo train` leaves best.pt: a pickle of its model classes) would run
    their code if loaded: inspect and init refuse it without loading it, naming the classes it would build and the
    export mzconvert reads instead; init writes no recipe."""
    checkpoint = exports / "yolov8n.pt"
    for command in (["inspect", str(checkpoint)], ["init", "y8", "--from", str(checkpoint), "--to", str(tmp_path)]):
        done = run_cli(*command)
        assert done.returncode == EXIT_BAD_INPUT, done.stderr
        assert "its pickle builds ultralytics.nn.tasks.DetectionModel" in done.stderr, done.stderr
        assert "yolo export model=yolov8n.pt format=onnx" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


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
    assert [v["mode"] for v in recipe["variants"]] == ["float32", "int8", "int16x8"]
    quantized = model == "yolov8n"
    if quantized:
        kept(path, recipe, {"float32", "int8", "int16x8"})
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
        sixteen = variants["int16x8"]  # beside it, as for the ONNX export: raw outputs, every op on the NPU
        assert sixteen["verify"][post["box_output"]]["worst_slice"]["sqnr_db"] > 15, sixteen["verify"]
        assert not sixteen["postprocess_attached"]
        assert next(iter(sixteen["vela"].values()))["cpu_op_count"] == 0, sixteen["vela"]


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
