"""An ONNX graph's outputs in int8: what reaches them unchanged (it keeps its whole range), and outputs that
concatenate parts of very different ranges (a detector head's boxes in pixels beside its class probabilities),
which must not share one int8 scale: the nodes to keep float so that each part keeps its own."""

from __future__ import annotations

# Ops that only move values: an output they pass on keeps the scales of what they read.
SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")
# Parts of one output whose ranges differ more than this would share one int8 scale: the narrower keeps fewer
# than 256 / 16 = 16 steps (YOLOv8's boxes in pixels and class probabilities: 320 to 1, every probability 0).
SEPARATE_SCALES_RATIO = 16.0


def mixed_range_outputs(model, ranges: dict[str, tuple[float, float]]) -> list[str]:
    """The nodes to keep float so that each part of a concatenated output keeps its own int8 scale: for every
    graph output that a Concat makes (through shape-only ops) from inputs whose recorded ranges differ more
    than SEPARATE_SCALES_RATIO times, that Concat and the shape ops after it. Their inputs stay quantized,
    each with its own scale."""
    producer = {name: node for node in model.graph.node for name in node.output}
    keep = []
    for output in model.graph.output:
        chain, node = [], producer.get(output.name)
        while node is not None and node.op_type in SHAPE_OPS:
            chain.append(node.name)
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Concat":
            continue
        widths = [ranges[name][1] - ranges[name][0] for name in node.input if name in ranges]
        if len(widths) >= 2 and min(widths) > 0 and max(widths) / min(widths) > SEPARATE_SCALES_RATIO:
            keep += [node.name, *chain]
    return keep


def reaching_outputs(graph) -> set[str]:
    """The tensors whose values reach the graph's outputs unchanged: the outputs and what shape ops (and
    Concat) make them from."""
    producer = {out: node for node in graph.node for out in node.output}
    found, pending = set(), [o.name for o in graph.output]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        found.add(name)
        node = producer.get(name)
        if node is not None and node.op_type in (*SHAPE_OPS, "Concat"):
            pending += list(node.input) if node.op_type == "Concat" else [node.input[0]]
    return found
