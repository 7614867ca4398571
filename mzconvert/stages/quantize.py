"""Stage quantize: convert the stripped graph in one variant's mode, then check the result.

Converters fail silently (a uint8 request on a graph without ranges returns a float model with a
uint8 input; int8 from some QAT graphs builds but cannot run), so every artifact is read back, its
I/O dtypes and quantization parameters compared with the recipe, and run once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backends import backend_for, check_tensors
from ..errors import MzError
from ..recipe import Recipe, Variant
from ..recipe.schema import CALIBRATED_MODES, FITTED_ROUNDINGS, INTEGER_MODES
from ..runtime import TensorSpec, nhwc, open_model
from ..tasks.detection import load_anchors
from .calibrate import CONVERTERS, calibration_batches


@dataclass
class QuantizeResult:
    model: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    raw_model: Path | None = None  # the model before post-processing was attached: what verify compares
    fitted: dict | None = None  # weight_rounding fitted: what rounding.fit_weights refitted
    tuned: dict | None = None  # tune_steps: the output error before and after tuning.tune_weights


def quantize(stripped: Path, recipe: Recipe, variant: Variant, calibration_images: list[Path] | None,
             out_dir: Path, anchors: Path | None = None, calibrated: Path | None = None,
             log: Callable[[str], None] = lambda line: None) -> QuantizeResult:
    """The variant's model in out_dir, checked. `calibrated`: the shared calibration (calibrate) it is
    quantized from, its weights then fitted (weight_rounding) where calibrate left moments; an int8 variant's
    weights then tuned to the float model's outputs (tune_steps), before post-processing is attached. `log`: how
    far the tuning is."""
    from dataclasses import replace

    batches = calibration_batches(calibration_images, recipe) if calibration_images else None
    fitted = None
    with CONVERTERS:
        if calibrated is not None:
            from ..quant.tflite_converter import quantize_calibrated

            if variant.float_layers:
                _check_float_layers(calibrated, recipe, variant)
            model = quantize_calibrated(calibrated, recipe, variant, out_dir)
        else:
            model = backend_for(recipe).convert(stripped, recipe, variant, batches, out_dir)
    if calibrated is not None and variant.weight_rounding in FITTED_ROUNDINGS:
        from ..quant.rounding import MOMENTS, fit_weights

        if (calibrated.parent / MOMENTS).is_file():
            fitted = fit_weights(model, calibrated, calibrated.parent / MOMENTS, model,
                                 every_layer=variant.fits_every_layer)
    tuned = _tuned(stripped, model, recipe, variant, list(batches()), log) if variant.tune_steps else None
    checked = replace(check_artifact(model, recipe, variant), fitted=fitted, tuned=tuned)
    if not variant.attach_postprocess:
        return checked
    from .attach import OUTPUT_NAMES, attach_postprocess

    raw = out_dir / "raw" / model.name
    raw.parent.mkdir()
    model.rename(raw)
    attached = attach_postprocess(raw, recipe, load_anchors(anchors) if anchors else None, model)
    runner = open_model(attached)
    outputs = runner.run(np.zeros(recipe.input.shape, np.float32))
    if [o.name for o in runner.outputs] != list(OUTPUT_NAMES) or not all(np.all(np.isfinite(o)) for o in outputs):
        raise MzError(f"{attached}: post-processing attached, but the model does not run to {', '.join(OUTPUT_NAMES)}")
    return QuantizeResult(model=attached, inputs=runner.inputs, outputs=runner.outputs, raw_model=raw, fitted=fitted,
                          tuned=tuned)


def _tuned(stripped: Path, model: Path, recipe: Recipe, variant: Variant, tensors: list[np.ndarray],
           log: Callable[[str], None]) -> dict:
    """tune_steps: `model`'s weights tuned to the outputs of the float model `stripped`, each output judged as the
    task means it (tasks.detection.tuning_weights)."""
    from ..quant.tuning import tune_weights
    from ..tasks.detection import tuning_weights

    float_model = backend_for(recipe).GraphRunner(stripped, recipe)
    post, input_hw = recipe.postprocess, recipe.input.height_width
    try:
        before, after, kept = tune_weights(model, float_model.run, [o.name for o in float_model.outputs], tensors,
                                           variant.tune_steps, lambda outputs: tuning_weights(outputs, post, input_hw),
                                           log)
    except MzError as exc:  # an op the torch programs do not run: the int8 as quantized, and why it is not tuned
        return {"steps": variant.tune_steps, "kept": False, "not_run": str(exc)}
    return {"steps": variant.tune_steps, "error_before": before, "error_after": after, "kept": kept}


def _check_float_layers(calibrated: Path, recipe: Recipe, variant: Variant) -> None:
    """float_layers are op output tensors of the model, as `mzconvert debug` lists them."""
    from ..tflite_file import read_model

    graph = read_model(calibrated).subgraphs[0]
    outputs = [graph.tensors[i].name.decode() for op in graph.operators for i in op.outputs]
    check_tensors(recipe, f"variants[{recipe.variant_index(variant.name)}].float_layers", variant.float_layers,
                  outputs)


def check_artifact(model: Path, recipe: Recipe, variant: Variant) -> QuantizeResult:
    runner = open_model(model, recipe.cut_outputs)
    problems = []
    model_input = runner.inputs[0]
    if len(runner.inputs) != 1:
        problems.append(f"{len(runner.inputs)} inputs, expected 1")
    if model_input.dtype != variant.io_dtype:
        problems.append(f"input dtype {model_input.dtype}, expected {variant.io_dtype}")
    accepted = [recipe.input.shape] + ([nhwc(recipe.input.shape)] if recipe.input.layout == "NCHW" else [])
    if tuple(model_input.shape) not in accepted:
        problems.append(f"input shape {list(model_input.shape)}, expected {list(recipe.input.shape)}")
    if variant.mode in INTEGER_MODES:
        for spec in [model_input, *runner.outputs]:
            if spec.dtype in ("int8", "uint8", "int16") and spec.scale is None:
                problems.append(f"tensor {spec.name} is {spec.dtype} without quantization parameters")
        floats = runner.float_tensor_count()
        if floats and not variant.float_layers:
            problems.append(f"not fully quantized: {floats} float32 tensors inside the model")
    for spec in runner.outputs:
        if variant.mode in CALIBRATED_MODES and spec.dtype != variant.io_dtype:
            problems.append(f"output {spec.name} dtype {spec.dtype}, expected {variant.io_dtype}")
    if not problems:
        outputs = runner.run(np.zeros(recipe.input.shape, np.float32))
        if not all(np.all(np.isfinite(o)) for o in outputs):
            problems.append("running it once on a zero image gives non-finite outputs")
    if problems:
        raise MzError(f"{model}: variant {variant.name!r} ({variant.mode}) is not what the recipe asked for: "
                      + "; ".join(problems))
    return QuantizeResult(model=model, inputs=runner.inputs, outputs=runner.outputs)
