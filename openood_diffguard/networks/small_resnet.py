"""A small classifier with OpenOOD's network interface (ResNet18_32x32's calling conventions), for the
demo and tests: ``net(x)`` -> logits, ``return_feature=True`` -> (logits, pooled feature),
``return_feature_list=True`` -> (logits, [stem, layer1..layer3, pooled]); ``get_fc()`` -> numpy (W, b);
``layer4`` exists so Grad-CAM's default target layer (``net.layer4[-1]``) works unchanged."""
from __future__ import annotations

from .resnet18_32x32 import CifarResNet


class SmallResNet(CifarResNet):
    """One basic block per stage, strides 1/2/2/1."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__(widths, (1, 1, 1, 1), (1, 2, 2, 1), num_classes, in_channels)
