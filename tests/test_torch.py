"""PyTorch sources (optional extra): our modules, the real torchvision weights, export and quantization."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from tests.conftest import MIRROR, ROOT, run_cli

torch = pytest.importorskip("torch")

WEIGHTS = MIRROR / "mobilenet_v2-b0353104.pth"


def test_torchvision_state_dict_loads_strictly_and_classifies_real_images(mirror):
    from mzconvert.backends.torch_models import MobileNetV2
    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe

    recipe = load_recipe("mobilenetv2-torchvision")
    model = MobileNetV2()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True), strict=True)
    model.eval()
    images = sorted((MIRROR / "imagenet-samples").glob("*.JPEG"))[:40]
    with torch.no_grad():
        predictions = [int(model(torch.from_numpy(prepare(p, recipe.preprocess, recipe.input).tensor)).argmax())
                       for p in images]
    correct = sum(p == 2 * i for i, p in enumerate(predictions))  # file i is class 2 i
    assert correct >= 28, predictions  # torchvision MobileNetV2 is ~72 % top-1 on ImageNet val


def test_mobilenet_v1_options_and_export(tmp_path, mirror):
    from mzconvert.backends.torch_models import MobileNetV1

    half = MobileNetV1(num_classes=10, width=0.5, relu6=False)
    assert half.classifier.in_features == 512
    assert not any(isinstance(m, torch.nn.ReLU6) for m in half.modules())
    weights = tmp_path / "v1.pth"
    torch.save(MobileNetV1(num_classes=10, width=0.25).state_dict(), weights)
    train, val = MIRROR / "coco" / "train2017", MIRROR / "coco" / "val2017"
    recipe = tmp_path / "mnv1.yaml"
    recipe.write_text(f"""name: mnv1
task: classification
description: MobileNetV1 0.25, random weights (no trained weights can be had here)
license: test
source: {{url: {weights.as_uri()}, sha256: {hashlib.sha256(weights.read_bytes()).hexdigest()}}}
format: torch
torch: {{module: mobilenet_v1, num_classes: 10, width: 0.25, opset: 17}}
input: {{name: input, shape: [1, 3, 64, 64], layout: NCHW}}
preprocess: {{interpolation: pil-bilinear, scale: 0.00784313725490196, offset: -1.0}}
strip: {{inputs: [input], outputs: [logits]}}
variants:
  - {{name: float32, mode: float32}}
  - {{name: int8, mode: int8, io_dtype: float32, calibration: {train}, calibration_count: 8}}
  - {{name: int8-tflite, mode: int8, io_dtype: int8, target: tflite, calibration: {train}, calibration_count: 8}}
  - {{name: float16-tflite, mode: float16, target: tflite}}
verify: {{images: {val}, count: 4}}
""")
    dists = {}
    for jobs in ("1", "3"):  # -j: ONNX Runtime's and TensorFlow's (Keras port) converters in threads
        result = run_cli("--quiet", "--json", "--cache-dir", str(tmp_path / "c"), "build", str(recipe), "-j", jobs,
                         "--out", str(tmp_path / jobs / "dist"), "--build-dir", str(tmp_path / jobs / "build"))
        assert result.returncode == 0, result.stderr[-2000:]
        dists[jobs] = (tmp_path / jobs / "dist" / "mnv1" / "MD5SUMS").read_text()
    assert dists["3"] == dists["1"]
    manifest = json.loads(result.stdout)["mnv1"]
    assert manifest["variants"]["float32"]["verify"]["logits"]["max_abs_error"] == 0
    assert manifest["variants"]["int8"]["file"] == "mnv1_int8.onnx"
    assert manifest["variants"]["int8-tflite"]["inputs"][0]["dtype"] == "int8"


@pytest.mark.slow
def test_real_torchvision_recipe_onnx_int8_and_tflite_int8_for_the_npu(tmp_path, mirror):
    result = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "--mirror", str(mirror), "build",
                     "mobilenetv2-torchvision", "--variant", "float32", "--variant", "int8", "--variant", "int8-tflite",
                     "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"), "--verify")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(result.stdout)["mobilenetv2-torchvision"]
    for name in ("int8", "int8-tflite"):
        metrics = manifest["variants"][name]["verify"]["logits"]
        assert metrics["cosine"] >= 0.965 and metrics["top1_agreement"] >= 0.8, (name, metrics)
    assert "int8 vs float graph, output logits on 32 val images: cosine" in result.stderr
    tflite = manifest["variants"]["int8-tflite"]
    assert tflite["file"].endswith(".tflite") and tflite["inputs"][0]["shape"] == [1, 224, 224, 3]
    assert tflite["inputs"][0]["dtype"] == "int8"
    vela = tflite["vela"]["ethos-u65-256"]  # one target: named after its accelerator
    assert vela["cpu_op_count"] == 0 and vela["npu_ops"] > 50
    assert "vela" not in manifest["variants"]["int8"]  # an ONNX artifact never goes to vela


def test_mobiledet_edgetpu_ssdlite_exports_quantizes_and_decodes_with_random_weights(tmp_path, mirror):
    """No PyTorch MobileDet weights can be had here: the real architecture with random weights, end to end."""
    import yaml

    from mzconvert.backends.torch_models import MobileDetEdgeTPUSSDLite
    from tests.test_build_real import coco_subset

    torch.manual_seed(0)
    weights = tmp_path / "mobiledet-random.pth"
    torch.save(MobileDetEdgeTPUSSDLite(num_classes=91).state_dict(), weights)
    labels = yaml.safe_load((ROOT / "recipes" / "ssd-mobiledet.yaml").read_text())["postprocess"]["labels"]
    train, val = MIRROR / "coco" / "train2017", MIRROR / "coco" / "val2017"
    recipe = tmp_path / "mobiledet.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "mobiledet", "task": "detection", "license": "test",
        "description": "MobileDet-EdgeTPU + SSDLite head (Tetra's PyTorch layout), random weights",
        "source": {"url": weights.as_uri(), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()},
        "format": "torch", "torch": {"module": "mobiledet_edgetpu_ssdlite", "num_classes": 91, "opset": 17},
        "input": {"name": "image", "shape": [1, 3, 320, 320], "layout": "NCHW"},
        "preprocess": {"interpolation": "pil-bilinear", "scale": 0.00784313725490196, "offset": -1.0},
        "strip": {"inputs": ["image"], "outputs": ["boxes", "logits"]},
        "postprocess": {"kind": "ssd", "anchors_tensor": "anchors", "box_coder_scales": [10, 10, 5, 5],
                        "box_output": "boxes", "class_output": "logits", "labels": labels},
        "variants": [{"name": "float32", "mode": "float32"},
                     {"name": "int8", "mode": "int8", "io_dtype": "float32", "calibration": str(train),
                      "calibration_count": 8, "reduce_range": True,
                      "min_matched": 0}],  # random weights: no detection is worth keeping
        "verify": {"images": str(val), "count": 4}}))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    result = run_cli("--quiet", "--json", "--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads(result.stdout)["mobiledet"]
    assert manifest["postprocess"]["count"] == 2034  # 20x20x3 + (10x10 + 5x5 + 3x3 + 2x2 + 1x1) x 6
    assert np.load(tmp_path / "dist" / "mobiledet" / "anchors.npy").shape == (2034, 4)
    assert manifest["variants"]["int8"]["verify"]["boxes"]["cosine"] > 0.5
    evaluation = run_cli("--quiet", "--json", "eval", str(recipe), "--dataset",
                         str(coco_subset(tmp_path / "coco", 3)), *where)
    assert evaluation.returncode == 0, evaluation.stderr[-2000:]
    assert set(json.loads(evaluation.stdout)["results"]) == {"source-graph", "float32", "int8", "int8 (fused kernels)"}
