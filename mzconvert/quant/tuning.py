"""tune_steps: an int8 model's weights and biases tuned to the float model's outputs on the calibration images,
its activations rounded as the model rounds them.

Rounding each weight to its nearest step, or fitting the rounding to one layer's own output (weight_rounding),
leaves the error each layer inherits from the rounded activations before it. Tuning runs the model in torch
(qdq_program.py for an ONNX QDQ graph, tflite_program.py for a .tflite), every activation rounded to its
tensor's grid with the gradient passed straight through (as quantization-aware training does), the int8
weights as real values rounded to their fixed per-channel steps, and moves them (Adam, STEP_IMAGES images a
step) to lower the outputs' error against the float model: each output's squared error relative to its float
power, weighted where the task says which values matter (a detector's boxes at the cells it scores:
tasks/detection.tuning_weights). The scales and zero points stay as the quantizer set them; only the integers
change. The tuned integers are kept only where the model has less output error than before on the calibration
images it was not tuned on (every JUDGED_EVERY-th), run as ONNX defines its ops or under LiteRT's reference
kernels (the NPU's arithmetic): the programs compute as those do only to a step here and there.

What it gains is in the README and docs/results.md (NudeNet's YOLOv8n, `bench/yolo_trained.py`: each tuned int8
beside its untuned copy).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

STEP_IMAGES = 4  # images a step's gradient is summed over
TUNING_IMAGES = 128  # at most this many calibration images (their float outputs are held in memory)
JUDGED_EVERY = 4  # every 4th of them is not tuned on but judges the tuned weights
LEARNING_RATE = 0.01  # Adam's step for a weight, in its own quantization steps (a bias: its layer's weight step)
SEED = 0
REPORTS = 10  # progress lines a tuning logs: each tenth of its steps, with the time it expects to take yet


def tune_weights(quantized: Path, reference: Callable[[np.ndarray], list[np.ndarray]], names: list[str],
                 tensors: list[np.ndarray], steps: int,
                 weigh: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                 log: Callable[[str], None] = lambda line: None) -> tuple[float, float, bool]:
    """Tune the weights of `quantized` (an int8 .onnx QDQ or .tflite model; replaced where kept) to the outputs
    `names` of its float model (`reference(tensor)`: those outputs, in that order) on the first TUNING_IMAGES
    `tensors` but every JUDGED_EVERY-th, for `steps` Adam steps. `weigh(float outputs by name)`: {output name:
    weights broadcasting to it} for outputs whose values do not all matter alike. Returns the output error on the
    images not tuned on, before and after (ONNX Runtime as ONNX defines the ops; LiteRT's reference kernels, the
    NPU's arithmetic), and whether the tuned weights were kept (the error after is lower). `log`: a line at each
    tenth of the steps (a YOLOv8n's 150 steps take 2-3 min of one core at 320 px, 7-8 at 640)."""
    import torch

    from ..runtime import REFERENCE, open_model

    program = _programs()[quantized.suffix](quantized, names)  # an op it does not run: said before any image runs
    images = tensors[:TUNING_IMAGES]
    judged = images[JUDGED_EVERY - 1::JUDGED_EVERY] or images  # the images the tuned weights are kept by
    tuned_on = [x for i, x in enumerate(images) if i % JUDGED_EVERY != JUDGED_EVERY - 1] or images

    def outputs(tensors: list[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
        """The float model's outputs by name and their weights (weigh), image by image."""
        found = [dict(zip(names, reference(tensor))) for tensor in tensors]
        return found, [weigh(r) for r in found]

    wanted, weights = outputs(tuned_on)
    # each output's float power, weighted as its error is: a detector's boxes count at the few cells that detect
    power = {n: max(float(np.mean([np.mean(r[n].astype(np.float64) ** 2 * w.get(n, 1.0))
                                   for r, w in zip(wanted, weights)])), 1e-30) for n in names}
    judged_wanted, judged_weights = outputs(judged)

    def error(candidate: Path) -> float:
        """The mean over the judged images of each output's weighted squared error relative to its weighted float
        power."""
        runner = open_model(candidate, names, kernels=REFERENCE)
        return float(np.mean([sum(np.mean((got - want[n]) ** 2 * w.get(n, 1.0)) / power[n]
                                  for n, got in zip(names, runner.run(tensor)))
                              for tensor, want, w in zip(judged, judged_wanted, judged_weights)]))

    before = error(quantized)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a sum split over threads rounds otherwise: the same tuned bytes on any host's cores
    try:
        tuned = _tuned(program, quantized, names, tuned_on, wanted, weights, power, steps, log)
    finally:
        torch.set_num_threads(threads)
    after = error(tuned)
    if after < before:
        tuned.replace(quantized)
    else:
        tuned.unlink()
    return before, after, after < before


def _tuned(program, quantized: Path, names: list[str], tensors: list[np.ndarray],
           wanted: list[dict[str, np.ndarray]], weights: list[dict[str, np.ndarray]], power: dict[str, float],
           steps: int, log: Callable[[str], None]) -> Path:
    """`quantized` with the weights of its torch `program` tuned to the float outputs `wanted` of `tensors`
    (weighted, relative to each output's `power`), written beside it as tuned-NAME; `log` told how far it is."""
    import torch

    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(program.parameters(), lr=LEARNING_RATE)
    order = np.random.default_rng(SEED)
    as_torch = [[torch.from_numpy(np.asarray(r[n], np.float32)) for n in names] for r in wanted]
    weight_tensors = [[torch.from_numpy(np.asarray(w[n], np.float32)) if n in w else 1.0 for n in names]
                      for w in weights]
    started = time.perf_counter()
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        for i in order.choice(len(tensors), min(STEP_IMAGES, len(tensors)), replace=False):
            got = program(tensors[i])
            loss = sum(((g - want) ** 2 * w).mean() / power[n]
                       for g, want, w, n in zip(got, as_torch[i], weight_tensors[i], names))
            loss.backward()
        optimizer.step()
        if step % max(1, steps // REPORTS) == 0 and step < steps:
            spent = time.perf_counter() - started
            log(f"tuning weights: step {step}/{steps}, {_duration(spent)} so far, "
                f"about {_duration(spent / step * (steps - step))} to go")
    candidate = quantized.with_name(f"tuned-{quantized.name}")
    program.write(candidate)
    return candidate


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _programs() -> dict:
    """The torch program of each model type, by file suffix."""
    from .qdq_program import QdqProgram
    from .tflite_program import TfliteProgram

    return {".onnx": QdqProgram, ".tflite": TfliteProgram}
