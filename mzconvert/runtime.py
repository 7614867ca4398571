"""Running what we produce: the LiteRT interpreter for .tflite, ONNX Runtime for .onnx.

A runner takes the recipe's float input, quantizes it when the model's input is integer, and
returns float outputs (dequantized) in the recipe's output order, so verify, eval and bench treat
every variant alike.
"""

from __future__ import annotations

import io
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import MzError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    def to_json(self) -> dict:
        return asdict(self) | {"shape": list(self.shape)}


# LiteRT's two kernel families. Optimized: XNNPACK and the builtin optimized kernels, what phones and x86 run.
# Reference: the reference arithmetic that TensorFlow Lite Micro's kernels (and CMSIS-NN's, and the Ethos-U's
# integer pipeline) follow on a microcontroller. Integer outputs differ between them by up to 10 steps.
OPTIMIZED, REFERENCE = "optimized", "reference"
# ONNX Runtime's two ways with a QDQ graph. Defined: each DequantizeLinear, float op and QuantizeLinear as ONNX
# defines it, which every CPU computes alike. Fused: ORT's graph optimizations turn them into integer kernels
# (QLinearConv, ...) whose arithmetic depends on the CPU: on x86 without VNNI (AVX2) their 16-bit pair sums
# saturate (OnnxRunner).
DEFINED, FUSED = "defined", "fused"


def target_kernels(recipe, variant) -> tuple[str, ...]:
    """The kernel families a variant is judged under, its target's first: a TFLite integer variant the NPU
    compiles runs on a microcontroller's kernels (reference arithmetic) and, as a CPU artifact, on the
    optimized ones; every other TFLite variant on the optimized ones. An ONNX int8 (QDQ) variant as ONNX
    defines it (the artifact, whatever runs it) and as ONNX Runtime's fused kernels compute it on this CPU;
    other ONNX variants: none (ONNX Runtime runs them)."""
    if variant.target == "onnx":
        return (DEFINED, FUSED) if variant.mode == "int8" else ()
    return (REFERENCE, OPTIMIZED) if variant.for_npu and recipe.vela else (OPTIMIZED,)


def _quantize(x: np.ndarray, spec: TensorSpec, kernels: str = OPTIMIZED) -> np.ndarray:
    """x as LiteRT's QUANTIZE kernel of that family computes it, so an integer-I/O model gets the input its
    float-I/O twin computes inside, and answers the same (tested). Optimized (XNNPACK): times the float32
    reciprocal of the scale, rounded half to even; reference: divided by the scale, rounded half away from
    zero. The two break ties differently on about one value in 5000 of a camera image, enough to move a
    detector's AP on 132 images by two points."""
    info = np.iinfo(spec.dtype)
    x = x.astype(np.float32)
    if kernels == REFERENCE:
        scaled = x / np.float32(spec.scale)
        q = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5)) + spec.zero_point
    else:
        q = np.round(x * np.float32(1.0 / spec.scale)) + spec.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def quantized_input(tensor: np.ndarray, spec: TensorSpec, kernels: str = OPTIMIZED) -> np.ndarray:
    """What a model's input `spec` is fed for a float `tensor`: quantized as its QUANTIZE kernel would, or cast."""
    return _quantize(tensor, spec, kernels) if spec.scale is not None else tensor.astype(spec.dtype)


def dequantized(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.scale is None:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - spec.zero_point) * spec.scale).astype(np.float32)


def nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The NHWC form of an NCHW shape: TFLite artifacts of NCHW sources take their input this way."""
    return (shape[0], shape[2], shape[3], shape[1])


def as_layout_of(tensor: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """An NCHW image tensor for an NHWC model (a TFLite artifact of an NCHW source) is transposed."""
    if tensor.ndim == 4 and tensor.shape != spec.shape and nhwc(tensor.shape) == spec.shape:
        return tensor.transpose(0, 2, 3, 1)
    return tensor


def output_order(names: list[str], wanted: list[str] | None) -> list[int]:
    """Indices of a model's output `names` in the recipe's output order: converters may reorder outputs, and
    rename them (onnx2tf's port), when the model's own order is the recipe's."""
    if not wanted or sorted(names) != sorted(wanted):
        return list(range(len(names)))
    return [names.index(w) for w in wanted]


def own_names(names: list[str], wanted: list[str] | None, chosen: Collection[str]) -> set[str]:
    """The model's own names (its outputs `names`) of those among the recipe's outputs `wanted` that are
    `chosen`, matched as output_order matches them (onnx2tf's port renames '/model.24/m.0/Conv_output_0' port_1);
    without `wanted`, the model's names that are chosen."""
    if not wanted:
        return {name for name in names if name in chosen}
    return {names[i] for i, name in zip(output_order(names, wanted), wanted) if name in chosen}


def litert_interpreter(path: Path, kernels: str = OPTIMIZED, threads: int = 1, keep_all_tensors: bool = False):
    """A LiteRT interpreter of `path` with the ops of that kernel family (not yet allocated). With
    `keep_all_tensors`, the optimized kernels without XNNPACK: a delegate computes the ops it takes as one
    DELEGATE op, whose tensors inside are never written."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    content = _reference_loadable(path) if kernels == REFERENCE else None
    source = {"model_content": content} if content is not None else {"model_path": str(path)}
    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES if keep_all_tensors and kernels != REFERENCE \
        else op_resolver(kernels)
    return Interpreter(**source, num_threads=threads, experimental_op_resolver_type=resolver,
                       experimental_preserve_all_tensors=keep_all_tensors)


# Ops LiteRT's reference resolver registers below the version its reference kernel runs: DEPTH_TO_SPACE only at
# 1, though version 2 marks int8, which the kernel moves as it moves every type (MediaPipe's pose detector)
_REFERENCE_VERSIONS = {"DEPTH_TO_SPACE": 1}
_OPERATOR_CODE_VERSION = 8  # the vtable slot of OperatorCode.version (its third field)


def _reference_loadable(path: Path) -> bytes | None:
    """The model's bytes with the versions of _REFERENCE_VERSIONS' ops lowered to what the reference resolver
    registers (the ops compute the same), or None when it has none above them."""
    import struct

    from ai_edge_litert import schema_py_generated as s

    content = bytearray(path.read_bytes())
    model = s.Model.GetRootAsModel(content, 0)
    lowered = False
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        limit = next((v for name, v in _REFERENCE_VERSIONS.items() if getattr(s.BuiltinOperator, name) == builtin),
                     None)
        if limit is not None and code.Version() > limit:
            struct.pack_into("<i", content, code._tab.Pos + code._tab.Offset(_OPERATOR_CODE_VERSION), limit)
            lowered = True
    return bytes(content) if lowered else None


def op_resolver(kernels: str):
    """LiteRT's op resolver for a kernel family: the reference kernels, or the optimized ones with XNNPACK."""
    from ai_edge_litert.interpreter import OpResolverType

    return OpResolverType.BUILTIN_REF if kernels == REFERENCE else OpResolverType.AUTO


def tensor_spec(detail: dict) -> TensorSpec:
    """A LiteRT tensor detail (get_input_details and the like) as a TensorSpec."""
    scale, zero_point = detail["quantization"]
    quantized = scale != 0.0
    return TensorSpec(name=detail["name"], shape=tuple(int(d) for d in detail["shape"]),
                      dtype=np.dtype(detail["dtype"]).name,
                      scale=float(scale) if quantized else None,
                      zero_point=int(zero_point) if quantized else None)


class TFLiteRunner:
    def __init__(self, path: Path, output_names: list[str] | None = None, threads: int = 1,
                 kernels: str = OPTIMIZED):
        self.kernels = kernels
        try:
            self._interpreter = litert_interpreter(path, kernels, threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise MzError(f"{path}: not a loadable TFLite model: {str(exc).splitlines()[0]}") from None
        self.inputs = [tensor_spec(d) for d in self._interpreter.get_input_details()]
        outputs = self._interpreter.get_output_details()
        specs = [tensor_spec(d) for d in outputs]
        order = output_order([s.name for s in specs], output_names)
        self._output_indices = [outputs[i]["index"] for i in order]
        self.outputs = [specs[i] for i in order]
        self._input_index = self._interpreter.get_input_details()[0]["index"]

    def float_tensor_count(self) -> int:
        """Float32 tensors that are not model inputs/outputs: 0 in a fully integer model."""
        io = {d["index"] for d in self._interpreter.get_input_details()} | set(self._output_indices)
        return sum(1 for d in self._interpreter.get_tensor_details()
                   if d["index"] not in io and np.dtype(d["dtype"]) == np.float32
                   and len(d["shape"]) > 1)

    def run(self, tensor: np.ndarray) -> list[np.ndarray]:
        spec = self.inputs[0]
        tensor = as_layout_of(tensor, spec)
        feed = quantized_input(tensor, spec, self.kernels)
        self._interpreter.set_tensor(self._input_index, feed)
        self._interpreter.invoke()
        return [dequantized(self._interpreter.get_tensor(i), s)
                for i, s in zip(self._output_indices, self.outputs)]


# ONNX ops of quantized graphs: QDQ pairs (static int8) and the integer ops of dynamic quantization
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger")


def is_quantized_onnx(path: Path) -> bool:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # the session below names what is wrong with the file
        return False
    return any(node.op_type in QUANTIZED_OPS for node in graph.node)


class OnnxRunner:
    """An ONNX model in ONNX Runtime. A quantized (QDQ) graph runs as its ops define it unless `fused` is asked:
    each DequantizeLinear, float op and QuantizeLinear on its own, which every x86 CPU computes alike. ORT's
    graph optimizations fuse them into integer kernels whose 16-bit pair sums saturate on CPUs without VNNI
    (AVX2 only): measured on MobileNetV2's int8 (bench/peers.py), top-1 agreement with float 86.6 % of 500
    images against 97.4 % as defined. Verify judges the artifact; eval shows both; bench times the fused ones."""

    def __init__(self, path: Path, output_names: list[str] | None = None, threads: int = 1, fused: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not fused and is_quantized_onnx(path):
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own exception classes
            raise MzError(f"{path}: not a loadable ONNX model: {str(exc).splitlines()[0]}") from None
        to_dtype = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
                    "tensor(float16)": "float16"}
        self.inputs = [TensorSpec(i.name, tuple(d if isinstance(d, int) else -1 for d in i.shape),
                                  to_dtype.get(i.type, i.type)) for i in self._session.get_inputs()]
        specs = [TensorSpec(o.name, tuple(d if isinstance(d, int) else -1 for d in o.shape),
                            to_dtype.get(o.type, o.type)) for o in self._session.get_outputs()]
        self.outputs = [specs[i] for i in output_order([s.name for s in specs], output_names)]

    def float_tensor_count(self) -> int:
        return 0  # QDQ models keep float activations between Q/DQ pairs by design

    def run(self, tensor: np.ndarray) -> list[np.ndarray]:
        results = self._session.run([o.name for o in self.outputs],
                                    {self.inputs[0].name: tensor.astype(self.inputs[0].dtype)})
        return [np.asarray(r, np.float32) for r in results]


class ReferenceKernelsRunner:
    """A TFLiteRunner of LiteRT's reference kernels in a child process (`python -m mzconvert.runtime`): those
    kernels abort the process on inputs they do not handle (an int8 SOFTMAX whose exps sum to 512 or more, as when
    512 of a 1000-class head's scores tie at its top: an untrained or broken int8 classifier), which would end a
    build without a word. Here that is an error naming the model. Arrays go through pipes as .npy frames (no
    pickle); the child computes exactly what the in-process interpreter does."""

    def __init__(self, path: Path, output_names: list[str] | None = None, threads: int = 1):
        import json
        import subprocess
        import sys

        self.kernels, self._path = REFERENCE, path
        self._child = subprocess.Popen([sys.executable, "-m", "mzconvert.runtime", str(path), str(threads),
                                        json.dumps(output_names)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        header = json.loads(self._exchange(None, "opening it"))
        if "error" in header:
            raise MzError(header["error"])
        self.inputs, self.outputs = ([TensorSpec(**(d | {"shape": tuple(d["shape"])})) for d in header[key]]
                                     for key in ("inputs", "outputs"))
        self._float_tensors = header["float_tensors"]

    def float_tensor_count(self) -> int:
        return self._float_tensors

    def run(self, tensor: np.ndarray) -> list[np.ndarray]:
        with np.load(io.BytesIO(self._exchange(_npy(tensor), "running it on an input")), allow_pickle=False) as out:
            return [out[f"arr_{i}"] for i in range(len(out.files))]

    def _exchange(self, frame: bytes | None, doing: str) -> bytes:
        try:
            if frame is not None:
                _send(self._child.stdin, frame)
            reply = _receive(self._child.stdout)
        except BrokenPipeError:
            reply = None
        if reply is None:
            code = self._child.wait()
            ended = f"signal {-code}" if code < 0 else f"exit status {code}"
            cause = ("; a known cause: an int8 SOFTMAX whose exps sum to 512 or more, 512 of its scores tied at the "
                     "top, as an untrained or broken classifier gives") if frame is not None else ""
            raise MzError(f"{self._path}: LiteRT's reference kernels ended their process {doing} ({ended}{cause})")
        return reply

    def __del__(self):
        child = getattr(self, "_child", None)
        if child is not None and child.poll() is None:
            child.stdin.close()
            child.wait()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _send(stream, frame: bytes) -> None:
    stream.write(len(frame).to_bytes(8, "little") + frame)
    stream.flush()


def _receive(stream) -> bytes | None:
    """One frame, or None where the stream ended."""
    size = stream.read(8)
    if len(size) < 8:
        return None
    frame = stream.read(int.from_bytes(size, "little"))
    return frame if len(frame) == int.from_bytes(size, "little") else None


def _serve_reference_kernels(path: str, threads: int, output_names: list[str] | None) -> None:
    """The child of a ReferenceKernelsRunner: its header, then one output frame (.npz) per input frame (.npy)."""
    import json
    import os
    import sys

    frames = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the libraries print goes to stderr, not into the frames
    try:
        runner = TFLiteRunner(Path(path), output_names, threads, REFERENCE)
    except MzError as exc:
        _send(frames, json.dumps({"error": str(exc)}).encode())
        return
    _send(frames, json.dumps({"inputs": [s.to_json() for s in runner.inputs],
                              "outputs": [s.to_json() for s in runner.outputs],
                              "float_tensors": runner.float_tensor_count()}).encode())
    while (frame := _receive(sys.stdin.buffer)) is not None:
        outputs = runner.run(np.load(io.BytesIO(frame), allow_pickle=False))
        buffer = io.BytesIO()
        np.savez(buffer, *outputs)
        _send(frames, buffer.getvalue())


def open_model(path: Path, output_names: list[str] | None = None, threads: int = 1, kernels: str = OPTIMIZED):
    """The runner of a .tflite or .onnx file; `kernels`: LiteRT's kernel family for a .tflite (the reference
    kernels in a child process), FUSED for an ONNX QDQ graph with ORT's fused integer kernels (else as its ops
    define it)."""
    if path.suffix == ".tflite" and kernels == REFERENCE:
        return ReferenceKernelsRunner(path, output_names, threads)
    if path.suffix == ".tflite":
        return TFLiteRunner(path, output_names, threads, kernels)
    if path.suffix == ".onnx":
        return OnnxRunner(path, output_names, threads, fused=kernels == FUSED)
    raise MzError(f"{path}: unknown model type (expected .tflite or .onnx)")


class RunnerPool:
    """One model opened `workers` times, run from several threads at once: LiteRT's reference kernels use one
    core each, so eval runs them on every core across images. An interpreter is never shared between threads."""

    def __init__(self, path: Path, output_names: list[str] | None, kernels: str, workers: int):
        import queue

        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(open_model(path, output_names, 1, kernels=kernels))

    def run(self, tensor: np.ndarray) -> list[np.ndarray]:
        runner = self._idle.get()
        try:
            return runner.run(tensor)
        finally:
            self._idle.put(runner)


if __name__ == "__main__":
    import json
    import sys

    _serve_reference_kernels(sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]))
