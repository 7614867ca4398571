"""Where the shipped recipes and image sets are, however mzconvert was installed.

In a checkout (and an editable install) `recipes/` and `calibration/` sit beside the package; a wheel
carries them inside it (pyproject maps them in). A user's own recipe folder replaces the shipped one
with --recipes-dir or $MZCONVERT_RECIPES.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parent / name
