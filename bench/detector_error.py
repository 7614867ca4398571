"""Issue 12: which of the detector's int8 errors costs AP. Measured in one run on this machine.

pedestrian-ssdlite is built (float32 and int8 with float I/O); on the 132 COCO val2017 images the int8
model's error on each raw output (box encodings, class logits) is measured against float32: its mean
(a bias) and spread. Then the float32 outputs get random noise of the same spread per column, on the
box encodings only, on the class logits only, and on both (three seeds), and every variant is
evaluated on the same images: the AP ratio to float32 says which error the AP loss comes from and how
far it moves from noise of that size alone.

Usage: .venv/bin/python bench/detector_error.py [--mirror DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SEEDS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    mirror = Path(parser.parse_args().mirror)
    from mzconvert.evaluate import datasets as evaluate
    from mzconvert.recipe import load_recipe
    from mzconvert.runtime import open_model

    recipe = load_recipe(ROOT / "recipes" / "pedestrian-ssdlite.yaml")
    work = Path(tempfile.mkdtemp(prefix="mzconvert-detector-error-"))
    try:
        subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", "--mirror", str(mirror), "build",
                        "pedestrian-ssdlite", "--variant", "float32", "--variant", "int8-float-io",
                        "--out", str(work / "dist"), "--build-dir", str(work / "build")], cwd=ROOT, check=True,
                       capture_output=True)
        folder = work / "dist" / recipe.name
        outputs = list(recipe.strip.outputs)
        float32, int8 = (open_model(folder / f"{recipe.name}_{v}.tflite", outputs, 2)
                         for v in ("float32", "int8-float-io"))
        coco = evaluate.CocoDataset.open(mirror / "coco", "val2017")
        tensors = [evaluate.LoadedImage(p).tensor(recipe.preprocess, recipe.input) for p in coco.images.values()]
        errors = [[], []]
        for tensor in tensors:
            for k, (ref, got) in enumerate(zip(float32.run(tensor), int8.run(tensor))):
                errors[k].append((got - ref).reshape(-1, ref.shape[-1]))
        spread = []
        print(f"int8 (float I/O) - float32 on the raw outputs, {len(tensors)} val images, per column:")
        for name, error in zip(outputs, errors):
            error = np.concatenate(error)
            spread.append(error.std(axis=0))
            print(f"  {name:12} mean {np.array2string(error.mean(axis=0), precision=3)}  "
                  f"std {np.array2string(spread[-1], precision=3)}")

        def noisy(seed: int, which: tuple[int, ...]):
            rng = np.random.RandomState(seed)

            def run(tensor):
                return [out + (rng.normal(0, 1, out.shape) * spread[k]).astype(np.float32) if k in which else out
                        for k, out in enumerate(float32.run(tensor))]
            return run

        runners = {"float32": float32.run, "int8-float-io": int8.run}
        for seed in range(SEEDS):
            runners[f"noise on boxes, seed {seed}"] = noisy(seed, (0,))
            runners[f"noise on class logits, seed {seed}"] = noisy(seed, (1,))
            runners[f"noise on both, seed {seed}"] = noisy(seed, (0, 1))
        models = evaluate.predictors(recipe, runners, folder, {"variants": {}})
        results = evaluate.evaluate_detection(models, recipe, coco)["results"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nperson AP on the {len(tensors)} val images; float32 outputs + noise of int8's spread")
    print(f"{'model':34} {'AP':>7} {'vs float32':>11}  95 % interval")
    for name, row in results.items():
        low, high = row["ratio_interval"]
        print(f"{name:34} {row['AP']:7.4f} {row['AP'] / results['float32']['AP']:10.1%}  {low:.1%} - {high:.1%}")


if __name__ == "__main__":
    main()
