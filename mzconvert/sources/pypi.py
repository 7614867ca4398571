"""PyPI sources without pip: the exact file of `name==version` from the package index's simple API.

`pip download` builds an sdist's metadata by running its setup.py, i.e. code from the package's
author. Here the index page (PEP 503, the HTML every index serves) is read for the file of the pinned
version and its published sha256; the file is downloaded by the fetcher (cache, mirrors, resume,
checksum) and only ever opened as an archive. A wheel is preferred, an sdist is fine.
"""

from __future__ import annotations

import html.parser
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


@dataclass(frozen=True)
class PackageFile:
    filename: str
    url: str
    sha256: str


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


def choose(files: list[PackageFile], name: str, version: str) -> PackageFile:
    """The file of exactly `version`: a pure-Python wheel if there is one, else the sdist."""
    def name_version(filename: str) -> tuple[str, str]:
        if filename.endswith(".whl"):  # name-version(-build)-python-abi-platform.whl
            parts = filename[:-len(".whl")].split("-")
            return (parts[0], parts[1]) if len(parts) >= 5 else ("", "")
        base = re.sub(r"\.(tar\.gz|zip)$", "", filename)
        return tuple(base.rsplit("-", 1)) if base != filename and "-" in base else ("", "")

    def is_release(f: PackageFile) -> bool:
        found_name, found_version = name_version(f.filename)
        return _normalized(found_name) == _normalized(name) and found_version == version

    wheels = [f for f in files if is_release(f) and f.filename.endswith("-none-any.whl")]
    sdists = [f for f in files if is_release(f) and not f.filename.endswith(".whl")]
    found = (wheels or sdists)[:1]
    if not found:
        raise FetchError(f"pypi {name}=={version}: the index lists no pure-Python wheel or sdist of that version")
    if not re.fullmatch(r"[0-9a-f]{64}", found[0].sha256):
        raise FetchError(f"pypi {name}=={version}: the index publishes no sha256 for {found[0].filename}")
    return found[0]


def resolve(requirement: str) -> PackageFile:
    """The one file of a pinned requirement, as the index lists it."""
    name, version = pinned(requirement)
    page_url = f"{index_url()}{_normalized(name)}/"
    try:
        with urllib.request.urlopen(page_url, timeout=TIMEOUT_SECONDS) as response:
            page = response.read(16 << 20).decode("utf-8", errors="replace")
    except OSError as exc:
        raise FetchError(f"pypi {requirement}: cannot read the index page {page_url}: {short_text(exc)}") from None
    return choose(release_files(name, page, page_url), name, version)
