"""Reading and writing a .tflite flatbuffer as TensorFlow's schema objects, for the stages that edit one."""

from __future__ import annotations

from pathlib import Path


def schema():
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def read_model(path: Path):
    """The whole model as mutable objects (ModelT)."""
    s = schema()
    return s.ModelT.InitFromObj(s.Model.GetRootAsModel(path.read_bytes(), 0))


def op_names(model, subgraph: int = 0) -> list[str]:
    """The builtin name (CONV_2D, ...) or custom code of every operator of a subgraph, in order."""
    names = {value: name for name, value in vars(schema().BuiltinOperator).items() if not name.startswith("_")}
    found = []
    for op in model.subgraphs[subgraph].operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        found.append(code.customCode.decode() if code.customCode else names.get(builtin, str(builtin)))
    return found


def model_bytes(model) -> bytes:
    """The model (ModelT) as a .tflite flatbuffer."""
    import flatbuffers

    builder = flatbuffers.Builder(1 << 20)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def write_model(model, target: Path) -> Path:
    target.write_bytes(model_bytes(model))
    return target
