"""Class-conditional Gaussians (+ lambda I) in the cVPN output space and low-likelihood boundary sampling.

Per class y: mu_y, Sigma_y + lambda I over all D output coordinates (NCIS Eq. 8-10). Candidates are drawn
as v = mu + L z (L the Cholesky factor), so -log p(v) = |z|^2 / 2 + const within a class: keeping the
``keep`` candidates of largest |z| out of ``candidates`` is exactly the released code's top-k of the lowest
log-density. The samples are mapped back to the embedding space with the cVPN's exact inverse; without a
transform (identity) this is the plain Gaussian-in-embedding-space ablation (Dream-OOD style, no cVPN).
"""
from __future__ import annotations

from typing import Callable

import torch

Transform = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ClassGaussians:
    """Per-class full-covariance Gaussians with ridge ``reg`` (lambda), fitted in float64."""

    def __init__(self, reg: float = 1e-5) -> None:
        if not reg >= 0:
            raise ValueError(f"reg (lambda) must be >= 0, got {reg}")
        self.reg = float(reg)
        self.classes: list[int] = []
        self.means: torch.Tensor | None = None
        self.chol: torch.Tensor | None = None

    def fit(self, v: torch.Tensor, labels: torch.Tensor) -> "ClassGaussians":
        v = torch.as_tensor(v, dtype=torch.float64)
        y = torch.as_tensor(labels).long()
        if v.ndim != 2 or len(v) != len(y):
            raise ValueError(f"need vectors [N, D] and N labels, got {tuple(v.shape)} / {tuple(y.shape)}")
        self.classes = torch.unique(y).tolist()
        means, chols = [], []
        eye = torch.eye(v.shape[1], dtype=torch.float64)
        for c in self.classes:
            vc = v[y == c]
            if len(vc) < 2:
                raise ValueError(f"class {c} has {len(vc)} vector(s): need at least 2 for a covariance")
            cov = torch.cov(vc.T) + self.reg * eye
            chol, info = torch.linalg.cholesky_ex(cov)
            if int(info) != 0:
                raise ValueError(f"class {c}: covariance + {self.reg:g} I is not positive definite "
                                 f"(fewer samples than dimensions need reg > 0)")
            means.append(vc.mean(0))
            chols.append(chol)
        self.means, self.chol = torch.stack(means), torch.stack(chols)
        return self

    def log_prob(self, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log N(v; mu_y, Sigma_y + lambda I) per row."""
        if self.means is None:
            raise RuntimeError("fit() first")
        v = torch.as_tensor(v, dtype=torch.float64)
        k = torch.as_tensor([self.classes.index(int(c)) for c in torch.as_tensor(labels).tolist()])
        diff = (v - self.means[k]).unsqueeze(-1)
        z = torch.linalg.solve_triangular(self.chol[k], diff, upper=False).squeeze(-1)
        logdet = 2 * torch.log(torch.diagonal(self.chol[k], dim1=-2, dim2=-1)).sum(-1)
        D = v.shape[1]
        return -0.5 * ((z ** 2).sum(-1) + logdet + D * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)))

    def sample_boundary(self, per_class: int = 100, candidates: int = 3330, keep: int = 10, seed: int = 0,
                        classes: list[int] | None = None, transform: Transform | None = None,
                        dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-likelihood samples: rounds of {draw ``candidates``, keep the ``keep`` least likely} until
        ``per_class`` samples per class (released code: 10 rounds of 10 of 3,330). Class c's draws come from
        a generator seeded by (seed, c), so they do not depend on which other classes are sampled.
        ``transform(v, y)`` maps them back (the cVPN's ``reverse``); None keeps them as they are.
        Returns (samples [n_classes * per_class, D], labels)."""
        if self.means is None:
            raise RuntimeError("fit() first")
        if not 1 <= keep <= candidates:
            raise ValueError(f"need 1 <= keep <= candidates, got keep={keep}, candidates={candidates}")
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        classes = self.classes if classes is None else list(classes)
        rounds = -(-per_class // keep)
        out, labels = [], []
        for c in classes:  # one class at a time bounds memory at rounds x candidates x D
            if c not in self.classes:
                raise ValueError(f"class {c} was not fitted (fitted: {self.classes})")
            i = self.classes.index(c)
            g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(c)) % (2 ** 63))
            z = torch.randn(rounds, candidates, self.means.shape[1], generator=g, dtype=torch.float64)
            far = torch.topk((z ** 2).sum(-1), keep, dim=1).indices  # least likely per round
            z = torch.gather(z, 1, far.unsqueeze(-1).expand(-1, -1, z.shape[-1])).reshape(-1, z.shape[-1])[:per_class]
            out.append(self.means[i] + z @ self.chol[i].T)
            labels.append(torch.full((per_class,), c, dtype=torch.long))
        v, y = torch.cat(out).to(dtype), torch.cat(labels)
        if transform is not None:
            with torch.no_grad():
                v = transform(v, y)
        return v, y

    def state_dict(self) -> dict:
        return {"reg": self.reg, "classes": self.classes, "means": self.means, "chol": self.chol}

    @classmethod
    def from_state(cls, state: dict) -> "ClassGaussians":
        g = cls(state["reg"])
        g.classes, g.means, g.chol = list(state["classes"]), state["means"], state["chol"]
        return g
