"""Classification labels: what a model's output indices mean, and what each image of a dataset is.

A dataset says what its images are in one of the layouts people have:
- a labels file (`--labels FILE`), one `file label` line per image (paths relative to the folder;
  separated by a tab where either holds spaces, else by the first space);
- one folder per class (`dog/1.jpg`, or ImageNet's `n02085620/x.JPEG`);
- ImageNet file names that start with the synset (`n01440764_10026.JPEG`, `n01440764_tench.JPEG`).
A label is matched to the recipe's labels by exact name, ImageNet synset, ImageNet class name (either way:
a synset finds the recipe's label that is its class name), or a 0-based index; anything else is an error naming
the image, never a silent zero.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, short_text
from ..imagenet import imagenet_classes
from ..preprocess import list_images
from ..recipe import ClassLabels

SYNSET = re.compile(r"^(n\d{8})(?:$|[_\-. ])")


@dataclass(frozen=True)
class LabelledImages:
    images: list[tuple[Path, int]]  # image, index into ClassLabels.names
    source: str  # how the labels were read, for reports


class _Matcher:
    """Maps a dataset's label text to an index into the recipe's label names."""

    def __init__(self, labels: ClassLabels):
        self.labels = labels
        self.exact = {name: i for i, name in enumerate(labels.names)}
        self.folded = {name.casefold(): i for i, name in enumerate(labels.names)}
        # Synset labels also answer to their ImageNet class names ("tench", "great white shark")
        self.by_name = {}
        for synset, names in imagenet_classes():
            if synset in self.exact:
                for name in names.split(", "):
                    self.by_name.setdefault(name.casefold(), self.exact[synset])
        self.by_synset = _synsets_of_class_names(labels.names, self.folded)

    def __call__(self, label: str, where: str) -> int:
        for table, key in ((self.exact, label), (self.folded, label.casefold()), (self.by_name, label.casefold()),
                           (self.by_synset, label)):
            if key in table:
                return table[key]
        if label.isdigit() and int(label) < len(self.labels.names):
            return int(label)
        sample = ", ".join(self.labels.names[:3])
        raise InputError(f"{where}: label {label!r} is not one of the recipe's {len(self.labels.names)} labels "
                      f"({sample}, ...), an ImageNet class name of one, or an index below {len(self.labels.names)}")


def _synsets_of_class_names(names: tuple[str, ...], folded: dict[str, int]) -> dict[str, int]:
    """ImageNet class names as labels (a published file's own: "background", "tench, Tinca tinca", ..., or short
    ones, "tench") answer to their synsets ("n01440764/", "n01440764_10026.JPEG"): by position where the labels are
    ImageNet's classes in its order (after a background label or not: each label the class's whole name or its
    first), else by the whole name or the first where no other class has it ("crane" is a bird and a machine)."""
    classes = [(synset, (whole.casefold(), whole.split(", ")[0].casefold())) for synset, whole in imagenet_classes()]
    start = len(names) - len(classes)
    if start in (0, 1) and all(name.casefold() in keys for name, (_, keys) in zip(names[start:], classes)):
        return {synset: start + i for i, (synset, _) in enumerate(classes)}
    counts = Counter(key for _, keys in classes for key in set(keys))
    found = {}
    for synset, keys in classes:
        if matches := [folded[key] for key in keys if counts[key] == 1 and key in folded]:
            found[synset] = matches[0]
    return found


def labelled_images(folder: Path, labels: ClassLabels, labels_file: Path | None = None) -> LabelledImages:
    """Every image of `folder` with the index of its label, read from the layout the folder has."""
    match = _Matcher(labels)
    if labels_file is not None:
        images = []
        try:
            lines = labels_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{labels_file}: not a text file of 'file label' lines ({short_text(exc)})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.strip().split("\t", 1) if "\t" in line else line.strip().split(None, 1)
            where = f"{labels_file}:{number}"
            if len(parts) != 2:
                raise InputError(f"{where}: expected 'file label', got {line.strip()[:80]!r}")
            path = (folder / parts[0]).resolve()
            if not path.is_file():
                raise InputError(f"{where}: no image {parts[0]!r} in {folder}")
            images.append((path, match(parts[1], where)))
        if not images:
            raise InputError(f"{labels_file}: no 'file label' lines")
        return LabelledImages(images, f"labels file {labels_file.name}")
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and list_images(p))
    if classes:
        images = [(path, match(d.name, str(d))) for d in classes for path in list_images(d)]
        return LabelledImages(images, f"one folder per class ({len(classes)} folders)")
    images = []
    for path in list_images(folder):
        synset = SYNSET.match(path.name)
        if synset is None:
            raise InputError(f"{path}: cannot tell this image's label: give --labels FILE ('file label' lines), "
                          "put the images in one folder per class, or start ImageNet file names with the synset")
        images.append((path, match(synset.group(1), str(path))))
    if not images:
        raise InputError(f"{folder}: no images to evaluate on")
    return LabelledImages(images, "ImageNet synsets in the file names")


def class_offset(scored: int, labels: ClassLabels, model: str) -> int:
    """Where label 0 sits in a model's scores: the recipe's label_offset, when the score count fits it."""
    if scored == len(labels.names) + labels.label_offset:
        return labels.label_offset
    raise InputError(f"{model}: scores {scored} classes, but the recipe declares {len(labels.names)} labels with "
                  f"label_offset {labels.label_offset} ({len(labels.names) + labels.label_offset} scores): "
                  "this model and these labels do not belong together")


def scores_by_label(run, labels: ClassLabels, model: str, background_allowed: bool):
    """A predictor returning the model's scores indexed like the recipe's labels (background dropped)."""
    offset = None

    def scores(tensor: np.ndarray) -> np.ndarray:
        nonlocal offset
        logits = run(tensor)[0].ravel()
        if offset is None:
            spare = logits.size - len(labels.names)
            fits_background = background_allowed and spare == 1
            offset = 1 if fits_background else class_offset(logits.size, labels, model)
        return logits[offset:offset + len(labels.names)]

    return scores
