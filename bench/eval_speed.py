"""Issue 13: eval at the speed of the work it must do. Measured in one run on this machine: `mzconvert eval`
of mobilenetv2-torchvision (its built variants, the float source model and Google's two published
MobileNetV2 TFLite models as references) on the 500 ImageNet samples, by an earlier commit (a `git
worktree`, default the last commit before this work) and by today's code, each on its own build of the
recipe (builds not timed); and the ratio.

Usage: .venv/bin/python bench/eval_speed.py [--baseline REV] [--mirror DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from timing import ROOT, baseline_arguments, baseline_checkout, timed  # bench/timing.py: scripts run from bench/

REFERENCES = ("coral-mobilenet_v2_1.0_224_quant.tflite", "coral-tf2_mobilenet_v2_1.0_224_ptq.tflite")


def main() -> None:
    args = baseline_arguments()
    mirror = Path(args.mirror)
    work = Path(tempfile.mkdtemp(prefix="mzconvert-eval-speed-"))
    python = sys.executable
    references = [arg for name in REFERENCES for arg in ("--reference", str(mirror / "anchors" / name))]
    seconds = {}
    try:
        with baseline_checkout(args.baseline, work / "baseline") as old:
            for label, tree in (("baseline " + args.baseline, old), ("today", ROOT)):
                common = ["--quiet", "--cache-dir", str(work / "cache"), "--mirror", str(mirror)]
                where = ["--out", str(work / label / "dist"), "--build-dir", str(work / label / "build")]
                timed([python, "-m", "mzconvert.cli", *common, "build", "mobilenetv2-torchvision", *where], tree)
                seconds[label] = timed([python, "-m", "mzconvert.cli", *common, "eval", "mobilenetv2-torchvision",
                                        "--dataset", str(mirror / "imagenet-samples"), *references, *where], tree)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("mzconvert eval mobilenetv2-torchvision on 500 ImageNet samples, one run on this machine")
    for label, value in seconds.items():
        print(f"{label:24} {value:7.1f} s")
    today, baseline = seconds["today"], seconds[f"baseline {args.baseline}"]
    print(f"today / baseline: {today / baseline:.2f} (goal <= 0.6)")


if __name__ == "__main__":
    main()
