"""Attach detection post-processing to a converted TFLite model: boxes, classes, scores and count come out.

The quantized raw model is edited as a flatbuffer (no second conversion, no second calibration); each head
kind feeds TFLite_Detection_PostProcess what it reads, box encodings [1, N, 4] (ty, tx, th, tw) relative
to anchors, and scores [1, N, classes]:
- ssd: box encodings -> RESHAPE; class logits -> LOGISTIC (or SOFTMAX); the strip stage's anchors.
- yolov8 cut before its Concat: boxes [1, 4, N] (centre x, y, width, height in input pixels) -> TRANSPOSE ->
  (y, x, log h, log w), the op's exponential coding of a box of unit anchor size; class probabilities
  [1, C, N] -> TRANSPOSE. Every anchor is (0, 0, 1 / input height, 1 / input width) with unit scales, so the
  op's decode y / H, x / W, exp(log h) / H, exp(log w) / W is the box normalised to the input, as an SSD's.
  Cut before its DFL (box_encoding dfl): distribution logits [1, 4 x bins, N] -> TRANSPOSE -> softmax over
  each side's bins -> two FULLY_CONNECTED (the expectation folded into the offset from the cell's centre and
  the size, in strides) -> (y, x, log h, log w) against anchors at the cells' centres, one stride in size.
  Cut before the grid decode of a head without a DFL (box_encoding distances): [1, 4, N] -> TRANSPOSE -> the
  same two FULLY_CONNECTED, each side weighing 1.
In an integer model the DEQUANTIZE ops a float-output model ends in are removed, and the op gets:
- the scores as integers, which its kernel dequantizes itself. It reads uint8, not int8, so int8
  scores pass a QUANTIZE to uint8 (the same values, zero point + 128), which the NPU runs;
- the box encodings as float (one DEQUANTIZE, on the CPU): with uint8 boxes the kernel would read
  the anchors as uint8 too, and 8-bit anchors move every box by up to half a step (~1 px at 300 px).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MzError
from ..recipe import Postprocess, Recipe
from ..runtime import output_order
from ..tflite_file import add_buffer, read_model, write_model
from ..tflite_file import schema as tflite_schema

CUSTOM_CODE = b"TFLite_Detection_PostProcess"
OUTPUT_NAMES = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")


class _Editor:
    """Tensors and operators added to a single-graph model; `added` are the new operators, in order."""

    def __init__(self, model, schema):
        self.model, self.schema, self.graph = model, schema, model.subgraphs[0]
        self.added: list = []

    def opcode(self, builtin: int, custom: bytes | None = None) -> int:
        """Index of an operator code in the model, added when missing."""
        for i, code in enumerate(self.model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and (code.customCode or None) == custom:
                return i
        code = self.schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        code.customCode = custom
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1

    def tensor(self, name: str, shape, dtype: int, data: bytes | None = None, quantization=None) -> int:
        if data is not None:
            buffer = add_buffer(self.model, data)
        else:  # an activation's: no data
            self.model.buffers.append(self.schema.BufferT())
            buffer = len(self.model.buffers) - 1
        tensor = self.schema.TensorT()
        tensor.name, tensor.shape, tensor.type = name.encode(), list(shape), dtype
        tensor.buffer, tensor.quantization = buffer, quantization
        self.graph.tensors.append(tensor)
        return len(self.graph.tensors) - 1

    def constant(self, name: str, values: np.ndarray) -> int:
        dtype = {np.int32: self.schema.TensorType.INT32, np.float32: self.schema.TensorType.FLOAT32}[values.dtype.type]
        return self.tensor(name, values.shape, dtype, values.tobytes())

    def op(self, builtin: str, inputs: list[int], outputs: list[int], options=None, custom: bytes | None = None):
        """Append an operator; `options` a builtin's options object (its type named after its class)."""
        op = self.schema.OperatorT()
        op.opcodeIndex = self.opcode(getattr(self.schema.BuiltinOperator, builtin),
                                     CUSTOM_CODE if builtin == "CUSTOM" else None)
        op.inputs, op.outputs = inputs, outputs
        if options is not None:
            op.builtinOptionsType = getattr(self.schema.BuiltinOptions, type(options).__name__[:-1])
            op.builtinOptions = options
        if custom is not None:
            op.customOptions, op.customOptionsFormat = np.frombuffer(custom, np.uint8), 0  # FLEXBUFFERS
        self.added.append(op)

    def like(self, name: str, source: int, shape) -> int:
        """A new tensor of `source`'s type and quantization, of another shape."""
        t = self.graph.tensors[source]
        return self.tensor(name, shape, t.type, quantization=_same_quantization(self.schema, t))

    def options(self, kind: str, **fields):
        options = getattr(self.schema, f"{kind}OptionsT")()
        for key, value in fields.items():
            setattr(options, key, value)
        return options

    def as_float(self, tensor: int) -> int:
        """`tensor`, dequantized (on the CPU) unless it is float."""
        t = self.graph.tensors[tensor]
        if t.type == self.schema.TensorType.FLOAT32:
            return tensor
        out = self.tensor(f"{t.name.decode()}/float", t.shape, self.schema.TensorType.FLOAT32)
        self.op("DEQUANTIZE", [tensor], [out])
        return out

    def transposed(self, name: str, tensor: int) -> int:
        """[1, a, b] -> [1, b, a], in the tensor's own type (an integer TRANSPOSE runs on the NPU)."""
        _, a, b = self.graph.tensors[tensor].shape
        out = self.like(name, tensor, [1, b, a])
        self.op("TRANSPOSE", [tensor, self.constant(f"{name}/perm", np.asarray([0, 2, 1], np.int32))], [out])
        return out


def _quantization(schema, scale: float, zero_point: int):
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = [scale], [zero_point]
    return q


def _same_quantization(schema, tensor):
    q = tensor.quantization
    return _quantization(schema, float(q.scale[0]), int(q.zeroPoint[0])) if q is not None and q.scale else None


@dataclass(frozen=True)
class HeadInputs:
    """What TFLite_Detection_PostProcess reads from one head."""

    boxes: int  # [1, N, 4] encodings (ty, tx, th, tw), float or integer (dequantized for the op)
    scores: int  # [1, N, classes (+ background)], float or integer
    anchors: np.ndarray  # N x 4, centre-size: ycenter, xcenter, h, w
    scales: tuple[float, float, float, float]  # y, x, h, w
    classes: int  # without background


def centre_size_anchors(anchors: np.ndarray) -> np.ndarray:
    """ymin, xmin, ymax, xmax -> ycenter, xcenter, h, w: the op's anchor layout."""
    return np.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2,
                     anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]], axis=1).astype(np.float32)


def _ssd_inputs(edit: _Editor, boxes: int, logits: int, recipe: Recipe, anchors: np.ndarray | None) -> HeadInputs:
    post, schema = recipe.postprocess, edit.schema
    count = int(anchors.shape[0])
    classes_with_background = int(np.prod(edit.graph.tensors[logits].shape)) // count
    score_op = "LOGISTIC" if post.score == "sigmoid" else "SOFTMAX"
    edit.opcode(getattr(schema.BuiltinOperator, score_op))  # the first version's op-code order: same bytes
    shape = edit.constant("postprocess/box_shape", np.asarray([1, count, 4], np.int32))
    reshaped = edit.like("postprocess/box_encodings", boxes, [1, count, 4])
    logit_type = edit.graph.tensors[logits].type
    integer = logit_type in (schema.TensorType.INT8, schema.TensorType.UINT8)
    # TFLite's integer LOGISTIC and SOFTMAX produce [0, 1) in steps of 1/256.
    zero = -128 if logit_type == schema.TensorType.INT8 else 0
    scores = edit.tensor("postprocess/scores", [1, count, classes_with_background], logit_type,
                         quantization=_quantization(schema, 1 / 256, zero) if integer else None)
    edit.op("RESHAPE", [boxes, shape], [reshaped], edit.options("Reshape", newShape=[1, count, 4]))
    edit.op(score_op, [logits], [scores], edit.options("Softmax", beta=1.0) if score_op == "SOFTMAX" else None)
    return HeadInputs(reshaped, scores, centre_size_anchors(anchors), tuple(float(s) for s in post.box_coder_scales),
                      classes_with_background - (1 if post.background_class else 0))


def _yolov8_inputs(edit: _Editor, boxes: int, probabilities: int, recipe: Recipe, anchors) -> HeadInputs:
    shape, classes_shape = edit.graph.tensors[boxes].shape, edit.graph.tensors[probabilities].shape
    encoding = recipe.postprocess.box_encoding
    dfl = encoding == "dfl"
    if len(shape) != 3 or shape[1] % 4 or (shape[1] != 4 and not dfl) or len(classes_shape) != 3 or \
            classes_shape[2] != shape[2]:
        raise MzError(f"boxes {list(shape)} and class scores {list(classes_shape)}: a yolov8 head cut before its "
                      f"Concat has [1, {'4 x bins' if dfl else 4}, N] and [1, classes, N]")
    encodings, anchor_boxes = BOX_ENCODERS[encoding](edit, edit.as_float(edit.transposed("postprocess/boxes", boxes)),
                                                     recipe)
    return HeadInputs(encodings, edit.transposed("postprocess/scores", probabilities), anchor_boxes,
                      (1.0, 1.0, 1.0, 1.0), int(classes_shape[1]))


def _pixel_encodings(edit: _Editor, centre_size: int, recipe: Recipe) -> tuple[int, np.ndarray]:
    """[1, N, 4] centre x, y, width, height in input pixels -> (y, x, log h, log w), with unit anchors."""
    count = edit.graph.tensors[centre_size].shape[1]
    parts = []
    for name, order in (("yx", [1, 0]), ("hw", [3, 2])):
        part = edit.tensor(f"postprocess/boxes/{name}", [1, count, 2], edit.schema.TensorType.FLOAT32)
        edit.op("GATHER", [centre_size, edit.constant(f"postprocess/boxes/{name}/index", np.asarray(order, np.int32))],
                [part], edit.options("Gather", axis=2, batchDims=0))
        parts.append(part)
    height, width = recipe.input.height_width
    unit = np.tile(np.asarray([[0.0, 0.0, 1 / height, 1 / width]], np.float32), (count, 1))
    return _joined_with_log_sizes(edit, parts[0], parts[1], count), unit


def _dfl_encodings(edit: _Editor, logits: int, recipe: Recipe) -> tuple[int, np.ndarray]:
    """[1, N, 4 x bins] distribution logits (left, top, right, bottom) -> (y, x, log h, log w): the softmax over
    each side's bins, then the expectation (bin i weighs i) folded into _grid_encodings' weights."""
    _, count, rows = edit.graph.tensors[logits].shape
    bins = rows // 4
    f32 = edit.schema.TensorType.FLOAT32
    grouped = edit.tensor("postprocess/boxes/bins", [1, count, 4, bins], f32)
    edit.op("RESHAPE", [logits, edit.constant("postprocess/boxes/bins/shape", np.asarray([1, count, 4, bins],
                                                                                           np.int32))],
            [grouped], edit.options("Reshape", newShape=[1, count, 4, bins]))
    weights = edit.tensor("postprocess/boxes/probabilities", [1, count, 4, bins], f32)
    edit.op("SOFTMAX", [grouped], [weights], edit.options("Softmax", beta=1.0))
    flat = edit.tensor("postprocess/boxes/probabilities/flat", [1, count, rows], f32)
    edit.op("RESHAPE", [weights, edit.constant("postprocess/boxes/flat/shape", np.asarray([1, count, rows], np.int32))],
            [flat], edit.options("Reshape", newShape=[1, count, rows]))
    return _grid_encodings(edit, flat, np.arange(bins), recipe)


def _distance_encodings(edit: _Editor, distances: int, recipe: Recipe) -> tuple[int, np.ndarray]:
    """[1, N, 4] distances (left, top, right, bottom) from each cell's centre, in strides -> (y, x, log h, log w)
    by _grid_encodings."""
    return _grid_encodings(edit, distances, np.ones(1), recipe)


def _grid_encodings(edit: _Editor, sides: int, bin_values: np.ndarray, recipe: Recipe) -> tuple[int, np.ndarray]:
    """[1, N, 4 x bins] values whose sum weighted by `bin_values`, per side, is that side's (left, top, right,
    bottom) distance from its cell's centre in strides -> (y, x, log h, log w) against anchors at each cell's
    centre, one stride in size: one FULLY_CONNECTED per pair whose weights fold the weighting into
    (bottom - top) / 2, (right - left) / 2 (the centre's offset, in strides) and top + bottom, left + right (the
    size, in strides), as grid_boxes decodes."""
    from ..tasks.detection import head_grid

    _, count, _ = edit.graph.tensors[sides].shape
    left, top, right, bottom = np.eye(4)
    parts = []
    for name, pair in (("yx", [(bottom - top) / 2, (right - left) / 2]), ("hw", [top + bottom, left + right])):
        folded = np.concatenate([np.outer(side, bin_values).ravel()[None] for side in pair]).astype(np.float32)
        part = edit.tensor(f"postprocess/boxes/{name}", [1, count, 2], edit.schema.TensorType.FLOAT32)
        edit.op("FULLY_CONNECTED", [sides, edit.constant(f"postprocess/boxes/{name}/weights", folded), -1], [part],
                edit.options("FullyConnected", keepNumDims=True))
        parts.append(part)
    height, width = recipe.input.height_width
    x, y, stride = head_grid((height, width), count, recipe.postprocess.strides).T
    anchor_boxes = np.stack([y * stride / height, x * stride / width, stride / height, stride / width], axis=1)
    return _joined_with_log_sizes(edit, parts[0], parts[1], count), anchor_boxes.astype(np.float32)


def _joined_with_log_sizes(edit: _Editor, centres: int, sizes: int, count: int) -> int:
    """[1, N, 2] (y, x) and [1, N, 2] (h, w) relative to the anchors -> [1, N, 4] (y, x, log h, log w): the op's
    exponential coding with unit scales. A size below 0 (a head without a DFL can predict sides that cross: the
    export's box is then inverted) is taken as 0, an empty box at its centre: the coding has no negative size,
    and its log would be NaN."""
    f32 = edit.schema.TensorType.FLOAT32
    clamped = edit.tensor("postprocess/boxes/hw/clamped", [1, count, 2], f32)
    edit.op("RELU", [sizes], [clamped])
    log_size = edit.tensor("postprocess/boxes/log_hw", [1, count, 2], f32)
    edit.op("LOG", [clamped], [log_size])
    encodings = edit.tensor("postprocess/box_encodings", [1, count, 4], f32)
    edit.op("CONCATENATION", [centres, log_size], [encodings], edit.options("Concatenation", axis=2))
    return encodings


# a yolov8 head's postprocess.box_encoding -> its boxes [1, N, 4 or 4 x bins] as the op's encodings and anchors
BOX_ENCODERS = {"pixels": _pixel_encodings, "dfl": _dfl_encodings, "distances": _distance_encodings}

# postprocess.kind -> what its head feeds the op (rules.check_variant allows attach for these kinds)
HEAD_INPUTS = {"ssd": _ssd_inputs, "yolov8": _yolov8_inputs}


def _options(post: Postprocess, head: HeadInputs) -> bytes:
    from flatbuffers import flexbuffers

    y, x, h, w = head.scales
    return bytes(flexbuffers.Dumps({
        "max_detections": post.max_detections, "max_classes_per_detection": 1,
        "detections_per_class": post.max_detections, "use_regular_nms": True,
        "nms_score_threshold": float(post.nms_score_threshold), "nms_iou_threshold": float(post.nms_iou_threshold),
        "num_classes": head.classes, "y_scale": y, "x_scale": x, "h_scale": h, "w_scale": w}))


def _integer_source(graph, dequantize_code: int, tensor: int) -> tuple[int, int | None]:
    """(the tensor to feed, the DEQUANTIZE op to drop): a float output made by DEQUANTIZE of an integer
    tensor is replaced by that integer tensor."""
    for index, op in enumerate(graph.operators):
        if op.outputs[0] == tensor and op.opcodeIndex == dequantize_code:
            return op.inputs[0], index
    return tensor, None


def attach_postprocess(raw: Path, recipe: Recipe, anchors: np.ndarray | None, target: Path) -> Path:
    """Write `target`: the model `raw` ending in TFLite_Detection_PostProcess, as the recipe declares it."""
    schema = tflite_schema()
    post = recipe.postprocess
    model = read_model(raw)
    if len(model.subgraphs) != 1:
        raise MzError(f"{raw}: {len(model.subgraphs)} subgraphs; post-processing attaches to single-graph models")
    edit = _Editor(model, schema)
    graph = edit.graph
    names = [graph.tensors[i].name.decode() for i in graph.outputs]
    wanted = list(recipe.strip.outputs) if recipe.strip is not None else names
    by_name = dict(zip(wanted, (graph.outputs[i] for i in output_order(names, wanted))))
    try:
        boxes_out, scores_out = (by_name[n] for n in (post.box_output, post.class_output))
    except KeyError:
        raise MzError(f"{raw}: outputs {names}, expected {post.box_output} and {post.class_output}") from None
    dequantize = edit.opcode(schema.BuiltinOperator.DEQUANTIZE)
    boxes, drop_boxes = _integer_source(graph, dequantize, boxes_out)
    scores, drop_scores = _integer_source(graph, dequantize, scores_out)
    try:
        head = HEAD_INPUTS[post.kind](edit, boxes, scores, recipe, anchors)
    except MzError as exc:
        raise MzError(f"{raw}: {exc}") from None
    if head.classes != len(post.labels):
        raise MzError(f"{raw}: {post.class_output} scores {head.classes} classes, the recipe has "
                      f"{len(post.labels)} labels")
    count = int(head.anchors.shape[0])
    anchor_tensor = edit.tensor("postprocess/anchors", [count, 4], schema.TensorType.FLOAT32, head.anchors.tobytes())
    outputs = [edit.tensor(name, shape, schema.TensorType.FLOAT32)
               for name, shape in zip(OUTPUT_NAMES, ([1, post.max_detections, 4], [1, post.max_detections],
                                                     [1, post.max_detections], [1]))]
    boxes = edit.as_float(head.boxes)
    scores = head.scores
    if graph.tensors[scores].type == schema.TensorType.INT8:
        signed = graph.tensors[scores]
        unsigned = edit.tensor(f"{signed.name.decode()}/uint8", signed.shape, schema.TensorType.UINT8,
                               quantization=_quantization(schema, float(signed.quantization.scale[0]),
                                                          int(signed.quantization.zeroPoint[0]) + 128))
        edit.op("QUANTIZE", [scores], [unsigned])
        scores = unsigned
    edit.op("CUSTOM", [boxes, scores, anchor_tensor], outputs, custom=_options(post, head))
    graph.operators = [op for i, op in enumerate(graph.operators) if i not in (drop_boxes, drop_scores)] + edit.added
    graph.outputs = outputs
    return write_model(model, target)
