"""One-channel models: the image's luma as PIL computes it, through preprocess, init, build and the NPU; a Keras
file named .hdf5 is a Keras file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from mzconvert.errors import RecipeError
from mzconvert.preprocess import model_tensor
from mzconvert.recipe import InputSpec, parse_recipe
from mzconvert.recipe.schema import Preprocess
from tests.conftest import MIRROR, image_folder, run_cli


def test_gray_is_the_luma_pil_computes_then_resized(mirror):
    image = Image.open(sorted((MIRROR / "coco" / "val2017").glob("*.jpg"))[0]).convert("RGB")
    preprocess = Preprocess(resize=(40, 30), interpolation="pil-bilinear", channel_order="GRAY", mean=(0.0,),
                            std=(255.0,))
    tensor = model_tensor(image, preprocess, InputSpec("x", (1, 40, 30, 1), "NHWC", "float32"))
    expected = np.asarray(image.convert("L").resize((30, 40), Image.BILINEAR), np.float32) / 255
    assert tensor.shape == (1, 40, 30, 1)
    np.testing.assert_array_equal(tensor[0, ..., 0], expected)


@pytest.mark.parametrize("edit, message", [
    ("channel_order: RGB", "preprocess.channel_order: RGB for an input of 1 channel(s)"),
    ("mean: [1, 2, 3]", "preprocess.mean: expected 1 items, got 3"),
    ("shape: [1, 28, 28, 2]", "input.shape: shape [1, 28, 28, 2] has 2 channels in NHWC layout; expected 3"),
])
def test_gray_recipes_are_checked_where_they_are_wrong(tmp_path, edit, message):
    text = f"""name: g
task: classification
description: d
license: l
source: {{url: https://example.com/g.h5, sha256: {"0" * 64}}}
format: keras
input: {{name: x, shape: [1, 28, 28, 1]}}
preprocess: {{interpolation: pil-bilinear, channel_order: GRAY}}
variants: [{{name: float32, mode: float32}}]
"""
    key = edit.split(":")[0]
    if key == "shape":
        text = text.replace("shape: [1, 28, 28, 1]", edit)
    else:
        text = text.replace("channel_order: GRAY", edit if key == "channel_order" else f"channel_order: GRAY, {edit}")
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_recipe(tmp_path / "g.yaml", text)


@pytest.mark.slow
def test_a_grayscale_keras_hdf5_classifier_goes_from_init_to_the_npu(tmp_path, mirror):
    import keras

    inputs = keras.Input((28, 28, 1), name="digit")
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(16, 3, activation="relu")(x))
    keras.Model(inputs, keras.layers.Dense(10, name="scores")(x)).save(tmp_path / "digits.h5")
    (tmp_path / "digits.h5").rename(tmp_path / "digits.hdf5")
    folders = {role: image_folder(tmp_path / role, MIRROR / "coco" / split, 8)
               for role, split in (("calib", "train2017"), ("check", "val2017"))}
    inspected = run_cli("inspect", str(tmp_path / "digits.hdf5"))
    assert inspected.returncode == 0 and ": keras" in inspected.stdout, inspected.stderr
    made = run_cli("init", "digits", "--from", str(tmp_path / "digits.hdf5"), "--to", str(tmp_path),
                   "--calibration", str(folders["calib"]), "--verify", str(folders["check"]))
    assert made.returncode == 0, made.stderr
    recipe = yaml.safe_load((tmp_path / "digits.yaml").read_text())
    assert recipe["format"] == "keras" and recipe["preprocess"]["channel_order"] == "GRAY"
    done = run_cli("--json", "--cache-dir", str(tmp_path / "c"), "build", str(tmp_path / "digits.yaml"),
                   "--out", str(tmp_path / "dist"), "--build-dir", str(tmp_path / "build"))
    assert done.returncode == 0, done.stderr[-3000:]
    int8 = json.loads(done.stdout)["digits"]["variants"]["int8"]
    assert int8["inputs"][0]["shape"] == [1, 28, 28, 1] and int8["inputs"][0]["dtype"] == "int8"
    assert int8["verify"]["scores"]["sqnr_db"] > 20
    (npu,) = int8["vela"].values()
    assert npu["npu_ops"] > 0 and npu["cpu_op_count"] == 0
