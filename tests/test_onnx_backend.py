"""ONNX path without torch: a tiny real ONNX classifier built in code through every stage and mode."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mzconvert.build import build
from mzconvert.console import Console
from mzconvert.errors import RecipeError
from mzconvert.planner import BuildOptions
from mzconvert.recipe import load_recipe
from mzconvert.sources.fetch import FetchConfig, Fetcher
from tests.conftest import MIRROR, ROOT, run_cli


def tiny_onnx(path: Path, size: int = 32, classes: int = 10, output: str = "probabilities",
              damaged: bool = False, depthwise: bool = False) -> Path:
    """damaged: conv1's last channel is always 0 and conv2 weighs it 1000 in its first output channel: the float
    model does not notice, per-channel int8 weights of that output channel round to nothing but it.
    depthwise: a 3x3 depthwise conv between the two. No node is named, as in many exports."""
    rng = np.random.RandomState(0)
    arrays = {n: rng.normal(0, 0.3, s).astype(np.float32) for n, s in
              (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (16, 8, 3, 3)), ("b2", (16,)), ("fc", (16, classes)),
               ("fcb", (classes,)))}
    if damaged:
        arrays["w1"][-1], arrays["b1"][-1] = 0.0, -1.0  # ReLU keeps it 0
        arrays["w2"][0, -1, 1, 1] = 1000.0
    between = []
    if depthwise:
        arrays["wd"] = rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)
        between = [helper.make_node("Conv", ["relu1", "wd"], ["dw"], group=8, pads=[1, 1, 1, 1])]
    init = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"]),
             *between,
             helper.make_node("Conv", ["dw" if depthwise else "relu1", "w2", "b2"], ["conv2"], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv2"], ["relu2"]),
             helper.make_node("GlobalAveragePool", ["relu2"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
             helper.make_node("Softmax", ["logits"], [output])]  # post-processing strip removes
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, classes])], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def recipe_text(model: Path, outputs: str = "logits", extra_variant: str = "") -> str:
    train, val = MIRROR / "coco" / "train2017", MIRROR / "coco" / "val2017"
    return f"""name: tiny-onnx
task: classification
description: tiny ONNX classifier
license: test
source:
  url: {model.as_uri()}
  sha256: {hashlib.sha256(model.read_bytes()).hexdigest()}
format: onnx
input: {{name: input, shape: [1, 3, 32, 32], layout: NCHW}}
preprocess: {{interpolation: pil-bilinear, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375]}}
strip: {{inputs: [input], outputs: [{outputs}]}}
variants:
  - {{name: float32, mode: float32}}
  - {{name: float16, mode: float16}}
  - {{name: dynamic, mode: dynamic}}
  - {{name: int8, mode: int8, io_dtype: float32, calibration: {train}, calibration_count: 8, calibration_method: percentile}}
{extra_variant}verify: {{images: {val}, count: 4}}
"""


def run(tmp_path, text):
    (tmp_path / "tiny-onnx.yaml").write_text(text)
    options = BuildOptions(out=tmp_path / "dist", build_root=tmp_path / "build")
    return build(load_recipe(tmp_path / "tiny-onnx.yaml"), Fetcher(FetchConfig(cache_dir=tmp_path / "c", mirrors=[])),
                 Console(quiet=True), options)


def test_onnx_stages_and_modes_without_torch(tmp_path, mirror):
    manifest = run(tmp_path, recipe_text(tiny_onnx(tmp_path / "tiny.onnx")))
    dist = tmp_path / "dist" / "tiny-onnx"
    ops = {n: [node.op_type for node in onnx.load(str(dist / f"tiny-onnx_{n}.onnx")).graph.node]
           for n in manifest["variants"]}
    assert "Softmax" not in ops["float32"]  # stripped at logits
    assert "DequantizeLinear" in ops["int8"] and "QuantizeLinear" in ops["int8"]
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"} & set(ops["dynamic"])
    f16 = onnx.load(str(dist / "tiny-onnx_float16.onnx"))
    assert any(t.data_type == TensorProto.FLOAT16 for t in f16.graph.initializer)
    assert f16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float I/O kept
    for name, variant in manifest["variants"].items():
        assert variant["inputs"][0]["dtype"] == "float32"
        metrics = variant["verify"]["logits"]
        assert metrics["cosine"] > 0.9 and 0 <= metrics["top1_agreement"] <= 1, (name, metrics)
    assert manifest["variants"]["float32"]["verify"]["logits"]["max_abs_error"] == 0


def test_dynamic_quantization_keeps_unnamed_depthwise_convs_float(tmp_path, mirror):
    text = recipe_text(tiny_onnx(tmp_path / "tiny.onnx", depthwise=True))
    # random weights: its 10 classes' scores lie within a whisker, so 4 images say nothing of top-1 agreement
    text = text.replace("{name: dynamic, mode: dynamic}", "{name: dynamic, mode: dynamic, min_agreement: 0}")
    manifest = run(tmp_path, text.replace("  - {name: float16, mode: float16}\n", ""))
    dynamic = onnx.load(str(tmp_path / "dist" / "tiny-onnx" / manifest["variants"]["dynamic"]["file"])).graph
    convs = [(node.op_type, {a.name: a.i for a in node.attribute}.get("group", 1)) for node in dynamic.node
             if "Conv" in node.op_type]
    assert convs == [("ConvInteger", 1), ("Conv", 8), ("ConvInteger", 1)]  # the two others quantized
    assert manifest["variants"]["dynamic"]["verify"]["logits"]["cosine"] > 0.99

    # static int8 of the same model: uint8 activations (the same 256 steps as int8's), the type ONNX Runtime's x86
    # kernels fuse in every Conv (with int8 ones 15 of MobileNetV2's 52 stay float: bench/peers.py; this model's
    # one depthwise Conv is fused either way); logits not rounded
    from mzconvert.evaluate.latency import integer_convolutions

    artifact = tmp_path / "dist" / "tiny-onnx" / manifest["variants"]["int8"]["file"]
    graph = onnx.load(str(artifact)).graph
    zero_points = {t.name: t.data_type for t in graph.initializer}
    activations = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert activations and all(zero_points[n.input[2]] == TensorProto.UINT8 for n in activations)
    producer = {o: n for n in graph.node for o in n.output}
    assert producer["logits"].op_type == "Gemm"  # no Quantize/Dequantize pair before the output
    assert integer_convolutions(artifact) == (3, 3)
    assert integer_convolutions(tmp_path / "dist" / "tiny-onnx" / "tiny-onnx_float32.onnx") == (0, 3)


def _prepared_tiny_onnx(tmp_path) -> Path:
    from onnxruntime import quantization as q

    from mzconvert.backends.onnx import _load, _named_nodes, _save

    prepared = tmp_path / "prepared.onnx"
    q.quant_pre_process(str(tiny_onnx(tmp_path / "tiny.onnx", depthwise=True)), str(prepared), skip_symbolic_shape=True)
    return _save(_named_nodes(_load(prepared)), prepared)


def test_onnx_minmax_ranges_quantize_as_onnx_runtimes_own_calibrator(tmp_path):
    """Our recorded min/max ranges, handed to ONNX Runtime's quantizer, give the model its own MinMax calibrator
    gives: the same graph, zero points and scales (to float rounding: fused kernels round differently)."""
    from onnxruntime import quantization as q

    from mzconvert.backends.onnx import _Calibration, _recorded_ranges, _write_ranges

    prepared = _prepared_tiny_onnx(tmp_path)
    images = [np.random.RandomState(i).normal(0, 1, (1, 3, 32, 32)).astype(np.float32) for i in range(5)]
    options = dict(quant_format=q.QuantFormat.QDQ, per_channel=True, activation_type=q.QuantType.QInt8,
                   weight_type=q.QuantType.QInt8)
    q.quantize_static(str(prepared), str(tmp_path / "theirs.onnx"), _Calibration("input", iter(images)), **options)
    _write_ranges(_recorded_ranges(prepared, images), tmp_path / "ranges.json")
    q.quantize_static(str(prepared), str(tmp_path / "ours.onnx"), None,
                      calibration_cache_path=str(tmp_path / "ranges.json"), **options)
    theirs, ours = (onnx.load(str(tmp_path / f"{who}.onnx")).graph for who in ("theirs", "ours"))
    assert [(n.op_type, list(n.input)) for n in ours.node] == [(n.op_type, list(n.input)) for n in theirs.node]
    constants = {t.name: numpy_helper.to_array(t) for t in ours.initializer}
    scales = [name for name in constants if name.endswith("_scale")]
    assert len(scales) >= 6  # input, every conv, relu and the logits
    for t in theirs.initializer:
        np.testing.assert_allclose(constants[t.name], numpy_helper.to_array(t), rtol=1e-6, err_msg=t.name)


def test_onnx_recorded_ranges_percentile_exact_mse_inside_minmax(tmp_path):
    from mzconvert.backends.onnx import _recorded_ranges

    images = [np.random.RandomState(i).normal(0, 1, (1, 3, 32, 32)).astype(np.float32) for i in range(5)]
    prepared = _prepared_tiny_onnx(tmp_path)
    ranges = _recorded_ranges(prepared, images, "percentile", 99.0)
    values = np.sort(np.concatenate([x.ravel() for x in images]))
    rank = int(0.01 * values.size)
    assert ranges["input"] == (values[rank], values[-1 - rank])
    assert {"conv1", "relu1", "dw", "conv2", "relu2", "logits"} <= set(ranges)
    minmax, mse, averaged = (_recorded_ranges(prepared, images, method) for method in ("minmax", "mse", "mean_minmax"))
    assert minmax["input"] == (values[0], values[-1])
    inside = set(minmax) - {"probabilities"}  # the graph's output
    assert set(mse) == set(minmax) and all(min(low, 0) <= mse[k][0] <= 0 <= mse[k][1] <= max(high, 0)
                                           for k, (low, high) in minmax.items() if k in inside)
    # the output keeps its whole range by every method; what it is made from is clipped
    assert ranges["probabilities"] == mse["probabilities"] == averaged["probabilities"] == minmax["probabilities"]
    assert averaged["relu2"][1] < minmax["relu2"][1] and ranges["relu2"][1] < minmax["relu2"][1]


def test_onnx_strip_at_unknown_tensor_lists_close_matches(tmp_path, mirror):
    with pytest.raises(RecipeError, match="strip.outputs: tensor 'logit' is not in the graph; did you mean 'logits'"):
        run(tmp_path, recipe_text(tiny_onnx(tmp_path / "tiny.onnx"), outputs="logit"))


def test_onnx_int8_must_keep_float_io(tmp_path):
    text = recipe_text(tiny_onnx(tmp_path / "tiny.onnx")).replace("io_dtype: float32", "io_dtype: int8")
    (tmp_path / "tiny-onnx.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"variants\[3\].io_dtype: ONNX int8 is QDQ"):
        load_recipe(tmp_path / "tiny-onnx.yaml")


def test_corrupt_onnx_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    from mzconvert.errors import MzError

    with pytest.raises(MzError, match="bad.onnx: not a valid ONNX model"):
        run(tmp_path, recipe_text(bad))


def test_onnx_path_runs_where_torch_cannot_be_imported(tmp_path, mirror):
    blocked = tmp_path / "no-torch" / "torch"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('torch is blocked for this test')\n")
    env = {"PYTHONPATH": str(blocked.parent) + os.pathsep + str(ROOT)}

    def build_cli(recipe: Path, *extra: str):
        return run_cli("--quiet", "--cache-dir", str(tmp_path / "c"), "build", str(recipe), *extra,
                       "--out", str(tmp_path / "d"), "--build-dir", str(tmp_path / "b"), env=env)

    recipe = tmp_path / "tiny-onnx.yaml"
    recipe.write_text(recipe_text(tiny_onnx(tmp_path / "tiny.onnx")))
    built = build_cli(recipe, "--variant", "int8")
    assert built.returncode == 0, built.stderr[-2000:]

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"never read: the torch import fails first")
    head, tail = (ROOT / "recipes" / "mobilenetv2-torchvision.yaml").read_text().split("source:")
    pinned = f"source: {{url: {weights.as_uri()}, sha256: {hashlib.sha256(weights.read_bytes()).hexdigest()}}}\n"
    torch_recipe = tmp_path / "mobilenetv2-torchvision.yaml"
    torch_recipe.write_text(head + pinned + "format:" + tail.split("format:")[1])
    refused = build_cli(torch_recipe)
    assert refused.returncode == 1
    assert "format torch needs PyTorch: pip install 'mzconvert[torch]'" in refused.stderr


def test_onnx_zoo_recipe_pinned_and_served_same_layout_file(tmp_path, http_server, mirror):
    import csv

    official = {r["file"]: r for r in csv.DictReader((MIRROR / "OFFICIAL-HASHES.tsv").open(), delimiter="\t")}
    zoo = load_recipe("mobilenetv2-onnx")
    assert zoo.source.checksums["sha256"] == official["mobilenetv2-7.onnx"]["digest"]
    assert zoo.source.size == int(official["mobilenetv2-7.onnx"]["bytes"])
    model = tiny_onnx(tmp_path / "mobilenetv2-7.onnx", size=224, classes=1000, output="output")
    data = model.read_bytes()
    http_server.files["/zoo/mobilenetv2-7.onnx"] = data
    text = zoo.path.read_text().replace(zoo.source.url, http_server.url + "/zoo/mobilenetv2-7.onnx")
    text = text.replace(zoo.source.checksums["sha256"], hashlib.sha256(data).hexdigest()).replace(
        f"size: {zoo.source.size}", f"size: {len(data)}")
    local = tmp_path / "mobilenetv2-onnx.yaml"
    local.write_text(text)
    result = run_cli("--quiet", "--json", "--cache-dir", str(tmp_path / "c"), "--mirror", str(mirror), "build",
                     str(local), "--out", str(tmp_path / "d"), "--build-dir", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads(result.stdout)["mobilenetv2-onnx"]
    assert set(manifest["variants"]) == {"float32", "dynamic", "int8"}


def test_verify_warns_when_the_float_model_answers_the_same_for_every_image(tmp_path, mirror):
    from onnx import TensorProto, helper, numpy_helper

    zero = numpy_helper.from_array(np.zeros((1,), np.float32), "zero")
    bias = numpy_helper.from_array(np.arange(10, dtype=np.float32).reshape(1, 10), "bias")
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
             helper.make_node("Add", ["nothing", "bias"], ["logits"])]
    graph = helper.make_graph(nodes, "constant", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], [zero, bias])
    model = tmp_path / "constant.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(model))
    recipe = tmp_path / "tiny-onnx.yaml"
    recipe.write_text(recipe_text(model).split("variants:")[0] + "variants:\n  - {name: float32, mode: float32}\n"
                      + "verify:" + recipe_text(model).split("verify:")[1])
    done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), "--out", str(tmp_path / "d"),
                   "--build-dir", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: the float model's output logits is the same on all" in done.stderr


def test_debug_ranks_a_damaged_layer_of_an_onnx_int8_first(tmp_path, mirror):
    """ONNX Runtime's QDQ loss debugging, in quantization steps like the TFLite debug."""
    import json

    model = tiny_onnx(tmp_path / "damaged.onnx", damaged=True)
    recipe = tmp_path / "tiny-onnx.yaml"
    recipe.write_text(recipe_text(model).replace("calibration_method: percentile", "calibration_method: minmax"))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    failed = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where)
    # the damage shows in the dynamic variant too (SQNR 0.8 dB), the first whose checks end
    assert failed.returncode == 1 and "variants[2].min_slice_sqnr_db: dynamic" in failed.stderr, failed.stderr[-2000:]
    assert f"mzconvert debug {recipe} --variant dynamic" in failed.stderr
    shipped = json.loads((tmp_path / "dist" / "tiny-onnx" / "manifest.json").read_text())["variants"]
    assert "not shipped: dynamic" in failed.stderr and "dynamic" not in shipped and "int8" in shipped
    done = run_cli("--quiet", "--json", "--cache-dir", str(tmp_path / "c"), "debug", str(recipe), "--variant", "int8",
                   *where)
    assert done.returncode == 0, done.stderr[-2000:]
    layers = json.loads(done.stdout)["layers"]
    assert layers[0]["layer"] == "relu2", layers[:3]  # conv2 + its ReLU, one quantized activation in QDQ
    assert layers[0]["rmse_steps"] > 2 * layers[1]["rmse_steps"], layers[:3]
    assert (tmp_path / "dist" / "tiny-onnx" / "debug" / "int8.png").is_file()  # int8 was shipped
    accepted = "min_agreement: 0, min_slice_sqnr_db: -1000"
    recipe.write_text(recipe.read_text().replace("calibration_method: minmax", f"calibration_method: minmax, {accepted}")
                      .replace("{name: dynamic, mode: dynamic}", f"{{name: dynamic, mode: dynamic, {accepted}}}"))
    assert run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where).returncode == 0
    again = run_cli("--quiet", "--cache-dir", str(tmp_path / "c"), "debug", str(recipe), "--variant", "int8", *where)
    assert again.returncode == 0 and (tmp_path / "dist" / "tiny-onnx" / "debug" / "int8.png").is_file()
    refused = run_cli("--quiet", "--cache-dir", str(tmp_path / "c"), "debug", str(recipe), "--variant", "float32", *where)
    assert refused.returncode == 2 and "debug explains int8 variants, not float32" in refused.stderr


def test_the_layer_debug_ranks_first_kept_float_wins_back_the_damage(tmp_path, mirror):
    """float_layers: the damaged conv named as debug lists it (its ReLU's output) stays float in the int8 QDQ
    graph, with its input and output quantized; the rest stays int8."""
    import json

    import onnx

    model = tiny_onnx(tmp_path / "damaged.onnx", damaged=True)
    accepted = "min_agreement: 0, min_slice_sqnr_db: -1000"
    recipe = tmp_path / "tiny-onnx.yaml"
    int8 = f"calibration: {MIRROR / 'coco' / 'train2017'}, calibration_count: 8"
    recipe.write_text(recipe_text(model).replace(
        "  - {name: float16, mode: float16}\n  - {name: dynamic, mode: dynamic}\n", "").replace(
        "calibration_method: percentile}", f"{accepted}}}\n  - {{name: int8-fl, mode: int8, io_dtype: float32, "
        f"{int8}, float_layers: [relu2]}}"))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where)
    assert done.returncode == 0, done.stderr[-2000:]
    variants = json.loads(done.stdout)["tiny-onnx"]["variants"]
    plain, kept = variants["int8"]["verify"]["logits"]["sqnr_db"], variants["int8-fl"]["verify"]["logits"]["sqnr_db"]
    assert kept > plain + 3, (plain, kept)  # measured: 33.0 -> 39.7 dB
    graph = onnx.load(str(tmp_path / "dist" / "tiny-onnx" / variants["int8-fl"]["file"])).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    conv2 = next(n for n in graph.node if n.op_type == "Conv" and produced_by.get(n.input[1]) is None)
    assert produced_by.get(conv2.input[0]).op_type == "DequantizeLinear"  # its input still from int8
    # the search judges what the budget is on, top-1 agreement: the damage costs none on these images, so the
    # variant as declared is the answer, quantized and verified as the build does
    searched = run_cli("--json", "--quiet", "--cache-dir", str(tmp_path / "c"), "debug", str(recipe), "--variant",
                       "int8", "--search", "0.0", *where)
    assert searched.returncode == 0, searched.stderr[-2000:]
    search = json.loads(searched.stdout)["search"]
    assert search["met"] and search["chosen"]["float_layers"] == [] and len(search["steps"]) == 1, search
    assert search["steps"][0]["fidelity"] == 1.0 and search["steps"][0]["worst_sqnr_db"] == pytest.approx(plain, 0.01)
    wrong = recipe.read_text().replace("float_layers: [relu2]", "float_layers: [relu9]")
    recipe.write_text(wrong)
    refused = run_cli("build", str(recipe), *where)
    assert refused.returncode == 2 and "float_layers: tensor 'relu9' is not in the graph" in refused.stderr, \
        refused.stderr[-1000:]



@pytest.mark.slow
def test_debug_of_a_tflite_int8_counts_no_error_beyond_what_its_sigmoid_sees(tmp_path, mirror):
    """Logits only a sigmoid reads are quantized up to its bound (+-8, quant/ranges.py); beyond it the int8 score
    no longer moves. TensorFlow's debugger, which explains TFLite variants, counts the float logits beyond the bound
    as error (a YOLO's class logits reach -20: its three class convolutions ranked worst at 16-67 steps, its real
    losses below them). Debug judges such a layer within the bound, as the build's ranges do."""
    import json

    rng = np.random.RandomState(0)
    arrays = {"w1": rng.normal(0, 0.3, (8, 3, 3, 3)), "b1": np.zeros(8), "fc": rng.normal(0, 0.5, (8, 6)),
              "fcb": np.array([-30.0, -20.0, -12.0, 0.0, 1.0, 2.0])}  # half the classes far beyond the bound
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["conv1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv1"], ["relu1"]),
             helper.make_node("GlobalAveragePool", ["relu1"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["scores"])]
    graph = helper.make_graph(nodes, "sigmoid-head",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 6])],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()])
    model = tmp_path / "sigmoid.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(model))
    train = MIRROR / "coco" / "train2017"
    int8 = (f"  - {{name: int8-tflite, mode: int8, target: tflite, io_dtype: int8, calibration: {train}, "
            "calibration_count: 8, calibration_method: minmax, min_agreement: 0, min_slice_sqnr_db: -1000}\n")
    text = recipe_text(model, outputs="scores", extra_variant=int8)
    recipe = tmp_path / "tiny-onnx.yaml"
    recipe.write_text(text.replace("  - {name: float16, mode: float16}\n  - {name: dynamic, mode: dynamic}\n", "")
                      .replace("  - {name: int8, mode: int8, io_dtype: float32", "  - {name: int8, mode: int8, "
                               "io_dtype: float32, min_agreement: 0, min_slice_sqnr_db: -1000"))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    built = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where)
    assert built.returncode == 0, built.stderr[-2000:]
    done = run_cli("--quiet", "--json", "--cache-dir", str(tmp_path / "c"), "debug", str(recipe), "--variant",
                   "int8-tflite", *where)
    assert done.returncode == 0, done.stderr[-2000:]
    layers = json.loads(done.stdout)["layers"]
    (logits,) = [row for row in layers if row["op"] == "FULLY_CONNECTED"]
    # -30 beyond -8 would be ~22 / 0.05 = 400 steps; within the bound, rounding
    assert logits["rmse_steps"] < 1.0 and logits["max_abs_error"] < 3 * logits["scale"], logits


@pytest.mark.parametrize("target", ["onnx", "tflite"])
def test_auto_ranges_keep_the_method_the_float_model_agrees_with_best(target, tmp_path, mirror):
    """calibration_method auto: each method measured as a variant declaring it measures (same paired fidelity and
    worst SQNR), on the calibration folder's images after the 8 calibrated on, as many as verify judges by, and
    not on the verify images; each compared with the first, min/max, image by image; on 4 images no method can
    agree better on significantly more images (a sign test's p is 1/16 at best), so min/max is kept, and the
    artifact is its variant's to the byte; debug explains the variant with the chosen ranges."""
    from mzconvert.backends import backend_for
    from mzconvert.evaluate.cocometrics import sign_test
    from mzconvert.layout import built_stage_model
    from mzconvert.preprocess import list_images
    from mzconvert.recipe.schema import AUTO_CALIBRATION_METHODS
    from mzconvert.stages.fallback import _worst_sqnr, paired_fidelity
    from mzconvert.stages.verify import reference_outputs, verify_variant

    train = MIRROR / "coco" / "train2017"
    io = "int8" if target == "tflite" else "float32"
    declared = "".join(f"  - {{name: int8-{m.replace('_', '-')}, mode: int8, target: {target}, io_dtype: {io}, "
                       f"calibration: {train}, calibration_count: 8, calibration_method: {m}}}\n"
                       for m in AUTO_CALIBRATION_METHODS)
    auto = (f"  - {{name: int8-auto, mode: int8, target: {target}, io_dtype: {io}, calibration: {train}, "
            "calibration_count: 8, calibration_method: auto}\n")
    text = recipe_text(tiny_onnx(tmp_path / "tiny.onnx", depthwise=True), extra_variant=declared + auto)
    text = text.replace("  - {name: float16, mode: float16}\n  - {name: dynamic, mode: dynamic}\n", "")
    variants = run(tmp_path, text)["variants"]
    recipe = load_recipe(tmp_path / "tiny-onnx.yaml")
    ranges = variants["int8-auto"]["ranges"]
    chosen_by = list_images(train)[8:12]  # verify: count 4
    assert ranges["chosen_by"] == [p.name for p in chosen_by] and ranges["images"] == 4, ranges
    assert not set(ranges["chosen_by"]) & {p.name for p in list_images(MIRROR / "coco" / "val2017")}
    assert [s["calibration_method"] for s in ranges["steps"]] == list(AUTO_CALIBRATION_METHODS)
    dist = tmp_path / "dist" / "tiny-onnx"
    float_model = backend_for(recipe).GraphRunner(built_stage_model(tmp_path / "build", recipe, "strip"), recipe)
    reference = reference_outputs(float_model, recipe, chosen_by, tmp_path)
    per_image = {}
    for step in ranges["steps"]:
        twin = variants[f"int8-{step['calibration_method'].replace('_', '-')}"]
        metrics = verify_variant(dist / twin["file"], reference, list(float_model.output_names), recipe,
                                 per_image=True)
        assert step["fidelity"] == paired_fidelity(metrics, recipe), step
        assert step["worst_sqnr_db"] == pytest.approx(_worst_sqnr(metrics), abs=1e-9), step
        assert step["within_floors"], step
        assert len(metrics["per_image"]) == 4 and np.mean(metrics["per_image"]) == step["fidelity"], metrics
        per_image[step["calibration_method"]] = metrics["per_image"]
    first, *others = ranges["steps"]
    for step in others:
        assert step["against_first"] == list(sign_test(per_image[step["calibration_method"]], per_image["minmax"]))
        assert step["against_first"][2] >= 1 / 16, step
    assert ranges["chosen"] == first and first["calibration_method"] == "minmax"
    chosen = variants["int8-minmax"]["file"]
    assert (dist / variants["int8-auto"]["file"]).read_bytes() == (dist / chosen).read_bytes()
    explained = run_cli("--json", "debug", str(tmp_path / "tiny-onnx.yaml"), "--variant", "int8-auto", "--out",
                        str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert explained.returncode == 0, explained.stderr[-2000:]


def test_a_classifier_budget_finer_than_one_searched_image_is_said(tmp_path, mirror):
    """max_drop 0.005 on 4 images asks all 4 to agree: the build says so; a budget of one image in 4 is not."""
    variant = (f"  - {{name: int8-budget, mode: int8, io_dtype: float32, calibration: {MIRROR / 'coco' / 'train2017'}, "
               "calibration_count: 8, max_drop: DROP}\n")
    model = tiny_onnx(tmp_path / "tiny.onnx")
    said = "max_drop 0.005 is less than one image of the 4 searched (25.0%): all of them had to agree"
    for drop, expected in (("0.005", True), ("0.25", False)):
        recipe = tmp_path / drop / "tiny-onnx.yaml"
        recipe.parent.mkdir()
        recipe.write_text(recipe_text(model, extra_variant=variant.replace("DROP", drop)))
        done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), "--out", str(tmp_path / drop / "dist"),
                       "--build-dir", str(tmp_path / drop / "build"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert (said in done.stderr) == expected and ("is less than one image" in done.stderr) == expected


def test_auto_ranges_keep_a_method_the_build_would_ship():
    """Only methods within the variant's floors, when any is, are compared: a trained YOLOv8n's mean min/max
    ranges matched 85.9 % of its detections and lost a class's scores (7.2 dB, floor 10), min/max 79.2 % at
    15.7 dB; auto chose the refused one. Of those, the first is kept unless another agrees better on significantly
    more images than worse; of those that do, the best agreement (then worst SQNR)."""
    from mzconvert.stages.fallback import best_ranges

    def step(method, per_image, sqnr, within):
        return {"calibration_method": method, "fidelity": float(np.mean(per_image)), "per_image": per_image,
                "worst_sqnr_db": sqnr, "within_floors": within}

    first = [0.8] * 32
    better_on_10 = [0.9] * 10 + [0.8] * 22  # better on 10 of 32, worse on none: p 1/1024
    better_on_9_worse_on_3 = [0.95] * 9 + [0.75] * 3 + [0.8] * 20  # higher mean, but p 0.073: chance
    tried = [step("minmax", first, 15.7, True), step("percentile", better_on_9_worse_on_3, 13.0, True),
             step("mse", better_on_10, 11.4, True), step("mean_minmax", [1.0] * 32, 7.2, False)]
    assert best_ranges(tried)["calibration_method"] == "mse"
    assert tried[2]["against_first"] == [10, 0, 1 / 1024] and tried[1]["against_first"][:2] == [9, 3]
    assert best_ranges(tried[:2])["calibration_method"] == "minmax"  # percentile's mean is higher: not enough
    assert best_ranges([dict(tried[0], within_floors=False), *tried[1:2]])["calibration_method"] == "percentile"
    refused = [dict(s, within_floors=False) for s in tried]
    assert best_ranges(refused)["calibration_method"] == "mean_minmax"  # none ships: still judged the same way
    tie = [step("minmax", first, 15.7, True), step("percentile", better_on_10, 13.0, True),
           step("mse", better_on_10, 14.0, True)]
    assert best_ranges(tie)["calibration_method"] == "mse"  # equal agreement: the higher worst SQNR


def test_debug_counts_what_a_sum_inherits_from_both_inputs_in_values_not_in_steps():
    """A residual sum of a wide branch (0.1 a step) and a narrow one (0.01 a step), each 1 step off: the sum, at
    0.02 a step, inherits their errors (0.1 in values, 5 of its steps) and adds none; a layer reading one input
    still has what it adds beyond that input's steps. Both runtimes' op names."""
    from mzconvert.stages.debug import _added_errors

    for add, conv in (("ADD", "CONV_2D"), ("Add", "Conv")):
        inherited = math.hypot(0.1, 0.01)
        totals = {"wide": [0.1 ** 2, 1, 0.1], "narrow": [0.01 ** 2, 1, 0.01], "sum": [inherited ** 2, 1, 0.1],
                  "conv": [(1.5 * 0.1) ** 2, 1, 0.2]}
        scales = {"wide": 0.1, "narrow": 0.01, "sum": 0.02, "conv": 0.1}
        rows = {r["layer"]: r for r in _added_errors(totals, scales, {"sum": ["wide", "narrow"], "conv": ["wide"]},
                                                     {"sum": add, "conv": conv, "wide": conv, "narrow": conv})}
        assert rows["sum"]["accumulated_steps"] == pytest.approx(inherited / 0.02)
        assert rows["sum"]["rmse_steps"] == pytest.approx(0.0, abs=1e-9)
        assert rows["conv"]["rmse_steps"] == pytest.approx(0.5)
