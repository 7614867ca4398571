"""Write safety (disk full, read-only) and a static scan for shell strings, eval and unsafe loaders."""

from __future__ import annotations

import ast
import errno
import shutil
from pathlib import Path

import pytest

from mzconvert.errors import MzError
from mzconvert.fsio import atomic_path, copy_atomic, write_bytes_atomic
from tests.conftest import ROOT, run_cli


def failing(code):
    def raise_(*args, **kwargs):
        raise OSError(code, {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system"}[code])
    return raise_


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "no space left on device"),
                                           (errno.EROFS, "read-only file system")])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, code, message):
    target = tmp_path / "model.tflite"
    target.write_bytes(b"previous artifact")
    source = tmp_path / "new.bin"
    source.write_bytes(b"x" * 1000)
    monkeypatch.setattr(shutil, "copyfile", failing(code))
    with pytest.raises(MzError, match=message):
        copy_atomic(source, target)
    assert target.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.tflite", "new.bin"]


def test_interrupted_write_is_rolled_back(tmp_path):
    target = tmp_path / "manifest.json"
    write_bytes_atomic(target, b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_unwritable_output_folder_is_one_clear_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    result = run_cli("--quiet", "--cache-dir", str(blocker / "cache"), "fetch", "pedestrian-ssdlite")
    assert result.returncode != 0
    assert result.stderr.startswith("mzconvert: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def package_sources():
    return sorted((ROOT / "mzconvert").rglob("*.py"))


@pytest.mark.parametrize("path", package_sources(), ids=lambda p: p.name)
def test_no_shell_strings_eval_or_unsafe_loaders(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name):  # the builtins, not methods such as torch's Module.eval()
                assert func.id not in ("eval", "exec"), f"{path}:{node.lineno}: {func.id}()"
            if isinstance(func, ast.Attribute):
                owner = getattr(func.value, "id", "")
                assert (owner, func.attr) not in (("os", "system"), ("os", "popen")), f"{path}:{node.lineno}"
                if func.attr == "load" and owner in ("yaml", "pickle"):
                    raise AssertionError(f"{path}:{node.lineno}: {owner}.load (use yaml.safe_load; never unpickle)")
                if func.attr == "load" and owner == "torch":
                    flag = keywords.get("weights_only")
                    assert isinstance(flag, ast.Constant) and flag.value is True, f"{path}:{node.lineno}: torch.load"
            assert "shell" not in keywords, f"{path}:{node.lineno}: shell= passed to a subprocess"
            if "allow_pickle" in keywords:
                assert isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(m.split(".")[0] in ("pickle", "marshal", "shelve") for m in modules), path
