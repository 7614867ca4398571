"""A Split that takes apart what Concats joined, rewritten so the parts are never joined (freeze: ONNX sources, and
float .tflite sources, where onnx2tf's port slices what it joined in NHWC).

Ultralytics' YOLOv8 heads up to 8.3 join each level's box logits and class logits (Concat on the channel axis),
flatten each level (Reshape to [N, C, H x W]), join the levels (Concat) and Split the channels into boxes and
classes again. An int8 model gives a joined tensor one scale: a Concat's inputs and output share it in LiteRT,
ONNX Runtime requantizes them to it. So box logits (-6 to 20 on NudeNet's YOLOv8n) took the step of a range
that the class logits (down to -19) widened, 1.5x coarser, and the class logits that of the box logits' top,
where a sigmoid's bound (-8 to 8) gives them steps 2.4x finer. Rewritten, each part is flattened and joined
level by level on its own (Reshape, Concat) into the tensor of the Split's output name: the same values, so
every recipe's cut names what it named, and no scale is shared. In a .tflite (onnx2tf's port, as Ultralytics'
own TFLite export up to 8.3 is) the levels are joined in NHWC, transposed to NCHW, flattened, joined, and the
parts cut by STRIDED_SLICE or SPLIT_V; each part is then transposed, flattened and joined on its own.
"""

from __future__ import annotations

import numpy as np

from ..tflite_file import (
    add_tensor,
    concatenation_op,
    constant_values,
    drop_unread_ops,
    drop_unused_tensors,
    new_operator,
    op_names,
    producers,
    reshape_op,
    schema,
)


# -- ONNX ------------------------------------------------------------------------------------------------------
def onnx_split_joins_apart(model):
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


# -- .tflite ---------------------------------------------------------------------------------------------------
NCHW_FROM_NHWC = [0, 3, 1, 2]


def tflite_split_joins_apart(model) -> int:
    """`model` (a float ModelT) with each STRIDED_SLICE or SPLIT_V of subgraph 0 that cuts what the levels' joins
    joined (see the module) made of its parts never joined; returns how many were replaced."""
    graph = model.subgraphs[0]
    replaced = 0
    for name, op in list(zip(op_names(model), graph.operators)):
        if name not in ("STRIDED_SLICE", "SPLIT_V"):
            continue
        producer = producers(model)  # as the rewrites before this one left the graph
        parts = _tflite_sliced_parts(model, name, op, producer)
        if parts is None:
            continue
        joined = producer[op.inputs[0]][1]
        made = [new for output, levels in zip(op.outputs, parts) for new in _tflite_joined(model, levels, output)]
        position = next(i for i, o in enumerate(graph.operators) if o is op)
        graph.operators[position:position + 1] = made
        drop_unread_ops(graph, [joined])
        replaced += 1
    if replaced:
        drop_unused_tensors(model)  # what the joins made: an interpreter has no data for a tensor nothing makes
    return replaced


def _int32s(model, tensor: int) -> np.ndarray | None:
    values = constant_values(model, tensor, "<i4")
    return None if values is None else values.ravel()


def _tflite_levels(model, joined: int, producer: dict) -> list[list[int]] | None:
    """[the parts each level joined (NHWC tensors)] when `joined` ([1, C, cells], float) is a CONCATENATION on its
    cells of each level's parts, joined on their channels, transposed to NCHW and flattened; else None."""
    graph = model.subgraphs[0]
    name, join = producer.get(joined, (None, None))
    if name != "CONCATENATION" or len(graph.tensors[joined].shape) != 3 or join.builtinOptions.axis % 3 != 2 \
            or join.builtinOptions.fusedActivationFunction or graph.tensors[joined].type != schema().TensorType.FLOAT32:
        return None
    levels = []
    for flat in join.inputs:
        reshape_name, reshape = producer.get(flat, (None, None))
        transpose_name, transpose = producer.get(reshape.inputs[0], (None, None)) if reshape_name == "RESHAPE" \
            else (None, None)
        perm = _int32s(model, transpose.inputs[1]) if transpose_name == "TRANSPOSE" else None
        if perm is None or list(perm) != NCHW_FROM_NHWC:
            return None
        level_name, level = producer.get(transpose.inputs[0], (None, None))
        shape = list(graph.tensors[transpose.inputs[0]].shape)
        if level_name != "CONCATENATION" or len(shape) != 4 or level.builtinOptions.axis % 4 != 3 \
                or level.builtinOptions.fusedActivationFunction \
                or list(graph.tensors[flat].shape) != [shape[0], shape[3], shape[1] * shape[2]]:
            return None
        levels.append(list(level.inputs))
    return levels


def _tflite_sliced_parts(model, name: str, op, producer: dict) -> list[list[int]] | None:
    """For each output of a STRIDED_SLICE or SPLIT_V of joined levels (_tflite_levels) that cuts their channels
    exactly at the parts each level joined: that part of every level; else None."""
    graph = model.subgraphs[0]
    levels = _tflite_levels(model, op.inputs[0], producer)
    if levels is None:
        return None
    widths = [int(graph.tensors[part].shape[3]) for part in levels[0]]
    if any([int(graph.tensors[part].shape[3]) for part in level] != widths for level in levels):
        return None
    starts = np.cumsum([0, *widths]).tolist()
    joined_shape = [int(d) for d in graph.tensors[op.inputs[0]].shape]
    if name == "SPLIT_V":
        sizes, axis = _int32s(model, op.inputs[1]), _int32s(model, op.inputs[2])
        if sizes is None or axis is None or int(axis[0]) % 3 != 1 or list(sizes) != widths:
            return None
        return [[level[k] for level in levels] for k in range(len(widths))]
    channels = _sliced_channels(model, op, joined_shape)
    part = starts.index(channels[0]) if channels is not None and channels[0] in starts[:-1] else None
    if part is None or starts[part + 1] != channels[1]:
        return None
    return [[level[part] for level in levels]]


def _sliced_channels(model, op, shape: list[int]) -> tuple[int, int] | None:
    """(first, end) of the channels (axis 1) a STRIDED_SLICE takes of a [1, C, cells] tensor, when it takes
    them whole on the other axes, one by one; else None."""
    options = op.builtinOptions
    begin, end, strides = (_int32s(model, i) for i in op.inputs[1:4])
    if begin is None or end is None or strides is None or len(begin) != 3 or any(strides != 1) \
            or options.ellipsisMask or options.newAxisMask or options.shrinkAxisMask or options.offset:
        return None
    bounds = []
    for axis, size in enumerate(shape):
        first = 0 if options.beginMask >> axis & 1 else int(begin[axis]) % size
        last = size if options.endMask >> axis & 1 else min(int(end[axis]) + (size if end[axis] < 0 else 0), size)
        bounds.append((first, last))
    return bounds[1] if bounds[0] == (0, shape[0]) and bounds[2] == (0, shape[2]) else None


def _tflite_joined(model, parts: list[int], output: int) -> list:
    """The ops that make `output` of `parts` (one NHWC tensor a level): each transposed to NCHW, flattened, and
    the levels joined on their cells."""
    s = schema()
    graph = model.subgraphs[0]
    ops, flats = [], []
    base = graph.tensors[output].name
    for number, part in enumerate(parts):
        batch, height, width, channels = (int(d) for d in graph.tensors[part].shape)
        perm = add_tensor(model, b"%s/level%d/perm" % (base, number), [4], np.array(NCHW_FROM_NHWC, np.int32))
        nchw = add_tensor(model, b"%s/level%d/nchw" % (base, number), [batch, channels, height, width])
        ops.append(new_operator(model, s.BuiltinOperator.TRANSPOSE, [part, perm], [nchw],
                                s.BuiltinOptions.TransposeOptions, s.TransposeOptionsT()))
        shape = [batch, channels, height * width]
        flats.append(add_tensor(model, b"%s/level%d" % (base, number), shape))
        ops.append(reshape_op(model, nchw, shape, flats[-1], b"%s/level%d/shape" % (base, number)))
    ops.append(concatenation_op(model, flats, output, axis=2))
    return ops
