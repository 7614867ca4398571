"""Small standalone MobileNet modules for `torch` recipes (optional extra: pip install mzconvert[torch]).

MobileNetV2 follows torchvision's layout exactly, so torchvision's published state dicts load with
strict=True; MobileNetV1 takes a width multiplier and a ReLU/ReLU6 choice.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import EXIT_BAD_INPUT, MzError, short_text


def _make_divisible(value: float, divisor: int = 8) -> int:
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_act(inp: int, out: int, kernel: int, stride: int, groups: int = 1, act=nn.ReLU6) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), act(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == out
        layers = [_conv_bn_act(inp, hidden, 1, 1)] if expand_ratio != 1 else []
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, out, 1, 1, 0, bias=False), nn.BatchNorm2d(out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))  # expansion t, channels c, repeats n, first stride s

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        channels = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        features = [_conv_bn_act(3, channels, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            out = _make_divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(_conv_bn_act(channels, last, 1, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


class MobileNetV1(nn.Module):
    SETTINGS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)) + ((512, 1),) * 5 + ((1024, 2), (1024, 1))

    def __init__(self, num_classes: int = 1000, width: float = 1.0, relu6: bool = True):
        super().__init__()
        act = nn.ReLU6 if relu6 else nn.ReLU
        channels = int(32 * width)
        layers = [_conv_bn_act(3, channels, 3, 2, act=act)]
        for c, s in self.SETTINGS:
            out = int(c * width)
            layers += [_conv_bn_act(channels, channels, 3, s, groups=channels, act=act),
                       _conv_bn_act(channels, out, 1, 1, act=act)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(x.flatten(1))


def _scale_filters(filters: int, multiplier: float, base: int = 8) -> int:
    return max(int(int(filters * multiplier / base + 0.5) * base), base)


class _Block(nn.Module):
    """MobileDet's searched blocks: a sequence of conv-BN(-ReLU6) layers, linear at the end, plus a residual."""

    def __init__(self, layers: list[nn.Module], residual: bool):
        super().__init__()
        self.layers = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


def _linear(inp: int, out: int) -> list[nn.Module]:
    return [nn.Conv2d(inp, out, 1, bias=False), nn.BatchNorm2d(out)]


def _ibn(inp, out, expansion=8, kernel=3, stride=1, residual=True):
    """Inverted bottleneck: 1x1 expand, depthwise kxk, 1x1 project."""
    hidden = inp * expansion
    return _Block([_conv_bn_act(inp, hidden, 1, 1), _conv_bn_act(hidden, hidden, kernel, stride, groups=hidden),
                   *_linear(hidden, out)], residual)


def _fused(inp, out, expansion=8, kernel=3, stride=1, residual=True):
    """Fused inverted bottleneck: one full kxk convolution expands, 1x1 projects."""
    hidden = inp * expansion
    return _Block([_conv_bn_act(inp, hidden, kernel, stride), *_linear(hidden, out)], residual)


def _tucker(inp, out, input_ratio, output_ratio, kernel=3, stride=1, residual=True):
    """Tucker convolution: 1x1 compress, kxk at low rank, 1x1 restore."""
    rank_in, rank_out = _scale_filters(inp, input_ratio), _scale_filters(out, output_ratio)
    return _Block([_conv_bn_act(inp, rank_in, 1, 1), _conv_bn_act(rank_in, rank_out, kernel, stride),
                   *_linear(rank_out, out)], residual)


def ssd_anchors(feature_sizes: list[int], min_scale=0.2, max_scale=0.95,
                aspect_ratios=(1.0, 2.0, 0.5, 3.0, 1 / 3)):
    """TF OD API multiple-grid anchors (ymin, xmin, ymax, xmax normalised), in prediction order:
    per feature map, per cell row-major, per anchor; the first map has 3 reduced boxes."""
    import numpy as np

    count = len(feature_sizes)
    scales = [min_scale + (max_scale - min_scale) * i / (count - 1) for i in range(count)] + [1.0]
    boxes = []
    for i, size in enumerate(feature_sizes):
        if i == 0:
            shapes = [(0.1, 1.0), (scales[0], 2.0), (scales[0], 0.5)]
        else:
            shapes = [(scales[i], r) for r in aspect_ratios] + [((scales[i] * scales[i + 1]) ** 0.5, 1.0)]
        for y in range(size):
            for x in range(size):
                cy, cx = (y + 0.5) / size, (x + 0.5) / size
                for scale, ratio in shapes:
                    h, w = scale / ratio ** 0.5, scale * ratio ** 0.5
                    boxes.append((cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2))
    return np.asarray(boxes, np.float32)


class MobileDetEdgeTPUSSDLite(nn.Module):
    """MobileDet-EdgeTPU backbone (Xiong et al. 2021, as in the TF OD API's ssd_mobiledet_feature_extractor)
    + SSDLite feature maps (C4, C5, then 512/256/256/128) and a depthwise-separable box predictor.

    forward -> (box encodings 1xNx4, class logits 1xNx(num_classes), anchors Nx4 constant).
    """

    def __init__(self, num_classes: int = 91, width: float = 1.0, image_size: int = 320):
        super().__init__()
        c = lambda f: _scale_filters(f, width)  # noqa: E731
        self.c4 = nn.Sequential(
            _conv_bn_act(3, c(32), 3, 2), _tucker(c(32), c(16), 0.25, 0.75, residual=False),
            _fused(c(16), c(16), 8, stride=2, residual=False), _fused(c(16), c(16), 4), _fused(c(16), c(16), 8),
            _fused(c(16), c(16), 4),
            _fused(c(16), c(40), 8, kernel=5, stride=2, residual=False), _fused(c(40), c(40), 4),
            _fused(c(40), c(40), 4), _fused(c(40), c(40), 4),
            _ibn(c(40), c(72), 8, stride=2, residual=False), _ibn(c(72), c(72), 8), _fused(c(72), c(72), 4),
            _fused(c(72), c(72), 4),
            _ibn(c(72), c(96), 8, kernel=5, residual=False), _ibn(c(96), c(96), 8, kernel=5), _ibn(c(96), c(96), 8),
            _ibn(c(96), c(96), 8))
        self.c5 = nn.Sequential(
            _ibn(c(96), c(120), 8, kernel=5, stride=2, residual=False), _ibn(c(120), c(120), 8),
            _ibn(c(120), c(120), 4, kernel=5), _ibn(c(120), c(120), 8),
            _ibn(c(120), c(384), 8, kernel=5, residual=False))
        extra, channels = [], c(384)
        for depth in (512, 256, 256, 128):  # 1x1 to depth/2, then a stride-2 separable conv to depth
            extra.append(nn.Sequential(_conv_bn_act(channels, depth // 2, 1, 1),
                                       _conv_bn_act(depth // 2, depth // 2, 3, 2, groups=depth // 2),
                                       _conv_bn_act(depth // 2, depth, 1, 1)))
            channels = depth
        self.extra = nn.ModuleList(extra)
        map_channels = [c(96), c(384), 512, 256, 256, 128]
        self.num_classes = num_classes
        self.box_heads, self.class_heads = nn.ModuleList(), nn.ModuleList()
        for i, ch in enumerate(map_channels):
            anchors = 3 if i == 0 else 6
            for heads, per_anchor in ((self.box_heads, 4), (self.class_heads, num_classes)):
                heads.append(nn.Sequential(_conv_bn_act(ch, ch, 3, 1, groups=ch),
                                           nn.Conv2d(ch, anchors * per_anchor, 1)))
        sizes = [image_size // 16]
        for _ in range(5):
            sizes.append((sizes[-1] + 1) // 2)
        self.register_buffer("anchors", torch.from_numpy(ssd_anchors(sizes)), persistent=False)

    def forward(self, x):
        c4 = self.c4(x)
        maps = [c4, self.c5(c4)]
        for layer in self.extra:
            maps.append(layer(maps[-1]))
        boxes, logits = [], []
        for feature, box_head, class_head in zip(maps, self.box_heads, self.class_heads):
            # NCHW -> NHWC before flattening: predictions in (row, column, anchor) order, like the anchors
            boxes.append(box_head(feature).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4))
            logits.append(class_head(feature).permute(0, 2, 3, 1).reshape(x.shape[0], -1, self.num_classes))
        # The tracer refuses outputs that do not depend on the input: tie the constant anchors to it
        # (strip cuts this branch off the deployed model).
        anchors = self.anchors * torch.ones_like(x[:1, :1, :1, :1]).reshape(1, 1)
        return torch.cat(boxes, 1), torch.cat(logits, 1), anchors


MODULES = {"mobilenet_v2": MobileNetV2, "mobilenet_v1": MobileNetV1,
           "mobiledet_edgetpu_ssdlite": MobileDetEdgeTPUSSDLite}


CLASSIFIER_WIDTHS = (1.4, 1.0, 0.75, 0.5, 0.35, 0.25)


def load_state(weights: Path) -> dict:
    """A state dict, loaded with weights_only: a pickle that would build other objects (run code) is refused,
    saying which, and what to bring instead."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a payload weights_only refuses, and corrupt files
        if builds := _pickled_globals(weights):
            ultralytics = any(name.startswith("ultralytics.") for name in builds)
            advice = (f"an Ultralytics checkpoint: export it with Ultralytics (yolo export model={weights.name} "
                      "format=onnx) and give mzconvert the .onnx" if ultralytics else
                      "save the module's state_dict() and name its class in the recipe's torch.module, or export "
                      "the module (ONNX, TorchScript, torch.export)")
            raise MzError(f"{weights}: not a PyTorch state dict, or one that would run code when loaded: its pickle "
                          f"builds {', '.join(builds[:3])}{' ...' if len(builds) > 3 else ''}, so it is not "
                          f"loaded; {advice}", EXIT_BAD_INPUT) from None
        raise MzError(f"{weights}: not a PyTorch state dict, or one that would run code when loaded "
                      f"(refused: {exc.__class__.__name__}: {short_text(exc)})", EXIT_BAD_INPUT) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MzError(f"{weights}: holds a {type(state).__name__}, not a state dict (parameter name -> tensor)",
                      EXIT_BAD_INPUT)
    return state


def _plain(name: str) -> bool:
    """Whether a state dict's pickle names this global: torch's tensors, storages and dtypes (not its nn modules),
    and the containers they come in."""
    top = name.split(".")[0]
    return top in ("collections", "builtins", "__builtin__") or (top == "torch" and not name.startswith("torch.nn."))


def _pickled_globals(weights: Path) -> list[str]:
    """The classes and functions (module.name) a torch.save file's pickle would import to load, other than a state
    dict's (_plain), in the order it names them (a saved model's own class first): read from its opcodes by
    pickletools, which parses and builds nothing; [] for a file that is not such a pickle."""
    import pickletools

    try:
        with zipfile.ZipFile(weights) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    except (zipfile.BadZipFile, StopIteration, OSError):
        data = weights.read_bytes()  # torch's format before 1.6: pickles one after another, the model's first
    found, memo, pushed = [], [], [None, None]  # pushed: what the last two ops (MEMOIZE aside) pushed, if a string
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "MEMOIZE":  # protocol 4 remembers what was just pushed by the next index
                memo.append(pushed[-1])
                continue
            names = arg.split(" ", 1) if op.name == "GLOBAL" else pushed if op.name == "STACK_GLOBAL" else []
            if len(names) == 2 and all(names) and not _plain(name := ".".join(names)):
                found.append(name)
            string = arg if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") else \
                memo[arg] if op.name in ("BINGET", "LONG_BINGET") and arg < len(memo) else None
            pushed = [pushed[-1], string]
    except ValueError:  # a truncated or foreign file: what was read before it is all there is
        pass
    return sorted(set(found), key=found.index)


def matching_classifier(state: dict) -> dict | None:
    """The torch section (module, num_classes, width) of the classifier whose parameters are exactly these."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    head = shapes.get("classifier.1.weight") or shapes.get("classifier.weight")
    if head is None or len(head) != 2:
        return None
    for name in ("mobilenet_v2", "mobilenet_v1"):
        for width in CLASSIFIER_WIDTHS:
            module = MODULES[name](num_classes=head[0], width=width)
            if {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes:
                return {"module": name, "num_classes": head[0], "width": width}
    return None


def to_keras(module: nn.Module, input_shape: tuple[int, ...]):
    """The same network as a tf-keras model (NHWC), weights copied exactly, for the TFLite converter.

    PyTorch pads 3x3 stride-2 convolutions symmetrically where Keras 'same' pads bottom/right only,
    so padding is explicit (ZeroPadding2D + 'valid'). Supports the modules of this file.
    """
    import tf_keras as keras

    def conv(x, layer: nn.Conv2d):
        weight = layer.weight.detach().numpy()
        pad = layer.padding[0]
        if pad:
            x = keras.layers.ZeroPadding2D(pad)(x)
        if layer.groups == 1:
            keras_layer = keras.layers.Conv2D(layer.out_channels, layer.kernel_size, layer.stride, "valid",
                                              use_bias=layer.bias is not None)
            kernel = weight.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif layer.groups == layer.in_channels == layer.out_channels:
            keras_layer = keras.layers.DepthwiseConv2D(layer.kernel_size, layer.stride, "valid",
                                                       use_bias=layer.bias is not None)
            kernel = weight.transpose(2, 3, 0, 1)  # C1HW -> HWC1
        else:
            raise ValueError(f"grouped convolution {layer} has no Keras equivalent here")
        y = keras_layer(x)
        keras_layer.set_weights([kernel] + ([layer.bias.detach().numpy()] if layer.bias is not None else []))
        return y

    def batch_norm(x, layer: nn.BatchNorm2d):
        keras_layer = keras.layers.BatchNormalization(epsilon=layer.eps)
        y = keras_layer(x)
        keras_layer.set_weights([t.detach().numpy() for t in
                                 (layer.weight, layer.bias, layer.running_mean, layer.running_var)])
        return y

    def apply(x, layer: nn.Module):
        if isinstance(layer, nn.Sequential):
            for child in layer:
                x = apply(x, child)
            return x
        if isinstance(layer, InvertedResidual):
            y = apply(x, layer.conv)
            return keras.layers.Add()([x, y]) if layer.use_residual else y
        if isinstance(layer, nn.Conv2d):
            return conv(x, layer)
        if isinstance(layer, nn.BatchNorm2d):
            return batch_norm(x, layer)
        if isinstance(layer, nn.ReLU6):
            return keras.layers.ReLU(6.0)(x)
        if isinstance(layer, nn.ReLU):
            return keras.layers.ReLU()(x)
        if isinstance(layer, nn.Dropout):
            return x  # inference
        if isinstance(layer, nn.Linear):
            dense = keras.layers.Dense(layer.out_features)
            y = dense(x)
            dense.set_weights([layer.weight.detach().numpy().T, layer.bias.detach().numpy()])
            return y
        raise ValueError(f"no Keras equivalent for {layer.__class__.__name__}")

    batch, channels, height, width = input_shape
    inputs = keras.Input(shape=(height, width, channels), batch_size=batch, name="input")
    x = apply(inputs, module.features)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = apply(x, module.classifier)
    return keras.Model(inputs, outputs)
