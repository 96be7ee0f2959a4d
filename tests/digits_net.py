"""scikit-learn digits as a tiny open-set benchmark (classes 0-5 known, 6-9 unknown) and a small conv net
with OpenOOD's classifier interface (``return_feature`` / ``return_feature_list``)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn


class TinyConvNet(nn.Module):
    """4 stages on 8x8 images; ``net(x, return_feature_list=True)`` -> (logits, [f1..f4 maps, f5 pooled])."""

    def __init__(self, num_classes: int = 6, in_ch: int = 1) -> None:
        super().__init__()
        def stage(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU())
        self.layer1, self.layer2 = stage(in_ch, 16, 1), stage(16, 32, 2)
        self.layer3, self.layer4 = stage(32, 48, 2), stage(48, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x, return_feature=False, return_feature_list=False):
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        f5 = f4.mean((2, 3), keepdim=True)
        logits = self.fc(f5.flatten(1))
        if return_feature:
            return logits, f5.flatten(1)
        if return_feature_list:
            return logits, [f1, f2, f3, f4, f5]
        return logits


@functools.lru_cache(maxsize=1)
def digits_split(seed: int = 0):
    """Normalised (mean = std = 0.5) digits: (x_train, y_train) of classes 0-5, x_test_id, x_test_ood."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    known = y < 6
    xk, yk = x[known], y[known]
    n_train = int(0.7 * len(yk))
    return xk[:n_train], yk[:n_train], xk[n_train:], x[~known][:300]


@functools.lru_cache(maxsize=1)
def trained_digits_net(seed: int = 0) -> TinyConvNet:
    x, y, _, _ = digits_split(seed)
    torch.manual_seed(seed)
    net = TinyConvNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(10):
        for i in range(0, len(y), 128):
            loss = nn.functional.cross_entropy(net(x[i:i + 128]), y[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module", autouse=True)
def single_thread(single_thread):
    """conftest's single_thread, autouse in every module that imports it from here."""
    yield
