"""Real fetch and build processes killed at random points (fixed seed, bounded count).

After every kill: the cache holds only verified files, every stamped stage is complete, and a dist
folder is either absent or passes `md5sum -c`. The run after the last kill finishes and produces
exactly the bytes of an uninterrupted build.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MIRROR, ROOT
from tests.tiny_graphs import tiny_recipe_text, write_tiny_detector

pytestmark = pytest.mark.slow
SEED = 20261123
KILLS = 4


def start_cli(*args: str) -> subprocess.Popen:
    env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen([sys.executable, "-m", "mzconvert.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_after(process: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the process group after `seconds`; False if it had already finished."""
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return True


def assert_cache_holds_only_verified_files(cache: Path) -> None:
    for path in cache.rglob("*"):
        if not path.is_file():
            continue
        relative = path.relative_to(cache)
        if relative.parts[0] in ("partial", "locks", "tmp"):
            continue  # resumable downloads, lock files, scratch: never served as cache hits
        algo, digest = relative.parts
        assert hashlib.new(algo, path.read_bytes()).hexdigest() == digest, f"unverified cache entry {relative}"


def test_killed_downloads_never_leave_an_unverified_cache_entry(tmp_path, http_server):
    payload = os.urandom(8 << 20)
    digest = hashlib.sha256(payload).hexdigest()
    http_server.files["/zoo/model.pb"] = payload
    http_server.chunk_delay = 0.03  # 128 chunks: about 4 s per full download
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(Path("/x.pb"), digest).replace("file:///x.pb", http_server.url + "/zoo/model.pb"))
    cache = tmp_path / "cache"
    rng = random.Random(SEED)
    killed = 0
    for _ in range(KILLS):
        process = start_cli("--quiet", "--cache-dir", str(cache), "fetch", str(recipe))
        killed += kill_after(process, rng.uniform(0.4, 1.2))  # each run gets part of the way
        assert_cache_holds_only_verified_files(cache)
    assert killed >= 2
    done = start_cli("--quiet", "--cache-dir", str(cache), "fetch", str(recipe))
    assert done.wait(timeout=120) == 0, done.stderr.read()
    assert (cache / "sha256" / digest).read_bytes() == payload
    assert any(r for _, r in http_server.requests), "no download was resumed with a Range request"
    assert_cache_holds_only_verified_files(cache)


def md5sums(folder: Path) -> dict[str, str]:
    return dict(reversed(line.split("  ", 1)) for line in (folder / "MD5SUMS").read_text().splitlines())


def assert_build_consistent(build: Path, dist: Path) -> None:
    for stamp in build.rglob("stamp.json"):
        result = json.loads((stamp.parent / "result.json").read_text())
        for relative, digest in result["files"].items():
            assert hashlib.sha256((stamp.parent / relative).read_bytes()).hexdigest() == digest
    if dist.exists():
        check = subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=dist, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


def test_killed_builds_keep_artifacts_intact_and_resume(tmp_path):
    if not MIRROR.is_dir():
        pytest.skip("needs the mirror's real images for calibration")
    graph = write_tiny_detector(tmp_path / "graph")["frozen"]
    images = MIRROR / "coco"
    variants = (f"  - {{name: f32, mode: float32}}\n  - {{name: f16, mode: float16}}\n"
                f"  - {{name: i8, mode: int8, calibration: {images / 'train2017'}, calibration_count: 6}}\n")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(graph, hashlib.sha256(graph.read_bytes()).hexdigest(), variants=variants,
                                       images=images / "val2017") + "  count: 3\n")

    def build(folder: Path) -> subprocess.Popen:
        return start_cli("--cache-dir", str(tmp_path / "cache"), "build", str(recipe),
                         "--out", str(folder / "dist"), "--build-dir", str(folder / "build"))

    reference = build(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read()
    expected = md5sums(tmp_path / "reference" / "dist" / "tiny")

    rng = random.Random(SEED)
    work = tmp_path / "killed"
    for _ in range(KILLS):
        kill_after(build(work), rng.uniform(1.0, 9.0))
        assert_build_consistent(work / "build" / "tiny", work / "dist" / "tiny")
    stamped = {p.parent.relative_to(work / "build" / "tiny") for p in (work / "build" / "tiny").rglob("stamp.json")}

    final = build(work)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    log = final.stderr.read()
    for stage in stamped:  # what a killed run finished is not done again
        assert f"] {stage}: up to date" in log, (stage, log)
    assert md5sums(work / "dist" / "tiny") == expected
    assert not [p for p in (work / "build" / "tiny").rglob(".*") if p.is_dir() and p.name != ".lock"]


def test_two_builds_of_one_recipe_never_interleave(tmp_path):
    graph = write_tiny_detector(tmp_path / "graph")["frozen"]
    digest = hashlib.sha256(graph.read_bytes()).hexdigest()
    for name in ("tiny", "tiny2"):
        (tmp_path / f"{name}.yaml").write_text(tiny_recipe_text(graph, digest, name=name))
    common = ["--cache-dir", str(tmp_path / "cache"), "build"]
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]

    first = start_cli(*common, str(tmp_path / "tiny.yaml"), *where)
    deadline = time.monotonic() + 60
    while not (tmp_path / "build" / "tiny" / ".lock").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    busy = start_cli("--quiet", *common, str(tmp_path / "tiny.yaml"), *where, "--lock-timeout", "0")
    other = start_cli(*common, str(tmp_path / "tiny2.yaml"), *where)  # another recipe: runs alongside
    waiter = start_cli(*common, str(tmp_path / "tiny.yaml"), *where)  # waits for the lock, then finds all done
    assert busy.wait(timeout=120) == 4
    assert "locked by another mzconvert process (pid" in busy.stderr.read()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert other.wait(timeout=300) == 0, other.stderr.read()
    assert waiter.wait(timeout=300) == 0
    waited = waiter.stderr.read()
    assert ": running" not in waited and "up to date" in waited
    for name in ("tiny", "tiny2"):
        check = subprocess.run(["md5sum", "-c", "--quiet", "MD5SUMS"], cwd=tmp_path / "dist" / name)
        assert check.returncode == 0
