"""Pictures of what each variant predicts on an image, side by side: float next to int8.

One PNG per image: a panel per variant with its detections drawn on the image (score >= 0.3; a segmentation
head's masks tinted in, a pose head's keypoints dotted, an oriented-box head's boxes drawn rotated), or its top-5
classes written under it. The same decode as eval, so the picture and the numbers agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..evaluate.datasets import LoadedImage
from ..evaluate.run import predictors, with_class_labels
from ..imagenet import display_name
from ..recipe import Recipe
from ..runtime import OPTIMIZED, REFERENCE, open_model, target_kernels
from ..sources.inspection import softmax_outputs
from ..tasks.keypoints import VISIBLE
from ..tasks.oriented import rotated_corners

PANEL_WIDTH = 480
SHOW_SCORE = 0.3  # by default, what a deployed detector would show
COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
MASK_OPACITY = 0.45  # a mask's tint: the image under it stays readable


def _panel(image: Image.Image, title: str, lines: list[str], boxes=(), points=(), outlines=()) -> Image.Image:
    """The image scaled to PANEL_WIDTH with boxes [(ymin, xmin, ymax, xmax normalised, label, colour)], points
    [(x, y normalised, colour)] and outlines [(corners [(x, y) normalised], label, colour): rotated boxes], a
    title above and text lines below."""
    font = ImageFont.load_default(size=15)
    scaled = image.resize((PANEL_WIDTH, max(1, round(image.height * PANEL_WIDTH / image.width))), Image.BILINEAR)
    line_height = 20
    canvas = Image.new("RGB", (PANEL_WIDTH, scaled.height + line_height * (1 + len(lines)) + 8), "white")
    canvas.paste(scaled, (0, line_height + 4))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 2), title, fill="black", font=font)
    top = line_height + 4

    def labelled(x: float, y: float, label: str, color) -> None:
        text_box = draw.textbbox((x + 3, y + 1), label, font=font)
        draw.rectangle(text_box, fill=color)  # readable on any background
        draw.text((x + 3, y + 1), label, fill="white", font=font)

    for ymin, xmin, ymax, xmax, label, color in boxes:
        # corners in order: a linear box coder (MediaPipe's) decodes a negative size as the model writes it
        ymin, ymax, xmin, xmax = sorted((ymin, ymax)) + sorted((xmin, xmax))
        rect = [xmin * PANEL_WIDTH, top + ymin * scaled.height, xmax * PANEL_WIDTH, top + ymax * scaled.height]
        draw.rectangle(rect, outline=color, width=3)
        labelled(rect[0], rect[1], label, color)
    for corners, label, color in outlines:
        polygon = [(x * PANEL_WIDTH, top + y * scaled.height) for x, y in corners]
        draw.polygon(polygon, outline=color, width=3)
        labelled(*min(polygon, key=lambda corner: (corner[1], corner[0])), label, color)  # at its topmost corner
    for x, y, color in points:
        centre = (x * PANEL_WIDTH, top + y * scaled.height)
        draw.ellipse([centre[0] - 4, centre[1] - 4, centre[0] + 4, centre[1] + 4], fill=color, outline="white")
    for i, line in enumerate(lines):
        draw.text((6, scaled.height + line_height * (i + 1) + 6), line, fill="black", font=font)
    return canvas


def _with_masks(image: Image.Image, found, shown: np.ndarray) -> Image.Image:
    """The image with the masks of the `shown` detections tinted in their boxes' colours."""
    pixels = np.asarray(image.convert("RGB"), np.float32).copy()
    for k in np.flatnonzero(shown):
        mask = found.masks.on_image(k)
        pixels[mask] = pixels[mask] * (1 - MASK_OPACITY) + np.asarray(COLORS[found.labels[k] % len(COLORS)]) * \
            MASK_OPACITY
    return Image.fromarray(np.rint(pixels).astype(np.uint8))


def _shown_keypoints(found, shown: np.ndarray) -> list[tuple[float, float, tuple]]:
    """The keypoints of the `shown` detections that their head shows (visibility >= VISIBLE, or all where it gives
    none) and that lie on the image, in their boxes' colours."""
    if found.keypoints is None:
        return []
    points = []
    for k in np.flatnonzero(shown):
        color = COLORS[found.labels[k] % len(COLORS)]
        points += [(x, y, color) for x, y, *visibility in found.keypoints[k]
                   if (not visibility or visibility[0] >= VISIBLE) and 0 <= x <= 1 and 0 <= y <= 1]
    return points


def _side_by_side(panels: list[Image.Image]) -> Image.Image:
    gap = 8
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), height), "white")
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + gap
    return sheet


def top5_lines(scores: np.ndarray, names: tuple[str, ...], probabilities: bool) -> list[str]:
    """A classifier's five best classes and their probabilities: `scores` as they are where they are
    `probabilities` already, else their softmax."""
    if not probabilities:
        scores = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    return [f"{display_name(names[i])}  {scores[i]:.2f}" for i in np.argsort(-scores, kind="stable")[:5]]


def predict_images(recipe: Recipe, manifest: dict, folder: Path, images: list[Path], variants: list[str],
                   out_dir: Path, min_score: float = SHOW_SCORE, log=lambda message: None) -> list[Path]:
    """Run `variants` (default: all built) of dist `folder` on `images`; one side-by-side PNG each."""
    recipe = with_class_labels(recipe, manifest, log)
    built = list(manifest.get("variant_order", manifest["variants"]))
    chosen = variants or built
    if missing := [v for v in chosen if v not in manifest["variants"]]:
        raise InputError(f"{folder}/manifest.json: no built variant {', '.join(missing)}; have {', '.join(built)}")
    output_names = recipe.cut_outputs
    # each variant as its target computes it (an NPU-targeted int8 under the reference kernels)
    kernels = {name: next(iter(target_kernels(recipe, recipe.variant(name))), OPTIMIZED) for name in chosen}
    files = {name: folder / manifest["variants"][name]["file"] for name in chosen}
    opened = {name: open_model(files[name], output_names, kernels=kernels[name]) for name in chosen}
    models = predictors(recipe, {name: runner.run for name, runner in opened.items()}, folder, manifest)
    # a classifier's scores: probabilities where its first output is a Softmax's (as published), else logits
    softmaxed = {name: recipe.task == "classification" and runner.outputs[0].name in softmax_outputs(files[name])
                 for name, runner in opened.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        image = LoadedImage(path)
        panels = []
        for name, model in models.items():
            title = f"{name} ({REFERENCE} kernels)" if kernels[name] == REFERENCE else name
            if recipe.task == "detection":
                found = model(image)
                shown = found.scores >= min_score
                labels = recipe.postprocess.labels
                boxes = [(*box, f"{labels[label]} {score:.2f}", COLORS[label % len(COLORS)])
                         for box, score, label in zip(found.boxes[shown], found.scores[shown], found.labels[shown])]
                outlines = []
                if found.rotated is not None:  # an oriented-box head's: each box as the rotated box it is
                    corners = rotated_corners(found.rotated[shown]) / image.size
                    outlines, boxes = [(c, text, color) for c, (*_, text, color) in zip(corners, boxes)], []
                picture = image.image if found.masks is None else _with_masks(image.image, found, shown)
                panels.append(_panel(picture, f"{title}: {len(boxes) + len(outlines)} detections >= {min_score:g}",
                                     [], boxes, _shown_keypoints(found, shown), outlines))
            else:
                panels.append(_panel(image.image, f"{title}: top-5",
                                     top5_lines(model(image), recipe.labels.names, softmaxed[name])))
        target = out_dir / f"{path.stem}.png"
        _side_by_side(panels).save(target, optimize=True)
        written.append(target)
    return written
