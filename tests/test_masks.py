"""Instance masks of a segmentation head: the decode's arithmetic against torch's, the recipe fields that name
its outputs, and COCO mask AP of the masks eval writes. (Against Ultralytics' own predictor on a real
YOLOv8n-seg export: tests/test_ultralytics_heads.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mzconvert.errors import RecipeError
from mzconvert.evaluate.cocometrics import coco_scores
from mzconvert.recipe import Preprocess, parse_recipe
from mzconvert.tasks.detection import Detections, coco_results, on_image
from mzconvert.tasks.masks import bilinear_weights, instance_masks
from tests.conftest import yolov8_head_recipe


@pytest.mark.parametrize("size_in, size_out", [(80, 320), (160, 640), (320, 427), (320, 240), (7, 7), (1, 5)])
def test_the_bilinear_weights_are_torchs_interpolate(size_in, size_out):
    values = np.random.default_rng(size_in).normal(size=(3, size_in))
    theirs = F.interpolate(torch.from_numpy(values)[None], size_out, mode="linear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(values @ bilinear_weights(size_in, size_out).T, theirs, atol=1e-12)


def made_masks(image_size: tuple[int, int], letterbox: bool):
    """Masks of 3 detections (one box past the input's edge, one of no area) from random prototypes, placed on an
    image of `image_size` (width, height) as on_image places them."""
    rng = np.random.default_rng(1)
    coefficients, prototypes = rng.normal(size=(1, 8, 30)), rng.normal(size=(1, 8, 16, 16))
    boxes = np.array([[0.1, 0.2, 0.7, 0.9], [-0.1, 0.5, 0.4, 1.2], [0.3, 0.3, 0.3, 0.6]])  # ymin, xmin, ymax, xmax
    found = Detections(boxes, np.ones(3), np.zeros(3, np.int64), np.array([3, 17, 29]),
                       instance_masks(coefficients, prototypes, np.array([3, 17, 29]), boxes, (64, 64)))
    preprocess = Preprocess(resize=(64, 64), interpolation="cv2-linear", channel_order="RGB", mean=(0.0,) * 3,
                            std=(255.0,) * 3, letterbox=letterbox)
    return on_image(found, image_size, preprocess), coefficients, prototypes


@pytest.mark.parametrize("image_size, letterbox", [((100, 60), True), ((40, 90), True), ((64, 64), False),
                                                   ((200, 120), False)])
def test_each_mask_is_the_prototypes_weighed_upsampled_cropped_and_resized_to_the_image_as_torch_computes_it(
        image_size, letterbox):
    """The region-only decode against the whole-image one in torch: upsampled to the input, above 0, cropped to
    the box (x1 <= column < x2); the image's part of the input resized to the image, above 0.5."""
    found, coefficients, prototypes = made_masks(image_size, letterbox)
    top, left, height, width = found.masks.content
    for k, cell in enumerate([3, 17, 29]):
        logits = torch.from_numpy(coefficients[0, :, cell] @ prototypes[0].reshape(8, -1)).reshape(1, 1, 16, 16)
        on_input = (F.interpolate(logits, (64, 64), mode="bilinear", align_corners=False)[0, 0] > 0).numpy()
        x1, y1, x2, y2 = found.masks.boxes[k]
        columns, rows = np.arange(64)[None, :], np.arange(64)[:, None]
        on_input &= (columns >= x1) & (columns < x2) & (rows >= y1) & (rows < y2)
        content = torch.from_numpy(on_input[top:top + height, left:left + width].astype(np.float64))[None, None]
        expected = F.interpolate(content, image_size[::-1], mode="bilinear", align_corners=False)[0, 0] > 0.5
        np.testing.assert_array_equal(found.masks.on_image(k), expected.numpy())
    assert found.masks.on_image(0).any() and not found.masks.on_image(2).any()  # the box of no area: no mask


def test_channels_last_prototypes_and_cells_last_coefficients_decode_alike():
    """A .tflite's layout ([1, h, w, masks], [1, N, masks]) gives the masks ONNX's layout gives."""
    rng = np.random.default_rng(2)
    coefficients, prototypes = rng.normal(size=(1, 8, 30)), rng.normal(size=(1, 8, 16, 16))
    boxes, cells = np.array([[0.1, 0.2, 0.7, 0.9]]), np.array([5])
    nchw = instance_masks(coefficients, prototypes, cells, boxes, (64, 64))
    nhwc = instance_masks(coefficients.transpose(0, 2, 1), prototypes.transpose(0, 2, 3, 1), cells, boxes, (64, 64))
    np.testing.assert_allclose(nchw.logits, nhwc.logits, rtol=1e-5)


@pytest.mark.parametrize("masks, message", [
    ("  mask_coefficients: coefficients", "postprocess.mask_coefficients: a segmentation head names "
                                          "mask_coefficients and mask_prototypes: name mask_prototypes"),
    ("  mask_coefficients: coefficients\n  mask_prototypes: protos",
     "postprocess.mask_prototypes: 'protos' is not one of strip.outputs"),
])
def test_a_recipes_mask_outputs_are_checked_where_they_are_wrong(tmp_path, masks, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["coefficients", "prototypes"], masks))


def test_a_recipe_names_both_mask_outputs(tmp_path):
    parts = "  mask_coefficients: coefficients\n  mask_prototypes: prototypes"
    recipe = parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["coefficients", "prototypes"], parts))
    assert (recipe.postprocess.mask_coefficients, recipe.postprocess.mask_prototypes) == ("coefficients", "prototypes")


def test_masks_are_scored_as_coco_scores_them(tmp_path):
    """A detection whose mask is the annotated outline scores mask AP 1; the same box with a mask of half of it
    scores box AP 1 and mask AP 0.1 (IoU 0.5 matches at the first of COCO's ten thresholds only)."""
    annotations = tmp_path / "instances.json"
    outline = [10.0, 10.0, 50.0, 10.0, 50.0, 40.0, 10.0, 40.0]  # a rectangle, x 10-50, y 10-40, on 64 x 48
    annotations.write_text(json.dumps({
        "images": [{"id": 1, "width": 64, "height": 48, "file_name": "a.png"}],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [outline], "area": 1200.0,
                         "bbox": [10.0, 10.0, 40.0, 30.0], "iscrowd": 0}]}))
    post = parse_recipe(tmp_path / "h.yaml", yolov8_head_recipe(["coefficients", "prototypes"], "")).postprocess
    box = np.array([[10 / 48, 10 / 64, 40 / 48, 50 / 64]])

    class Painted:  # masks as on_image gives them, painted here
        def __init__(self, mask):
            self.mask = mask

        def on_image(self, k):
            return self.mask

    whole, half = np.zeros((48, 64), bool), np.zeros((48, 64), bool)
    whole[10:40, 10:50] = True
    half[10:40, 10:30] = True
    for mask, expected in ((whole, 1.0), (half, 0.1)):
        rows = coco_results(1, Detections(box, np.ones(1), np.zeros(1, np.int64), masks=Painted(mask)), (64, 48),
                            post)
        assert coco_scores(annotations, rows, [1], "bbox").summary["AP"] == pytest.approx(1.0)
        assert coco_scores(annotations, rows, [1], "segm").summary["AP"] == pytest.approx(expected, abs=1e-6)


def test_verify_judges_the_masks_of_the_detections_it_matches_and_fails_on_empty_ones():
    """The same detections with their masks: IoU 1; with the masks' coefficients zeroed (an int8 output gone to
    its zero point), the boxes still match and the masks' IoU is 0, below any floor."""
    from mzconvert.stages.verify import matched_parts
    from mzconvert.tasks.detection import matched_detections

    rng = np.random.default_rng(3)
    coefficients, prototypes = rng.normal(size=(1, 8, 30)), rng.normal(size=(1, 8, 16, 16))
    boxes, cells = np.array([[0.1, 0.2, 0.7, 0.9], [0.5, 0.1, 0.9, 0.4]]), np.array([3, 17])

    def found(weights):
        return Detections(boxes, np.array([0.9, 0.8]), np.array([0, 1]), cells,
                          instance_masks(weights, prototypes, cells, boxes, (64, 64)))

    reference = found(coefficients)
    assert reference.masks.on_input_canvas(0).any() and reference.masks.on_input_canvas(1).any()
    assert matched_parts([reference], [found(coefficients)], (64, 64)) == {"matched_mask_iou": 1.0}
    broken = found(np.zeros_like(coefficients))
    assert matched_detections(reference, broken) == (4, 4)
    assert matched_parts([reference], [broken], (64, 64)) == {"matched_mask_iou": 0.0}
