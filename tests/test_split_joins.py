"""An older YOLOv8 head joins each level's box and class logits, flattens and joins the levels, and Splits boxes
from classes again (an ONNX export), or slices them (its .tflite): freeze rewrites either into parts never
joined, so int8 never gives boxes and class logits one scale (backends/split_joins.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mzconvert.backends.split_joins import onnx_split_joins_apart, tflite_split_joins_apart
from mzconvert.runtime import TFLiteRunner
from mzconvert.tflite_file import op_names, read_model, write_model
from tests.conftest import MIRROR, run_cli

SIZE, STRIDES, BOX_CHANNELS, CLASSES, CLASS_BIAS = 64, (8, 16, 32), 64, 3, 15.0


def joined_head_onnx(path: Path, sizes: tuple[int, int] | None = None, split_axis: int = 1,
                     sizes_as: str = "initializer", computed_shape: bool = True, classes: int = CLASSES,
                     opset: int = 17) -> Path:
    """A head as Ultralytics up to 8.3 exports it: per level a box Conv (logits near 0) and a class Conv (far
    below 0, as a trained detector's where nothing is) joined on the channel axis, flattened by a Reshape (its
    shape computed from the input's batch as an unsimplified export computes it, or constant as a simplified one
    has it), the levels joined, then a Split of `sizes` (the box and class channels unless given) along
    `split_axis`, the sizes an `initializer` or a `constant-node` at `opset`, or `num_outputs` (opset 18: equal
    parts), and a Sigmoid."""
    sizes = sizes or (BOX_CHANNELS, classes)
    rng = np.random.RandomState(5)
    arrays, nodes, flats = {}, [], []
    if computed_shape:
        arrays |= {"zero": np.array(0, np.int64), "axes": np.array([0], np.int64),
                   "rest": np.array([BOX_CHANNELS + classes, -1], np.int64)}
        nodes += [helper.make_node("Shape", ["images"], ["input_shape"]),
                  helper.make_node("Gather", ["input_shape", "zero"], ["batch"], axis=0),
                  helper.make_node("Unsqueeze", ["batch", "axes"], ["batch_1d"]),
                  helper.make_node("Concat", ["batch_1d", "rest"], ["flat_shape"], axis=0)]
    else:
        arrays["flat_shape"] = np.array([1, BOX_CHANNELS + classes, -1], np.int64)
    for s in STRIDES:
        arrays[f"wb{s}"] = rng.normal(0, 0.05, (BOX_CHANNELS, 3, s, s))
        arrays[f"wc{s}"] = rng.normal(0, 0.05, (classes, 3, s, s))
        arrays[f"bc{s}"] = np.full(classes, -CLASS_BIAS)
        nodes += [helper.make_node("Conv", ["images", f"wb{s}"], [f"box{s}"], strides=[s, s]),
                  helper.make_node("Conv", ["images", f"wc{s}", f"bc{s}"], [f"cls{s}"], strides=[s, s]),
                  helper.make_node("Concat", [f"box{s}", f"cls{s}"], [f"level{s}"], axis=1),
                  helper.make_node("Reshape", [f"level{s}", "flat_shape"], [f"flat{s}"])]
        flats.append(f"flat{s}")
    nodes.append(helper.make_node("Concat", flats, ["joined"], axis=2))
    if sizes_as == "constant-node":
        nodes.append(helper.make_node("Constant", [], ["sizes"], value=numpy_helper.from_array(
            np.array(sizes, np.int64))))
    elif sizes_as == "initializer":
        arrays["sizes"] = np.array(sizes, np.int64)
    if sizes_as != "num_outputs":
        nodes.append(helper.make_node("Split", ["joined", "sizes"], ["box_logits", "class_logits"], axis=split_axis))
    else:
        nodes.append(helper.make_node("Split", ["joined"], ["box_logits", "class_logits"], axis=split_axis,
                                      num_outputs=2))
    nodes.append(helper.make_node("Sigmoid", ["class_logits"], ["probabilities"]))
    graph = helper.make_graph(
        nodes, "joined-head", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, None, None]) for n in ("box_logits", "probabilities")],
        [numpy_helper.from_array(a if a.dtype == np.int64 else a.astype(np.float32), n) for n, a in arrays.items()])
    opset = 18 if sizes_as == "num_outputs" else opset
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def outputs_of(model, image: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString()).run(None, {"images": image})


@pytest.mark.parametrize("sizes_as, computed_shape, opset", [
    ("initializer", True, 17), ("initializer", True, 13), ("initializer", False, 17), ("constant-node", True, 17),
    ("num_outputs", True, 18)],
    ids=["shape-computed", "shape-computed-opset-13", "shape-constant", "sizes-a-constant-node", "num-outputs"])
def test_a_split_of_joined_levels_becomes_the_parts_joined_apart_with_the_same_values(tmp_path, sizes_as,
                                                                                      computed_shape, opset):
    """Each output of the Split is made by a Concat of its own part of every level, flattened: the values the
    Split gave, the recipe's names kept, nothing left of the joins."""
    classes = BOX_CHANNELS if sizes_as == "num_outputs" else CLASSES  # num_outputs: equal parts
    source = onnx.load(str(joined_head_onnx(tmp_path / "head.onnx", sizes_as=sizes_as, computed_shape=computed_shape,
                                            classes=classes, opset=opset)))
    image = np.random.RandomState(0).rand(1, 3, SIZE, SIZE).astype(np.float32)
    before = outputs_of(source, image)
    rewritten = onnx_split_joins_apart(source)
    onnx.checker.check_model(rewritten)
    ops = [node.op_type for node in rewritten.graph.node]
    assert "Split" not in ops and "Shape" not in ops, ops
    producer = {out: node for node in rewritten.graph.node for out in node.output}
    for name, branch in (("box_logits", "box"), ("class_logits", "cls")):
        joined = producer[name]
        assert joined.op_type == "Concat"
        assert [producer[i].op_type for i in joined.input] == ["Reshape"] * len(STRIDES)
        assert [producer[i].input[0] for i in joined.input] == [f"{branch}{s}" for s in STRIDES]
    for expected, got in zip(before, outputs_of(rewritten, image)):
        assert np.array_equal(expected, got)


@pytest.mark.parametrize("sizes, split_axis", [((BOX_CHANNELS + 1, CLASSES - 1), 1), ((21, 63), 2)],
                         ids=["not-at-the-parts", "along-the-cells"])
def test_a_split_that_does_not_undo_the_joins_is_left_as_it_is(tmp_path, sizes, split_axis):
    source = onnx.load(str(joined_head_onnx(tmp_path / "head.onnx", sizes, split_axis)))
    kept = onnx.ModelProto()
    kept.CopyFrom(source)
    assert onnx_split_joins_apart(source) == kept


def joined_head_tflite(path: Path, cut: str = "slices") -> Path:
    """The same head as a float .tflite in NHWC, as onnx2tf ports it: each level's parts joined on the channels,
    transposed to NCHW and flattened, the levels joined; boxes and classes cut by two STRIDED_SLICEs (`slices`)
    or one SPLIT_V (`split`); its signature's outputs box_logits and probabilities."""
    import tensorflow as tf

    rng = np.random.RandomState(5)
    weights = {s: (rng.normal(0, 0.05, (s, s, 3, BOX_CHANNELS)).astype(np.float32),
                   rng.normal(0, 0.05, (s, s, 3, CLASSES)).astype(np.float32)) for s in STRIDES}

    @tf.function(input_signature=[tf.TensorSpec([1, SIZE, SIZE, 3], tf.float32, name="images")])
    def head(images):
        flats = []
        for s in STRIDES:
            box = tf.nn.conv2d(images, weights[s][0], strides=s, padding="VALID")
            cls = tf.nn.conv2d(images, weights[s][1], strides=s, padding="VALID") - CLASS_BIAS
            level = tf.transpose(tf.concat([box, cls], axis=3), [0, 3, 1, 2])
            flats.append(tf.reshape(level, [1, BOX_CHANNELS + CLASSES, -1]))
        joined = tf.concat(flats, axis=2)
        boxes, classes = (tf.split(joined, [BOX_CHANNELS, CLASSES], axis=1) if cut == "split"
                          else (joined[:, :BOX_CHANNELS, :], joined[:, BOX_CHANNELS:, :]))
        return {"box_logits": boxes, "probabilities": tf.sigmoid(classes)}

    module = tf.Module()
    module.head = head
    tf.saved_model.save(module, str(path.with_suffix(".saved")), signatures=head.get_concrete_function())
    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(path.with_suffix(".saved"))).convert())
    return path


def signature_outputs(path: Path) -> dict[str, str]:
    """{signature output key: its tensor's name} of a .tflite's one signature."""
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()
    return {key: detail["name"] for key, detail in runner.get_output_details().items()}


@pytest.mark.parametrize("cut", ["slices", "split"])
def test_a_tflite_heads_slices_of_joined_levels_become_the_parts_joined_apart(tmp_path, cut):
    source = joined_head_tflite(tmp_path / "head.tflite", cut)
    model = read_model(source)
    sliced = {"slices": "STRIDED_SLICE", "split": "SPLIT_V"}[cut]
    assert sliced in op_names(model)
    assert tflite_split_joins_apart(model) == (2 if cut == "slices" else 1)
    names = op_names(model)
    assert sliced not in names and names.count("CONCATENATION") == 2, names  # each part's levels joined
    image = np.random.RandomState(0).rand(1, SIZE, SIZE, 3).astype(np.float32)
    before, after = TFLiteRunner(source), TFLiteRunner(write_model(model, tmp_path / "apart.tflite"))
    assert [o.name for o in after.outputs] == [o.name for o in before.outputs]
    for expected, got in zip(before.run(image), after.run(image)):
        assert np.array_equal(expected, got)
    assert signature_outputs(tmp_path / "apart.tflite") == signature_outputs(source)  # what a signature runner reads


@pytest.mark.parametrize("source_format", ["onnx", "tflite"])
def test_int8_gives_the_box_logits_of_a_joined_head_a_scale_of_their_own(tmp_path, mirror, source_format):
    """Built int8 from the joined head (ONNX: TFLite and ONNX int8; a .tflite: TFLite int8): its box logits (a few
    units either side of 0) are quantized at a step of their own range, not at that of the joined tensor, which
    reaches the class logits at -15 (the class Convs' bias) and below. An ONNX source's float32 TFLite (onnx2tf's
    port of the rewritten head) passes the float floors against the source graph."""
    floors = "min_matched: 0, min_slice_sqnr_db: -100"
    train, val = MIRROR / "coco" / "train2017", MIRROR / "coco" / "val2017"
    int8 = f"mode: int8, calibration: {train}, calibration_count: 8, {floors}"
    if source_format == "onnx":
        model = joined_head_onnx(tmp_path / "head.onnx")
        source = f"format: onnx\ninput: {{name: images, shape: [1, 3, {SIZE}, {SIZE}], layout: NCHW}}"
        strip, (box_output, class_output) = "strip: {inputs: [images], outputs: [box_logits, probabilities]}", \
            ("box_logits", "probabilities")
        onnx_variants = f"  - {{name: f32-tflite, mode: float32, target: tflite}}\n  - {{name: i8, io_dtype: float32, {int8}}}"
    else:
        model = joined_head_tflite(tmp_path / "head.tflite")
        source = f"format: tflite\ninput: {{name: serving_default_images:0, shape: [1, {SIZE}, {SIZE}, 3], layout: NHWC}}"
        outputs = signature_outputs(model)
        strip, box_output, class_output = "", outputs["box_logits"], outputs["probabilities"]
        onnx_variants = ""
    (tmp_path / "head.yaml").write_text(f"""name: head
task: detection
description: an older YOLOv8 head made in the test, its levels joined and Split again
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
{source}
preprocess: {{interpolation: cv2-linear, letterbox: true, scale: 0.00392156862745098, offset: 0.0}}
{strip}
postprocess: {{kind: yolov8, labels: [person, car, dog], box_output: {box_output}, class_output: {class_output},
              box_encoding: dfl}}
variants:
  - {{name: float32, mode: float32}}
{onnx_variants}
  - {{name: i8-tflite, target: tflite, io_dtype: int8, {int8}}}
verify: {{images: {val}, count: 4}}
""")
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "head.yaml"), *where)
    assert done.returncode == 0, done.stderr[-3000:]
    files = {name: tmp_path / "dist" / "head" / v["file"]
             for name, v in json.loads(done.stdout)["head"]["variants"].items()}
    box_only = CLASS_BIAS / 255  # a scale shared with the class logits reaches below -CLASS_BIAS
    from ai_edge_litert.interpreter import Interpreter

    (box,) = [d for d in Interpreter(model_path=str(files["i8-tflite"])).get_output_details()
              if d["name"] == box_output]
    assert 0 < box["quantization"][0] < box_only, box["quantization"]
    if source_format == "tflite":
        return
    int8 = onnx.load(str(files["i8"]))
    constants = {i.name: numpy_helper.to_array(i) for i in int8.graph.initializer}
    producer = {out: node for node in int8.graph.node for out in node.output}
    steps, pending = [], ["box_logits"]
    while pending:  # every quantization between the box Convs and the output
        node = producer.get(pending.pop())
        if node is None or node.op_type == "Conv":
            continue
        if node.op_type == "QuantizeLinear":
            steps.append(float(constants[node.input[1]]))
        pending += [i for i in node.input if i in producer]
    assert steps and max(steps) < box_only, steps
