"""A detector head's Convs split into their box channels and the rest (freeze): YOLOv5's (ONNX sources) and a
MediaPipe-style SSD's regressors (.tflite sources).

Each level's Conv writes, per anchor, x, y, w, h logits, objectness and class logits into one tensor, so an
int8 model would hold box logits (a few units either side of 0) and objectness and class logits (far below 0
where nothing is: -12 in a YOLOv5n trained here) at one scale. Split into two Convs, `<output>/boxes` (4
channels per anchor) and `<output>/scores` (the rest), strip cuts at both and each gets a scale of its own; the
original tensor is rebuilt from them (Reshape, Concat, Reshape), so the frozen graph computes what the source
computes.

A MediaPipe-style SSD (BlazeFace, the pose and palm detectors) joins, level by level, each anchor's box offsets
and its keypoints (x, y each) into one output [1, anchors, 4 + 2 x keypoints]: in int8 one scale, which the
keypoints' range sets (MediaPipe's pose detector: within +-68 px for the boxes, +-780 px for keypoints at
anchors that detect nothing, 6 px a step for face boxes 20-40 px wide). Each level's regressor Conv is split
into its box channels and its keypoint channels, joined level by level into `<output>/boxes` and
`<output>/keypoints`, and the output rebuilt as their join; init's recipe cuts at both.
"""

from __future__ import annotations

import numpy as np

from ..errors import RecipeError
from ..recipe import Recipe
from ..recipe.schema import AnchorLevel
from ..tflite_file import (
    add_tensor,
    concatenation_op,
    constant_values,
    drop_unread_ops,
    drop_unused_tensors,
    new_operator,
    producers,
    reshape_op,
    schema,
)

BOX_CHANNELS = 4  # x, y, w, h per anchor


def split_levels(model, recipe: Recipe):
    """`model` (input shape fixed) with each of recipe.postprocess.levels' Convs split into its two parts."""
    import onnx

    levels = recipe.postprocess.levels if recipe.postprocess else ()
    if not levels:
        return model
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    weights = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    for index, level in enumerate(levels):
        where = f"{recipe.path}: postprocess.levels[{index}].output"
        position = next((i for i, n in enumerate(nodes) if level.output in n.output), None)
        conv = nodes[position] if position is not None else None
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in weights or \
                (len(conv.input) > 2 and conv.input[2] not in weights):
            found = f"made by a {conv.op_type}" if conv is not None else "not in the graph"
            raise RecipeError(f"{where}: {level.output} is {found}; a level is the output of a Conv with constant "
                              "weights (the head's per-anchor boxes, objectness and classes)")
        nodes[position:position + 1] = _split(conv, level, weights, shapes.get(level.output), where, model)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _split(conv, level: AnchorLevel, weights: dict, shape: list[int] | None, where: str, model) -> list:
    """The two Convs of `level` and the nodes rebuilding its output from them."""
    from onnx import helper, numpy_helper

    weight = numpy_helper.to_array(weights[conv.input[1]])
    bias = numpy_helper.to_array(weights[conv.input[2]]) if len(conv.input) > 2 else np.zeros(weight.shape[0],
                                                                                             weight.dtype)
    anchors = len(level.anchors) // 2
    per_anchor = weight.shape[0] // anchors
    if weight.shape[0] % anchors or per_anchor <= BOX_CHANNELS + 1 or not shape or len(shape) != 4:
        raise RecipeError(f"{where}: {level.output} has {weight.shape[0]} channels, not {anchors} anchors x (5 + "
                          "classes) channels")
    channel = np.arange(weight.shape[0]).reshape(anchors, per_anchor)
    parts = {"boxes": channel[:, :BOX_CHANNELS].ravel(), "scores": channel[:, BOX_CHANNELS:].ravel()}
    made, flat = [], []
    for (part, rows), name in zip(parts.items(), level.parts):
        stem = f"{level.output}/{part}"
        model.graph.initializer.extend([numpy_helper.from_array(weight[rows], f"{stem}/weight"),
                                        numpy_helper.from_array(bias[rows], f"{stem}/bias")])
        made.append(helper.make_node("Conv", [conv.input[0], f"{stem}/weight", f"{stem}/bias"], [name],
                                     name=f"{conv.name or stem}/{part}", **{a.name: helper.get_attribute_value(a)
                                                                           for a in conv.attribute}))
        per_part = len(rows) // anchors
        made.append(_reshape(name, [1, anchors, per_part, shape[2] * shape[3]], f"{stem}/flat", model))
        flat.append(f"{stem}/flat")
    joined = f"{level.output}/joined"
    made.append(helper.make_node("Concat", flat, [joined], axis=2, name=joined))
    made.append(_reshape(joined, shape, level.output, model))
    return made


def _reshape(source: str, shape: list[int], target: str, model):
    from onnx import helper, numpy_helper

    model.graph.initializer.append(numpy_helper.from_array(np.asarray(shape, np.int64), f"{target}/shape"))
    return helper.make_node("Reshape", [source, f"{target}/shape"], [target], name=f"{target}/reshape")


# -- .tflite: a MediaPipe-style SSD's regressors ---------------------------------------------------------------
def regressor_parts(output: str) -> tuple[str, str]:
    """The tensors a split regressor output is made of: its boxes and its keypoints."""
    return f"{output}/boxes", f"{output}/keypoints"


def tflite_regressor_levels(model, output: int, producer: dict) -> list[tuple] | None:
    """[(CONV_2D op, RESHAPE op) of each level] when `output` ([1, N, values], float, values 4 + an even count) is
    a CONCATENATION on its anchors of each level's CONV_2D output (float weights and bias), [1, rows, columns,
    anchors x values], reshaped to [1, rows x columns x anchors, values], or one level's such output (BlazeFace
    full range: no join); else None. `producer`: tflite_file.producers."""
    s = schema()
    graph = model.subgraphs[0]
    shape = [int(d) for d in graph.tensors[output].shape]
    name, join = producer.get(output, (None, None))
    if len(shape) != 3 or shape[2] <= BOX_CHANNELS or shape[2] % 2 or name not in ("CONCATENATION", "RESHAPE") \
            or name == "CONCATENATION" and (join.builtinOptions.axis % 3 != 1
                                            or join.builtinOptions.fusedActivationFunction):
        return None
    levels = []
    for flat in join.inputs if name == "CONCATENATION" else [output]:
        reshape_name, reshape = producer.get(flat, (None, None))
        conv_name, conv = producer.get(reshape.inputs[0], (None, None)) if reshape_name == "RESHAPE" else (None, None)
        if conv_name != "CONV_2D" or len(conv.inputs) < 2:
            return None
        level = [int(d) for d in graph.tensors[conv.outputs[0]].shape]
        weights = [i for i in conv.inputs[1:] if i >= 0]
        if len(level) != 4 or level[3] % shape[2] or [int(d) for d in graph.tensors[flat].shape] != \
                [1, level[1] * level[2] * level[3] // shape[2], shape[2]] or any(
                graph.tensors[i].type != s.TensorType.FLOAT32 or constant_values(model, i, "<f4") is None
                for i in weights):
            return None
        levels.append((conv, reshape))
    return levels


def tflite_split_regressors(model) -> int:
    """`model` (a float ModelT) with each output of subgraph 0 that tflite_regressor_levels finds made of its
    levels' box channels and keypoint channels, each joined on its own (regressor_parts), then joined on the last
    axis into the output as before; returns how many outputs were rewritten."""
    graph = model.subgraphs[0]
    rewritten = 0
    for output in list(graph.outputs):
        producer = producers(model)
        levels = tflite_regressor_levels(model, output, producer)
        if levels is None:
            continue
        join = producer[output][1]  # the levels' CONCATENATION, or the one level's RESHAPE
        position = next(i for i, o in enumerate(graph.operators) if o is join)
        graph.operators[position:position + 1] = _tflite_regressor_parts(model, levels, output)
        drop_unread_ops(graph, [op for level in levels for op in level])
        rewritten += 1
    if rewritten:
        drop_unused_tensors(model)
    return rewritten


def _bias(conv) -> int:
    return conv.inputs[2] if len(conv.inputs) > 2 else -1


def _tflite_regressor_parts(model, levels: list[tuple], output: int) -> list:
    """The ops that make `output` ([1, N, values]) of `levels`' Convs split into box and keypoint channels."""
    s = schema()
    graph = model.subgraphs[0]
    values = int(graph.tensors[output].shape[2])
    count = int(graph.tensors[output].shape[1])
    ops, parts = [], []
    for part, columns in zip(regressor_parts(graph.tensors[output].name.decode()),
                             (np.arange(BOX_CHANNELS), np.arange(BOX_CHANNELS, values))):
        flats = []
        for number, (conv, _) in enumerate(levels):
            _, rows, cols, channels = (int(d) for d in graph.tensors[conv.outputs[0]].shape)
            anchors = channels // values
            kept = (np.arange(anchors)[:, None] * values + columns).ravel()
            stem = f"{part}/level{number}".encode()
            weights, bias = (add_tensor(model, stem + suffix, [len(kept), *graph.tensors[i].shape[1:]],
                                        constant_values(model, i, "<f4")[kept]) if i >= 0 else -1
                             for suffix, i in ((b"/weights", conv.inputs[1]), (b"/bias", _bias(conv))))
            mapped = add_tensor(model, stem + b"/map", [1, rows, cols, len(kept)])
            split = new_operator(model, s.BuiltinOperator.CONV_2D, [conv.inputs[0], weights, bias], [mapped],
                                 conv.builtinOptionsType, conv.builtinOptions)
            split.opcodeIndex = conv.opcodeIndex
            shape = [1, rows * cols * anchors, len(columns)]
            flats.append(add_tensor(model, part.encode() if len(levels) == 1 else stem, shape))
            ops += [split, reshape_op(model, mapped, shape, flats[-1], stem + b"/shape")]
        if len(levels) == 1:
            parts += flats
        else:
            parts.append(add_tensor(model, part.encode(), [1, count, len(columns)]))
            ops.append(concatenation_op(model, flats, parts[-1], axis=1))
    ops.append(concatenation_op(model, parts, output, axis=2))
    return ops
