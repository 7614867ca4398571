"""Installed from a wheel (not editable, not a checkout), mzconvert finds its shipped recipes and image sets."""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys

from tests.conftest import ROOT


def test_a_wheel_install_finds_the_shipped_recipes_and_image_sets(tmp_path):
    source = tmp_path / "source"  # a copy: building a wheel writes build/ into the tree it builds
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheels"), str(source)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheel = next((tmp_path / "wheels").glob("mzconvert-*.whl"))
    subprocess.run([venv / "bin" / "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True)
    # The dependencies (TensorFlow & co.) come from this environment's site-packages, added as plain paths:
    # the editable install of the checkout there is not activated, so only the wheel's mzconvert is seen.
    packages = next(venv.glob("lib/python*/site-packages"))
    (packages / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def mzconvert(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([venv / "bin" / "mzconvert", *args], capture_output=True, text=True, cwd=elsewhere)

    where = subprocess.run([venv / "bin" / "python", "-c", "import mzconvert; print(mzconvert.__file__)"],
                           capture_output=True, text=True, cwd=elsewhere)
    assert where.stdout.startswith(str(packages)), where.stdout + where.stderr
    listed = mzconvert("--json", "list")
    assert listed.returncode == 0, listed.stderr
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert [row["name"] for row in json.loads(listed.stdout)] == shipped
    assert all("error" not in row for row in json.loads(listed.stdout))  # their image sets resolve too
    valid = mzconvert("validate")
    assert valid.returncode == 0, valid.stderr
    sets = subprocess.run([venv / "bin" / "python", "-c", "from mzconvert.sources.imagesets import load_image_set; "
                           "print(load_image_set('coco-train2017-100').count(100))"],
                          capture_output=True, text=True, cwd=elsewhere)
    assert sets.stdout.strip() == "100", sets.stderr
