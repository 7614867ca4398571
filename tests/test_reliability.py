"""Every message true and pointing at the right thing: one error per real problem, full disks named by the
folder the user chose, archive refusals by the source as written, one member convention for inspect, init
and build, and the libraries' log lines kept off the terminal."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import onnx
import pytest

from mzconvert.errors import EXIT_FAILURE, MzError
from tests.conftest import MIRROR, ROOT, run_cli
from tests.test_exit_codes import classifier_recipe, fill_disk
from tests.test_onnx_backend import tiny_onnx
from tests.tiny_graphs import tiny_recipe_text, write_tiny_detector

PEDESTRIAN = (ROOT / "recipes" / "pedestrian-ssdlite.yaml").read_text()
# A field other sections depend on, broken: only its own line may be reported.
BROKEN = {
    "input shape rank 5": ("[1, 300, 300, 3]", "[1, 300, 300, 3, 1]", "input.shape: expected 4 items"),
    "input shape zero": ("[1, 300, 300, 3]", "[1, 0, 300, 3]", "input.shape[1]"),
    "input shape negative": ("[1, 300, 300, 3]", "[1, -3, 300, 3]", "input.shape[1]"),
    "input dtype": ("dtype: float32", "dtype: uint8", "input.dtype"),
    "input layout": ("layout: NHWC", "layout: NWHC", "input.layout"),
    "input missing": ("\ninput:", "\ninput_:", "input_"),
    "format": ("format: tf-frozen-graph", "format: pb", "format:"),
    "task": ("task: detection", "task: detect", "task:"),
    "strip": ("outputs: [concat, concat_1]", "outputs: 7", "strip.outputs"),
    "postprocess kind": ("kind: ssd", "kind: yolo9", "postprocess.kind"),
}


def without_strip(text: str) -> str:
    """The recipe as a source without a cut would have it (a .tflite detector's, a YOLO export's)."""
    start = text.index("strip:")
    return text[:start] + text[text.index("postprocess:"):]


@pytest.mark.parametrize("shape", ["with strip", "without strip"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_field_is_reported_once_and_nothing_that_follows_from_it(case, shape, tmp_path):
    old, new, expected = BROKEN[case]
    if shape == "without strip" and case == "strip":
        pytest.skip("no strip to break")
    text = PEDESTRIAN if shape == "with strip" else without_strip(PEDESTRIAN)
    assert old in text
    (tmp_path / "pedestrian-ssdlite.yaml").write_text(text.replace(old, new, 1))
    done = run_cli("show", str(tmp_path / "pedestrian-ssdlite.yaml"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("mzconvert: error:")]
    assert done.returncode == 2
    assert len(errors) == 1 + (case == "input missing"), errors  # + "input: missing required field"
    assert expected in errors[0]
    assert not any("postprocess" in e for e in errors) or case == "postprocess kind"


@pytest.fixture
def full_tmpfs(tmp_path):
    mounted = []

    def mount(folder: Path) -> Path:
        folder.mkdir(parents=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(folder)],
                          capture_output=True).returncode:
            pytest.skip("mounting a small tmpfs needs root")
        mounted.append(folder)
        fill_disk(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("option", ["--out", "--build-dir", "--cache-dir"])
def test_a_full_disk_names_the_folder_the_user_chose(option, tmp_path, full_tmpfs, mirror):
    recipe = classifier_recipe(tmp_path, "  - {name: float32, mode: float32}\n")
    folders = {"--out": tmp_path / "dist", "--build-dir": tmp_path / "build", "--cache-dir": tmp_path / "cache"}
    full = full_tmpfs(folders[option] / "on-a-small-disk")
    folders[option] = full
    done = run_cli("--cache-dir", str(folders["--cache-dir"]), "build", str(recipe),
                   "--out", str(folders["--out"]), "--build-dir", str(folders["--build-dir"]))
    errors = [line for line in done.stderr.splitlines() if line.startswith("mzconvert: error:")]
    assert done.returncode == EXIT_FAILURE and len(errors) == 1, done.stderr[-2000:]
    assert f"the {option} folder {full} is on a full disk" in errors[0]
    left = [p.name for p in full.rglob("*") if p.is_file() and p.stat().st_size and p.name != "filler"]
    assert left == [], left  # nothing half-written


def test_the_folder_named_is_the_innermost_the_user_chose(tmp_path):
    import errno

    from mzconvert.fsio import explain_os_error, name_folder

    name_folder(tmp_path, "--build-dir")
    name_folder(tmp_path / "dist", "--out")
    exc = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "build" / "x.tflite"),
                  None, str(tmp_path / "dist" / "x.tflite"))  # a copy names its source first, its target second
    message = str(explain_os_error(exc))
    assert message.startswith(f"{tmp_path / 'dist' / 'x.tflite'}: no space left on device: the --out folder")
    assert "read-only" in str(explain_os_error(OSError(errno.EROFS, "Read-only", str(tmp_path / "y"))))


def sdist(name: str, members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member, data in {f"{name}/PKG-INFO": b"Metadata-Version: 2.1\n", **members}.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def serve_release(http_server, package: bytes, filename: str = "tinymodels-1.0.tar.gz") -> dict:
    http_server.files[f"/packages/{filename}"] = package
    http_server.files["/simple/tinymodels/"] = (
        f'<a href="/packages/{filename}#sha256={hashlib.sha256(package).hexdigest()}">{filename}</a>').encode()
    return {"MZCONVERT_INDEX_URL": http_server.url + "/simple"}


def test_inspect_init_and_build_agree_on_an_sdist_member_and_init_takes_its_only_model(tmp_path, http_server):
    model = tiny_onnx(tmp_path / "m.onnx").read_bytes()
    env = serve_release(http_server, sdist("tinymodels-1.0", {"tinymodels-1.0/setup.py": b"raise SystemExit",
                                                              "tinymodels-1.0/tinymodels/files/model.onnx": model}))
    listed = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "inspect", "pypi:tinymodels==1.0", env=env)
    shown = [m["name"] for m in json.loads(listed.stdout)["members"] if "model" in m]
    assert shown == ["tinymodels-1.0/tinymodels/files/model.onnx"]
    # the member as inspect shows it, and init's own choice of the only model file: both build
    for name, member in (("given", shown), ("chosen", [])):
        made = run_cli("--cache-dir", str(tmp_path / "c"), "init", name, "--from", "pypi:tinymodels==1.0",
                       *(["--member", member[0]] if member else []), "--to", str(tmp_path), env=env)
        assert made.returncode == 0, made.stderr[-2000:]
        if not member:
            assert "holds one model file, tinymodels-1.0/tinymodels/files/model.onnx: using it" in made.stderr
        assert "member: tinymodels-1.0/tinymodels/files/model.onnx" in (tmp_path / f"{name}.yaml").read_text()
        done = run_cli("--cache-dir", str(tmp_path / f"c-{name}"), "freeze", str(tmp_path / f"{name}.yaml"),
                       "--build-dir", str(tmp_path / f"b-{name}"), env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    # an older recipe's member without the sdist's top folder still names the same file
    text = (tmp_path / "given.yaml").read_text().replace("member: tinymodels-1.0/", "member: ")
    (tmp_path / "older.yaml").write_text(text.replace("name: given", "name: older"))
    done = run_cli("--cache-dir", str(tmp_path / "c-older"), "fetch", str(tmp_path / "older.yaml"), env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_an_archive_refusal_names_the_source_as_written_and_the_member(tmp_path):
    bomb = io.BytesIO()
    with tarfile.open(fileobj=bomb, mode="w:gz") as tar:
        info = tarfile.TarInfo("pkg/model.pb")
        info.size = 1 << 30
        tar.addfile(info, io.BytesIO(b"\0" * (1 << 30)))
    archive = tmp_path / "models.tar.gz"
    archive.write_bytes(bomb.getvalue())
    url = archive.as_uri()
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(tiny_recipe_text(archive, hashlib.sha256(archive.read_bytes()).hexdigest())
                      .replace("name: tiny", "name: bomb").replace(f"url: {url}", f"url: {url}\n  member: pkg/model.pb"))
    done = run_cli("--cache-dir", str(tmp_path / "c"), "freeze", str(recipe), "--build-dir", str(tmp_path / "b"))
    assert done.returncode == 3, done.stderr
    assert f"{url}, member pkg/model.pb: refusing to extract 1073741824 bytes" in done.stderr
    assert "cache" not in done.stderr.split("refusing")[0]


def test_library_log_lines_stay_off_the_terminal_unless_verbose(tmp_path):
    model = write_tiny_detector(tmp_path / "graphs")["frozen"]
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(model, hashlib.sha256(model.read_bytes()).hexdigest(),
                                       variants="  - {name: f32, mode: float32}\n"  # the converter's own lines:
                                       f"  - {{name: i8, mode: int8, calibration: {MIRROR / 'coco' / 'train2017'}, "
                                       "calibration_count: 4}\n"))
    args = ["--cache-dir", str(tmp_path / "c"), "build", str(recipe), "--out", str(tmp_path / "d"),
            "--build-dir", str(tmp_path / "b")]
    env = {"TF_CPP_MIN_LOG_LEVEL": "0"}  # what a user's shell has: nothing set
    plain = run_cli(*args, env=env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    lines = plain.stderr.splitlines()
    assert lines and not [line for line in lines if not line.startswith(("[tiny]", "  "))], lines
    loud = run_cli("--verbose", *args, "--force", env=env)
    assert loud.returncode == 0 and any(line.startswith("INFO: ") for line in loud.stderr.splitlines())


def test_an_opset_the_version_converter_cannot_raise_is_a_failed_conversion(tmp_path, monkeypatch):
    from onnx import version_converter

    from mzconvert.backends.onnx import _at_least_opset

    def cannot(model, opset):
        raise RuntimeError("No Adapter For Upsample")

    monkeypatch.setattr(version_converter, "convert_version", cannot)
    model = onnx.load(str(tiny_onnx(tmp_path / "m.onnx")))
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", 9))
    with pytest.raises(MzError) as failed:
        _at_least_opset(model, 13, tmp_path / "m.onnx")
    assert failed.value.exit_code == EXIT_FAILURE and "No Adapter For Upsample" in str(failed.value)


def test_vela_of_a_variant_the_npu_cannot_run_says_so(tmp_path, mirror):
    text = PEDESTRIAN
    (tmp_path / "pedestrian-ssdlite.yaml").write_text(text)
    done = run_cli("--mirror", str(MIRROR), "--cache-dir", str(tmp_path / "c"), "vela",
                   str(tmp_path / "pedestrian-ssdlite.yaml"), "--variant", "float32", "--build-dir",
                   str(tmp_path / "b"))
    assert done.returncode == 2 and "float32 is none; the vela stage has nothing to compile" in done.stderr
    assert not (tmp_path / "b").exists()  # said before building anything


def test_a_stage_made_by_other_code_is_made_again(tmp_path):
    """Every stage's key holds the tool versions, and mzconvert's is its code: a build folder made by a checkout
    or an edit that kept the version string is not taken as this code's."""
    import shutil

    import mzconvert
    from mzconvert.planner import code_digest, tool_versions

    package = Path(mzconvert.__file__).parent
    copy = tmp_path / "mzconvert"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_digest(copy) == code_digest(package) == tool_versions()["mzconvert code"]
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "build.cpython-311.pyc").write_bytes(b"bytecode")  # made by running, not code
    assert code_digest(copy) == code_digest(package)
    (copy / "stages" / "verify.py").write_text((copy / "stages" / "verify.py").read_text() + "\n# an edit\n")
    assert code_digest(copy) != code_digest(package)
    (copy / "stages" / "verify.py").rename(copy / "verify.py")  # the same file elsewhere: other code
    assert code_digest(copy) != code_digest(package)
