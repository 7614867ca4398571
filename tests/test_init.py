"""`inspect` and `init` on models nobody here prepared: small ones made in code, and the real pedestrian graph.

Each init'd recipe is built as written: no hand edit of input or output names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import MIRROR, PEDESTRIAN_PB, image_folder, run_cli
from tests.tiny_graphs import INPUT, write_tiny_detector

TRAIN, VAL = MIRROR / "coco" / "train2017", MIRROR / "coco" / "val2017"


def init_and_build(tmp_path: Path, name: str, model: Path, *extra: str) -> dict:
    calibration, verify = image_folder(tmp_path / "calib", TRAIN, 6), image_folder(tmp_path / "check", VAL, 3)
    result = run_cli("init", name, "--from", str(model), "--calibration", str(calibration), "--verify", str(verify),
                     "--to", str(tmp_path / "recipes"), *extra)
    assert result.returncode == 0, result.stderr
    recipe = tmp_path / "recipes" / f"{name}.yaml"
    again = run_cli("init", name, "--from", str(model), "--to", str(tmp_path / "recipes"))
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten
    result = run_cli("--json", "--cache-dir", str(tmp_path / "cache"), "build", str(recipe),
                     "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)[name] | {"recipe": yaml.safe_load(recipe.read_text())}


def tiny_classifier_graph(path: Path, classes: int = 7) -> Path:
    """A frozen classifier graph as a user exports one: float input placeholder -> conv -> pool -> logits."""
    import tensorflow as tf

    rng = np.random.RandomState(1)
    with tf.Graph().as_default() as graph:
        x = tf.compat.v1.placeholder(tf.float32, [1, 24, 24, 3], name="images")
        x = tf.nn.relu(tf.nn.conv2d(x, rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32), 2, "SAME"))
        pooled = tf.reduce_mean(x, [1, 2])
        logits = tf.matmul(pooled, rng.normal(0, 0.5, (8, classes)).astype(np.float32))
        tf.nn.softmax(logits, name="predictions")
    path.write_bytes(graph.as_graph_def().SerializeToString())
    return path


@pytest.fixture(scope="module")
def frozen_classifier(tmp_path_factory):
    """(folder, the frozen classifier graph, what init and build made of it): built once for the tests below."""
    if not MIRROR.is_dir():
        pytest.skip(f"the real-data mirror {MIRROR} is not on this machine")
    folder = tmp_path_factory.mktemp("frozen-classifier")
    graph = tiny_classifier_graph(folder / "my_classifier.pb")
    return folder, graph, init_and_build(folder, "my-classifier", graph)


def test_init_builds_a_frozen_classifier_graph_unchanged(frozen_classifier):
    tmp_path, graph, built = frozen_classifier
    recipe = built["recipe"]
    assert recipe["task"] == "classification" and recipe["format"] == "tf-frozen-graph"
    assert recipe["input"] == {"name": "images", "shape": [1, 24, 24, 3], "layout": "NHWC", "dtype": "float32"}
    assert recipe["strip"]["outputs"] == ["MatMul"]  # its logits: cut before the Softmax of "predictions"
    assert recipe["source"]["sha256"] == __import__("hashlib").sha256(graph.read_bytes()).hexdigest()
    assert set(built["variants"]) == {"float32", "int8"}
    assert built["variants"]["int8"]["inputs"][0]["dtype"] == "int8"
    assert built["variants"]["int8"]["verify"]["images"] == 3
    int8 = tmp_path / "dist" / "my-classifier" / built["variants"]["int8"]["file"]
    result = run_cli("--json", "inspect", str(int8))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["format"] == "tflite" and found["full_integer"] is True
    assert found["inputs"][0]["dtype"] == "int8" and found["inputs"][0]["scale"] > 0
    assert found["ops"]["CONV_2D"] == 1


def test_init_takes_a_converted_tflite_as_it_is(frozen_classifier, tmp_path):
    """Someone's int8 .tflite: init describes it (one variant, its mode), build checks it, compiles it for the
    NPU and ships it; a float .tflite becomes a float32 variant."""
    folder, _, first = frozen_classifier
    dist = folder / "dist" / "my-classifier"
    for variant, expected in (("int8", {"name": "int8", "mode": "int8", "io_dtype": "int8"}),
                              ("float32", {"name": "float32", "mode": "float32"})):
        model = dist / first["variants"][variant]["file"]
        result = run_cli("init", f"theirs-{variant}", "--from", str(model), "--to", str(tmp_path / "recipes"))
        assert result.returncode == 0, result.stderr
        recipe = tmp_path / "recipes" / f"theirs-{variant}.yaml"
        proposed = yaml.safe_load(recipe.read_text())
        assert proposed["format"] == "tflite" and proposed["variants"] == [expected]
        assert "strip" not in proposed and "verify" not in proposed
        done = run_cli("--json", "--cache-dir", str(tmp_path / "cache"), "build", str(recipe),
                       "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
        assert done.returncode == 0, done.stderr[-2000:]
        built = json.loads(done.stdout)[f"theirs-{variant}"]["variants"][variant]
        shipped = tmp_path / "dist" / f"theirs-{variant}" / built["file"]
        assert shipped.read_bytes() == model.read_bytes()  # taken as it is
        assert ("vela" in json.dumps(built)) == (variant == "int8")

    wrong = recipe.read_text().replace("mode: float32", "mode: int8, io_dtype: int8")  # it is not
    recipe.write_text(wrong)
    refused = run_cli("--quiet", "--cache-dir", str(tmp_path / "cache"), "build", str(recipe),
                      "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert refused.returncode == 1 and "is not what the recipe asked for" in refused.stderr


def test_init_cuts_an_object_detection_api_graph_at_its_raw_outputs(tmp_path, mirror):
    graph = write_tiny_detector(tmp_path / "graph", od_names=True)["frozen"]
    built = init_and_build(tmp_path, "my-detector", graph)
    recipe = built["recipe"]
    assert recipe["task"] == "detection"
    assert recipe["input"]["name"] == INPUT  # the feature extractor's input, after the graph's preprocessing
    assert recipe["strip"]["outputs"] == ["concat", "concat_1"]
    assert recipe["postprocess"]["anchors_tensor"] == "Concatenate/concat"
    assert built["variants"]["int8"]["verify"]["concat_1"]["cosine"] > 0.9


def test_init_builds_an_onnx_export(tmp_path, mirror):
    from tests.test_onnx_backend import tiny_onnx

    model = tiny_onnx(tmp_path / "exported.onnx", size=32, classes=5)
    built = init_and_build(tmp_path, "my-onnx", model)
    recipe = built["recipe"]
    assert recipe["input"]["layout"] == "NCHW" and recipe["input"]["shape"] == [1, 3, 32, 32]
    # its logits, cut before the Softmax that makes its output "probabilities"
    assert recipe["strip"]["outputs"] == ["logits"]
    assert "predict shows their softmax" in (tmp_path / "recipes" / "my-onnx.yaml").read_text()
    # ONNX QDQ int8, and LiteRT float32 / int8 through onnx2tf's port (compiled for the NPU)
    assert set(built["variants"]) == {"float32", "int8", "float32-tflite", "int8-tflite"}
    assert not any("tune_steps" in v for v in recipe["variants"])  # tuned are YOLO heads' int8 (tests/test_yolo.py)
    assert built["variants"]["float32-tflite"]["verify"]["logits"]["cosine"] >= 0.9999
    assert built["variants"]["int8-tflite"]["vela"]


def test_inspect_lists_archive_members_and_reads_tflite_quantization(tmp_path, mirror):
    import tarfile

    graph = tiny_classifier_graph(tmp_path / "frozen.pb")
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(graph, arcname="release/frozen.pb")
        (tmp_path / "README").write_text("read me")
        tar.add(tmp_path / "README", arcname="release/README")
    result = run_cli("--json", "inspect", str(archive))
    assert result.returncode == 0, result.stderr
    members = {m["name"]: m for m in json.loads(result.stdout)["members"]}
    assert members["release/frozen.pb"]["model"] == "tf-frozen-graph" and "model" not in members["release/README"]
    assert members["release/frozen.pb"]["sha256"] == __import__("hashlib").sha256(graph.read_bytes()).hexdigest()
    result = run_cli("--json", "inspect", str(archive), "--member", "release/frozen.pb")
    assert json.loads(result.stdout)["member"]["placeholders"][0]["name"] == "images"
    one = run_cli("init", "x", "--from", str(archive), "--to", str(tmp_path))  # its one model file: no --member
    assert one.returncode == 0 and "holds one model file, release/frozen.pb: using it" in one.stderr, one.stderr
    assert yaml.safe_load((tmp_path / "x.yaml").read_text())["source"]["member"] == "release/frozen.pb"
    two = tmp_path / "two.tar.gz"
    with tarfile.open(two, "w:gz") as tar:
        tar.add(graph, arcname="release/frozen.pb")
        tar.add(graph, arcname="release/other.pb")
    wrong = run_cli("init", "y", "--from", str(two), "--to", str(tmp_path))
    assert wrong.returncode == 2 and "--member" in wrong.stderr and "release/other.pb" in wrong.stderr


def test_inspect_proposes_the_raw_outputs_of_the_real_pedestrian_graph(tmp_path, mirror):
    """init on the published graph gives the cut, shapes and source pipeline the shipped recipe was written with."""
    result = run_cli("init", "ped", "--from", str(PEDESTRIAN_PB), "--to", str(tmp_path))
    assert result.returncode == 0, result.stderr
    proposed = yaml.safe_load((tmp_path / "ped.yaml").read_text())
    shipped = yaml.safe_load((Path(__file__).parent.parent / "recipes" / "pedestrian-ssdlite.yaml").read_text())
    assert proposed["input"] == shipped["input"]
    assert proposed["strip"] == shipped["strip"]
    for key in ("anchors_tensor", "box_output", "class_output", "box_coder_scales", "score"):
        assert proposed["postprocess"][key] == shipped["postprocess"][key]
    assert proposed["source_pipeline"]["outputs"] == shipped["source_pipeline"]["outputs"]
    assert proposed["preprocess"]["resize"] == shipped["preprocess"]["resize"]
    assert proposed["source"]["sha256"] == shipped["source"]["sha256"]


def tiny_saved_model(folder: Path, classes: int = 6) -> Path:
    """A TF2 SavedModel as Keras or tf.Module exports one: variables, a serving signature (pixels -> scores)."""
    import tensorflow as tf

    rng = np.random.RandomState(2)

    class Scorer(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(rng.normal(0, 0.3, (3, 3, 3, 8)).astype(np.float32))
            self.dense = tf.Variable(rng.normal(0, 0.5, (8, classes)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="pixels")])
        def __call__(self, pixels):
            features = tf.reduce_mean(tf.nn.relu(tf.nn.conv2d(pixels, self.kernel, 2, "SAME")), [1, 2])
            return {"scores": tf.matmul(features, self.dense)}

    tf.saved_model.save(Scorer(), str(folder))
    return folder


def test_init_builds_a_saved_model_by_its_signature_keys(tmp_path, mirror):
    import tarfile

    exported = tiny_saved_model(tmp_path / "export" / "saved_model")
    result = run_cli("--json", "inspect", str(exported))
    assert result.returncode == 0, result.stderr
    signature = json.loads(result.stdout)["signatures"]["serving_default"]
    assert signature["inputs"]["pixels"]["shape"] == [1, 16, 16, 3] and signature["inputs"]["pixels"]["dtype"] == "float32"
    assert signature["outputs"]["scores"]["shape"] == [1, 6]
    folder = run_cli("init", "x", "--from", str(exported), "--to", str(tmp_path))
    assert folder.returncode == 2 and "pack it" in folder.stderr and "--member" in folder.stderr
    archive = tmp_path / "exported.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(exported, arcname="saved_model")
    built = init_and_build(tmp_path, "my-savedmodel", archive, "--member", "saved_model")
    recipe = built["recipe"]
    assert recipe["format"] == "tf-saved-model" and recipe["source"]["member"] == "saved_model"
    assert recipe["input"]["name"] == "pixels" and recipe["strip"]["outputs"] == ["scores"]  # no serving_default_*
    assert built["variants"]["int8"]["verify"]["scores"]["cosine"] > 0.9

def test_inspect_names_a_missing_file(tmp_path):
    missing = run_cli("inspect", str(tmp_path / "nothing-here.onnx"))
    assert missing.returncode == 2 and "nothing-here.onnx" in missing.stderr


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_init_builds_a_keras_file_by_its_layer_names(tmp_path, mirror, suffix):
    import keras

    inputs = keras.Input((20, 20, 3), name="photo")
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(4, name="class_logits")(features))
    path = tmp_path / f"trained{suffix}"
    model.save(path)
    built = init_and_build(tmp_path, "my-keras", path)
    recipe = built["recipe"]
    assert recipe["format"] == "keras"
    assert recipe["input"] == {"name": "photo", "shape": [1, 20, 20, 3], "layout": "NHWC", "dtype": "float32"}
    assert recipe["strip"]["outputs"] == ["class_logits"]
    assert built["variants"]["int8"]["verify"]["class_logits"]["cosine"] > 0.9


def test_a_keras_file_given_as_a_saved_model_is_a_one_line_error(tmp_path):
    text = (Path(__file__).parent.parent / "recipes" / "pedestrian-ssdlite.yaml").read_text()
    keras_file = tmp_path / "model.h5"
    keras_file.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    data = yaml.safe_load(text)
    data["source"] = {"url": keras_file.as_uri(), "sha256": __import__("hashlib").sha256(keras_file.read_bytes()).hexdigest()}
    data["format"] = "tf-saved-model"
    (tmp_path / "ped.yaml").write_text(yaml.safe_dump(data))
    done = run_cli("--quiet", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "ped.yaml"), "--out", str(tmp_path / "d"),
                   "--build-dir", str(tmp_path / "b"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "model.h5" in done.stderr and "format: keras" in done.stderr


def test_init_builds_a_checkpoint_folder(tmp_path, mirror):
    """A TF1 checkpoint (model.ckpt.meta/.index/.data) in an archive: init names the folder and its OD API cut."""
    import tarfile

    checkpoint = write_tiny_detector(tmp_path / "graph", od_names=True)["checkpoint"]
    archive = tmp_path / "training.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(checkpoint, arcname="run1/checkpoint")
    listed = run_cli("--json", "inspect", str(archive))
    marked = {m["name"]: m["model"] for m in json.loads(listed.stdout)["members"] if "model" in m}
    assert marked == {"run1/checkpoint/": "tf-checkpoint"}  # the folder, not its .index/.data files
    built = init_and_build(tmp_path, "my-checkpoint", archive, "--member", "run1/checkpoint")
    recipe = built["recipe"]
    assert recipe["format"] == "tf-checkpoint"
    assert recipe["input"]["name"] == INPUT and recipe["strip"]["outputs"] == ["concat", "concat_1"]
    assert built["variants"]["int8"]["verify"]["concat_1"]["cosine"] > 0.9


def test_init_builds_a_torch_state_dict_of_a_known_module(tmp_path, mirror):
    """A state dict (weights only): inspect finds the module and width it fits exactly; init builds it."""
    import torch

    from mzconvert.backends.torch_models import MobileNetV2

    torch.manual_seed(0)
    weights = tmp_path / "finetuned.pth"
    torch.save(MobileNetV2(num_classes=5, width=0.35).state_dict(), weights)
    found = json.loads(run_cli("--json", "inspect", str(weights)).stdout)
    assert found["torch"] == {"module": "mobilenet_v2", "num_classes": 5, "width": 0.35}
    # fine-tuned at another size than ImageNet's 224: the modules take any, init --input-shape says which
    wrong = run_cli("init", "x", "--from", str(weights), "--input-shape", "1,96,96,3", "--to", str(tmp_path))
    assert wrong.returncode == 2 and "1,3,HEIGHT,WIDTH" in wrong.stderr and not (tmp_path / "x.yaml").exists()
    built = init_and_build(tmp_path, "my-torch", weights, "--input-shape", "1,3,96,96")
    assert built["recipe"]["torch"] == found["torch"]
    assert built["recipe"]["input"]["shape"] == [1, 3, 96, 96] and built["recipe"]["preprocess"]["resize"] == [96, 96]
    assert set(built["variants"]) == {"float32", "float32-tflite", "int8", "int8-tflite"}
    assert built["variants"]["float32-tflite"]["verify"]["logits"]["cosine"] >= 0.9999  # the Keras port
    assert built["variants"]["int8-tflite"]["inputs"][0]["dtype"] == "int8"
    assert built["variants"]["int8"]["verify"]["logits"]["cosine"] > 0.9

    torch.save({"model": MobileNetV2(num_classes=5, width=0.35)}, tmp_path / "pickled.pth")  # a whole module
    refused = run_cli("inspect", str(tmp_path / "pickled.pth"))
    assert refused.returncode == 2 and "would run code" in refused.stderr


def test_a_keras_layer_name_gets_the_graph_nodes_it_holds(tmp_path, mirror):
    import keras

    inputs = keras.Input((20, 20, 3), name="photo")
    hidden = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="stem")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="class_logits")(keras.layers.GlobalAveragePooling2D()(hidden)))
    path = tmp_path / "trained.keras"
    model.save(path)
    assert run_cli("init", "cut", "--from", str(path), "--to", str(tmp_path)).returncode == 0
    recipe = tmp_path / "cut.yaml"
    recipe.write_text(recipe.read_text().replace("outputs: [class_logits]", "outputs: [stem]"))  # a layer, not a node
    done = run_cli("--quiet", "--cache-dir", str(tmp_path / "c"), "strip", str(recipe), "--build-dir", str(tmp_path / "b"))
    assert done.returncode == 2 and "tensor 'stem' is not in the graph; did you mean '" in done.stderr
    assert "did you mean 'functional" in done.stderr and "/stem_1/Relu'" in done.stderr  # the layer's output first


def test_inspect_and_init_from_a_url(tmp_path, http_server, mirror):
    """A model on a web server: downloaded once into the cache, pinned by what came."""
    from tests.test_onnx_backend import tiny_onnx

    model = tiny_onnx(tmp_path / "served.onnx", classes=3)
    http_server.files["/models/served.onnx"] = model.read_bytes()
    url = http_server.url + "/models/served.onnx"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    found = run_cli("--json", *cache, "inspect", url)
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["inputs"][0]["shape"] == [1, 3, 32, 32]
    assert run_cli(*cache, "init", "served", "--from", url, "--to", str(tmp_path)).returncode == 0
    source = yaml.safe_load((tmp_path / "served.yaml").read_text())["source"]
    assert source == {"url": url, "size": model.stat().st_size,
                      "sha256": __import__("hashlib").sha256(model.read_bytes()).hexdigest()}
    offline = run_cli("--offline", *cache, "inspect", url + "?other")
    assert offline.returncode == 3 and "--offline" in offline.stderr

    corrupt = tmp_path / "broken.onnx"
    corrupt.write_bytes(b"\x08\x07not an onnx model")
    broken = run_cli("inspect", str(corrupt))
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1 and "broken.onnx" in broken.stderr


def test_a_classifiers_probabilities_are_told_from_its_logits_by_the_op_that_makes_them(tmp_path):
    """An output a Softmax makes holds probabilities, through the reshapes and requantizations after it (a published
    .tflite taken as it is, an int8 model's QDQ pairs); predict shows those as they are, and logits (a classifier
    init cut before its Softmax) as their softmax: not the softmax of probabilities, every class near 1 / classes."""
    import onnx
    import tensorflow as tf
    from onnx import helper

    from mzconvert.report.pictures import top5_lines
    from mzconvert.runtime import open_model
    from mzconvert.sources.inspection import softmax_outputs
    from tests.test_onnx_backend import tiny_onnx

    exported = tiny_onnx(tmp_path / "exported.onnx", size=32, classes=5)
    assert softmax_outputs(exported) == {"probabilities"}
    model = onnx.load(str(exported))
    model.graph.node.extend([helper.make_node("Flatten", ["probabilities"], ["flat_probabilities"]),
                             helper.make_node("Identity", ["flat_probabilities"], ["shown"])])
    model.graph.output[0].name = "shown"
    onnx.save(model, str(tmp_path / "viewed.onnx"))
    assert softmax_outputs(tmp_path / "viewed.onnx") == {"shown"}
    model.graph.output[0].name = "logits"  # the graph cut before its Softmax
    onnx.save(model, str(tmp_path / "cut.onnx"))
    assert softmax_outputs(tmp_path / "cut.onnx") == set()

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32)])
    def classify(features):
        return tf.reshape(tf.nn.softmax(tf.matmul(features, tf.ones([8, 4]) * 0.1)), [1, 4])

    for integer in (False, True):
        converter = tf.lite.TFLiteConverter.from_concrete_functions([classify.get_concrete_function()])
        if integer:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([np.ones((1, 8), np.float32) * i] for i in range(4))
            converter.inference_input_type = converter.inference_output_type = tf.int8
        path = tmp_path / f"classify-{integer}.tflite"
        path.write_bytes(converter.convert())
        assert softmax_outputs(path) == {open_model(path).outputs[0].name}

    names = ("tench", "goldfish", "shark")
    assert top5_lines(np.array([0.2, 0.7, 0.1]), names, probabilities=True) == \
        ["goldfish  0.70", "tench  0.20", "shark  0.10"]
    assert top5_lines(np.array([0.0, np.log(6.0), np.log(3.0)]), names, probabilities=False) == \
        ["goldfish  0.60", "shark  0.30", "tench  0.10"]
