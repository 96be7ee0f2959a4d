"""Train LFDN on normalised classifier features of ID training data (``openood-diffguard train-lfdn``).

Objective (DLSR paper, Alg. 1): || z0 - LFDN(z_t, t) ||^2 with t ~ U{0..T-1}, z_t = sqrt(a_t) z0 +
sqrt(1 - a_t) eps. ``TRAIN_DEFAULTS`` follow the paper (AdamW lr 1e-4, weight decay 1e-4, batch 128,
150 epochs, no EMA); ``CODE_TRAIN`` are the released code's (``main.py``: lr 1e-5, weight decay 0.02,
batch 256; EMA 0.9999 with LitEma's warm-up min(decay, (1 + n) / (10 + n)), the EMA weights used at test) and
the defaults of ``variant: code``. The weights after epoch 1 (the EMA copy when EMA is on, as the code's
``checkpoint-0.pth`` read through ``ema_scope``) are the "first-epoch" model of the LR score. ``z0`` is
normalised as the detector's variant needs (``features.FEATURE_NORMS``); the checkpoint records which.
Checkpoints hold only tensors, numbers and strings, so they load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from ..runtime.cache import module_fingerprint
from ..features import FEATURE_NORMS, FeatureStandardizer, extract_features, layer_normalize
from ..networks.lfdn import LFDN_SCHEDULE, LFDNet, lfdn_schedule

FORMAT = "openood-diffguard/lfdn-v3"
# v1: standardised features only, no widths / feature_norm; v1-v2: classifier_hash = legacy_classifier_hash
_FORMATS = ("openood-diffguard/lfdn-v1", "openood-diffguard/lfdn-v2", FORMAT)
# plain data, shared with `train-lfdn --help` (which imports no torch)
from .defaults import LFDN_CODE_TRAIN as CODE_TRAIN  # noqa: E402
from .defaults import LFDN_TRAIN as TRAIN_DEFAULTS  # noqa: E402
_INTS = ("width", "blocks", "epochs", "batch_size", "seed")


def check_train_options(config: Mapping[str, Any] | None, owner: str = "LFDN training") -> None:
    """Unknown keys, wrong types and out-of-range values of training options -> an error naming the option."""
    from ..detectors.base import ParameterError

    if config is None:
        return
    if not isinstance(config, Mapping):
        raise ParameterError(f"{owner}: must be a mapping of training options, got {config!r}")
    unknown = set(config) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ParameterError(f"{owner}: unknown option(s) {sorted(unknown)}; allowed: {sorted(TRAIN_DEFAULTS)}")
    for k, v in config.items():
        numeric = not isinstance(v, bool) and isinstance(v, (int, float))
        if not numeric or (k in _INTS and not float(v).is_integer()):
            raise ParameterError(f"{owner}: option {k!r} must be {'an integer' if k in _INTS else 'a number'}, got {v!r}")
        low, low_open = {"dropout": (0, False), "ema": (0, False), "lr": (0, True), "weight_decay": (0, False),
                         "seed": (0, False)}.get(k, (1, False))
        high = 1 if k in ("dropout", "ema") else None
        if (v <= low if low_open else v < low) or (high is not None and v >= high):
            bound = f"{'>' if low_open else '>='} {low}" + (f" and < {high}" if high is not None else "")
            raise ParameterError(f"{owner}: option {k!r} must be {bound}, got {v!r}")


def train_config(config: Mapping[str, Any] | None = None, variant: str = "ours") -> dict[str, Any]:
    """The full training options: the variant's defaults (``CODE_TRAIN`` for code) updated by ``config``."""
    check_train_options(config)
    base = CODE_TRAIN if variant == "code" else TRAIN_DEFAULTS
    cfg = {**base, **(config or {})}
    return {k: int(v) if k in _INTS else float(v) for k, v in cfg.items()}


def train_lfdn(z0: torch.Tensor, config: dict | None = None, progress: bool = True,
               device: torch.device | str | None = None) -> dict[str, Any]:
    """Train on normalised features ``z0`` [N, D]. Returns {"final", "first": LFDNet, "history": [epoch losses]}."""
    cfg = train_config(config)
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
    history, first, updates = [], None, 0
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
            if ema is not None:  # LitEma: the decay warms up as min(decay, (1 + n) / (10 + n))
                updates += 1
                decay = min(cfg["ema"], (1 + updates) / (10 + updates))
                with torch.no_grad():
                    for pe, p in zip(ema.parameters(), net.parameters()):
                        pe.lerp_(p, 1 - decay)
            total += float(loss.detach()) * z.shape[0]
        history.append(total / N)
        if epoch == 0:
            first = copy.deepcopy(ema if ema is not None else net).eval()
    final = (ema if ema is not None else net).eval()
    return {"final": final, "first": first, "history": history, "config": cfg}


#: marks a ``classifier_hash`` read from a checkpoint older than ``FORMAT`` (see ``legacy_classifier_hash``)
LEGACY_HASH = "legacy:"


def legacy_classifier_hash(net: torch.nn.Module) -> str:
    """The weights hash LFDN checkpoints of formats v1 / v2 stored (sorted names without a DataParallel prefix,
    raw bytes, no shapes / dtypes). Only to check those checkpoints against a classifier: everything written now
    uses ``cache.module_fingerprint``."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.removeprefix("module.").encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]


def loader_identity(loader: Iterable) -> str:
    """Identity of the ID training data behind a loader, for the on-the-fly checkpoint's cache key.

    An OpenOOD image-list dataset is identified by ``cache.loader_source(loader, content=True)`` (image list,
    image folder, transform; no image is read): ``main.py``'s augmented train loader and the Evaluator's plain
    one differ by their transforms. Any other loader by the content of its samples (order-free, so a shuffling
    loader keeps its key; a randomly augmenting one gets a new key per pass)."""
    from ..runtime.cache import hash_tensor, loader_source

    if isinstance(getattr(getattr(loader, "dataset", None), "imglist", None), (list, tuple)):
        identity = loader_source(loader, content=True)
        if identity is not None:
            return identity
    rows = []
    for batch in loader:
        x, y = (batch["data"], batch.get("label")) if isinstance(batch, Mapping) else (batch[0], batch[1])
        x = torch.as_tensor(x).detach().cpu().contiguous()
        y = torch.zeros(len(x)) if y is None else torch.as_tensor(y).cpu()
        for xi, yi in zip(x, y):  # one digest per sample: sorted below, so the key does not follow the order
            h = hashlib.sha256()
            hash_tensor(h, "x", xi)
            hash_tensor(h, "y", yi)
            rows.append(h.digest())
    h = hashlib.sha256()
    for r in sorted(rows):
        h.update(r)
    return f"content:{len(rows)}:" + h.hexdigest()[:20]


def normalize_features(feats: torch.Tensor, widths: Sequence[int], feature_norm: str
                       ) -> tuple[torch.Tensor, FeatureStandardizer | None]:
    """(z0, fitted standardiser or None) for one of ``features.FEATURE_NORMS``."""
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {feature_norm!r}")
    if feature_norm == "standardize":
        std = FeatureStandardizer.fit(feats, list(widths))
        return std(feats), std
    return layer_normalize(feats, widths, feature_norm), None


def fit_lfdn(net: torch.nn.Module, loader: Iterable, layers: Sequence[int], config: dict | None = None,
             progress: bool = True, feature_norm: str = "standardize") -> dict[str, Any]:
    """Features of ``net`` over the ID train ``loader`` -> normalised (``feature_norm``) -> trained LFDN, as a
    checkpoint dict."""
    net.eval()
    feats, widths = extract_features(net, loader, layers, progress=progress)
    z0, std = normalize_features(feats, widths, feature_norm)
    device = next(net.parameters()).device
    result = train_lfdn(z0.to(device), config, progress=progress)
    return make_checkpoint(result, std, layers, module_fingerprint(net), widths=widths, feature_norm=feature_norm)


def make_checkpoint(result: dict, standardizer: FeatureStandardizer | None, layers: Sequence[int], clf_hash: str,
                    widths: Sequence[int] | None = None, feature_norm: str = "standardize") -> dict:
    if widths is None:
        widths = standardizer.widths
    return {
        "format": FORMAT,
        "net_config": result["final"].config,
        "train_config": {k: v for k, v in result["config"].items()},
        "schedule": dict(LFDN_SCHEDULE),
        "layers": [int(i) for i in layers],
        "widths": [int(w) for w in widths],
        "feature_norm": feature_norm,
        "standardizer": None if standardizer is None else standardizer.state_dict(),
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
    """-> {"final", "first" (LFDNet or None), "standardizer" (or None), "widths", "feature_norm", "layers",
    "schedule", "classifier_hash", "history"}. Raises with the path and what to put there for missing, corrupt
    or mismatched files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"LFDN checkpoint not found at {path}: train one with `openood-diffguard train-lfdn "
                                f"--out {path} ...`, or leave lfdn_checkpoint empty to train during setup()")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt / not a torch file
        raise RuntimeError(f"could not read LFDN checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") not in _FORMATS:
        raise ValueError(f"{path} is not an LFDN checkpoint written by openood-diffguard (format {FORMAT!r})")
    if ckpt["format"] == _FORMATS[0]:  # v1: always standardised features
        ckpt = {**ckpt, "feature_norm": "standardize", "widths": [int(w) for w in ckpt["standardizer"]["widths"]]}
    if ckpt["format"] != FORMAT:  # v1 / v2: the classifier is checked with the hash they were written with
        ckpt = {**ckpt, "classifier_hash": LEGACY_HASH + ckpt["classifier_hash"]}
    if ckpt["feature_norm"] not in FEATURE_NORMS or (ckpt["feature_norm"] == "standardize") != (ckpt["standardizer"] is not None):
        raise ValueError(f"LFDN checkpoint {path}: inconsistent feature_norm {ckpt['feature_norm']!r} / standardiser")
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
    std = None if ckpt["standardizer"] is None else FeatureStandardizer.from_state_dict(ckpt["standardizer"])
    return {**models, "standardizer": std, "widths": [int(w) for w in ckpt["widths"]],
            "feature_norm": ckpt["feature_norm"], "layers": list(ckpt["layers"]), "schedule": ckpt["schedule"],
            "classifier_hash": ckpt["classifier_hash"], "history": ckpt["history"]}


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
