"""OpenOOD-compatible ``ResNet18_32x32`` (written from the architecture facts, not copied).

Layout (what makes OpenOOD checkpoints load with ``strict=True``):

- stem: ``conv1`` 3x3/1 (3 -> 64, no bias), ``bn1``; no max-pool;
- ``layer1..layer4``: ``nn.Sequential`` of 2 basic blocks each, widths 64/128/256/512, first-block strides
  1/2/2/2; a block holds ``conv1`` (3x3, stride s), ``bn1``, ``conv2`` (3x3), ``bn2`` (no conv biases) and
  ``shortcut`` (empty ``nn.Sequential``, or ``[Conv2d 1x1/s, BatchNorm2d]`` when the shape changes);
- ``avgpool`` (global average), ``fc`` (512 -> num_classes).

Calling conventions (OpenOOD's network interface): ``net(x)`` -> logits; ``return_feature=True`` ->
(logits, pooled 512-d feature); ``return_feature_list=True`` -> (logits, [stem, layer1, layer2, layer3,
pooled map]); ``forward_threshold(x, c)`` (ReAct clip of the pooled feature); ``intermediate_forward(x, i)``
(output of layer i, 1..4); ``get_fc()`` -> numpy (W, b); ``get_fc_layer()``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3-stem ResNet of basic blocks with OpenOOD's calling conventions (any widths / depths / strides)."""

    def __init__(self, widths: Sequence[int], num_blocks: Sequence[int], strides: Sequence[int],
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if not len(widths) == len(num_blocks) == len(strides) == 4:
            raise ValueError("CifarResNet has 4 stages: widths, num_blocks and strides need 4 entries each")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (w, n, s) in enumerate(zip(widths, num_blocks, strides)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, s if j == 0 else 1))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_size = widths[-1]

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [F.relu(self.bn1(self.conv1(x)))]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            feats.append(layer(feats[-1]))
        return feats

    def forward(self, x: torch.Tensor, return_feature: bool = False, return_feature_list: bool = False):
        f1, f2, f3, f4, f5 = self._stages(x)
        pooled = self.avgpool(f5)
        feature = pooled.flatten(1)
        logits = self.fc(feature)
        if return_feature:
            return logits, feature
        if return_feature_list:
            return logits, [f1, f2, f3, f4, pooled]
        return logits

    def forward_threshold(self, x: torch.Tensor, threshold: float) -> torch.Tensor:
        """ReAct: logits from the pooled feature clipped at ``threshold``."""
        feature = self.avgpool(self._stages(x)[-1]).clip(max=threshold).flatten(1)
        return self.fc(feature)

    def intermediate_forward(self, x: torch.Tensor, layer_index: int) -> torch.Tensor:
        if layer_index not in (1, 2, 3, 4):
            raise ValueError(f"layer_index must be 1..4, got {layer_index}")
        out = F.relu(self.bn1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[:layer_index]:
            out = layer(out)
        return out

    def get_fc(self):
        return self.fc.weight.detach().cpu().numpy(), self.fc.bias.detach().cpu().numpy()

    def get_fc_layer(self) -> nn.Linear:
        return self.fc


class ResNet18_32x32(CifarResNet):
    """OpenOOD's CIFAR ResNet18 (11.17 M parameters at 10 classes); same constructor signature."""

    def __init__(self, block: type = BasicBlock, num_blocks: Sequence[int] | None = None, num_classes: int = 10) -> None:
        if block is not BasicBlock:
            raise ValueError("ResNet18_32x32 is built from BasicBlock only")
        super().__init__((64, 128, 256, 512), num_blocks or (2, 2, 2, 2), (1, 2, 2, 2), num_classes)
