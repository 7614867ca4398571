"""Issue 13: a build at the speed of the work it must do. Measured in one run on this machine:

1. the build of an earlier commit (a `git worktree`, default the last commit before this work),
2. today's build of the same recipe, serial and with -j 2 (checked to write the same bytes), from a warm
   download cache,
3. the bare calls that build cannot avoid: one TensorFlow import, one freeze, one strip, one int8
   calibration (with the weights' input moments), one conversion per variant (int8: weights fitted),
   one vela per NPU variant, one float reference pass,
   timed like the builds as one process from its start to its exit (and, printed beside, inside it);
and the ratios. The recipe is pedestrian-ssdlite as the earlier commit knew it: five variants, one NPU.

Usage: .venv/bin/python bench/build_speed.py [--baseline REV] [--mirror DIR]
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from timing import ROOT, baseline_arguments, baseline_checkout, timed  # bench/timing.py: scripts run from bench/

BARE_CALLS = r'''
import sys, time
start = time.perf_counter()
from pathlib import Path
from mzconvert.backends import tf as backend
backend.tf_module()
from mzconvert.recipe import load_recipe
from mzconvert.stages.calibrate import calibrate
from mzconvert.backends.tf import GraphRunner
from mzconvert.quant.tflite_converter import quantize_calibrated
from mzconvert.preprocess import prepare
from mzconvert.stages.vela import compile_for_npu
from mzconvert.quant.rounding import MOMENTS, fit_weights
recipe, source, images, verify, out = load_recipe(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5])
frozen = backend.freeze(source, recipe, out)
(out / "strip").mkdir()
stripped = backend.strip(frozen, recipe, out / "strip").model
one_core = time.perf_counter() - start  # TF import, freeze, strip: each waits for the one before, one core
calibration = sorted(Path(images).glob("*.jpg"))
(out / "calibrate").mkdir()
calibrated = calibrate(stripped, recipe, recipe.variant("int8"), calibration, out / "calibrate")
for variant in recipe.variants:
    folder = out / variant.name
    folder.mkdir()
    model = (quantize_calibrated(calibrated, recipe, variant, folder) if variant.mode == "int8"
             else backend.convert(stripped, recipe, variant, None, folder))
    if variant.mode == "int8":
        fit_weights(model, calibrated, calibrated.parent / MOMENTS, model, every_layer=variant.fits_every_layer)
        compile_for_npu(model, recipe, variant, recipe.vela[0], folder)
reference = GraphRunner(stripped, recipe)
for path in sorted(Path(verify).glob("*.jpg")):
    reference.run(prepare(path, recipe.preprocess, recipe.input).tensor)
print(one_core, time.perf_counter() - start)
'''


def main() -> None:
    args = baseline_arguments()
    mirror = Path(args.mirror)
    work = Path(tempfile.mkdtemp(prefix="mzconvert-build-speed-"))
    python = sys.executable
    try:
        with baseline_checkout(args.baseline, work / "baseline") as old:
            recipe = yaml.safe_load((ROOT / "recipes" / "pedestrian-ssdlite.yaml").read_text())
            recipe["variants"] = [v for v in recipe["variants"] if not v.get("attach_postprocess")]
            recipe["targets"]["vela"] = recipe["targets"]["vela"][:1]
            recipe.pop("source_pipeline")
            (work / "recipes").mkdir()
            same = work / "recipes" / "pedestrian-ssdlite.yaml"
            same.write_text(yaml.safe_dump(recipe, sort_keys=False))
            common = ["--quiet", "--cache-dir", str(work / "cache"), "--mirror", str(mirror)]
            timed([python, "-m", "mzconvert.cli", *common, "fetch", "pedestrian-ssdlite"], ROOT)  # warm cache
            baseline = timed([python, "-m", "mzconvert.cli", *common, "build", "pedestrian-ssdlite",
                              "--out", str(work / "old-dist"), "--build-dir", str(work / "old-build")], old)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            today = timed([python, "-m", "mzconvert.cli", *common, "build", str(same),
                           "--out", str(work / "new-dist"), "--build-dir", str(work / "new-build")], ROOT)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            noop = timed([python, "-m", "mzconvert.cli", *common, "build", str(same),
                          "--out", str(work / "new-dist"), "--build-dir", str(work / "new-build")], ROOT)
            parallel = timed([python, "-m", "mzconvert.cli", *common, "build", str(same), "-j", "2",
                              "--out", str(work / "j2-dist"), "--build-dir", str(work / "j2-build")], ROOT)
            if (work / "j2-dist" / "pedestrian-ssdlite" / "MD5SUMS").read_text() != \
                    (work / "new-dist" / "pedestrian-ssdlite" / "MD5SUMS").read_text():
                sys.exit("-j 2 wrote other bytes than the serial build")
            source = next((work / "new-build" / "pedestrian-ssdlite" / "fetch").glob("*.pb"))
            images = work / "calibration-images"
            images.mkdir()
            for pin in yaml.safe_load((ROOT / "calibration" / "coco-train2017-100.yaml").read_text())["images"]:
                shutil.copy(mirror / "coco" / "train2017" / pin["file"], images)
            verify = work / "verify-images"
            verify.mkdir()
            for pin in yaml.safe_load((ROOT / "calibration" / "coco-val2017-32.yaml").read_text())["images"]:
                shutil.copy(mirror / "coco" / "val2017" / pin["file"], verify)
            (work / "bare").mkdir()
            started = time.perf_counter()  # a process, as each build is: Python's start and exit included
            result = subprocess.run([python, "-c", BARE_CALLS, str(same), str(source), str(images), str(verify),
                                     str(work / "bare")], cwd=ROOT, capture_output=True, text=True)
            bare = time.perf_counter() - started
            if result.returncode != 0:
                sys.exit(result.stderr[-2000:])
            one_core, bare_inside = map(float, result.stdout.strip().splitlines()[-1].split())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("pedestrian-ssdlite (5 variants, 1 NPU target), warm download cache, one run on this machine")
    print(f"{'build':44} {'seconds':>8}")
    print(f"{'baseline ' + args.baseline + ' (a calibration per int8 variant)':44} {baseline:8.1f}")
    print(f"{'today, serial':44} {today:8.1f}")
    print(f"{'today, -j 2 (same bytes)':44} {parallel:8.1f}")
    print(f"{'bare unavoidable calls, one process':44} {bare:8.1f}")
    print(f"{'  the same calls alone (start and exit not)':44} {bare_inside:8.1f}")
    print(f"{'today, no-op rebuild':44} {noop:8.2f}")
    print(f"today / baseline: {today / baseline:.2f} (goal <= 0.55)")
    print(f"today / bare calls: {today / bare:.2f} (goal <= 1.15); against the calls alone {today / bare_inside:.2f}")
    print(f"-j 2 / serial: {parallel / today:.2f} (goal <= 0.7)")
    cores = os.cpu_count() or 1
    bound = one_core + (cpu - one_core) / cores
    print(f"the serial build used {cpu:.1f} CPU seconds, the first {one_core:.1f} of them (TF import, freeze, strip) "
          f"one after another on one core: on {cores} cores no schedule of that work takes less than "
          f"{bound:.1f} s, {bound / today:.2f} of serial")


if __name__ == "__main__":
    main()
