"""Each resize mode against the real op it is named after, on real images of the mirror.

Model inputs are normalised to about [-1, 1] (1 / 127.5 per pixel level), so the acceptance bound of
1e-4 on model inputs is 0.01 pixel levels here.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mzconvert.preprocess import central_crop, load_pixels, resize
from mzconvert.recipe import Preprocess

BOUND = 1e-4 * 127.5  # pixel levels


def _images(mirror):
    """Real photographs of several aspect ratios, and a pre-scaled 227x227 ImageNet image."""
    coco = sorted((mirror / "coco" / "val2017").glob("*.jpg"))[:3]
    imagenet = sorted((mirror / "imagenet-calib").glob("*.JPEG"))[:1]
    return coco + imagenet


SIZES = [(300, 300), (224, 224), (320, 480), (600, 700)]  # shrinking, non-square and enlarging


def _preprocess(mode: str, size, crop: float = 1.0) -> Preprocess:
    return Preprocess(resize=size, interpolation=mode, channel_order="RGB", mean=(0.0,) * 3, std=(1.0,) * 3,
                      central_crop=crop)


@pytest.fixture(scope="module")
def tf():
    from mzconvert.quant.tflite_converter import tf_module

    return tf_module()


def _ours(path, mode, size, crop=1.0):
    return resize(Image.open(path).convert("RGB"), _preprocess(mode, size, crop))


def test_tf1_bilinear_is_tf_v1_resize_bilinear(mirror, tf):
    for path in _images(mirror):
        pixels = load_pixels(path)[None].astype(np.float32)
        for size in SIZES:
            reference = tf.compat.v1.image.resize_bilinear(pixels, size).numpy()[0]
            assert np.abs(_ours(path, "tf1-bilinear", size) - reference).max() <= BOUND, (path.name, size)


def test_tf2_bilinear_is_tf_image_resize(mirror, tf):
    for path in _images(mirror):
        pixels = load_pixels(path)[None].astype(np.float32)
        for size in SIZES:
            reference = tf.image.resize(pixels, size, method="bilinear").numpy()[0]
            assert np.abs(_ours(path, "tf2-bilinear", size) - reference).max() <= BOUND, (path.name, size)


def test_tf2_bilinear_antialias_is_tf_image_resize_with_antialias(mirror, tf):
    for path in _images(mirror):
        pixels = load_pixels(path)[None].astype(np.float32)
        for size in SIZES:
            reference = tf.image.resize(pixels, size, method="bilinear", antialias=True).numpy()[0]
            assert np.abs(_ours(path, "tf2-bilinear-antialias", size) - reference).max() <= BOUND, (path.name, size)


def test_modes_really_differ_on_real_images(mirror):
    """The reason the recipe must name one: on a shrinking resize the kernels give other pixels."""
    path = _images(mirror)[0]
    tf1, pil, tf2 = (_ours(path, mode, (300, 300)) for mode in ("tf1-bilinear", "pil-bilinear", "tf2-bilinear"))
    assert np.abs(tf1 - pil).mean() > 1.0 and np.abs(tf1 - tf2).mean() > 1.0


def test_cv2_linear_is_cv2_resize_on_8_bit_images(mirror):
    cv2 = pytest.importorskip("cv2")
    for path in _images(mirror):
        pixels = load_pixels(path)
        for height, width in SIZES:
            reference = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.float32)
            ours = _ours(path, "cv2-linear", (height, width))
            # cv2's scalar tail rounds differently from its SIMD body: one level apart, rarely.
            assert np.abs(ours - reference).max() <= 1.0, (path.name, height, width)
            assert np.mean(ours != reference) < 0.005, (path.name, height, width)


def test_central_crop_is_tf_image_central_crop(mirror, tf):
    for path in _images(mirror):
        pixels = load_pixels(path)
        for fraction in (0.875, 0.5, 0.33):
            reference = tf.image.central_crop(pixels, fraction).numpy()
            assert np.array_equal(central_crop(pixels, fraction), reference)
    thin = np.zeros((1, 3, 3), np.uint8)
    assert central_crop(thin, 0.01).shape == tf.image.central_crop(thin, 0.01).numpy().shape == (1, 1, 3)


def test_pil_modes_are_pil_resize_of_the_cropped_image(mirror):
    path = _images(mirror)[0]
    image = Image.open(path).convert("RGB")
    cropped = Image.fromarray(central_crop(np.asarray(image), 0.875))
    for mode, resample in (("pil-bilinear", Image.BILINEAR), ("pil-bicubic", Image.BICUBIC),
                           ("pil-nearest", Image.NEAREST)):
        reference = np.asarray(cropped.resize((224, 224), resample), dtype=np.float32)
        assert np.array_equal(_ours(path, mode, (224, 224), 0.875), reference)


def test_torchvision_resizes_the_shorter_side_then_centre_crops(tmp_path):
    """Resize(256) + CenterCrop(224) keeps the aspect ratio: a centred disc stays a disc."""
    yy, xx = np.mgrid[0:400, 0:800]
    disc = (((yy - 200) ** 2 + (xx - 400) ** 2) < 150 ** 2).astype(np.uint8) * 255
    path = tmp_path / "disc.png"
    Image.fromarray(np.stack([disc] * 3, axis=-1)).save(path)
    out = _ours(path, "torchvision", (224, 224), 0.875)
    assert out.shape == (224, 224, 3)
    inside = out[..., 0] > 127
    rows, cols = np.flatnonzero(inside.any(1)), np.flatnonzero(inside.any(0))
    # 300 px across at 400 px high -> 192 px across at 256 px high, centred in the 224 crop
    assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 2
    assert abs((rows[-1] - rows[0] + 1) - 192) <= 2 and abs((rows[0] + rows[-1]) / 2 - 111.5) <= 1
