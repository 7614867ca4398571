"""Property-based: whatever YAML comes in, the loader returns a valid Recipe or raises RecipeError."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mzconvert.errors import RecipeError
from mzconvert.recipe import MODES, Recipe, parse_recipe
from tests.conftest import ROOT

BASE = yaml.safe_load((ROOT / "recipes" / "pedestrian-ssdlite.yaml").read_text())
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.sampled_from(list(MODES) + ["int4", "NHWC", "RGB", "../x"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=8)


def paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths(value, prefix + (i,))


ALL_PATHS = [p for p in paths(BASE) if p]


def check(text: str) -> None:
    try:
        recipe = parse_recipe(Path("recipes/gen.yaml"), text)
    except RecipeError as exc:
        assert str(exc).startswith("recipes/gen.yaml: ") and "\n" not in str(exc).strip()
        return
    assert isinstance(recipe, Recipe)
    assert recipe.variants and all(v.mode in MODES for v in recipe.variants)
    assert recipe.source.checksums or recipe.source.trust_on_first_use


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), values, st.booleans()), min_size=1, max_size=3))
def test_mutated_recipes_load_or_raise_our_error(edits):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    for path, value, delete in edits:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            if delete and isinstance(node, dict):
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    check(yaml.safe_dump(data))


@settings(max_examples=200, deadline=None)
@given(values)
def test_arbitrary_yaml_documents_load_or_raise_our_error(document):
    check(yaml.safe_dump(document))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_loads_or_raises_our_error(text):
    check(text)
