"""Train a classifier on OpenOOD-style batches (used by the demo; OpenOOD users bring their own)."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Batched random translation by up to ``max_shift`` pixels (reflection padding), one draw per image."""
    if max_shift <= 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="reflect")
    dx, dy = (torch.randint(0, 2 * max_shift + 1, (B,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(H)[None]).to(x.device)  # [B, H]
    cols = (dx[:, None] + torch.arange(W)[None]).to(x.device)  # [B, W]
    idx_r = rows[:, None, :, None].expand(B, x.shape[1], H, padded.shape[-1])
    out = padded.gather(2, idx_r)
    return out.gather(3, cols[:, None, None, :].expand(B, x.shape[1], H, W))


def train_classifier(net: torch.nn.Module, loader: Iterable, epochs: int = 30, lr: float = 3e-3, weight_decay: float = 5e-4,
                     max_shift: int = 1, seed: int = 0, device: str | torch.device = "cpu", progress: bool = True) -> list[float]:
    """Adam + cosine schedule, cross-entropy, random shifts. Returns the mean loss per epoch."""
    device = torch.device(device)
    net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    history = []
    for _ in tqdm(range(epochs), desc="classifier", disable=not progress):
        total, n = 0.0, 0
        for batch in loader:
            x, y = batch["data"].to(device), batch["label"].to(device)
            loss = F.cross_entropy(net(_random_shift(x, max_shift, gen)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        sched.step()
        history.append(total / max(n, 1))
    net.eval()
    return history


@torch.no_grad()
def accuracy(net: torch.nn.Module, loader: Iterable) -> float:
    device = next(net.parameters()).device
    correct = total = 0
    for batch in loader:
        pred = net(batch["data"].to(device)).argmax(1).cpu()
        correct += int((pred == batch["label"]).sum())
        total += len(pred)
    return correct / max(total, 1)
