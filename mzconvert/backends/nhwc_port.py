"""The NHWC TensorFlow port of an ONNX model: what the TFLite variants of ONNX and torch sources convert from.

Two kinds, both beside the stripped ONNX model and both checked against it before anything converts from them:
- our Keras port of one of torch_models' modules (to_keras, written at freeze: the whole network);
- for any other ONNX model, onnx2tf's conversion of the stripped model, run as a separate process (its
  releases pin a TensorFlow, numpy and protobuf older than ours: requirements-tools.txt installs it without
  them), frozen here to one GraphDef with the recipe's input name, each output back in the ONNX model's layout
  (onnx2tf turns 4-D outputs to NHWC) and in the recipe's output order.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from ..errors import EXIT_BAD_INPUT, MzError, short_text
from ..quant.tflite_converter import tf_module
from ..recipe import Recipe
from ..runtime import OnnxRunner, nhwc

KERAS_PORT = "model_nhwc.h5"
ONNX2TF_PORT = "model_nhwc.pb"
PORT_TOLERANCE = 1e-3  # max abs error of a port against its source (onnx2tf's: relative to magnitudes >= 1)

# onnx2tf reads test images from this file in its working folder, else downloads them (no network here):
# it runs the ONNX model on them to settle layouts, so a seeded sample of uniform pixels is written there.
_ONNX2TF_SAMPLES = "calibration_image_sample_data_20x128x128x3_float32.npy"


def port_of(model: Path) -> Path | None:
    """The NHWC port beside a stripped ONNX model, if the build wrote one."""
    return next((p for p in (model.with_name(KERAS_PORT), model.with_name(ONNX2TF_PORT)) if p.is_file()), None)


def input_shape(recipe: Recipe) -> tuple[int, ...]:
    """The port's input shape: NHWC, whatever the ONNX model's layout."""
    return nhwc(recipe.input.shape) if recipe.input.layout == "NCHW" else tuple(recipe.input.shape)


def to_port_layout(recipe: Recipe):
    """What turns recipe input tensors (the ONNX model's layout) into the port's NHWC ones."""
    if recipe.input.layout == "NCHW":
        return lambda tensor: tensor.transpose(0, 2, 3, 1)
    return lambda tensor: tensor


def converter(model: Path, recipe: Recipe):
    """A TFLite converter of the port beside the stripped ONNX `model`."""
    tf = tf_module()
    port = port_of(model)
    if port is None:
        raise MzError(f"{recipe.path}: strip: an ONNX model converts to TFLite from its cut (the port is made at "
                      "strip): name its strip.inputs and strip.outputs", EXIT_BAD_INPUT)
    if port.name == KERAS_PORT:
        import tf_keras as keras

        return tf.lite.TFLiteConverter.from_keras_model(keras.models.load_model(str(port), compile=False))
    names = _port_names(recipe)
    return tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
        str(port), input_arrays=[names[0]], output_arrays=names[1:],
        input_shapes={names[0]: list(input_shape(recipe))})


def write_keras_port(module, example, expected: np.ndarray, target: Path) -> None:
    """Our Keras port of a torch_models module, checked against the module's output on `example`."""
    from .torch_models import to_keras

    keras_model = to_keras(module, tuple(example.shape))
    got = keras_model(example.numpy().transpose(0, 2, 3, 1), training=False).numpy()
    error = float(np.max(np.abs(got - expected)))
    if error > PORT_TOLERANCE:
        raise MzError(f"{target}: the Keras port differs from the PyTorch module (max abs error {error:.3g})")
    keras_model.save(str(target))


# -- onnx2tf -------------------------------------------------------------------------------------
def write_onnx2tf_port(model: Path, recipe: Recipe, out_dir: Path) -> Path:
    """onnx2tf's conversion of the stripped ONNX `model`, frozen as ONNX2TF_PORT in out_dir and checked
    against ONNX Runtime on a seeded random input (verify then judges the TFLite variants on real images)."""
    saved = _run_onnx2tf(model, recipe, out_dir / "onnx2tf")
    tf = tf_module()
    from .tf import frozen_function

    loaded = tf.saved_model.load(str(saved))  # held: the signature's variables live as long as it does
    signature = loaded.signatures["serving_default"]
    (input_key,) = signature.structured_input_signature[1]
    probe = _probe(recipe)
    expected = OnnxRunner(model, list(recipe.strip.outputs)).run(probe)
    outputs = signature(**{input_key: tf.constant(to_port_layout(recipe)(probe))})
    keys = [f"output_{k}" for k in range(len(expected))]  # onnx2tf names the ONNX model's outputs in order
    if sorted(outputs) != sorted(keys):
        raise MzError(f"{saved}: onnx2tf wrote outputs {sorted(outputs)}; expected {', '.join(keys)}")
    orders = [_axes_order(outputs[key].numpy(), want, model, name)
              for key, want, name in zip(keys, expected, recipe.strip.outputs)]

    def in_onnx_layout(x):
        found = signature(**{input_key: x})
        return [tf.transpose(found[key], order) for key, order in zip(keys, orders)]

    names = _port_names(recipe)
    function = tf.function(in_onnx_layout).get_concrete_function(tf.TensorSpec(input_shape(recipe), tf.float32))
    graph_def = _int32_split_sizes(frozen_function(function, names[0], names[1:]))
    target = out_dir / ONNX2TF_PORT
    target.write_bytes(graph_def.SerializeToString(deterministic=True))
    _check_port(target, names, to_port_layout(recipe)(probe), expected, recipe)
    return target


def _probe(recipe: Recipe) -> np.ndarray:
    """An input to compare the port with its source on: a smooth image of seeded random colours through the
    recipe's preprocessing, in the range and of the kind the model sees. (Gaussian noise, outside that range,
    made an untrained YOLO11's own float rounding differ by 0.013 in a probability; on a real image, 2e-7.)"""
    from PIL import Image

    from ..preprocess import model_tensor

    colours = np.random.RandomState(0).randint(0, 256, (8, 8, 3)).astype(np.uint8)
    return model_tensor(Image.fromarray(colours).resize((64, 64), Image.BILINEAR), recipe.preprocess, recipe.input)


def _constants_folded(model: Path, target: Path) -> Path:
    """The model with what does not depend on the input computed once (ONNX Runtime's basic, standard-op
    optimizations): an export that computes slice bounds from shapes (Ultralytics' box decode, unless
    simplified) otherwise reaches TFLite as dynamic STRIDED_SLICEs, which the converter turns into a model
    that computes other boxes (measured: 512 pixels off), though the TensorFlow port is right."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return target


def _int32_split_sizes(graph_def):
    """onnx2tf keeps an ONNX Split's int64 sizes (Ultralytics' C2f blocks), and TFLite has no SPLIT_V with
    int64 sizes (the conversion fails: "'tf.SplitV' op is neither a custom op nor a flex op"): the sizes,
    constants, as int32 (sizes of one tensor's axis: they fit)."""
    tf = tf_module()
    nodes = {node.name: node for node in graph_def.node}
    for node in list(graph_def.node):
        if node.op != "SplitV" or node.attr["Tlen"].type != tf.int64.as_datatype_enum:
            continue
        sizes = nodes[node.input[1].split(":")[0]]
        while sizes.op == "Identity":
            sizes = nodes[sizes.input[0].split(":")[0]]
        if sizes.op != "Const":
            continue
        const = graph_def.node.add()
        const.name, const.op = f"{node.name}/size_splits_int32", "Const"
        const.attr["dtype"].type = tf.int32.as_datatype_enum
        const.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(tf.make_ndarray(sizes.attr["value"].tensor)
                                                                  .astype(np.int32)))
        node.input[1] = const.name
        node.attr["Tlen"].type = tf.int32.as_datatype_enum
    return graph_def


def _run_onnx2tf(model: Path, recipe: Recipe, work: Path) -> Path:
    if importlib.util.find_spec("onnx2tf") is None:
        raise MzError(f"{recipe.path}: variants: ONNX -> TFLite converts with onnx2tf, which is not installed: "
                      "pip install --no-deps -r requirements-tools.txt (make install does)", EXIT_BAD_INPUT)
    work.mkdir()
    np.save(work / _ONNX2TF_SAMPLES, np.random.RandomState(0).uniform(0, 1, (20, 128, 128, 3)).astype(np.float32),
            allow_pickle=False)
    saved = work / "saved_model"
    folded = _constants_folded(model, work / "folded.onnx")
    command = [sys.executable, "-m", "onnx2tf", "-i", str(folded.resolve()), "-o", str(saved.resolve()), "-n"]
    if recipe.input.layout == "NHWC":  # an ONNX model that takes NHWC already keeps its input as it is
        command += ["-kat", recipe.input.name]
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not (saved / "saved_model.pb").is_file():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        why = next((line for line in reversed(lines) if "Error" in line), lines[-1] if lines else "no output")
        raise MzError(f"{model}: onnx2tf could not convert the model to TensorFlow (exit {done.returncode}): "
                      f"{short_text(why)}")
    return saved


PORT_SQNR_DB = 60.0  # or an error a millionth of the output's power: float32 sums taken in another order


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    """Within PORT_TOLERANCE of the ONNX model's output, relative to its largest magnitude (at least 1); or, where
    a deep graph's float32 rounding reaches that (YOLO11's attention: 0.001 in a class probability), an error
    PORT_SQNR_DB below the output's power. A wrong layout or op errs by the output's own size."""
    error = got.astype(np.float64) - want
    if float(np.max(np.abs(error))) <= PORT_TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
        return True
    power = float(np.mean(np.square(want, dtype=np.float64)))
    return power > 0 and float(np.mean(np.square(error))) <= power * 10 ** (-PORT_SQNR_DB / 10)


def _axes_order(got: np.ndarray, want: np.ndarray, model: Path, name: str) -> list[int]:
    """The transpose that turns onnx2tf's output into the ONNX model's (identity, or NHWC back to NCHW...)."""
    candidates = [list(order) for order in itertools.permutations(range(got.ndim))
                  if tuple(got.shape[i] for i in order) == want.shape]
    for order in candidates:  # the identity first
        if _close(got.transpose(order), want):
            return order
    shapes = f"{list(got.shape)} against the ONNX model's {list(want.shape)}"
    if not candidates:
        raise MzError(f"{model}: onnx2tf's output for {name!r} has shape {shapes}")
    error = min(float(np.max(np.abs(got.transpose(order) - want))) for order in candidates)
    raise MzError(f"{model}: onnx2tf's conversion differs from the ONNX model at output {name!r} (max abs error "
                  f"{error:.3g}, shape {shapes})", EXIT_BAD_INPUT)


def _check_port(port: Path, names: list[str], probe: np.ndarray, expected: list[np.ndarray], recipe: Recipe) -> None:
    tf = tf_module()
    from .tf import read_graph_def

    graph = tf.Graph()
    with graph.as_default():
        tf.import_graph_def(read_graph_def(port), name="")
    with tf.compat.v1.Session(graph=graph) as session:
        got = session.run([f"{n}:0" for n in names[1:]], {f"{names[0]}:0": probe})
    for name, g, want in zip(recipe.strip.outputs, got, expected):
        if not _close(g, want):
            raise MzError(f"{port}: the frozen TensorFlow port differs from the ONNX model at output {name!r} "
                          f"(max abs error {float(np.max(np.abs(g - want))):.3g})")


def _port_names(recipe: Recipe) -> list[str]:
    """[input, *outputs] node names of the port: the recipe's, where TensorFlow takes them as node names
    (ONNX names such as '/model.22/Concat_5_output_0' it does not)."""
    valid = re.compile(r"[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")
    names = [recipe.input.name, *recipe.strip.outputs]
    return [n if valid.match(n) and not n.endswith("/") else f"port_{i}" for i, n in enumerate(names)]
