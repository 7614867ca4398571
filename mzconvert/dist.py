"""dist/<recipe>/: the release artifacts of one recipe, with MD5SUMS and manifest.json.

The folder is assembled in a staging folder and swapped in whole, so a reader never sees a mix of
two builds. Nothing time-dependent goes into it: two builds of the same inputs are byte-identical.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .console import Console
from .fsio import file_digests, replace_folder, write_bytes_atomic, write_json_atomic
from .recipe import Recipe


def write_md5sums(folder: Path, files: list[Path]) -> Path:
    """An MD5SUMS file that `md5sum -c` accepts (two spaces, text mode), sorted by name."""
    lines = [f"{file_digests(f, ('md5',))['md5']}  {f.relative_to(folder).as_posix()}\n"
             for f in sorted(files)]
    target = folder / "MD5SUMS"
    write_bytes_atomic(target, "".join(lines).encode())
    return target


def assemble(recipe: Recipe, per_variant: dict, versions: dict, out_root: Path, console: Console) -> dict:
    """per_variant: variant name -> {"chain": [fetch, freeze, strip outcomes], "quantize", "verify", "vela"}."""
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", dir=out_root))
    try:
        strips = {id(v["chain"][-1]): v["chain"][-1] for v in per_variant.values()}.values()
        copies: list[tuple[Path, str]] = [(s.folder / extra, extra) for s in strips for extra in s.result.get("extras", [])]
        anchors = next((s.result["anchors"] for s in strips if "anchors" in s.result), {})
        fetched = {v["chain"][0].result["model"] for v in per_variant.values()}
        variants = {}
        for name, stages in per_variant.items():
            quantized = stages["quantize"]
            entry = {"source_file": stages["chain"][0].result["model"], "mode": quantized.result["mode"], "io_dtype": quantized.result["io_dtype"],
                     "file": quantized.result["model"], "inputs": quantized.result["inputs"],
                     "outputs": quantized.result["outputs"]}
            copies.append((quantized.path("model"), quantized.result["model"]))
            if "verify" in stages:
                entry["verify"] = stages["verify"].result["metrics"]
            if "vela" in stages:
                vela = stages["vela"]
                entry["vela"] = {"file": vela.result["model"], "summary_csv": vela.result["summary_csv"],
                                 **vela.result["summary"]}
                copies += [(vela.path("model"), vela.result["model"]),
                           (vela.path("summary_csv"), vela.result["summary_csv"])]
            variants[name] = entry
        if recipe.postprocess is not None:
            (staging / "labels.txt").write_text("".join(f"{label}\n" for label in recipe.postprocess.labels))
        for source, name in copies:
            shutil.copyfile(source, staging / name)
        artifacts = {}
        for path in sorted(p for p in staging.iterdir() if p.is_file()):
            digests = file_digests(path, ("md5", "sha256"))
            artifacts[path.name] = {"size": path.stat().st_size, **digests}
        manifest = {
            "recipe": recipe.name,
            "recipe_sha256": recipe.text_sha256,
            "task": recipe.task,
            "source": {"files": sorted(fetched), **recipe.source.checksums,
                       "size": recipe.source.size, "url": recipe.source.url, "pypi": recipe.source.pypi},
            "input": {"name": recipe.input.name, "shape": list(recipe.input.shape), "layout": recipe.input.layout,
                      "preprocess": recipe.raw.get("preprocess")},
            "postprocess": anchors | ({"labels": list(recipe.postprocess.labels)} if recipe.postprocess else {}),
            "variants": variants,
            "artifacts": artifacts,
            "tools": versions,
        }
        write_json_atomic(staging / "manifest.json", manifest)
        write_md5sums(staging, [p for p in staging.iterdir() if p.is_file()])
        target = out_root / recipe.name
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.log(f"[{recipe.name}] wrote {target}/ ({len(artifacts) + 2} files, MD5SUMS and manifest.json)")
    return manifest
