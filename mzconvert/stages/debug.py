"""Per-layer quantization error of an int8 variant, worst layers first (`mzconvert debug`).

TFLite variants: TensorFlow's QuantizationDebugger quantizes the float model as the variant was (the same
ranges, recorded on the same calibration images, see quant/ranges.py), then runs every quantized op next to
its float twin on the verify images. Its weights are rounded to the nearest step: a variant with
weight_rounding fitted has convolutions with less error than the table shows (quant/rounding.py). ONNX
variants: ONNX Runtime's QDQ loss debugging runs the built QDQ model and its float model, every activation
saved, on the verify images; the error a QDQ activation carries includes every layer's before it, so a layer's
own error is what it adds to the largest error among the activations it reads. Either way a layer only
saturating ops read (a detector's class logits before their sigmoid, a SiLU's input below -8) is judged within
their bound, as its range was recorded (quant/ranges.py): beyond it no output moves.
A layer's error is reported in quantization steps: RMSE / scale is about 0.29 for pure rounding noise (1 /
sqrt(12)); layers far above it lose information (clipped ranges, outlier weights) and are where a user should
look first, e.g. to keep them float.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..backends import backend_for
from ..errors import EXIT_BAD_INPUT, MzError
from ..fsio import sha256_file, write_json_atomic
from ..layout import built_stage_model, built_stage_result, recipe_build_folder
from ..manifest import measured_artifacts, read_manifest
from ..preprocess import prepare
from ..quant.ranges import Bound, readers_of, saturated_bounds
from ..recipe import Recipe, Variant, command_argument
from ..recipe.schema import FITTED_ROUNDINGS
from ..runtime import (
    OPTIMIZED,
    REFERENCE,
    dequantized,
    litert_interpreter,
    open_model,
    own_names,
    quantized_input,
    target_kernels,
    tensor_spec,
)
from ..sources.fetch import Fetcher
from ..sources.imagesets import load_image_set
from .calibrate import DEFAULT_CALIBRATION_COUNT
from .dist import write_md5sums

ROUNDING_NOISE = 1 / math.sqrt(12)  # RMSE / scale of uniform rounding


def layer_errors(stripped: Path, recipe: Recipe, variant: Variant, artifact: Path,
                 calibration: Callable[[], list[Path]], images: list[Path]) -> list[dict]:
    """One row per quantized layer output: name, op, RMSE in quantization steps, max abs error, worst first.
    `artifact`: the built variant; `calibration()`: its calibration images (fetched only where needed)."""
    explain = {"tflite": _tflite_layer_errors, "onnx": _onnx_layer_errors}
    if recipe.format == "tflite":  # converted already: no converter to re-quantize it, the two files compared
        explain["tflite"] = _litert_layer_errors
    if variant.mode != "int8" or variant.target not in explain:
        raise MzError(f"{recipe.path}: variants: {variant.name}: debug explains int8 variants, not {variant.mode}",
                      EXIT_BAD_INPUT)
    rows = explain[variant.target](stripped, recipe, variant, artifact, calibration, images)
    if not rows:
        raise MzError(f"{artifact}: the quantization debugger reported no quantized layer")
    return sorted(rows, key=lambda r: -r["rmse_steps"])


def _tflite_layer_errors(stripped: Path, recipe: Recipe, variant: Variant, artifact: Path,
                         calibration: Callable[[], list[Path]], images: list[Path]) -> list[dict]:
    """TensorFlow's QuantizationDebugger, on a model quantized from the variant's own ranges."""
    from ..quant.tflite_converter import int8_converter, tf_module
    from .calibrate import calibrate

    tf = tf_module()
    debug_tensors = [prepare(p, recipe.preprocess, recipe.input).tensor for p in images]
    # the debugger's model is quantized as the artifact was, so its tensors have the artifact's names
    artifact_model = litert_interpreter(artifact)
    artifact_model.allocate_tensors()
    names = {d["index"]: d["name"] for d in artifact_model.get_tensor_details()}
    bounds = {names[index]: bound for index, bound in _saturated_bounds(artifact_model, recipe).items()}
    within = {bound: _bounded_errors(bound) for bound in set(bounds.values())}
    metrics = {f"{metric}{_within(bound)}": errors[metric] for bound, errors in within.items() for metric in errors}
    with tempfile.TemporaryDirectory() as work:
        calibrated = calibrate(stripped, recipe, variant, calibration(), Path(work),  # the variant's ranges
                               with_moments=False).read_bytes()
    converter, to_input = backend_for(recipe).tflite_converter(stripped, recipe)
    int8_converter(converter, lambda: [to_input(debug_tensors[0])])  # a quick calibration, replaced below
    try:
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=lambda: ([to_input(t)] for t in debug_tensors),
            debug_options=tf.lite.experimental.QuantizationDebugOptions(layer_direct_compare_metrics=metrics))
        debugger.calibrated_model = calibrated
        debugger.options = debugger.options  # re-quantizes from calibrated_model
        # made from a converter, its interpreter keeps no intermediate tensors (TensorFlow keeps them only for a
        # model given as a file), so the float values the bounded metrics read were other tensors' by then
        debugger._quant_interpreter = tf.lite.Interpreter(model_content=debugger.quant_model,
                                                          experimental_preserve_all_tensors=True)
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
    except Exception as exc:  # the debugger raises whatever its converter and interpreter raise
        raise MzError(f"{stripped}: the quantization debugger failed: {str(exc).strip().splitlines()[0]}") from None
    rows = []
    for row in csv.DictReader(io.StringIO(dump.getvalue())):
        scale = float(row["scale"]) if row.get("scale") else 0.0
        within = _within(bounds.get(row["tensor_name"]))
        mse = float(row[f"mean_squared_error{within}"])
        if scale <= 0 or not math.isfinite(mse):
            continue
        rows.append({"layer": row["tensor_name"], "op": row["op_name"], "rmse_steps": math.sqrt(mse) / scale,
                     "max_abs_error": float(row[f"max_abs_error{within}"]), "scale": scale})
    return rows


def _float_model(recipe: Recipe, stripped: Path, folder: Path) -> Path:
    """The float model a variant is explained against: the stripped source, or where the source is quantized (a
    variant of it is the file as it is) its float twin (backends/float_twin.py), written into `folder`."""
    graph = backend_for(recipe).GraphRunner
    return graph.write_twin(stripped, folder / stripped.name) if graph.is_quantized(stripped) else stripped


def _within(bound: Bound | None) -> str:
    """The suffix of the debugger's metrics of the error within `bound` (none: the whole error)."""
    return "" if bound is None else f"_within_{bound[0]:g}_{bound[1]:g}"


def _bounded_errors(bound: Bound) -> dict[str, Callable]:
    """TensorFlow debugger metrics (of a layer's float and quantized values, scale, zero point) of the error
    within the (low, high) bound: what lies beyond changes no output of the saturating ops that read the layer
    (see _add_error)."""
    def errors(float_values: np.ndarray, quantized: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
        reference = np.clip(float_values.astype(np.float64), *bound)
        return reference - np.clip((quantized.astype(np.float64) - zero_point) * scale, *bound)

    return {"mean_squared_error": lambda *values: float(np.mean(errors(*values) ** 2)),
            "max_abs_error": lambda *values: float(np.max(np.abs(errors(*values))))}


def _saturated_bounds(interpreter, recipe: Recipe) -> dict[int, Bound]:
    """{tensor index: bound} of an allocated LiteRT interpreter's tensors that only saturating ops read, or that
    make the recipe's outputs decoded through a sigmoid (quant/ranges.py)."""
    ops = interpreter._get_ops_details()
    outputs = interpreter.get_output_details()
    read = own_names([d["name"] for d in outputs], recipe.cut_outputs, recipe.sigmoid_read_outputs)
    return saturated_bounds(readers_of((op["op_name"], op["inputs"], op["outputs"]) for op in ops),
                            [d["index"] for d in outputs], [d["index"] for d in outputs if d["name"] in read])


IMAGES_AT_ONCE = 4  # the ONNX debug holds every activation of this many images (two models) at a time


def _onnx_layer_errors(stripped: Path, recipe: Recipe, variant: Variant, artifact: Path,
                       calibration: Callable[[], list[Path]], images: list[Path]) -> list[dict]:
    """ONNX Runtime's QDQ loss debugging: every activation of the QDQ artifact (after its Q/DQ pair) against
    the same tensor of the float model it was quantized from, in steps of that activation's scale."""
    import onnx
    from onnxruntime.quantization import quant_pre_process
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    qdq = onnx.load(str(artifact))
    initializers = {i.name: i for i in qdq.graph.initializer}
    scales = {n.input[0]: float(onnx.numpy_helper.to_array(initializers[n.input[1]]).ravel()[0])
              for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[1] in initializers}
    with tempfile.TemporaryDirectory(prefix="mzconvert-debug-") as work:
        float_model, float_saved, qdq_saved = (Path(work) / n for n in ("float.onnx", "float-all.onnx", "qdq-all.onnx"))
        quant_pre_process(str(_float_model(recipe, stripped, Path(work))), str(float_model),  # as convert() did
                          skip_symbolic_shape=True)
        graph = onnx.load(str(float_model)).graph
        nodes = graph.node
        producers = {o: n.op_type for n in nodes for o in n.output}
        inputs = {o: list(n.input) for n in nodes for o in n.output}
        bounds = saturated_bounds(readers_of((node.op_type, node.input, node.output) for node in nodes),
                                  {o.name for o in graph.output}, recipe.sigmoid_read_outputs)
        modify_model_output_intermediate_tensors(str(float_model), str(float_saved))
        modify_model_output_intermediate_tensors(str(artifact), str(qdq_saved))
        totals: dict[str, list[float]] = {}  # tensor -> [sum of squared errors, values, max abs error]
        for start in range(0, len(images), IMAGES_AT_ONCE):
            feeds = [{recipe.input.name: prepare(p, recipe.preprocess, recipe.input).tensor}
                     for p in images[start:start + IMAGES_AT_ONCE]]
            matched = create_activation_matching(collect_activations(str(qdq_saved), feeds),
                                                 collect_activations(str(float_saved), feeds))
            for name, pair in matched.items():
                if name in scales and pair.get("float"):
                    _add_error(totals, name, np.concatenate([f.ravel() for f in pair["float"]]),
                               np.concatenate([q.ravel() for q in pair["post_qdq"]]), bounds.get(name))
    return _added_errors(totals, scales, inputs, producers)


# Ops whose output is the sum (or difference) of what they read: the errors of their inputs reach it as they are
SUMMING_OPS = ("ADD", "SUB", "Add", "Sub")


def _added_errors(totals: dict[str, list[float]], scales: dict[str, float], inputs: dict[str, list[str]],
                  producers: dict[str, str]) -> list[dict]:
    """Rows from each quantized activation's error against its float twin (totals: tensor -> [sum of squared
    errors, values, max abs error]). A quantized model carries the error of every layer before: what a layer
    adds is its error beyond the largest of the activations it reads (in each one's steps), the comparable
    of TFLite's per-layer error; a sum's (SUMMING_OPS) beyond the errors of its inputs added up (in values, as
    independent errors add), which its own steps, finer than a wide input's, would otherwise count as its own
    (MediaPipe's pose detector: each residual ADD ranked first at 4-6 steps it had inherited)."""
    accumulated = {name: math.sqrt(sse / count) / scales[name] for name, (sse, count, _) in totals.items()}

    def inherited(name: str) -> float:
        """The error, in `name`'s steps, that the activations it reads bring."""
        read_from = read(name, set())
        if producers.get(name) in SUMMING_OPS:
            return math.sqrt(sum((accumulated[i] * scales[i]) ** 2 for i in read_from)) / scales[name]
        return max((accumulated[i] for i in read_from), default=0.0)

    def read(tensor: str, seen: set) -> list[str]:
        """The quantized activations a tensor is computed from (through unquantized ones, e.g. a fused conv)."""
        found = []
        for i in inputs.get(tensor, ()):
            if i in accumulated:
                found.append(i)
            elif i not in seen:
                seen.add(i)
                found += read(i, seen)
        return found

    return [{"layer": name, "op": producers.get(name, "input"),
             "rmse_steps": max(0.0, steps - inherited(name)),
             "accumulated_steps": steps, "max_abs_error": totals[name][2], "scale": scales[name]}
            for name, steps in accumulated.items()]


def _add_error(totals: dict[str, list[float]], name: str, reference: np.ndarray, quantized: np.ndarray,
               bound: Bound | None = None) -> None:
    """One image's error of a quantized activation; with `bound` (an input only saturating ops read, quantized
    up to their bound: quant/ranges.py), what lies beyond (low, high) changes no output and is no error."""
    if bound is not None:
        reference, quantized = (np.clip(v, *bound) for v in (reference, quantized))
    error = reference.ravel().astype(np.float64) - quantized.ravel().astype(np.float64)
    total = totals.setdefault(name, [0.0, 0, 0.0])
    total[0] += float(np.sum(error ** 2))
    total[1] += error.size
    total[2] = max(total[2], float(np.max(np.abs(error))))


def _litert_layer_errors(stripped: Path, recipe: Recipe, variant: Variant, artifact: Path,
                         calibration: Callable[[], list[Path]], images: list[Path]) -> list[dict]:
    """A .tflite source (a quantized one's float twin, backends/float_twin.py) and its int8 variant side by side
    in LiteRT, every tensor kept: each int8 activation against the float tensor of the same name (the converter
    keeps names; a fused activation's name comes second, after ';'), run under the variant's target kernels, in
    steps of its scale. Layers are named as the float file names them: what float_layers takes."""
    kernels = next(iter(target_kernels(recipe, variant)), OPTIMIZED)
    tensors = [prepare(path, recipe.preprocess, recipe.input).tensor for path in images]
    if kernels == REFERENCE:  # they abort their process on some inputs: each run apart first, an error there
        probe = open_model(artifact, kernels=REFERENCE)
        for tensor in tensors:
            probe.run(tensor)
    twin_folder = tempfile.TemporaryDirectory(prefix="mzconvert-debug-")  # removed when the function returns
    float_model = litert_interpreter(_float_model(recipe, stripped, Path(twin_folder.name)), keep_all_tensors=True)
    int8_model = litert_interpreter(artifact, kernels, keep_all_tensors=True)
    for interpreter in (float_model, int8_model):
        interpreter.allocate_tensors()
    written = {o for op in float_model._get_ops_details() for o in op["outputs"]} | \
        {d["index"] for d in float_model.get_input_details()}  # not a twin's tensors no op writes any more
    float_tensors, float_names = {}, {}  # by full name and by first name: either file may have fused an
    for d in (d for d in float_model.get_tensor_details() if d["index"] in written):  # activation's name in
        float_tensors.setdefault(d["name"].split(";")[0], d["index"])
        float_tensors[d["name"]] = d["index"]
        float_names[d["index"]] = d["name"]
    details = int8_model.get_tensor_details()
    twins = {d["index"]: float_tensors.get(d["name"], float_tensors.get(d["name"].split(";")[0])) for d in details
             if d["dtype"] in (np.int8, np.int16) and d["quantization"][0] > 0}
    twins = {index: twin for index, twin in twins.items() if twin is not None}
    names = {d["index"]: float_names[twins[d["index"]]] if d["index"] in twins else d["name"] for d in details}
    scales = {names[i]: float(details[i]["quantization"][0]) for i in twins}
    ops = int8_model._get_ops_details()
    producers = {names[o]: op["op_name"] for op in ops for o in op["outputs"]}
    inputs = {names[o]: [names[i] for i in op["inputs"] if i >= 0] for op in ops for o in op["outputs"]}
    bounds = _saturated_bounds(int8_model, recipe)
    int8_input = tensor_spec(int8_model.get_input_details()[0])
    totals: dict[str, list[float]] = {}
    for tensor in tensors:
        float_model.set_tensor(float_model.get_input_details()[0]["index"], tensor)
        float_model.invoke()
        feed = quantized_input(tensor, int8_input, kernels)
        int8_model.set_tensor(int8_model.get_input_details()[0]["index"], feed)
        int8_model.invoke()
        for index, twin in twins.items():
            values = dequantized(int8_model.get_tensor(index), tensor_spec(details[index]))
            reference = float_model.get_tensor(twin)
            if reference.shape == values.shape:
                _add_error(totals, names[index], reference, values, bounds.get(index))
    return _added_errors(totals, scales, inputs, producers)


def layers_to_keep_float(rows: list[dict]) -> list[str]:
    """The layers of debug's rows, worst first, as float_layers names them: the model's input is quantized where
    it enters and no layer to keep float."""
    return [row["layer"] for row in rows if row["op"] != "input"]


def debug_table(result: dict, rows: int = 15) -> str:
    lines = [f"{result['recipe']} {result['variant']}: per-layer error on {result['images']} verify images, in "
             f"quantization steps (rounding alone: {ROUNDING_NOISE:.2f}); worst first"
             + ("; weights rounded to the nearest step here, the variant's are fitted (less error)"
                if result.get("weight_rounding") in FITTED_ROUNDINGS and result.get("requantized", True) else ""),
             f"{'layer':60} {'op':20} {'RMSE steps':>10} {'max abs err':>12}"]
    for r in result["layers"][:rows]:
        lines.append(f"{_tail(r['layer'], 60):60} {r['op'][:20]:20} {r['rmse_steps']:10.2f} {r['max_abs_error']:12.4g}")
    return "\n".join(lines)


def plot_layers(result: dict, target: Path, rows: int = 20) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = result["layers"][:rows]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.32 * len(worst)), dpi=100)
    ax.barh([_tail(r["layer"], 48) for r in worst], [r["rmse_steps"] for r in worst], color="#aa3377")
    ax.axvline(ROUNDING_NOISE, color="black", linestyle="--", linewidth=1, label="rounding noise alone")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("RMSE against the float layer, in quantization steps")
    ax.set_title(f"{result['recipe']} {result['variant']}: worst {len(worst)} layers", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(target, metadata={"Software": None})
    plt.close(fig)
    return target


def _tail(name: str, width: int) -> str:
    """The end of a long layer name, which is the part that tells layers apart."""
    return name if len(name) <= width else "…" + name[-(width - 1):]


def summary(layers: list[dict]) -> dict:
    steps = np.array([r["rmse_steps"] for r in layers])
    return {"layers": len(layers), "median_rmse_steps": float(np.median(steps)),
            "above_1_step": int(np.sum(steps > 1.0))}


def explain_variant(recipe: Recipe, variant: Variant, out: Path, build_root: Path, fetcher: Fetcher,
                    count: int | None, log, search_drop: float | None = None) -> dict:
    """`mzconvert debug`: the variant's layer errors on `count` verify images (verify.count or all); with
    `search_drop`, the fewest of the worst layers kept float for the variant to agree with the float model within
    that budget (stages/fallback.py). Into
    dist/<recipe>/debug/<variant>.json and .png (MD5SUMS updated) when the dist holds the variant; else into
    build/<recipe>/debug/: a variant below its fidelity floor fails the build before dist is written, and
    this is where its message sends the user."""
    stripped = built_stage_model(build_root, recipe, "strip")
    artifact = built_stage_model(build_root, recipe, f"quantize/{variant.name}")
    ranges = built_stage_result(build_root, recipe, f"ranges/{variant.name}")
    if stripped is None or artifact is None or (variant.calibration_method == "auto" and ranges is None):
        raise MzError(f"{build_root / recipe.name}: no build of {variant.name}; run mzconvert build "
                      f"{command_argument(recipe)} first", EXIT_BAD_INPUT)
    if variant.calibration_method == "auto":  # the ranges the build chose
        variant = replace(variant, calibration_method=ranges["ranges"]["chosen"]["calibration_method"])
    if recipe.verify is None:
        raise MzError(f"{recipe.path}: verify: debug runs on the verify images; the recipe declares none",
                      EXIT_BAD_INPUT)
    images = load_image_set(recipe.verify.images, recipe.path).paths(fetcher, count or recipe.verify.count)
    log(f"debug: {variant.name} on {len(images)} verify images")

    def calibration() -> list[Path]:  # TFLite re-derives the variant's ranges from them; ONNX needs none
        image_set = load_image_set(variant.calibration, recipe.path)
        return image_set.paths(fetcher, image_set.count(variant.calibration_count, DEFAULT_CALIBRATION_COUNT))

    layers = layer_errors(stripped, recipe, variant, artifact, calibration, images)
    manifest = read_manifest(out / recipe.name)
    in_dist = manifest is not None and manifest["artifacts"].get(artifact.name, {}).get("sha256") == sha256_file(
        artifact)  # the dist holds these very bytes
    result = {"recipe": recipe.name, "variant": variant.name, "images": len(images), "summary": summary(layers),
              "layers": layers, "artifacts": measured_artifacts(manifest, [artifact.name]) if in_dist else {},
              "weight_rounding": variant.weight_rounding,
              # TensorFlow's debugger quantizes the float model again (nearest weights); the others run the variant
              "requantized": variant.target == "tflite" and recipe.format != "tflite"}
    if search_drop is not None:
        from .fallback import search_float_layers

        result["search"] = search_float_layers(stripped, recipe, variant, layers_to_keep_float(layers),
                                               calibration(), images, search_drop, log)
    folder = out / recipe.name if in_dist else recipe_build_folder(build_root, recipe.name)
    write_json_atomic(folder / "debug" / f"{variant.name}.json", result)
    plot_layers(result, folder / "debug" / f"{variant.name}.png")
    if in_dist:
        write_md5sums(folder)
    return result | {"written": str(folder / "debug")}
