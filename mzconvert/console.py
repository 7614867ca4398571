"""What the CLI prints: progress and messages on stderr (silenced by --quiet), results on stdout."""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import re
import select
import sys
import threading
import time
import warnings


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


# A line of a native library's own logging: absl/glog ("I0000 00:00:17.5   1090 cudart_stub.cc:31] ..."),
# absl's notice before it is set up, TensorFlow's CPU-feature notice, LiteRT's "INFO: Created ... delegate", the
# TFLite quantizer's settings ("fully_quantize: 0, inference_type: 6, ...", once per quantized model).
NATIVE_LOG_LINE = re.compile(rb"[IWEF]\d{4} \d+:\d+:\d+\.\d+ +\d+ [\w.-]+:\d+\] |"
                             rb"WARNING: All log messages before absl::InitializeLog\(\) is called|INFO: |"
                             rb"To enable the following instructions: .* rebuild TensorFlow|"
                             rb"fully_quantize: \d+, inference_type: ")


def filter_native_logs() -> None:
    """Without --verbose, what native libraries log past Python (TensorFlow's C++ start-up lines, CUDA probes)
    is dropped: fd 2 becomes a pipe whose reader passes every other line on, while Python's sys.stderr keeps
    the original output, so mzconvert's own progress and errors are written at once. The libraries' Python
    logging and warnings are silenced too."""
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = io.TextIOWrapper(os.fdopen(os.dup(original), "wb"), encoding=sys.stderr.encoding or "utf-8",
                                  errors="backslashreplace", line_buffering=True)

    stopping = threading.Event()

    def pass_on() -> None:
        pending = b""
        while True:  # until the pipe closes, or at exit once nothing more is waiting in it
            if not select.select([read_end], [], [], 0.1)[0]:
                if stopping.is_set():
                    break
                continue
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            os.write(original, b"".join(line + b"\n" for line in lines if not NATIVE_LOG_LINE.match(line)))
        if pending and not NATIVE_LOG_LINE.match(pending):
            os.write(original, pending)

    pump = threading.Thread(target=pass_on, name="native-log-filter", daemon=True)
    pump.start()

    def drain() -> None:  # at exit: what was written before is passed on; a library's copy of fd 2 cannot delay it
        os.dup2(original, 2)
        stopping.set()
        pump.join(timeout=2)

    atexit.register(drain)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")


class Console:
    def __init__(self, quiet: bool = False, json_output: bool = False, verbose: bool = False):
        self.quiet = quiet
        self.json_output = json_output
        self._last_progress = 0.0
        if quiet or json_output:
            silence_native_output()
        elif not verbose:
            filter_native_logs()
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
