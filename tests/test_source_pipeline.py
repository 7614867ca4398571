"""A classifier that carries its own preprocessing (uint8 image of any size -> resize -> normalise -> net):
its end-to-end run is the ground truth our declared preprocessing must reproduce, on real images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MIRROR, run_cli

SIZE = 24
LABELS = ["a", "b", "c", "d", "e"]


def write_classifier(path: Path, resize: str) -> Path:
    """Frozen graph: image_tensor (uint8, any size) -> `resize` -> x*2/255-1 -> [input] -> conv net -> probs."""
    from mzconvert.quant.tflite_converter import tf_module

    tf = tf_module()
    rng = np.random.RandomState(3)
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.uint8, [1, None, None, 3], name="image_tensor")
        pixels = tf.cast(image, tf.float32)
        if resize == "tf1-bilinear":
            pixels = tf.compat.v1.image.resize_bilinear(pixels, [SIZE, SIZE])
        else:  # tf2-bilinear
            pixels = tf.image.resize(pixels, [SIZE, SIZE], method="bilinear")
        x = tf.identity(pixels * (2.0 / 255.0) - 1.0, name="input")
        w = tf.constant(rng.normal(0, 0.5, (3, 3, 3, 8)).astype(np.float32))
        x = tf.nn.relu(tf.nn.conv2d(x, w, [1, 2, 2, 1], "SAME"))
        x = tf.reduce_mean(x, axis=[1, 2])
        logits = tf.identity(tf.matmul(x, tf.constant(rng.normal(0, 2, (8, len(LABELS))).astype(np.float32))),
                             name="logits")
        tf.nn.softmax(logits, name="probabilities")
        path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


def recipe(folder: Path, model: Path, interpolation: str) -> Path:
    text = f"""name: own-resize
task: classification
description: classifier with its own resize
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
format: tf-frozen-graph
input: {{name: input, shape: [1, {SIZE}, {SIZE}, 3]}}
preprocess: {{interpolation: {interpolation}, scale: 0.00784313725490196, offset: -1.0}}
strip: {{inputs: [input], outputs: [logits]}}
labels: {LABELS}
source_pipeline: {{input: image_tensor, outputs: {{scores: probabilities}}, min_matched: 1.0}}
variants:
  - {{name: float32, mode: float32}}
verify: {{images: {MIRROR / 'coco' / 'val2017'}, count: 12}}
"""
    path = folder / "own-resize.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def classifier(tmp_path, mirror):
    return write_classifier(tmp_path / "model.pb", "tf1-bilinear")


def _build(tmp_path, recipe_path, *extra):
    return run_cli("--cache-dir", str(tmp_path / "cache"), "build", str(recipe_path), "--verify",
                   "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"), *extra)


def test_the_declared_resize_reproduces_the_source_end_to_end(tmp_path, classifier):
    done = _build(tmp_path, recipe(tmp_path, classifier, "tf1-bilinear"))
    assert done.returncode == 0, done.stderr[-2000:]
    fidelity = json.loads((tmp_path / "dist" / "own-resize" / "manifest.json").read_text())["source_pipeline_fidelity"]
    assert fidelity == {"matched_share": 1.0, "compared": 12, "images": 12, "worst_image": None,
                        "worst_image_share": 1.0, "what": "top-1 agreement"}
    assert "warning" not in done.stderr


def test_another_resize_is_warned_about_and_fails_verify_when_it_changes_answers(tmp_path, classifier):
    done = _build(tmp_path, recipe(tmp_path, classifier, "pil-nearest"))
    assert ("preprocess.interpolation is 'pil-nearest', but the source's own preprocessing (cut off by strip) "
            "resizes with tf1-bilinear") in done.stderr
    # Nearest-neighbour pixels flip the seeded net's answer on some of the 12 real images: --verify refuses.
    assert done.returncode == 1 and "source_pipeline.min_matched:" in done.stderr
    assert "% top-1 agreement (12 compared; worst image" in done.stderr


def test_eval_has_the_source_pipeline_row(tmp_path, classifier):
    recipe_path = recipe(tmp_path, classifier, "tf1-bilinear")
    assert _build(tmp_path, recipe_path).returncode == 0
    images = tmp_path / "images"
    for i, path in enumerate(sorted((MIRROR / "coco" / "val2017").glob("*.jpg"))[:10]):
        (images / LABELS[i % len(LABELS)]).mkdir(parents=True, exist_ok=True)
        (images / LABELS[i % len(LABELS)] / path.name).symlink_to(path)
    done = run_cli("--quiet", "--json", "eval", str(recipe_path), "--dataset", str(images),
                   "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert set(results) == {"source-graph", "float32", "source-pipeline"}
    assert results["source-pipeline"]["top1"] == results["float32"]["top1"]
    assert results["source-pipeline"]["top1_agreement"] == 1.0


def test_a_tf2_graph_is_recognised_as_tf2_bilinear(tmp_path, mirror):
    model = write_classifier(tmp_path / "model.pb", "tf2-bilinear")
    done = run_cli("--cache-dir", str(tmp_path / "cache"), "strip", str(recipe(tmp_path, model, "tf1-bilinear")),
                   "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resizes with tf2-bilinear" in done.stderr
