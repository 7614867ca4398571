"""What the bench scripts that build `mzconvert init`'s recipe as written share: the CLI run as a user runs it, a
tuned int8 variant's untuned copy beside it, the build's verdict with its figures either way, and what tuning did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def mz(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mzconvert.cli", "--json", *args], cwd=ROOT, capture_output=True,
                          text=True)


def untuned_copies(path: Path, steps: int | None) -> None:
    """init's recipe with its calibrated int8 variants tuned for `steps` (None: as init proposes), and after each
    tuned one a copy NAME-untuned that is not."""
    recipe = yaml.safe_load(path.read_text())
    variants = []
    for variant in recipe["variants"]:
        if variant["mode"] == "int8" and variant.get("calibration") and steps is not None:
            variant = {key: value for key, value in variant.items() if key != "tune_steps"} | \
                ({"tune_steps": steps} if steps else {})
        variants.append(variant)
        if variant.get("tune_steps"):
            variants.append({key: value for key, value in variant.items() if key != "tune_steps"}
                            | {"name": f"{variant['name']}-untuned"})
    path.write_text(yaml.safe_dump(recipe | {"variants": variants}, sort_keys=False))


def built_as_written(path: Path, where: list[str], npu: bool = False) -> tuple[str, dict]:
    """(whether the recipe builds as written, its variants' build report): where it does not, the figures anyway,
    from a build with its floors lowered, and no NPU target unless `npu` (with it, a variant the NPU compiles is
    judged under the reference kernels, its arithmetic; without, under LiteRT's optimized ones)."""
    built = mz("build", str(path), *where)
    verdict = "passes its floors" if built.returncode == 0 else \
        f"FAILS (exit {built.returncode}): {built.stderr.strip().splitlines()[-1][:400]}"
    if built.returncode != 0:
        recipe = yaml.safe_load(path.read_text())
        for variant in recipe["variants"]:
            variant.update(min_matched=0, min_agreement=0, min_mask_iou=0, min_slice_sqnr_db=-100)
        if not npu:
            recipe.get("targets", {}).pop("vela", None)
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        built = mz("build", str(path), *where)
        if built.returncode != 0:
            sys.exit(f"{path.stem}: build failed with its floors lowered:\n{built.stderr[-3000:]}")
    return verdict, json.loads(built.stdout)[path.stem]["variants"]


def tuning_lines(variants: dict) -> list[str]:
    """A line for each variant the recipe tunes (tune_steps): its output error on the calibration images it did
    not tune on, before and after, and whether the tuned weights were kept."""
    lines = []
    for name, entry in variants.items():
        if (tuned := entry.get("tuned")) and "not_run" not in tuned:
            lines.append(f"{name}: weights tuned {tuned['steps']} steps, output error {tuned['error_before']:.4g} -> "
                         f"{tuned['error_after']:.4g}" + ("" if tuned["kept"] else " (not kept)"))
        elif tuned:
            lines.append(f"{name}: not tuned ({tuned['not_run']})")
    return lines
