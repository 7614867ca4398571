"""bias_correction (ONNX int8, quant/qdq_refits.py): each layer's bias corrected for the mean error of the quantized
layers before it, kept where it lowers the model's output error on the calibration images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from mzconvert.backends.onnx import _Calibration
from mzconvert.errors import RecipeError
from mzconvert.quant.qdq_refits import Dequantized, correct_biases
from mzconvert.recipe import load_recipe
from tests.test_onnx_backend import _prepared_tiny_onnx

ROOT = Path(__file__).resolve().parent.parent


def quantized_tiny(tmp_path: Path) -> tuple[Path, Path, list[np.ndarray]]:
    """The tiny model's float graph as quantize prepares it, its QDQ int8 (uint8 activations, as the build's),
    and the calibration tensors."""
    from onnxruntime import quantization as q

    prepared = _prepared_tiny_onnx(tmp_path)
    images = [np.random.RandomState(i).normal(0, 1, (1, 3, 32, 32)).astype(np.float32) for i in range(16)]
    quantized = tmp_path / "int8.onnx"
    q.quantize_static(str(prepared), str(quantized), _Calibration("input", iter(images)),
                      quant_format=q.QuantFormat.QDQ, per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8)
    return prepared, quantized, images


def last_conv_bias(model) -> onnx.TensorProto:
    conv = [n for n in model.graph.node if n.op_type == "Conv"][-1]
    return Dequantized(model)(conv.input[2])[0]


def output_error(prepared: Path, quantized: Path, images: list[np.ndarray]) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want, got = (ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in
                 (prepared, quantized))
    return float(np.mean([np.mean((got.run(None, {"input": x})[0] - want.run(None, {"input": x})[0]) ** 2)
                          for x in images]))


def test_a_bias_knocked_off_its_mean_is_brought_back(tmp_path):
    prepared, quantized, images = quantized_tiny(tmp_path)
    model = onnx.load(str(quantized))
    bias = last_conv_bias(model)
    original = numpy_helper.to_array(bias).astype(np.int64)
    knocked = original + 3 * np.abs(original).max()  # every channel of the last conv shifted far off
    bias.CopyFrom(numpy_helper.from_array(knocked.astype(np.int32), bias.name))
    onnx.save(model, str(quantized))
    before = output_error(prepared, quantized, images)

    correct_biases(prepared, quantized, images)

    corrected = numpy_helper.to_array(last_conv_bias(onnx.load(str(quantized)))).astype(np.int64)
    assert np.abs(corrected - original).max() < 0.05 * np.abs(knocked - original).max(), (corrected, original)
    assert output_error(prepared, quantized, images) < 0.01 * before


def test_a_correction_that_does_not_lower_the_output_error_is_not_kept(tmp_path):
    """A mean error no output sees is left alone: the damaged model's first conv has a channel its ReLU always
    zeroes; where the float twin's bias of that channel is lower still, the outputs do not change, and neither
    does the quantized bias (a correction by means alone would move it by 4.0 in float terms)."""
    from onnxruntime import quantization as q

    from mzconvert.backends.onnx import _load, _named_nodes, _save
    from tests.test_onnx_backend import tiny_onnx

    prepared = tmp_path / "prepared.onnx"
    q.quant_pre_process(str(tiny_onnx(tmp_path / "tiny.onnx", damaged=True)), str(prepared), skip_symbolic_shape=True)
    _save(_named_nodes(_load(prepared)), prepared)
    images = [np.random.RandomState(i).normal(0, 1, (1, 3, 32, 32)).astype(np.float32) for i in range(16)]
    quantized = tmp_path / "int8.onnx"
    q.quantize_static(str(prepared), str(quantized), _Calibration("input", iter(images)),
                      quant_format=q.QuantFormat.QDQ, per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8)
    twin = onnx.load(str(prepared))
    b1 = next(i for i in twin.graph.initializer if i.name == "b1")
    lower = numpy_helper.to_array(b1).copy()
    lower[-1] -= 4.0  # the dead channel: -1 -> -5, still below 0 everywhere
    b1.CopyFrom(numpy_helper.from_array(lower, "b1"))
    onnx.save(twin, str(prepared))
    first_conv_bias = [n for n in onnx.load(str(quantized)).graph.node if n.op_type == "Conv"][0].input[2]

    def bias_values() -> np.ndarray:
        return numpy_helper.to_array(Dequantized(onnx.load(str(quantized)))(first_conv_bias)[0])

    before, error = bias_values(), output_error(prepared, quantized, images)
    correct_biases(prepared, quantized, images)
    assert bias_values()[-1] == before[-1]
    assert output_error(prepared, quantized, images) <= error


def test_bias_correction_is_refused_where_it_does_not_apply(tmp_path):
    data = yaml.safe_load((ROOT / "recipes" / "mobilenetv2-torchvision.yaml").read_text())
    tflite = next(v for v in data["variants"] if v["name"] == "int8-tflite")
    tflite["bias_correction"] = True
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match=r"variants\[4\]\.bias_correction: bias_correction applies to ONNX int8"):
        load_recipe(tmp_path / "r.yaml")
    tflite.pop("bias_correction")
    next(v for v in data["variants"] if v["name"] == "float16")["bias_correction"] = True
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError, match=r"variants\[1\]\.bias_correction"):
        load_recipe(tmp_path / "r.yaml")
