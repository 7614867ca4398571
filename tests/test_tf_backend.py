"""TF backend on tiny real graphs built in code: freeze formats, strip errors, all five modes, graph edits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from mzconvert.build import build
from mzconvert.console import Console
from mzconvert.errors import MzError, RecipeError
from mzconvert.planner import BuildOptions
from mzconvert.recipe import load_recipe
from mzconvert.runtime import open_model
from mzconvert.sources.fetch import FetchConfig, Fetcher
from tests.conftest import MIRROR
from tests.tiny_graphs import INPUT, SIZE, tiny_recipe_text, write_tiny_detector

TRAIN = MIRROR / "coco" / "train2017"
VAL = MIRROR / "coco" / "val2017"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_detector(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_qat(tmp_path_factory):
    return write_tiny_detector(tmp_path_factory.mktemp("tiny_qat"), fake_quant=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tar_folder(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def run(tmp_path, text: str, variants=None, until="dist"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(text)
    recipe = load_recipe(recipe_path)
    fetcher = Fetcher(FetchConfig(cache_dir=tmp_path / "cache", mirrors=[]))
    options = BuildOptions(out=tmp_path / "dist", build_root=tmp_path / "build", variants=variants)
    return build(recipe, fetcher, Console(quiet=True), options, until=until)


def with_member(text: str, member: str) -> str:
    return text.replace("source:\n", f"source:\n  member: {member}\n")


ALL_MODES = f"""  - {{name: f32, mode: float32}}
  - {{name: f16, mode: float16}}
  - {{name: dyn, mode: dynamic}}
  - {{name: i8f, mode: int8, io_dtype: float32, calibration: {TRAIN}, calibration_count: 8}}
  - {{name: i8, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: 8}}
  - {{name: u8, mode: int8, io_dtype: uint8, calibration: {TRAIN}, calibration_count: 8}}
"""


def test_all_modes_have_the_io_dtypes_asked_for_and_track_the_float_graph(tmp_path, tiny, mirror):
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=ALL_MODES, images=VAL)
    manifest = run(tmp_path, text.replace(f"images: {VAL}", f"images: {VAL}\n  count: 4"))
    expected = {"f32": "float32", "f16": "float32", "dyn": "float32", "i8f": "float32", "i8": "int8", "u8": "uint8"}
    for name, dtype in expected.items():
        v = manifest["variants"][name]
        assert v["inputs"][0]["dtype"] == dtype
        assert [o["dtype"] for o in v["outputs"]] == [dtype, dtype]
        assert v["verify"]["images"] == 4
        assert v["verify"]["logits"]["cosine"] > 0.95, (name, v["verify"])
    assert manifest["variants"]["f32"]["verify"]["boxes"]["max_abs_error"] < 1e-4
    anchors = np.load(tmp_path / "dist" / "tiny" / "anchors.npy")
    assert anchors.shape == (64, 4)
    sizes = {n: a["size"] for n, a in manifest["artifacts"].items()}
    assert sizes["tiny_i8.tflite"] < sizes["tiny_f32.tflite"]
    # One calibration, other I/O types: fed as LiteRT's own QUANTIZE kernel quantizes, the integer-I/O
    # models answer exactly what their float-I/O twin does on real images.
    from mzconvert.preprocess import prepare

    recipe = load_recipe(tmp_path / "tiny.yaml")
    float_io, *integer_io = (open_model(tmp_path / "dist" / "tiny" / f"tiny_{name}.tflite", list(recipe.strip.outputs))
                             for name in ("i8f", "i8", "u8"))
    for path in sorted(TRAIN.glob("*.jpg"))[:16]:
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        for model in integer_io:
            for ours, twins in zip(model.run(tensor), float_io.run(tensor)):
                np.testing.assert_array_equal(ours, twins)


@pytest.mark.parametrize("fmt, key, member", [("tf-checkpoint", "checkpoint", "checkpoint"),
                                              ("tf-saved-model", "saved_model", "saved_model")])
def test_checkpoint_and_saved_model_freeze_to_the_same_function(tmp_path, tiny, fmt, key, member):
    archive = tar_folder(tiny[key], tmp_path / f"{key}.tar.gz")
    text = with_member(tiny_recipe_text(archive, sha256(archive), fmt=fmt), member)
    folders = run(tmp_path, text, until="strip")
    stripped = Path(folders["strip"]) / "stripped.pb"
    reference = Path(run(tmp_path / "ref", tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"])),
                         until="strip")["strip"]) / "stripped.pb"
    from mzconvert.backends.tf import GraphRunner

    recipe = load_recipe(tmp_path / "tiny.yaml")
    x = np.random.RandomState(1).uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    for got, want in zip(GraphRunner(stripped, recipe).run(x), GraphRunner(reference, recipe).run(x)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_uint8_qat_honours_fake_quant_ranges(tmp_path, tiny_qat):
    text = tiny_recipe_text(tiny_qat["frozen"], sha256(tiny_qat["frozen"]),
                            variants="  - {name: qat, mode: uint8-qat, quantized_input_stats: {mean: 127.5, std: 127.5}}\n")
    manifest = run(tmp_path, text)
    qat = manifest["variants"]["qat"]
    assert qat["inputs"][0]["dtype"] == "uint8"
    assert qat["inputs"][0]["scale"] == pytest.approx(1 / 127.5, rel=1e-3)
    model = open_model(tmp_path / "dist" / "tiny" / "tiny_qat.tflite")
    assert model.float_tensor_count() == 0


def test_uint8_qat_without_ranges_is_caught_not_shipped(tmp_path, tiny):
    """The converter silently returns a float model with a uint8 input here; the check refuses it."""
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants="  - {name: qat, mode: uint8-qat}\n")
    with pytest.raises(MzError, match="variant 'qat' \\(uint8-qat\\) is not what the recipe asked for"):
        run(tmp_path, text)
    assert not (tmp_path / "dist" / "tiny").exists()


def test_unknown_strip_tensor_lists_close_matches(tmp_path, tiny):
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"])).replace("outputs: [boxes, logits]",
                                                                            "outputs: [boxes, logit]")
    text = text.replace("class_output: logits", "class_output: logit")
    with pytest.raises(RecipeError, match=r"strip.outputs: tensor 'logit' is not in the graph; did you mean 'logits'"):
        run(tmp_path, text)


def test_graph_edits_set_typed_attributes(tmp_path, tiny):
    base = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]))
    folders = run(tmp_path, base + "graph_edits:\n  conv1/Conv2D: {use_cudnn_on_gpu: false}\n", until="freeze")
    from mzconvert.backends.tf import read_graph_def

    node = next(n for n in read_graph_def(Path(folders["freeze"]) / "frozen.pb").node if n.name == "conv1/Conv2D")
    assert node.attr["use_cudnn_on_gpu"].b is False
    with pytest.raises(RecipeError, match="graph_edits.conv1/Conv2D.use_cudnn: node has no attribute"):
        run(tmp_path / "a", base + "graph_edits:\n  conv1/Conv2D: {use_cudnn: false}\n", until="freeze")
    with pytest.raises(RecipeError, match="does not fit the attribute's type"):
        run(tmp_path / "b", base + "graph_edits:\n  conv1/Conv2D: {use_cudnn_on_gpu: 3}\n", until="freeze")
    with pytest.raises(RecipeError, match="graph_edits: tensor 'conv9' is not in the graph"):
        run(tmp_path / "c", base + "graph_edits:\n  conv9: {x: 1}\n", until="freeze")


def test_corrupt_model_file_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.pb"
    bad.write_bytes(b"\x0a\xff\xff\xff garbage that is no protobuf")
    with pytest.raises(MzError, match="bad.pb: not a TensorFlow GraphDef"):
        run(tmp_path, tiny_recipe_text(bad, sha256(bad)), until="freeze")


def test_undecodable_calibration_image_is_named(tmp_path, tiny):
    folder = tmp_path / "calib"
    folder.mkdir()
    (folder / "fine.jpg").write_bytes((TRAIN / sorted(p.name for p in TRAIN.iterdir() if p.suffix == ".jpg")[0]).read_bytes())
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    variants = f"  - {{name: i8, mode: int8, calibration: {folder}}}\n"
    with pytest.raises(MzError, match="broken.jpg: not a decodable image"):
        run(tmp_path, tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=variants))


def test_variant_member_builds_its_own_chain(tmp_path, tiny, tiny_qat):
    """One archive, two graphs (like MobileDet's fp32/ and uint8/): each variant converts its own."""
    root = tmp_path / "zoo"
    (root / "fp32").mkdir(parents=True)
    (root / "uint8").mkdir()
    (root / "fp32" / "graph.pb").write_bytes(tiny["frozen"].read_bytes())
    (root / "uint8" / "graph.pb").write_bytes(tiny_qat["frozen"].read_bytes())
    archive = tar_folder(root, tmp_path / "zoo.tar.gz")
    variants = ("  - {name: f32, mode: float32}\n"
                "  - {name: qat, mode: uint8-qat, member: zoo/uint8/graph.pb}\n")
    text = with_member(tiny_recipe_text(archive, sha256(archive), variants=variants), "zoo/fp32/graph.pb")
    manifest = run(tmp_path, text)
    assert manifest["variants"]["f32"]["source_file"] == "zoo/fp32/graph.pb"
    assert manifest["variants"]["qat"]["source_file"] == "zoo/uint8/graph.pb"
    assert manifest["variants"]["qat"]["inputs"][0]["dtype"] == "uint8"
    assert (tmp_path / "build" / "tiny" / "strip-zoo-uint8-graph.pb").is_dir()


def test_declared_shape_that_does_not_fit_the_graph(tmp_path, tiny):
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"])).replace("shape: [1, 32, 32, 3]", "shape: [1, 64, 64, 3]")
    with pytest.raises(RecipeError, match=r"input.shape: the graph cannot run at \[1, 64, 64, 3\]: Cannot feed"):
        run(tmp_path, text, until="strip")


def test_vela_compiles_integer_models_and_refuses_float_ones(tmp_path, tiny, mirror):
    from mzconvert.stages.vela import compile_for_npu

    variants = (f"  - {{name: f32, mode: float32}}\n"
                f"  - {{name: i8, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: 4}}\n")
    target = ("targets:\n  vela: {accelerator: ethos-u55-128, system_config: Ethos_U55_High_End_Embedded, "
              "memory_mode: Shared_Sram, max_cpu_ops: 0}\n")
    manifest = run(tmp_path, tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=variants) + target)
    vela = manifest["variants"]["i8"]["vela"]["ethos-u55-128"]
    assert vela["accelerator"] == "ethos-u55-128" and vela["cpu_op_count"] == 0 and vela["npu_ops"] > 0
    assert vela["file"] == "tiny_i8_vela.tflite" and vela["sram_used_kib"] > 0
    assert "vela" not in manifest["variants"]["f32"]
    recipe = load_recipe(tmp_path / "tiny.yaml")
    with pytest.raises(MzError, match="vela compiles integer models only; variant 'f32' is float32"):
        compile_for_npu(tmp_path / "dist" / "tiny" / "tiny_f32.tflite", recipe, recipe.variant("f32"),
                        recipe.vela[0], tmp_path)
    bad = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=variants) + target.replace(
        "Shared_Sram", "Shared_SRAM")
    with pytest.raises(RecipeError, match="targets.vela.memory_mode: 'Shared_SRAM' is not in .*vela.ini; one of"):
        run(tmp_path / "bad", bad)


TWO_TARGETS = """targets:
  vela:
    - {name: mcu, accelerator: ethos-u55-128, system_config: Ethos_U55_High_End_Embedded, memory_mode: Shared_Sram}
    - {name: soc, accelerator: ethos-u65-256, system_config: Ethos_U65_High_End, memory_mode: Dedicated_Sram,
       max_sram_kib: BUDGET}
"""


def test_one_quantized_model_compiled_for_two_npus_with_budgets(tmp_path, tiny, mirror):
    variants = f"  - {{name: i8, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: 4}}\n"
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=variants)
    manifest = run(tmp_path, text + TWO_TARGETS.replace("BUDGET", "10000"))
    vela = manifest["variants"]["i8"]["vela"]
    assert set(vela) == {"mcu", "soc"}
    assert vela["mcu"]["accelerator"] == "ethos-u55-128" and vela["soc"]["accelerator"] == "ethos-u65-256"
    assert vela["mcu"]["file"] == "tiny_i8_mcu_vela.tflite" and vela["soc"]["file"] == "tiny_i8_soc_vela.tflite"
    assert vela["mcu"]["summary_csv"] != vela["soc"]["summary_csv"]
    assert vela["mcu"]["cycles_total"] != vela["soc"]["cycles_total"]
    dist = tmp_path / "dist" / "tiny"
    for target in vela.values():
        assert (dist / target["file"]).is_file() and (dist / target["summary_csv"]).is_file()
    tight = vela["soc"]["sram_used_kib"] / 2
    with pytest.raises(RecipeError, match=rf"targets.vela\[1\].max_sram_kib: variant 'i8' on soc needs "
                                          rf"{vela['soc']['sram_used_kib']:.2f} KiB of SRAM, more than the budget"):
        run(tmp_path, text + TWO_TARGETS.replace("BUDGET", f"{tight:g}"))


def test_two_targets_with_one_name_are_refused(tmp_path, tiny):
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"])) + TWO_TARGETS.replace(
        "name: soc", "name: mcu").replace("BUDGET", "1")
    (tmp_path / "tiny.yaml").write_text(text)
    with pytest.raises(RecipeError, match=r"targets.vela\[1\].name: two targets are named 'mcu'"):
        load_recipe(tmp_path / "tiny.yaml")


def test_attached_postprocessing_equals_our_decode_on_real_images(tmp_path, tiny, mirror):
    """A float model ending in TFLite_Detection_PostProcess gives exactly our decode's detections."""
    from mzconvert.preprocess import prepare
    from mzconvert.tasks.detection import postprocessed_detections, ssd_detections

    variants = ("  - {name: f32, mode: float32, attach_postprocess: true}\n"
                "  - {name: raw, mode: float32}\n")
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=variants)
    manifest = run(tmp_path, text.replace("  labels: [thing]", "  labels: [thing]\n  nms_score_threshold: 0.2"))
    assert manifest["variants"]["f32"]["postprocess_attached"] and not manifest["variants"]["raw"]["postprocess_attached"]
    recipe = load_recipe(tmp_path / "tiny.yaml")
    dist = tmp_path / "dist" / "tiny"
    attached, raw = open_model(dist / "tiny_f32.tflite"), open_model(dist / "tiny_raw.tflite", list(recipe.strip.outputs))
    anchors = np.load(dist / "anchors.npy")
    compared = 0
    for path in sorted((MIRROR / "coco" / "val2017").glob("*.jpg"))[:6]:
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        theirs = postprocessed_detections(*attached.run(tensor))
        ours = ssd_detections(dict(zip(recipe.strip.outputs, raw.run(tensor))), recipe.postprocess, anchors)
        assert len(theirs.scores) == len(ours.scores)
        np.testing.assert_allclose(theirs.boxes, ours.boxes, atol=1e-3)
        np.testing.assert_allclose(theirs.scores, ours.scores, rtol=1e-5)
        compared += len(ours.scores)
    assert compared > 0


def test_attach_needs_a_tflite_ssd_detector(tmp_path, tiny):
    variants = "  - {name: f32, mode: float32, attach_postprocess: true}\n"
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=variants)
    (tmp_path / "tiny.yaml").write_text(text.replace("kind: ssd", "kind: tflite-detection-postprocess").replace(
        "  anchors_tensor: anchors\n  box_coder_scales: [10, 10, 5, 5]\n  box_output: boxes\n  class_output: logits\n", ""))
    with pytest.raises(RecipeError, match=r"variants\[0\].attach_postprocess: post-processing attaches to TFLite"):
        load_recipe(tmp_path / "tiny.yaml")


def test_an_output_upstream_of_the_cut_is_named(tmp_path, tiny):
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"])).replace(
        "outputs: [boxes, logits]", "outputs: [boxes, image_tensor]")
    with pytest.raises(RecipeError, match="strip.outputs: 'image_tensor' does not depend on strip.inputs"):
        run(tmp_path, text.replace("class_output: logits", "class_output: image_tensor"), until="strip")


def test_one_calibration_serves_every_int8_variant_like_separate_conversions(tmp_path, tiny, mirror):
    """Calibrate once, quantize per I/O type: the converter's one-piece conversion of each variant (its own
    calibrator) gives the same dtypes and zero points, and outputs equal up to the float rounding of the
    recorded ranges (this graph has no in-place ADD, where the two calibrators differ: see the next test)."""
    from mzconvert.backends import tf as tf_backend
    from mzconvert.preprocess import prepare
    from mzconvert.stages.calibrate import calibration_batches

    # its class logits over their whole range, as the converter's calibrator records them (bounded_logits: a
    # sigmoid's band, which only ours applies)
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=ALL_MODES)
    manifest = run(tmp_path, text.replace("  labels: [thing]\n", "  labels: [thing]\n  bounded_logits: false\n"))
    recipe = load_recipe(tmp_path / "tiny.yaml")
    assert not recipe.sigmoid_read_outputs
    assert len([p for p in (tmp_path / "build" / "tiny" / "calibrate").iterdir() if p.is_dir()]) == 1  # i8f, i8, u8 share it
    images = sorted(TRAIN.glob("*.jpg"))[:8]
    stripped = tmp_path / "build" / "tiny" / "strip" / "stripped.pb"
    for name in ("i8f", "i8", "u8"):
        (tmp_path / name).mkdir()
        separate = tf_backend.convert(stripped, recipe, recipe.variant(name), calibration_batches(images, recipe),
                                      tmp_path / name)
        shared, alone = open_model(tmp_path / "dist" / "tiny" / manifest["variants"][name]["file"]), open_model(separate)
        for ours, theirs in zip(shared.inputs + shared.outputs, alone.inputs + alone.outputs):
            assert (ours.dtype, ours.zero_point) == (theirs.dtype, theirs.zero_point)
            assert (ours.scale is None) == (theirs.scale is None)
            assert ours.scale is None or ours.scale == pytest.approx(theirs.scale, rel=1e-5)
        for path in sorted(VAL.glob("*.jpg"))[:4]:
            tensor = prepare(path, recipe.preprocess, recipe.input).tensor
            for a, b in zip(shared.run(tensor), alone.run(tensor)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
def test_calibrated_ranges_are_the_ranges_the_float_graph_takes(tmp_path, mirror, method):
    """A residual block (conv -> linear projection -> ADD): every recorded range, the ADD's inputs included,
    is what TensorFlow computes for that tensor on the calibration images: its min and max, with
    calibration_method percentile the values leaving (100 - p) % of all values below and above, with mse
    the range of least quantization error over TensorFlow's values."""
    import tensorflow as tf

    from mzconvert.backends.tf import read_graph_def
    from mzconvert.preprocess import prepare
    from mzconvert.quant.ranges import _Histogram
    from mzconvert.tflite_file import read_model, schema

    graphs = write_tiny_detector(tmp_path / "graphs", residual=True)
    percentile = 99.0 if method == "percentile" else None
    variants = (f"  - {{name: i8, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: 6, "
                f"calibration_method: {method}, calibration_percentile: 99.0}}\n")
    run(tmp_path, tiny_recipe_text(graphs["frozen"], sha256(graphs["frozen"]), variants=variants))
    recipe = load_recipe(tmp_path / "tiny.yaml")
    calibrated = next((tmp_path / "build" / "tiny" / "calibrate").glob("*/calibrated.tflite"))
    model = read_model(calibrated)
    graph = model.subgraphs[0]
    add = next(op for op in graph.operators
               if model.operatorCodes[op.opcodeIndex].builtinCode == schema().BuiltinOperator.ADD)
    recorded = sorted((graph.tensors[i].quantization.min[0], graph.tensors[i].quantization.max[0])
                      for i in [*add.inputs, *add.outputs])

    images = sorted(TRAIN.glob("*.jpg"))[:6]
    with tf.Graph().as_default() as g:
        tf.compat.v1.import_graph_def(read_graph_def(tmp_path / "build" / "tiny" / "strip" / "stripped.pb"), name="")
        session = tf.compat.v1.Session(graph=g)
        fetched = [session.run(["Relu6_1:0", "residual/project:0", "residual:0"],  # conv2's ReLU6, projection, sum
                               {f"{INPUT}:0": prepare(p, recipe.preprocess, recipe.input).tensor}) for p in images]
    truth = []
    for k in range(3):
        values = np.sort(np.concatenate([f[k].ravel() for f in fetched]))
        rank = int((100 - percentile) / 100 * values.size) if percentile else 0
        truth.append((float(values[rank]), float(values[values.size - 1 - rank])))
        if method == "mse":
            histogram = _Histogram(*truth[-1])
            histogram.add(values)
            truth[-1] = histogram.mse_range()
    np.testing.assert_allclose(recorded, sorted(truth), rtol=1e-5, atol=1e-6)


def test_debug_ranks_a_deliberately_damaged_layer_first(tmp_path, mirror):
    """conv2 carries a weight of 1000 on an input that is always zero: harmless in float, but its first
    output channel's other int8 weights round to zero. The debug table must put conv2 on top."""
    import json

    from mzconvert.preprocess import list_images
    from tests.conftest import run_cli

    damaged = write_tiny_detector(tmp_path / "graphs", damaged=True)["frozen"]
    variants = f"  - {{name: i8, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: 8}}\n"
    recipe = tmp_path / "tiny.yaml"
    # judged over whole outputs (bounded_logits: false), where the damage shows in every value
    recipe.write_text(tiny_recipe_text(damaged, sha256(damaged), variants=variants, images=VAL).replace(
        f"images: {VAL}", f"images: {VAL}\n  count: 6").replace("  labels: [thing]\n",
                                                                  "  labels: [thing]\n  bounded_logits: false\n"))
    where = ["--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    failed = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where)
    assert failed.returncode == 1 and "variants[0].min_" in failed.stderr, failed.stderr[-2000:]  # below its floor
    recipe.write_text(recipe.read_text().replace("calibration_count: 8}", "calibration_count: 8, min_matched: 0, "
                                                 "min_slice_sqnr_db: -1000}"))  # accepted as it is: shipped
    assert run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where).returncode == 0
    done = run_cli("--quiet", "--json", "--cache-dir", str(tmp_path / "c"), "debug", str(recipe), "--variant", "i8",
                   *where)
    assert done.returncode == 0, done.stderr[-2000:]
    layers = json.loads(done.stdout)["layers"]
    assert "conv2" in layers[0]["layer"] and layers[0]["rmse_steps"] > 3 * layers[1]["rmse_steps"], layers[:3]
    dist = tmp_path / "dist" / "tiny"
    assert (dist / "debug" / "i8.png").is_file() and "debug/i8.json" in (dist / "MD5SUMS").read_text()
    assert run_cli("report", str(recipe), "--out", str(tmp_path / "dist")).returncode == 0
    assert "## Per-layer quantization error: i8" in (dist / "report.md").read_text()
    # the layer debug ranks first, kept float (float_layers), wins the damage back; the rest stays int8
    kept = f"  - {{name: i8-fl, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: 8, " \
           f"float_layers: [{layers[0]['layer']}]}}\n" \
           f"  - {{name: i8-budget, mode: int8, io_dtype: int8, calibration: {TRAIN}, calibration_count: 8, " \
           f"max_drop: 0.05}}\n"
    npu = "targets:\n  vela: {accelerator: ethos-u55-128, system_config: Ethos_U55_High_End_Embedded, " \
          "memory_mode: Shared_Sram}\n"
    recipe.write_text(recipe.read_text().replace("verify:", kept + npu + "verify:"))
    built = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(recipe), *where)
    assert built.returncode == 0, built.stderr[-2000:]
    variants = json.loads(built.stdout)["tiny"]["variants"]

    def worst(name):
        return min(m.get("worst_slice", m)["sqnr_db"] for m in variants[name]["verify"].values() if isinstance(m, dict))
    assert worst("i8-fl") > worst("i8") + 10, (worst("i8"), worst("i8-fl"))
    from mzconvert.runtime import TFLiteRunner

    mixed = TFLiteRunner(dist / variants["i8-fl"]["file"])
    assert mixed.inputs[0].dtype == "int8" and mixed.float_tensor_count() > 0
    # vela compiles it, the float layer on the CPU beside the NPU, counted
    (compiled,) = variants["i8-fl"]["vela"].values()
    assert compiled["cpu_op_count"] > 0 and compiled["npu_ops"] > 0, compiled
    (plain,) = variants["i8"]["vela"].values()
    assert plain["cpu_op_count"] == 0, plain
    # max_drop: the build searched the layers to keep float itself, debug's worst first, until within the budget
    search = variants["i8-budget"]["search"]
    assert search["steps"][0]["float_layers"] == [] and search["steps"][0]["fidelity"] < 0.95, search
    assert search["met"] and search["chosen"]["float_layers"][0] == layers[0]["layer"], search
    # chosen on the 6 images of the calibration folder after the 8 calibrated on, judged on the 6 verify images
    assert search["chosen_by"] == [p.name for p in list_images(TRAIN)[8:14]], search["chosen_by"]
    assert variants["i8-budget"]["verify"]["images"] == 6
    assert TFLiteRunner(dist / variants["i8-budget"]["file"]).float_tensor_count() > 0


def test_a_name_with_the_import_scope_gets_the_name_in_the_file(tmp_path, tiny):
    """tf.import_graph_def (TensorBoard, most notebooks) shows 'import/logits'; the file says 'logits'."""
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]))
    text = text.replace("outputs: [boxes, logits]", "outputs: [boxes, import/logits]").replace(
        "class_output: logits", "class_output: import/logits")
    with pytest.raises(RecipeError, match=r"tensor 'import/logits' is not in the graph; did you mean 'logits'"):
        run(tmp_path, text, until="strip")


def test_parallel_variants_give_the_bytes_of_a_serial_build(tmp_path, tiny, mirror):
    """build -j 2: variants in two threads, the shared calibration run once; the same dist."""
    from tests.conftest import run_cli

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=ALL_MODES, images=VAL)
                      .replace(f"images: {VAL}", f"images: {VAL}\n  count: 4"))
    dists = {}
    for jobs in ("1", "2"):
        where = ["--out", str(tmp_path / jobs / "dist"), "--build-dir", str(tmp_path / jobs / "build")]
        done = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), "-j", jobs, *where)
        assert done.returncode == 0, done.stderr[-2000:]
        calibrations = [line for line in done.stderr.splitlines() if "calibrate/" in line and line.endswith(": running")]
        assert len(calibrations) == 1  # once for i8f, i8 and u8
        dists[jobs] = (tmp_path / jobs / "dist" / "tiny" / "MD5SUMS").read_text()
    assert dists["1"] == dists["2"]
    forced = run_cli("--cache-dir", str(tmp_path / "c"), "build", str(recipe), "-j", "2", "--force",
                     "--out", str(tmp_path / "2" / "dist"), "--build-dir", str(tmp_path / "2" / "build"))
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert len([line for line in forced.stderr.splitlines() if "calibrate/" in line and line.endswith(": running")]) == 1
    assert (tmp_path / "2" / "dist" / "tiny" / "MD5SUMS").read_text() == dists["1"]


@pytest.mark.skipif(sys.platform != "linux", reason="a thread has a nice value of its own on Linux")
def test_checks_run_at_a_lower_priority_and_so_do_the_processes_they_start():
    """The build's checks (verify, vela) yield the cores to the conversion the build waits for."""
    from concurrent.futures import ThreadPoolExecutor

    from mzconvert.build import CHECKS_NICENESS, _yielding_thread

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    with ThreadPoolExecutor(max_workers=1, initializer=_yielding_thread) as checks:
        in_check = checks.submit(niceness).result()
        child = checks.submit(subprocess.run, [sys.executable, "-c", "import os; print(os.nice(0))"],
                              capture_output=True, text=True, check=True).result()
    assert in_check == min(before + CHECKS_NICENESS, 19)
    assert int(child.stdout) == in_check  # vela's process
    assert niceness() == before  # the conversions' thread keeps its priority


def test_verify_compares_detections_with_the_float_models_decoded_once(tmp_path, tiny, mirror):
    """The reference pass decodes the float model's detections once for every variant; labels that do not
    fit the model leave the variants' detections uncompared, said in the build's log, not a failure."""
    from mzconvert.stages.verify import saved_detections, verify_variant
    from mzconvert.tasks.detection import load_anchors, matched_detections, raw_detections
    from tests.conftest import run_cli

    recipe = tmp_path / "tiny.yaml"
    text = tiny_recipe_text(tiny["frozen"], sha256(tiny["frozen"]), variants=ALL_MODES, images=VAL)
    recipe.write_text(text.replace(f"images: {VAL}", f"images: {VAL}\n  count: 4"))
    where = ["--cache-dir", str(tmp_path / "c"), "build", str(recipe), "--variant", "f32", "--variant", "i8",
             "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build")]
    done = run_cli("--json", *where)
    assert done.returncode == 0, done.stderr[-2000:]
    variants = json.loads(done.stdout)["tiny"]["variants"]
    assert variants["f32"]["verify"]["matched_detections"] == 1.0 and variants["f32"]["verify"]["matched_interval"] == [
        1.0, 1.0]
    i8 = variants["i8"]["verify"]  # its share, and where 4 images resampled put it
    assert i8["matched_interval"][0] <= i8["matched_detections"] <= i8["matched_interval"][1] <= 1, i8
    reference = next((tmp_path / "build" / "tiny" / "reference").glob("*/reference.npz"))
    with np.load(reference) as saved:
        assert {"boxes_3", "scores_3", "labels_3"} <= set(saved.files)
        floats = [saved_detections(saved, i) for i in range(4)]
    # image by image, as searches compare candidates: each image's share matched, 1 where none is compared
    loaded, model = load_recipe(recipe), tmp_path / "dist" / "tiny" / variants["i8"]["file"]
    names = list(loaded.strip.outputs)
    per_image = verify_variant(model, reference, names, loaded, tmp_path / "build" / "tiny" / "strip" / "anchors.npy",
                               per_image=True)["per_image"]
    runner, anchors = open_model(model, names), load_anchors(tmp_path / "build" / "tiny" / "strip" / "anchors.npy")
    with np.load(reference) as saved:
        counts = [matched_detections(f, raw_detections(runner.run(saved[f"input_{i}"]), names, loaded.postprocess,
                                                       anchors, loaded.input.height_width))
                  for i, f in enumerate(floats)]
    assert per_image == [hits / total if total else 1.0 for hits, total in counts], (per_image, counts)
    assert sum(h for h, _ in counts) / sum(t for _, t in counts) == i8["matched_detections"]
    recipe.write_text(recipe.read_text().replace("labels: [thing]", "labels: [thing, other, third]"))
    done = run_cli(*where)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: i8: detections not compared with the float model's: the model scores" in done.stderr
    assert "matched_detections" not in json.loads((tmp_path / "dist" / "tiny" / "manifest.json").read_text()
                                                  )["variants"]["i8"]["verify"]
