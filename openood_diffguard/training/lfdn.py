"""Train LFDN on standardised classifier features of ID training data (``openood-diffguard train-lfdn``).

Objective (seed 003 Alg. 1): || z0 - LFDN(z_t, t) ||^2 with t ~ U{0..T-1}, z_t = sqrt(a_t) z0 +
sqrt(1 - a_t) eps. Defaults follow the paper (AdamW lr 1e-4, weight decay 1e-4, batch 128, 150 epochs);
the released config used lr 1e-5 / wd 0.02 / batch 256. The raw weights after epoch 1 are kept as the
"first-epoch" model of the LR score. Checkpoints hold only tensors, numbers and strings, so they load with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..features import FeatureStandardizer, extract_features
from ..networks.lfdn import LFDN_SCHEDULE, LFDNet, lfdn_schedule

FORMAT = "openood-diffguard/lfdn-v1"
from .defaults import LFDN_TRAIN as TRAIN_DEFAULTS  # noqa: E402  (plain data, shared with `train-lfdn --help`)


def train_lfdn(z0: torch.Tensor, config: dict | None = None, progress: bool = True,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """Train on standardised features ``z0`` [N, D]. Returns {"final", "first": LFDNet, "history": [epoch losses]}."""
    cfg = {**TRAIN_DEFAULTS, **(config or {})}
    unknown = set(cfg) - set(TRAIN_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown LFDN training option(s) {sorted(unknown)}; allowed: {sorted(TRAIN_DEFAULTS)}")
    if z0.ndim != 2 or not torch.isfinite(z0).all():
        raise ValueError(f"LFDN trains on finite features [N, D], got shape {tuple(z0.shape)}")
    device = torch.device(device) if device is not None else z0.device
    gen = torch.Generator().manual_seed(int(cfg["seed"]))
    torch.manual_seed(int(cfg["seed"]))
    net = LFDNet(z0.shape[1], cfg["width"], cfg["blocks"], cfg["dropout"]).to(device)
    ema = copy.deepcopy(net).requires_grad_(False) if cfg["ema"] else None
    sched = lfdn_schedule()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    z0 = z0.to(device)
    N, bs, T = z0.shape[0], int(cfg["batch_size"]), sched.num_train_timesteps
    history, first = [], None
    for epoch in tqdm(range(int(cfg["epochs"])), disable=not progress, desc="LFDN training"):
        net.train()
        perm = torch.randperm(N, generator=gen).to(device)
        total = 0.0
        for i in range(0, N, bs):
            z = z0[perm[i:i + bs]]
            t = torch.randint(0, T, (z.shape[0],), generator=gen).to(device)
            noise = torch.randn(z.shape, generator=gen).to(device)
            loss = torch.nn.functional.mse_loss(net(sched.add_noise(z, noise, t).float(), t), z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.lerp_(p, 1 - cfg["ema"])
            total += float(loss.detach()) * z.shape[0]
        history.append(total / N)
        if epoch == 0:
            first = copy.deepcopy(net).eval()
    final = (ema if ema is not None else net).eval()
    return {"final": final, "first": first, "history": history, "config": cfg}


def classifier_hash(net: torch.nn.Module) -> str:
    """Content hash of a classifier's weights (cache key for on-the-fly LFDN training)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def fit_lfdn(net: torch.nn.Module, loader: Iterable, layers: Sequence[int], config: dict | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Features of ``net`` over the ID train ``loader`` -> standardiser + trained LFDN, as a checkpoint dict."""
    net.eval()
    feats, widths = extract_features(net, loader, layers, progress=progress)
    std = FeatureStandardizer.fit(feats, widths)
    device = next(net.parameters()).device
    result = train_lfdn(std(feats).to(device), config, progress=progress)
    return make_checkpoint(result, std, layers, classifier_hash(net))


def make_checkpoint(result: dict, standardizer: FeatureStandardizer, layers: Sequence[int], clf_hash: str) -> dict:
    return {
        "format": FORMAT,
        "net_config": result["final"].config,
        "train_config": {k: v for k, v in result["config"].items()},
        "schedule": dict(LFDN_SCHEDULE),
        "layers": [int(i) for i in layers],
        "standardizer": standardizer.state_dict(),
        "final": {k: v.cpu() for k, v in result["final"].state_dict().items()},
        "first": None if result["first"] is None else {k: v.cpu() for k, v in result["first"].state_dict().items()},
        "history": [float(x) for x in result["history"]],
        "classifier_hash": clf_hash,
    }


def save_checkpoint(ckpt: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """-> {"final", "first" (LFDNet or None), "standardizer", "layers", "schedule", "classifier_hash", "history"}.
    Raises with the path and what to put there for missing, corrupt or mismatched files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LFDN checkpoint not found at {path}: train one with `openood-diffguard train-lfdn "
                                f"--out {path} ...`, or leave lfdn_checkpoint empty to train during setup()")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / not a torch file
        raise RuntimeError(f"could not read LFDN checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not an LFDN checkpoint written by openood-diffguard (format {FORMAT!r})")
    models = {}
    for key in ("final", "first"):
        if ckpt[key] is None:
            models[key] = None
            continue
        m = LFDNet(**ckpt["net_config"])
        try:
            m.load_state_dict(ckpt[key])  # strict: a mismatch must never leave a zero-init net behind
        except RuntimeError as err:
            raise ValueError(f"LFDN checkpoint {path} ({key} model) does not match its own net_config "
                             f"{ckpt['net_config']}: {err}") from err
        models[key] = m.eval()
    return {**models, "standardizer": FeatureStandardizer.from_state_dict(ckpt["standardizer"]),
            "layers": list(ckpt["layers"]), "schedule": ckpt["schedule"], "classifier_hash": ckpt["classifier_hash"],
            "history": ckpt["history"]}


# ------------------------------------------------------------------------------------------ CLI
from .defaults import OPENOOD_NETWORKS as OPENOOD_NETS  # noqa: E402


def build_classifier(network: str, num_classes: int, checkpoint: str | None) -> torch.nn.Module:
    """An OpenOOD network by name (needs OpenOOD) or ``package.module:Class`` (constructed with
    ``num_classes=``), loaded strictly from ``checkpoint``."""
    import importlib

    if network in OPENOOD_NETS:
        try:
            cls = getattr(importlib.import_module("openood.networks"), OPENOOD_NETS[network])
        except ImportError as err:
            from ..openood import INSTALL_HINT

            raise ImportError(f"--network {network} needs OpenOOD (or pass --network module:Class). {INSTALL_HINT}") from err
    elif ":" in network:
        mod, name = network.split(":", 1)
        cls = getattr(importlib.import_module(mod), name)
    else:
        raise ValueError(f"unknown network {network!r}: one of {sorted(OPENOOD_NETS)} or 'package.module:Class'")
    net = cls(num_classes=num_classes)
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"classifier checkpoint {path} not found (OpenOOD: results/<run>/s0/best.ckpt)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            net.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"classifier checkpoint {path} does not fit --network {network} "
                             f"with {num_classes} classes: {err}") from err
    return net.eval()


class _Normalised(torch.utils.data.Dataset):
    """[-1, 1] images -> the classifier's normalised input (OpenOOD test-time preprocessing)."""

    def __init__(self, base, normalization: str, channels: int = 3) -> None:
        from ..space import ImageSpace, resolve_normalization

        mean, std = resolve_normalization(normalization)  # grayscale data: the first channel's statistics
        self.base, self.space = base, ImageSpace(mean[:channels], std[:channels])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return self.space.from_unit(((x + 1) / 2)[None])[0], y
