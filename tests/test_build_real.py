"""The real SSDLite MobileNetV2 (pedestrian) graph through every stage, as `make demo` runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MIRROR, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not MIRROR.is_dir():
        pytest.skip(f"the real-data mirror {MIRROR} is not on this machine")
    root = tmp_path_factory.mktemp("real")
    args = ["--cache-dir", str(root / "cache"), "--mirror", str(MIRROR), "build", "pedestrian-ssdlite",
            "--out", str(root / "dist"), "--build-dir", str(root / "build")]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    return root, args, first


def test_dist_has_every_variant_and_md5sums_pass(built):
    root, _, _ = built
    dist = root / "dist" / "pedestrian-ssdlite"
    check = subprocess.run(["md5sum", "-c", "MD5SUMS"], cwd=dist, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    names = {p.name for p in dist.iterdir()}
    for variant in ("float32", "float16", "dynamic", "int8-float-io", "int8", "int8-detect"):
        assert f"pedestrian-ssdlite_{variant}.tflite" in names
    assert {"anchors.npy", "labels.txt", "manifest.json", "pedestrian-ssdlite_int8_u65_vela.tflite",
            "pedestrian-ssdlite_int8_u65_summary_Ethos_U65_High_End.csv", "pedestrian-ssdlite_int8_u55_vela.tflite",
            "pedestrian-ssdlite_int8_u55_summary_Ethos_U55_High_End_Embedded.csv"} <= names
    anchors = np.load(dist / "anchors.npy")
    assert anchors.shape == (1917, 4) and anchors.dtype == np.float32


def test_manifest_describes_artifacts_tensors_and_tools(built):
    root, _, _ = built
    dist = root / "dist" / "pedestrian-ssdlite"
    manifest = json.loads((dist / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == "7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a"
    assert len(manifest["recipe_sha256"]) == 64
    assert manifest["postprocess"]["box_coder_scales"] == [10.0, 10.0, 5.0, 5.0]
    assert manifest["postprocess"]["count"] == 1917
    for name, entry in manifest["artifacts"].items():
        assert entry["size"] == (dist / name).stat().st_size
    assert {"tensorflow", "ethos-u-vela", "ai-edge-litert", "mzconvert", "mzconvert code"} <= set(manifest["tools"])
    int8 = manifest["variants"]["int8"]
    assert int8["inputs"][0]["dtype"] == "int8" and int8["inputs"][0]["scale"] > 0
    assert [o["name"] for o in int8["outputs"]] == ["concat", "concat_1"]
    assert all(o["dtype"] == "int8" for o in int8["outputs"])
    assert manifest["variants"]["int8-float-io"]["inputs"][0]["dtype"] == "float32"
    u65, u55 = int8["vela"]["u65"], int8["vela"]["u55"]  # one quantized model, two NPUs
    assert u65["cpu_op_count"] == 0 and u65["npu_ops"] > 100 and u55["cpu_op_count"] == 0
    assert 0 < u65["inference_time_ms"] < u55["inference_time_ms"] < 50 and u65["macs"] == u55["macs"] > 5e8
    assert u65["dram_used_kib"] > 0 and u55["off_chip_flash_used_kib"] > 0 and u55["sram_used_kib"] > 0
    assert manifest["variants"]["int8-float-io"]["vela"]["u65"]["cpu_op_count"] == 3


def test_every_variant_checked_against_the_float_graph_on_real_images(built):
    root, _, first = built
    manifest = json.loads((root / "dist" / "pedestrian-ssdlite" / "manifest.json").read_text())
    float32 = manifest["variants"]["float32"]["verify"]
    assert float32["images"] == 32
    assert float32["concat"]["max_abs_error"] < 1e-3 and float32["concat_1"]["max_abs_error"] < 1e-3
    for variant in ("float16", "dynamic", "int8-float-io", "int8"):
        for output in ("concat", "concat_1"):
            metrics = manifest["variants"][variant]["verify"][output]
            assert metrics["cosine"] > 0.98, (variant, output, metrics)
            assert metrics["sqnr_db"] > 15, (variant, output, metrics)
    # the NPU's int8 variants are verified as the device computes (LiteRT's reference kernels), the rest optimized
    assert "int8 (reference kernels) vs float graph, output concat_1 on 32 val images: cosine" in first.stderr
    kernels = {name: v["verify"].get("kernels") for name, v in manifest["variants"].items()}
    assert kernels == {"float32": "optimized", "float16": "optimized", "dynamic": "optimized",
                       "int8-float-io": "reference", "int8": "reference", "int8-detect": "reference"}


def test_noop_rebuild_skips_every_stage_without_importing_tensorflow(built):
    root, args, _ = built
    before = (root / "dist" / "pedestrian-ssdlite" / "MD5SUMS").read_text()
    result = subprocess.run(
        [__import__("sys").executable, "-X", "importtime", "-m", "mzconvert.cli", *args],
        capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ": running" not in result.stderr
    # fetch freeze strip, quantize+verify per variant, vela per int8 variant and NPU, the source pipeline check
    assert result.stderr.count("up to date") >= 1 + 1 + 1 + 6 * 2 + 3 * 2 + 1
    assert "tensorflow" not in result.stderr  # -X importtime lists every imported module
    assert (root / "dist" / "pedestrian-ssdlite" / "MD5SUMS").read_text() == before


def test_two_clean_builds_are_byte_identical(built, tmp_path):
    root, _, _ = built
    again = run_cli("--quiet", "--cache-dir", str(root / "cache"), "build", "pedestrian-ssdlite",
                    "--variant", "float32", "--variant", "int8", "--out", str(tmp_path / "dist"),
                    "--build-dir", str(tmp_path / "build"))
    assert again.returncode == 0, again.stderr[-2000:]
    first = dict(line.split("  ")[::-1] for line in (root / "dist/pedestrian-ssdlite/MD5SUMS").read_text().splitlines())
    second = dict(line.split("  ")[::-1] for line in (tmp_path / "dist/pedestrian-ssdlite/MD5SUMS").read_text().splitlines())
    for name in ("pedestrian-ssdlite_float32.tflite", "pedestrian-ssdlite_int8.tflite", "anchors.npy",
                 "pedestrian-ssdlite_int8_u65_vela.tflite", "pedestrian-ssdlite_int8_u55_vela.tflite", "labels.txt"):
        assert first[name] == second[name], name


def test_changed_variant_reruns_only_its_stages(built, tmp_path):
    root, _, _ = built
    import shutil

    shutil.copytree(root / "build", tmp_path / "build")
    recipe = (Path(__file__).parent.parent / "recipes" / "pedestrian-ssdlite.yaml").read_text()
    local = tmp_path / "pedestrian-ssdlite.yaml"
    int8 = "{name: int8, mode: int8, io_dtype: int8, calibration: coco-train2017-100,"
    floored = "{name: int8-float-io, mode: int8, io_dtype: float32,"  # a floor lowered: the same model judged again
    assert recipe.count(int8) == 1 and recipe.count(floored) == 1
    local.write_text(recipe.replace(int8, int8 + " calibration_count: 50,").replace(floored, floored + " min_matched: 0.5,"))
    result = run_cli("--cache-dir", str(root / "cache"), "build", str(local), "--out", str(tmp_path / "dist"),
                     "--build-dir", str(tmp_path / "build"))
    assert result.returncode == 0, result.stderr[-2000:]
    ran = sorted(line.split("] ")[1].split(":")[0] for line in result.stderr.splitlines() if line.endswith(": running"))
    # int8 calibrates anew (its own count); the int8-float-io and int8-detect share the old calibration
    assert len([r for r in ran if r.startswith("calibrate/")]) == 1
    assert [r for r in ran if not r.startswith("calibrate/")] == ["quantize/int8", "vela/int8/u55", "vela/int8/u65",
                                                                  "verify/int8"]


def coco_subset(folder: Path, count: int) -> Path:
    """The first `count` mirror val2017 images with exactly their official annotations."""
    source = MIRROR / "coco"
    data = json.loads((source / "annotations" / "instances_val2017_subset.json").read_text())
    images = sorted(data["images"], key=lambda i: i["file_name"])[:count]
    ids = {i["id"] for i in images}
    (folder / "val2017").mkdir(parents=True)
    (folder / "annotations").mkdir()
    for image in images:
        (folder / "val2017" / image["file_name"]).symlink_to(source / "val2017" / image["file_name"])
    data |= {"images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}
    (folder / "annotations" / "instances_val2017_subset.json").write_text(json.dumps(data))
    return folder


def test_eval_bench_report_on_real_images(built, tmp_path):
    root, _, _ = built
    where = ["--out", str(root / "dist"), "--build-dir", str(root / "build")]
    dataset = coco_subset(tmp_path / "coco", 24)
    result = run_cli("--json", "--quiet", "eval", "pedestrian-ssdlite", "--dataset", str(dataset), *where)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = json.loads(result.stdout)
    rows = evaluation["results"]
    # the NPU's int8 variants under the reference kernels, and each under the optimized ones beside it
    assert list(rows) == ["source-graph", "float32", "float16", "dynamic", "int8-float-io",
                          "int8-float-io (optimized kernels)", "int8", "int8 (optimized kernels)", "int8-detect",
                          "int8-detect (optimized kernels)", "source-pipeline"]
    assert rows["int8"]["kernels"] == "reference" and rows["int8 (optimized kernels)"]["kernels"] == "optimized"
    assert rows["int8"]["computed_as"] == "int8-float-io"  # one integer model: its int8 I/O and float I/O twins
    assert rows["int8-detect (optimized kernels)"]["difference"]["to"] == "int8-detect"
    assert evaluation["images"] == 24 and "person" in evaluation["scope"]
    assert rows["source-graph"]["AP"] > 0.05
    assert abs(rows["float32"]["AP"] - rows["source-graph"]["AP"]) < 0.01
    assert rows["int8"]["AP"] > 0.8 * rows["float32"]["AP"]

    dist = ["--out", str(root / "dist")]
    bench = run_cli("--json", "--quiet", "bench", "pedestrian-ssdlite", "--runs", "3", "--warmup", "1", *dist)
    assert bench.returncode == 0, bench.stderr[-2000:]
    latency = json.loads(bench.stdout)["results"]
    assert set(latency) == {"float32", "float16", "dynamic", "int8-float-io", "int8", "int8-detect"}
    assert all(r["median_ms"] > 0 and r["peak_rss_mb"] > 10 for r in latency.values())

    report = run_cli("--quiet", "report", "pedestrian-ssdlite", *dist)
    assert report.returncode == 0, report.stderr[-2000:]
    folder = root / "dist" / "pedestrian-ssdlite"
    for name in ("report.md", "report.json", "accuracy.png", "latency.png", "accuracy_vs_size.png"):
        assert (folder / name).stat().st_size > 100, name
    assert (folder / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (folder / "report.md").read_text()
    assert "on 24 images of coco (" in text and "labels from COCO annotations instances_val2017_subset.json" in text
    check = subprocess.run(["md5sum", "-c", "MD5SUMS"], cwd=folder, capture_output=True, text=True)
    assert check.returncode == 0 and "report.md: OK" in check.stdout
    assert f"eval/{evaluation['dataset']['key']}.json: OK" in check.stdout


def test_our_pipeline_reproduces_the_source_graph_end_to_end(built):
    """The graph's own Preprocessor + Postprocessor are the ground truth: with the TF1 resize our AP equals
    theirs on the 132 shared val images, and the build checked it on the verify images."""
    root, args, _ = built
    manifest = json.loads((root / "dist" / "pedestrian-ssdlite" / "manifest.json").read_text())
    assert manifest["source_pipeline_fidelity"]["matched_share"] >= 0.95
    done = run_cli("--quiet", "--json", "eval", "pedestrian-ssdlite", "--dataset", str(MIRROR / "coco"),
                   "--variant", "float32", "--out", str(root / "dist"), "--build-dir", str(root / "build"))
    assert done.returncode == 0, done.stderr[-2000:]
    evaluation = json.loads(done.stdout)
    results = evaluation["results"]
    assert {"source-graph", "float32", "source-pipeline"} <= set(results)
    assert abs(results["source-graph"]["AP"] - results["source-pipeline"]["AP"]) <= 0.002
    assert evaluation["pipeline_fidelity"]["matched_share"] >= 0.95
    assert evaluation["images"] == 132 and evaluation["dataset"]["name"] == "coco"
    low, high = results["float32"]["ratio_interval"]
    assert low == high == 1.0


def test_a_resize_other_than_the_graphs_own_is_warned_about(built, tmp_path):
    root, _, _ = built
    recipe = (Path(__file__).parent.parent / "recipes" / "pedestrian-ssdlite.yaml").read_text()
    local = tmp_path / "pedestrian-ssdlite.yaml"
    local.write_text(recipe.replace("interpolation: tf1-bilinear", "interpolation: pil-bilinear"))
    done = run_cli("--cache-dir", str(root / "cache"), "strip", str(local), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("preprocess.interpolation is 'pil-bilinear', but the source's own preprocessing (cut off by strip) "
            "resizes with tf1-bilinear") in done.stderr


def test_attached_postprocessing_gives_the_boxes_of_our_decode(built):
    """int8-detect ends in TFLite_Detection_PostProcess: on real val images its boxes are our numpy decode's
    of the same int8 outputs; on the NPUs only the op and one DEQUANTIZE stay on the CPU."""
    from ai_edge_litert.interpreter import Interpreter

    from mzconvert.preprocess import prepare
    from mzconvert.recipe import load_recipe
    from mzconvert.tasks.detection import matched_detections, postprocessed_detections, ssd_detections

    root, _, _ = built
    dist = root / "dist" / "pedestrian-ssdlite"
    manifest = json.loads((dist / "manifest.json").read_text())
    detect = manifest["variants"]["int8-detect"]
    assert detect["postprocess_attached"] and [o["name"] for o in detect["outputs"]] == [
        "detection_boxes", "detection_classes", "detection_scores", "num_detections"]
    for target in ("u65", "u55"):
        cpu = detect["vela"][target]["cpu_ops"]
        assert len(cpu) == 2 and any("postprocess/box_encodings/float" in op for op in cpu), cpu
    recipe = load_recipe("pedestrian-ssdlite")
    anchors = np.load(dist / "anchors.npy")
    attached = Interpreter(model_path=str(dist / detect["file"]), experimental_preserve_all_tensors=True)
    attached.allocate_tensors()
    tensors = {d["name"]: d for d in attached.get_tensor_details()}
    annotations = json.loads((MIRROR / "coco" / "annotations" / "instances_val2017_subset.json").read_text())
    with_people = {a["image_id"] for a in annotations["annotations"] if a["category_id"] == 1 and a["area"] > 20000}
    names = sorted(i["file_name"] for i in annotations["images"] if i["id"] in with_people)[:8]
    compared = 0
    for path in (MIRROR / "coco" / "val2017" / name for name in names):
        tensor = prepare(path, recipe.preprocess, recipe.input).tensor
        detail = attached.get_input_details()[0]
        scale, zero = detail["quantization"]
        attached.set_tensor(detail["index"], np.clip(np.round(tensor / scale + zero), -128, 127).astype(np.int8))
        attached.invoke()
        theirs = postprocessed_detections(*(attached.get_tensor(o["index"]) for o in attached.get_output_details()))
        # Our decode gets what the op got in this very run (preserve_all_tensors runs without XNNPACK,
        # whose int8 kernels round differently): the box encodings, and the int8 LOGISTIC's scores
        # (steps of 1/256, where ties are common) as logits, so that both rank and suppress alike.
        q = tensors["postprocess/scores"]
        scores = (attached.get_tensor(q["index"]).astype(np.float32) - q["quantization"][1]) * q["quantization"][0]
        logits = np.log(np.clip(scores, 1e-7, 1 - 1e-7) / np.clip(1 - scores, 1e-7, 1))
        boxes = attached.get_tensor(tensors["postprocess/box_encodings/float"]["index"])
        ours = ssd_detections({"concat": boxes, "concat_1": logits}, recipe.postprocess, anchors)
        assert len(theirs.scores) == len(ours.scores), path.name
        for box in theirs.boxes:  # tied scores may come out in another order: compare as sets
            assert np.abs(ours.boxes - box).max(axis=1).min() <= 1e-3, path.name
        compared += int(np.sum(theirs.scores >= 0.3))
        matched, total = matched_detections(theirs, ours)
        assert matched == total, path.name
    assert compared >= 3
