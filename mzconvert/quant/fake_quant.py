"""Rounding to an integer grid as quantization-aware training does it in torch: the value rounded, its gradient
passed straight through (quant/tuning.py's programs)."""

from __future__ import annotations

import numpy as np

INTEGER_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
                  np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535)}


def ste_round(x):
    """x rounded, its gradient passed straight through (as quantization-aware training rounds)."""
    return (x.round() - x).detach() + x


def fake_quantize(x, scale, zero, dtype):
    """x rounded to the grid of integers of `dtype` at `scale` and `zero` (point), as real values."""
    import torch

    low, high = INTEGER_RANGES[np.dtype(dtype)]
    return (torch.clamp(ste_round(x / scale) + zero, low, high) - zero) * scale


class TrainedIntegers:
    """A stored integer tensor (int8 weights with their scale and zero point, or an int32 bias) as a trainable real
    value in units of `unit` (a weight's step, so that one learning rate suits every layer)."""

    def __init__(self, stored: np.ndarray, scale, zero, unit):
        import torch

        self.dtype, self.shape = stored.dtype, stored.shape
        self.scale, self.zero, self.unit = scale, zero, unit  # torch tensors broadcasting to the stored shape
        self.value = torch.nn.Parameter((torch.from_numpy(stored.astype(np.float32)).reshape(self.shape) - zero)
                                        * scale / unit)

    def real(self):
        """The value the model computes with: a weight on its integer grid; a bias as it is (its steps are far
        finer than any change tuning makes)."""
        value = self.value * self.unit
        return value if self.dtype not in INTEGER_RANGES else fake_quantize(value, self.scale, self.zero, self.dtype)

    def integers(self) -> np.ndarray:
        import torch

        limits = np.iinfo(self.dtype)
        with torch.no_grad():
            found = torch.round(self.value.double() * self.unit / self.scale) + self.zero
            return np.clip(found.numpy(), limits.min, limits.max).astype(self.dtype).reshape(self.shape)
