"""A YOLO ONNX export converted to .tflite as Ultralytics' TensorFlow export converts it (format=tflite, and with
int8=True its integer files): onnx2tf, the integer ones calibrated on images at the export's input size (RGB 0-255,
as Ultralytics feeds them; onnx2tf's per-tensor ranges), each file with the metadata.json Ultralytics appends to the
.tflite it writes (the export's ONNX metadata, as JSON). Files a user brings, made here without Ultralytics'
TensorFlow stack; tests/test_ultralytics*.py and bench/yolo_trained.py --integer-tflite read them.

usage: .venv/bin/python bench/ultralytics_tflite.py EXPORT.onnx OUT_DIR [CALIBRATION_IMAGE_DIR]
(with calibration images, the integer files too)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

# onnx2tf's integer files, as Ultralytics keeps them (it names the dynamic-range one <model>_int8.tflite)
INTEGER_TFLITES = ("full_integer_quant", "integer_quant", "dynamic_range_quant")


def tflite_exports(export: Path, folder: Path, calibration: list[Path] | None = None) -> dict[str, Path]:
    """{"float32": file} in `folder`, and with `calibration` images each of INTEGER_TFLITES too."""
    import onnx
    from PIL import Image

    folder.mkdir(parents=True)
    # onnx2tf reads sample images from its working folder, else downloads them
    np.save(folder / "calibration_image_sample_data_20x128x128x3_float32.npy",
            np.random.RandomState(0).uniform(0, 1, (20, 128, 128, 3)).astype(np.float32))
    command = [sys.executable, "-m", "onnx2tf", "-i", str(export.resolve()), "-o", str(folder / "saved"), "-n"]
    if calibration:
        height, width = [d.dim_value for d in onnx.load(str(export)).graph.input[0].type.tensor_type.shape.dim][2:]
        np.save(folder / "calibration.npy", np.stack([
            np.asarray(Image.open(p).convert("RGB").resize((width, height)), np.float32) for p in calibration]))
        command += ["-oiqt", "-qt", "per-tensor", "-cind", "images", str(folder / "calibration.npy"),
                    "[[[[0,0,0]]]]", "[[[[255,255,255]]]]"]
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    made = {kind: folder / "saved" / f"{export.stem}_{kind}.tflite"
            for kind in ("float32", *(INTEGER_TFLITES if calibration else ()))}
    if done.returncode != 0 or not all(p.is_file() for p in made.values()):
        raise RuntimeError(f"onnx2tf failed on {export}:\n{done.stderr[-3000:]}")
    metadata = {p.key: _literal(p.value) for p in onnx.load(str(export)).metadata_props}
    for file in made.values():
        with zipfile.ZipFile(file, "a", zipfile.ZIP_DEFLATED) as appended:
            appended.writestr("metadata.json", json.dumps(metadata, indent=2))
    return made


def _literal(value: str):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


if __name__ == "__main__":
    images = sorted(p for p in Path(sys.argv[3]).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")) \
        if len(sys.argv) > 3 else None
    for kind, path in tflite_exports(Path(sys.argv[1]), Path(sys.argv[2]), images and images[:32]).items():
        print(f"{kind}: {path}")
