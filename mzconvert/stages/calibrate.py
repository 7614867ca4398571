"""Stage calibrate: one TFLite int8 calibration of a model on its images, shared by every int8 variant.

The calibration is the float model with every activation's range recorded (quant/ranges.py); each
int8 variant is then quantized from it (stages/quantize.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..backends import backend_for
from ..errors import MzError
from ..preprocess import prepare
from ..recipe import Recipe, Variant

# One conversion at a time in a process (build -j runs variants in threads): TensorFlow's and ONNX
# Runtime's converters hold the GIL anyway, and keep global state (Keras names, TF's graph registry).
CONVERTERS = threading.Lock()


def calibration_batches(images: list[Path], recipe: Recipe):
    """The representative dataset: the calibration images through the recipe's own preprocessing, all
    decoded before the converter starts, so a bad image is named as such (not as a conversion error)."""
    tensors = [prepare(path, recipe.preprocess, recipe.input).tensor for path in images]

    def batches() -> Iterator[np.ndarray]:
        yield from tensors
    return batches


DEFAULT_CALIBRATION_COUNT = 100  # images a variant calibrates on when it names no calibration_count


def shares_calibration(recipe: Recipe, variant: Variant) -> bool:
    """TFLite int8 variants the TFLite converter makes are quantized from one calibration of their model and
    images (calibrate), whatever their I/O types; a graph with custom ops converts in one piece; a .tflite source
    quantized by ai-edge-quantizer calibrates in it."""
    custom_ops = recipe.postprocess is not None and recipe.postprocess.kind == "tflite-detection-postprocess"
    return (variant.mode == "int8" and variant.target == "tflite" and not custom_ops
            and variant.quantizer == "converter")


def calibrate(stripped: Path, recipe: Recipe, variant: Variant, images: list[Path], out_dir: Path,
              with_moments: bool = True) -> Path:
    """The TFLite int8 calibration of the stripped model (or its Keras port) on `images`: the float model
    with every activation's range, by the variant's calibration method, from which each int8 variant
    is quantized (see ranges.py); with `with_moments`, beside it the input moments of its depthwise
    convolutions (weight_rounding fitted-all: of its convolutions and fully-connected layers) that fitted weight
    rounding needs (rounding.MOMENTS, when the model has such layers)."""
    from ..quant.ranges import calibrate_with_interpreter
    from ..quant.tflite_converter import calibrate_converter

    method = variant.calibration_method
    tensors = list(calibration_batches(images, recipe)())
    with CONVERTERS:
        marked, to_input = backend_for(recipe).range_slots(stripped, recipe, tensors[0], out_dir / "one-image.tflite")
        inputs = [to_input(t) for t in tensors]
    target = out_dir / "calibrated.tflite"
    if calibrate_with_interpreter(marked, inputs, target, method, variant.calibration_percentile,
                                  recipe.sigmoid_read_outputs, recipe.cut_outputs) is None:
        if method != "minmax":  # control flow: only TensorFlow's calibrator follows it
            raise MzError(f"{recipe.path}: variants: {variant.name}: calibration_method {method}: the model has "
                          "control flow, which only TensorFlow's calibrator (minmax) follows")
        with CONVERTERS:
            converter, _ = backend_for(recipe).tflite_converter(stripped, recipe)
            calibrate_converter(converter, stripped, lambda: iter(inputs), target)
    elif with_moments:
        from ..quant.rounding import MOMENTS, weight_moments

        weight_moments(target, inputs, out_dir / MOMENTS, every_layer=variant.fits_every_layer)
    marked.unlink()
    return target
