"""`mzconvert inspect`: what a recipe needs to know of a model file, read from the file itself.

Nothing of the file is executed: graphs are parsed as protobufs, TFLite and ONNX files are opened by
their runtimes, Keras files in safe mode, torch state dicts by the weights-only loader.
"""

from __future__ import annotations

import re
import tarfile
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError, short_text
from ..fsio import sha256_file
from .archive import MODEL_SUFFIXES, archive_members, extract_member
from .pypi import is_platform_wheel

# Nodes that produce nothing a model output could be (and the variables' and Saver's bookkeeping).
NOT_OUTPUTS = {"Const", "NoOp", "Assert", "Placeholder", "VariableV2", "VarHandleOp", "SaveV2", "RestoreV2", "Assign",
               "AssignVariableOp", "IsVariableInitialized"}
# The TF Object Detection API's well-known tensors: name -> what it is.
OD_API_TENSORS = {
    "image_tensor": "the graph's uint8 image input (its own preprocessing follows)",
    "concat": "raw box encodings (SSD BoxPredictor outputs, concatenated)",
    "concat_1": "raw class logits (SSD BoxPredictor outputs, concatenated)",
    "raw_outputs/box_encodings": "raw box encodings",
    "raw_outputs/class_predictions": "raw class logits",
    "Concatenate/concat": "the anchors (ymin, xmin, ymax, xmax)",
    "anchors": "the anchors",
    "detection_boxes": "post-processed boxes (after NMS)",
    "detection_scores": "post-processed scores",
    "detection_classes": "post-processed classes",
    "num_detections": "post-processed detection count",
}


def model_kind(path: Path, name: str | None = None) -> str | None:
    """The recipe format a file or folder (served under `name`) looks like, or 'archive', or None."""
    named = Path(name or path.name)
    if path.is_dir():
        if (path / "saved_model.pb").is_file():
            return "tf-saved-model"
        return "tf-checkpoint" if any(path.glob("*.meta")) else None
    if named.name == "saved_model.pb":
        return "tf-saved-model"
    if named.suffix in MODEL_SUFFIXES:
        kind = MODEL_SUFFIXES[named.suffix]
        return "torchscript" if kind == "torch" and _is_torchscript(path) else kind
    if path.is_file() and (zipfile.is_zipfile(path) or tarfile.is_tarfile(path)):
        return "archive"
    return None


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save's archive holds the module's TorchScript code; torch.save's (a state dict) does not."""
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def inspect_file(path: Path, member: str | None = None, name: str | None = None,
                 input_shape: list[int] | None = None) -> dict:
    """Everything `inspect` reports of a local file, folder, or archive member (`name`: what it was called); an
    ONNX model's outputs at `input_shape` where its input's dynamic dimensions leave theirs unknown."""
    if not path.exists():
        raise MzError(f"{path}: no such file or folder", EXIT_BAD_INPUT)
    kind = model_kind(path, name)
    report: dict = {"file": name or str(path), "kind": kind}
    if path.is_file():
        report |= {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if kind == "archive":
        report["members"] = archive_members(path)
        if member is not None:
            with tempfile.TemporaryDirectory(prefix="mzconvert-inspect-") as tmp:
                extracted = extract_member(path, member, Path(tmp), name or str(path))
                report["member"] = inspect_file(extracted, input_shape=input_shape) | {"file": member}
            if labels := archive_label_files(path, report["members"], name or str(path)):
                report["member"]["label_files"] = labels["label_files"] | report["member"].get("label_files", {})
        return report
    if member is not None:
        raise MzError(f"{path}: --member {member}: the file is not an archive", EXIT_BAD_INPUT)
    inspectors = {"tf-frozen-graph": inspect_frozen_graph, "tf-checkpoint": inspect_checkpoint,
                  "tf-saved-model": inspect_saved_model, "keras": inspect_keras,
                  "onnx": lambda model: inspect_onnx(model, input_shape),
                  "tflite": inspect_tflite, "torch": inspect_torch, "torchscript": inspect_torchscript,
                  "torch-export": inspect_torch_export}
    if kind in inspectors:
        try:
            report |= inspectors[kind](path)
        except MzError:
            raise
        except Exception as exc:  # parsers raise DecodeError, RuntimeError, ValueError...
            raise MzError(f"{path}: not a readable {kind} file: {short_text(exc)}", EXIT_BAD_INPUT) from None
    return report


def inspect_torch(path: Path) -> dict:
    """A state dict, opened by torch's weights-only loader (a pickle that would run code is refused), and
    the module of torch_models.py whose parameters it matches exactly."""
    try:
        from ..backends.torch_models import load_state, matching_classifier
    except ImportError:
        return {"note": "a PyTorch state dict: install the torch extra (pip install 'mzconvert[torch]') to read it"}
    state = load_state(path)
    report = {"format": "torch", "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))}
    match = matching_classifier(state)
    if match is None:
        report["note"] = ("no module of mzconvert/backends/torch_models.py has exactly these parameters; format torch "
                          "builds those modules only")
    else:
        report["torch"] = match
    return report


def inspect_torchscript(path: Path) -> dict:
    """A TorchScript archive, loaded by TorchScript (its code is TorchScript, not Python)."""
    from ..backends.torch_sources import load_module

    module = load_module(path, "torchscript", None, path.parent, (0, 0))
    return {"format": "torchscript", "parameters": int(sum(p.numel() for p in module.parameters())),
            "note": "TorchScript does not record the input shape: give init --input-shape, e.g. 1,3,224,224"}


def inspect_torch_export(path: Path) -> dict:
    """A torch.export archive (.pt2), read from its JSON graph (nothing loaded): the inputs and outputs."""
    import json

    with zipfile.ZipFile(path) as archive:
        name = next((n for n in archive.namelist() if n.endswith("/models/model.json")), None)
        if name is None:
            raise MzError(f"{path}: not a torch.export archive (no models/model.json)", EXIT_BAD_INPUT)
        graph_module = json.loads(archive.read(name))["graph_module"]
    values = graph_module["graph"]["tensor_values"]

    def tensor(argument: dict) -> dict:
        name = argument["as_tensor"]["name"]
        return {"name": name, "dtype": "float32",
                "shape": [d.get("as_int", -1) for d in values[name]["sizes"]]}

    user_inputs = [spec["user_input"]["arg"] for spec in graph_module["signature"]["input_specs"]
                   if "user_input" in spec and "as_tensor" in spec["user_input"]["arg"]]
    outputs = [o for o in graph_module["graph"]["outputs"] if "as_tensor" in o]
    return {"format": "torch-export", "inputs": [tensor(i) for i in user_inputs],
            "outputs": [tensor(o) for o in outputs]}


def resolve_source(source: str, fetcher) -> tuple[Path, str, dict]:
    """(local file, the name it is served under, the recipe's source fields) of a path or URL."""
    if "://" in source:
        if source.startswith("file://"):
            local = Path(source[len("file://"):])
            return local, local.name, {"url": source}
        return fetcher.fetch_unpinned(source), source.rstrip("/").rsplit("/", 1)[-1], {"url": source}
    if source.startswith("pypi:"):  # the release file the index lists (see pypi.py): never pip
        requirement = source.removeprefix("pypi:")
        package, filename = fetcher.fetch_release(requirement)
        # a platform wheel was one choice of several: the recipe names it, so every machine reads the same file
        return package, filename, {"pypi": requirement, **({"wheel": filename} if is_platform_wheel(filename) else {})}
    local = Path(source).resolve()
    return local, local.name, {"url": local.as_uri()}


def _shape(tensor) -> list | None:
    return None if tensor.shape.rank is None else [d if d is not None else -1 for d in tensor.shape.as_list()]


def inspect_checkpoint(path: Path) -> dict:
    """A TF1 checkpoint's graph (its .meta), read like a frozen graph; the Saver's own nodes left out."""
    from tensorflow.core.protobuf import meta_graph_pb2

    from ..backends.tf import _checkpoint_meta

    meta = meta_graph_pb2.MetaGraphDef()
    meta.ParseFromString(_checkpoint_meta(path).read_bytes())
    report = _graph_report(meta.graph_def, run_once=False)  # no variable values loaded: nothing to run
    report["sinks"] = [s for s in report["sinks"] if not s["name"].startswith("save/")]
    return report | {"format": "tf-checkpoint"}


def inspect_frozen_graph(path: Path) -> dict:
    from ..backends.tf import read_graph_def

    return _graph_report(read_graph_def(path), run_once=True) | {"format": "tf-frozen-graph"}


def _graph_report(graph_def, run_once: bool) -> dict:
    from ..quant.tflite_converter import tf_module

    tf = tf_module()
    consumed = {i.split(":")[0].lstrip("^") for node in graph_def.node for i in node.input}
    with tf.Graph().as_default() as graph:
        tf.compat.v1.import_graph_def(graph_def, name="")
    ops = {op.name: op for op in graph.get_operations()}

    def describe(name: str) -> dict:
        out = ops[name].outputs[0] if ops[name].outputs else None
        return {"name": name, "op": ops[name].type,
                **({"dtype": out.dtype.name, "shape": _shape(out)} if out is not None else {})}

    placeholders = [describe(n.name) for n in graph_def.node if n.op == "Placeholder"]
    sinks = [describe(n.name) for n in graph_def.node if n.name not in consumed and n.op not in NOT_OUTPUTS
             and ops[n.name].outputs]
    report = {"nodes": len(graph_def.node), "placeholders": placeholders, "sinks": sinks}

    def made_by(name: str):
        op = ops.get(name)
        return (op.type.upper(), op.inputs[0].op.name) if op is not None and op.inputs else None

    if found := _softmax_outputs([s["name"] for s in sinks], made_by):
        report["softmax_outputs"] = found
    od = {name: describe(name) | {"what": what} for name, what in OD_API_TENSORS.items() if name in ops}
    extractor = [n.name for n in graph_def.node
                 if n.name.startswith("FeatureExtractor/") and n.name.endswith("/input")]
    if od and extractor:
        od[extractor[0]] = describe(extractor[0]) | {"what": "the feature extractor's input: cut here to drop the "
                                                             "graph's own preprocessing"}
    if "image_tensor" in od and run_once:
        _measure_shapes(tf, graph, od)
        for sink in sinks:  # the post-processed outputs are among the sinks
            sink["shape"] = od.get(sink["name"], sink).get("shape")
    if od:
        report["object_detection_api"] = od
    return report


def _measure_shapes(tf, graph, tensors: dict) -> None:
    """Shapes the graph leaves dynamic (its preprocessing runs in a loop), taken from one run on a blank
    64x64 image: the graph's own ops, no code of the file's author."""
    unknown = [name for name, t in tensors.items() if not t.get("shape") or -1 in t["shape"]]
    fetches = [graph.get_tensor_by_name(f"{name}:0") for name in unknown if name != "image_tensor"]
    try:
        with tf.compat.v1.Session(graph=graph) as session:
            values = session.run(fetches, {"image_tensor:0": np.zeros((1, 64, 64, 3), np.uint8)})
    except Exception:  # a graph that does not run on a blank image keeps its static shapes
        return
    for tensor, value in zip(fetches, values):
        tensors[tensor.op.name]["shape"] = list(value.shape)


def inspect_saved_model(path: Path) -> dict:
    from tensorflow.core.protobuf import saved_model_pb2

    from ..quant.tflite_converter import tf_module

    tf = tf_module()
    folder = path if path.is_dir() else path.parent
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((folder / "saved_model.pb").read_bytes())

    def tensors(infos) -> dict:
        return {key: {"name": info.name, "dtype": tf.dtypes.as_dtype(info.dtype).name,
                      "shape": None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]}
                for key, info in sorted(infos.items())}

    signatures = {}
    for meta in saved.meta_graphs:
        for key, signature in meta.signature_def.items():
            if key.startswith("__"):  # __saved_model_init_op and friends
                continue
            signatures[key] = {"tags": list(meta.meta_info_def.tags), "inputs": tensors(signature.inputs),
                               "outputs": tensors(signature.outputs)}
    return {"format": "tf-saved-model", "signatures": signatures}


def inspect_keras(path: Path) -> dict:
    from ..backends.tf import load_keras

    model = load_keras(path)

    def tensors(values, names) -> list[dict]:
        return [{"name": name, "dtype": str(getattr(v.dtype, "name", v.dtype)),
                 "shape": [d if d is not None else -1 for d in v.shape]} for v, name in zip(values, names)]

    return {"format": "keras", "inputs": tensors(model.inputs, [i.name for i in model.inputs]),
            "outputs": tensors(model.outputs, model.output_names), "layers": len(model.layers)}


def inspect_onnx(path: Path, input_shape: list[int] | None = None) -> dict:
    import onnx

    from ..backends.float_twin import onnx_float_twin
    from ..backends.onnx_float16 import as_float32, has_float16

    model = onnx.load(str(path), load_external_data=False)
    stored_float16 = has_float16(model)
    model = as_float32(model)  # as freeze reads it: a float16 file's head is the float32 export's
    ops = dict(Counter(n.op_type for n in model.graph.node).most_common())
    qdq = {op: ops[op] for op in ("QuantizeLinear", "DequantizeLinear") if op in ops}
    if qdq:  # a QDQ file's head is its float twin's: the same float tensors, without the Q/DQ pairs between
        model = onnx_float_twin(model, path)
    initializers = {i.name for i in model.graph.initializer}
    inferred = cache(lambda: _inferred_values(model))  # shape inference once, and only where a head needs it
    made = _onnx_producers(model)

    def tensors(values) -> list[dict]:
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": _onnx_shape(v)} for v in values if v.name not in initializers]

    inputs = tensors(model.graph.input)
    return {"format": "onnx", "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                                           default=None),
            "inputs": inputs, "outputs": _outputs_at(model, inputs, tensors(model.graph.output), input_shape),
            **({"float16": True} if stored_float16 else {}), **({"qdq": qdq} if qdq else {}), "ops": ops,
            **({"query_head": query} if (query := _query_head(model, made, inferred)) else {}),
            **({"selection_input": head} if (head := _selection_input(model, made, inferred)) else {}),
            **({"concat_outputs": parts} if (parts := _concatenated_outputs(model, made, inferred, head)) else {}),
            **({"dfl_input": dfl} if (dfl := _dfl_input(model, made)) else {}),
            **({"distances_input": distances} if (distances := _distances_input(model)) else {}),
            **({"anchor_levels": levels} if (levels := _anchor_levels(model, made)) else {}),
            **({"softmax_outputs": found} if (found := _softmax_outputs(
                [o.name for o in model.graph.output], _onnx_made_by(made))) else {}),
            # what exporters write about the model (Ultralytics: task, names, imgsz, stride), as text
            **({"metadata": {p.key: p.value for p in model.metadata_props}} if model.metadata_props else {})}


def _outputs_at(model, inputs: list[dict], outputs: list[dict], input_shape: list[int] | None) -> list[dict]:
    """The outputs as declared, but each with unknown dimensions at the shape ONNX's shape inference gives it with
    the one image input at `input_shape`, where that tells every dimension (a map of the image's size: what its
    task is read from)."""
    import onnx

    def known(shape: list) -> bool:
        return all(isinstance(d, int) and d > 0 for d in shape)

    unknown = [o for o in outputs if not known(o["shape"])]
    if not input_shape or not unknown or len(inputs) != 1 or len(inputs[0]["shape"]) != len(input_shape):
        return outputs
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    (image,) = [i for i in fixed.graph.input if i.name == inputs[0]["name"]]
    for dim, size in zip(image.type.tensor_type.shape.dim, input_shape):
        dim.Clear()
        dim.dim_value = size
    values = _inferred_values(fixed) or {}
    inferred = {o["name"]: _onnx_shape(values[o["name"]]) for o in unknown if o["name"] in values}
    return [o | {"shape": shape} if (shape := inferred.get(o["name"])) and known(shape) else o for o in outputs]


def _onnx_shape(value) -> list:
    """An ONNX value's shape: sizes, symbolic names ('batch'), or -1 where neither is known."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1) for d in value.type.tensor_type.shape.dim]


def _concatenated_outputs(model, made: dict, inferred: Callable[[], dict | None],
                          selection_input: dict | None) -> dict[str, list[dict]]:
    """{output: its parts} for each graph output (and the head an in-graph selection of detections reads,
    `selection_input`) that a Concat of two tensors or more makes, or is a transposed or reshaped view of (a
    detection head's boxes and scores, then a segment head's mask coefficients or a pose head's keypoints): the
    parts' names and shapes (`inferred`, _inferred_values), where a model can be cut to quantize them apart. A
    part after the first two that a decode makes (a pose head's keypoints, in pixels) names as `decoded_from` the
    tensor it is decoded from."""
    heads = {o.name for o in model.graph.output} | ({selection_input["name"]} if selection_input else set())
    # an output a deployment script transposed ([1, N, 4 + classes]) is a view of the Concat's
    joins = {head: made.get(_viewed(head, _onnx_made_by(made))) for head in heads}
    concats = {head: list(node.input) for head, node in joins.items()
               if node is not None and node.op_type == "Concat" and len(node.input) >= 2}
    if not concats or (values := inferred()) is None:
        return {}
    inputs_of = _onnx_inputs_of(made)
    found = {}
    for out, parts in concats.items():
        if all(name in values for name in parts):
            found[out] = [{"name": name, "shape": _onnx_shape(values[name])} for name in parts]
            for part in found[out][2:]:
                source = _nearest_before([part["name"]], inputs_of, lambda tensor, wanted=part["shape"]:
                                         made[tensor].op_type == "Concat" and tensor in values
                                         and _onnx_shape(values[tensor]) == wanted, DECODE_REACH)
                if source not in (None, part["name"]):
                    part["decoded_from"] = source
    return found


# how many ops back a head's part is searched for what its decode reads (a pose head's keypoint decode is a few:
# reshapes, slices, a multiply and an add, a sigmoid, a concatenation)
DECODE_REACH = 12


def _nearest_before(starts: list, inputs_of: Callable, accept: Callable, reach: int | None = None):
    """Breadth first from `starts` through the ops that make them (inputs_of(tensor): the op's inputs, None for a
    graph input or a constant), at most `reach` ops: the first tensor accept(tensor) holds for, else None. Where a
    head's part is decoded, the nearest concatenation of the same shape before it is what the decode reads (the
    levels' convolutions joined: a pose head's raw keypoints, offsets in strides and visibility logits)."""
    queue, seen = list(starts), set()
    while queue and (reach is None or len(seen) < reach):
        tensor = queue.pop(0)
        if tensor in seen or (inputs := inputs_of(tensor)) is None:
            continue
        seen.add(tensor)
        if accept(tensor):
            return tensor
        queue.extend(inputs)
    return None


def _inferred_values(model) -> dict | None:
    """{name: ValueInfo} of every tensor ONNX's shape inference types; None where it fails (some custom ops)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:
        return None
    return {v.name: v for v in [*inferred.value_info, *inferred.output]}


def _selection_input(model, made: dict, inferred: Callable[[], dict | None]) -> dict | None:
    """The detection head of an export that ends in its own selection of detections ([1, K, 6] rows of box,
    score and class out, and a segment, pose or obb head's more): Ultralytics' `nms=True` (its
    NonMaxSuppression), or an NMS-free head's (YOLO26 and YOLOv10 exported end to end: the K best (box, class)
    scores, by TopK, and no NMS). The nearest tensor before it that a Concat makes of boxes [1, 4, N], scores
    [1, classes, N] and any more per box, as {name, dtype, shape, selected_by (the op), k (K, where the output's
    shape says it), others (the graph's outputs the selection does not make: a segment head's prototypes)};
    None where the graph has neither, or no such head, or its shapes cannot be inferred."""
    import onnx

    nms = [n for n in model.graph.node if n.op_type == "NonMaxSuppression"]
    first_top_k = next((n for n in model.graph.node if n.op_type == "TopK"), None)  # in graph order: the head's
    selection = nms[0] if len(nms) == 1 else first_top_k if not nms else None
    if selection is None or (values := inferred()) is None:
        return None
    rows = _onnx_shape(model.graph.output[0])
    k = {"k": rows[1]} if len(model.graph.output) == 1 and len(rows) == 3 and isinstance(rows[1], int) else {}
    shapes = {name: _onnx_shape(value) for name, value in values.items()}

    def joined(name: str) -> list[list]:
        return [shapes.get(part) or [] for part in made[name].input]

    def is_head(name: str) -> bool:  # a Concat of boxes [1, 4, N], scores [1, classes, N] and any more per box
        parts = joined(name)
        return made[name].op_type == "Concat" and len(parts) >= 2 and all(len(p) == 3 for p in parts) and \
            parts[0][:2] == [1, 4] and all(p[2] == parts[0][2] and isinstance(p[1], int) for p in parts[1:])

    # breadth first: the nearest such Concat is the head, not one inside it
    name = _nearest_before(list(selection.input), _onnx_inputs_of(made), is_head)
    if name is None:
        return None
    parts = joined(name)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(values[name].type.tensor_type.elem_type).name
    # the outputs the selection does not make (a segment head's prototypes) stay outputs of the head
    selected = _made_from(model, selection.output)
    others = [o.name for o in model.graph.output if o.name not in selected]
    return {"name": name, "dtype": dtype, "shape": [1, sum(p[1] for p in parts), parts[0][2]],
            "selected_by": selection.op_type, **k, **({"others": others} if others else {})}


def _made_from(model, tensors) -> set[str]:
    """Every tensor of the graph that `tensors` go into making (themselves too)."""
    made = set(tensors)
    for node in model.graph.node:  # in graph order: a node's inputs are made before it
        if made.intersection(node.input):
            made.update(node.output)
    return made


# how many tensors back from the outputs a query head's sigmoids are searched (RT-DETR's export after them: the
# TopK of the (query, class) scores, the chosen queries' boxes gathered, the rows joined: about 30)
QUERY_REACH = 64


def _query_head(model, made: dict, inferred: Callable[[], dict | None]) -> dict | None:
    """A query detector's head (Ultralytics' RT-DETR exports): the Sigmoids nearest the outputs that give each of
    Q queries its box [1, Q, 4] (centre x, y, width, height normalised to the input) and its classes'
    probabilities [1, Q, classes], whatever the export does after them (selects the best (query, class) pairs,
    or joins them), as {boxes, scores, queries, classes}; None unless the nearest of each has the same Q. An
    anchor-grid head's sigmoids are not laid out so (YOLOv8's class probabilities are [1, classes, N]; YOLOv5's
    5-D)."""
    if not any(node.op_type == "Sigmoid" for node in model.graph.node) or (values := inferred()) is None:
        return None
    nearest: dict[str, list] = {}

    def query_sigmoid(tensor: str) -> bool:
        shape = _onnx_shape(values[tensor]) if tensor in values else []
        if made[tensor].op_type == "Sigmoid" and len(shape) == 3 and shape[0] == 1 and \
                all(isinstance(size, int) and size > 0 for size in shape):
            nearest.setdefault("boxes" if shape[2] == 4 else "scores", [tensor, shape])
        return len(nearest) == 2

    _nearest_before([o.name for o in model.graph.output], _onnx_inputs_of(made), query_sigmoid, QUERY_REACH)
    if len(nearest) != 2 or nearest["boxes"][1][1] != nearest["scores"][1][1]:
        return None
    (boxes, shape), (scores, classes) = nearest["boxes"], nearest["scores"]
    return {"boxes": boxes, "scores": scores, "queries": shape[1], "classes": classes[2]}


def _dfl_input(model, made: dict) -> dict | None:
    """The tensor a YOLOv8 head's DFL decodes (its box branch's distribution logits, [1, 4 x bins, N]), where the
    model can be cut to decode boxes in float: the input, through Reshape and Transpose, of a Softmax that a
    1x1 Conv with weights 0, 1 .. bins - 1 reads (the DFL's expectation), through Transpose where the export's
    opset is before 13 (its Softmax then works on the last axis only). None unless there is exactly one."""
    from onnx import numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    made_by = _onnx_made_by(made)
    found = []
    for node in model.graph.node:
        if node.op_type != "Conv" or len(node.input) < 2:
            continue
        weight, softmax = weights.get(node.input[1]), made.get(_viewed(node.input[0], made_by))
        if weight is None or softmax is None or softmax.op_type != "Softmax" or len(weight.dims) != 4 or \
                not weight.dims[0] == weight.dims[2] == weight.dims[3] == 1:
            continue
        bins = int(weight.dims[1])
        if not np.array_equal(numpy_helper.to_array(weight).ravel(), np.arange(bins)):
            continue
        found.append({"name": _viewed(softmax.input[0], made_by), "bins": bins})
    return found[0] if len(found) == 1 else None


def _distances_input(model) -> str | None:
    """The tensor an Ultralytics head's grid decode (dist2bbox) reads, in an ONNX model (_grid_decode_input)."""
    return _grid_decode_input([(node.op_type.upper(), node.input, node.output) for node in model.graph.node])


def _grid_decode_input(ops) -> str | int | None:
    """The tensor an Ultralytics head's grid decode (dist2bbox) reads: distances [1, 4, N] (left, top, right,
    bottom from each cell's centre, in strides), whose halves (a slice or split of it) are taken from and added to
    the cell centres (x1y1 = centres - lt, x2y2 = centres + rb; the centres may be two constants of the same
    values). In a head without a DFL (YOLO26) it is where the model can be cut to decode boxes in float. `ops`
    are (type in upper case, inputs, outputs), of ONNX nodes or TFLite operators. None unless there is one."""
    halves = {out: inputs[0] for kind, inputs, outputs in ops if kind in ("SLICE", "SPLIT", "STRIDED_SLICE")
              for out in outputs}
    taken = {halves.get(inputs[1]) for kind, inputs, _ in ops if kind == "SUB"}
    added = {halves.get(name) for kind, inputs, _ in ops if kind == "ADD" for name in inputs}
    found = (taken & added) - {None}
    return found.pop() if len(found) == 1 else None


def _anchor_levels(model, producer: dict) -> list[dict]:
    """A YOLOv5-style head, level by level: {name, stride, anchors} for each Conv whose output is reshaped to
    [1, anchors, 5 + classes, h, w], transposed and put through a Sigmoid, and whose sizes the export makes as
    (2 sigmoid) ** 2 x a constant of anchor sizes in input pixels (Pow, then Mul): the anchors (w, h, ...) read
    from that constant, the stride from the export's Mul of the centres. [] unless every level reads so."""
    from onnx import numpy_helper

    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    constants |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def downstream(name: str, depth: int = 4):
        for node in consumers.get(name, []):
            yield node
            if depth > 1:
                for out in node.output:
                    yield from downstream(out, depth - 1)

    def constant_of(node) -> np.ndarray | None:
        return next((constants[n] for n in node.input if n in constants), None)

    levels = []
    for sigmoid in model.graph.node:
        chain = [sigmoid]
        while len(chain) < 4 and chain[-1].input and chain[-1].input[0] in producer:
            chain.append(producer[chain[-1].input[0]])
        if [n.op_type for n in chain] != ["Sigmoid", "Transpose", "Reshape", "Conv"]:
            continue
        shape = constants.get(chain[2].input[1])
        if shape is None or shape.size != 5:
            continue
        count = int(shape[1])
        sizes = [constant_of(m) for p in downstream(sigmoid.output[0]) if p.op_type == "Pow"
                 for m in consumers.get(p.output[0], []) if m.op_type == "Mul"]
        strides = [constant_of(n) for n in downstream(sigmoid.output[0]) if n.op_type == "Mul"
                   and n.input[0] in producer and producer[n.input[0]].op_type == "Add"]
        if len(sizes) != 1 or sizes[0] is None or len(strides) != 1 or strides[0] is None or strides[0].size != 1:
            return []
        try:
            full = np.broadcast_to(sizes[0], np.broadcast_shapes(sizes[0].shape, (1, count, 1, 1, 2)))
        except ValueError:
            return []
        anchors = full.reshape(1, count, -1, 2)[0, :, 0]
        levels.append({"name": chain[3].output[0], "stride": int(strides[0].ravel()[0]),
                       "anchors": [round(float(v), 4) for v in anchors.ravel()]})
    return levels


def inspect_tflite(path: Path) -> dict:
    from ..runtime import open_model
    from ..tflite_file import input_normalization, op_names, producers, read_model, schema

    runner = open_model(path)
    model = read_model(path)
    types = {value: name.lower() for name, value in vars(schema().TensorType).items() if not name.startswith("_")}
    histogram, tensor_types = Counter(), Counter()
    for i, graph in enumerate(model.subgraphs):
        histogram.update(op_names(model, i))
        tensor_types.update(types.get(t.type, str(t.type)) for t in graph.tensors)
    floats = runner.float_tensor_count()
    report = {"format": "tflite", "inputs": [s.to_json() for s in runner.inputs],
              "outputs": [s.to_json() for s in runner.outputs], "ops": dict(histogram.most_common()),
              "tensor_types": dict(tensor_types.most_common()), "float_tensors": floats, "full_integer": floats == 0}
    if normalization := input_normalization(model):
        report["normalization"] = normalization
    made = producers(model)
    if head := _ssd_head(model, made, report["outputs"]):
        report["ssd_head"] = head
    if parts := _tflite_concatenated_outputs(model, made, report["outputs"]):
        report["concat_outputs"] = parts
    if dfl := _tflite_dfl_input(model, made):
        report["dfl_input"] = dfl
    if distances := _tflite_distances_input(model, made):
        report["distances_input"] = distances
    if found := _tflite_softmax_outputs(model, made):
        report["softmax_outputs"] = found
    if zipfile.is_zipfile(path):  # TFLite metadata's associated files (labels.txt) are a zip appended to the model
        with zipfile.ZipFile(path) as files:
            # at most one byte past the cap of each: a member's declared size is the archive's word for it
            found = {info.filename: files.open(info).read(MAX_LABEL_FILE + 1) for info in files.infolist()
                     if LABEL_FILE.search(info.filename) or info.filename == EXPORTER_METADATA}
        if metadata := _exporter_metadata(found.pop(EXPORTER_METADATA, None)):
            report["metadata"] = metadata
        report |= _label_files(found)
    return report


def _tflite_dfl_input(model, made: dict) -> dict | None:
    """As _dfl_input, in a .tflite (`made`: tflite_file.producers): the input, through RESHAPE and TRANSPOSE, of a
    SOFTMAX that a 1x1 CONV_2D with float weights 0, 1 .. bins - 1 reads (stored float32, or float16 behind a
    DEQUANTIZE, as float16 exports store them). None unless there is exactly one."""
    graph = model.subgraphs[0]
    made_by = _tflite_made_by(made)
    found = []
    for name, op in made.values():  # a CONV_2D makes one tensor: each once
        if name != "CONV_2D" or made.get(softmax := _viewed(op.inputs[0], made_by), ("",))[0] != "SOFTMAX":
            continue
        weight, stored = op.inputs[1], "<f4"
        if made.get(weight, ("",))[0] == "DEQUANTIZE":
            weight, stored = made[weight][1].inputs[0], "<f2"
        tensor = graph.tensors[weight]
        data = model.buffers[tensor.buffer].data
        bins = int(tensor.shape[-1])
        if data is None or list(tensor.shape) != [1, 1, 1, bins] or len(data) != np.dtype(stored).itemsize * bins \
                or not np.array_equal(np.frombuffer(bytes(data), stored), np.arange(bins)):
            continue
        found.append({"name": graph.tensors[_viewed(made[softmax][1].inputs[0], made_by)].name.decode(), "bins": bins})
    return found[0] if len(found) == 1 else None


def _tflite_distances_input(model, made: dict) -> str | None:
    """As _distances_input, in a .tflite (`made`: tflite_file.producers)."""
    # a TFLite SPLIT reads its axis first, its tensor second
    ops = [(name, op.inputs[1:] if name == "SPLIT" else op.inputs, op.outputs) for name, op in made.values()]
    distances = _grid_decode_input(ops)
    return model.subgraphs[0].tensors[distances].name.decode() if distances is not None else None


# Ops whose output holds their input's values (a quantized graph's: at another scale)
VALUE_VIEWS = ("RESHAPE", "FLATTEN", "SQUEEZE", "IDENTITY", "QUANTIZE", "DEQUANTIZE", "QUANTIZELINEAR",
               "DEQUANTIZELINEAR")


def _softmax_outputs(outputs: list, made_by: Callable) -> dict:
    """{output: the tensor its Softmax reads} of the `outputs` a Softmax makes, through views of its values:
    outputs of probabilities, where the tensor read holds the logits."""
    found = {}
    for output in outputs:
        softmax = _viewed(output, made_by, VALUE_VIEWS)
        if (made := made_by(softmax)) and made[0] == "SOFTMAX":
            found[output] = made[1]
    return found


def _tflite_softmax_outputs(model, made: dict) -> dict[str, str]:
    """_softmax_outputs of a .tflite's first subgraph, by tensor name."""
    tensors = model.subgraphs[0].tensors
    return {tensors[output].name.decode(): tensors[logits].name.decode() for output, logits in
            _softmax_outputs(list(model.subgraphs[0].outputs), _tflite_made_by(made)).items()}


def softmax_outputs(path: Path) -> set[str]:
    """The outputs of a .tflite or .onnx file that a Softmax makes: probabilities, not logits."""
    if path.suffix == ".tflite":
        from ..tflite_file import producers, read_model

        model = read_model(path)
        return set(_tflite_softmax_outputs(model, producers(model)))
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return set(_softmax_outputs([o.name for o in model.graph.output], _onnx_made_by(_onnx_producers(model))))


def _viewed(tensor, made_by, views: tuple[str, ...] = ("RESHAPE", "TRANSPOSE")):
    """The tensor `tensor` is a reshaped or transposed view of (itself where it is none); made_by(tensor) is the
    op type (upper case) and first input of the op that makes it, None for a graph input or a constant. `views`:
    the ops that make such a view."""
    while (made := made_by(tensor)) and made[0] in views:
        tensor = made[1]
    return tensor


# In an integer .tflite the same values at another scale: the converter requantizes each input of a CONCATENATION
# to its output's scale (QUANTIZE), and a model with float outputs dequantizes them last (DEQUANTIZE)
REQUANTIZED_VIEWS = ("RESHAPE", "TRANSPOSE", "QUANTIZE", "DEQUANTIZE")


def _onnx_producers(model) -> dict:
    """{tensor name: node} of an ONNX graph, by the tensors its nodes make."""
    return {out: node for node in model.graph.node for out in node.output}


def _onnx_made_by(made: dict) -> Callable:
    """_viewed's made_by over _onnx_producers' map."""
    return lambda name: (made[name].op_type.upper(), made[name].input[0]) if name in made else None


def _onnx_inputs_of(made: dict) -> Callable:
    """_nearest_before's inputs_of over _onnx_producers' map."""
    return lambda name: list(made[name].input) if name in made else None


def _tflite_made_by(made: dict) -> Callable:
    """_viewed's made_by over tflite_file.producers' map."""
    return lambda tensor: (made[tensor][0], made[tensor][1].inputs[0]) if tensor in made else None


# What Ultralytics appends to the .tflite it exports (its ONNX exports carry the same as metadata_props)
EXPORTER_METADATA = "metadata.json"


def _exporter_metadata(data: bytes | None) -> dict[str, str]:
    """An exporter's metadata.json as ONNX metadata_props read (each value a string, Python literals for the
    others: names {0: 'person', ...}, imgsz [640, 640]), for the proposers that read those; {} where it is none."""
    import json

    if data is None or len(data) > MAX_LABEL_FILE:
        return {}
    try:
        values = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    if not isinstance(values, dict):
        return {}
    names = values.get("names")
    if isinstance(names, dict) and all(isinstance(k, str) and k.isdigit() for k in names):  # JSON keys are strings
        values["names"] = {int(k): v for k, v in names.items()}
    return {str(key): value if isinstance(value, str) else repr(value) for key, value in values.items()}


def _tflite_concatenated_outputs(model, made: dict, outputs: list[dict]) -> dict[str, list[dict]]:
    """{output: its parts} for each output that a CONCATENATION of two tensors or more makes, or is a transposed,
    reshaped or requantized view of (a detection head's boxes and scores, then any other part; `made`:
    _tflite_producers): the parts' names and shapes, where a model can be cut to quantize them apart, and the
    tensor a decoded part is decoded from (`decoded_from`), as for ONNX."""
    graph = model.subgraphs[0]

    def shape(tensor: int) -> list[int]:
        return [int(d) for d in graph.tensors[tensor].shape]

    def inputs_of(tensor: int) -> list[int] | None:
        return [i for i in made[tensor][1].inputs if i >= 0] if tensor in made else None

    made_by = _tflite_made_by(made)
    found = {}
    for i in graph.outputs:
        name, op = made.get(_viewed(i, made_by, REQUANTIZED_VIEWS), ("", None))
        if name == "CONCATENATION" and len(op.inputs) >= 2:
            # each part at its own scale, before a requantization to the join's (which can leave probabilities
            # at a box-sized step: all 0)
            found[graph.tensors[i].name.decode()] = parts = [
                {"name": graph.tensors[_viewed(t, made_by, ("QUANTIZE",))].name.decode(), "shape": shape(t)}
                for t in op.inputs]
            for part, tensor in zip(parts[2:], op.inputs[2:]):
                source = _nearest_before([tensor], inputs_of, lambda t, wanted=part["shape"]:
                                         made[t][0] == "CONCATENATION" and shape(t) == wanted, DECODE_REACH)
                if source not in (None, tensor):
                    part["decoded_from"] = graph.tensors[source].name.decode()
    return {out: parts for out, parts in found.items() if out in {o["name"] for o in outputs}}


def _ssd_head(model, made: dict, outputs: list[dict]) -> dict | None:
    """An SSD head whose anchors are not in the graph (MediaPipe's detectors: BlazeFace, pose, palm): two outputs
    [1, N, 4 + 2 x keypoints] (box offsets, then keypoints) and [1, N, classes], each joined from per-level maps
    [1, rows, columns, anchors x values] reshaped (and concatenated, level by level). {box_output, class_output,
    levels: [{rows, columns, anchors}]}: the anchors per cell each level has, as both outputs read them; else None.
    `made`: tflite_file.producers."""
    shapes = [o.get("shape") or [] for o in outputs]
    if len(outputs) != 2 or any(len(shape) != 3 for shape in shapes) or shapes[0][1] != shapes[1][1]:
        return None
    boxes, scores = sorted(outputs, key=lambda o: -o["shape"][2])
    if boxes["shape"][2] < 4 or boxes["shape"][2] % 2 or boxes["shape"][2] == scores["shape"][2]:
        return None
    graph = model.subgraphs[0]
    by_name = {graph.tensors[i].name.decode(): i for i in graph.outputs}

    def levels(output: dict) -> list[tuple[int, int, int]] | None:
        """Each level's (rows, columns, anchors) of one output, in the order it joins them."""
        if output["name"] not in by_name:  # named by a signature, not by its tensor
            return None
        name, op = made.get(by_name[output["name"]], ("", None))
        parts = list(op.inputs) if name == "CONCATENATION" else [by_name[output["name"]]]
        found = []
        for part in parts:
            name, op = made.get(part, ("", None))
            shape = list(graph.tensors[op.inputs[0]].shape) if name == "RESHAPE" else []
            if len(shape) != 4 or shape[0] != 1 or shape[3] % output["shape"][2]:
                return None
            found.append((int(shape[1]), int(shape[2]), int(shape[3]) // output["shape"][2]))
        return found

    found = levels(boxes)
    if not found or found != levels(scores) or sum(r * c * a for r, c, a in found) != boxes["shape"][1]:
        return None
    head = {"box_output": boxes["name"], "class_output": scores["name"], "classes": scores["shape"][2],
            "levels": [{"rows": r, "columns": c, "anchors": a} for r, c, a in found]}
    if parts := _regressor_parts(model, by_name[boxes["name"]]):
        head["box_parts"] = parts
    return head


def _regressor_parts(model, output: int) -> list[str] | None:
    """The tensors freeze makes the boxes and the keypoints of the box output apart in (backends/split_head.py),
    its weights read as freeze reads them; None where it does not."""
    from ..backends.split_head import regressor_parts, tflite_regressor_levels
    from ..backends.tflite import plain_weights
    from ..tflite_file import copied_model, producers

    frozen = copied_model(model)
    plain_weights(frozen)
    if tflite_regressor_levels(frozen, output, producers(frozen)) is None:
        return None
    return list(regressor_parts(model.subgraphs[0].tensors[output].name.decode()))


# A text file that names a model's classes, a line each, by the names such files have
LABEL_FILE = re.compile(r"(label|class|synset|categor|names)[^/]*\.(txt|names|labels)$", re.IGNORECASE)
MAX_LABEL_FILE = 1 << 20


def _label_files(found: dict[str, bytes]) -> dict:
    """{"label_files": {name: its non-empty lines}} of the label files a model carries, where they are text."""
    files = {}
    for name, data in found.items():
        try:
            lines = [line.strip() for line in data[:MAX_LABEL_FILE].decode("utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError:
            continue
        if lines:
            files[name] = lines
    return {"label_files": files} if files else {}


def archive_label_files(path: Path, members: list[dict], shown: str) -> dict:
    """The label files among an archive's members (small text files named for labels)."""
    wanted = [m["name"] for m in members if LABEL_FILE.search(m["name"]) and m.get("size", 0) <= MAX_LABEL_FILE]
    found = {}
    with tempfile.TemporaryDirectory(prefix="mzconvert-labels-") as tmp:
        for name in wanted:
            found[name] = extract_member(path, name, Path(tmp), shown).read_bytes()
    return _label_files(found)


def inspect_text(report: dict, indent: str = "") -> str:
    """The report for people: one fact a line."""
    lines = [f"{indent}{report['file']}: {report.get('format') or report.get('kind') or 'not a model file'}"
             + (f", {report['size']} bytes, sha256 {report['sha256']}" if "sha256" in report else "")]
    for m in report.get("members", []):
        mark = f"  <- {m['model']}" + (f", sha256 {m['sha256']}" if "sha256" in m else "") if "model" in m else ""
        lines.append(f"{indent}  {m['size']:>12}  {m['name']}{mark}")
    if "member" in report:
        lines.append(inspect_text(report["member"], indent + "  "))

    def tensor_line(t: dict) -> str:
        quant = f" scale {t['scale']:.6g} zero point {t['zero_point']}" if t.get("scale") is not None else ""
        shape = t.get("shape") if t.get("shape") is not None else "(shape unknown)"
        return f"{t['name']}  {t.get('dtype', '?')} {shape}{quant}"

    for title, key in (("placeholders", "placeholders"), ("inputs", "inputs"), ("outputs", "outputs"),
                       ("sink nodes (likely outputs)", "sinks")):
        if report.get(key):
            lines.append(f"{indent}  {title}:")
            lines += [f"{indent}    {tensor_line(t)}" for t in report[key]]
    for od in report.get("object_detection_api", {}).values():
        lines.append(f"{indent}  TF OD API {tensor_line(od)}: {od['what']}")
    for key, signature in report.get("signatures", {}).items():
        lines.append(f"{indent}  signature {key} (tags {', '.join(signature['tags'])}):")
        for role in ("inputs", "outputs"):
            for k, t in signature[role].items():
                lines.append(f"{indent}    {role[:-1]} {k}: {t['name']}  {t['dtype']} {t['shape']}")
    for key, value in report.get("metadata", {}).items():
        lines.append(f"{indent}  metadata {key}: {value if len(value) <= 100 else value[:97] + '...'}")
    if report.get("opset") is not None:
        lines.append(f"{indent}  opset {report['opset']}")
    if report.get("float16"):
        lines.append(f"{indent}  stored in float16: read as the float32 model its weights round (the Casts "
                     "between them dropped)")
    dynamic = [f"{t['name']} {t['shape']}" for key in ("inputs", "outputs") for t in report.get(key, [])
               if any(not isinstance(d, int) or d < 0 for d in (t.get("shape") or []))]
    if dynamic:
        lines.append(f"{indent}  dynamic dimensions: {'; '.join(dynamic)}")
    if "ops" in report:
        lines.append(f"{indent}  ops: " + ", ".join(f"{op} {n}" for op, n in report["ops"].items()))
    if head := report.get("ssd_head"):
        lines.append(f"{indent}  SSD head without anchors: boxes {head['box_output']}, scores {head['class_output']}; "
                     "levels (rows x columns x anchors) " +
                     ", ".join(f"{v['rows']}x{v['columns']}x{v['anchors']}" for v in head["levels"]))
        if parts := head.get("box_parts"):
            lines.append(f"{indent}  its boxes and keypoints made apart at freeze: {parts[0]}, {parts[1]}")
    if head := report.get("query_head"):
        lines.append(f"{indent}  query head: {head['queries']} queries, boxes {head['boxes']}, {head['classes']} "
                     f"classes' probabilities {head['scores']}")
    if head := report.get("selection_input"):
        lines.append(f"{indent}  ends in its own {head['selected_by']}, which reads the head {tensor_line(head)}")
    if dfl := report.get("dfl_input"):
        lines.append(f"{indent}  DFL ({dfl['bins']} bins) reads {dfl['name']}: a head to cut before it")
    elif distances := report.get("distances_input"):
        lines.append(f"{indent}  a grid decode (dist2bbox) reads the distances {distances}: a head to cut before it")
    for level in report.get("anchor_levels", []):
        lines.append(f"{indent}  anchor head level {level['name']}: stride {level['stride']}, anchors (w, h) "
                     f"{level['anchors']}")
    if normalization := report.get("normalization"):
        lines.append(f"{indent}  input normalization in its metadata: (pixel - {normalization['mean']}) / "
                     f"{normalization['std']}")
    for file, names in report.get("label_files", {}).items():
        lines.append(f"{indent}  label file {file}: {len(names)} names ({', '.join(names[:3])}, ...)")
    if "full_integer" in report:
        lines.append(f"{indent}  full-integer: {'yes' if report['full_integer'] else 'no'} "
                     f"({report['float_tensors']} float32 tensors)")
    if "torch" in report:
        lines.append(f"{indent}  the weights of torch_models.py {report['torch']['module']}: "
                     f"{report['torch']['num_classes']} classes, width {report['torch']['width']}")
    if "note" in report:
        lines.append(f"{indent}  {report['note']}")
    return "\n".join(lines)
