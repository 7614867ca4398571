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
        assert all(line.startswith("recipes/gen.yaml: ") for line in str(exc).splitlines())  # one line a problem
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


# -- every loader of untrusted bytes: our one error type, or a result; never another exception --------
raw_bytes = st.one_of(st.binary(max_size=2000),
                      st.builds(lambda head, tail: head + tail,
                                st.sampled_from([b"\x1f\x8b\x08\x00", b"PK\x03\x04", b"\x93NUMPY", b"\x89PNG\r\n\x1a\n",
                                                 b"\xff\xd8\xff\xe0", b"{\"images\": ", b"name: x\n", b"\x08\x01\x12"]),
                                st.binary(max_size=500)))


def _loaders(tmp: Path):
    """(name, function of a file path): each turns a file someone gave us into our objects."""
    from mzconvert.evaluate.datasets import CocoDataset
    from mzconvert.preprocess import load_image
    from mzconvert.recipe import ClassLabels
    from mzconvert.sources.archive import extract_member
    from mzconvert.sources.imagesets import load_image_set
    from mzconvert.tasks.classification import labelled_images
    from mzconvert.tasks.detection import load_anchors

    def coco(path: Path):
        (tmp / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
        (tmp / "coco" / "annotations" / "instances_val2017.json").write_bytes(path.read_bytes())
        return CocoDataset.open(tmp / "coco", "val2017")

    def labels_file(path: Path):
        return labelled_images(tmp, ClassLabels(("a", "b"), 0), path)

    def image_set(path: Path):
        declared = tmp / "sets" / "random.yaml"
        declared.parent.mkdir(exist_ok=True)
        declared.write_bytes(path.read_bytes())
        return load_image_set(str(declared))

    def recipe(path: Path):
        return parse_recipe(path, path.read_bytes().decode("utf-8", "replace"))

    return [("archive", lambda p: extract_member(p, "m/model.pb", tmp / "out")), ("anchors", load_anchors),
            ("image", load_image), ("coco", coco), ("labels", labels_file), ("recipe", recipe),
            ("image set", image_set)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=raw_bytes)
def test_random_bytes_never_escape_as_another_exception(tmp_path, data):
    from mzconvert.errors import MzError

    path = tmp_path / "input.bin"
    path.write_bytes(data)
    for name, load in _loaders(tmp_path):
        try:
            load(path)
        except MzError as exc:
            lines = str(exc).strip().splitlines()
            if name == "recipe":  # a recipe's problems are all named, a located line each
                assert all(line.startswith(f"{path}: ") and len(line) < 1000 for line in lines), lines[:3]
            else:
                assert len(lines) == 1 and len(str(exc)) < 1000, (name, str(exc)[:200])
