"""A Split that takes apart what Concats joined, rewritten so the parts are never joined (freeze, ONNX sources).

Ultralytics' YOLOv8 heads up to 8.3 join each level's box logits and class logits (Concat on the channel axis),
flatten each level (Reshape to [N, C, H x W]), join the levels (Concat) and Split the channels into boxes and
classes again. An int8 model gives a joined tensor one scale: a Concat's inputs and output share it in LiteRT,
ONNX Runtime requantizes them to it. So box logits (-6 to 20 on NudeNet's YOLOv8n) took the step of a range
that the class logits (down to -19) widened, 1.5x coarser, and the class logits that of the box logits' top,
where a sigmoid's bound (-8 to 8) gives them steps 2.4x finer. Rewritten, each part is flattened and joined
level by level on its own (Reshape, Concat) into the tensor of the Split's output name: the same values, so
every recipe's cut names what it named, and no scale is shared.
"""

from __future__ import annotations

import numpy as np


def split_joins_apart(model):
    """`model` (its input shape fixed) with every Split whose parts are what Concats joined (see the module)
    rewritten into those parts' own Reshapes and Concats; the nodes nothing reads any more left out."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_for_inference(model), data_prop=True)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer} | {
        node.output[0]: onnx.numpy_helper.to_array(node.attribute[0].t) for node in model.graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"}
    producer = {out: node for node in model.graph.node for out in node.output}
    rewritten = False
    for split in [n for n in model.graph.node if n.op_type == "Split"]:
        joined = _joined_levels(split, producer, shapes, constants)
        if joined is not None:
            _rewrite(model.graph, split, *joined, shapes)
            rewritten = True
    return _without_unread(model) if rewritten else model


# The opset from which shape inference gives a Reshape the shape its shape input computes (an unsimplified
# export computes it from the tensor's own Shape; at opset 13 the Reshape's output is left unknown)
DATA_PROPAGATING_OPSET = 14


def _for_inference(model):
    """A copy of `model` whose shapes inference fills in from the fixed input: without the export's own shapes
    (they keep its dynamic dimensions), at an opset that propagates computed shapes (converted up where older,
    when it can be)."""
    import onnx
    from onnx import version_converter

    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    del bare.graph.value_info[:]
    opset = max((o.version for o in bare.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < DATA_PROPAGATING_OPSET:
        try:
            bare = version_converter.convert_version(bare, DATA_PROPAGATING_OPSET)
        except Exception:  # the converter raises its own errors for ops it cannot adapt; shapes stay unknown then
            pass
    return bare


def _axis(node, rank: int, default: int = 0) -> int:
    axis = next((a.i for a in node.attribute if a.name == "axis"), default)
    return axis + rank if axis < 0 else axis


def _split_sizes(split, shapes: dict, constants: dict) -> list[int] | None:
    """The sizes a Split cuts its input into along its axis, where they are constant."""
    if len(split.input) > 1 and split.input[1]:
        sizes = constants.get(split.input[1])
        return None if sizes is None else [int(s) for s in sizes]
    sizes = next((list(a.ints) for a in split.attribute if a.name == "split"), None)
    if sizes:
        return sizes
    shape = shapes.get(split.input[0])
    if not shape or shape[_axis(split, len(shape))] is None:
        return None
    whole = shape[_axis(split, len(shape))]
    return [whole // len(split.output)] * len(split.output) if whole % len(split.output) == 0 else None


def _joined_levels(split, producer: dict, shapes: dict, constants: dict) -> tuple[int, list] | None:
    """(the axis the levels are joined on, [(the level's Concat, its batch size)] for each level), when the Split
    cuts along axis 1 exactly at the channels each level's Concat joined (on axis 1, then flattened by a
    Reshape to [N, C, H x W]), and the levels are joined on another axis; else None."""
    joined = producer.get(split.input[0])
    shape = shapes.get(split.input[0])
    sizes = _split_sizes(split, shapes, constants)
    if joined is None or joined.op_type != "Concat" or not shape or len(shape) != 3 or sizes is None \
            or _axis(split, 3) != 1 or _axis(joined, 3) == 1 or not all(split.output):
        return None
    levels = []
    for flat_name in joined.input:
        flat, flat_shape = producer.get(flat_name), shapes.get(flat_name)
        level = producer.get(flat.input[0]) if flat is not None and flat.op_type == "Reshape" else None
        level_shape = shapes.get(level.output[0]) if level is not None else None
        if level is None or level.op_type != "Concat" or not level_shape or len(level_shape) < 3 \
                or _axis(level, len(level_shape)) != 1 or None in level_shape or not flat_shape \
                or flat_shape != [level_shape[0], level_shape[1], int(np.prod(level_shape[2:]))]:
            return None
        if [(shapes.get(part) or [None, None])[1] for part in level.input] != sizes:
            return None
        levels.append((level, level_shape[0]))
    return next(a.i for a in joined.attribute if a.name == "axis"), levels


def _rewrite(graph, split, joined_axis: int, levels: list, shapes: dict) -> None:
    """Each output of `split` made anew: its part of every level flattened and the levels joined as before."""
    from onnx import helper, numpy_helper

    position = list(graph.node).index(split)
    made = []
    for index, part_name in enumerate(split.output):
        flats = []
        for number, (level, batch) in enumerate(levels):
            part = level.input[index]
            flat, shape = f"{part_name}/level{number}", f"{part_name}/level{number}/shape"
            channels = shapes[part][1]
            graph.initializer.append(numpy_helper.from_array(np.array([batch, channels, -1], np.int64), shape))
            made.append(helper.make_node("Reshape", [part, shape], [flat], name=flat))
            flats.append(flat)
        made.append(helper.make_node("Concat", flats, [part_name], name=f"{part_name}/joined", axis=joined_axis))
    graph.node.remove(split)
    for offset, node in enumerate(made):
        graph.node.insert(position + offset, node)


def _without_unread(model):
    """The model without the nodes whose outputs no node and no graph output reads (and their constants, also
    where an old export lists them as graph inputs too)."""
    graph = model.graph
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unread = [n for n in graph.node if not any(out in read for out in n.output)]
        if not unread:
            break
        for node in unread:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for initializer in [i for i in graph.initializer if i.name not in read]:
        graph.initializer.remove(initializer)
        for listed in [i for i in graph.input if i.name == initializer.name]:
            graph.input.remove(listed)
    return model
