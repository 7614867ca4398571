"""Issue 6 goals: int8 PTQ keeps >= 97 % of the float model's AP; int8 on CPU (1 thread) vs float32.

Builds pedestrian-ssdlite (or reuses an up-to-date build), evaluates every variant on the 132 real
COCO val2017 images of the mirror (person AP; a small subset, not full COCO) and measures CPU
latency. Usage: .venv/bin/python bench/accuracy_latency.py [--mirror DIR] [--runs N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", "--json", *args],
                            capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    return json.loads(result.stdout)


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.machine()
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "asimddp") if f in flags]
    return f"{platform.machine()} with {', '.join(wanted) or 'no SIMD flags found'}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    cli("--mirror", args.mirror, "build", "pedestrian-ssdlite")
    evaluation = cli("eval", "pedestrian-ssdlite", "--dataset", str(Path(args.mirror) / "coco"))
    bench = cli("bench", "pedestrian-ssdlite", "--runs", str(args.runs), "--threads", str(args.threads))
    ap, ms = evaluation["results"], bench["results"]
    print(f"pedestrian-ssdlite, person AP on {evaluation['images']} COCO val2017 images (mirror subset, not full COCO)")
    print(f"{'model':16} {'AP':>7} {'AP50':>7} {'AP / float32':>13} {'95 % interval':>16} {'median ms':>10} "
          f"{'float32 ms / ms':>16}")
    for name, row in ap.items():
        latency = ms.get(name, {}).get("median_ms")
        speed = f"{ms['float32']['median_ms'] / latency:15.2f}x" if latency else f"{'-':>16}"
        low, high = row["ratio_interval"]
        print(f"{name:16} {row['AP']:7.4f} {row['AP50']:7.4f} {row['AP'] / ap['float32']['AP']:13.1%} "
              f"{f'{low:.1%} - {high:.1%}':>16} {(f'{latency:10.2f}' if latency else f'{chr(45):>10}')} {speed}")
    if fidelity := evaluation.get("pipeline_fidelity"):
        print(f"source end to end vs our pipeline: AP difference {fidelity['ap_difference']:+.4f}, "
              f"{fidelity['matched_share']:.1%} of {fidelity['detections_compared']} detections matched")
    print(f"int8 / float32 AP ratio: {ap['int8']['AP'] / ap['float32']['AP']:.3f} (goal >= 0.97)")
    print(f"float32 / int8 CPU latency ratio, {args.threads} thread(s): "
          f"{ms['float32']['median_ms'] / ms['int8']['median_ms']:.2f}x (goal >= 2x) on {cpu_flags()}")


if __name__ == "__main__":
    main()
