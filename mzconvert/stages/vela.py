"""Stage vela-compile: an integer TFLite model -> Ethos-U command stream (`<name>_vela.tflite`).

Every option is passed explicitly. vela exits 0 even when nothing runs on the NPU, so the op
placement it prints (--show-cpu-operations) is parsed and checked against the recipe's budget.
"""

from __future__ import annotations

import configparser
import csv
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import MzError, RecipeError
from ..recipe import Recipe, Variant, VelaTarget
from ..recipe.schema import INTEGER_MODES
from ..runtime import open_model

SUMMARY_FIELDS = {  # vela summary column -> (manifest key, unit conversion)
    "inference_time": ("inference_time_ms", lambda v: round(float(v) * 1000, 4)),
    "inferences_per_second": ("inferences_per_second", lambda v: round(float(v), 2)),
    "nn_macs": ("macs", lambda v: int(float(v))),
    "sram_memory_used": ("sram_used_kib", lambda v: round(float(v), 2)),
    "dram_memory_used": ("dram_used_kib", lambda v: round(float(v), 2)),
    "on_chip_flash_memory_used": ("on_chip_flash_used_kib", lambda v: round(float(v), 2)),
    "off_chip_flash_memory_used": ("off_chip_flash_used_kib", lambda v: round(float(v), 2)),
    "cycles_total": ("cycles_total", lambda v: int(float(v))),
    "total_npu_encoded_weights": ("npu_encoded_weights_bytes", lambda v: int(float(v))),
}


@dataclass
class VelaResult:
    model: Path
    summary_csv: Path
    summary: dict


def default_config() -> Path:
    return Path(str(resources.files("ethosu") / "config_files" / "Arm" / "vela.ini"))


def _config_path(recipe: Recipe, target: VelaTarget) -> Path:
    if target.config is None:
        return default_config()
    path = (recipe.path.parent / target.config).resolve()
    if not path.is_file():
        raise RecipeError(f"{recipe.path}: {target.where}.config: no such file {path}")
    return path


def _check_config(recipe: Recipe, target: VelaTarget, config: Path) -> None:
    """system_config and memory_mode must be sections of the .ini vela will read."""
    parser = configparser.ConfigParser()
    parser.read(config)
    for field, prefix, value in (("system_config", "System_Config.", target.system_config),
                                 ("memory_mode", "Memory_Mode.", target.memory_mode)):
        known = [s[len(prefix):] for s in parser.sections() if s.startswith(prefix)]
        if value not in known:
            raise RecipeError(f"{recipe.path}: {target.where}.{field}: {value!r} is not in {config}; "
                              f"one of {', '.join(known)}")


def _require_integer(model: Path, recipe: Recipe, variant: Variant) -> None:
    runner = open_model(model, recipe.cut_outputs)
    floats = runner.float_tensor_count()
    # float_layers: float on purpose, on the CPU beside the NPU (counted, and held to the target's max_cpu_ops)
    if variant.mode not in INTEGER_MODES or (floats and not variant.float_layers):
        raise MzError(f"{model}: vela compiles integer models only; variant {variant.name!r} is "
                      f"{variant.mode} with {floats} float32 tensors (use an int8, int16x8 or uint8-qat variant)")


def parse_placement(stdout: str) -> tuple[int, list[str]]:
    """(number of NPU ops, the CPU ops as 'OPTYPE = name') from --show-cpu-operations output."""
    npu, cpu = 0, []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("NPU:"):
            npu += 1
        elif line.startswith("CPU:"):
            cpu.append(line[4:].strip())
    return npu, cpu


def compile_for_npu(model: Path, recipe: Recipe, variant: Variant, target: VelaTarget, out_dir: Path,
                    raw_model: Path | None = None) -> VelaResult:
    """vela for one target. With several targets each artifact carries the target's name:
    `<model>_<target>_vela.tflite`; with one, vela's own `<model>_vela.tflite`. A model with attached
    post-processing (float by nature, on the CPU) is checked for integer-ness before it was attached."""
    config = _config_path(recipe, target)
    _check_config(recipe, target, config)
    _require_integer(raw_model or model, recipe, variant)
    command = [sys.executable, "-m", "ethosu.vela", str(model.resolve()),
               "--accelerator-config", target.accelerator,
               "--config", str(config),
               "--system-config", target.system_config,
               "--memory-mode", target.memory_mode,
               "--output-dir", str(out_dir.resolve()),
               "--show-cpu-operations"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=out_dir)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise MzError(f"{model}: vela failed (exit {result.returncode}): {lines[-1]}")
    compiled = out_dir / f"{model.stem}_vela.tflite"
    summaries = list(out_dir.glob(f"{model.stem}_summary_*.csv"))
    if not compiled.is_file() or len(summaries) != 1:
        raise MzError(f"{model}: vela reported success but wrote no {compiled.name} and summary CSV")
    if len(recipe.vela) > 1:
        stem = f"{model.stem}_{target.name}"
        compiled = compiled.rename(out_dir / f"{stem}_vela.tflite")
        summaries = [summaries[0].rename(out_dir / summaries[0].name.replace(model.stem, stem, 1))]
    npu_ops, cpu_ops = parse_placement(result.stdout)
    with open(summaries[0], newline="") as f:
        row = next(csv.DictReader(f))
    summary = {key: convert(row[column]) for column, (key, convert) in SUMMARY_FIELDS.items() if row.get(column)}
    summary |= {"target": target.name, "accelerator": target.accelerator, "system_config": target.system_config,
                "memory_mode": target.memory_mode, "npu_ops": npu_ops, "cpu_ops": cpu_ops,
                "cpu_op_count": len(cpu_ops)}
    if npu_ops == 0:
        raise MzError(f"{model}: vela placed no operator on the NPU ({len(cpu_ops)} on the CPU)")
    if target.max_cpu_ops is not None and len(cpu_ops) > target.max_cpu_ops:
        raise MzError(f"{model}: {len(cpu_ops)} operators fall back to the CPU, more than "
                      f"{target.where}.max_cpu_ops = {target.max_cpu_ops}: {'; '.join(cpu_ops[:5])}")
    return VelaResult(model=compiled, summary_csv=summaries[0], summary=summary)


def check_budgets(recipe: Recipe, variant: Variant, target: VelaTarget, summary: dict) -> None:
    """The target's declared SRAM / flash / time budgets against vela's estimates: a located error."""
    flash = summary.get("on_chip_flash_used_kib", 0.0) + summary.get("off_chip_flash_used_kib", 0.0)
    for field, used, unit, what in (("max_sram_kib", summary.get("sram_used_kib"), "KiB", "SRAM"),
                                    ("max_flash_kib", flash, "KiB", "flash"),
                                    ("max_inference_ms", summary.get("inference_time_ms"), "ms", "estimated time")):
        limit = getattr(target, field)
        if limit is not None and used is not None and used > limit:
            raise RecipeError(f"{recipe.path}: {target.where}.{field}: variant {variant.name!r} on {target.name} "
                              f"needs {used:.2f} {unit} of {what}, more than the budget {limit:g} {unit}")
