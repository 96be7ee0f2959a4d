"""DiffGuard's random cutouts for the classifier gradient, batched and with a reproducible geometry.

Official code (``MakeCutouts``, image 256, classifier 224): for each of n = 8 cutouts draw
side = int(U * (256 - 224) + 224), x offset, y offset (uniform integers) from a CPU generator seeded with
100 and reset for every sample, crop, nearest-resize to 224; views are stacked cutout-major ([n*B]).
Sample b's k-th guided step therefore always uses the k-th block of n draws. Here the draws are made once
(same calls, same order) into a table ``geometry[step, cutout]``, and each sample's crops are gathered by
index on the device, so a batch whose samples are at different steps still runs in one pass.
The minimum side is a fraction of the image (224/256 by default) so any resolution works.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


class Cutouts:
    def __init__(self, n: int = 8, min_fraction: float = 224 / 256, out_size: Optional[int] = None,
                 seed: int = 100, cut_pow: float = 1.0) -> None:
        if n < 1 or not 0 < min_fraction <= 1:
            raise ValueError(f"need n >= 1 and 0 < min_fraction <= 1, got n={n}, min_fraction={min_fraction}")
        self.n, self.min_fraction, self.out_size, self.seed, self.cut_pow = n, min_fraction, out_size, seed, cut_pow
        self._table: dict[tuple[int, int], torch.Tensor] = {}

    def geometry(self, steps: int, height: int, width: int) -> torch.Tensor:
        """LongTensor [steps, n, 3] of (side, x offset, y offset), drawn exactly as the official code."""
        key = (height, width)
        table = self._table.get(key)
        if table is None or table.shape[0] < steps:
            g = torch.Generator().manual_seed(self.seed)
            max_size = min(height, width)
            min_size = min(max_size, math.floor(self.min_fraction * max_size))
            rows = []
            for _ in range(max(steps, 1)):
                for _ in range(self.n):
                    size = int(torch.rand([], generator=g) ** self.cut_pow * (max_size - min_size) + min_size)
                    ox = int(torch.randint(0, width - size + 1, (), generator=g))
                    oy = int(torch.randint(0, height - size + 1, (), generator=g))
                    rows.append((size, ox, oy))
            table = torch.tensor(rows, dtype=torch.long).view(-1, self.n, 3)
            self._table[key] = table
        return table[:steps]

    @staticmethod
    def _nearest(size: torch.Tensor, out: int, device) -> torch.Tensor:
        """Source indices of F.interpolate(mode='nearest'): floor(dst * (in / out)) in float32."""
        size = size.to(device)
        ratio = size.float() / out
        d = torch.arange(out, device=device, dtype=torch.float32)
        return torch.minimum(torch.floor(d * ratio[..., None]).long(), size[..., None] - 1)

    def __call__(self, x: torch.Tensor, step: int | torch.Tensor = 0) -> torch.Tensor:
        """[n*B, C, S, S] views of x [B, C, H, W]; ``step`` (int or per-sample [B]) picks the geometry row."""
        B, C, H, W = x.shape
        step = torch.as_tensor(step, dtype=torch.long).expand(B).cpu()
        if int(step.min()) < 0:
            raise ValueError("cutout step must be >= 0")
        geo = self.geometry(int(step.max()) + 1, H, W)[step].to(x.device)  # [B, n, 3]
        size, ox, oy = geo.unbind(-1)
        M = min(H, W, math.floor(self.min_fraction * min(H, W)))  # the official cut_size
        S = self.out_size or M
        src = self._nearest(size, M, x.device)  # crop -> M (official), then M -> S if they differ
        if S != M:
            src = src[..., self._nearest(torch.tensor(M), S, x.device)]
        rows, cols = oy[..., None] + src, ox[..., None] + src
        b = torch.arange(B, device=x.device).view(B, 1, 1, 1)
        views = x[b, :, rows[..., :, None], cols[..., None, :]]  # [B, n, S, S, C]
        return views.permute(1, 0, 4, 2, 3).reshape(self.n * B, C, S, S)
