"""COCO's 80 detection categories in their official order, with the ids its annotations use (1-90, with gaps):
what a detector trained on COCO (Ultralytics' 80 names, in this order) scores against COCO annotations."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def coco_categories() -> tuple[tuple[int, str], ...]:
    text = resources.files("mzconvert").joinpath("data/coco_categories.txt").read_text(encoding="utf-8")
    return tuple((int(line.split("\t")[0]), line.split("\t")[1]) for line in text.splitlines())
