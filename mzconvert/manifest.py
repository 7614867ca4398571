"""dist/<recipe>/manifest.json: what a build wrote, read and written here only.

The build writes it (stages/dist.assemble); eval, debug, bench, predict and report read it. Each
measurement taken on a dist records the sha256 of the artifacts it measured (measured_artifacts).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypedDict

from .errors import MzError
from .fsio import write_json_atomic

MANIFEST = "manifest.json"


class VariantEntry(TypedDict, total=False):
    source_file: str  # the fetched model it was built from
    mode: str
    io_dtype: str
    file: str  # the artifact, in the dist folder
    inputs: list[dict]  # runtime.TensorSpec.to_json() of each input and output
    outputs: list[dict]
    postprocess_attached: bool
    tuned: dict  # tune_steps: the steps, the output error on the judged images before and after, whether kept
    # (or not_run: why the torch programs could not run the model)
    search: dict  # max_drop: stages/fallback.search_float_layers' candidates and the float_layers chosen
    verify: dict  # stages/verify.verify_variant's metrics against the float model
    vela: dict  # NPU target -> {file, summary_csv, and vela's summary}


class Manifest(TypedDict, total=False):
    recipe: str
    recipe_sha256: str
    task: str
    source: dict  # files, checksums, size, url, pypi
    input: dict  # name, shape, layout, preprocess (as the recipe wrote it)
    postprocess: dict  # anchors (count, layout, box coder), labels
    variants: dict[str, VariantEntry]
    variant_order: list[str]  # the recipe's order (JSON is written with sorted keys)
    source_pipeline_fidelity: dict
    refused: dict[str, str]  # variant -> the fidelity floors it missed: built, not shipped
    artifacts: dict[str, dict]  # file -> {size, md5, sha256}
    tools: dict[str, str]


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    target = folder / MANIFEST
    write_json_atomic(target, manifest)
    return target


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of a dist folder, or None where there is none (or it cannot be read)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def load_manifest(dist: Path, recipe_name: str) -> Manifest:
    """The manifest of a recipe's build, which a command that reads the build needs: a named error without."""
    path = dist / recipe_name / MANIFEST
    if not path.is_file():
        raise MzError(f"{path}: missing; build it first: mzconvert build {recipe_name}")
    return json.loads(path.read_text())


def measured_artifacts(manifest: Manifest, files: list[str]) -> dict:
    """{file: sha256} of the dist files a measurement was taken on: what decides whether it stays."""
    return {f: manifest["artifacts"][f]["sha256"] for f in files if f in manifest["artifacts"]}
