"""TensorFlow sources (frozen graph, checkpoint, SavedModel) converted with the TFLite converter.

TensorFlow is imported inside the functions: `list`, `validate` and an up-to-date build never
pay its 3-4 s import.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError, RecipeError, short_text
from ..quant.tflite_converter import converter_range_slots, run_converter, tf_module
from ..recipe import Recipe, Variant
from ..tasks.detection import postprocessed_detections
from . import StripResult, check_tensors, export_anchors


def read_graph_def(path: Path):
    tf = tf_module()
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise MzError(f"{path}: not a TensorFlow GraphDef (corrupt or truncated: {short_text(exc)})",
                      EXIT_BAD_INPUT) from None
    if not graph_def.node:
        raise MzError(f"{path}: GraphDef has no nodes (corrupt or truncated file)", EXIT_BAD_INPUT)
    return graph_def


def _write_graph_def(graph_def, path: Path) -> Path:
    path.write_bytes(graph_def.SerializeToString(deterministic=True))
    return path


def _node_name(tensor: str) -> str:
    return tensor.split(":", 1)[0]


def _node_names(tensors: Iterable[str]) -> list[str]:
    """Distinct node names, in order (TFLite_Detection_PostProcess:1..3 are one node)."""
    return list(dict.fromkeys(_node_name(t) for t in tensors))


def _converter_name(tensor: str) -> str:
    """The converter wants bare names for output 0 ('x:0' is rejected) and 'x:k' for the others."""
    return tensor[:-2] if tensor.endswith(":0") else tensor


def _check_nodes(recipe: Recipe, field: str, names: Iterable[str], graph_nodes: list[str]) -> None:
    check_tensors(recipe, field, names, graph_nodes, key=_node_name)


def apply_graph_edits(graph_def, recipe: Recipe) -> None:
    """Set attributes of named nodes (e.g. TFLite_Detection_PostProcess thresholds), type-checked."""
    tf = tf_module()
    nodes = {n.name: n for n in graph_def.node}
    _check_nodes(recipe, "graph_edits", recipe.graph_edits, list(nodes))
    for node_name, attrs in recipe.graph_edits.items():
        node = nodes[node_name]
        for key, value in attrs.items():
            where = f"{recipe.path}: graph_edits.{node_name}.{key}"
            if key not in node.attr:
                close = difflib.get_close_matches(key, list(node.attr), n=3)
                known = ", ".join(close or sorted(node.attr))
                raise RecipeError(f"{where}: node has no attribute {key!r}; it has {known}")
            kind = node.attr[key].WhichOneof("value")
            expected = {"f": (int, float), "i": (int,), "b": (bool,), "s": (str,)}.get(kind)
            if expected is None or not isinstance(value, expected) or (kind != "b" and isinstance(value, bool)):
                raise RecipeError(f"{where}: {value!r} does not fit the attribute's type ({kind})")
            node.attr[key].CopyFrom(tf.compat.v1.AttrValue(**{kind: value.encode() if kind == "s" else value}))


# -- freeze --------------------------------------------------------------------------------------
def freeze(source: Path, recipe: Recipe, out_dir: Path) -> Path:
    """One frozen GraphDef, whatever the TensorFlow source format."""
    tf = tf_module()
    target = out_dir / "frozen.pb"
    if recipe.format in ("tf-frozen-graph", "keras"):
        graph_def = read_graph_def(source) if recipe.format == "tf-frozen-graph" else _keras_graph(source, recipe)
        apply_graph_edits(graph_def, recipe)
        return _write_graph_def(graph_def, target)
    # Keep what strip will need: the outputs, and the tensor the SSD anchors are read from.
    keep = list(recipe.strip.outputs if recipe.strip else ())
    if recipe.postprocess is not None and recipe.postprocess.anchors_tensor:
        keep.append(recipe.postprocess.anchors_tensor)
    if not keep:
        raise RecipeError(f"{recipe.path}: strip.outputs: needed to freeze a {recipe.format} source")
    graph = tf.Graph()
    signature = PublicNames()
    with tf.compat.v1.Session(graph=graph) as session:
        if recipe.format == "tf-checkpoint":
            meta = _checkpoint_meta(source)
            saver = tf.compat.v1.train.import_meta_graph(str(meta), clear_devices=True)
            saver.restore(session, str(meta.with_suffix("")))
        else:  # tf-saved-model
            _check_saved_model(source)
            signature = _signature_names(tf.compat.v1.saved_model.loader.load(session, ["serve"], str(source)))
        nodes = [n.name for n in graph.as_graph_def().node]
        outputs = _node_names(signature.outputs.get(name, name) for name in keep)
        _check_nodes(recipe, "strip.outputs", outputs, nodes + list(signature.outputs))
        frozen = tf.compat.v1.graph_util.convert_variables_to_constants(
            session, graph.as_graph_def(), outputs)
    signature.name_nodes(frozen, [recipe.input.name, *(recipe.strip.inputs if recipe.strip else ())], keep)
    apply_graph_edits(frozen, recipe)
    return _write_graph_def(frozen, target)


@dataclass
class PublicNames:
    """The names a model shows its users (a SavedModel's serving-signature keys, a Keras model's input and
    output layers) -> the graph tensors they stand for. Recipes use those names ('pixels', 'scores'); the
    frozen graph gets nodes of those names."""

    inputs: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    output_dtypes: dict[str, int] = field(default_factory=dict)  # DataType enums

    def name_nodes(self, graph_def, inputs: list[str], outputs: list[str]) -> None:
        tf = tf_module()
        taken = {n.name for n in graph_def.node}
        renamed = {_node_name(self.inputs[key]): key for key in inputs if key in self.inputs and key not in taken}
        for node in graph_def.node:  # an input key renames its placeholder, and every use of it
            node.name = renamed.get(node.name, node.name)
            node.input[:] = [_renamed_input(i, renamed) for i in node.input]
        for key in dict.fromkeys(outputs):  # an output key is an Identity of the tensor it stands for
            if key in self.outputs and key not in taken:
                identity = graph_def.node.add(name=key, op="Identity", input=[self.outputs[key].removesuffix(":0")])
                identity.attr["T"].CopyFrom(tf.compat.v1.AttrValue(type=self.output_dtypes[key]))


def _renamed_input(name: str, renamed: dict[str, str]) -> str:
    control = name.startswith("^")
    node, _, index = name.lstrip("^").partition(":")
    node = renamed.get(node, node)
    return ("^" if control else "") + node + (f":{index}" if index else "")


def _signature_names(meta_graph) -> PublicNames:
    signatures = {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}
    chosen = signatures.get("serving_default") or (next(iter(signatures.values())) if len(signatures) == 1 else None)
    if chosen is None:
        return PublicNames()
    return PublicNames({k: v.name for k, v in chosen.inputs.items()}, {k: v.name for k, v in chosen.outputs.items()},
                          {k: v.dtype for k, v in chosen.outputs.items()})


def _check_saved_model(source: Path) -> None:
    if source.is_dir() and (source / "saved_model.pb").is_file():
        return
    head = source.read_bytes()[:8] if source.is_file() else b""
    keras = head.startswith(b"\x89HDF") or head.startswith(b"PK") or source.suffix in (".h5", ".hdf5", ".keras")
    raise MzError(f"{source}: format tf-saved-model needs a folder holding saved_model.pb"
                  + ("; this is a Keras file: use format: keras" if keras else ""), EXIT_BAD_INPUT)


def load_keras(source: Path):
    """A .keras or .h5 (.hdf5) model, in Keras' safe mode: a Lambda layer's pickled Python code is refused, not run."""
    import keras

    try:
        return keras.saving.load_model(str(source), compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, TypeError... for what it cannot read
        raise MzError(f"{source}: not a Keras model (.keras or .h5) Keras can load safely: {short_text(exc)}",
                      EXIT_BAD_INPUT) from None


def _keras_graph(source: Path, recipe: Recipe):
    """The Keras model as one frozen graph at the recipe's input shape, its input and outputs named as in Keras
    (the input layer's name, the output layers' names)."""
    tf = tf_module()
    model = load_keras(source)
    if len(model.inputs) != 1:
        raise MzError(f"{source}: {len(model.inputs)} inputs; mzconvert converts single-image models", EXIT_BAD_INPUT)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec(recipe.input.shape, tf.float32))
    return frozen_function(function, model.inputs[0].name, list(model.output_names))


def frozen_function(function, input_name: str, output_names: list[str]):
    """A one-input concrete function as one frozen GraphDef: its placeholder named `input_name`, an Identity
    of each output named as in `output_names`."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    graph_def = convert_variables_to_constants_v2(function).graph.as_graph_def()
    placeholder = next(n.name for n in graph_def.node if n.op == "Placeholder")
    outputs = [t.name for t in function.outputs]
    PublicNames({input_name: f"{placeholder}:0"}, dict(zip(output_names, outputs)),
                {name: t.dtype.as_datatype_enum for name, t in zip(output_names, function.outputs)},
                ).name_nodes(graph_def, [input_name], output_names)
    return graph_def


def _checkpoint_meta(source: Path) -> Path:
    if source.is_file() and source.suffix == ".meta":
        return source
    metas = sorted(source.glob("*.meta")) if source.is_dir() else []
    if len(metas) != 1:
        raise MzError(f"{source}: expected one model.ckpt.meta in the checkpoint folder, found {len(metas)}",
                      EXIT_BAD_INPUT)
    return metas[0]


# -- strip ---------------------------------------------------------------------------------------
def strip(frozen: Path, recipe: Recipe, out_dir: Path) -> StripResult:
    """Cut the graph at the recipe's input (made a placeholder) and outputs; export SSD anchors."""
    tf = tf_module()
    graph_def = read_graph_def(frozen)
    names = [n.name for n in graph_def.node]
    cut = recipe.strip
    _check_nodes(recipe, "strip.inputs", cut.inputs, names)
    _check_nodes(recipe, "strip.outputs", cut.outputs, names)
    input_node = _node_name(cut.inputs[0])

    metadata: dict = {}
    extras: list[Path] = []
    if recipe.postprocess is not None and recipe.postprocess.anchors_tensor:
        _check_nodes(recipe, "postprocess.anchors_tensor", [recipe.postprocess.anchors_tensor], names)
        try:
            anchors = _evaluate(graph_def, recipe.postprocess.anchors_tensor, cut.inputs[0], recipe.input.shape)
        except Exception as exc:  # tf.errors.* or ValueError for a shape the graph rejects
            raise _shape_error(recipe, exc) from None
        extras, metadata = export_anchors(anchors, recipe, out_dir)

    placeholder = tf.compat.v1.NodeDef(name=input_node, op="Placeholder")
    placeholder.attr["dtype"].CopyFrom(tf.compat.v1.AttrValue(type=tf.float32.as_datatype_enum))
    placeholder.attr["shape"].CopyFrom(tf.compat.v1.AttrValue(
        shape=tf.TensorShape(recipe.input.shape).as_proto()))
    rewired = tf.compat.v1.GraphDef()
    rewired.versions.CopyFrom(graph_def.versions)
    rewired.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        rewired.node.append(placeholder if node.name == input_node else node)
    _check_downstream(recipe, graph_def, input_node)
    stripped = tf.compat.v1.graph_util.extract_sub_graph(rewired, _node_names(cut.outputs))
    model = _write_graph_def(stripped, out_dir / "stripped.pb")
    metadata["nodes"] = {"before": len(graph_def.node), "after": len(stripped.node)}
    kept = {n.name for n in stripped.node}
    metadata["source_resize"] = sorted({_resize_mode(n) for n in graph_def.node
                                        if n.op in _RESIZE_OPS and n.name not in kept})
    _check_declared_shape(model, recipe, metadata.get("anchors", {}).get("count"))
    return StripResult(model=model, extras=extras, metadata=metadata)


def _check_downstream(recipe: Recipe, graph_def, input_node: str) -> None:
    """Every output must be computed from the cut input; one upstream of it would keep the original
    input (and its preprocessing) alive, and fail later as an unrelated shape error."""
    inputs = {n.name: [_node_name(i.lstrip("^")) for i in n.input] for n in graph_def.node}
    for output in _node_names(recipe.strip.outputs):
        seen, stack = set(), [output]
        while stack:
            node = stack.pop()
            if node == input_node:
                break
            if node not in seen:
                seen.add(node)
                stack.extend(inputs.get(node, []))
        else:
            raise RecipeError(f"{recipe.path}: strip.outputs: {output!r} does not depend on strip.inputs "
                              f"{input_node!r}: it is computed before the cut (or beside it)")


_RESIZE_OPS = ("ResizeBilinear", "ResizeNearestNeighbor", "ResizeBicubic", "ResizeArea", "ScaleAndTranslate")


def _resize_mode(node) -> str:
    """The preprocess.interpolation mode a resize op of the cut-off preprocessing reproduces, or its op name."""
    half_pixel = "half_pixel_centers" in node.attr and node.attr["half_pixel_centers"].b
    if node.op == "ResizeBilinear" and not node.attr["align_corners"].b:
        return "tf2-bilinear" if half_pixel else "tf1-bilinear"
    if node.op == "ScaleAndTranslate" and node.attr["kernel_type"].s == b"triangle":
        return "tf2-bilinear-antialias"
    return f"TensorFlow {node.op} (no mode reproduces it)"


def _shape_error(recipe: Recipe, exc: Exception) -> RecipeError:
    first = str(exc).strip().splitlines()[0]
    return RecipeError(f"{recipe.path}: input.shape: the graph cannot run at {list(recipe.input.shape)}: {first}")


def _check_declared_shape(model: Path, recipe: Recipe, anchor_count: int | None) -> None:
    """Run the cut graph once at input.shape: a shape the graph cannot take fails here, by name."""
    try:
        ran = GraphRunner(model, recipe).run(np.zeros(recipe.input.shape, np.float32))
        outputs = dict(zip(recipe.strip.outputs, ran))
    except Exception as exc:  # tf.errors.* or ValueError for a shape the graph rejects
        raise _shape_error(recipe, exc) from None
    post = recipe.postprocess
    if anchor_count is not None:
        boxes = outputs[post.box_output].size // 4
        if boxes != anchor_count:
            raise RecipeError(f"{recipe.path}: input.shape: {list(recipe.input.shape)} gives {boxes} boxes at "
                              f"{post.box_output!r} but {post.anchors_tensor!r} has {anchor_count} anchors")


def _evaluate(graph_def, tensor: str, input_tensor: str, input_shape) -> np.ndarray:
    tf = tf_module()
    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(graph_def, name="")
    with tf.compat.v1.Session(graph=graph) as session:
        feed = {_tensor_name(input_tensor): np.zeros(input_shape, np.float32)}
        return session.run(_tensor_name(tensor), feed)


def _tensor_name(name: str) -> str:
    return name if ":" in name else f"{name}:0"


# -- reference run ------------------------------------------------------------------------------
class GraphRunner:
    """Runs the stripped float graph in TensorFlow: the reference every variant is compared with."""

    is_twin = False  # a frozen graph is float

    def __init__(self, model: Path, recipe: Recipe, threads: int | None = None):
        tf = tf_module()
        graph = tf.Graph()
        with graph.as_default():
            tf.import_graph_def(read_graph_def(model), name="")
        config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=threads) if threads else None  # None: all
        self._session = tf.compat.v1.Session(graph=graph, config=config)
        self._input = _tensor_name(recipe.strip.inputs[0])
        self._outputs = [_tensor_name(o) for o in recipe.strip.outputs]
        self.output_names = list(recipe.strip.outputs)

    def run(self, tensor: np.ndarray) -> list[np.ndarray]:
        return self._session.run(self._outputs, {self._input: tensor})


class SourcePipelineRunner:
    """The frozen source graph end to end (recipe.source_pipeline): the decoded 8-bit image in, its own
    preprocessing and post-processing applied: the ground truth for our declared pipeline."""

    def __init__(self, frozen: Path, recipe: Recipe):
        tf = tf_module()
        spec = recipe.source_pipeline
        graph_def = read_graph_def(frozen)
        nodes = {n.name: n for n in graph_def.node}
        _check_nodes(recipe, "source_pipeline.input", [spec.input], list(nodes))
        _check_nodes(recipe, "source_pipeline.outputs", spec.outputs.values(), list(nodes))
        graph = tf.Graph()
        with graph.as_default():
            tf.import_graph_def(graph_def, name="")
        self._session = tf.compat.v1.Session(graph=graph)
        self._input = graph.get_tensor_by_name(_tensor_name(spec.input))
        self._outputs = [_tensor_name(name) for name in spec.outputs.values()]
        self._roles = list(spec.outputs)
        self._class_offset = spec.class_offset

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        feed = pixels[None].astype(self._input.dtype.as_numpy_dtype)
        return self._session.run(self._outputs, {self._input: feed})

    def detections(self, pixels: np.ndarray):
        out = dict(zip(self._roles, self.run(pixels)))
        return postprocessed_detections(out["boxes"], out["classes"], out["scores"], out["count"], self._class_offset)


# -- convert -------------------------------------------------------------------------------------

def _frozen_graph_converter(model: Path, recipe: Recipe):
    tf = tf_module()
    cut = recipe.strip
    converter = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(model), input_arrays=[_node_name(cut.inputs[0])],
        output_arrays=[_converter_name(o) for o in cut.outputs],
        # Without explicit shapes a cut placeholder fails with a misleading MLIR error.
        input_shapes={_node_name(cut.inputs[0]): list(recipe.input.shape)})
    # TFLite_Detection_PostProcess is a custom op the interpreter provides, in every mode.
    post = recipe.postprocess
    converter.allow_custom_ops = post is not None and post.kind == "tflite-detection-postprocess"
    return converter


def tflite_converter(model: Path, recipe: Recipe):
    """(a TFLite converter of the stripped model, what turns recipe input tensors into its inputs)."""
    return _frozen_graph_converter(model, recipe), lambda tensor: tensor


def range_slots(model: Path, recipe: Recipe, tensor: np.ndarray, target: Path):
    return converter_range_slots(*tflite_converter(model, recipe), model, tensor, target)


def convert(model: Path, recipe: Recipe, variant: Variant,
            calibration: Callable[[], Iterable[np.ndarray]] | None, out_dir: Path) -> Path:
    """Convert the stripped graph to a .tflite in the variant's mode."""
    tf = tf_module()
    cut = recipe.strip
    converter = _frozen_graph_converter(model, recipe)
    if variant.mode == "uint8-qat":
        converter.inference_type = tf.uint8
        converter.quantized_input_stats = {_node_name(cut.inputs[0]): variant.quantized_input_stats}
    return run_converter(converter, model, recipe, variant, calibration, out_dir)


