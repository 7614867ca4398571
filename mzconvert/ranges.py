"""Activation ranges for TFLite int8: recorded with the LiteRT interpreter, written into the calibrated model.

TensorFlow's own calibrator (the converter's representative-dataset pass) has two costs we avoid:
- it runs the model op by op with logging kernels, single-threaded: ~170 ms an image for SSDLite
  MobileNetV2 at 320x320 on this machine, where the interpreter with all tensors kept takes ~55 ms;
- it logs an op's inputs after the op has run, and an ADD computes in place into its first input:
  that input's range (in MobileNetV2, the output of every residual block's projection conv) becomes
  the union with the sum's range, up to 2x wider than the tensor ever is, i.e. up to a bit of
  resolution lost on the layers PTQ is most sensitive to.

So the converter calibrates on one image only, which gives the float model with a range slot on
every tensor its quantizer needs (and nothing else of the images); every image then runs through
the interpreter, and each slot gets the min and max the tensor really took.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import MzError
from .tflite_file import read_model, write_model


def record_ranges(model: Path, tensors: Iterable[np.ndarray], wanted: list[int], threads: int = 2
                  ) -> dict[int, tuple[float, float]]:
    """{tensor index: (min, max)} over every input in `tensors`, of the tensors of subgraph 0 in `wanted`."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # Without the default delegate every tensor is computed by a builtin kernel and kept after invoke
    # (LiteRT warns that keeping them costs memory: that is what they are kept for).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_path=str(model), num_threads=threads, experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    model_input = interpreter.get_input_details()[0]["index"]
    low = {i: np.inf for i in wanted}
    high = {i: -np.inf for i in wanted}
    for tensor in tensors:
        interpreter.set_tensor(model_input, tensor)
        interpreter.invoke()
        for i in wanted:
            values = interpreter.tensor(i)()  # a view, no copy
            lo, hi = values.min(), values.max()
            if np.isnan(lo) or np.isnan(hi):  # NaN values are skipped, as TensorFlow's calibrator does
                lo, hi = np.nanmin(values, initial=np.inf), np.nanmax(values, initial=-np.inf)
            low[i], high[i] = min(low[i], float(lo)), max(high[i], float(hi))
            del values  # invoke() refuses to run while a view of the interpreter's memory is alive
    return {i: (low[i], high[i]) for i in wanted}


def calibrate_with_interpreter(marked: Path, tensors: list[np.ndarray], target: Path) -> Path | None:
    """Write to `target` the model `marked` (calibrated by the converter on one image) with every range
    slot set from all `tensors`; None when the model has control flow (more than one subgraph), which
    only TensorFlow's calibrator follows."""
    model = read_model(marked)
    if len(model.subgraphs) != 1:
        return None
    slots = {i: t for i, t in enumerate(model.subgraphs[0].tensors)
             if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min) == 1}
    ranges = record_ranges(marked, tensors, sorted(slots))
    for i, tensor in slots.items():
        low, high = ranges[i]
        if not (np.isfinite(low) and np.isfinite(high)):
            raise MzError(f"calibration: tensor {tensor.name.decode(errors='replace')!r} has no finite value on any "
                          "calibration image")
        tensor.quantization.min, tensor.quantization.max = [low], [high]
    return write_model(model, target)
