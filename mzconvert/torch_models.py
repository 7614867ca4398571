"""Small standalone MobileNet modules for `torch` recipes (optional extra: pip install mzconvert[torch]).

MobileNetV2 follows torchvision's layout exactly, so torchvision's published state dicts load with
strict=True; MobileNetV1 takes a width multiplier and a ReLU/ReLU6 choice.
"""

from __future__ import annotations

from torch import nn


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


MODULES = {"mobilenet_v2": MobileNetV2, "mobilenet_v1": MobileNetV1}


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
