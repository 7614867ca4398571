"""PyTorch models as users bring them: a state dict of their own nn.Module class (in a file of theirs), a
TorchScript archive and a torch.export archive (.pt2), each through init and build to a verified int8 TFLite
compiled for the NPU, with no hand edit."""

from __future__ import annotations

import json
import zipfile

import pytest
import yaml

from tests.conftest import MIRROR, image_folder, run_cli

torch = pytest.importorskip("torch")

USER_MODULE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's own classifier: not one of mzconvert's modules."""

    def __init__(self, classes: int = 4, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU6(),
                                      nn.Conv2d(width, width, 3, 1, 1, groups=width), nn.ReLU6(),
                                      nn.Conv2d(width, 2 * width, 1), nn.ReLU())
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))
'''


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """The same trained-looking module saved the three ways, the user's file beside them, image folders."""
    import importlib.util

    folder = tmp_path_factory.mktemp("torch-sources")
    (folder / "net.py").write_text(USER_MODULE)
    spec = importlib.util.spec_from_file_location("user_net", folder / "net.py")
    net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(net)
    torch.manual_seed(0)
    module = net.TinyNet(classes=5).eval()
    with torch.no_grad():  # statistics a trained BatchNorm has, not its identity init
        module.features[1].running_mean.uniform_(-0.5, 0.5)
        module.features[1].running_var.uniform_(0.5, 2.0)
    example = torch.randn(1, 3, 32, 32)
    torch.save(module.state_dict(), folder / "weights.pth")
    torch.jit.save(torch.jit.trace(module, example), folder / "scripted.pt")
    torch.export.save(torch.export.export(module, (example,)), folder / "exported.pt2")
    return {"folder": folder, "calib": image_folder(folder / "calib", MIRROR / "coco" / "train2017", 16),
            "check": image_folder(folder / "check", MIRROR / "coco" / "val2017", 8)}


@pytest.mark.slow
@pytest.mark.parametrize("name, file, options", [
    ("user-module", "weights.pth", ["--torch-module", "net.py:TinyNet", "--torch-kwargs", "{classes: 5}",
                                    "--input-shape", "1,3,32,32"]),
    ("torchscript", "scripted.pt", ["--input-shape", "1,3,32,32"]),
    ("torch-export", "exported.pt2", []),  # the .pt2 records its input shape
])
def test_a_torch_source_inits_and_builds_to_a_verified_int8_tflite_for_the_npu(sources, name, file, options, mirror):
    folder = sources["folder"]
    made = run_cli("init", name, "--from", str(folder / file), "--to", str(folder), "--calibration",
                   str(sources["calib"]), "--verify", str(sources["check"]), *options, cwd=folder)
    assert made.returncode == 0, made.stderr[-2000:]
    recipe = yaml.safe_load((folder / f"{name}.yaml").read_text())
    assert recipe["input"]["shape"] == [1, 3, 32, 32] and recipe["task"] == "classification"
    if name == "user-module":  # the user's file named as given, from the recipe's folder
        assert recipe["torch"] == {"module": "net.py:TinyNet", "kwargs": {"classes": 5}}
    built = run_cli("--json", "--cache-dir", str(folder / "c"), "build", str(folder / f"{name}.yaml"),
                    "--out", str(folder / "dist"), "--build-dir", str(folder / "build"))
    assert built.returncode == 0, built.stderr[-3000:]
    variants = json.loads(built.stdout)[name]["variants"]
    assert variants["float32-tflite"]["verify"]["output"]["cosine"] >= 0.9999
    int8 = variants["int8-tflite"]
    assert int8["inputs"][0]["dtype"] == "int8" and int8["inputs"][0]["shape"] == [1, 32, 32, 3]
    assert int8["verify"]["output"]["sqnr_db"] > 20
    (npu,) = int8["vela"].values()
    assert npu["cpu_op_count"] == 0 and npu["npu_ops"] > 0


def test_a_pt2_with_a_pickled_payload_is_refused_before_it_is_loaded(sources, tmp_path):
    tampered = tmp_path / "tampered.pt2"
    with zipfile.ZipFile(sources["folder"] / "exported.pt2") as original, zipfile.ZipFile(tampered, "w") as copy:
        for item in original.infolist():
            data = original.read(item)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    recipe = tmp_path / "t.yaml"
    recipe.write_text(f"""name: t
task: classification
description: a .pt2 that would unpickle
license: test
source: {{url: {tampered.as_uri()}, sha256: {__import__('hashlib').sha256(tampered.read_bytes()).hexdigest()}}}
format: torch-export
input: {{name: input, shape: [1, 3, 32, 32], layout: NCHW}}
preprocess: {{resize: [32, 32], interpolation: pil-bilinear}}
variants: [{{name: float32, mode: float32}}]
""")
    done = run_cli("build", str(recipe), "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 2 and "refusing a .pt2 with pickled payloads" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "dist" / "t").exists()


def test_a_user_module_that_is_not_there_or_takes_other_arguments_is_named(sources, tmp_path):
    folder = sources["folder"]
    missing = run_cli("init", "m", "--from", str(folder / "weights.pth"), "--to", str(tmp_path), "--torch-module",
                      "nowhere.py:TinyNet", "--input-shape", "1,3,32,32", cwd=folder)
    assert missing.returncode == 2 and "init --torch-module: no file" in missing.stderr, missing.stderr
    wrong = run_cli("init", "m", "--from", str(folder / "weights.pth"), "--to", str(tmp_path), "--torch-module",
                    "net.py:TinyNet", "--torch-kwargs", "{classes: 5, depth: 3}", "--input-shape", "1,3,32,32",
                    cwd=folder)
    assert wrong.returncode == 2 and "init --torch-kwargs: TinyNet(classes, depth) failed" in wrong.stderr
    assert not (tmp_path / "m.yaml").exists()
    shape = run_cli("init", "m", "--from", str(folder / "scripted.pt"), "--to", str(tmp_path))
    assert shape.returncode == 2 and "--input-shape" in shape.stderr
