"""What the bench scripts share: timing one command in a fresh process, and an earlier commit to compare with."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "95fbe41"  # the last commit before the work of issue 13 (calibrate once, one reference pass)


def baseline_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with")
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    return parser.parse_args()


@contextlib.contextmanager
def baseline_checkout(revision: str, folder: Path) -> Iterator[Path]:
    """A `git worktree` of `revision` at `folder`, removed afterwards. It gets today's image sets: the
    baseline's name images the cleaned mirror no longer has (same content rule, same counts)."""
    subprocess.run(["git", "worktree", "add", "--detach", str(folder), revision], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        for image_set in (ROOT / "calibration").glob("*.yaml"):
            shutil.copy(image_set, folder / "calibration")
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT, capture_output=True)


def timed(command: list[str], cwd: Path = ROOT) -> float:
    """Seconds `command` took; a failure ends the bench with the command's last output."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start
