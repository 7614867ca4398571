"""Hostile or broken inputs end in one line naming the file and the documented exit code: never a
traceback, never the wrong thing blamed (a bad image is not a "conversion failure" of the graph)."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from mzconvert.errors import EXIT_BAD_INPUT, MzError
from mzconvert.tasks.detection import load_anchors
from tests.conftest import MIRROR, run_cli
from tests.tiny_graphs import tiny_recipe_text, write_tiny_detector

TRAIN = MIRROR / "coco" / "train2017"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_detector(tmp_path_factory.mktemp("tiny"))


def _build(tmp_path, text: str, *extra):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(text)
    return run_cli("--cache-dir", str(tmp_path / "cache"), "build", str(recipe), "--out", str(tmp_path / "dist"),
                   "--build-dir", str(tmp_path / "build"), *extra)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _calibration(tmp_path, bad_name: str, bad_bytes: bytes) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    good = sorted(TRAIN.glob("*.jpg"))[0]
    (folder / good.name).write_bytes(good.read_bytes())
    (folder / bad_name).write_bytes(bad_bytes)
    return folder


def _huge_png() -> bytes:
    """A PNG header claiming 30000 x 30000 pixels (900 MP), with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, data, expected", [
    ("truncated.jpg", (sorted(TRAIN.glob("*.jpg"))[0].read_bytes()[:3000] if TRAIN.is_dir() else b""),
     "truncated.jpg: not a decodable image"),
    ("huge.png", _huge_png(), "huge.png: not a decodable image (DecompressionBombError"),
])
def test_a_bad_calibration_image_is_named_with_exit_2(tmp_path, tiny, mirror, name, data, expected):
    folder = _calibration(tmp_path, name, data)
    variants = f"  - {{name: i8, mode: int8, calibration: {folder}}}\n"
    done = _build(tmp_path, tiny_recipe_text(tiny["frozen"], _digest(tiny["frozen"]), variants=variants))
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-1500:]
    assert expected in done.stderr and "Traceback" not in done.stderr and "conversion" not in done.stderr


def test_more_calibration_images_than_the_folder_has_is_an_error(tmp_path, tiny, mirror):
    folder = _calibration(tmp_path, "second.jpg", sorted(TRAIN.glob("*.jpg"))[1].read_bytes())
    variants = f"  - {{name: i8, mode: int8, calibration: {folder}, calibration_count: 5}}\n"
    done = _build(tmp_path, tiny_recipe_text(tiny["frozen"], _digest(tiny["frozen"]), variants=variants))
    assert done.returncode == EXIT_BAD_INPUT
    assert "2 images, fewer than the 5 asked for" in done.stderr and "Traceback" not in done.stderr


def test_a_corrupt_graph_is_bad_input(tmp_path, tiny):
    broken = tmp_path / "broken.pb"
    broken.write_bytes(tiny["frozen"].read_bytes()[:500])
    done = _build(tmp_path, tiny_recipe_text(broken, _digest(broken)))
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-1500:]
    assert "broken.pb: not a TensorFlow GraphDef" in done.stderr or "GraphDef has no nodes" in done.stderr


def test_object_array_anchors_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "anchors.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(MzError, match="anchors.npy: not an anchors array") as info:
        load_anchors(path)
    assert info.value.exit_code == EXIT_BAD_INPUT
    np.save(path, np.zeros((3, 5), np.float32))
    with pytest.raises(MzError, match=r"anchors must be N x 4 floats, got float32 \[3, 5\]"):
        load_anchors(path)


def test_a_pickle_payload_in_a_pth_is_refused_and_never_runs(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    weights = tmp_path / "weights.pth"
    torch.save({"features.0.0.weight": Payload()}, weights)
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"""name: evil
task: classification
description: a state dict carrying a pickle payload
license: test
source: {{url: {weights.as_uri()}, sha256: {_digest(weights)}}}
format: torch
torch: {{module: mobilenet_v2, num_classes: 10}}
input: {{name: input, shape: [1, 3, 32, 32], layout: NCHW}}
preprocess: {{interpolation: pil-bilinear}}
strip: {{inputs: [input], outputs: [logits]}}
variants: [{{name: float32, mode: float32}}]
""")
    done = run_cli("--cache-dir", str(tmp_path / "cache"), "build", str(recipe), "--out", str(tmp_path / "d"),
                   "--build-dir", str(tmp_path / "b"))
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-1500:]
    assert "weights.pth: not a PyTorch state dict, or one that would run code when loaded" in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists()


class UsersDetector:
    """A class of the user's, pickled by reference (tests.test_hostile_inputs.UsersDetector) as a training
    script's checkpoint holds its model."""


@pytest.mark.parametrize("saved, protocol, named", [
    ("module", 2, "torch.nn.modules.container.Sequential, torch.nn.modules.conv.Conv2d, "
                  "torch.nn.modules.activation.ReLU"),  # torch.save(model): the model, not its state_dict
    ("checkpoint", 2, "tests.test_hostile_inputs.UsersDetector"),  # a training script's {epoch, model, ...}
    ("checkpoint", 4, "tests.test_hostile_inputs.UsersDetector"),  # names pushed, then STACK_GLOBAL, memoized
])
def test_a_pickled_model_is_refused_unloaded_naming_what_it_would_build(tmp_path, saved, protocol, named):
    """Loading either would import and run the classes its pickle names: refused without loading it, naming them
    (read from the pickle's opcodes) and what to save instead."""
    torch = pytest.importorskip("torch")
    weights = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()) if saved == "module" else
               {"epoch": 3, "model": UsersDetector(), "again": UsersDetector(), "weights": torch.zeros(2)}, weights,
               pickle_protocol=protocol)
    done = run_cli("inspect", str(weights))
    assert done.returncode == EXIT_BAD_INPUT and "Traceback" not in done.stderr, done.stderr
    assert (f"model.pt: not a PyTorch state dict, or one that would run code when loaded: its pickle builds {named}, "
            "so it is not loaded; save the module's state_dict()") in done.stderr, done.stderr


def test_quiet_is_quiet_and_json_is_only_json(tmp_path, tiny, mirror):
    """TensorFlow's C++ logging and the converter's prints bypass sys.stderr: they must not get through."""
    import json

    variants = f"  - {{name: i8, mode: int8, calibration: {TRAIN}, calibration_count: 4}}\n"
    (tmp_path / "tiny.yaml").write_text(tiny_recipe_text(tiny["frozen"], _digest(tiny["frozen"]), variants=variants))
    done = run_cli("--quiet", "--json", "--cache-dir", str(tmp_path / "cache"), "build", str(tmp_path / "tiny.yaml"),
                   "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0
    assert done.stderr == ""
    assert json.loads(done.stdout)["tiny"]["variants"]["i8"]["io_dtype"] == "int8"
    failed = run_cli("--quiet", "build", str(tmp_path / "missing.yaml"))
    assert failed.returncode == EXIT_BAD_INPUT and failed.stderr.startswith("mzconvert: error: ")


def test_onnx_external_data_outside_its_folder_is_refused(tmp_path):
    from onnx import TensorProto, helper

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 16)
    (tmp_path / "model").mkdir()
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "g", [],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4])], [weight])
    model = tmp_path / "model" / "model.onnx"
    model.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    from mzconvert.backends.onnx import _load

    with pytest.raises(MzError, match="model.onnx: not a valid ONNX model") as info:
        _load(model)
    assert info.value.exit_code == EXIT_BAD_INPUT


def test_an_onnx_model_already_quantized_is_taken_as_it_is_and_never_quantized_again(tmp_path):
    """A QDQ model (ONNX Runtime's static quantization, Ultralytics' int8=True) is not quantized a second time:
    init proposes it as it is (one int8 variant, no calibration), and a recipe asking it for a float or calibrated
    variant is refused in one line naming the variant, exit 2, and build writes nothing."""
    from onnx import TensorProto, helper, numpy_helper

    scale, zero = numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.int8(0), "z")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
         helper.make_node("Relu", ["d"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])], [scale, zero])
    model = tmp_path / "qdq.onnx"
    model.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    made = run_cli("init", "qdq", "--from", str(model), "--to", str(tmp_path / "r"))
    assert made.returncode == 0, made.stderr
    proposed = yaml.safe_load((tmp_path / "r" / "qdq.yaml").read_text())
    assert proposed["variants"] == [{"name": "int8", "mode": "int8", "io_dtype": "float32"}], proposed
    (tmp_path / "qdq.yaml").write_text(f"""name: qdq
task: other
description: a QDQ model made in the test
license: test
source: {{url: {model.as_uri()}, sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}}}
format: onnx
input: {{name: x, shape: [1, 3, 8, 8], layout: NCHW}}
preprocess: {{resize: [8, 8], interpolation: cv2-linear, scale: 0.00392156862745098, offset: 0.0}}
variants:
  - {{name: float32, mode: float32}}
""")
    built = run_cli("--cache-dir", str(tmp_path / "cache"), "build", str(tmp_path / "qdq.yaml"), "--out",
                    str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert built.returncode == EXIT_BAD_INPUT, built.stderr[-1500:]
    assert "variants: float32: the source is quantized already" in built.stderr, built.stderr[-1500:]
    assert not (tmp_path / "dist").exists()
