"""A build: the stages of a recipe wired in order (fetch -> freeze -> strip -> calibrate -> quantize, then
each variant's checks: verify, vela, the source pipeline), each run through the planner (planner.py),
which skips a stage whose inputs are unchanged, and dist/<recipe>/ assembled from their outcomes.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

from . import __version__
from .backends.torch_sources import user_code
from .console import Console
from .errors import EXIT_FAILURE, InputError, MzError, RefusedVariant
from .fsio import folder_lock, sha256_file
from .planner import BuildOptions, Planner, StageOutcome, canonical_hash, validated
from .recipe import Recipe, Variant, VelaTarget
from .recipe.schema import DEFAULT_FLOORS
from .runtime import REFERENCE, target_kernels
from .sources.fetch import Fetcher
from .tasks.anchors import anchors_file

CHECKS_NICENESS = 10  # see _yielding_thread


# -- the stages, wired ---------------------------------------------------------------------------
def _chain_suffix(recipe: Recipe, member: str | None) -> str:
    """Stage-name suffix of the model chain built from `member` ('' for the source's own member)."""
    if member == recipe.source.member:
        return ""
    return "-" + re.sub(r"[^A-Za-z0-9._-]+", "-", member.strip("/"))


def _fetch(p: Planner, member: str | None) -> StageOutcome:
    def action(out: Path) -> dict:
        model = p.fetcher.fetch_source(p.recipe.source, out, member)
        return {"model": str(model.relative_to(out))}

    inputs = {"source": validated(p.recipe.source), "member": member, "mzconvert": __version__}
    return p.stage("fetch" + _chain_suffix(p.recipe, member), inputs, action)


def _freeze(p: Planner, fetched: StageOutcome, suffix: str) -> StageOutcome:
    from .stages.freeze import freeze

    inputs = {"source": fetched.digest(), "format": p.recipe.format, "torch": validated(p.recipe.torch),
              "input": validated(p.recipe.input),  # a Keras or ONNX source is frozen at input.shape
              "targets": sorted({v.target for v in p.recipe.variants}),  # a tflite target adds the Keras port
              "strip": validated(p.recipe.strip), "graph_edits": p.recipe.graph_edits, "tools": p.versions}
    if (code := user_code(p.recipe.torch, p.recipe.path.parent)) is not None and code.is_file():
        inputs["torch_code"] = sha256_file(code)  # the user's own module class: its code
    if p.recipe.postprocess is not None and p.recipe.postprocess.levels:  # an ONNX head's Convs split at freeze
        inputs["levels"] = [validated(level) for level in p.recipe.postprocess.levels]

    def action(out: Path) -> dict:
        return {"model": freeze(fetched.path("model"), p.recipe, out).name}

    return p.stage("freeze" + suffix, inputs, action)


def _strip(p: Planner, frozen: StageOutcome, suffix: str) -> StageOutcome:
    from .stages.strip import strip

    inputs = {"model": frozen.digest(), "input": validated(p.recipe.input), "strip": validated(p.recipe.strip),
              "postprocess": validated(p.recipe.postprocess), "tools": p.versions,
              "targets": sorted({v.target for v in p.recipe.variants})}  # an ONNX model's tflite target: its port
    if p.recipe.postprocess is not None and p.recipe.postprocess.anchors_file:
        declared = anchors_file(p.recipe)
        inputs["anchors_file"] = sha256_file(declared) if declared.is_file() else None  # strip names it missing

    def action(out: Path) -> dict:
        result = strip(frozen.path("model"), p.recipe, out)
        return {"model": result.model.name, "extras": [e.name for e in result.extras], **result.metadata}

    outcome = p.stage("strip" + suffix, inputs, action)
    declared, found = p.recipe.preprocess.interpolation, outcome.result.get("source_resize", [])
    if found and declared not in found:
        p.console.log(f"[{p.recipe.name}] warning: {p.recipe.path}: preprocess.interpolation is {declared!r}, but the "
                      f"source's own preprocessing (cut off by strip) resizes with {', '.join(found)}: calibration, "
                      "verify and eval will feed the model other pixels than it was trained on")
    return outcome


def _model_chain(p: Planner, member: str | None, until: str) -> list[StageOutcome]:
    """fetch -> freeze -> strip for one archive member, as far as `until` asks."""
    suffix = _chain_suffix(p.recipe, member)
    chain = [_fetch(p, member)]
    if until != "fetch":
        chain.append(_freeze(p, chain[-1], suffix))
    if until not in ("fetch", "freeze"):
        chain.append(_strip(p, chain[-1], suffix))
    return chain


def _image_paths(p: Planner, spec: str, count: int | None, at_most: int | None = None, after: int | None = None
                 ) -> tuple[str, Callable[[], list[Path]], list[str]]:
    """(key naming the exact images, a function fetching them, their file names): fetching only when a
    stage runs. `count` images are required; without one, all of the set, or `at_most` of them; with `after`,
    `count` from the set's `after`-th image on (ImageSet.window_after). A folder set is hashed once a build,
    however many variants use it."""
    from .sources.imagesets import load_image_set

    memo = (spec, count, at_most, after)
    with p._lock:
        if memo not in p._image_sets:
            image_set = load_image_set(spec, p.recipe.path)
            count = image_set.count(count, at_most)
            start, count = (0, count) if after is None else image_set.window_after(after, count)
            key = f"{image_set.key}:{count}" if start == 0 else f"{image_set.key}:{start}+{count}"
            p._image_sets[memo] = (key, lambda: image_set.paths(p.fetcher, count, p.console.log, start),
                                   image_set.names(count, start))
        return p._image_sets[memo]


def _calibration_images(p: Planner, variant: Variant) -> tuple[str, Callable[[], list[Path]], list[str]]:
    from .stages.calibrate import DEFAULT_CALIBRATION_COUNT

    return _image_paths(p, variant.calibration, variant.calibration_count, at_most=DEFAULT_CALIBRATION_COUNT)


def _verify_images(p: Planner) -> tuple[str, Callable[[], list[Path]], list[str]]:
    return _image_paths(p, p.recipe.verify.images, p.recipe.verify.count)


def _choosing_images(p: Planner, variant: Variant) -> tuple[str, Callable[[], list[Path]], list[str]]:
    """The images a search of the variant's quantization chooses by (stages/fallback.py): as many as verify
    judges by, from the variant's calibration set after the images its ranges are recorded on (where the set
    ends before, its last ones), so never the verify images: the figure verify then reports of the chosen
    candidate is not the best of several on the same images."""
    calibrated = _calibration_images(p, variant)[2]
    return _image_paths(p, variant.calibration, len(_verify_images(p)[2]), after=len(calibrated))


def _choosing_text(p: Planner, variant: Variant, chosen_by: list[str]) -> str:
    """Which images a search chose by (their names, as its result records them), for its log line."""
    calibrated = set(_calibration_images(p, variant)[2])
    also = sum(name in calibrated for name in chosen_by)
    return (f"{len(chosen_by)} images of the calibration set, "
            + (f"{also} of them calibrated on" if also else "none calibrated on") + "; verify judges the choice")


def _sigmoid_read(recipe) -> dict:
    """The outputs whose ranges stop at a sigmoid's band (Postprocess.sigmoid_read_outputs), for a stage's inputs; none
    named where there are none, so that other recipes' stages keep their stamps."""
    return {"sigmoid_read": list(recipe.sigmoid_read_outputs)} if recipe.sigmoid_read_outputs else {}


def _calibrate(p: Planner, stripped: StageOutcome, variant: Variant) -> StageOutcome:
    """One calibration per (model, images, preprocessing): every TFLite int8 variant using them shares it."""
    from .stages.calibrate import calibrate

    images_key, images, _ = _calibration_images(p, variant)
    inputs = {"model": stripped.digest(), "calibration": images_key, "preprocess": validated(p.recipe.preprocess),
              "input": validated(p.recipe.input), "strip": validated(p.recipe.strip), "target": variant.target,
              "tools": p.versions,
              "moments": variant.fits_every_layer,  # of every layer, not only depthwise ones
              "method": [variant.calibration_method]
              + ([variant.calibration_percentile] if variant.calibration_method == "percentile" else []),
              **_sigmoid_read(p.recipe)}

    def action(out: Path) -> dict:
        return {"model": calibrate(stripped.path("model"), p.recipe, variant, images(), out).name}

    return p.stage(f"calibrate/{canonical_hash(inputs)[:12]}", inputs, action)


def _quantizing(variant: Variant) -> dict:
    """A variant as its quantization and its searches read it: without the fidelity floors, which only verify
    judges by (a lowered floor checks the same model again, it does not make a new one)."""
    return {field: value for field, value in validated(variant).items() if field not in DEFAULT_FLOORS}


def _quantize(p: Planner, stripped: StageOutcome, variant: Variant) -> StageOutcome:
    from .stages.calibrate import shares_calibration
    from .stages.quantize import quantize

    inputs = {"model": stripped.digest(), "variant": _quantizing(variant),
              "weight_rounding": variant.weight_rounding,  # its default depends on the target
              "input": validated(p.recipe.input), "strip": validated(p.recipe.strip), "tools": p.versions,
              **_sigmoid_read(p.recipe)}
    images = calibrated = None
    if variant.calibration and shares_calibration(p.recipe, variant):
        calibrated = _calibrate(p, stripped, variant)
        inputs["calibrated"] = calibrated.digest()
    if variant.calibration and (calibrated is None or variant.tune_steps):  # tuning reads the images too
        inputs["calibration"], images, _ = _calibration_images(p, variant)
        inputs["preprocess"] = validated(p.recipe.preprocess)

    def action(out: Path) -> dict:
        result = quantize(stripped.path("model"), p.recipe, variant, images() if images else None, out,
                          stripped.anchors(), calibrated.path("model") if calibrated else None,
                          _variant_log(p, variant))
        return {"model": result.model.name, "mode": variant.mode, "io_dtype": variant.io_dtype,
                "inputs": [s.to_json() for s in result.inputs], "outputs": [s.to_json() for s in result.outputs],
                **({"raw_model": str(result.raw_model.relative_to(out))} if result.raw_model else {}),
                **({"fitted": result.fitted} if result.fitted else {}),
                **({"tuned": result.tuned} if result.tuned else {})}

    outcome = p.stage(f"quantize/{variant.name}", inputs, action)
    if fitted := outcome.result.get("fitted"):
        p.console.log(f"[{p.recipe.name}] {variant.name}: {fitted['layers']} layers' weights fitted to the "
                      f"calibration images (their output error there {fitted['error_ratio']:.2f}x nearest rounding's)")
    if (tuned := outcome.result.get("tuned")) and "not_run" in tuned:
        p.console.log(f"[{p.recipe.name}] {variant.name}: weights not tuned ({tuned['not_run']})")
    elif tuned:
        p.console.log(f"[{p.recipe.name}] {variant.name}: weights tuned for {tuned['steps']} steps to the float "
                      f"model's outputs, output error on calibration images not tuned on "
                      f"{tuned['error_before']:.4g} -> {tuned['error_after']:.4g}"
                      + ("" if tuned["kept"] else ": not lower, untuned weights kept"))
    return outcome



def _search_inputs(p: Planner, stripped: StageOutcome, variant: Variant) -> tuple[dict, Callable, Callable, tuple]:
    """What a search of a variant's quantization depends on; its calibration images and the images it chooses
    by (_choosing_images); the float model's outputs on those (the reference stage's file, its output names)."""
    calibration_key, calibration, _ = _calibration_images(p, variant)
    images_key, images, _ = choosing = _choosing_images(p, variant)
    reference = _reference(p, stripped, choosing)
    inputs = {"model": stripped.digest(), "variant": _quantizing(variant), "weight_rounding": variant.weight_rounding,
              "calibration": calibration_key, "images": images_key, "preprocess": validated(p.recipe.preprocess),
              "input": validated(p.recipe.input), "strip": validated(p.recipe.strip),
              "postprocess": validated(p.recipe.postprocess), "reference": reference.digest(), "tools": p.versions}
    return inputs, calibration, images, (reference.path("reference"), reference.result["outputs"])


def _variant_log(p: Planner, variant: Variant) -> Callable[[str], None]:
    return lambda line: p.console.log(f"[{p.recipe.name}] {variant.name}: {line}")


def _ranges_chosen(p: Planner, stripped: StageOutcome, variant: Variant) -> tuple[StageOutcome, Variant]:
    """calibration_method auto: each range method tried on the images searches choose by (_choosing_images), the
    first kept unless another agrees with the float model better on significantly more of them (stages/fallback.py);
    the variant with the method chosen."""
    from dataclasses import replace

    from .stages.fallback import SIGNIFICANT, search_calibration_method

    inputs, calibration, images, reference = _search_inputs(p, stripped, variant)

    def action(out: Path) -> dict:
        return {"ranges": search_calibration_method(stripped.path("model"), p.recipe, variant, calibration(),
                                                    images(), _variant_log(p, variant), reference)
                | {"chosen_by": _choosing_images(p, variant)[2]}}

    outcome = p.stage(f"ranges/{variant.name}", inputs | {"significant": SIGNIFICANT}, action)
    ranges = outcome.result["ranges"]
    chosen = ranges["chosen"]
    tried = ", ".join(f"{s['calibration_method']} {s['fidelity']:.1%}" + (
        f" (better on {s['against_first'][0]}, worse on {s['against_first'][1]} images, p {s['against_first'][2]:.2g})"
        if "against_first" in s else "") for s in ranges["steps"])
    p.console.log(f"[{p.recipe.name}] {variant.name}: calibration_method auto: {chosen['calibration_method']} "
                  f"(fidelity on {_choosing_text(p, variant, ranges['chosen_by'])}: {tried})")
    return outcome, replace(variant, calibration_method=chosen["calibration_method"])


def _searched(p: Planner, stripped: StageOutcome, variant: Variant) -> tuple[StageOutcome, Variant]:
    """A variant's max_drop: the fewest of its worst layers kept float for it to agree with the float model on
    at least 1 - max_drop of the images searches choose by (_choosing_images; stages/fallback.py); the variant
    with those float_layers."""
    from dataclasses import replace

    from .stages.debug import layer_errors, layers_to_keep_float
    from .stages.fallback import search_float_layers

    inputs, calibration, images, reference = _search_inputs(p, stripped, variant)

    def action(out: Path) -> dict:
        model, calibration_images, choosing_images = stripped.path("model"), calibration(), images()

        def ranked(artifact: Path) -> list[str]:  # as `mzconvert debug` ranks them, worst first
            return layers_to_keep_float(layer_errors(model, p.recipe, variant, artifact, lambda: calibration_images,
                                                     choosing_images))

        return {"search": search_float_layers(model, p.recipe, variant, ranked, calibration_images, choosing_images,
                                              variant.max_drop, _variant_log(p, variant), reference)
                | {"chosen_by": _choosing_images(p, variant)[2]}}

    outcome = p.stage(f"search/{variant.name}", inputs, action)
    search = outcome.result["search"]
    chosen = search["chosen"]
    searched_on = _choosing_text(p, variant, search["chosen_by"])
    p.console.log(f"[{p.recipe.name}] {variant.name}: max_drop {search['max_drop']:g}: {len(chosen['float_layers'])} "
                  f"layers kept float, fidelity {chosen['fidelity']:.1%} on {searched_on} "
                  f"({'within' if search['met'] else 'NOT within, the best found'}), {chosen['bytes']} bytes, "
                  f"{chosen['float_ops']} float ops")
    if p.recipe.task == "classification" and search["max_drop"] * search["images"] < 1:  # top-1: a share of images
        p.console.log(f"[{p.recipe.name}] warning: {variant.name}: max_drop {search['max_drop']:g} is less than one "
                      f"image of the {search['images']} searched ({1 / search['images']:.1%}): all of them had to "
                      "agree, which fits the search to those images more than it measures the variant")
    return outcome, replace(variant, float_layers=tuple(chosen["float_layers"]))


def _reference(p: Planner, stripped: StageOutcome, on: tuple | None = None) -> StageOutcome:
    """The float model's outputs on the verify images (or the images `on`, as _image_paths gives them),
    computed once and compared with every variant."""
    from .stages.verify import reference_outputs

    key, images, _ = on or _verify_images(p)
    inputs = {"model": stripped.digest(), "images": key, "preprocess": validated(p.recipe.preprocess),
              "input": validated(p.recipe.input), "postprocess": validated(p.recipe.postprocess), "tools": p.versions}

    def action(out: Path) -> dict:
        from .backends import backend_for

        reference = backend_for(p.recipe).GraphRunner(stripped.path("model"), p.recipe, p.threads)
        return {"reference": reference_outputs(reference, p.recipe, images(), out, stripped.anchors()).name,
                "outputs": list(reference.output_names), "twin": reference.is_twin}

    return p.stage(f"reference/{canonical_hash(inputs)[:12]}", inputs, action)


def _verify(p: Planner, stripped: StageOutcome, quantized: StageOutcome, variant: Variant) -> StageOutcome:
    from .stages.verify import (
        floor_failures,
        matched_parts_text,
        matched_share_text,
        threshold_failures,
        verify_variant,
    )

    reference = _reference(p, stripped)
    kernels = next(iter(target_kernels(p.recipe, variant)), None)  # the target's: a device's own arithmetic
    inputs = {"model": quantized.sha256("model"), "reference": reference.digest(), "kernels": kernels,
              "tools": p.versions}

    def action(out: Path) -> dict:
        compared = quantized.optional_path("raw_model") or quantized.path("model")  # raw: before attaching NMS
        return {"metrics": verify_variant(compared, reference.path("reference"), reference.result["outputs"],
                                          p.recipe, stripped.anchors(), p.threads, kernels)}

    outcome = p.stage(f"verify/{variant.name}", inputs, action)
    metrics = outcome.result["metrics"]
    on = f" ({kernels} kernels)" if kernels == REFERENCE else ""
    twin = reference.result.get("twin", False)  # a quantized source, judged against its float twin
    against = "float twin" if twin else "float graph"
    for name, m in metrics.items():
        if not isinstance(m, dict):
            continue
        p.console.log(f"[{p.recipe.name}] {variant.name}{on} vs {against}, output {name} on "
                      f"{metrics['images']} val images: cosine {m['cosine']:.5f}  SQNR {m['sqnr_db']:.1f} dB  "
                      f"max abs err {m['max_abs_error']:.4g}" + _task_figures(m))
        if m.get("constant_reference"):
            p.console.log(f"[{p.recipe.name}] warning: the float model's output {name} is the same on all "
                          f"{metrics['images']} verify images (untrained weights, a wrong input or cut?): "
                          f"the fidelity figures of {variant.name} say nothing")
    if "detections_not_compared" in metrics:
        p.console.log(f"[{p.recipe.name}] warning: {variant.name}: detections not compared with the float model's: "
                      f"{metrics['detections_not_compared']}")
    if "matched_detections" in metrics:
        compared = metrics["detections_compared"]
        p.console.log(f"[{p.recipe.name}] {variant.name}{on} vs {against}: {matched_share_text(metrics)} of the "
                      f"{compared} detections (score >= 0.3) matched (same label, IoU >= 0.9)"
                      + matched_parts_text(metrics, "; their {}"))
        if not compared:
            p.console.log(f"[{p.recipe.name}] warning: neither the float model nor {variant.name} detects anything "
                          "scoring 0.3 or more on the verify images: the share matched says nothing (untrained "
                          "weights, or verify images without the objects the model finds?)")
    if floors := floor_failures(p.recipe, variant, metrics):
        elsewhere = [f"{p.recipe.path}: variants: {variant.name}: the file was quantized elsewhere and loses this "
                     "against its float twin; its float export (ONNX, a float .tflite) is quantized here with ranges "
                     "of its own"] if twin else []
        raise RefusedVariant("\n".join(floors + elsewhere))
    failures = threshold_failures(variant, metrics)
    if failures and p.options.verify_strict:
        raise MzError(f"{p.recipe.path}: verify thresholds missed: {'; '.join(failures)}")
    for failure in failures:
        p.console.log(f"[{p.recipe.name}] warning: threshold missed: {failure}")
    return outcome


def _task_figures(m: dict) -> str:
    """What the verify line adds to an output's signal figures: its worst slice, and what its task judges."""
    text = ""
    if worst := m.get("worst_slice"):
        text += f"  worst slice: channel {worst['index']} of {worst['of']}, SQNR {worst['sqnr_db']:.1f} dB"
    if "top1_agreement" in m:
        text += f"  top-1 agreement {m['top1_agreement']:.1%}"
    if "mask_iou" in m:
        text += f"  mask IoU {m['mask_iou']:.3f}  pixel error {m['pixel_error']:.2%}"
    return text


def _source_pipeline(p: Planner, chain: list[StageOutcome]) -> StageOutcome:
    """Our declared pipeline against the source end to end, on the verify images: once per build."""
    from .stages.verify import source_pipeline_fidelity

    _, frozen, stripped = chain
    key, images, names = _verify_images(p)
    reference = _reference(p, stripped)  # ours: the float model's outputs on the same images
    inputs = {"frozen": frozen.digest(), "reference": reference.digest(), "stripped": stripped.digest(),
              "postprocess": validated(p.recipe.postprocess), "source_pipeline": validated(p.recipe.source_pipeline),
              "tools": p.versions}

    def action(out: Path) -> dict:
        return {"fidelity": source_pipeline_fidelity(frozen.path("model"), reference.path("reference"), p.recipe,
                                                     images(), names)}

    outcome = p.stage("verify/source-pipeline", inputs, action)
    f = outcome.result["fidelity"]
    line = (f"our preprocessing + float model + decode vs the source end to end on {f['images']} images: "
            f"{f['matched_share']:.1%} {f['what']} ({f['compared']} compared"
            + (f"; worst image {f['worst_image']}: {f['worst_image_share']:.0%})" if f["worst_image"] else ")"))
    p.console.log(f"[{p.recipe.name}] {line}")
    minimum = p.recipe.source_pipeline.min_matched
    if minimum is not None and f["matched_share"] < minimum:
        message = f"{p.recipe.path}: source_pipeline.min_matched: {line}, below {minimum}"
        if p.options.verify_strict:
            raise MzError(message)
        p.console.log(f"[{p.recipe.name}] warning: {message}")
    return outcome


def _vela(p: Planner, quantized: StageOutcome, variant: Variant, target: VelaTarget) -> StageOutcome:
    from dataclasses import asdict

    from .stages.vela import check_budgets, compile_for_npu

    settings = asdict(target) | {"targets": len(p.recipe.vela)}  # the count decides the artifact names
    inputs = {"model": quantized.sha256("model"), "vela": settings, "tools": p.versions}
    if target.config:
        inputs["config"] = sha256_file((p.recipe.path.parent / target.config).resolve())

    def action(out: Path) -> dict:
        result = compile_for_npu(quantized.path("model"), p.recipe, variant, target, out,
                                 quantized.optional_path("raw_model"))
        return {"model": result.model.name, "summary_csv": result.summary_csv.name, "summary": result.summary}

    suffix = f"/{target.name}" if len(p.recipe.vela) > 1 else ""
    outcome = p.stage(f"vela/{variant.name}{suffix}", inputs, action)
    s = outcome.result["summary"]
    check_budgets(p.recipe, variant, target, s)  # also when the stage was up to date
    p.console.log(f"[{p.recipe.name}] {variant.name} on {s['accelerator']} ({s['system_config']}): "
                  f"{s.get('inference_time_ms', '?')} ms estimated, {s['npu_ops']} NPU ops, "
                  f"{s['cpu_op_count']} CPU ops, SRAM {s.get('sram_used_kib', '?')} KiB, "
                  f"flash {s.get('on_chip_flash_used_kib', 0) + s.get('off_chip_flash_used_kib', 0):g} KiB")
    return outcome


def _quantize_then_check(p: Planner, chain: list[StageOutcome], variant: Variant, until: str,
                         checks: Executor) -> Callable[[], dict]:
    """quantize one variant here (and the shared stages it needs: calibration), then hand its checks, which
    only read the finished artifact (verify against the float reference, vela per NPU target), to `checks`.
    Returns what waits for them: the variant's {stage: outcome}, or its RefusedVariant when its fidelity is
    below its floors or its converter or quantizer cannot make it (the other variants go on)."""
    stripped = chain[-1]
    searched = ranged = None
    try:
        if variant.calibration_method == "auto":
            ranged, variant = _ranges_chosen(p, stripped, variant)
        if variant.max_drop is not None:
            searched, variant = _searched(p, stripped, variant)
        quantized = _quantize(p, stripped, variant)
    except MzError as exc:  # an op its quantizer has no kernel for at this precision: one variant's failure
        if exc.exit_code != EXIT_FAILURE:  # bad input (a recipe field, a calibration folder) stops the build
            raise
        unmade = RefusedVariant(f"{p.recipe.path}: variants[{p.recipe.variant_index(variant.name)}]: "
                                f"{variant.name} could not be made: {exc}")
        return lambda: unmade
    verified = checks.submit(_verify, p, stripped, quantized, variant) if p.recipe.verify is not None else None
    npu = until != "quantize" and variant.for_npu
    compiled = {t.name: checks.submit(_vela, p, quantized, variant, t) for t in p.recipe.vela} if npu else {}

    def entry() -> dict | RefusedVariant:
        stages = {"quantize": quantized, "chain": chain, **({"search": searched} if searched else {}),
                  **({"ranges": ranged} if ranged else {})}
        if verified is not None:
            try:
                stages["verify"] = verified.result()
            except RefusedVariant as refusal:
                return refusal
        if compiled:
            stages["vela"] = {name: future.result() for name, future in compiled.items()}
        return stages
    return entry


def _variants(p: Planner, jobs: list[tuple], checks: Executor) -> dict:
    """Every variant's stages, {variant: {stage: outcome}} in the recipe's order: conversions one variant at a
    time (-j N: N at once, _in_threads), each variant's checks handed to `checks` (see _checks_pool)."""
    if p.options.jobs > 1 and len(jobs) > 1:
        pending = _in_threads(p, jobs, checks)
    else:
        pending = {variant.name: _quantize_then_check(p, chain, variant, until, checks)
                   for chain, variant, until in jobs}
    return {name: entry() for name, entry in pending.items()}


def _checks_pool(p: Planner) -> ThreadPoolExecutor:
    """Where the checks run (verify, vela, the source pipeline's): beside the conversions, which hold the GIL
    on one core while LiteRT, numpy and vela's process, which do not need it, use the others. The same
    stage functions in any order, so the same bytes."""
    return ThreadPoolExecutor(max_workers=p.options.jobs + 1, thread_name_prefix="check",
                              initializer=_yielding_thread)


def _yielding_thread() -> None:
    """Lower this thread's scheduling priority (on Linux a thread has its own nice value, and the threads and
    processes it starts inherit it): checks fill the cores the conversions leave idle instead of slowing
    them, since the next conversion is what the build waits for."""
    if sys.platform == "linux":
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECKS_NICENESS)


def _in_threads(p: Planner, jobs: list[tuple], checks: Executor) -> dict:
    """Each variant's conversion in a pool of `jobs` threads of this process (TensorFlow imported once). The
    converters hold the GIL, one at a time (quantize.CONVERTERS), so what runs beside a conversion is a
    calibration's LiteRT passes, and the checks. A shared stage runs in one thread while the others wait
    for it. The variant that starts a calibration goes first, those that reuse one last, so the
    calibration runs beside the float variants, not before them."""
    from .stages.calibrate import shares_calibration

    starts_calibration, seen = set(), set()
    for _, variant, _ in jobs:
        images = (variant.calibration, variant.calibration_count, variant.calibration_method)
        if shares_calibration(p.recipe, variant) and images not in seen:
            seen.add(images)
            starts_calibration.add(variant.name)
    order = sorted(jobs, key=lambda j: (j[1].name not in starts_calibration, bool(j[1].calibration)))
    with ThreadPoolExecutor(max_workers=min(p.options.jobs, len(jobs))) as pool:
        done = dict(zip((j[1].name for j in order),
                        pool.map(lambda job: _quantize_then_check(p, *job, checks), order)))
    return {j[1].name: done[j[1].name] for j in jobs}  # the recipe's order


def _remove_stale_staging(folders: list[Path]) -> None:
    """Staging folders a killed build left behind. Safe: we hold the lock of the folder they are in."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def _dist_staging(out_root: Path, name: str) -> list[Path]:
    # '@' cannot occur in a recipe name, so recipe "x" never matches the staging of recipe "x.y"
    return [p for p in out_root.glob(f".{name}@*") if p.is_dir()] if out_root.is_dir() else []


def _check_something_to_compile(recipe: Recipe, variants: list) -> None:
    if not recipe.vela:
        raise InputError(f"{recipe.path}: targets.vela: the recipe names no NPU target; the vela stage has "
                         "nothing to compile")
    if not any(v.for_npu for v in variants):
        raise InputError(f"{recipe.path}: the NPU compiles TFLite int8 / int16x8 variants, and "
                         f"{', '.join(v.name for v in variants)} is none; the vela stage has nothing to compile")


STAGES = ("fetch", "freeze", "strip", "quantize", "vela", "dist")


def _check_folders_apart(recipe: Recipe, options: BuildOptions) -> None:
    """The recipe's dist folder replaces itself whole when written: where it is, holds or lies in its build
    folder, writing it would delete the stages' outputs (or the dist folder the build folder's)."""
    shipped, stages = (Path(os.path.abspath(root / recipe.name)) for root in (options.out, options.build_root))
    if shipped == stages or shipped in stages.parents or stages in shipped.parents:
        raise InputError(f"--out {options.out} and --build-dir {options.build_root}: {recipe.name}'s dist folder "
                         f"{shipped} and build folder {stages} overlap; give them folders apart (default: dist, build)")


def build(recipe: Recipe, fetcher: Fetcher, console: Console, options: BuildOptions, until: str = "dist") -> dict:
    """Run the chain up to `until`; with "dist" returns the manifest written to dist/<recipe>/,
    otherwise {stage: output folder} of the stages run or found up to date."""
    variants = [recipe.variant(name) for name in options.variants] if options.variants else list(recipe.variants)
    if until == "dist":
        _check_folders_apart(recipe, options)
    if until == "vela":  # a stage with nothing to do says so, before building anything
        _check_something_to_compile(recipe, variants)
    planner = Planner(recipe, fetcher, console, options)
    with folder_lock(planner.folder, options.lock_timeout, console.log):
        _remove_stale_staging([p for p in planner.folder.rglob(".*") if p.is_dir()])
        chains = {}
        for member in dict.fromkeys(recipe.member_for(v) for v in variants):
            chains[member] = _model_chain(planner, member, until)
        per_variant, fidelity = {}, None
        source_chain = chains.get(recipe.source.member)
        compares_source = (recipe.source_pipeline is not None and recipe.verify is not None and source_chain
                           and until == "dist")
        checks = _checks_pool(planner)
        try:
            pipeline = checks.submit(_source_pipeline, planner, source_chain) if compares_source else None
            if STAGES.index(until) >= STAGES.index("quantize"):
                jobs = [(chains[recipe.member_for(v)], v, until) for v in variants]
                per_variant = _variants(planner, jobs, checks)
            fidelity = pipeline.result().result["fidelity"] if pipeline else None
        finally:
            checks.shutdown(cancel_futures=True)  # after a failure, no checks beyond those already running
        refused = {name: str(r) for name, r in per_variant.items() if isinstance(r, RefusedVariant)}
        shipped = {name: stages for name, stages in per_variant.items() if name not in refused}
        if until != "dist":
            _raise_refused(refused, "")
            return {name: str(outcome.folder) for name, outcome in planner.outcomes.items()}
        if refused and not shipped and not (options.out / recipe.name).is_dir():
            _raise_refused(refused, "; nothing was written")  # else the dist is rewritten without them
        from .fsio import recover_folder
        from .layout import record_build
        from .stages.dist import assemble

        # dist/ has its own lock: two builds of one recipe with other --build-dir share --out.
        with folder_lock(options.out, options.lock_timeout, console.log, name=f".{recipe.name}.lock"):
            recover_folder(options.out / recipe.name)
            _remove_stale_staging(_dist_staging(options.out, recipe.name))
            manifest = assemble(recipe, shipped, planner.versions, options.out, console, fidelity, refused)
        record_build(fetcher.config.cache_dir, recipe, options.out, options.build_root)
        _raise_refused(refused, f"; {options.out / recipe.name}/ holds the others: "
                                f"{', '.join(manifest['variants']) or 'none'}")
        return manifest


def _raise_refused(refused: dict[str, str], shipped: str) -> None:
    """The build's end when a variant was refused: each floor it missed, a line each, then what was shipped.
    The exit code is a failure's (1): a build asked for a variant it could not ship."""
    if refused:
        lines = "\n".join(refused.values())
        raise RefusedVariant(f"{lines}\nnot shipped: {', '.join(refused)}{shipped}")
