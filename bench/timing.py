"""What the bench scripts share: timing one command, in a fresh process, that must succeed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str], cwd: Path = ROOT) -> float:
    """Seconds `command` took; a failure ends the bench with the command's last output."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{result.stderr[-2000:]}")
    return time.perf_counter() - start
