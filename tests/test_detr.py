"""Query detectors (kind detr: Ultralytics' RT-DETR exports): each query's box and class probabilities decoded,
selected as the export's own TopK selects them, the recipe fields, and init on small query heads built here in
each layout an export has (the real RT-DETR-l export: tests/test_ultralytics_heads.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mzconvert.errors import InputError, RecipeError
from mzconvert.recipe import parse_recipe
from mzconvert.tasks.detection import detr_detections, judged_outputs
from tests.conftest import run_cli

RECIPE = """name: q
task: detection
description: d
license: l
source: {{url: https://example.com/q.onnx, sha256: {digest}}}
format: onnx
input: {{name: images, shape: [1, 3, 32, 32], layout: NCHW}}
preprocess: {{interpolation: cv2-linear}}
strip: {{outputs: [boxes, scores]}}
postprocess:
  kind: detr
  labels: [person, car]
{fields}
variants: [{{name: float32, mode: float32}}]
"""


def query_recipe(tmp_path, fields: str = "  box_output: boxes\n  class_output: scores\n  nms_iou_threshold: 1.0\n"
                                         "  max_detections: 3"):
    return parse_recipe(tmp_path / "q.yaml", RECIPE.format(digest="a" * 64, fields=fields))


def test_each_querys_box_and_class_scores_are_decoded_and_the_best_pairs_kept_none_suppressed(tmp_path):
    """Boxes are centre x, y, width, height normalised to the input; the best max_detections (query, class)
    pairs are kept in score order, two queries on the same box both (no NMS), a query twice for two classes."""
    post = query_recipe(tmp_path).postprocess
    boxes = np.array([[[0.5, 0.5, 0.2, 0.4], [0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.1, 0.1], [0.3, 0.3, 0.1, 0.1]]])
    scores = np.array([[[0.9, 0.1], [0.8, 0.0], [0.2, 0.7], [0.0, 0.6]]])
    found = detr_detections([boxes, scores], {"boxes": boxes, "scores": scores}, post, None, (32, 64))
    np.testing.assert_allclose(found.scores, [0.9, 0.8, 0.7])
    assert found.labels.tolist() == [0, 0, 1] and found.cells.tolist() == [0, 1, 2]
    np.testing.assert_allclose(found.boxes, [[0.3, 0.4, 0.7, 0.6], [0.3, 0.4, 0.7, 0.6], [0.85, 0.05, 0.95, 0.15]])
    with pytest.raises(InputError, match="scores 3 classes but the recipe has 2 labels"):
        detr_detections([boxes, scores], {"boxes": boxes, "scores": np.zeros((1, 4, 3))}, post, None, (32, 64))


def test_a_query_heads_class_probabilities_are_judged_where_a_person_would_see_them(tmp_path):
    post = query_recipe(tmp_path).postprocess
    reference, candidate = np.array([[[0.9, 0.01], [0.2, 0.02]]]), np.array([[[0.8, 0.2], [0.1, 0.03]]])
    judged = judged_outputs("scores", reference, candidate, post, (32, 32))
    np.testing.assert_allclose(judged[0], [[[0.9, 0.0], [0.0, 0.0]]])
    np.testing.assert_allclose(judged[1], [[[0.8, 0.0], [0.0, 0.0]]])


@pytest.mark.parametrize("fields, message", [
    ("  box_output: boxes", "postprocess.class_output: missing required field"),
    ("  box_output: boxes\n  class_output: logits", "postprocess.class_output: 'logits' is not one of strip.outputs"),
    ("  box_output: boxes\n  class_output: scores\n  anchors_file: a.npy",
     "postprocess.anchors_file: kind detr takes box_output, class_output and the NMS fields, not anchors_file"),
    ("  box_output: boxes\n  class_output: scores\n  attach: true",
     "postprocess.attach: kind detr takes box_output, class_output and the NMS fields, not attach"),
])
def test_a_query_heads_recipe_is_checked_where_it_is_wrong(tmp_path, fields, message):
    with pytest.raises(RecipeError, match=message):
        query_recipe(tmp_path, fields)


def query_export(path, layout: str, queries: int = 64, classes: int = 2) -> dict:
    """A small query detector as an Ultralytics export writes it (its metadata: task, image size, names): a 4x4
    stride-4 convolution's 64 cells are the queries, each one's box and class probabilities a Sigmoid of a
    projection. `layout` joined: one output [1, Q, 4 + classes] (Ultralytics before 8.4); parts: the two as
    outputs of their own. Its weights, to compute what it should give."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"conv": rng.normal(0, 0.5, (8, 3, 4, 4)).astype(np.float32),
               "box": rng.normal(0, 0.5, (8, 4)).astype(np.float32),
               "class": rng.normal(0, 1.0, (8, classes)).astype(np.float32),
               "shape": np.array([1, 8, queries], np.int64)}
    nodes = [helper.make_node("Conv", ["images", "conv"], ["features"], strides=[4, 4]),
             helper.make_node("Reshape", ["features", "shape"], ["flat"]),
             helper.make_node("Transpose", ["flat"], ["queries"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["queries", "box"], ["box_logits"]),
             helper.make_node("Sigmoid", ["box_logits"], ["boxes"]),
             helper.make_node("MatMul", ["queries", "class"], ["class_logits"]),
             helper.make_node("Sigmoid", ["class_logits"], ["scores"])]
    if layout == "joined":
        nodes.append(helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=2))
        outputs = [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, queries, 4 + classes])]
    else:
        outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, queries, 4]),
                   helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, queries, classes])]
    graph = helper.make_graph(nodes, "query-head", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 [1, 3, 32, 32])],
                              outputs, [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in {"author": "Ultralytics", "task": "detect", "imgsz": "[32, 32]", "stride": "32",
                       "names": str(dict(enumerate(["person", "car"][:classes])))}.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return weights


def images(folder, count: int, seed: int):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("layout", ["joined", "parts"])
def test_init_cuts_an_ultralytics_query_head_at_its_sigmoids_and_the_recipe_builds_and_predicts(tmp_path, layout):
    """Whatever the export does after its query head (joins boxes and probabilities, or gives them as they are),
    init proposes kind detr cut at the two Sigmoids, nothing suppressed, the best min(queries, 300) pairs, the
    image stretched to the input (no letterbox) and ONNX variants only; the float model's detections on an
    image are those its weights compute, and predict draws them."""
    import cv2
    import yaml
    from PIL import Image

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model
    from mzconvert.tasks.detection import raw_detections

    weights = query_export(tmp_path / "q.onnx", layout)
    made = run_cli("init", "q", "--from", str(tmp_path / "q.onnx"), "--to", str(tmp_path), "--calibration",
                   str(images(tmp_path / "calib", 4, 1)), "--verify", str(images(tmp_path / "check", 3, 2)))
    assert made.returncode == 0, made.stderr
    recipe = yaml.safe_load((tmp_path / "q.yaml").read_text())
    post = recipe["postprocess"]
    assert (post["kind"], post["box_output"], post["class_output"]) == ("detr", "boxes", "scores")
    assert (post["nms_iou_threshold"], post["max_detections"], post["labels"]) == (1.0, 64, ["person", "car"])
    assert "letterbox" not in recipe["preprocess"] and recipe["strip"]["outputs"] == ["boxes", "scores"]
    assert [v["name"] for v in recipe["variants"]] == ["float32", "int8"] and "targets" not in recipe
    recipe["variants"] = recipe["variants"][:1]
    (tmp_path / "q.yaml").write_text(yaml.safe_dump(recipe))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "q.yaml"), *where)
    assert built.returncode == 0, built.stderr[-2000:]
    loaded = load_recipe(tmp_path / "q.yaml")
    image = tmp_path / "check" / "0.png"
    tensor = prepare(image, loaded.preprocess, loaded.input).tensor
    expected = cv2.resize(np.asarray(Image.open(image).convert("RGB")), (32, 32), interpolation=cv2.INTER_LINEAR)
    assert np.abs(tensor[0].transpose(1, 2, 0) * 255 - expected).max() <= 1.0  # stretched, not letterboxed
    queries = _features(tensor, weights["conv"])
    boxes, scores = (1 / (1 + np.exp(-(queries @ weights[key]))) for key in ("box", "class"))
    outputs = open_model(tmp_path / "dist" / "q" / "q_float32.onnx", ["boxes", "scores"]).run(tensor)
    found = raw_detections(outputs, ["boxes", "scores"], loaded.postprocess, None, (32, 32))
    best = np.sort(scores.ravel())[::-1][:64]
    np.testing.assert_allclose(found.scores, best[best > 0.001], rtol=1e-5)
    for box, label, score in zip(found.boxes, found.labels, found.scores):
        query = int(np.abs(scores[:, label] - score).argmin())
        x, y, w, h = boxes[query]
        np.testing.assert_allclose(box, np.clip([y - h / 2, x - w / 2, y + h / 2, x + w / 2], 0, 1), atol=1e-5)
    drawn = run_cli("--json", "predict", str(tmp_path / "q.yaml"), str(image), *where)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    (picture,) = json.loads(drawn.stdout)
    assert Image.open(picture).format == "PNG"


def _features(tensor: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The export's queries (64 x 8): its stride-4 4x4 convolution, cell by cell, rows then columns."""
    patches = tensor[0].reshape(3, 8, 4, 8, 4).transpose(1, 3, 0, 2, 4).reshape(64, -1)
    return patches @ kernel.reshape(8, -1).T
