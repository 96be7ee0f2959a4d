"""scikit-learn's ``digits`` (1,797 real 8x8 handwritten digits, shipped with scikit-learn) as an
open-set OOD benchmark in OpenOOD's terms: known classes 0-5 are ID (train / val / test), unknown
classes 6-9 are OOD (label -1; a small ``val`` split for APS, the rest ``test``). Images are upsampled to
``size`` and normalised with OpenOOD's default mean/std 0.5, as for any dataset outside its table."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

MEAN, STD = (0.5,), (0.5,)


class _Split(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str]) -> None:
        self.images, self.labels, self.names = images, labels, names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"data": self.images[i], "label": int(self.labels[i]), "index": i, "image_name": self.names[i]}


@dataclass
class DigitsOpenSet:
    known: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    size: int = 16
    seed: int = 0
    id_fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)  # train / val / test of ID
    ood_val_fraction: float = 0.2
    splits: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N,1,8,8] in [0,1]
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False).clamp(0, 1)
        x = (x - MEAN[0]) / STD[0]
        y = torch.tensor(d.target)
        rng = np.random.default_rng(self.seed)
        known = torch.tensor(self.known)
        is_id = torch.isin(y, known)
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[known] = torch.arange(len(known))
        id_idx, ood_idx = rng.permutation(np.flatnonzero(is_id)), rng.permutation(np.flatnonzero(~is_id))
        n_tr, n_va = (int(round(f * len(id_idx))) for f in self.id_fractions[:2])
        n_ov = int(round(self.ood_val_fraction * len(ood_idx)))
        parts = {
            ("id", "train"): id_idx[:n_tr], ("id", "val"): id_idx[n_tr:n_tr + n_va], ("id", "test"): id_idx[n_tr + n_va:],
            ("ood", "val"): ood_idx[:n_ov], ("ood", "test"): ood_idx[n_ov:],
        }
        self.splits = {}
        for (kind, split), idx in parts.items():
            idx = torch.as_tensor(np.sort(idx))
            labels = remap[y[idx]] if kind == "id" else torch.full((len(idx),), -1, dtype=torch.long)
            names = [f"digits/{int(y[i])}/{int(i):04d}.png" for i in idx]
            self.splits[(kind, split)] = _Split(x[idx], labels, names)

    @property
    def num_classes(self) -> int:
        return len(self.known)

    def dataset(self, kind: str, split: str) -> _Split:
        return self.splits[(kind, split)]

    def loader(self, kind: str, split: str, batch_size: int = 128, shuffle: bool = False, limit: int | None = None) -> DataLoader:
        ds = self.dataset(kind, split)
        if limit is not None and limit < len(ds):
            ds = torch.utils.data.Subset(ds, range(limit))
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(self.seed) if shuffle else None)

    def loader_dicts(self, batch_size: int = 128, limit: int | None = None) -> tuple[dict, dict]:
        """OpenOOD-style ``id_loader_dict`` / ``ood_loader_dict`` (Evaluator key names)."""
        id_loaders = {s: self.loader("id", s, batch_size, limit=limit if s == "test" else None) for s in ("train", "val", "test")}
        ood_loaders = {"val": self.loader("ood", "val", batch_size), "far": {"digits6789": self.loader("ood", "test", batch_size, limit=limit)}}
        return id_loaders, ood_loaders
