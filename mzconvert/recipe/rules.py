"""The rules that hold between a recipe's sections. Each is a function of parsed sections that raises a
located error; parse.py runs every one whose sections parsed (per variant where a rule is about one) and
collects what they find, so one run names all of a recipe's problems."""

from __future__ import annotations

from dataclasses import replace

from ..yamlsafe import short
from .reader import Reader
from .schema import (
    CALIBRATED_MODES,
    FITTED_ROUNDINGS,
    SEARCHED_TASKS,
    TFLITE_CALIBRATION_METHODS,
    TORCH_FORMATS,
    Postprocess,
    Source,
    Variant,
    VelaTarget,
)


def uses_onnx_backend(fmt: str) -> bool:
    return fmt == "onnx" or fmt in TORCH_FORMATS


def native_target(fmt: str) -> str:
    """The artifact format a source converts to when a variant names none."""
    return "onnx" if uses_onnx_backend(fmt) else "tflite"


def _has_custom_ops(postprocess: Postprocess | None) -> bool:
    return postprocess is not None and postprocess.kind == "tflite-detection-postprocess"


def _attachable(postprocess: Postprocess | None) -> bool:
    """A head TFLite_Detection_PostProcess can end (stages/attach.py: HEAD_INPUTS)."""
    if postprocess is None:
        return False
    if postprocess.kind == "ssd":
        return (postprocess.box_coding, postprocess.box_order) == ("exponential", "yxhw")
    return postprocess.kind == "yolov8" and postprocess.box_output is not None


def _fits(v: Variant, fmt: str, postprocess: Postprocess | None) -> bool:
    """Depthwise weights can be fitted in int8 quantized here with 8-bit weights: TFLite from one shared
    calibration (a graph with custom ops converts in one piece) and ONNX QDQ without reduce_range. It is the
    default for both (MobileNetV2's ONNX int8, mean_minmax ranges: top-1 agreement with float 96.0 -> 97.4 % of
    the 500 ImageNet samples; README, bench/peers.py)."""
    if v.mode != "int8":
        return False
    if v.target == "onnx":
        return not v.reduce_range
    ours = fmt != "tflite" or (v.calibration and v.quantizer == "converter")
    return v.target == "tflite" and ours and not _has_custom_ops(postprocess)


def settle_variant(v: Variant, fmt: str, postprocess: Postprocess | None) -> Variant:
    """The defaults of a variant that depend on other sections: its target (the source backend's own),
    whether post-processing is attached (postprocess.attach, to TFLite variants), its weight rounding (fitted
    where it applies by default)."""
    target = v.target or native_target(fmt)
    attach = postprocess is not None and postprocess.attach and target == "tflite"
    v = replace(v, target=target, attach_postprocess=attach if v.attach_postprocess is None else v.attach_postprocess,
                quantizer=v.quantizer or ("converter" if fmt != "tflite" or v.mode == "int8" else "ai-edge-quantizer"))
    return replace(v, weight_rounding=v.weight_rounding or ("fitted" if _fits(v, fmt, postprocess) else "nearest"))


def check_variant(item: Reader, v: Variant, earlier: list[str], fmt: str, source: Source,
                  postprocess: Postprocess | None) -> None:
    """One variant against the source, the post-processing and the variants before it (`earlier` names)."""
    where = item.child_where
    if v.name in earlier:
        raise item.fail(f"duplicate variant name {v.name!r}", where("name"))
    if v.member and not source.is_archive:
        raise item.fail("a variant member needs a url source with an archive member", where("member"))
    if v.weight_rounding in FITTED_ROUNDINGS and not _fits(v, fmt, postprocess):
        raise item.fail(f"weight_rounding {v.weight_rounding} applies to int8 variants this tool quantizes with 8-bit "
                        "weights (not a .tflite source, a graph with custom ops, or reduce_range)",
                        where("weight_rounding"))
    if v.bias_correction and (v.mode != "int8" or v.target != "onnx"):
        raise item.fail("bias_correction applies to ONNX int8 (QDQ) variants", where("bias_correction"))
    if v.tune_steps and (v.mode != "int8" or not v.calibration):
        raise item.fail("tune_steps applies to int8 variants calibrated here (ONNX QDQ or TFLite)", where("tune_steps"))
    # a quantized .tflite or ONNX (QDQ) source is taken as it is, without calibration (its backend's convert checks)
    if v.mode in CALIBRATED_MODES and fmt not in ("tflite", "onnx") and not v.calibration:
        raise item.fail("missing required field", where("calibration"))
    if v.attach_postprocess and not (v.target == "tflite" and _attachable(postprocess)):
        raise item.fail("post-processing attaches to TFLite variants of detectors with postprocess.kind ssd and "
                        "TF's box coding (exponential, yxhw), or yolov8 cut before its Concat (box_output, "
                        "class_output)", where("attach_postprocess"))
    native = native_target(fmt)
    if v.target != native and not uses_onnx_backend(fmt):  # ONNX and torch reach TFLite through an NHWC port
        raise item.fail(f"a {fmt} source converts to {native} only", where("target"))
    if v.target == "tflite" and v.calibration_method not in (*TFLITE_CALIBRATION_METHODS, "auto"):
        raise item.fail(f"TFLite int8 records its ranges by {', '.join(TFLITE_CALIBRATION_METHODS)}; "
                        f"{v.calibration_method} is ONNX Runtime's", where("calibration_method"))
    if v.calibration_method == "auto" and (v.mode not in CALIBRATED_MODES or v.quantizer == "ai-edge-quantizer"):
        raise item.fail("auto tries each range method of a calibrated int8 / int16x8 variant (TFLite's converter, "
                        "ONNX Runtime)", where("calibration_method"))
    if v.max_drop is not None and (v.mode != "int8" or v.float_layers or v.quantizer == "ai-edge-quantizer"):
        raise item.fail("max_drop searches the layers an int8 variant keeps float (TFLite's converter, ONNX "
                        "Runtime); give it or float_layers, not both", where("max_drop"))
    _check_backend_options(item, v, fmt)


def _check_backend_options(item: Reader, v: Variant, fmt: str) -> None:
    if v.target == "tflite" and uses_onnx_backend(fmt) and v.mode in CALIBRATED_MODES:
        return  # the Keras port converts like any TFLite model: full-integer I/O allowed
    if v.float_layers and (v.mode not in CALIBRATED_MODES or v.quantizer == "ai-edge-quantizer"):
        raise item.fail("float_layers keeps layers of a calibrated int8 / int16x8 variant float (TFLite's "
                        "converter, ONNX Runtime)", item.child_where("float_layers"))
    if fmt != "tflite" and item.has("quantizer"):
        raise item.fail("quantizer chooses how a .tflite source is quantized; other sources convert with "
                        "their backend's", item.child_where("quantizer"))
    if fmt == "tflite" and v.quantizer == "converter" and v.mode in ("dynamic", "int16x8"):
        raise item.fail(f"a .tflite source is quantized to {v.mode} by ai-edge-quantizer (the converter's "
                        "path from recorded ranges is int8)", item.child_where("quantizer"))
    if fmt == "tflite" and v.calibration and v.quantizer == "ai-edge-quantizer":
        wanted = {"int8": "int8", "int16x8": "int16"}.get(v.mode, v.io_dtype)
        if v.io_dtype != wanted:
            raise item.fail(f"a float .tflite quantized to {v.mode} by ai-edge-quantizer has {wanted} inputs and "
                            f"outputs; set io_dtype: {wanted}", item.child_where("io_dtype"))
        if v.calibration_method != "minmax":
            raise item.fail("ai-edge-quantizer records min/max ranges (minmax)", item.child_where("calibration_method"))
    if not uses_onnx_backend(fmt):
        for key in ("per_channel", "reduce_range", "separate_output_scales"):
            if item.has(key):
                raise item.fail(f"{key} applies to onnx and torch sources (TFLite int8 is per-channel)",
                                item.child_where(key))
    elif v.mode in CALIBRATED_MODES and v.io_dtype != "float32":
        raise item.fail(f"ONNX {v.mode} is QDQ: inputs and outputs stay float32; set io_dtype: float32",
                        item.child_where("io_dtype"))
    elif v.mode == "uint8-qat":
        raise item.fail("uint8-qat applies to TensorFlow sources", item.child_where("mode"))


def check_converted_source(r: Reader, postprocess: Postprocess | None) -> None:
    """A .tflite source is converted already: strip may only cut it at tensors it computes (the backend checks
    them by name), and no anchors are evaluated in it."""
    if postprocess is not None and postprocess.anchors_tensor:
        raise r.fail("format tflite: there is no graph to evaluate anchors in; declare them (anchors_file, "
                     "anchor_generator)", "postprocess.anchors_tensor")


def check_attached_outputs(r: Reader, postprocess: Postprocess | None, strip) -> None:
    """The attached op's four outputs replace the model's: a cut that keeps more (a segment head's mask
    coefficients, a pose head's keypoints) would lose them without a word."""
    if postprocess is None or not postprocess.attach or strip is None:
        return
    read = {postprocess.box_output, postprocess.class_output, postprocess.anchors_tensor}
    if lost := [name for name in strip.outputs if name not in read]:
        raise r.fail(f"the attached TFLite_Detection_PostProcess's outputs replace the model's, and strip.outputs "
                     f"also keeps {', '.join(lost)}: set attach: false to keep them", "postprocess.attach")


def check_split_head(r: Reader, postprocess: Postprocess | None, fmt: str) -> None:
    """A YOLOv5 head's levels are split in the ONNX graph at freeze."""
    if postprocess is not None and postprocess.levels and not uses_onnx_backend(fmt):
        raise r.fail(f"format {fmt}: levels split a head's Convs in an ONNX graph (ONNX and torch sources); "
                     "decode the one output instead (postprocess.output)", "postprocess.levels")


def check_npu_targets(r: Reader, vela: tuple[VelaTarget, ...], variants: list[Variant], fmt: str) -> None:
    if vela and not any(v.for_npu for v in variants):
        raise r.fail("the NPU compiles TFLite int8 variants, and this recipe has none"
                     + (" (ONNX variants are not compiled for it; add one with target: tflite)"
                        if uses_onnx_backend(fmt) else ""), "targets.vela")


def check_torch_section(r: Reader, fmt: str) -> None:
    if fmt == "torch" and not r.has("torch"):
        raise r.fail("a torch source (a state dict) needs a 'torch' section: the module it is for", "torch")
    if fmt not in TORCH_FORMATS and r.has("torch"):
        raise r.fail(f"only formats {', '.join(TORCH_FORMATS)} take a 'torch' section", "torch")
    if fmt != "torch" and r.has("torch") and set(r.data["torch"] or {}) - {"opset"}:
        raise r.fail(f"a {fmt} archive holds its module; its torch section takes opset only", "torch")


def check_verify_images(r: Reader, images: str, variants: list[Variant]) -> None:
    if images in {v.calibration for v in variants}:
        raise r.fail(f"{short(images)} is also a calibration set; verify on images never calibrated on",
                     "verify.images")


def check_search_needs_verify(r: Reader, variants: list[Variant]) -> None:
    for i, v in enumerate(variants):
        if v.max_drop is not None:
            raise r.fail("max_drop's choice is judged on the verify images (and made on as many of the calibration "
                         "set), and the recipe declares none: add verify", f"variants[{i}].max_drop")
        if v.calibration_method == "auto":
            raise r.fail("auto's choice of ranges is judged on the verify images (and made on as many of the "
                         "calibration set), and the recipe declares none: add verify",
                         f"variants[{i}].calibration_method")


def check_search_has_measure(r: Reader, task: str, variants: list[Variant]) -> None:
    """The searches keep what a task's paired measure keeps (a share of top-1 answers or detections, a mask IoU);
    a task `other` has none (its outputs are judged by their SQNR alone)."""
    if task in SEARCHED_TASKS:
        return
    for i, v in enumerate(variants):
        if v.max_drop is not None:
            raise r.fail(f"max_drop keeps a share of the float model's answers; task {task} has none to keep",
                         f"variants[{i}].max_drop")
        if v.calibration_method == "auto":
            raise r.fail(f"auto keeps the ranges the float model's answers agree with best; task {task} has none: "
                         f"choose one of {', '.join(TFLITE_CALIBRATION_METHODS)}", f"variants[{i}].calibration_method")


def check_labels_task(r: Reader, task: str) -> None:
    if task == "detection":
        raise r.fail("detection recipes name their labels in postprocess.labels", "labels")
    if task != "classification":
        raise r.fail(f"task {task} has no class labels; labels are for classifiers", "labels")


def check_dense_task(r: Reader, task: str) -> None:
    if task != "dense":
        raise r.fail(f"only task dense reads its outputs as maps; this is task {task}", "dense")
