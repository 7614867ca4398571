"""TensorFlow's TFLite converter, set up for a variant's mode: float16, dynamic range, full int8, and
int8 split into calibrate-then-quantize (one calibration, several int8 variants)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import MzError, short_text
from ..recipe import Recipe, Variant


def tf_module():
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # v1 API deprecation notices say nothing the user can act on
    return tf


def run_converter(converter, source: Path, recipe: Recipe, variant: Variant,
                  calibration: Callable[[], Iterable[np.ndarray]] | None, out_dir: Path) -> Path:
    """Apply the variant's mode to a TFLite converter (frozen graph or Keras) and write the model."""
    tf = tf_module()
    if variant.mode == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif variant.mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif variant.mode in ("int8", "int16x8"):
        int8_converter(converter, calibration)
        if variant.mode == "int16x8":  # 16-bit activations, 8-bit weights: the converter's own quantizer
            ops = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            converter.target_spec.supported_ops = [ops]
        io_type = getattr(tf, variant.io_dtype)  # tf.float32 | tf.int8 | tf.uint8 | tf.int16
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    flatbuffer = _convert(converter, source, f"of variant {variant.name!r} ({variant.mode})")
    target = out_dir / f"{recipe.name}_{variant.name}.tflite"
    target.write_bytes(flatbuffer)
    return target


def _convert(converter, source: Path, what: str) -> bytes:
    try:
        return converter.convert()
    except Exception as exc:  # the converter raises ConverterError and a zoo of others
        raise MzError(f"{source}: TFLite conversion {what} failed: {short_text(exc)}") from None


def int8_converter(converter, calibration: Callable[[], Iterable[np.ndarray]]):
    """Set a TFLite converter for full-integer int8, calibrated on the tensors `calibration` yields."""
    tf = tf_module()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([t] for t in calibration())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter


def calibrate_converter(converter, source: Path, calibration: Callable[[], Iterable[np.ndarray]],
                        target: Path) -> Path:
    """Write to `target` the converter's int8 calibration: the float model with the recorded range of
    every tensor its quantizer needs, from which each int8 variant is quantized (quantize_calibrated)."""
    int8_converter(converter, calibration)
    converter._experimental_calibrate_only = True  # the converter's own calibrate-then-quantize, split in two
    target.write_bytes(_convert(converter, source, "(int8 calibration)"))
    return target


def converter_range_slots(converter, to_input: Callable, source: Path, tensor: np.ndarray, target: Path):
    """(the float model the converter calibrated on one input: a range slot on every tensor its quantizer
    needs, what turns recipe input tensors into its inputs): where calibrate records the ranges."""
    return calibrate_converter(converter, source, lambda: iter([to_input(tensor)]), target), to_input


def quantize_calibrated(calibrated: Path, recipe: Recipe, variant: Variant, out_dir: Path) -> Path:
    """The int8 model of a calibrated one, with the variant's input/output type: what converter.convert()
    does after calibrating (tests/test_tf_backend.py checks the two agree on every output)."""
    tf = tf_module()
    from tensorflow.lite.python.convert import mlir_quantize

    io_type = getattr(tf, variant.io_dtype)
    try:  # float_layers: left float, a dequantize before and a quantize after each
        flatbuffer = mlir_quantize(calibrated.read_bytes(), False, input_data_type=io_type, output_data_type=io_type,
                                   denylisted_nodes=list(variant.float_layers) or None)
    except Exception as exc:
        raise MzError(f"{calibrated}: int8 quantization of variant {variant.name!r} failed: "
                      f"{short_text(exc)}") from None
    target = out_dir / f"{recipe.name}_{variant.name}.tflite"
    target.write_bytes(flatbuffer)
    return target
