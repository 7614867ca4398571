"""Stage quantize: convert the stripped graph in one variant's mode, then check the result.

Converters fail silently (a uint8 request on a graph without ranges returns a float model with a
uint8 input; int8 from some QAT graphs builds but cannot run), so every artifact is read back, its
I/O dtypes and quantization parameters compared with the recipe, and run once.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .backends import backend_for
from .errors import MzError
from .preprocess import prepare
from .recipe import Recipe, Variant
from .runtime import TensorSpec, nhwc, open_model

# One conversion at a time in a process (build -j runs variants in threads): TensorFlow's and ONNX
# Runtime's converters hold the GIL anyway, and keep global state (Keras names, TF's graph registry).
CONVERTERS = threading.Lock()


@dataclass
class QuantizeResult:
    model: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    raw_model: Path | None = None  # the model before post-processing was attached: what verify compares
    fitted: dict | None = None  # weight_rounding fitted: what rounding.fit_depthwise_weights refitted


def calibration_batches(images: list[Path], recipe: Recipe):
    """The representative dataset: the calibration images through the recipe's own preprocessing, all
    decoded before the converter starts, so a bad image is named as such (not as a conversion error)."""
    tensors = [prepare(path, recipe.preprocess, recipe.input).tensor for path in images]

    def batches() -> Iterator[np.ndarray]:
        yield from tensors
    return batches


DEFAULT_CALIBRATION_COUNT = 100  # images a variant calibrates on when it names no calibration_count


def shares_calibration(recipe: Recipe, variant: Variant) -> bool:
    """TFLite int8 variants are quantized from one calibration of their model and images (calibrate),
    whatever their I/O types; a graph with custom ops converts in one piece."""
    custom_ops = recipe.postprocess is not None and recipe.postprocess.kind == "tflite-detection-postprocess"
    return variant.mode == "int8" and variant.target == "tflite" and not custom_ops


def calibrate(stripped: Path, recipe: Recipe, variant: Variant, images: list[Path], out_dir: Path,
              with_moments: bool = True) -> Path:
    """The TFLite int8 calibration of the stripped model (or its Keras port) on `images`: the float model
    with every activation's range, by the variant's calibration method, from which each int8 variant
    is quantized (see ranges.py); with `with_moments`, beside it the depthwise convolutions' input moments
    that fitted weight rounding needs (rounding.MOMENTS, when the model has such layers)."""
    from .backends.tf import calibrate_converter
    from .ranges import calibrate_with_interpreter

    method = variant.calibration_method
    tensors = calibration_batches(images, recipe)()
    with CONVERTERS:
        converter, to_input = backend_for(recipe).tflite_converter(stripped, recipe)
        inputs = [to_input(t) for t in tensors]
        marked = calibrate_converter(converter, stripped, lambda: iter(inputs[:1]), out_dir / "one-image.tflite")
    target = out_dir / "calibrated.tflite"
    if calibrate_with_interpreter(marked, inputs, target, method, variant.calibration_percentile) is None:
        if method != "minmax":  # control flow: only TensorFlow's calibrator follows it
            raise MzError(f"{recipe.path}: variants: {variant.name}: calibration_method {method}: the model has "
                          "control flow, which only TensorFlow's calibrator (minmax) follows")
        with CONVERTERS:
            converter, _ = backend_for(recipe).tflite_converter(stripped, recipe)
            calibrate_converter(converter, stripped, lambda: iter(inputs), target)
    elif with_moments:
        from .rounding import MOMENTS, depthwise_moments

        depthwise_moments(target, inputs, out_dir / MOMENTS)
    marked.unlink()
    return target


def quantize(stripped: Path, recipe: Recipe, variant: Variant, calibration_images: list[Path] | None,
             out_dir: Path, anchors: Path | None = None, calibrated: Path | None = None) -> QuantizeResult:
    """The variant's model in out_dir, checked. `calibrated`: the shared calibration (calibrate) it is
    quantized from, its depthwise weights then fitted (weight_rounding) where calibrate left moments."""
    from dataclasses import replace

    batches = calibration_batches(calibration_images, recipe) if calibration_images else None
    fitted = None
    with CONVERTERS:
        if calibrated is not None:
            from .backends.tf import quantize_calibrated

            model = quantize_calibrated(calibrated, recipe, variant, out_dir)
        else:
            model = backend_for(recipe).convert(stripped, recipe, variant, batches, out_dir)
    if calibrated is not None and variant.weight_rounding == "fitted":
        from .rounding import MOMENTS, fit_depthwise_weights

        if (calibrated.parent / MOMENTS).is_file():
            fitted = fit_depthwise_weights(model, calibrated, calibrated.parent / MOMENTS, model)
    checked = replace(check_artifact(model, recipe, variant), fitted=fitted)
    if not variant.attach_postprocess:
        return checked
    from .attach import OUTPUT_NAMES, attach_postprocess
    from .evaluate import load_anchors

    raw = out_dir / "raw" / model.name
    raw.parent.mkdir()
    model.rename(raw)
    attached = attach_postprocess(raw, recipe, load_anchors(anchors), model)
    runner = open_model(attached)
    outputs = runner.run(np.zeros(recipe.input.shape, np.float32))
    if [o.name for o in runner.outputs] != list(OUTPUT_NAMES) or not all(np.all(np.isfinite(o)) for o in outputs):
        raise MzError(f"{attached}: post-processing attached, but the model does not run to {', '.join(OUTPUT_NAMES)}")
    return QuantizeResult(model=attached, inputs=runner.inputs, outputs=runner.outputs, raw_model=raw, fitted=fitted)


def check_artifact(model: Path, recipe: Recipe, variant: Variant) -> QuantizeResult:
    runner = open_model(model, list(recipe.strip.outputs) if recipe.strip else None)
    problems = []
    model_input = runner.inputs[0]
    if len(runner.inputs) != 1:
        problems.append(f"{len(runner.inputs)} inputs, expected 1")
    if model_input.dtype != variant.io_dtype:
        problems.append(f"input dtype {model_input.dtype}, expected {variant.io_dtype}")
    accepted = [recipe.input.shape] + ([nhwc(recipe.input.shape)] if recipe.input.layout == "NCHW" else [])
    if tuple(model_input.shape) not in accepted:
        problems.append(f"input shape {list(model_input.shape)}, expected {list(recipe.input.shape)}")
    if variant.mode in ("int8", "uint8-qat"):
        for spec in [model_input, *runner.outputs]:
            if spec.dtype in ("int8", "uint8") and spec.scale is None:
                problems.append(f"tensor {spec.name} is {spec.dtype} without quantization parameters")
        floats = runner.float_tensor_count()
        if floats:
            problems.append(f"not fully quantized: {floats} float32 tensors inside the model")
    for spec in runner.outputs:
        if variant.mode == "int8" and spec.dtype != variant.io_dtype:
            problems.append(f"output {spec.name} dtype {spec.dtype}, expected {variant.io_dtype}")
    if not problems:
        outputs = runner.run(np.zeros(recipe.input.shape, np.float32))
        if not all(np.all(np.isfinite(o)) for o in outputs):
            problems.append("running it once on a zero image gives non-finite outputs")
    if problems:
        raise MzError(f"{model}: variant {variant.name!r} ({variant.mode}) is not what the recipe asked for: "
                      + "; ".join(problems))
    return QuantizeResult(model=model, inputs=runner.inputs, outputs=runner.outputs)
