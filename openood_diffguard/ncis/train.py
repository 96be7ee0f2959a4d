"""Stage 5: energy-regularised classifier training (NCIS Eq. 12-13, released training script).

L = CE(f(x_in), y) + beta * CE(phi(s), b), s = logsumexp(logits) (= -energy) of the ID and the outlier
batch, b = 1 for ID and 0 for outliers; phi: Linear(1, 2) (released CIFAR-100 script) or a small MLP
(ImageNet-100 script: 1 -> 512 -> 2), trained jointly. The ID and outlier batches go through the network
in one forward pass (BatchNorm sees both). At test time the score is the energy: OpenOOD's ``ebo``.
Outlier images are randomly NEAREST- or BILINEAR-resized to the ID size (paper Table 3: this matters).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..training.classifier import _random_shift


class EnergyHead(nn.Module):
    """phi: the scalar logsumexp(logits) -> 2 logits (index 1 = ID).

    ``init="oriented"`` (default) starts phi with a positive ID slope (higher logsumexp = more ID, what the
    energy score at test time assumes) by swapping its two output rows when PyTorch's random initialisation
    came out inverted; ``"random"`` keeps that initialisation as the released code does. The regulariser
    separates either way, and with an inverted phi the network learns to give the *outliers* the higher
    logsumexp, which the energy score then ranks as ID (measured on digits: benchmarks/results/ncis_digits.md)."""

    INITS = ("oriented", "random")

    def __init__(self, hidden: int | None = None, init: str = "oriented") -> None:
        super().__init__()
        if hidden is not None and hidden < 1:
            raise ValueError(f"energy head hidden width must be >= 1 or None, got {hidden}")
        if init not in self.INITS:
            raise ValueError(f"energy head init must be one of {self.INITS}, got {init!r}")
        self.net = nn.Linear(1, 2) if not hidden else nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        if init == "oriented" and self.id_slope() < 0:
            last = self.net if isinstance(self.net, nn.Linear) else self.net[-1]
            with torch.no_grad():
                last.weight.copy_(last.weight.flip(0))
                last.bias.copy_(last.bias.flip(0))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s.reshape(-1, 1))

    def id_slope(self, s: torch.Tensor | None = None) -> float:
        """d(logit_ID - logit_OOD)/ds (at ``s`` for the MLP; mean over it). Positive: higher logsumexp = more
        ID, the orientation the energy score at test time assumes; the regulariser itself does not fix it."""
        if isinstance(self.net, nn.Linear):
            return float(self.net.weight[1, 0].detach() - self.net.weight[0, 0].detach())
        s = torch.linspace(-5, 20, 64) if s is None else s.detach().reshape(-1)
        s = s.clone().requires_grad_(True)
        with torch.enable_grad():
            out = self(s)
            (g,) = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), s)
        return float(g.mean())


def energy_regularised_loss(logits_in: torch.Tensor, labels: torch.Tensor, logits_out: torch.Tensor,
                            head: nn.Module, beta: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, {"ce", "energy_reg"}) for one step."""
    ce = F.cross_entropy(logits_in, labels)
    s = torch.logsumexp(torch.cat([logits_in, logits_out]), dim=1)
    b = torch.cat([torch.ones(len(logits_in)), torch.zeros(len(logits_out))]).long().to(s.device)
    reg = F.cross_entropy(head(s), b)
    return ce + beta * reg, {"ce": float(ce.detach()), "energy_reg": float(reg.detach())}


def random_interpolation_resize(x: torch.Tensor, size: int, generator: torch.Generator,
                                modes: tuple[str, ...] = ("nearest", "bilinear")) -> torch.Tensor:
    """Resize a batch to ``size`` with a per-image random choice of interpolation (two batched calls)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    pick = torch.randint(len(modes), (len(x),), generator=generator).to(x.device)
    out = torch.empty(*x.shape[:2], size, size, dtype=x.dtype, device=x.device)
    for m, mode in enumerate(modes):
        sel = torch.nonzero(pick == m).flatten()
        if sel.numel():
            kw = {} if mode == "nearest" else {"align_corners": False, "antialias": True}
            out[sel] = F.interpolate(x[sel], size=(size, size), mode=mode, **kw)
    return out


def ood_transform(kind: str, size: int, mean, std, crop_padding: int = 4):
    """torchvision transform of the released script for PIL outlier images: random NEAREST / BILINEAR
    resize to ``size`` (``kind`` both / nearest / bilinear), crop with padding, flip, normalise."""
    import torchvision.transforms as T
    from torchvision.transforms import InterpolationMode as I

    resizes = {"nearest": [T.Resize(size, interpolation=I.NEAREST)], "bilinear": [T.Resize(size, interpolation=I.BILINEAR)]}
    resizes["both"] = resizes["nearest"] + resizes["bilinear"]
    if kind not in resizes:
        raise ValueError(f"ood_transform must be one of {sorted(resizes)}, got {kind!r}")
    return T.Compose([T.Lambda(lambda im: im.convert("RGB") if len(mean) == 3 else im.convert("L")),
                      T.RandomChoice(resizes[kind]), T.CenterCrop(size), T.RandomCrop(size, padding=crop_padding),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])


def train_with_outliers(net: nn.Module, loader: Iterable, outliers: torch.Tensor | None, epochs: int = 30,
                        lr: float = 3e-3, weight_decay: float = 5e-4, beta: float = 1.0, head_hidden: int | None = None,
                        head_init: str = "oriented", max_shift: int = 1, seed: int = 0,
                        device: str | torch.device = "cpu", progress: bool = True) -> dict:
    """The package's CPU classifier recipe (AdamW + cosine, random shifts), plus NCIS's regulariser when
    ``outliers`` (normalised images, [M, C, H', W']) are given: each ID batch is paired with an equally
    sized outlier batch (reshuffled when exhausted, randomly resized to the ID size). ``outliers=None`` is
    plain cross-entropy training with the same recipe and random stream. Returns the per-epoch losses."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    head = EnergyHead(head_hidden, head_init).to(device)
    net.to(device).train()
    params = list(net.parameters()) + (list(head.parameters()) if outliers is not None else [])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    ood_gen = torch.Generator().manual_seed(seed + 1)  # separate stream: the ID augmentation matches plain training
    order, pos = None, 0
    history = []
    for _ in tqdm(range(epochs), desc="NCIS classifier" if outliers is not None else "classifier", disable=not progress):
        sums: dict[str, float] = {}
        n_batches = 0
        for batch in loader:
            x, y = batch["data"].to(device), batch["label"].to(device)
            x = _random_shift(x, max_shift, gen)
            if outliers is None:
                loss = F.cross_entropy(net(x), y)
                parts = {"ce": float(loss.detach())}
            else:
                if order is None or pos + len(x) > len(order):
                    order, pos = torch.randperm(len(outliers), generator=ood_gen), 0
                xo = outliers[order[pos:pos + len(x)]].to(device)
                pos += len(x)
                xo = _random_shift(random_interpolation_resize(xo, x.shape[-1], ood_gen), max_shift, ood_gen)
                logits = net(torch.cat([x, xo]))
                loss, parts = energy_regularised_loss(logits[:len(x)], y, logits[len(x):], head, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n_batches += 1
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        sched.step()
        history.append({k: v / max(n_batches, 1) for k, v in sums.items()})
        if outliers is not None:
            history[-1]["head_id_slope"] = head.id_slope()
    net.eval()
    return {"history": history, "head": head}


@torch.no_grad()
def energy_scores(net: nn.Module, loader: Iterable) -> tuple:
    """(pred, conf = logsumexp(logits) (OpenOOD ebo, T = 1; higher = ID), label) as numpy arrays."""
    import numpy as np

    device = next(net.parameters()).device
    net.eval()
    preds, confs, labels = [], [], []
    for batch in loader:
        logits = net(batch["data"].to(device))
        preds.append(logits.argmax(1).cpu())
        confs.append(torch.logsumexp(logits, 1).cpu())
        labels.append(torch.as_tensor(batch["label"]))
    return tuple(torch.cat(v).numpy() for v in (preds, confs, labels)) if preds else (np.array([]),) * 3
