"""Tiny real TensorFlow graphs built in code: an SSD-shaped detector with pre/post-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT = "FeatureExtractor/input"
OUTPUTS = ("boxes", "logits")
SIZE = 32
ANCHORS = 64  # 8x8 feature map after two stride-2 convolutions, one anchor per cell


def _build_graph(tf, fake_quant: bool, damaged: bool = False, residual: bool = False, od_names: bool = False):
    """uint8 image -> preprocessing -> [cut here] -> conv net -> raw SSD-like heads -> sigmoid postproc.

    damaged: conv1's last channel is always 0, and conv2 weighs it 1000 in its first output channel; the
    float net does not notice, but per-channel int8 weights of that channel round to nothing but it.
    residual: conv2 is followed by a MobileNetV2-like residual block, a linear 1x1 projection added to it.
    od_names: the raw outputs and anchors also go by the TF Object Detection API's names."""
    image = tf.compat.v1.placeholder(tf.uint8, [1, SIZE, SIZE, 3], name="image_tensor")
    x = tf.cast(image, tf.float32) * (2.0 / 255.0) - 1.0
    x = tf.identity(x, name=INPUT)
    rng = np.random.RandomState(0)

    def conv(x, out_channels, stride, name, head=False):
        weights = rng.normal(0, 0.3, (3, 3, int(x.shape[-1]), out_channels)).astype(np.float32)
        biases = rng.normal(0, 0.1, out_channels).astype(np.float32)
        if damaged and name == "conv1":
            weights[..., -1], biases[-1] = 0.0, 0.0
        if damaged and name == "conv2":
            weights[1, 1, -1, 0] = 1000.0
        w = tf.compat.v1.get_variable(f"{name}/weights", initializer=weights)
        b = tf.compat.v1.get_variable(f"{name}/biases", initializer=biases)
        if fake_quant:
            w = tf.quantization.fake_quant_with_min_max_vars(w, -1.0, 1.0, name=f"{name}/wq")
        y = tf.nn.conv2d(x, w, [1, stride, stride, 1], "SAME", name=f"{name}/Conv2D") + b
        y = y - 3.0 if head else tf.nn.relu6(y)  # heads: raw values, mostly negative logits
        if fake_quant:
            y = tf.quantization.fake_quant_with_min_max_vars(y, -12.0, 6.0, name=f"{name}/aq")
        return y

    if fake_quant:
        x = tf.quantization.fake_quant_with_min_max_vars(x, -1.0, 1.0, name="input_q")
    x = conv(x, 8, 2, "conv1")
    x = conv(x, 16, 2, "conv2")
    if residual:
        weights = rng.normal(0, 0.3, (1, 1, 16, 16)).astype(np.float32)
        projection = tf.nn.conv2d(x, tf.compat.v1.get_variable("residual/weights", initializer=weights),
                                  [1, 1, 1, 1], "SAME")
        x = tf.add(tf.identity(projection, name="residual/project"), x, name="residual")
    boxes = tf.reshape(conv(x, 4, 1, "box_head", head=True), [1, -1, 1, 4], name=OUTPUTS[0])
    logits = tf.reshape(conv(x, 2, 1, "class_head", head=True), [1, -1, 2], name=OUTPUTS[1])
    ys, xs = np.meshgrid((np.arange(8) + 0.5) / 8, (np.arange(8) + 0.5) / 8, indexing="ij")
    centers = np.stack([ys.ravel(), xs.ravel()], 1)
    anchors = np.concatenate([centers - 0.1, centers + 0.1], 1).astype(np.float32)
    tf.constant(anchors, name="anchors")
    tf.sigmoid(logits, name="scores")  # post-processing that strip removes
    if od_names:
        tf.identity(tf.reshape(boxes, [1, -1, 1, 4]), name="concat")
        tf.identity(tf.reshape(logits, [1, -1, 2]), name="concat_1")
        tf.identity(tf.constant(anchors), name="Concatenate/concat")


def write_tiny_detector(folder: Path, fake_quant: bool = False, damaged: bool = False, residual: bool = False,
                        od_names: bool = False) -> dict[str, Path]:
    """Writes frozen.pb, a checkpoint (model.ckpt.*) and a SavedModel of the same graph."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default():
        _build_graph(tf, fake_quant, damaged, residual, od_names)
        saver = tf.compat.v1.train.Saver()
        with tf.compat.v1.Session() as session:
            session.run(tf.compat.v1.global_variables_initializer())
            ckpt_dir = folder / "checkpoint"
            ckpt_dir.mkdir(exist_ok=True)
            saver.save(session, str(ckpt_dir / "model.ckpt"))
            frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
                session, graph.as_graph_def(), list(OUTPUTS) + ["anchors", "scores"]
                + (["concat", "concat_1", "Concatenate/concat"] if od_names else []))
            (folder / "frozen.pb").write_bytes(frozen.SerializeToString())
            builder = tf.compat.v1.saved_model.Builder(str(folder / "saved_model"))
            builder.add_meta_graph_and_variables(session, ["serve"])
            builder.save()
    return {"frozen": folder / "frozen.pb", "checkpoint": ckpt_dir, "saved_model": folder / "saved_model"}


def tiny_recipe_text(source_path: Path, digest: str, fmt: str = "tf-frozen-graph", variants: str | None = None,
                     images: Path | None = None, name: str = "tiny") -> str:
    variants = variants or "  - {name: float32, mode: float32}\n"
    verify = f"verify:\n  images: {images}\n" if images else ""
    return f"""name: {name}
task: detection
description: tiny SSD-shaped test graph
license: test
source:
  url: {source_path.as_uri()}
  sha256: {digest}
format: {fmt}
input:
  name: {INPUT}
  shape: [1, {SIZE}, {SIZE}, 3]
preprocess:
  interpolation: tf1-bilinear
  scale: 0.00784313725490196
  offset: -1.0
strip:
  outputs: [{OUTPUTS[0]}, {OUTPUTS[1]}]
postprocess:
  kind: ssd
  anchors_tensor: anchors
  box_coder_scales: [10, 10, 5, 5]
  box_output: {OUTPUTS[0]}
  class_output: {OUTPUTS[1]}
  labels: [thing]
variants:
{variants}{verify}"""
