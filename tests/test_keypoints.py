"""Keypoints of a pose head: decoded from a head cut before their decode, mapped back from the letterbox, judged
by OKS where the boxes match, and the recipe fields that describe them. (Against a real YOLOv8n-pose export's
own decode: tests/test_ultralytics.py.)"""

from __future__ import annotations

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
