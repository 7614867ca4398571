"""Issue 13: eval at the speed of the work it must do. Measured in one run on this machine: `mzconvert eval`
of mobilenetv2-torchvision (its built variants, the float source model and Google's two published
MobileNetV2 TFLite models as references) on the 500 ImageNet samples, by an earlier commit (a `git
worktree`, default the last commit before this work) and by today's code, each on its own build of the
recipe (builds not timed); and the ratio.

Usage: .venv/bin/python bench/eval_speed.py [--baseline REV] [--mirror DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from timing import timed  # bench/timing.py: the scripts run from bench/

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "95fbe41"  # the last commit before the work of issue 13
REFERENCES = ("coral-mobilenet_v2_1.0_224_quant.tflite", "coral-tf2_mobilenet_v2_1.0_224_ptq.tflite")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    args = parser.parse_args()
    mirror = Path(args.mirror)
    work = Path(tempfile.mkdtemp(prefix="mzconvert-eval-speed-"))
    python = sys.executable
    references = [arg for name in REFERENCES for arg in ("--reference", str(mirror / "anchors" / name))]
    seconds = {}
    try:
        old = work / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.baseline], cwd=ROOT, check=True,
                       capture_output=True)
        for image_set in (ROOT / "calibration").glob("*.yaml"):  # the baseline's sets name images the mirror lost
            shutil.copy(image_set, old / "calibration")
        for label, tree in (("baseline " + args.baseline, old), ("today", ROOT)):
            common = ["--quiet", "--cache-dir", str(work / "cache"), "--mirror", str(mirror)]
            where = ["--out", str(work / label / "dist"), "--build-dir", str(work / label / "build")]
            timed([python, "-m", "mzconvert.cli", *common, "build", "mobilenetv2-torchvision", *where], tree)
            command = [python, "-m", "mzconvert.cli", *common, "eval", "mobilenetv2-torchvision", "--dataset",
                       str(mirror / "imagenet-samples"), *references, *where]
            seconds[label] = timed(command, tree)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work / "baseline")], cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    print("mzconvert eval mobilenetv2-torchvision on 500 ImageNet samples, one run on this machine")
    for label, value in seconds.items():
        print(f"{label:24} {value:7.1f} s")
    today, baseline = seconds["today"], seconds[f"baseline {args.baseline}"]
    print(f"today / baseline: {today / baseline:.2f} (goal <= 0.6)")


if __name__ == "__main__":
    main()
