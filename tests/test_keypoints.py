"""Keypoints of a pose head: decoded from a head cut before their decode, mapped back from the letterbox, judged
by OKS where the boxes match, and the recipe fields that describe them. (Against a real YOLOv8n-pose export's
own decode: tests/test_ultralytics_heads.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mzconvert.errors import RecipeError
from mzconvert.recipe import Preprocess, parse_recipe
from mzconvert.stages.verify import matched_parts
from mzconvert.tasks.detection import Detections, head_grid, on_image
from mzconvert.tasks.keypoints import decoded_keypoints, keypoint_similarity
from tests.conftest import yolov8_head_recipe


def test_grid_keypoints_decode_as_the_head_does_and_pixels_keypoints_are_read_as_they_are():
    """A 64 x 64 input's 84 cells (strides 8, 16, 32): point p of cell c at offsets t is at (2 t + centre - 0.5)
    x stride, its visibility sigmoid(t); the same cells of a head cut after that decode give the same values."""
    grid = head_grid((64, 64), 84, None)
    raw = np.random.default_rng(0).normal(size=(2 * 3, 84))
    cells = np.array([0, 70, 83])
    found = decoded_keypoints(raw, (2, 3), "grid", grid, cells, (64, 64))
    assert found.shape == (3, 2, 3)
    for k, cell in enumerate(cells):
        x, y, stride = grid[cell]
        for p in range(2):
            tx, ty, tv = raw[3 * p:3 * p + 3, cell]
            assert found[k, p, 0] * 64 == pytest.approx((2 * tx + x - 0.5) * stride)
            assert found[k, p, 1] * 64 == pytest.approx((2 * ty + y - 0.5) * stride)
            assert found[k, p, 2] == pytest.approx(1 / (1 + math.exp(-tv)))
    pixels = np.concatenate([found[..., :2] * 64, found[..., 2:]], axis=-1).transpose(1, 2, 0).reshape(6, 3)
    every = np.zeros((6, 84))
    every[:, cells] = pixels
    np.testing.assert_allclose(decoded_keypoints(every, (2, 3), "pixels", grid, cells, (64, 64)), found)
    np.testing.assert_allclose(decoded_keypoints(raw.T, (2, 3), "grid", grid, cells, (64, 64)), found)  # [N, P x V]


def test_keypoints_are_mapped_back_from_the_letterbox_as_boxes_are():
    """A 128 x 64 image letterboxed into 64 x 64 (gain 0.5, 16 rows of padding above): a keypoint at a box's
    corner stays at that corner on the image."""
    boxes = np.array([[0.5, 0.25, 0.75, 0.5]])
    keypoints = np.array([[[0.25, 0.5, 0.9], [0.5, 0.75, 0.2]]])  # x, y: the box's top-left and bottom-right
    found = Detections(boxes, np.ones(1), np.zeros(1, np.int64), keypoints=keypoints)
    preprocess = Preprocess(resize=(64, 64), interpolation="cv2-linear", channel_order="RGB", mean=(0.0,) * 3,
                            std=(255.0,) * 3, letterbox=True)
    placed = on_image(found, (128, 64), preprocess)
    ymin, xmin, ymax, xmax = placed.boxes[0]
    np.testing.assert_allclose(placed.keypoints[0, :, :2], [[xmin, ymin], [xmax, ymax]])
    np.testing.assert_allclose(placed.keypoints[0, :, 2], [0.9, 0.2])


def test_oks_is_ultralytics_and_counts_only_the_points_the_reference_shows():
    """exp(-d^2 / (8 sigma^2 area)), area 0.53 x the box in input pixels, sigma 1 / points for a skeleton not
    COCO's; a point the reference does not show (visibility < 0.5) is left out."""
    reference = np.array([[0.5, 0.5, 0.9], [0.2, 0.2, 0.1]])
    moved = reference + [[2 / 100, 0, 0], [0.5, 0.5, 0]]  # the shown point 2 px off, the hidden one far
    box = np.array([0.0, 0.0, 0.5, 0.4])  # 50 x 40 px on a 100 x 100 input
    expected = math.exp(-4 / (8 * 0.5 ** 2 * 50 * 40 * 0.53))
    assert keypoint_similarity(reference, moved, box, (100, 100)) == pytest.approx(expected)
    assert keypoint_similarity(reference, reference, box, (100, 100)) == 1.0
    hidden = reference.copy()
    hidden[:, 2] = 0.1
    assert keypoint_similarity(hidden, moved, box, (100, 100)) is None


def test_verify_judges_the_keypoints_of_the_detections_it_matches_and_fails_on_collapsed_ones():
    """The same detections: OKS 1; keypoints collapsed to the input's corner (an int8 output gone to its zero
    point) with the boxes still matching: OKS near 0, below any floor."""
    boxes = np.array([[0.1, 0.2, 0.7, 0.9]])
    keypoints = np.random.default_rng(1).uniform(0.2, 0.7, (1, 17, 3))
    keypoints[..., 2] = 0.9
    reference = Detections(boxes, np.array([0.9]), np.array([0]), keypoints=keypoints)
    assert matched_parts([reference], [reference], (320, 320)) == {"matched_keypoint_oks": 1.0,
                                                                   "keypoints_compared": 1}
    collapsed = Detections(boxes, np.array([0.9]), np.array([0]), keypoints=np.zeros_like(keypoints))
    assert matched_parts([reference], [collapsed], (320, 320))["matched_keypoint_oks"] < 0.01


@pytest.mark.parametrize("keypoints, message", [
    ("  keypoints: points", "postprocess.keypoint_shape: missing required field"),
    ("  keypoints: points\n  keypoint_shape: [17, 4]", "postprocess.keypoint_shape: expected \\[points, values\\] "
                                                       "with values 2 \\(x, y\\) or 3"),
    ("  keypoint_shape: [17, 3]", "postprocess.keypoint_shape: keypoint_shape describes a pose head's keypoints: "
                                  "name them \\(keypoints\\)"),
    ("  keypoints: joints\n  keypoint_shape: [17, 3]", "postprocess.keypoints: 'joints' is not one of strip.outputs"),
    ("  keypoints: points\n  keypoint_shape: [17, 3]\n  keypoint_encoding: raw",
     "postprocess.keypoint_encoding: .raw. is not one of grid, pixels"),
])
def test_a_recipes_keypoints_are_checked_where_they_are_wrong(tmp_path, keypoints, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["points"], keypoints))


def test_a_recipe_describes_its_keypoints(tmp_path):
    parts = "  keypoints: points\n  keypoint_shape: [5, 2]"
    post = parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["points"], parts)).postprocess
    assert (post.keypoints, post.keypoint_shape, post.keypoint_encoding) == ("points", (5, 2), "grid")


def pose_dataset(folder, points: int, keypoint_file: str | None = "person_keypoints_val.json"):
    """A COCO folder of 3 images of 100 x 80 px, one person each with `points` annotated keypoints (the last
    hidden: v 0), written in `keypoint_file` (None: in the instances file itself); the points of each, in pixels."""
    from PIL import Image

    rng = np.random.default_rng(points)
    (folder / "val").mkdir(parents=True)
    (folder / "annotations").mkdir()
    images, boxes, keypoints, truth = [], [], [], {}
    for i in (1, 2, 3):
        Image.new("RGB", (100, 80), (90, 90, 90)).save(folder / "val" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 100, "height": 80})
        xy = rng.uniform([20, 15], [80, 65], (points, 2))
        visibility = np.full(points, 2)
        visibility[-1] = 0
        truth[i] = xy
        box = {"id": i, "image_id": i, "category_id": 1, "bbox": [15.0, 10.0, 70.0, 60.0], "area": 3000.0,
               "iscrowd": 0}
        boxes.append(box)
        keypoints.append(box | {"keypoints": np.column_stack([xy, visibility]).ravel().tolist(),
                                "num_keypoints": points - 1})
    categories = [{"id": 1, "name": "person"}]
    instances = {"images": images, "annotations": keypoints if keypoint_file is None else boxes,
                 "categories": categories}
    (folder / "annotations" / "instances_val.json").write_text(json.dumps(instances))
    if keypoint_file:
        (folder / "annotations" / keypoint_file).write_text(
            json.dumps({"images": images, "annotations": keypoints, "categories": categories}))
    return truth


def pose_predictor(truth: dict, shift_px: float, points: int):
    """A model whose one detection an image is the annotated person's box, its keypoints the annotated ones moved
    `shift_px` right, normalised to the image."""
    def predict(image):
        xy = truth[int(image.path.stem)] + [shift_px, 0]
        keypoints = np.column_stack([xy / [100, 80], np.full(points, 0.9)])[None]
        return Detections(np.array([[10 / 80, 15 / 100, 70 / 80, 85 / 100]]), np.array([0.8]), np.array([0]),
                          keypoints=keypoints)

    return predict


@pytest.mark.parametrize("points, keypoint_file, shift", [(17, "person_keypoints_val.json", 2.0),
                                                          (5, "my-poses-val.json", 14.0), (17, None, 2.0)])
def test_eval_scores_keypoints_by_coco_oks_where_the_annotations_give_them(tmp_path, points, keypoint_file, shift):
    """COCO keypoint AP beside bbox AP, from whichever annotations file gives keypoints for every image (the
    instances file itself, COCO's person_keypoints file or one named otherwise), by OKS with COCO's sigmas for 17
    points and 1 / points otherwise: the annotated points score 1; points `shift` px off score an OKS o by COCO's
    formula, so at each IoU threshold t their AP is 1 where every image's o >= t, 0 where none is; the table
    says so."""
    from mzconvert.evaluate.datasets import CocoDataset
    from mzconvert.evaluate.scoring import evaluate_detection
    from mzconvert.recipe import parse_recipe
    from mzconvert.report.tables import eval_table
    from mzconvert.tasks.keypoints import keypoint_sigmas

    truth = pose_dataset(tmp_path / "coco", points, keypoint_file)
    parts = f"  keypoints: points\n  keypoint_shape: [{points}, 3]\n  category_ids: [1]"
    recipe = parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["points"], parts))
    models = {"float32": pose_predictor(truth, 0.0, points), "int8": pose_predictor(truth, shift, points)}
    evaluation = evaluate_detection(models, recipe, CocoDataset.open(tmp_path / "coco", "val"))
    exact, moved = evaluation["results"]["float32"], evaluation["results"]["int8"]
    assert exact["AP"] == pytest.approx(1.0) and moved["AP"] == pytest.approx(1.0)  # the same boxes
    assert exact["keypoint_AP"] == pytest.approx(1.0)
    sigmas = keypoint_sigmas((points, 3))[:-1]  # the last point is hidden: not judged
    similarity = np.exp(-shift ** 2 / (2 * (2 * sigmas) ** 2 * 3000)).mean()  # the same in every image
    thresholds = np.linspace(0.5, 0.95, 10)
    assert 0.5 < similarity < 0.95
    assert moved["keypoint_AP"] == pytest.approx(np.mean(similarity >= thresholds), abs=1e-6)
    assert moved["keypoint_ratio_interval"][1] < 1
    table = eval_table(evaluation | {"recipe": "h", "images": 3, "scope": "-", "labels": "-",
                                     "dataset": {"name": "coco", "path": "-"}}, {"variants": {}})
    assert "keypoints (COCO keypoint AP" in table


def test_eval_scores_boxes_alone_and_says_so_where_no_annotations_give_keypoints(tmp_path):
    from mzconvert.evaluate.datasets import CocoDataset
    from mzconvert.evaluate.scoring import evaluate_detection
    from mzconvert.recipe import parse_recipe

    truth = pose_dataset(tmp_path / "coco", 17)
    (tmp_path / "coco" / "annotations" / "person_keypoints_val.json").unlink()
    recipe = parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["points"], "  keypoints: points\n"
                                                                              "  keypoint_shape: [17, 3]"))
    said = []
    evaluation = evaluate_detection({"float32": pose_predictor(truth, 0.0, 17)}, recipe,
                                    CocoDataset.open(tmp_path / "coco", "val"), said.append)
    assert "keypoint_AP" not in evaluation["results"]["float32"]
    assert any("keypoints not scored: no annotations" in line for line in said), said


def test_keypoint_annotations_of_other_images_or_points_are_not_taken(tmp_path):
    """A keypoints file that lacks an evaluated image is not the one; one of another number of points than the
    model's is refused, naming the file; two that would do are refused as ambiguous."""
    from mzconvert.errors import InputError
    from mzconvert.evaluate.cocometrics import coco_scores
    from mzconvert.evaluate.datasets import CocoDataset
    from mzconvert.tasks.keypoints import keypoint_sigmas

    pose_dataset(tmp_path / "coco", 17)
    folder = tmp_path / "coco" / "annotations"
    dataset = CocoDataset.open(tmp_path / "coco", "val")
    assert dataset.keypoint_annotations() == folder / "person_keypoints_val.json"
    with pytest.raises(InputError, match="person_keypoints_val.json: annotation 1: keypoints: 17 points .* the model "
                                         "gives 5"):
        coco_scores(folder / "person_keypoints_val.json", [], [1], "keypoints", keypoint_sigmas((5, 3)))
    data = json.loads((folder / "person_keypoints_val.json").read_text())
    (folder / "person_keypoints_val.json").write_text(json.dumps(data | {"images": data["images"][:2]}))
    assert dataset.keypoint_annotations() is None
    (folder / "person_keypoints_val.json").write_text(json.dumps(data))
    (folder / "poses_val.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="2 files give keypoints for the val images"):
        dataset.keypoint_annotations()


def test_the_search_and_the_ranges_choice_judge_a_pose_head_by_its_keypoints_too(tmp_path):
    """A candidate whose boxes all match but whose keypoints are lost is not within any budget: the paired
    fidelity `auto` ranges and `max_drop` go by is the least of detections matched, masks' IoU, keypoints' OKS."""
    from mzconvert.recipe import parse_recipe
    from mzconvert.stages.fallback import paired_fidelity

    recipe = parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["points"], "  keypoints: points\n"
                                                                              "  keypoint_shape: [17, 3]"))
    assert paired_fidelity({"matched_detections": 1.0, "matched_keypoint_oks": 0.05}, recipe) == 0.05
    assert paired_fidelity({"matched_detections": 0.9, "matched_mask_iou": 0.95}, recipe) == 0.9
    assert paired_fidelity({"matched_detections": 0.7}, recipe) == 0.7
