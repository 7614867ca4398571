"""`mzconvert eval`: every built artifact, the float source model and the source's own pipeline on the same
images, each decoded as the recipe says (tasks/), scored together (scoring.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..backends import backend_for
from ..errors import EXIT_BAD_INPUT, InputError, MzError
from ..fsio import write_json_atomic
from ..layout import built_stage_model
from ..manifest import load_manifest, measured_artifacts
from ..recipe import ClassLabels, InputSpec, Preprocess, Recipe
from ..recipe.schema import INTEGER_MODES
from ..runtime import OPTIMIZED, REFERENCE, RunnerPool, open_model, target_kernels
from ..tasks.classification import labelled_images, scores_by_label
from ..tasks.detection import (
    RAW_DECODERS,
    Detections,
    load_anchors,
    on_image,
    postprocessed_detections,
    raw_detections,
)
from ..tflite_file import integer_core_digest
from .datasets import CocoDataset, LoadedImage, Predict, Runner, dataset_identity
from .oriented_datasets import open_oriented
from .scoring import SOURCE_GRAPH, SOURCE_PIPELINE, SOURCE_TWIN, evaluate_classification, evaluate_detection

# Google's published MobileNet TFLite models (the --reference models) take NHWC RGB in [-1, 1] after
# TF-slim's central 87.5 % crop and TF1 bilinear resize, and score 1001 classes with background first.
REFERENCE_PREPROCESS = dict(interpolation="tf1-bilinear", channel_order="RGB", mean=(127.5,) * 3, std=(127.5,) * 3,
                            central_crop=0.875)


def reference_inputs(runner) -> tuple[Preprocess, InputSpec]:
    shape = tuple(runner.inputs[0].shape)
    return (Preprocess(resize=(shape[1], shape[2]), **REFERENCE_PREPROCESS),
            InputSpec(name=runner.inputs[0].name, shape=shape, layout="NHWC", dtype="float32"))


def run_eval(recipe: Recipe, dataset: Path, split: str, variants: list[str], references: list[Path],
             dist: Path, build_root: Path, console, labels_file: Path | None = None) -> tuple[dict, dict]:
    """Evaluate the built variants, the float source model, the source pipeline (where declared) and
    `references` on the same images; writes dist/<recipe>/eval/<dataset key>.json."""
    check_scored(recipe)
    manifest = load_manifest(dist, recipe.name)
    recipe = with_class_labels(recipe, manifest, console.log)
    folder = dist / recipe.name
    output_names = recipe.cut_outputs
    if missing := set(variants) - set(manifest["variants"]):
        refused = [name for name in sorted(missing) if name in manifest.get("refused", {})]
        why = f" ({', '.join(refused)}: refused by the build, below a fidelity floor)" if refused else ""
        raise InputError(f"{folder}/manifest.json: no built variant {', '.join(sorted(missing))}{why}")
    chosen = [v.name for v in recipe.variants
              if v.name in manifest["variants"] and (not variants or v.name in variants)]
    threads = os.cpu_count() or 1  # eval is throughput: every model runs on every core
    runners = {}
    # The float source model is the reference row, where the backend can run it (TF cannot run the
    # TFLite_Detection_PostProcess custom op).
    stripped = built_stage_model(build_root, recipe, "strip")
    if stripped is not None and (recipe.postprocess is None or recipe.postprocess.kind in RAW_DECODERS):
        source = backend_for(recipe).GraphRunner(stripped, recipe, threads)
        runners[SOURCE_TWIN if source.is_twin else SOURCE_GRAPH] = source.run
    rows = variant_rows(recipe, manifest, folder, chosen, output_names, threads)
    runners |= rows.runners
    pipeline = None
    if recipe.source_pipeline is not None and (frozen := built_stage_model(build_root, recipe, "freeze")):
        pipeline = backend_for(recipe).SourcePipelineRunner(frozen, recipe)
    if recipe.task == "detection":
        for path in references:
            runners[path.stem] = open_model(path, output_names, threads).run
        post = recipe.postprocess
        coco = open_oriented(dataset, split, post.labels, post.category_ids) if post.angles else \
            CocoDataset.open(dataset, split)
        recipe = replace(recipe, postprocess=replace(
            post, category_ids=coco.scored_category_ids(post.labels, post.category_ids, console.log)))
        models = predictors(recipe, runners, folder, manifest, rows.pairs)
        if pipeline is not None:
            models[SOURCE_PIPELINE] = lambda image: pipeline.detections(image.pixels())
        evaluation = evaluate_detection(models, recipe, coco, console.log, rows.pairs, rows.parallel, rows.aliases)
        scored = ["bbox", *(["mask"] if recipe.postprocess.mask_coefficients else []),
                  *(["keypoint"] if "keypoint_AP" in next(iter(evaluation["results"].values())) else [])]
        scope = ("oriented-box AP (COCO's, the rotated boxes' polygons overlapping)" if post.angles else
                 f"COCO {' and '.join(scored)} AP") + \
            (f", categories {', '.join(recipe.postprocess.labels)}" if len(recipe.postprocess.labels) < 80 else "")
        images = list(coco.images.values())
        label_source = f"oriented boxes in {dataset}" if post.angles else f"COCO annotations {coco.annotations.name}"
    else:
        models = predictors(recipe, runners, folder, manifest)
        labelled = labelled_images(dataset, recipe.labels, labels_file)
        if pipeline is not None:
            its_labels = ClassLabels(recipe.labels.names, recipe.source_pipeline.class_offset)
            scores = scores_by_label(pipeline.run, its_labels, SOURCE_PIPELINE, background_allowed=False)
            models[SOURCE_PIPELINE] = lambda image, s=scores: s(image.pixels())
        for path in references:
            reference = open_model(path, threads=threads)
            preprocess, model_input = reference_inputs(reference)
            scores = scores_by_label(reference.run, recipe.labels, path.stem, background_allowed=True)
            models[path.stem] = lambda image, s=scores, p=preprocess, i=model_input: s(image.tensor(p, i))
        evaluation = evaluate_classification(models, labelled.images, console.log, rows.pairs, rows.parallel,
                                                    rows.aliases)
        scope, images, label_source = "top-1/top-5", [p for p, _ in labelled.images], labelled.source
    for row, family in rows.kernels.items():
        if family is not None:
            evaluation["results"][row]["kernels"] = family
        if row in rows.aliases:
            evaluation["results"][row]["computed_as"] = rows.aliases[row]
    identity = dataset_identity(dataset, split, labels_file, images)
    files = [manifest["variants"][name]["file"] for name in chosen] + ["anchors.npy"]
    evaluation = {"recipe": recipe.name, "dataset": identity, "images": len(images), "labels": label_source,
                  "scope": scope, **evaluation, "models": list(evaluation["results"]),
                  "artifacts": measured_artifacts(manifest, files)}
    write_json_atomic(folder / "eval" / f"{identity['key']}.json", evaluation)
    return evaluation, manifest


@dataclass
class VariantRows:
    """The rows of the built variants: one per kernel family a variant is judged under (runtime.target_kernels:
    the target's first, named as the variant; the other "<variant> (<family> kernels)")."""
    runners: dict[str, Runner] = field(default_factory=dict)
    kernels: dict[str, str | None] = field(default_factory=dict)  # row -> its kernel family
    pairs: dict[str, str] = field(default_factory=dict)  # a variant's second row -> its first
    aliases: dict[str, str] = field(default_factory=dict)  # row -> the earlier row that computes the same

    @property
    def parallel(self) -> set[str]:
        """The rows run across images at once: the reference kernels use one core each."""
        return {row for row, family in self.kernels.items() if family == REFERENCE and row not in self.aliases}


def variant_rows(recipe: Recipe, manifest: dict, folder: Path, chosen: list[str], output_names, threads: int):
    rows = VariantRows()
    computed = {}  # (integer computation, kernels, how its outputs are read) -> the row that runs it
    for name in chosen:
        entry = manifest["variants"][name]
        path = folder / entry["file"]
        core = integer_core_digest(path) if path.suffix == ".tflite" and entry["mode"] in INTEGER_MODES else None
        for i, family in enumerate(target_kernels(recipe, recipe.variant(name)) or (None,)):
            row = name if i == 0 else f"{name} ({family} kernels)"
            rows.kernels[row] = family
            if i:
                rows.pairs[row] = name
            same = (core, family, bool(entry.get("postprocess_attached")))
            if core is not None and same in computed:  # an int8-I/O variant and its float-I/O twin: run once
                rows.aliases[row] = computed[same]
                rows.runners[row] = rows.runners[computed[same]]
                continue
            computed[same] = row
            rows.runners[row] = (RunnerPool(path, output_names, family, threads) if family == REFERENCE
                                 else open_model(path, output_names, threads, kernels=family or OPTIMIZED)).run
    return rows


def check_scored(recipe: Recipe) -> None:
    """eval and predict score detections and classes; other tasks are judged by build against the float model."""
    if recipe.task not in ("detection", "classification"):
        raise MzError(f"{recipe.path}: task: eval and predict score detections and classes against labels; a task "
                      f"{recipe.task} model is judged against its float model by build (verify: "
                      f"{'mask IoU and ' if recipe.task == 'dense' else ''}SQNR per output and slice, in report.md)",
                      EXIT_BAD_INPUT)


def with_class_labels(recipe: Recipe, manifest: dict, log) -> Recipe:
    """The recipe, a classifier without labels given its class indices as labels (warned): eval and predict
    show "17", not refuse; a dataset labelled by index (a folder per class named 0, 1, ...) is evaluated."""
    if recipe.task != "classification" or recipe.labels is not None:
        return recipe
    first = next(iter(manifest["variants"].values()))
    classes = first["outputs"][0]["shape"][-1]
    log(f"[{recipe.name}] warning: {recipe.path}: labels: none declared; classes are shown as their indices "
        f"0-{classes - 1} (a list, a file of names, or imagenet names them)")
    return replace(recipe, labels=ClassLabels(names=tuple(str(i) for i in range(classes)), label_offset=0))


def predictors(recipe: Recipe, runners: dict[str, Runner], folder: Path, manifest: dict,
               variant_of: dict[str, str] | None = None) -> dict[str, Predict]:
    """What each model of `runners` (fed the recipe's preprocessing) predicts on an image: detections,
    decoded as the recipe says or read from an attached post-processor, or scores indexed like the
    recipe's labels. `folder`/`manifest`: the dist the variants come from; `variant_of`: the variant of a
    row named otherwise (a variant under its second kernel family)."""
    check_scored(recipe)
    if recipe.task == "detection":
        anchors = load_anchors(folder / "anchors.npy") if (folder / "anchors.npy").is_file() else None
        attached = {n for n, v in manifest["variants"].items() if v.get("postprocess_attached")}
        variant_of = variant_of or {}
        return {name: _detector(run, recipe, anchors, _output_names(recipe, manifest, variant_of.get(name, name)),
                                variant_of.get(name, name) in attached)
                for name, run in runners.items()}
    models = {}
    for name, run in runners.items():
        scores = scores_by_label(run, recipe.labels, name, background_allowed=False)
        models[name] = lambda image, s=scores: s(image.tensor(recipe.preprocess, recipe.input))
    return models


def _output_names(recipe: Recipe, manifest: dict, name: str) -> list[str] | None:
    """The names of a model's outputs, in the order its runner returns them: the recipe's cut, or without one
    (a .tflite source) the file's own, as the build recorded them (the source model's are its first variant's)."""
    if recipe.strip is not None:
        return list(recipe.strip.outputs)
    variant = manifest["variants"].get(name) or next(iter(manifest["variants"].values()), {})
    return [o["name"] for o in variant.get("outputs", [])] or None


def _detector(run, recipe: Recipe, anchors, output_names, attached: bool = False) -> Predict:
    """Detections of a model on the original image: raw outputs decoded here as the recipe's kind says, or a
    model's own post-processor read."""
    post = recipe.postprocess

    def predict(image: LoadedImage) -> Detections:
        outputs = run(image.tensor(recipe.preprocess, recipe.input))
        if post.kind in RAW_DECODERS and not attached:
            found = raw_detections(outputs, output_names, post, anchors, recipe.input.height_width)
        else:
            found = postprocessed_detections(*outputs)
        return on_image(found, image.size, recipe.preprocess)

    return predict
