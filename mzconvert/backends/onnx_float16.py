"""ONNX models stored in float16 (Ultralytics' `quantize=16`, onnxconverter-common's float16 conversion) read
as the float32 models whose weights they round.

Such a file keeps float32 inputs and outputs behind Casts, float16 weights, and Casts wherever an op is kept in
float32. Every float16 tensor is made float32 (the same values: float16 widens exactly) and the Casts between
the two are dropped, so the graph is the float32 export's, with its tensor names: init finds its head, and
strip, the quantizers and onnx2tf read it as they read any float32 model. What it computes differs from the
file's own float16 arithmetic by that arithmetic's rounding.
"""

from __future__ import annotations

from ..errors import EXIT_BAD_INPUT, MzError

FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto's element types


def has_float16(model) -> bool:
    """Whether any weight, constant or declared tensor of `model` is float16."""
    values = [*model.graph.input, *model.graph.output, *model.graph.value_info]
    return any(i.data_type == FLOAT16 for i in model.graph.initializer) or \
        any(v.type.tensor_type.elem_type == FLOAT16 for v in values) or \
        any(_to(node) == FLOAT16 for node in model.graph.node if node.op_type == "Cast")


def as_float32(model):
    """`model` with every float16 tensor float32 and the Casts between float16 and float32 dropped (outputs keep
    their names); `model` itself where nothing is float16."""
    import onnx
    from onnx import numpy_helper

    if not has_float16(model):
        return model
    types = _element_types(model)
    for index, weight in enumerate(model.graph.initializer):
        if weight.data_type == FLOAT16:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(weight).astype("float32"), weight.name))
    for node in model.graph.node:
        for attribute in node.attribute:  # Constant, ConstantOfShape values
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == FLOAT16:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype("float32"),
                                                             attribute.t.name))
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == FLOAT16:
            value.type.tensor_type.elem_type = FLOAT
    _drop_float_casts(model, types)
    return topologically_sorted(model)


def _to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _element_types(model) -> dict[str, int]:
    """{tensor: element type} of every tensor shape inference types (the model as stored)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info, *inferred.output]}
    return types | {i.name: i.data_type for i in model.graph.initializer}


def _drop_float_casts(model, types: dict[str, int]) -> None:
    """Remove the Casts between float16 and float32, which cast float32 to float32 once every float16 tensor is
    float32 (a Cast of an integer to float16 now casts to float32). Readers of a dropped Cast's output read its
    input; where that output is a graph output, the tensor it cast takes its name. The intermediate shapes the
    file declares are dropped too: shape inference recomputes them."""
    floats = (FLOAT, FLOAT16)
    graph_inputs = {i.name for i in model.graph.input}
    graph_outputs = {o.name for o in model.graph.output}
    kept, aliases, renamed = [], {}, {}
    for node in model.graph.node:
        to, source = (_to(node), node.input[0]) if node.op_type == "Cast" else (None, None)
        if to == FLOAT16:
            next(a for a in node.attribute if a.name == "to").i = FLOAT
        dropped = to in floats and types.get(source) in floats and FLOAT16 in (to, types.get(source)) and \
            not (node.output[0] in graph_outputs and source in graph_inputs | graph_outputs)
        if not dropped:
            kept.append(node)
        elif node.output[0] in graph_outputs:
            renamed[source] = node.output[0]
        else:
            aliases[node.output[0]] = source

    def resolved(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return renamed.get(name, name)

    for node in kept:
        node.input[:] = [resolved(name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    del model.graph.value_info[:]


def topologically_sorted(model):
    """ORT's float16 converter appends its input Casts at the end; ONNX requires producers first."""
    graph = model.graph
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise MzError(f"graph {graph.name!r} has a cycle or a missing input", EXIT_BAD_INPUT)
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    graph.ClearField("node")
    graph.node.extend(ordered)
    return model
