"""A YOLOv5-style head's Convs split into their box and score channels (freeze, ONNX sources).

Each level's Conv writes, per anchor, x, y, w, h logits, objectness and class logits into one tensor, so an
int8 model would hold box logits (a few units either side of 0) and objectness and class logits (far below 0
where nothing is: -12 in a YOLOv5n trained here) at one scale. Split into two Convs, `<output>/boxes` (4
channels per anchor) and `<output>/scores` (the rest), strip cuts at both and each gets a scale of its own; the
original tensor is rebuilt from them (Reshape, Concat, Reshape), so the frozen graph computes what the source
computes.
"""

from __future__ import annotations

import numpy as np

from ..errors import RecipeError
from ..recipe import Recipe
from ..recipe.schema import AnchorLevel

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
