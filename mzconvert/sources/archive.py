"""Safe extraction of one member (a file, or every file under a folder) from a .tar.* or .zip.

Rules, the same for tar and zip: no absolute paths, no '..', no links of any kind, no device files;
only regular files and folders are written, and only below the destination. tarfile's `data`
filter enforces the same on tar; zip has no such filter, so the checks are ours. What is extracted
is bounded (MAX_EXTRACTED bytes, MAX_RATIO times the archive): a compression bomb is refused before
a byte is written, and a zip whose headers understate its sizes is stopped while it is copied.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import FetchError, short_text
from ..fsio import WRITE_ERRORS, explain_os_error, stream_digests

MAX_EXTRACTED = 8 << 30  # bytes: the largest model folders published are a few GiB
MAX_RATIO = 200  # extracted / archive size: model weights compress 1.1-3x, a bomb 1000x


def _check_name(label: str, name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if not path.parts or path.is_absolute() or ".." in path.parts:
        raise FetchError(f"{label}: refusing unsafe member path {name!r} (absolute or '..')")
    return path


def _wanted(path: PurePosixPath, member: str) -> bool:
    member_path = PurePosixPath(member.rstrip("/"))
    return path == member_path or member_path in path.parents


def _tar_members(label: str, tar: tarfile.TarFile, member: str) -> list[tarfile.TarInfo]:
    chosen = []
    for info in tar.getmembers():
        path = _check_name(label, info.name)
        if not _wanted(path, member):
            continue
        if info.issym() or info.islnk():
            raise FetchError(f"{label}: refusing link member {info.name!r} -> {info.linkname!r}")
        if not (info.isfile() or info.isdir()):
            raise FetchError(f"{label}: refusing special member {info.name!r} (device, fifo or other)")
        chosen.append(info)
    return chosen


def _zip_members(label: str, zf: zipfile.ZipFile, member: str) -> list[zipfile.ZipInfo]:
    chosen = []
    for info in zf.infolist():
        path = _check_name(label, info.filename)
        if not _wanted(path, member):
            continue
        mode = info.external_attr >> 16
        # No file-type bits at all (zipfile.writestr, Windows tools) means a plain file.
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise FetchError(f"{label}: refusing link or special member {info.filename!r}")
        chosen.append(info)
    return chosen


def _limit(archive: Path) -> int:
    return min(MAX_EXTRACTED, max(archive.stat().st_size, 1 << 20) * MAX_RATIO)


def _check_size(archive: Path, label: str, declared: int) -> None:
    if declared > _limit(archive):
        raise FetchError(f"{label}: refusing to extract {declared} bytes from a {archive.stat().st_size}-byte "
                         f"archive (more than {_limit(archive)}: a compression bomb?)")


def _copy_bounded(archive: Path, label: str, src, out, budget: int) -> int:
    """Copy src to out, failing once more than `budget` bytes came out; returns the bytes copied."""
    copied = 0
    while chunk := src.read(1 << 20):
        copied += len(chunk)
        if copied > budget:
            _check_size(archive, label, _limit(archive) + 1)
        out.write(chunk)
    return copied


def extract_member(archive: Path, member: str, dest: Path, shown: str | None = None) -> Path:
    """Extract `member` of `archive` (called `shown` in messages, e.g. its URL) below `dest`; returns
    dest/member. Raises FetchError if unsafe or absent, naming the archive as the user gave it and the member."""
    label = f"{shown or archive}, member {member}"
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = _zip_members(label, zf, member)
                _check_size(archive, label, sum(i.file_size for i in infos))
                budget = _limit(archive)
                for info in infos:
                    target = dest / info.filename
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as out:
                        budget -= _copy_bounded(archive, label, src, out, budget)
        else:
            with tarfile.open(archive) as tar:
                infos = _tar_members(label, tar, member)
                _check_size(archive, label, sum(i.size for i in infos))  # tar reads exactly the declared sizes
                # The data filter re-checks every rule above and strips permissions bits it dislikes.
                tar.extractall(dest, members=infos, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:  # our disk, not the archive
            raise explain_os_error(exc) from exc
        if isinstance(exc, tarfile.FilterError):
            raise FetchError(f"{label}: refusing unsafe member: {short_text(exc)}") from None
        raise FetchError(f"{shown or archive}: corrupt or unreadable archive: {short_text(exc)}") from None
    if not infos:
        models = [m["name"] for m in archive_members(archive) if "model" in m]
        raise FetchError(f"{shown or archive}: no member {member!r} in the archive; its model files: "
                         f"{', '.join(models[:12]) or 'none'}")
    return dest / member.rstrip("/")


# Files a model comes in, by suffix -> the recipe format (a SavedModel is its folder: see archive_members).
MODEL_SUFFIXES = {".pb": "tf-frozen-graph", ".onnx": "onnx", ".tflite": "tflite", ".pth": "torch", ".pt": "torch",
                  ".pt2": "torch-export",
                  ".keras": "keras", ".h5": "keras", ".hdf5": "keras", ".meta": "tf-checkpoint"}
MAX_HASHED_MEMBER = 4 << 30  # larger members are listed, not read


def archive_members(path: Path) -> list[dict]:
    """Every file of a tar, zip or wheel archive; model files marked with their format and sha256."""
    def digest(name: str, size: int, open_member) -> str | None:
        if Path(name).suffix not in MODEL_SUFFIXES or size > MAX_HASHED_MEMBER:
            return None
        with open_member() as stream:
            return stream_digests(stream)["sha256"]

    members = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            entries = [(i.filename, i.file_size, digest(i.filename, i.file_size, lambda i=i: zf.open(i)))
                       for i in zf.infolist() if not i.is_dir()]
    else:
        with tarfile.open(path) as tar:
            entries = [(i.name, i.size, digest(i.name, i.size, lambda i=i: tar.extractfile(i)))
                       for i in tar.getmembers() if i.isfile()]
    # A SavedModel or a checkpoint is one model, its folder (what a recipe's member names): not each file.
    folders = {name.rsplit("/", 1)[0] + "/" if "/" in name else "": kind for name, _, _ in entries
               for suffix, kind in (("saved_model.pb", "tf-saved-model"), (".meta", "tf-checkpoint"))
               if name.endswith(suffix)}
    for name, size, sha256 in entries:
        folder = next((f for f in folders if name.startswith(f)), None)
        if folder is not None:  # the folder's marker file stands for it; the rest are plain files
            kind = folders[folder] if name.endswith(("saved_model.pb", ".meta")) else None
            name, sha256 = (folder or "./") if kind else name, None
        else:
            kind = MODEL_SUFFIXES.get(Path(name).suffix)
        members.append({"name": name, "size": size, **({"model": kind} if kind else {}),
                        **({"sha256": sha256} if sha256 else {})})
    return members
