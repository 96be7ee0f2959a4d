"""Networks this package defines: the LFDN feature denoiser, OpenOOD's ResNet18_32x32 (key-identical, so
OpenOOD checkpoints load strictly) and a small classifier with the same interface for demos and tests."""
from .lfdn import LFDNet, lfdn_schedule
from .resnet18_32x32 import ResNet18_32x32
from .small_resnet import SmallResNet

__all__ = ["LFDNet", "lfdn_schedule", "ResNet18_32x32", "SmallResNet"]
