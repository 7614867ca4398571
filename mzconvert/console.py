"""What the CLI prints: progress and messages on stderr (silenced by --quiet), results on stdout."""

from __future__ import annotations

import json
import sys
import time


class Console:
    def __init__(self, quiet: bool = False, json_output: bool = False):
        self.quiet = quiet
        self.json_output = json_output
        self._last_progress = 0.0
        self._tty = sys.stderr.isatty()
        self._out = sys.stdout
        if json_output:  # libraries that print (exporters, quantizers) must not corrupt the JSON
            sys.stdout = sys.stderr

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

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
