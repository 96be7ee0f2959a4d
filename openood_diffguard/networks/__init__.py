"""Networks this package defines (OpenOOD brings its own classifiers)."""
from .small_resnet import SmallResNet

__all__ = ["SmallResNet"]
