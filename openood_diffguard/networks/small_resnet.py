"""A small classifier with OpenOOD's network interface (ResNet18_32x32's calling conventions), for the
demo and tests: ``net(x)`` -> logits, ``return_feature=True`` -> (logits, pooled feature),
``return_feature_list=True`` -> (logits, [stem, layer1..layer3, pooled]); ``get_fc()`` -> numpy (W, b);
``layer4`` exists so Grad-CAM's default target layer (``net.layer4[-1]``) works unchanged."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 64)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        strides = (1, 2, 2, 1)
        chans = (widths[0],) + tuple(widths)
        for i in range(4):
            setattr(self, f"layer{i + 1}", nn.Sequential(_Block(chans[i], chans[i + 1], strides[i])))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self.feature_size = widths[-1]

    def forward(self, x, return_feature: bool = False, return_feature_list: bool = False):
        f1 = F.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(f1)
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        f5 = self.layer4(f4)
        pooled = self.avgpool(f5)
        feat = pooled.flatten(1)
        logits = self.fc(feat)
        if return_feature:
            return logits, feat
        if return_feature_list:
            return logits, [f1, f2, f3, f4, pooled]
        return logits

    def get_fc(self):
        return self.fc.weight.detach().cpu().numpy(), self.fc.bias.detach().cpu().numpy()

    def get_fc_layer(self) -> nn.Linear:
        return self.fc
