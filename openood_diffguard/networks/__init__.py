"""Networks this package defines: the LFDN feature denoiser and a small classifier with OpenOOD's
network interface for demos and tests (OpenOOD brings its own classifiers)."""
from .lfdn import LFDNet, lfdn_schedule
from .small_resnet import SmallResNet

__all__ = ["LFDNet", "lfdn_schedule", "SmallResNet"]
