"""Issue 3: wall time of `make all` serial vs `make -j2 all`, and of a no-op rebuild.

Each timed run builds every buildable recipe from scratch into its own temporary build/dist folders
(the download cache stays warm, so fetching is not measured). Usage: .venv/bin/python bench/make_all.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make(jobs: int, folder: Path) -> float:
    args = f"--out {folder / 'dist'} --build-dir {folder / 'build'}"
    start = time.perf_counter()
    result = subprocess.run(["make", f"-j{jobs}", "all", f"BUILD_ARGS={args}"], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(result.stderr[-2000:])
    return time.perf_counter() - start


def main() -> None:
    buildable = subprocess.run(["make", "-s", "--eval=print-buildable:; @echo $(BUILDABLE)", "print-buildable"],
                               cwd=ROOT, capture_output=True, text=True).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make(1, tmp / "warm")  # fills the cache and the venv; not reported
        serial = make(1, tmp / "serial")
        parallel = make(2, tmp / "parallel")
        noop_make = make(2, tmp / "parallel")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mzconvert.cli", "--quiet", "build", "pedestrian-ssdlite",
                        "--out", str(tmp / "parallel" / "dist"), "--build-dir", str(tmp / "parallel" / "build")],
                       cwd=ROOT, check=True, capture_output=True)
        noop_one = time.perf_counter() - start
    print(f"make all over {len(buildable)} recipes ({', '.join(buildable)}), clean build folders, warm cache:")
    print(f"  serial    make all      {serial:7.1f} s")
    print(f"  parallel  make -j2 all  {parallel:7.1f} s   speed-up {serial / parallel:.2f}x (2 cores)")
    print(f"  no-op     make -j2 all  {noop_make:7.2f} s")
    print(f"  no-op     mzconvert build pedestrian-ssdlite  {noop_one:5.2f} s")


if __name__ == "__main__":
    main()
