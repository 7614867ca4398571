"""Scoring and decoding: exact AP on hand-made COCO files; our SSD decode equals the graph's post-processor."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mzconvert.evaluate.cocometrics import coco_ap
from mzconvert.tasks.detection import decode_ssd_boxes, nms, ssd_detections
from tests.conftest import MIRROR, PEDESTRIAN_PB


def write_coco(path, boxes_per_image):
    images = [{"id": i + 1, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(len(boxes_per_image))]
    annotations = [{"id": k + 1, "image_id": i + 1, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                    "iscrowd": 0}
                   for k, (i, box) in enumerate((i, b) for i, bs in enumerate(boxes_per_image) for b in bs)]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]}))
    return path


def det(image_id, box, score, category=1):
    return {"image_id": image_id, "category_id": category, "bbox": box, "score": score}


def test_perfect_detections_score_ap_one(tmp_path):
    truth = write_coco(tmp_path / "gt.json", [[[10, 10, 40, 40]], [[50, 20, 30, 60]]])
    ap = coco_ap(truth, [det(1, [10, 10, 40, 40], 0.9), det(2, [50, 20, 30, 60], 0.8)], [1])
    assert ap == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0)}


def test_half_recall_scores_exactly_51_of_101(tmp_path):
    """One of two objects found, at the top score: precision 1 up to recall 0.5 -> 51 of 101 recall points."""
    truth = write_coco(tmp_path / "gt.json", [[[10, 10, 40, 40]], [[50, 20, 30, 60]]])
    ap = coco_ap(truth, [det(1, [10, 10, 40, 40], 0.9), det(2, [0, 0, 10, 10], 0.8)], [1])
    assert ap["AP"] == pytest.approx(51 / 101)


def test_false_positive_ranked_first_halves_precision(tmp_path):
    """A false positive above the only true positive: precision 0.5 at every recall -> AP 0.5."""
    truth = write_coco(tmp_path / "gt.json", [[[10, 10, 40, 40]]])
    ap = coco_ap(truth, [det(1, [60, 60, 10, 10], 0.9), det(1, [10, 10, 40, 40], 0.5)], [1])
    assert ap["AP"] == pytest.approx(0.5)


def test_category_filter_ignores_other_classes(tmp_path):
    truth = write_coco(tmp_path / "gt.json", [[[10, 10, 40, 40]]])
    rows = [det(1, [10, 10, 40, 40], 0.9), det(1, [60, 60, 10, 10], 0.99, category=2)]
    assert coco_ap(truth, rows, [1])["AP"] == pytest.approx(1.0)


def test_nms_keeps_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 0.95, 1], [0.5, 0.5, 1, 1.0], [2, 2, 3, 3]], np.float32)
    kept = nms(boxes, np.array([0.9, 0.95, 0.5, 0.1]), 0.6, 10)
    assert kept.tolist() == [1, 2, 3]


def test_decode_identity_encoding_gives_the_anchor():
    anchors = np.array([[0.1, 0.2, 0.5, 0.6]], np.float32)
    np.testing.assert_allclose(decode_ssd_boxes(np.zeros((1, 4)), anchors, (10, 10, 5, 5)), anchors, atol=1e-7)


@pytest.mark.slow
def test_our_decode_equals_the_stripped_off_postprocessor_on_real_images(mirror, tmp_path):
    import tensorflow as tf

    from mzconvert.backends.tf import read_graph_def, strip
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe

    recipe = load_recipe("pedestrian-ssdlite")
    anchors = np.load(strip(PEDESTRIAN_PB, recipe, tmp_path).extras[0])
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(read_graph_def(PEDESTRIAN_PB), name="")
    session = tf.compat.v1.Session(graph=graph)
    for path in sorted((MIRROR / "coco" / "val2017").glob("*.jpg"))[:5]:
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        boxes, logits, graph_boxes, graph_scores, count = session.run(
            ["concat:0", "concat_1:0", "detection_boxes:0", "detection_scores:0", "num_detections:0"],
            {recipe.input.name + ":0": tensor, "image_tensor:0": np.zeros((1, 300, 300, 3), np.uint8)})
        ours = ssd_detections({"concat": boxes, "concat_1": logits}, recipe.postprocess, anchors)
        # The graph keeps scores down to 1e-8, we down to nms_score_threshold: compare the top 20 above it.
        n = min(20, int(np.sum(graph_scores[0][:int(count[0])] > recipe.postprocess.nms_score_threshold)))
        assert n > 0 and len(ours.scores) >= n
        np.testing.assert_allclose(ours.scores[:n], graph_scores[0][:n], rtol=1e-5)
        np.testing.assert_allclose(ours.boxes[:n], graph_boxes[0][:n], atol=1e-5)


def test_resampled_ap_with_unit_weights_is_pycocotools_ap(tmp_path):
    """The bootstrap's AP from COCOeval's per-image matches equals COCOeval's own, on a messy case."""
    from mzconvert.evaluate.cocometrics import bootstrap_weights, coco_scores

    rng = np.random.RandomState(1)
    truth_boxes = [[list(rng.uniform(0, 60, 2)) + list(rng.uniform(5, 40, 2)) for _ in range(rng.randint(0, 4))]
                   for _ in range(12)]
    truth = write_coco(tmp_path / "gt.json", truth_boxes)
    rows = []
    for i, boxes in enumerate(truth_boxes):
        for box in boxes:  # near-misses and exact hits, plus false positives, two categories
            rows.append(det(i + 1, [v + rng.normal(0, 3) for v in box], float(rng.uniform())))
        rows += [det(i + 1, list(rng.uniform(0, 60, 2)) + [10, 10], float(rng.uniform()), int(rng.randint(1, 3)))
                 for _ in range(3)]
    for categories in ([1], None):
        scores = coco_scores(truth, rows, categories)
        assert scores.ap(np.ones(12)) == pytest.approx(scores.summary["AP"], abs=1e-12)
    # An image drawn twice weighs as if it were in the data twice.
    weights = bootstrap_weights(12, samples=3)
    assert weights.shape == (3, 12) and (weights.sum(axis=1) == 12).all()


def test_ratio_interval_is_paired():
    from mzconvert.evaluate.cocometrics import ratio_interval

    same = np.linspace(0.5, 0.7, 200)
    assert ratio_interval(same, same) == [1.0, 1.0]
    low, high = ratio_interval(same * 0.9, same)
    assert low == pytest.approx(0.9) and high == pytest.approx(0.9)


def test_predictions_pair_every_image_with_its_own_predictions_across_chunks(tmp_path):
    """Models run one after another over chunks of images; each image must still get its own predictions."""
    from PIL import Image

    from mzconvert.evaluate.datasets import predictions

    paths = []
    for i in range(70):  # three chunks of 32, the last one short
        paths.append(tmp_path / f"{i:03}.png")
        Image.new("RGB", (4, 3), (i, 0, 0)).save(paths[-1])
    red = lambda image: int(image.pixels()[0, 0, 0])  # noqa: E731
    seen = list(predictions({"red": red, "name": lambda image: image.path.name}, paths))
    assert [image.path for image, _ in seen] == paths
    assert all(found == {"red": i, "name": f"{i:03}.png"} for i, (_, found) in enumerate(seen))


def test_the_report_counts_the_convolutions_onnx_runtime_leaves_float():
    """bench.json's integer_convs (ONNX): the CPU table shows them, and an integer variant with convolutions
    ORT runs in float is a warning (they run slower than the float model's)."""
    from mzconvert.report.markdown import _warnings
    from mzconvert.report.tables import bench_table

    timing = {"median_ms": 9.0, "p90_ms": 9.5, "peak_rss_mb": 90.0}
    bench = {"recipe": "r", "threads": 1, "runs": 3, "models": ["float32", "int8", "int8-tflite"],
             "results": {"float32": timing | {"integer_convs": [0, 52]}, "int8": timing | {"integer_convs": [37, 52]},
                         "int8-tflite": timing | {"integer_convs": None}}}
    table = bench_table(bench).splitlines()
    assert table[1].split()[-2:] == ["integer", "convs"]
    assert table[3].endswith("37 of 52") and table[4].endswith(" -")
    variants = {"int8": {"mode": "int8", "verify": {}}, "int8-tflite": {"mode": "int8", "verify": {}}}
    warned = _warnings({}, variants, bench)
    assert any("**int8**: ONNX Runtime runs 15 of its 52 convolutions in float" in line for line in warned)
    assert not any("int8-tflite" in line for line in warned)


def coco_folder(folder, categories: list[dict]):
    """A COCO folder (annotations/instances_val.json + val/) of one image, with these categories."""
    (folder / "annotations").mkdir(parents=True)
    (folder / "val").mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(folder / "val" / "a.jpg")
    (folder / "annotations" / "instances_val.json").write_text(json.dumps(
        {"images": [{"id": 3, "file_name": "a.jpg", "width": 8, "height": 8}], "annotations": [],
         "categories": categories}))
    return folder


@pytest.mark.parametrize("categories, labels, ids, scored", [
    # the recipe's ids name the categories its labels name: kept
    ([{"id": 1, "name": "person"}, {"id": 3, "name": "car"}], ("person", "car"), (1, 3), (1, 3)),
    # a model trained on the dataset with its classes in another order than the ids': by name
    ([{"id": 1, "name": "Hard_Hat"}, {"id": 2, "name": "head"}, {"id": 3, "name": "vest"}],
     ("head", "hard hat", "vest"), (1, 2, 3), (2, 1, 3)),
    # ids from 0, a supercategory first (as some exporters write them)
    ([{"id": 0, "name": "workers"}, {"id": 1, "name": "head"}, {"id": 2, "name": "helmet"}],
     ("helmet", "head"), (1, 2), (2, 1)),
    # labels that name no category (a model's class indices): by id
    ([{"id": 1, "name": "person"}, {"id": 2, "name": "bicycle"}], ("0", "1"), (1, 2), (1, 2)),
    # unused labels beside named ones at their ids (a 90-class SSD map): kept
    ([{"id": 1, "name": "person"}, {"id": 13, "name": "stop sign"}], ("person", "unused-12", "stop sign"),
     (1, 12, 13), (1, 12, 13)),
    # two categories of one name tell no id: kept
    ([{"id": 1, "name": "a"}, {"id": 2, "name": "A"}], ("b", "a"), (1, 2), (1, 2)),
], ids=["ids-agree", "other-order", "from-zero", "unnamed", "unused-labels", "ambiguous-names"])
def test_labels_are_scored_as_the_dataset_categories_they_name(categories, labels, ids, scored, tmp_path):
    from mzconvert.evaluate.datasets import CocoDataset

    dataset = CocoDataset.open(coco_folder(tmp_path, categories), "val")
    said = []
    assert dataset.scored_category_ids(labels, ids, said.append) == scored
    assert bool(said) == (scored != ids or labels == ("0", "1")), said  # a remap or unnamed labels are said


def test_a_label_naming_another_category_beside_unnamed_labels_is_refused(tmp_path):
    from mzconvert.errors import InputError
    from mzconvert.evaluate.datasets import CocoDataset

    dataset = CocoDataset.open(coco_folder(tmp_path, [{"id": 1, "name": "head"}, {"id": 2, "name": "helmet"}]),
                               "val")
    with pytest.raises(InputError, match="label 'head' is category 1 there, not 2.*'hat'.*category_ids"):
        dataset.scored_category_ids(("hat", "head"), (1, 2), print)


def test_a_share_counted_image_by_image_is_as_uncertain_as_its_images():
    """19 images whose 10 detections all match and one that loses its 10: 95 % of 200, but the misses are one
    image's, so the interval over image resamples reaches far lower than one over 200 independent detections
    (Wilson: 91.0-97.3 %); spread evenly over the images, it is about as wide as theirs."""
    from mzconvert.evaluate.cocometrics import share_interval

    clustered = np.array([[10, 10]] * 19 + [[0, 10]], np.float64)
    low, high = share_interval(clustered)
    assert low < 0.87 and high == 1.0, (low, high)
    spread = np.array([[19, 20]] * 10 + [[20, 20]] * 5 + [[18, 20]] * 5, np.float64)
    low, high = share_interval(spread)
    assert 0.93 < low < 0.95 < high < 0.97, (low, high)


def test_the_sign_test_counts_the_images_that_differ_and_no_others():
    """Wins and losses over the images where two models differ (ties left out), p the chance of at least so many
    wins among them when either is as likely: 5 of 5 is 1/32; 12 better and 4 worse is 0.038; a higher mean from a
    few large wins and more small losses is no win."""
    from mzconvert.evaluate.cocometrics import sign_test

    assert sign_test([1, 1, 1, 1, 1, 0.5, 0.5], [0, 0, 0, 0, 0, 0.5, 0.5]) == (5, 0, 1 / 32)
    wins, losses, p = sign_test([0.9] * 12 + [0.7] * 4 + [0.8] * 16, [0.8] * 32)
    assert (wins, losses) == (12, 4) and p == pytest.approx(0.0384, abs=1e-4)
    assert sign_test([1.0] * 3 + [0.7] * 6, [0.5] * 3 + [0.8] * 6)[2] > 0.9
    assert sign_test([0.5] * 4, [0.5] * 4) == (0, 0, 1.0)
