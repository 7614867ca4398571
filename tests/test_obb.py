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


# Objects of two 200 x 160 images: (image, class, rotated box: centre x, y, width, height in pixels, angle), the
# second image's ship a difficult one in DOTA's file
OBJECTS = [(0, 0, (60.0, 50.0, 60.0, 20.0, 0.5)), (0, 1, (140.0, 110.0, 40.0, 16.0, -0.9)),
           (1, 0, (100.0, 80.0, 80.0, 30.0, 1.2)), (1, 1, (40.0, 40.0, 24.0, 12.0, 0.0))]
SIZE = (200, 160)


def oriented_folder(root, layout: str):
    """The OBJECTS' images and labels in one of the layouts users have: DOTA's (under val/ or not, with its header
    lines, pixel corners, category names) or Ultralytics' (images/val, labels/val, class indices, normalised)."""
    from PIL import Image

    dota = layout.startswith("dota")
    base = root / "val" if layout == "dota-split" else root
    images = base / "images" if dota else root / "images" / "val"
    labels = base / "labelTxt" if dota else root / "labels" / "val"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for image in (0, 1):
        Image.new("RGB", SIZE, (90, 90, 90)).save(images / f"P000{image}.png")
        lines = ["imagesource:GoogleEarth", "gsd:0.5"] if dota else []
        for i, label, box in OBJECTS:
            if i != image:
                continue
            corners = rotated_corners(np.array([box]))[0]
            if dota:
                lines.append(" ".join(f"{v:.2f}" for v in corners.ravel()) + f" {['plane', 'ship'][label]} "
                             f"{int(image == 1 and label == 1)}")
            else:
                lines.append(f"{label} " + " ".join(f"{v:.6f}" for v in (corners / SIZE).ravel()))
        (labels / f"P000{image}.txt").write_text("\n".join(lines) + "\n")
    return root


def found_as(rotated: np.ndarray, labels: list[int]) -> Detections:
    """Detections on the original image of these rotated boxes (pixels), their bounds normalised as on_image's."""
    from mzconvert.tasks.oriented import rotated_bounds

    x, y, w, h = rotated_bounds(rotated).T
    bounds = np.column_stack([(y - h / 2) / SIZE[1], (x - w / 2) / SIZE[0], (y + h / 2) / SIZE[1], (x + w / 2) / SIZE[0]])
    return Detections(boxes=bounds, scores=np.full(len(labels), 0.9, np.float32), labels=np.array(labels),
                      rotated=rotated)


@pytest.mark.parametrize("layout", ["dota", "dota-split", "ultralytics"])
def test_an_oriented_box_model_is_scored_by_its_rotated_boxes_on_dota_and_ultralytics_folders(tmp_path, layout):
    """eval used to refuse an oriented-box head. Each layout reads as the same polygons; a model giving the objects'
    own rotated boxes scores AP 1 (DOTA's difficult ship: found or not, not counted), one giving their bounds as
    boxes of angle 0, or the same boxes turned, scores less: the rotation is what is scored, not the bounds."""
    from mzconvert.evaluate.oriented_datasets import open_oriented
    from mzconvert.evaluate.scoring import evaluate_detection
    from mzconvert.tasks.oriented import rotated_bounds

    recipe = obb_recipe(tmp_path)
    dataset = open_oriented(oriented_folder(tmp_path / "data", layout), "val", recipe.postprocess.labels,
                            recipe.postprocess.category_ids)
    assert sorted(p.name for p in dataset.images.values()) == ["P0000.png", "P0001.png"]
    assert dataset.categories == {1: "plane", 2: "ship"}

    def model(change=lambda boxes: boxes, without_difficult: bool = False):
        def predict(image):
            index = int(image.path.stem[-1])
            mine = [(label, box) for i, label, box in OBJECTS
                    if i == index and not (without_difficult and (i, label) == (1, 1))]
            return found_as(change(np.array([box for _, box in mine])), [label for label, _ in mine])
        return predict

    models = {"float32": model(), "turned": model(lambda boxes: boxes + [0, 0, 0, 0, 0.6]),
              "bounds": model(lambda boxes: np.column_stack([rotated_bounds(boxes), np.zeros(len(boxes))])),
              "without-difficult": model(without_difficult=True)}
    results = evaluate_detection(models, recipe, dataset)["results"]
    assert results["float32"]["AP"] == pytest.approx(1.0) and results["float32"]["AP50"] == pytest.approx(1.0)
    assert results["bounds"]["AP"] < 0.6 and results["turned"]["AP"] < 0.6, results
    counted = layout == "ultralytics"  # its format has no difficult flag: every object counts
    assert (results["without-difficult"]["AP"] < 0.9) == counted, results


@pytest.mark.parametrize("layout, line, message", [
    ("dota", "10 10 20 10 20 20 10 plane 0", "expected 'x1 y1 x2 y2 x3 y3 x4 y4 category"),
    ("dota", "10 10 20 10 20 nan 10 20 plane 0", "expected 'x1 y1 x2 y2 x3 y3 x4 y4 category"),
    ("ultralytics", "2 0.1 0.1 0.2 0.1 0.2 0.2 0.1 0.2", r"expected 'class x1 y1 x2 y2 x3 y3 x4 y4' \(class 0-1"),
    ("ultralytics", "1 0.1 0.1 0.2 0.1 0.2 inf 0.1 0.2", r"expected 'class x1 y1 x2 y2 x3 y3 x4 y4' \(class 0-1"),
])
def test_a_malformed_label_line_is_named_by_file_and_line(tmp_path, layout, line, message):
    from mzconvert.errors import InputError
    from mzconvert.evaluate.oriented_datasets import open_oriented

    root = oriented_folder(tmp_path / "data", layout)
    label_file = next(root.rglob("P0000.txt"))
    number = len(label_file.read_text().splitlines()) + 1
    label_file.write_text(label_file.read_text() + line + "\n")
    with pytest.raises(InputError, match=f"P0000.txt:{number}: {message}"):
        open_oriented(root, "val", ("plane", "ship"), (1, 2))


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
        found, counts = _matched_detections(saved, [[v] for v in outputs.values()], names, recipe, None)
        assert found["matched_detections"] == 1.0 and counts.tolist() == [[4, 4]], (found, counts)  # both lists
        unturned = [outputs["boxes"], outputs["scores"], np.zeros_like(outputs["angles"])]
        found, counts = _matched_detections(saved, [[v] for v in unturned], names, recipe, None)
        assert found["matched_detections"] == 0.0 and counts[0, 0] == 0, (found, counts)


def test_matched_detections_count_the_detections_scoring_the_threshold_given():
    """A detection at 0.27 that the other model misses is left out at the build's threshold (0.3) and counted,
    unmatched, at Ultralytics' 0.25: the share a bench reports at either threshold is that threshold's."""
    boxes = np.array([[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]])
    both = Detections(boxes, np.array([0.9, 0.27]), np.array([0, 1]))
    first = Detections(boxes[:1], np.array([0.9]), np.array([0]))
    assert matched_detections(both, first) == (2, 2)
    assert matched_detections(both, first, 0.25) == (2, 3)
