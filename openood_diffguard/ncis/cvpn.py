"""Conditional volume-preserving network (cVPN), the number of invariants K, and the two-loss fit.

f(e, y) = [Orthogonal, ConditionalCoupling] x L + Orthogonal. Orthogonal layers are x -> Q x + b with
Q = matrix_exp(A - A^T) (A strictly upper triangular), additive coupling layers shift the first floor(D/2)
coordinates by an MLP of the rest and of a learned class embedding. Every layer has an exact inverse and
|det J| = 1, so a Gaussian density in the output space is the density of e itself (NCIS paper, Eq. 11).
The last K output coordinates are the class-wise invariants (the released code's choice; the paper says
"first K", which is only a relabelling).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm


class Orthogonal(nn.Module):
    """x -> Q x + b, Q = exp(A - A^T) with A strictly upper triangular (det Q = 1)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_params = nn.Parameter(torch.empty(dim, dim))
        self.bias = nn.Parameter(torch.empty(dim))
        with torch.no_grad():  # the released code's initialisation
            nn.init.uniform_(self.q_params, -math.pi, math.pi)
            self.q_params.copy_(torch.triu(self.q_params, diagonal=1))
            bound = 1 / math.sqrt(dim)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def q(self) -> torch.Tensor:
        a = torch.triu(self.q_params, diagonal=1)
        return torch.matrix_exp(a - a.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.q, self.bias)

    def reverse(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x - self.bias, self.q.T)


class ConditionalCoupling(nn.Module):
    """x1 <- x1 + t(x2, h(y)) for x1 = the first floor(D/2) coordinates (additive: unit Jacobian).

    t: pre-branch Linear -> Sigmoid -> Linear on x2, plus SiLU -> Linear of the class embedding, then
    Sigmoid -> Linear -> Sigmoid -> Linear (the released code's ConditionalMLP, hidden width ``hidden``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.split = dim // 2
        n_in, n_out = dim - self.split, self.split
        self.pre = nn.Sequential(nn.Linear(n_in, hidden), nn.Sigmoid(), nn.Linear(hidden, hidden))
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))
        self.post = nn.Sequential(nn.Sigmoid(), nn.Linear(hidden, hidden), nn.Sigmoid(), nn.Linear(hidden, n_out))

    def shift(self, x2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.post(self.pre(x2) + self.cond(h))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        return torch.cat([x1 + self.shift(x2, h), x2], dim=1)

    def reverse(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[:, :self.split], x[:, self.split:]
        return torch.cat([x1 - self.shift(x2, h), x2], dim=1)


class CVPN(nn.Module):
    """f(e, y): [Orthogonal, ConditionalCoupling] x ``num_layers`` + Orthogonal; ``reverse`` is f^-1.

    ``hidden_mult``: coupling MLP width = hidden_mult * ceil(D/2) (the released code: 4, also the class
    embedding width, shared by all coupling layers)."""

    def __init__(self, dim: int, num_classes: int, num_layers: int = 4, hidden_mult: int = 4) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"cVPN dim must be >= 2, got {dim}")
        if num_classes < 1 or num_layers < 1 or hidden_mult < 1:
            raise ValueError(f"num_classes, num_layers and hidden_mult must be >= 1, got "
                             f"{num_classes}, {num_layers}, {hidden_mult}")
        self.dim, self.num_classes = dim, num_classes
        self.config = {"dim": dim, "num_classes": num_classes, "num_layers": num_layers, "hidden_mult": hidden_mult}
        hidden = hidden_mult * (dim - dim // 2)
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [Orthogonal(dim), ConditionalCoupling(dim, hidden)]
        self.layers = nn.ModuleList(layers + [Orthogonal(dim)])
        self.class_embedding = nn.Embedding(num_classes, hidden)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"cVPN input must be [B, {self.dim}], got {tuple(x.shape)}")
        y = torch.as_tensor(y, device=x.device).long()
        if y.shape != (x.shape[0],):
            raise ValueError(f"need one label per row: {x.shape[0]} rows, labels of shape {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes - 1}], got [{int(y.min())}, {int(y.max())}]")
        return y

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.class_embedding(self._check(x, y))
        for layer in self.layers:
            x = layer(x, h) if isinstance(layer, ConditionalCoupling) else layer(x)
        return x

    def reverse(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.class_embedding(self._check(v, y))
        for layer in reversed(self.layers):
            v = layer.reverse(v, h) if isinstance(layer, ConditionalCoupling) else layer.reverse(v)
        return v


# ----------------------------------------------------------------------------------- K from PCA
def num_invariants(embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, p: float,
                   convention: str = "paper") -> int:
    """K = mean over classes of the number of lowest-variance principal directions that together hold
    less than ``p`` % of the class's variance (floored; at least 1, at most D - 1).

    ``convention="code"`` reproduces the released code (``D - idx`` with idx the first index where the
    cumulative explained variance exceeds 1 - p/100), which counts one direction more than the paper's
    definition. Directions beyond a class's rank (fewer samples than dimensions) have zero variance and
    count as invariants in both.
    """
    if convention not in ("paper", "code"):
        raise ValueError(f"convention must be 'paper' or 'code', got {convention!r}")
    if not 0 < p < 100:
        raise ValueError(f"p (variance percentage) must lie in (0, 100), got {p}")
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels)).long()
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"need embeddings [N, D] and N labels, got {tuple(x.shape)} / {tuple(y.shape)}")
    D = x.shape[1]
    ks = []
    for c in torch.unique(y).tolist():
        xc = x[y == c]
        if len(xc) < 2:
            raise ValueError(f"class {c} has {len(xc)} embedding(s): need at least 2 for a covariance")
        var = torch.linalg.svdvals(xc - xc.mean(0)) ** 2  # descending, min(n, D) values
        ratio = torch.cumsum(var, 0) / var.sum()
        idx = int(torch.nonzero(ratio > 1 - p / 100)[0])  # first index whose cumulative share exceeds 1 - p
        ks.append(D - idx - (convention == "paper"))
    return int(min(max(int(np.mean(ks)), 1), D - 1))


# ----------------------------------------------------------------------------------- fit
from .defaults import FIT_DEFAULTS  # noqa: E402,F401  (plain data, shared with the CLI)


def invariant_mse(model: CVPN, x: torch.Tensor, y: torch.Tensor, k: int, batch_size: int = 1024) -> float:
    """Mean squared invariant coordinate (the model-selection metric of the released code)."""
    model.eval()
    with torch.no_grad():
        total = sum(float((model(x[i:i + batch_size], y[i:i + batch_size])[:, -k:] ** 2).sum())
                    for i in range(0, len(x), batch_size))
    return total / (len(x) * k)


def fit_cvpn(embeddings: torch.Tensor, labels: torch.Tensor, k: int, config: dict | None = None,
             state: dict | None = None, progress: bool = True, device: str | torch.device = "cpu",
             on_epoch=None) -> tuple[CVPN, dict]:
    """Train a cVPN so that its last ``k`` outputs are ~0 for each class (released-code recipe).

    Per batch two Adam steps on one optimizer: the invariance loss mean(f(e, y)[:, -k:]^2), then (if
    ``reconstruction``) the released code's reconstruction loss: the outputs detached, the invariants set
    to 0, mapped back with f^-1, MSE to e (the paper states only the first). Learning rate decays linearly
    to ``min_lr_factor`` x lr over all steps. The returned model is the epoch with the lowest invariant MSE
    on a strided subset of ``eval_samples`` training embeddings (there is no held-out split, as in the code).
    ``state`` (from a previous call's ``on_epoch`` payload) resumes; ``on_epoch(payload)`` is called after
    every epoch with everything needed to resume.
    Returns (best model, info: history, best epoch / mse, k).
    """
    cfg = {**FIT_DEFAULTS, **(config or {})}
    unknown = set(cfg) - set(FIT_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown cVPN fit option(s) {sorted(unknown)}; allowed: {sorted(FIT_DEFAULTS)}")
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    y = torch.as_tensor(labels).long()
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need embeddings [N, D] (N > 0) and N labels, got {tuple(x.shape)} / {tuple(y.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    D = x.shape[1]
    if not 1 <= k < D:
        raise ValueError(f"k (number of invariants) must lie in [1, {D - 1}], got {k}")
    if int(y.min()) < 0:
        raise ValueError("labels must be >= 0")
    device = torch.device(device)
    x, y = x.to(device), y.to(device)
    num_classes = int(y.max()) + 1
    torch.manual_seed(int(cfg["seed"]))
    model = CVPN(D, num_classes, int(cfg["num_layers"]), int(cfg["hidden_mult"])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    bs = min(int(cfg["batch_size"]), len(x))
    per_epoch = math.ceil(len(x) / bs)
    total = max(int(cfg["epochs"]) * per_epoch, 1)
    floor = float(cfg["min_lr_factor"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - (1 - floor) * min(s, total) / total)
    n_eval = min(int(cfg["eval_samples"]), len(x))
    eval_idx = torch.arange(0, len(x) - len(x) % n_eval, len(x) // n_eval, device=device)[:n_eval]
    history: list[dict] = []
    best = {"epoch": 0, "mse": invariant_mse(model, x[eval_idx], y[eval_idx], k), "state": copy.deepcopy(model.state_dict())}
    epoch = 0
    if state is not None:
        if state.get("k") != k or state.get("config", {}).get("num_layers") != cfg["num_layers"] or \
                state.get("config", {}).get("hidden_mult") != cfg["hidden_mult"]:
            raise ValueError("cannot resume: the saved cVPN state has another k / architecture")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        history, best, epoch = list(state["history"]), dict(state["best"]), int(state["epoch"])
    bar = tqdm(total=int(cfg["epochs"]), initial=epoch, desc="cVPN", disable=not progress)
    while epoch < int(cfg["epochs"]):
        model.train()
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(int(cfg["seed"]) * 7919 + epoch)).to(device)
        inv_sum = rec_sum = 0.0
        for i in range(per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            xb, yb = x[idx], y[idx]
            v = model(xb, yb)
            inv = (v[:, -k:] ** 2).mean()
            opt.zero_grad(set_to_none=True)
            inv.backward()
            opt.step()
            inv_sum += float(inv.detach())
            if cfg["reconstruction"]:
                v = v.detach().clone()
                v[:, -k:] = 0.0
                rec = nn.functional.mse_loss(model.reverse(v, yb), xb)
                opt.zero_grad(set_to_none=True)
                rec.backward()
                opt.step()
                rec_sum += float(rec.detach())
            sched.step()
        epoch += 1
        mse = invariant_mse(model, x[eval_idx], y[eval_idx], k)
        history.append({"epoch": epoch, "inv_loss": inv_sum / per_epoch, "rec_loss": rec_sum / per_epoch, "eval_mse": mse})
        if mse < best["mse"]:
            best = {"epoch": epoch, "mse": mse, "state": copy.deepcopy(model.state_dict())}
        bar.update(1)
        bar.set_postfix(inv=f"{history[-1]['inv_loss']:.3g}", eval=f"{mse:.3g}")
        if on_epoch is not None:
            on_epoch({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_schedule": sched.state_dict(),
                      "history": history, "best": best, "epoch": epoch, "k": k, "config": cfg})
    bar.close()
    model.load_state_dict(best["state"])
    model.eval()
    return model, {"history": history, "best_epoch": best["epoch"], "best_mse": best["mse"], "k": k, "config": cfg}
