"""Quantization itself: activation ranges, fitted weight rounding, output scales, the TFLite converter."""
