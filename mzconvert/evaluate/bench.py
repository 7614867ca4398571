"""`mzconvert bench`: the CPU latency and peak memory of every built variant, written to bench.json."""

from __future__ import annotations

from pathlib import Path

from ..fsio import write_json_atomic
from ..manifest import load_manifest, measured_artifacts
from ..recipe import Recipe
from .latency import measure_in_child


def bench_variants(recipe: Recipe, out: Path, only: list[str], runs: int, warmup: int, threads: int, log) -> dict:
    """`mzconvert bench`: every built variant (or `only` those) measured, written to dist/<recipe>/bench.json."""
    manifest = load_manifest(out, recipe.name)
    results = {}
    for name in [v.name for v in recipe.variants if v.name in manifest["variants"]]:
        if only and name not in only:
            continue
        log(f"bench: {name} ({runs} runs, {threads} thread(s))")
        results[name] = measure_in_child(out / recipe.name / manifest["variants"][name]["file"], runs, warmup, threads)
    payload = {"recipe": recipe.name, "runs": runs, "warmup": warmup, "threads": threads, "results": results,
               "models": list(results),
               "artifacts": measured_artifacts(manifest, [manifest["variants"][n]["file"] for n in results])}
    write_json_atomic(out / recipe.name / "bench.json", payload)
    return payload
