"""mzconvert: declarative recipes that turn published mobile-vision checkpoints into edge artifacts."""

__version__ = "0.4.0"
