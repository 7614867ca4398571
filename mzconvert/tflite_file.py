"""Reading and writing a .tflite flatbuffer as TensorFlow's schema objects, for the stages that edit one."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def schema():
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def read_model(path: Path):
    """The whole model as mutable objects (ModelT), every buffer's data inside it: a buffer stored after the
    flatbuffer (offset > 1: ai-edge-quantizer writes a model of 256 KiB of weights or more so, Ultralytics' int8
    `.tflite` among them) is read in, where the objects would keep an offset into bytes model_bytes does not write."""
    s = schema()
    content = path.read_bytes()
    model = s.ModelT.InitFromObj(s.Model.GetRootAsModel(content, 0))
    for buffer in model.buffers or []:
        if buffer.offset > 1:
            buffer.data = np.frombuffer(content, np.uint8, buffer.size, buffer.offset)
            buffer.offset = buffer.size = 0
    return model


def op_names(model, subgraph: int = 0) -> list[str]:
    """The builtin name (CONV_2D, ...) or custom code of every operator of a subgraph, in order."""
    names = {value: name for name, value in vars(schema().BuiltinOperator).items() if not name.startswith("_")}
    found = []
    for op in model.subgraphs[subgraph].operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        found.append(code.customCode.decode() if code.customCode else names.get(builtin, str(builtin)))
    return found


def producers(model) -> dict:
    """{tensor index: (op name, op)} of the ops of a .tflite's first subgraph, by the tensors they make."""
    return {out: (name, op) for name, op in zip(op_names(model), model.subgraphs[0].operators) for out in op.outputs}


# Metadata a converter leaves for a later MLIR import of its file. litert-torch (Ultralytics' `format=tflite` since
# 8.4.83) writes keep_stablehlo_constant: imported with it, every constant stays a StableHLO constant, which neither
# TensorFlow's quantizer nor ai-edge-quantizer takes for a weight (a YOLOv8n's 63 convolutions stayed float, each
# reading int8 weights through a DEQUANTIZE). LiteRT does not read it.
IMPORT_HINTS = (b"keep_stablehlo_constant",)


def drop_import_hints(model) -> bool:
    """Remove IMPORT_HINTS from the model's (ModelT) metadata, before a quantizer imports it; whether there were any."""
    if not model.metadata:
        return False
    kept = [entry for entry in model.metadata if entry.name not in IMPORT_HINTS]
    dropped = len(kept) < len(model.metadata)
    model.metadata = kept
    return dropped


def model_bytes(model) -> bytes:
    """The model (ModelT) as a .tflite flatbuffer."""
    import flatbuffers

    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def add_buffer(model, data: bytes) -> int:
    """Append a buffer holding `data` to the model (ModelT); returns its index, for a tensor's `buffer`."""
    buffer = schema().BufferT()
    buffer.data = np.frombuffer(data, np.uint8)
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def builtin_code(model, builtin: int, version: int) -> int:
    """The index of `builtin`'s operator code in the model, added if it has none."""
    s = schema()
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin and not code.customCode:
            code.version = max(code.version, version)
            return i
    code = s.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def add_tensor(model, name: bytes, shape: list[int], data: np.ndarray | None = None) -> int:
    """A tensor appended to subgraph 0: float32 and computed without `data`, else the constant `data` (int32 or
    float32); its index."""
    s = schema()
    made = s.TensorT()
    made.name, made.shape = name, np.array(shape, np.int32)
    if data is None:  # computed: a buffer without data
        made.type = s.TensorType.FLOAT32
        model.buffers.append(s.BufferT())
        made.buffer = len(model.buffers) - 1
    else:
        made.type = s.TensorType.INT32 if data.dtype.kind == "i" else s.TensorType.FLOAT32
        made.buffer = add_buffer(model, data.astype("<i4" if data.dtype.kind == "i" else "<f4").tobytes())
    model.subgraphs[0].tensors.append(made)
    return len(model.subgraphs[0].tensors) - 1


def new_operator(model, builtin: int, inputs: list[int], outputs: list[int], options_type: int, options):
    """An OperatorT of `builtin` (version 1 unless the model's code of it is later), not yet in any graph."""
    made = schema().OperatorT()
    made.opcodeIndex, made.inputs, made.outputs = builtin_code(model, builtin, version=1), inputs, outputs
    made.builtinOptionsType, made.builtinOptions = options_type, options
    return made


def constant_values(model, tensor: int, dtype: str) -> np.ndarray | None:
    """A constant tensor's values of subgraph 0 (`dtype`: "<i4", "<f4"), in its shape; None where it is computed."""
    t = model.subgraphs[0].tensors[tensor]
    data = model.buffers[t.buffer].data
    if data is None or not len(data):
        return None
    return np.frombuffer(bytes(bytearray(data)), dtype).reshape([int(d) for d in t.shape])


def reshape_op(model, source: int, shape: list[int], target: int, shape_name: bytes):
    """A RESHAPE of `source` to `shape` into `target` (its shape a constant named `shape_name`), not yet in a graph."""
    s = schema()
    options = s.ReshapeOptionsT()
    options.newShape = shape
    new_shape = add_tensor(model, shape_name, [len(shape)], np.array(shape, np.int32))
    return new_operator(model, s.BuiltinOperator.RESHAPE, [source, new_shape], [target],
                        s.BuiltinOptions.ReshapeOptions, options)


def concatenation_op(model, inputs: list[int], target: int, axis: int):
    """A CONCATENATION of `inputs` on `axis` into `target`, not yet in a graph."""
    s = schema()
    options = s.ConcatenationOptionsT()
    options.axis = axis
    return new_operator(model, s.BuiltinOperator.CONCATENATION, inputs, [target],
                        s.BuiltinOptions.ConcatenationOptions, options)


def drop_unread_ops(graph, ops: list) -> None:
    """`ops` and the ops that made their inputs, as far as nothing else reads what they make, taken out of `graph`."""
    pending = list(ops)
    while pending:
        op = pending.pop()
        read = {i for o in graph.operators if o is not op for i in o.inputs} | set(graph.outputs)
        if any(t in read for t in op.outputs) or not any(o is op for o in graph.operators):
            continue
        graph.operators = [o for o in graph.operators if o is not op]
        made = {t: o for o in graph.operators for t in o.outputs}
        pending += [made[i] for i in op.inputs if i in made]


def drop_unused_tensors(model, subgraph: int = 0) -> None:
    """The tensors no op, input or output of a subgraph of `model` names any more, taken out (a tensor nothing
    computes has no data for an interpreter to show), the others' indices renumbered, in its signatures too."""
    graph = model.subgraphs[subgraph]
    used = sorted({i for op in graph.operators for i in (*op.inputs, *op.outputs) if i >= 0}
                  | set(graph.inputs) | set(graph.outputs))
    renumbered = {old: new for new, old in enumerate(used)}
    graph.tensors = [graph.tensors[i] for i in used]
    for op in graph.operators:
        op.inputs = [renumbered.get(i, -1) for i in op.inputs]
        op.outputs = [renumbered[i] for i in op.outputs]
    graph.inputs = [renumbered[i] for i in graph.inputs]
    graph.outputs = [renumbered[i] for i in graph.outputs]
    for signature in model.signatureDefs or []:
        if signature.subgraphIndex == subgraph:
            for named in (*(signature.inputs or []), *(signature.outputs or [])):
                named.tensorIndex = renumbered[named.tensorIndex]


def rewrite_constant(model, tensor, data: bytes) -> None:
    """`tensor`'s constant set to `data`, in a buffer of its own: the converter stores equal constants once
    (two layers' all-zero int32 biases share a buffer), and a layer's refit must not change another's."""
    shared = sum(t.buffer == tensor.buffer for g in model.subgraphs for t in g.tensors) > 1
    if shared:
        tensor.buffer = add_buffer(model, data)
    else:
        model.buffers[tensor.buffer].data = np.frombuffer(data, np.uint8)


def copied_model(model):
    """A deep copy of a model's objects (ModelT), through its bytes."""
    s = schema()
    return s.ModelT.InitFromObj(s.Model.GetRootAsModel(model_bytes(model), 0))


def write_model(model, target: Path) -> Path:
    target.write_bytes(model_bytes(model))
    return target


def integer_core_digest(path: Path) -> str:
    """A digest of what a model computes between its I/O conversions: every op but a QUANTIZE of a graph input
    and a DEQUANTIZE to a graph output, in order, with its options, its constants' bytes and every tensor's
    type, shape and quantization (tensors named by first use, not index). An int8-I/O model and its float-I/O
    twin converted from the same calibration have the same digest: under one kernel family, fed the same
    quantized input, they compute the same integers."""
    import hashlib

    model = read_model(path)
    graph = model.subgraphs[0]
    names = op_names(model)
    inputs, outputs = set(graph.inputs.tolist()), set(graph.outputs.tolist())
    ids: dict[int, int] = {}
    digest = hashlib.sha256()

    def tensor(index: int) -> tuple:
        if index < 0:
            return ("none",)
        t = graph.tensors[index]
        data = model.buffers[t.buffer].data
        q = t.quantization
        quantization = (None if q is None or q.scale is None else
                        (np.asarray(q.scale).tolist(), np.asarray(q.zeroPoint).tolist(), q.quantizedDimension))
        role = (hashlib.sha256(bytes(bytearray(data))).hexdigest() if data is not None and len(data)
                else ids.setdefault(index, len(ids)))
        return (t.type, np.asarray(t.shape).tolist(), quantization, role)

    for op, name in zip(graph.operators, names):
        if (name == "QUANTIZE" and op.inputs[0] in inputs) or (name == "DEQUANTIZE" and op.outputs[0] in outputs):
            continue
        options = vars(op.builtinOptions) if op.builtinOptions is not None else None
        custom = bytes(bytearray(op.customOptions)) if op.customOptions is not None else b""
        digest.update(repr((name, options, custom, [tensor(i) for i in op.inputs],
                            [tensor(i) for i in op.outputs])).encode())
    return digest.hexdigest()


def input_normalization(model) -> dict | None:
    """{"mean": [...], "std": [...]} of the first input's NormalizationOptions in the model's TFLite metadata
    (TFLITE_METADATA, metadata_schema.fbs), the preprocessing its publisher declared: input = (pixel - mean)
    / std. Read field by field from the flatbuffer (TensorFlow ships no reader for it); None without one."""
    import flatbuffers
    from flatbuffers import number_types as n
    from flatbuffers.table import Table

    entry = next((m for m in model.metadata or [] if m.name == b"TFLITE_METADATA"), None)
    data = model.buffers[entry.buffer].data if entry is not None else None
    if data is None or len(data) < 8:
        return None
    buf = bytearray(bytes(bytearray(data)))

    def field(table: Table, slot: int) -> int:
        return table.Offset(4 + 2 * slot)

    def first(table: Table, slot: int) -> Table | None:  # the first table of a vector of tables
        offset = field(table, slot)
        if not offset or not table.VectorLen(offset):
            return None
        return Table(buf, table.Indirect(table.Vector(offset)))

    def tables(table: Table, slot: int):
        offset = field(table, slot)
        for i in range(table.VectorLen(offset) if offset else 0):
            yield Table(buf, table.Indirect(table.Vector(offset) + 4 * i))

    try:
        root = Table(buf, flatbuffers.encode.Get(n.UOffsetTFlags.packer_type, buf, 0))
        subgraph = first(root, 3)  # ModelMetadata.subgraph_metadata
        tensor = first(subgraph, 2) if subgraph else None  # SubGraphMetadata.input_tensor_metadata
        for unit in tables(tensor, 4) if tensor else ():  # TensorMetadata.process_units
            kind = field(unit, 0)
            if not kind or unit.Get(n.Uint8Flags, kind + unit.Pos) != 1:  # NormalizationOptions
                continue
            options = Table(buf, 0)
            unit.Union(options, field(unit, 1))
            mean, std = (options.GetVectorAsNumpy(n.Float32Flags, field(options, s)).tolist() for s in (0, 1))
            if mean and std and all(v > 0 for v in std):
                return {"mean": mean, "std": std}
    except (IndexError, ValueError, TypeError, AttributeError):  # not the metadata schema: as if none
        return None
    return None
