"""The 1000 ImageNet-1k classes: synsets in class-index order and their names (mzconvert/data/)."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    text = resources.files("mzconvert").joinpath("data/imagenet_synsets.txt").read_text(encoding="utf-8")
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines())


def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synsets in class-index order (sorted), as every ImageNet classifier numbers them."""
    return tuple(synset for synset, _ in imagenet_classes())


def display_name(label: str) -> str:
    """A person's name for a label: the ImageNet class name for a synset, else the label itself."""
    names = dict(imagenet_classes())
    return names[label].split(",")[0] if label in names else label
