"""The recipe's declared preprocessing: the one function calibration, verify, eval and the demo use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import MzError
from .recipe import InputSpec, Preprocess

_RESAMPLE = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


@dataclass(frozen=True)
class PreparedImage:
    tensor: np.ndarray  # float32, the model input's shape (batch 1), normalised
    original_size: tuple[int, int]  # width, height of the file, to map boxes back


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MzError(f"{path}: not a decodable image ({exc.__class__.__name__}: {exc})") from None


def prepare(path: Path, preprocess: Preprocess, model_input: InputSpec) -> PreparedImage:
    image = load_image(path)
    original_size = image.size
    if preprocess.central_crop < 1.0:
        w, h = image.size
        cw, ch = round(w * preprocess.central_crop), round(h * preprocess.central_crop)
        left, top = (w - cw) // 2, (h - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    height, width = preprocess.resize
    pixels = np.asarray(image.resize((width, height), _RESAMPLE[preprocess.interpolation]), dtype=np.float32)
    if preprocess.channel_order == "BGR":
        pixels = pixels[..., ::-1]
    pixels = (pixels - np.asarray(preprocess.mean, np.float32)) / np.asarray(preprocess.std, np.float32)
    if model_input.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return PreparedImage(tensor=np.ascontiguousarray(pixels[None], dtype=np.float32), original_size=original_size)


def list_images(folder: Path) -> list[Path]:
    suffixes = {".jpg", ".jpeg", ".png", ".bmp"}
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())
