"""What the CLI prints: progress and messages on stderr (silenced by --quiet), results on stdout."""

from __future__ import annotations

import io
import json
import os
import sys
import time


def silence_native_output() -> None:
    """Native libraries (TensorFlow's C++ logging, the TFLite converter) write to file descriptors 1
    and 2 themselves, past Python's sys.stdout/sys.stderr. For --quiet and --json, fds 1 and 2 go to
    /dev/null and Python's streams keep the original outputs: only what mzconvert prints is seen."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = getattr(sys, name)
        stream.flush()
        kept = os.dup(fd)
        sink = os.open(os.devnull, os.O_WRONLY)
        os.dup2(sink, fd)
        os.close(sink)
        setattr(sys, name, io.TextIOWrapper(os.fdopen(kept, "wb"), encoding=stream.encoding or "utf-8",
                                            errors="backslashreplace", line_buffering=True))


class Console:
    def __init__(self, quiet: bool = False, json_output: bool = False):
        self.quiet = quiet
        self.json_output = json_output
        self._last_progress = 0.0
        if quiet or json_output:
            silence_native_output()
        self._tty = sys.stderr.isatty()
        self._out = sys.stdout
        if json_output:  # libraries that print (exporters, quantizers) must not corrupt the JSON
            sys.stdout = sys.stderr

    def log(self, message: str) -> None:
        if not self.quiet:  # one write per line: build -j logs from several threads
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def progress(self, label: str, done: int, total: int | None) -> None:
        """A download progress line, redrawn at most 5 times a second."""
        if self.quiet:
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if now - self._last_progress < 0.2 and not finished:
            return
        self._last_progress = now
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
        percent = f" {100 * done / total:5.1f}%" if total else ""
        end = "\n" if finished or not self._tty else "\r"
        print(f"  {label}: {size}{percent}", end=end, file=sys.stderr, flush=True)

    def result(self, payload, text: str | None = None) -> None:
        """The command's result: JSON with --json (or when there is no text form), else the text."""
        if self.json_output or text is None:
            print(json.dumps(payload, indent=2, default=str), file=self._out)
        else:
            print(text, file=self._out)
