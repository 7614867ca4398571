"""Issue 5 benchmark: pedestrian-ssdlite int8 build time, mzconvert vs the plain converter calls it wraps,
and int8 vs float32 output agreement on real COCO val2017 images.

Both sides run as fresh processes (TensorFlow import included) with the same 100 calibration images
and the same preprocessing; mzconvert additionally freezes, strips, checks the artifact and verifies
it on 32 val images. Usage: .venv/bin/python bench/quantize_int8.py [--mirror ../shared/mirror]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from timing import timed  # bench/timing.py: the scripts run from bench/

ROOT = Path(__file__).resolve().parent.parent

PLAIN = r"""
import sys, numpy as np, tensorflow as tf
from PIL import Image
pb, out, *images = sys.argv[1:]
def batches():
    for path in images:
        x = np.asarray(Image.open(path).convert("RGB"), np.float32)[None]
        x = tf.compat.v1.image.resize_bilinear(x, (300, 300)).numpy()  # the recipe's tf1-bilinear
        yield [x * (2 / 255) - 1]
c = tf.compat.v1.lite.TFLiteConverter.from_frozen_graph(
    pb, ["FeatureExtractor/MobilenetV2/MobilenetV2/input"], ["concat", "concat_1"],
    input_shapes={"FeatureExtractor/MobilenetV2/MobilenetV2/input": [1, 300, 300, 3]})
c.optimizations = [tf.lite.Optimize.DEFAULT]
c.representative_dataset = batches
c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
c.inference_input_type = tf.int8
c.inference_output_type = tf.int8
open(out, "wb").write(c.convert())
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mirror", default=str(ROOT.parent / "shared" / "mirror"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from mzconvert.sources.fetch import FetchConfig, Fetcher
    from mzconvert.sources.imagesets import load_image_set

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        fetcher = Fetcher(FetchConfig(cache_dir=cache, mirrors=[args.mirror]))
        images = [str(p) for p in load_image_set("coco-train2017-100").paths(fetcher)]
        mz = [sys.executable, "-m", "mzconvert.cli", "--quiet", "--cache-dir", str(cache), "--mirror", args.mirror]
        timed(mz + ["fetch", "pedestrian-ssdlite"])  # warm the cache: both sides start from a local .pb
        from mzconvert.recipe import load_recipe

        pb = cache / "sha256" / load_recipe("pedestrian-ssdlite").source.checksums["sha256"]
        plain = timed([sys.executable, "-c", PLAIN, str(pb), str(tmp / "plain.tflite"), *images])
        ours = timed(mz + ["build", "pedestrian-ssdlite", "--variant", "int8", "--variant", "float32",
                           "--out", str(tmp / "dist"), "--build-dir", str(tmp / "build")])
        ours_int8 = timed(mz + ["quantize", "pedestrian-ssdlite", "--variant", "int8", "--force",
                                "--out", str(tmp / "dist"), "--build-dir", str(tmp / "build")])
        manifest = json.loads((tmp / "dist" / "pedestrian-ssdlite" / "manifest.json").read_text())
    print("pedestrian-ssdlite int8 (100 calibration images), wall time per fresh process:")
    print(f"  plain TFLiteConverter calls           {plain:7.1f} s")
    print(f"  mzconvert quantize --variant int8      {ours_int8:7.1f} s   ratio {ours_int8 / plain:.2f}x "
          "(adds freeze, strip, artifact check, verify on 32 val images)")
    print(f"  mzconvert build (float32 + int8, vela) {ours:7.1f} s")
    for variant in ("float32", "int8"):
        v = manifest["variants"][variant]["verify"]
        print(f"  {variant:8} vs float graph on {v['images']} val2017 images: " + "  ".join(
            f"{o}: cosine {v[o]['cosine']:.5f} SQNR {v[o]['sqnr_db']:.1f} dB" for o in ("concat", "concat_1")))


if __name__ == "__main__":
    main()
