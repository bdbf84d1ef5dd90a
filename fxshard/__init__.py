"""fxshard: an automatic model-parallel compiler for PyTorch."""

from fxshard.capture import CapturedGraph, capture
from fxshard.errors import CaptureError, FxshardError

__all__ = ["CaptureError", "CapturedGraph", "FxshardError", "capture"]
__version__ = "0.1.0"
