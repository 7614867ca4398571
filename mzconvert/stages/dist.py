"""dist/<recipe>/: the release artifacts of one recipe, with MD5SUMS and manifest.json.

The folder is assembled in a staging folder and swapped in whole, so a reader never sees a mix of
two builds. Nothing time-dependent goes into it: two builds of the same inputs are byte-identical.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..console import Console
from ..errors import EXIT_BAD_INPUT, MzError
from ..fsio import atomic_path, file_digests, replace_folder, sha256_bytes, write_bytes_atomic
from ..manifest import Manifest, read_manifest, write_manifest
from ..recipe import Recipe


def write_md5sums(folder: Path) -> Path:
    """MD5SUMS of every file below `folder`, as `md5sum -c` accepts it (two spaces, text mode), sorted by name."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder) != Path("MD5SUMS"))
    lines = [f"{file_digests(f, ('md5',))['md5']}  {f.relative_to(folder).as_posix()}\n" for f in files]
    target = folder / "MD5SUMS"
    write_bytes_atomic(target, "".join(lines).encode())
    return target


def assemble(recipe: Recipe, per_variant: dict, versions: dict, out_root: Path, console: Console,
             source_pipeline: dict | None = None, refused: dict[str, str] | None = None) -> dict:
    """per_variant: variant name -> {"chain": [fetch, freeze, strip outcomes], "quantize", "verify", "vela"}.
    refused: variant name -> the floors it missed, or why it could not be made; not shipped, and not kept from
    an older dist."""
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{recipe.name}@", dir=out_root))
    try:
        strips = {id(v["chain"][-1]): v["chain"][-1] for v in per_variant.values()}.values()
        copies: list[tuple[Path, str]] = [(s.folder / extra, extra)
                                          for s in strips for extra in s.result.get("extras", [])]
        anchors = next((s.result["anchors"] for s in strips if "anchors" in s.result), {})
        fetched = {v["chain"][0].result["model"] for v in per_variant.values()}
        variants = {}
        for name, stages in per_variant.items():
            quantized = stages["quantize"]
            entry = {"source_file": stages["chain"][0].result["model"], "mode": quantized.result["mode"],
                     "io_dtype": quantized.result["io_dtype"],
                     "file": quantized.result["model"], "inputs": quantized.result["inputs"],
                     "outputs": quantized.result["outputs"],
                     "postprocess_attached": "raw_model" in quantized.result}
            copies.append((quantized.path("model"), quantized.result["model"]))
            if "tuned" in quantized.result:  # tune_steps: the output error before and after, whether kept
                entry["tuned"] = quantized.result["tuned"]
            if "search" in stages:  # max_drop: the layers kept float, and what each candidate measured
                entry["search"] = stages["search"].result["search"]
            if "ranges" in stages:  # calibration_method auto: the method chosen, and what each measured
                entry["ranges"] = stages["ranges"].result["ranges"]
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
        target = out_root / recipe.name
        old_manifest = read_manifest(target)
        built = set(variants) | set(refused or {})
        for name, entry in _kept_variants(recipe, built, old_manifest, target, console).items():
            variants[name] = entry
            copies += [(target / f, f) for f in _variant_files(entry)]
        variants = {v.name: variants[v.name] for v in recipe.variants if v.name in variants}  # recipe order
        if recipe.postprocess is not None:
            (staging / "labels.txt").write_text("".join(f"{label}\n" for label in recipe.postprocess.labels))
        for source, name in copies:
            shutil.copyfile(source, staging / name)
        artifacts = {}
        for path in sorted(p for p in staging.iterdir() if p.is_file()):
            digests = file_digests(path, ("md5", "sha256"))
            artifacts[path.name] = {"size": path.stat().st_size, **digests}
        manifest: Manifest = {
            "recipe": recipe.name,
            "recipe_sha256": recipe.text_sha256,
            "task": recipe.task,
            "source": {"files": sorted(fetched), **recipe.source.checksums,
                       "size": recipe.source.size, "url": recipe.source.url, "pypi": recipe.source.pypi},
            "input": {"name": recipe.input.name, "shape": list(recipe.input.shape), "layout": recipe.input.layout,
                      "preprocess": recipe.raw.get("preprocess")},
            "postprocess": anchors | ({"labels": list(recipe.postprocess.labels)} if recipe.postprocess else {}),
            "variants": variants,
            "variant_order": list(variants),  # JSON files are written with sorted keys; rows follow the recipe
            **({"source_pipeline_fidelity": source_pipeline} if source_pipeline else {}),
            **({"refused": refused} if refused else {}),  # what the recipe asked for and this build did not ship
            "artifacts": artifacts,
            "tools": versions,
        }
        write_manifest(staging, manifest)
        _keep_measurements(target, staging, artifacts, console, recipe.name)
        write_md5sums(staging)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.log(f"[{recipe.name}] wrote {target}/ ({len(artifacts) + 2} files, MD5SUMS and manifest.json)")
    return manifest


def _variant_files(entry: dict) -> list[str]:
    """The dist files of one variant: its model and, per NPU target, the vela model and summary."""
    return [entry["file"]] + [f for v in entry.get("vela", {}).values() for f in (v["file"], v["summary_csv"])]


def _kept_variants(recipe: Recipe, built: set[str], old: dict | None, folder: Path, console: Console) -> dict:
    """Variants of the recipe that this build did not touch (build --variant) and whose files in the
    current dist still match their manifest: they stay, byte for byte."""
    kept = {}
    for variant in recipe.variants:
        entry = (old or {}).get("variants", {}).get(variant.name)
        if variant.name in built or entry is None:
            continue
        files = _variant_files(entry)
        intact = all((folder / f).is_file() and f in old["artifacts"]
                     and file_digests(folder / f, ("md5",))["md5"] == old["artifacts"][f]["md5"] for f in files)
        if intact:
            kept[variant.name] = entry
        else:
            console.log(f"[{recipe.name}] dropped variant {variant.name} from dist: its files no longer match MD5SUMS")
    return kept


# Measurements taken on a dist: each records the sha256 of the artifacts it measured ("artifacts"), and
# stays across rebuilds while those bytes are unchanged. The report's own files go with report.json.
MEASUREMENTS = ("eval/*.json", "bench.json", "debug/*.json", "report.json")
REPORT_FILES = ("report.md", "accuracy.png", "latency.png", "accuracy_vs_size.png", "predictions/*.png")


def _keep_measurements(folder: Path, staging: Path, artifacts: dict, console: Console, name: str) -> None:
    if not folder.is_dir():
        return
    for pattern in MEASUREMENTS:
        for path in sorted(folder.glob(pattern)):
            try:
                measured = json.loads(path.read_text()).get("artifacts", {})
            except (OSError, ValueError, AttributeError):
                measured = None
            changed = sorted(f for f, digest in (measured or {}).items()
                             if artifacts.get(f, {}).get("sha256") != digest) if measured is not None else ["?"]
            relative = path.relative_to(folder)
            if changed or not measured:
                console.log(f"[{name}] dropped {relative}: measured on artifacts that changed "
                            f"({', '.join(changed) or 'none recorded'})")
                continue
            kept = [relative] + ([Path(p.relative_to(folder)) for r in REPORT_FILES for p in folder.glob(r)]
                                 if pattern == "report.json" else [])
            if (folder / relative.with_suffix(".png")).is_file():  # its picture (debug/<variant>.png)
                kept.append(relative.with_suffix(".png"))
            for file in kept:
                (staging / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / file, staging / file)


def check_md5sums(folder: Path) -> list[Path]:
    """The files MD5SUMS lists, each re-hashed; a mismatch or a missing file is an error."""
    listing = folder / "MD5SUMS"
    if not listing.is_file():
        raise MzError(f"{folder}: no MD5SUMS; build it with mzconvert build {folder.name}")
    files = []
    for number, line in enumerate(listing.read_text(errors="replace").splitlines(), 1):
        digest, _, name = line.partition("  ")
        relative = Path(name)
        if len(digest) != 32 or not name or relative.is_absolute() or ".." in relative.parts:
            raise MzError(f"{listing}:{number}: expected '<md5>  <file inside {folder.name}>', got {line[:80]!r}",
                          EXIT_BAD_INPUT)
        path = folder / relative
        if not path.is_file() or file_digests(path, ("md5",))["md5"] != digest:
            raise MzError(f"{path}: does not match MD5SUMS; refusing to release a corrupt artifact")
        files.append(path)
    return files


def release(folders: list[Path], out_dir: Path, version: str) -> Path:
    """One reproducible mzconvert-<version>-<recipes>-<digest>.tar.gz of dist folders, with a top-level MD5SUMS.
    The name says what is in it, so releases of other recipes or other builds never overwrite each other."""
    entries = []  # (name in archive, path)
    for folder in sorted(folders):
        entries += [(f"{folder.name}/{p.relative_to(folder).as_posix()}", p) for p in check_md5sums(folder)]
        entries.append((f"{folder.name}/MD5SUMS", folder / "MD5SUMS"))
    md5sums = "".join(f"{file_digests(p, ('md5',))['md5']}  {name}\n" for name, p in sorted(entries))
    names = sorted(f.name for f in folders)
    what = names[0] if len(names) == 1 else f"{len(names)}-recipes"
    top = f"mzconvert-{version}-{what}-{sha256_bytes(md5sums.encode())[:12]}"
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
