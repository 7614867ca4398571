"""A recipe file to a validated Recipe: every section parsed (sections.py), then the rules between them
(rules.py), all problems of one run named together, a line each:
``recipes/x.yaml: variants[1].mode: 'int4' is not one of float32, float16, dynamic, int8, int16x8, uint8-qat``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError
from ..fsio import sha256_bytes
from ..yamlsafe import load_yaml
from . import rules
from .lookup import SHIPPED_RECIPES, is_within, recipes_dir, resolve_recipe_path
from .reader import Problems, Reader
from .schema import FORMATS, SAFE_NAME, TASKS, TOP_LEVEL, TORCH_FORMATS, Dense, Postprocess, Recipe, TorchSpec, Variant
from .sections import (
    parse_dense,
    parse_graph_edits,
    parse_input,
    parse_labels,
    parse_postprocess,
    parse_preprocess,
    parse_source,
    parse_source_pipeline,
    parse_strip,
    parse_targets,
    parse_torch,
    parse_variant,
    parse_verify,
)


@dataclass
class _Sections:
    """What each section parsed to (None where it has a problem, or is absent)."""
    name: str | None = None
    task: str | None = None
    fmt: str | None = None
    description: str | None = None
    license: str | None = None
    source: object = None
    model_input: object = None
    preprocess: object = None
    strip: object = None
    postprocess: Postprocess | None = None
    variants: list[tuple[int, Variant]] | None = None
    vela: tuple = ()


def _read_sections(r: Reader, problems: Problems, local: bool, allow_unpinned: bool) -> _Sections:
    s = _Sections()
    s.name = problems.section("name", r.string, "name", pattern=SAFE_NAME,
                              pattern_text="a safe name (lower case, digits, '.', '_', '-')")
    s.source = problems.section("source", lambda: parse_source(r.child("source"), local_recipe=local,
                                                               allow_unpinned=allow_unpinned))
    s.model_input = problems.section("input", lambda: parse_input(r.child("input")))
    if s.model_input is not None:
        s.preprocess = problems.section("preprocess", parse_preprocess, r.child("preprocess") if r.has("preprocess")
                                        else Reader(r.file, {}, "preprocess"), s.model_input)
        s.strip = problems.section("strip", lambda: parse_strip(r.child("strip"), s.model_input)
                                   if r.has("strip") else None)
    s.task = problems.section("task", r.string, "task", choices=TASKS)
    if r.has("postprocess") and (s.strip is not None or not r.has("strip")):  # else checked against a failed strip
        s.postprocess = problems.section("postprocess", lambda: parse_postprocess(r.child("postprocess"), s.strip))
    elif r.has("postprocess"):
        problems.failed.add("postprocess")
    elif s.task == "detection":
        problems.section("postprocess", _missing_postprocess, r)
    s.variants = problems.items(r, "variants", parse_variant)
    s.vela = problems.section("targets", parse_targets, r)
    s.fmt = problems.section("format", r.string, "format", choices=FORMATS)
    s.description = problems.section("description", r.string, "description")
    s.license = problems.section("license", r.string, "license")
    return s


def _missing_postprocess(r: Reader) -> None:
    raise r.fail("a detection recipe needs 'postprocess' to decode its outputs", "postprocess")


def _check_variants(r: Reader, problems: Problems, s: _Sections) -> tuple[Variant, ...]:
    """Each variant that parsed, its defaults settled and checked against the other sections."""
    if s.variants is None or not problems.ok("format", "source", "postprocess", "strip"):
        return ()
    settled, names = [], []
    for i, variant in s.variants:
        variant = rules.settle_variant(variant, s.fmt, s.postprocess)
        problems.check(rules.check_variant, r.child("variants").child(i), variant, names, s.fmt, s.source,
                       s.postprocess)
        names.append(variant.name)
        settled.append(variant)
    return tuple(settled)


def _check_across(r: Reader, problems: Problems, s: _Sections, variants: tuple[Variant, ...]):
    """The sections that depend on others: (torch, verify, source_pipeline, labels, dense), each checked."""
    all_variants = problems.ok("variants") and len(variants) == len(s.variants or ())
    if s.fmt == "tflite" and problems.ok("postprocess", "strip"):
        problems.check(rules.check_converted_source, r, s.postprocess)
    if s.fmt is not None and problems.ok("postprocess"):
        problems.check(rules.check_split_head, r, s.postprocess, s.fmt)
    if problems.ok("postprocess", "strip"):
        problems.check(rules.check_attached_outputs, r, s.postprocess, s.strip)
    if s.vela and all_variants and s.fmt:
        problems.check(rules.check_npu_targets, r, s.vela, list(variants), s.fmt)
    torch_spec = verify = source_pipeline = labels = dense = None
    if s.fmt is not None and problems.passes(rules.check_torch_section, r, s.fmt) and s.fmt == "torch":
        torch_spec = problems.check(parse_torch, r)
    elif s.fmt in TORCH_FORMATS:  # an archive holding its module: only the export's opset to choose
        opset = r.child("torch").integer("opset", required=False, default=17, minimum=7) if r.has("torch") else 17
        torch_spec = TorchSpec(module=s.fmt, opset=opset)
    if r.has("verify"):
        verify = problems.check(parse_verify, r)
        if verify is not None and all_variants:
            problems.check(rules.check_verify_images, r, verify.images, list(variants))
    elif all_variants:
        problems.check(rules.check_search_needs_verify, r, list(variants))
    if all_variants and s.task:
        problems.check(rules.check_search_has_measure, r, s.task, list(variants))
    if r.has("source_pipeline") and s.task and s.fmt:
        source_pipeline = problems.check(parse_source_pipeline, r.child("source_pipeline"), s.task, s.fmt)
    if (r.has("labels") or r.has("label_offset")) and s.task:
        if problems.passes(rules.check_labels_task, r, s.task):
            labels = problems.check(parse_labels, r, r.file)
    if s.task == "dense" and not r.has("dense"):
        dense = Dense()
    elif r.has("dense") and s.task and problems.passes(rules.check_dense_task, r, s.task):
        dense = problems.check(parse_dense, r)
    return torch_spec, verify, source_pipeline, labels, dense


def parse_recipe(path: Path, text: str, allow_unpinned: bool = False) -> Recipe:
    data = load_yaml(path, text)
    r = Reader(path, data)
    problems = Problems()
    problems.check(r.mapping, TOP_LEVEL)
    if not isinstance(data, dict):
        problems.raise_any()
    if not any(key in data for key in TOP_LEVEL):  # some other YAML file: one line, not one per missing field
        raise r.fail(f"not a recipe: none of its fields is a recipe field ({', '.join(TOP_LEVEL[:6])}, ...)")
    local = not is_within(path, SHIPPED_RECIPES)  # shipped recipes must not name files of this machine
    s = _read_sections(r, problems, local, allow_unpinned)
    variants = _check_variants(r, problems, s)
    torch_spec, verify, source_pipeline, labels, dense = _check_across(r, problems, s, variants)
    graph_edits = problems.check(parse_graph_edits, r.child("graph_edits")) if r.has("graph_edits") else {}
    problems.raise_any()
    return Recipe(path=path, text_sha256=sha256_bytes(text.encode()), name=s.name, task=s.task,
                  description=s.description, license=s.license, source=s.source,
                  format=s.fmt, input=s.model_input, preprocess=s.preprocess,
                  strip=s.strip, postprocess=s.postprocess, variants=variants, vela=s.vela, verify=verify,
                  graph_edits=graph_edits, torch=torch_spec, source_pipeline=source_pipeline, labels=labels,
                  dense=dense, raw=data)


def load_recipe(name_or_path: str | Path, allow_unpinned: bool = False) -> Recipe:
    path = resolve_recipe_path(str(name_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    recipe = parse_recipe(path, text, allow_unpinned=allow_unpinned)
    if not is_within(path, recipes_dir()) or recipe.name == path.stem:
        return recipe
    raise RecipeError(f"{path}: name: {recipe.name!r} must match the file name {path.stem!r}")
