"""dist/<recipe>/: the release artifacts of one recipe, with MD5SUMS and manifest.json.

The folder is assembled in a staging folder and swapped in whole, so a reader never sees a mix of
two builds. Nothing time-dependent goes into it: two builds of the same inputs are byte-identical.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

from .console import Console
from .errors import MzError
from .fsio import atomic_path, file_digests, replace_folder, write_bytes_atomic, write_json_atomic
from .recipe import Recipe


def write_md5sums(folder: Path, files: list[Path]) -> Path:
    """An MD5SUMS file that `md5sum -c` accepts (two spaces, text mode), sorted by name."""
    lines = [f"{file_digests(f, ('md5',))['md5']}  {f.relative_to(folder).as_posix()}\n"
             for f in sorted(files)]
    target = folder / "MD5SUMS"
    write_bytes_atomic(target, "".join(lines).encode())
    return target


def assemble(recipe: Recipe, per_variant: dict, versions: dict, out_root: Path, console: Console,
             source_pipeline: dict | None = None) -> dict:
    """per_variant: variant name -> {"chain": [fetch, freeze, strip outcomes], "quantize", "verify", "vela"}."""
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{recipe.name}@", dir=out_root))
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
            if stages.get("vela"):
                entry["vela"] = {}
                for target, vela in stages["vela"].items():
                    entry["vela"][target] = {"file": vela.result["model"], "summary_csv": vela.result["summary_csv"],
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
            **({"source_pipeline_fidelity": source_pipeline} if source_pipeline else {}),
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


def check_md5sums(folder: Path) -> list[Path]:
    """The files MD5SUMS lists, each re-hashed; a mismatch or a missing file is an error."""
    listing = folder / "MD5SUMS"
    if not listing.is_file():
        raise MzError(f"{folder}: no MD5SUMS; build it with mzconvert build {folder.name}")
    files = []
    for line in listing.read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = folder / name
        if not path.is_file() or file_digests(path, ("md5",))["md5"] != digest:
            raise MzError(f"{path}: does not match MD5SUMS; refusing to release a corrupt artifact")
        files.append(path)
    return files


def release(folders: list[Path], out_dir: Path, version: str) -> Path:
    """One reproducible mzconvert-<version>-artifacts.tar.gz of dist folders, with a top-level MD5SUMS."""
    top = f"mzconvert-{version}-artifacts"
    entries = []  # (name in archive, path)
    for folder in sorted(folders):
        entries += [(f"{folder.name}/{p.name}", p) for p in check_md5sums(folder)]
        entries.append((f"{folder.name}/MD5SUMS", folder / "MD5SUMS"))
    md5sums = "".join(f"{file_digests(p, ('md5',))['md5']}  {name}\n" for name, p in sorted(entries))
    target = out_dir / f"{top}.tar.gz"
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(f"{top}/{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

            for name, path in sorted(entries):
                add(name, path.read_bytes())
            add("MD5SUMS", md5sums.encode())
    return target
