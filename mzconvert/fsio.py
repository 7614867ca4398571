"""File-system primitives every stage uses: atomic writes, hashing and per-folder locks."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BusyError, MzError, short_text

HASH_ALGORITHMS = ("sha256", "sha384", "md5")
_CHUNK = 1 << 20


def file_digests(path: Path, algorithms=("sha256",)) -> dict[str, str]:
    """Hex digests of one file for several algorithms, read once."""
    with open(path, "rb") as f:
        return stream_digests(f, algorithms)


def stream_digests(stream, algorithms=("sha256",)) -> dict[str, str]:
    """Hex digests of what a binary stream (a file, an archive member) holds, read once."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    while chunk := stream.read(_CHUNK):
        for h in hashers.values():
            h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def sha256_file(path: Path) -> str:
    return file_digests(path)["sha256"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The folders a user chose (--out, --build-dir, --cache-dir), so a full or read-only disk is named by the
# choice the user can change, not only by a file deep inside it.
_CHOSEN_FOLDERS: dict[Path, str] = {}
WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted"}


def name_folder(folder: Path, option: str) -> None:
    """Remember that the user chose `folder` with `option` (e.g. '--out')."""
    _CHOSEN_FOLDERS[Path(os.path.abspath(folder))] = option


def _chosen_folder(path: Path) -> tuple[Path, str] | None:
    path = Path(os.path.abspath(path))
    holders = [(folder, option) for folder, option in _CHOSEN_FOLDERS.items()
               if folder == path or folder in path.parents]
    return max(holders, key=lambda held: len(held[0].parts)) if holders else None


def explain_os_error(exc: OSError, target: Path | None = None) -> MzError:
    """One line for an OS error: the path that failed and, for a full, read-only or forbidden disk, the
    folder the user chose that it lies in. A failed copy names its destination, where the write failed."""
    path = target or (exc.filename2 if exc.errno in WRITE_ERRORS and exc.filename2 else exc.filename)
    what = WRITE_ERRORS.get(exc.errno) or exc.strerror or short_text(exc)
    if path is None:
        return MzError(what)
    held = _chosen_folder(Path(os.fsdecode(path))) if exc.errno in WRITE_ERRORS else None
    where = ""
    if held is not None:
        folder, option = held
        where = (f": the {option} folder {folder} is on a full disk; free space there or choose another {option}"
                 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
                 f": the {option} folder {folder} is not writable; choose another {option}")
    return MzError(f"{os.fsdecode(path)}: {what}{where}")


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success it is fsynced and renamed over `target`.

    On any failure the temp file is removed, so `target` is either its old content or the new one,
    never half of it.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise explain_os_error(exc, target) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise explain_os_error(exc, target) from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_bytes_atomic(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: Path, obj) -> None:
    write_bytes_atomic(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def copy_atomic(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def folder_lock(folder: Path, wait_seconds: float, on_wait: Callable[[str], None] | None = None,
                name: str = ".lock"):
    """An exclusive flock on `folder/<name>`, so two processes never write the same folder.

    Waits up to `wait_seconds` (0 = fail at once) and then fails naming the holder's pid.
    """
    lock_path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise explain_os_error(exc, lock_path) from exc
    deadline = time.monotonic() + wait_seconds
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if time.monotonic() >= deadline:
                    raise BusyError(f"{folder}: locked by another mzconvert process (pid {holder}); "
                                    "try again when it finishes or raise --lock-timeout") from None
                if on_wait and not announced:
                    on_wait(f"waiting for {folder} (locked by pid {holder})")
                    announced = True
                time.sleep(0.2)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        except OSError as exc:
            raise explain_os_error(exc, lock_path) from exc
        yield
    finally:
        os.close(fd)  # closing releases the flock


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def replace_folder(staging: Path, target: Path) -> None:
    """Swap a complete staging folder in for `target`. An existing target is exchanged with the staging
    folder in one atomic step, so at every instant `target` is the old folder or the new one; where the
    file system cannot exchange, two renames, and `recover_folder` puts the old one back after a kill."""
    os.chmod(staging, 0o755)  # mkdtemp made it private
    if target.exists() and _exchange(staging, target):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}@old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_folder(target: Path) -> None:
    """After a kill between the two renames of replace_folder: the old folder goes back under its name."""
    if target.exists():
        return
    olds = sorted(target.parent.glob(f".{target.name}@old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], target)
