"""Oriented boxes (an Ultralytics obb head: kind yolov8 with postprocess.angles): decoded rotated as its
dist2rbox decodes them, suppressed and matched by their probabilistic IoU as Ultralytics' NMS and validator, mapped
back from the letterbox, and the recipe fields. (Against a real YOLOv8n-obb export: tests/test_ultralytics_heads.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mzconvert.errors import RecipeError
from mzconvert.recipe import Preprocess, parse_recipe
from mzconvert.tasks.detection import Detections, grid_boxes, head_grid, matched_detections, on_image, yolov8_detections
from mzconvert.tasks.oriented import probiou, rotated_corners
from tests.conftest import yolov8_head_recipe

ANGLES = "  angles: angles\n  nms_iou_threshold: 0.7"


def obb_recipe(tmp_path, parts: str = ANGLES):
    """A yolov8 head of two classes cut before its grid decode (distances), with its angles."""
    text = yolov8_head_recipe(["angles"], parts).replace("box_encoding: dfl", "box_encoding: distances").replace(
        "labels: [person]", "labels: [plane, ship]")
    return parse_recipe(tmp_path / "h.yaml", text)


def test_probiou_is_one_minus_the_hellinger_distance_of_the_boxes_gaussians():
    """Two boxes of one size and angle d apart along their width: the distance is 1.5 d^2 / w^2 (its covariance
    w^2 / 12 each), so probiou is 1 - sqrt(1 - exp(-1.5 d^2 / w^2)); the same box turned a quarter with its sides
    swapped is the same box; far boxes do not overlap."""
    box = np.array([50.0, 40.0, 20.0, 10.0, 0.3])
    moved = box + [4 * math.cos(0.3), 4 * math.sin(0.3), 0, 0, 0]
    assert probiou(box, moved) == pytest.approx(1 - math.sqrt(1 - math.exp(-1.5 * 16 / 400)), abs=1e-6)
    assert probiou(box, np.array([50.0, 40.0, 10.0, 20.0, 0.3 + math.pi / 2])) > 0.999
    assert probiou(box, box + [500, 0, 0, 0, 0]) < 1e-3
    assert probiou(box[None], np.stack([box, moved])).shape == (2,)


def test_distances_decode_rotated_as_ultralytics_dist2rbox():
    """Each cell's centre offset ((right - left) / 2, (bottom - top) / 2) rotated by its angle, plus the cell's
    centre; the size left + right, top + bottom; times the stride. Angle 0 is the plain decode."""
    grid = head_grid((64, 64), 84, None)
    distances = np.random.default_rng(0).uniform(0, 3, (4, 84))
    angles = np.random.default_rng(1).uniform(-math.pi / 4, 3 * math.pi / 4, 84)
    boxes = grid_boxes(distances, (64, 64), None, angles)
    left, top, right, bottom = distances
    dx, dy = (right - left) / 2, (bottom - top) / 2
    x = (grid[:, 0] + dx * np.cos(angles) - dy * np.sin(angles)) * grid[:, 2]
    y = (grid[:, 1] + dx * np.sin(angles) + dy * np.cos(angles)) * grid[:, 2]
    np.testing.assert_allclose(boxes, np.column_stack([x, y, (left + right) * grid[:, 2], (top + bottom) * grid[:, 2]]))
    np.testing.assert_allclose(grid_boxes(distances, (64, 64), None, np.zeros(84)), grid_boxes(distances, (64, 64), None))


def obb_outputs(centres, sizes, angles, scores):
    """A 64 x 64 input's head (84 cells) cut before its grid decode: the cells given boxes of these centres (input
    pixels: each the centre of one cell), sizes and angles and these class scores (one row per box), all others
    nothing."""
    grid = head_grid((64, 64), 84, None)
    distances, probabilities, rotation = np.zeros((1, 4, 84)), np.zeros((1, len(scores[0]), 84)), np.zeros((1, 1, 84))
    for (x, y), (w, h), angle, score in zip(centres, sizes, angles, scores):
        cell = int(np.argmin(np.hypot(grid[:, 0] * grid[:, 2] - x, grid[:, 1] * grid[:, 2] - y)))
        stride = grid[cell, 2]
        distances[0, :, cell] = [w / 2 / stride, h / 2 / stride, w / 2 / stride, h / 2 / stride]
        probabilities[0, :, cell] = score
        rotation[0, 0, cell] = angle
    return {"boxes": distances, "scores": probabilities, "angles": rotation}


def test_rotated_boxes_are_suppressed_by_probiou_as_ultralytics_fast_nms_does(tmp_path):
    """Per class, a box is dropped where any better box overlaps it by more than the threshold, even one dropped
    itself (Ultralytics' fast NMS): A over B over C, A clear of C, keeps A alone; another class's box on the same
    place is kept; a box clear of all is kept. Each keeps its angle, and its box is the rotated box's bounds."""
    post = obb_recipe(tmp_path).postprocess
    outputs = obb_outputs(centres=[(20, 20), (20, 28), (28, 28), (52, 52), (28, 20)],
                          sizes=[(40, 40), (40, 40), (40, 40), (8, 4), (8, 8)],
                          angles=[0.0, 0.0, 0.0, math.pi / 6, 0.0],
                          scores=[[0.9, 0.0], [0.8, 0.0], [0.7, 0.0], [0.6, 0.0], [0.0, 0.85]])
    found = yolov8_detections(list(outputs.values()), outputs, post, None, (64, 64))
    assert found.scores.tolist() == pytest.approx([0.9, 0.85, 0.6])
    assert found.labels.tolist() == [0, 1, 0]
    np.testing.assert_allclose(found.rotated[2], [52, 52, 8, 4, math.pi / 6], atol=1e-9)
    corners = rotated_corners(found.rotated[2:])[0]
    np.testing.assert_allclose(found.boxes[2] * 64, [corners[:, 1].min(), corners[:, 0].min(), corners[:, 1].max(),
                                                     corners[:, 0].max()])


def test_rotated_detections_match_by_probiou_not_by_their_bounds():
    """A box turned by 40 degrees about its centre has bounds close to the unturned square's, but it is another
    box: not matched; the same rotated box matches."""
    square = np.array([[50.0, 50.0, 30.0, 10.0, 0.0]])
    turned = square + [0, 0, 0, 0, math.radians(40)]

    def detections(rotated):
        return Detections(np.array([[0.3, 0.3, 0.7, 0.7]]), np.array([0.9]), np.array([0]), rotated=rotated)

    assert matched_detections(detections(square), detections(square)) == (2, 2)
    assert matched_detections(detections(square), detections(turned)) == (0, 2)


def test_rotated_boxes_are_mapped_back_from_the_letterbox():
    """A 200 x 100 image letterboxed into 64 x 64 (gain 0.32, 16 px above): the centre moves and scales, the size
    scales, the angle stays."""
    found = Detections(np.zeros((1, 4)), np.array([0.9]), np.array([0]), rotated=np.array([[32.0, 40.0, 16, 8, 0.5]]))
    letterbox = Preprocess(resize=(64, 64), interpolation="cv2-linear", channel_order="RGB", mean=(0.0,) * 3,
                           std=(255.0,) * 3, letterbox=True)
    mapped = on_image(found, (200, 100), letterbox)
    np.testing.assert_allclose(mapped.rotated, [[100.0, 75.0, 50.0, 25.0, 0.5]])


@pytest.mark.parametrize("parts, message", [
    ("  angles: angles\n  keypoints: angles\n  keypoint_shape: [1, 2]",
     "postprocess.angles: an oriented-box head's masks or keypoints are not decoded"),
    ("  angles: turns", "postprocess.angles: 'turns' is not one of strip.outputs"),
])
def test_a_recipes_angles_are_checked_where_they_are_wrong(tmp_path, parts, message):
    with pytest.raises(RecipeError, match=message):
        obb_recipe(tmp_path, parts)


def test_eval_refuses_an_oriented_box_model_and_says_why(tmp_path):
    from mzconvert.errors import MzError
    from mzconvert.evaluate.run import run_eval

    recipe = obb_recipe(tmp_path)
    with pytest.raises(MzError, match="postprocess.angles: eval scores boxes against COCO's axis-aligned"):
        run_eval(recipe, tmp_path, "val", [], [], tmp_path, tmp_path, None)


def test_a_head_with_no_box_above_the_threshold_gives_no_detections(tmp_path):
    outputs = obb_outputs(centres=[(20, 20)], sizes=[(8, 8)], angles=[0.2], scores=[[0.0001, 0.0]])
    found = yolov8_detections(list(outputs.values()), outputs, obb_recipe(tmp_path).postprocess, None, (64, 64))
    assert found.boxes.shape == (0, 4) and found.rotated.shape == (0, 5) and found.scores.size == 0


def test_the_builds_verify_keeps_the_float_models_rotated_boxes_and_judges_a_variant_by_them(tmp_path):
    """The float model's detections saved for every variant's verify keep their rotated boxes: a variant whose
    angles are lost (its boxes otherwise the same) matches none of them."""
    from types import SimpleNamespace

    from PIL import Image

    from mzconvert.stages.verify import _matched_detections, reference_outputs, saved_detections

    recipe = obb_recipe(tmp_path)
    outputs = obb_outputs(centres=[(20, 20), (44, 44)], sizes=[(24, 8), (16, 6)], angles=[0.6, 1.2],
                          scores=[[0.9, 0.0], [0.0, 0.8]])
    names = list(outputs)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    runner = SimpleNamespace(run=lambda tensor: list(outputs.values()), output_names=names)
    with np.load(reference_outputs(runner, recipe, [tmp_path / "a.png"], tmp_path)) as saved:
        floats = saved_detections(saved, 0)
        np.testing.assert_allclose(floats.rotated[:, 4], [0.6, 1.2])
        assert _matched_detections(saved, [[v] for v in outputs.values()], names, recipe, None)[
            "matched_detections"] == 1.0
        unturned = [outputs["boxes"], outputs["scores"], np.zeros_like(outputs["angles"])]
        assert _matched_detections(saved, [[v] for v in unturned], names, recipe, None)["matched_detections"] == 0.0
