"""YAML for files a stranger may have written: safe_load, plus bounds on what a tiny file can become.

`yaml.safe_load` runs no code, but a few hundred bytes of aliases expand to gigabytes once the value
is walked (billion laughs), deep nesting exhausts the recursion limit, and a repeated key silently
overrides the first. Here duplicate keys are errors, and the expanded size, the nesting depth and the
file size are capped; every failure is a one-line RecipeError naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_EXPANDED = 2_000_000  # nodes plus characters of every string, as if each alias were copied out


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short(key)} (first at line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def short(value: Any, limit: int = 60) -> str:
    """repr of a value cut to `limit` characters: an error message never repeats a huge input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _expanded_size(value: Any, depth: int, memo: dict) -> int:
    if depth > MAX_DEPTH:
        raise RecipeError(f"nested deeper than {MAX_DEPTH} levels")
    key = id(value)
    if key in memo:
        return memo[key]
    if isinstance(value, dict):
        size = 1 + sum(_expanded_size(k, depth + 1, memo) + _expanded_size(v, depth + 1, memo)
                       for k, v in value.items())
    elif isinstance(value, list):
        size = 1 + sum(_expanded_size(v, depth + 1, memo) for v in value)
    else:
        size = 1 + (len(value) if isinstance(value, str) else 0)
    memo[key] = size
    if size > MAX_EXPANDED:
        raise RecipeError(f"expands to more than {MAX_EXPANDED} nodes and characters (aliases of aliases?)")
    return size


def load_yaml(path: Path, text: str) -> Any:
    """The parsed document of `text` (read from `path`), or a RecipeError naming the file and the line."""
    if len(text.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
        raise RecipeError(f"{path}: larger than {MAX_FILE_BYTES} bytes; a recipe is a few kilobytes")
    try:
        loader = _UniqueKeyLoader(text)  # what yaml.safe_load does, with the stricter mapping constructor
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{path}: {where}malformed YAML: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{path}: malformed YAML: nested too deeply") from None
    try:
        _expanded_size(data, 0, {})
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    return data
