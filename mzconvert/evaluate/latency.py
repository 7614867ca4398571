"""Latency and peak memory of one model file, measured in a fresh process (`python -m mzconvert.evaluate.latency`).

A child process per artifact makes peak RSS the model's own (the parent's imports do not count).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def integer_convolutions(model: Path) -> tuple[int, int] | None:
    """(how many of an ONNX model's convolutions ONNX Runtime's CPU graph optimizations run as integer kernels,
    how many there are), on this CPU; None for a model that is not ONNX. A QDQ Conv that ORT does not fuse
    runs in float between a Dequantize and a Quantize: slower than the float model's."""
    if model.suffix != ".onnx":
        return None
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mzconvert-ort-") as work:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    integer = sum(op in ("QLinearConv", "ConvInteger") for op in ops)
    return integer, integer + sum(op in ("Conv", "FusedConv", "NhwcFusedConv") for op in ops)


def measure(model: Path, runs: int, warmup: int, threads: int) -> dict:
    from ..runtime import FUSED, open_model

    runner = open_model(model, threads=threads, kernels=FUSED)  # the speed a deployment gets (ONNX QDQ: fused)
    spec = runner.inputs[0]
    shape = [d if d > 0 else 1 for d in spec.shape]
    tensor = np.random.RandomState(0).uniform(-1, 1, shape).astype(np.float32)
    for _ in range(warmup):
        runner.run(tensor)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.run(tensor)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)),
            "runs": runs, "warmup": warmup, "threads": threads,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "integer_convs": integer_convolutions(model)}


def measure_in_child(model: Path, runs: int, warmup: int, threads: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "mzconvert.evaluate.latency", str(model), "--runs", str(runs),
                             "--warmup", str(warmup), "--threads", str(threads)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{model}: benchmark process failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args()
    print(json.dumps(measure(a.model, a.runs, a.warmup, a.threads)))
