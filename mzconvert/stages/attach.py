"""Attach SSD post-processing to a converted TFLite model: boxes, classes, scores and count come out.

The quantized raw model is edited as a flatbuffer (no second conversion, no second calibration):
  box encodings -> RESHAPE [1, N, 4] ----------------------------\\
  class logits  -> LOGISTIC (or SOFTMAX) -> scores --------------> TFLite_Detection_PostProcess -> 4 outputs
  anchors (constant, centre-size: ycenter, xcenter, h, w) -------/
In an integer model the DEQUANTIZE ops a float-output model ends in are removed, and the op gets:
- the scores as integers, which its kernel dequantizes itself. It reads uint8, not int8, so int8
  scores pass a QUANTIZE to uint8 (the same values, zero point + 128), which the NPU runs;
- the box encodings as float (one DEQUANTIZE, on the CPU): with uint8 boxes the kernel would read
  the anchors as uint8 too, and 8-bit anchors move every box by up to half a step (~1 px at 300 px).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MzError
from ..recipe import Postprocess, Recipe
from ..tflite_file import read_model, write_model
from ..tflite_file import schema as tflite_schema

CUSTOM_CODE = b"TFLite_Detection_PostProcess"
OUTPUT_NAMES = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")


def _opcode(model, schema, builtin: int, custom: bytes | None = None) -> int:
    """Index of an operator code in the model, added when missing."""
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and (code.customCode or None) == custom:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    code.customCode = custom
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _tensor(model, subgraph, schema, name: str, shape, dtype: int, data: bytes | None = None,
            quantization=None) -> int:
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, np.uint8) if data is not None else None
    model.buffers.append(buffer)
    tensor = schema.TensorT()
    tensor.name, tensor.shape, tensor.type = name.encode(), list(shape), dtype
    tensor.buffer, tensor.quantization = len(model.buffers) - 1, quantization
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _quantization(schema, scale: float, zero_point: int):
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = [scale], [zero_point]
    return q


def _integer_source(subgraph, schema, dequantize_code: int, tensor: int) -> tuple[int, int | None]:
    """(the tensor to feed, the DEQUANTIZE op to drop): a float output made by DEQUANTIZE of an integer
    tensor is replaced by that integer tensor."""
    for index, op in enumerate(subgraph.operators):
        if op.outputs[0] == tensor and op.opcodeIndex == dequantize_code:
            return op.inputs[0], index
    return tensor, None


def centre_size_anchors(anchors: np.ndarray) -> np.ndarray:
    """ymin, xmin, ymax, xmax -> ycenter, xcenter, h, w: the op's anchor layout."""
    return np.stack([(anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2,
                     anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]], axis=1).astype(np.float32)


def _options(post: Postprocess, classes: int) -> bytes:
    from flatbuffers import flexbuffers

    y, x, h, w = (float(s) for s in post.box_coder_scales)
    return bytes(flexbuffers.Dumps({
        "max_detections": post.max_detections, "max_classes_per_detection": 1,
        "detections_per_class": post.max_detections, "use_regular_nms": True,
        "nms_score_threshold": float(post.nms_score_threshold), "nms_iou_threshold": float(post.nms_iou_threshold),
        "num_classes": classes, "y_scale": y, "x_scale": x, "h_scale": h, "w_scale": w}))


def attach_postprocess(raw: Path, recipe: Recipe, anchors: np.ndarray, target: Path) -> Path:
    """Write `target`: the model `raw` ending in TFLite_Detection_PostProcess, as the recipe declares it."""
    schema = tflite_schema()
    post = recipe.postprocess
    model = read_model(raw)
    if len(model.subgraphs) != 1:
        raise MzError(f"{raw}: {len(model.subgraphs)} subgraphs; post-processing attaches to single-graph models")
    graph = model.subgraphs[0]
    names = [graph.tensors[i].name.decode() for i in graph.outputs]
    try:
        boxes_out, logits_out = (graph.outputs[names.index(n)] for n in (post.box_output, post.class_output))
    except ValueError:
        raise MzError(f"{raw}: outputs {names}, expected {post.box_output} and {post.class_output}") from None
    dequantize = _opcode(model, schema, schema.BuiltinOperator.DEQUANTIZE)
    boxes, drop_boxes = _integer_source(graph, schema, dequantize, boxes_out)
    logits, drop_logits = _integer_source(graph, schema, dequantize, logits_out)
    count = int(anchors.shape[0])
    classes_with_background = int(np.prod(graph.tensors[logits].shape)) // count
    classes = classes_with_background - (1 if post.background_class else 0)
    if classes != len(post.labels):
        raise MzError(f"{raw}: {post.class_output} scores {classes} classes, the recipe has {len(post.labels)} labels")

    def same_quantization(tensor: int):
        q = graph.tensors[tensor].quantization
        return _quantization(schema, float(q.scale[0]), int(q.zeroPoint[0])) if q is not None and q.scale else None

    box_type, logit_type = graph.tensors[boxes].type, graph.tensors[logits].type
    shape = _tensor(model, graph, schema, "postprocess/box_shape", [3], schema.TensorType.INT32,
                    np.asarray([1, count, 4], np.int32).tobytes())
    reshaped = _tensor(model, graph, schema, "postprocess/box_encodings", [1, count, 4], box_type,
                       quantization=same_quantization(boxes))
    integer_scores = logit_type in (schema.TensorType.INT8, schema.TensorType.UINT8)
    # TFLite's integer LOGISTIC and SOFTMAX produce [0, 1) in steps of 1/256.
    zero = -128 if logit_type == schema.TensorType.INT8 else 0
    scores = _tensor(model, graph, schema, "postprocess/scores", [1, count, classes_with_background], logit_type,
                     quantization=_quantization(schema, 1 / 256, zero) if integer_scores else None)
    anchor_tensor = _tensor(model, graph, schema, "postprocess/anchors", [count, 4], schema.TensorType.FLOAT32,
                            centre_size_anchors(anchors).tobytes())
    outputs = [_tensor(model, graph, schema, name, shape_, schema.TensorType.FLOAT32)
               for name, shape_ in zip(OUTPUT_NAMES, ([1, post.max_detections, 4], [1, post.max_detections],
                                                      [1, post.max_detections], [1]))]

    def operator(code: int, inputs: list[int], outs: list[int], options=None, options_type=0, custom=None):
        op = schema.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = code, inputs, outs
        op.builtinOptionsType, op.builtinOptions = options_type, options
        if custom is not None:
            op.customOptions, op.customOptionsFormat = np.frombuffer(custom, np.uint8), 0  # FLEXBUFFERS
        return op

    reshape_options = schema.ReshapeOptionsT()
    reshape_options.newShape = [1, count, 4]
    score_op = (operator(_opcode(model, schema, schema.BuiltinOperator.LOGISTIC), [logits], [scores])
                if post.score == "sigmoid" else
                operator(_opcode(model, schema, schema.BuiltinOperator.SOFTMAX), [logits], [scores],
                         _softmax_options(schema), schema.BuiltinOptions.SoftmaxOptions))
    added = [operator(_opcode(model, schema, schema.BuiltinOperator.RESHAPE), [boxes, shape], [reshaped],
                      reshape_options, schema.BuiltinOptions.ReshapeOptions), score_op]
    if box_type != schema.TensorType.FLOAT32:
        float_boxes = _tensor(model, graph, schema, "postprocess/box_encodings/float", [1, count, 4],
                              schema.TensorType.FLOAT32)
        added.append(operator(dequantize, [reshaped], [float_boxes]))
        reshaped = float_boxes
    if logit_type == schema.TensorType.INT8:
        unsigned = _tensor(model, graph, schema, "postprocess/scores/uint8", [1, count, classes_with_background],
                           schema.TensorType.UINT8, quantization=_quantization(schema, 1 / 256, 0))
        added.append(operator(_opcode(model, schema, schema.BuiltinOperator.QUANTIZE), [scores], [unsigned]))
        scores = unsigned
    added.append(operator(_opcode(model, schema, schema.BuiltinOperator.CUSTOM, CUSTOM_CODE),
                          [reshaped, scores, anchor_tensor], outputs, custom=_options(post, classes)))
    graph.operators = [op for i, op in enumerate(graph.operators) if i not in (drop_boxes, drop_logits)] + added
    graph.outputs = outputs
    return write_model(model, target)


def _softmax_options(schema):
    options = schema.SoftmaxOptionsT()
    options.beta = 1.0
    return options
