"""Reading a parsed YAML mapping with every error located: file, field path, what was expected."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..yamlsafe import short


class Reader:
    """Walks a parsed YAML mapping, remembering where it is, so every error is located."""

    def __init__(self, file: Path, data: Any, where: str = ""):
        self.file = file
        self.data = data
        self.where = where

    def fail(self, message: str, where: str | None = None) -> RecipeError:
        loc = self.where if where is None else where
        return RecipeError(f"{self.file}: {loc + ': ' if loc else ''}{message}")

    def child_where(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.where}[{key}]"
        if not (key and key.isprintable() and key.strip() == key):
            key = repr(key)  # keep the error on one line, whatever the YAML key holds
        return f"{self.where}.{key}" if self.where else key

    def mapping(self, allowed: tuple[str, ...]) -> Reader:
        if self.data is None:
            raise self.fail("missing required field")
        if not isinstance(self.data, dict):
            raise self.fail(f"expected a mapping, got {kind(self.data)}")
        for key in self.data:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; allowed: {', '.join(allowed)}"
                raise self.fail(f"unknown field {short(key)}{suggestion}", self.child_where(str(key)))
        return self

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def child(self, key: str | int) -> Reader:
        value = self.data[key] if isinstance(self.data, list) else self.data.get(key)
        return Reader(self.file, value, self.child_where(key))

    def _get(self, key: str, required: bool):
        if not self.has(key):
            if required:
                raise self.fail("missing required field", self.child_where(key))
            return None
        return self.data[key]

    def string(self, key: str, required: bool = True, default: str | None = None,
               choices: tuple[str, ...] | None = None, pattern: re.Pattern | None = None,
               pattern_text: str = "") -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"expected a non-empty string, got {kind(value)}", self.child_where(key))
        if choices is not None and value not in choices:
            raise self.fail(f"{short(value)} is not one of {', '.join(choices)}", self.child_where(key))
        if pattern is not None and not pattern.match(value):
            raise self.fail(f"{short(value)} is not {pattern_text}", self.child_where(key))
        return value

    def integer(self, key: str, required: bool = True, default: int | None = None,
                minimum: int = 0) -> int | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"expected an integer >= {minimum}, got {short(value)}", self.child_where(key))
        return value

    def number(self, key: str, required: bool = True, default: float | None = None,
               positive: bool = False) -> float | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            expected = "a positive number" if positive else "a finite number"
            raise self.fail(f"expected {expected}, got {short(value)}", self.child_where(key))
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"expected true or false, got {short(value)}", self.child_where(key))
        return value

    def list_of(self, key: str, item: Callable[[Reader], Any], required: bool = True,
                length: int | None = None, min_length: int = 1) -> list | None:
        value = self._get(key, required)
        if value is None:
            return None
        where = self.child_where(key)
        if not isinstance(value, list):
            raise self.fail(f"expected a list, got {kind(value)}", where)
        if length is not None and len(value) != length:
            raise self.fail(f"expected {length} items, got {len(value)}", where)
        if len(value) < min_length:
            raise self.fail(f"expected at least {min_length} item(s)", where)
        items = self.child(key)
        problems = Problems()
        parsed = [problems.check(item, items.child(i)) for i in range(len(value))]
        problems.raise_any()  # every bad item, not only the first
        return parsed

    # Item readers for list_of: the reader is positioned on the item itself.
    def as_string(self) -> str:
        if not isinstance(self.data, str) or not self.data:
            raise self.fail(f"expected a non-empty string, got {kind(self.data)}")
        return self.data

    def as_number(self) -> float:
        if isinstance(self.data, bool) or not isinstance(self.data, (int, float)) or not math.isfinite(self.data):
            raise self.fail(f"expected a finite number, got {kind(self.data)}")
        return float(self.data)

    def as_dimension(self) -> int:
        if isinstance(self.data, bool) or not isinstance(self.data, int) or self.data <= 0:
            raise self.fail(f"expected a positive integer, got {short(self.data)}")
        return self.data


def kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {short(value)}", bool: f"{value}"}.get(
        type(value), f"{type(value).__name__} {short(value)}")



class Problems:
    """The errors of a recipe: every section is read even when another failed, so one run names them all."""

    def __init__(self):
        self.messages: list[str] = []
        self.failed: set[str] = set()

    def check(self, parse: Callable, *args, **kwargs):
        """parse(*args, **kwargs), or None when it found a problem (kept)."""
        try:
            return parse(*args, **kwargs)
        except RecipeError as exc:
            self.messages.append(str(exc))
            return None

    def passes(self, check: Callable, *args) -> bool:
        """check(*args) found no problem (a problem it found is kept)."""
        before = len(self.messages)
        self.check(check, *args)
        return len(self.messages) == before

    def section(self, name: str, parse: Callable, *args, **kwargs):
        """check(), remembering that section `name` failed: the rules between sections skip what it would feed."""
        before = len(self.messages)
        value = self.check(parse, *args, **kwargs)
        if len(self.messages) > before:
            self.failed.add(name)
        return value

    def items(self, r: Reader, key: str, parse_item: Callable[[Reader], Any]) -> list[tuple[int, Any]] | None:
        """The items of list `key` that parse, with their index; each bad item is a problem of its own."""
        readers = self.section(key, r.list_of, key, lambda item: item)  # a non-empty list, or a problem
        if readers is None:
            return None
        parsed = [(i, self.section(key, parse_item, item)) for i, item in enumerate(readers)]
        return [(i, value) for i, value in parsed if value is not None]

    def ok(self, *names: str) -> bool:
        """No problem was found in the sections `names` (their values can be checked against each other)."""
        return self.failed.isdisjoint(names)

    def raise_any(self) -> None:
        if self.messages:
            raise RecipeError("\n".join(dict.fromkeys(self.messages)))

