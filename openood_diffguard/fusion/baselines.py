"""Classifier baselines for the standalone (no OpenOOD) fusion path, from pytorch-ood.

EBO, MLS, KNN and ViM are pytorch-ood's implementations (not rewritten here). pytorch-ood scores are
**higher = OOD**; we return OpenOOD's convention **higher = ID**:

| name | pytorch-ood class | our confidence (= OpenOOD's ``conf``) |
|---|---|---|
| ``ebo`` | ``EnergyBased(t)`` | ``-score`` = ``T logsumexp(z / T)`` |
| ``mls`` | ``MaxLogit`` | ``-score`` = ``max z`` |
| ``knn`` | ``KNN(k)`` (distance to the k-th normalised train feature) | ``-score**2`` (OpenOOD's faiss index returns squared distances) |
| ``vim`` | ``ViM(d, W, b)`` | ``-score`` = ``logsumexp(z) - alpha * ||residual||`` |

Argument names follow OpenOOD's ymls (``temperature``, ``K``, ``dim``) so one preset drives both paths.
All baselines are computed from one classifier forward (``features.classifier_outputs``), which also gives
``pred``; precomputed logits + penultimate features are scored by ``Baselines.predict_features`` (pytorch-ood's
name). KNN and ViM are fitted on ID train features that are extracted once per (checkpoint, loader) and cached
in memory (and on disk with ``cache_dir``).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from ..runtime.cache import atomic_write, loader_source, module_fingerprint
from ..features import classifier_outputs

BASELINE_ARGS: dict[str, dict[str, Any]] = {
    "ebo": {"temperature": 1.0},
    "mls": {},
    "knn": {"K": 50},
    "vim": {"dim": None},  # None: vim_default_dim(feature size)
}

_TRAIN_FEATURES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _pytorch_ood():
    try:
        from pytorch_ood import detector
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("standalone baselines need pytorch-ood>=0.4: pip install 'openood-diffguard[baselines]' "
                          "(inside OpenOOD, OpenOOD's own postprocessors are used instead)") from err
    return detector


def vim_default_dim(feature_dim: int) -> int:
    """OpenOOD's stock choices: 1000 for 2048-d ResNet50 features, half the size otherwise (256 for 512-d)."""
    return 1000 if feature_dim >= 2048 else feature_dim // 2


def check_vim_dim(dim: int, feature_dim: int) -> int:
    if not 1 <= int(dim) < feature_dim:
        raise ValueError(f"ViM dim={dim} must be in [1, {feature_dim - 1}] for {feature_dim}-d features (the "
                         f"residual space would be empty and the score NaN); use {vim_default_dim(feature_dim)}, "
                         f"e.g. dim_list: [256] on 512-d ResNet18 nets")
    return int(dim)


def _batches(loader: Iterable) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        if isinstance(batch, Mapping):
            yield batch["data"], torch.as_tensor(batch["label"])
        else:
            yield batch[0], torch.as_tensor(batch[1])


def train_features(net: torch.nn.Module, loader: Iterable, cache_key: str | None = None,
                   cache_dir: str | Path | None = None, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ID train features and labels (CPU), extracted once per (checkpoint, loader content) and cached.

    The key is the weights' hash (``cache.module_fingerprint``) and the loader's content identity
    (``cache.loader_source(loader, content=True)``); ``cache_key`` overrides it (e.g. checkpoint path + image
    list). With ``cache_dir`` the features are also stored as ``<cache_dir>/train_features_<key>.pt`` for later
    processes. A loader without a content identity (and no ``cache_key``) is not cached at all: its features
    are extracted on every call (a key by object would serve stale features once the object is gone).
    """
    if cache_key is None:
        identity = loader_source(loader, content=True)
        if identity is None and cache_dir is not None:
            warnings.warn(f"train_features: the data of {type(getattr(loader, 'dataset', loader)).__name__} cannot "
                          "be identified by content (not an image list, folder, TensorDataset or list of batches); "
                          "its features are not cached on disk: pass cache_key to name them")
        cache_key = None if identity is None else f"{module_fingerprint(net)}-{identity}"
    key = None if cache_key is None else hashlib.sha256(cache_key.encode()).hexdigest()[:20]
    if key in _TRAIN_FEATURES:
        return _TRAIN_FEATURES[key]
    path = Path(cache_dir) / f"train_features_{key}.pt" if cache_dir is not None and key is not None else None
    if path is not None and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        _TRAIN_FEATURES[key] = (blob["features"], blob["labels"])
        return _TRAIN_FEATURES[key]
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    feats, labels = [], []
    with torch.no_grad():
        for x, y in tqdm(_batches(loader), disable=not progress, desc="baseline train features"):
            feats.append(classifier_outputs(net, x.to(device), "penultimate", owner="the baselines").feature.float().cpu())
            labels.append(y.cpu())
    net.train(was_training)
    if not feats:
        raise ValueError("the ID train loader is empty: KNN/ViM need ID train features")
    out = (torch.cat(feats), torch.cat(labels))
    if path is not None:
        atomic_write(path, lambda f: torch.save({"features": out[0], "labels": out[1]}, f))  # all or nothing
    if key is not None:
        _TRAIN_FEATURES[key] = out
    return out


class Baselines:
    """pytorch-ood EBO / MLS / KNN / ViM scored from shared logits + features; confidences higher = ID.

    ``Baselines({"ebo": {"temperature": 1}, "knn": {"K": 50}})`` or ``Baselines(["mls", "vim"])``.
    """

    def __init__(self, spec: Mapping[str, Mapping[str, Any] | None] | Iterable[str]) -> None:
        spec = dict(spec) if isinstance(spec, Mapping) else {name: {} for name in spec}
        if not spec:
            raise ValueError(f"no baseline given; choose from {sorted(BASELINE_ARGS)}")
        self.args: dict[str, dict[str, Any]] = {}
        for name, args in spec.items():
            if name not in BASELINE_ARGS:
                raise ValueError(f"unknown baseline {name!r}; standalone baselines: {sorted(BASELINE_ARGS)}")
            args = dict(args or {})
            unknown = set(args) - set(BASELINE_ARGS[name])
            if unknown:
                raise TypeError(f"baseline {name!r}: unknown argument(s) {sorted(unknown)}; "
                                f"allowed: {sorted(BASELINE_ARGS[name])}")
            self.args[name] = {**BASELINE_ARGS[name], **args}
        self.detectors: dict[str, Any] = {}
        det = _pytorch_ood()
        if "ebo" in self.args:
            self.detectors["ebo"] = det.EnergyBased(None, t=float(self.args["ebo"]["temperature"]))
        if "mls" in self.args:
            self.detectors["mls"] = det.MaxLogit(None)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.args)

    @property
    def needs_setup(self) -> bool:
        return any(n in self.args for n in ("knn", "vim"))

    def setup(self, net: torch.nn.Module, train_loader: Iterable | None = None, cache_key: str | None = None,
              cache_dir: str | Path | None = None, progress: bool = True) -> "Baselines":
        """Fit KNN / ViM on ID train features (extracted once, cached); no-op for EBO / MLS."""
        if not self.needs_setup:
            return self
        if train_loader is None:
            raise ValueError(f"baselines {[n for n in self.args if n in ('knn', 'vim')]} need the ID train loader")
        feats, labels = train_features(net, train_loader, cache_key, cache_dir, progress)
        det = _pytorch_ood()
        if "knn" in self.args:
            self.detectors["knn"] = det.KNN(None, k=int(self.args["knn"]["K"])).fit_features(feats, labels)
        if "vim" in self.args:
            dim = self.args["vim"]["dim"]
            dim = check_vim_dim(vim_default_dim(feats.shape[1]) if dim is None else dim, feats.shape[1])
            w, b = net.get_fc()
            vim = det.ViM(None, d=dim, w=torch.as_tensor(np.asarray(w)), b=torch.as_tensor(np.asarray(b)))
            self.detectors["vim"] = vim.fit_features(feats, labels)
        return self

    def predict_features(self, logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """All baseline confidences (higher = ID, float32, on ``logits.device``) from precomputed classifier
        outputs: ``logits`` [B, C] and penultimate ``features`` [B, D] (``features.classifier_outputs(net, x,
        "penultimate")``), as pytorch-ood's ``predict_features``; ``forward`` is this after one forward."""
        missing = [n for n in self.args if n not in self.detectors]
        if missing:
            raise RuntimeError(f"baselines {missing} are not fitted: call setup(net, train_loader) first")
        out = {}
        for name, detector in self.detectors.items():
            if name in ("ebo", "mls"):
                outlier = detector.predict_logits(logits)
            else:
                outlier = detector.predict_features(features.flatten(1).float())
            # pytorch-ood: higher = OOD. OpenOOD's KNN conf is minus the *squared* distance.
            conf = -outlier.double() ** 2 if name == "knn" else -outlier
            out[name] = conf.float().to(logits.device)
        return out

    def forward(self, net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One classifier forward -> ``pred``, ``logits``, ``features`` and every baseline confidence."""
        logits, feat, _ = classifier_outputs(net, x, "penultimate", owner="the baselines")
        return {"pred": logits.argmax(1), "logits": logits, "features": feat, **self.predict_features(logits, feat)}

    @torch.no_grad()
    def score_loader(self, net: torch.nn.Module, loader: Iterable, progress: bool = True,
                     extra: Callable[[torch.Tensor, dict[str, torch.Tensor]], Mapping[str, Any]] | None = None
                     ) -> dict[str, np.ndarray]:
        """Per-sample ``pred``, ``label`` and baseline confidences over a loader, in one pass.

        ``extra(x, outputs)`` runs in the same pass on each batch (e.g. the diffusion detector, only on the
        samples a cascade routes: ``fusion.route(outputs[baseline])``) and returns more per-sample arrays;
        it is called outside ``no_grad`` because guidance needs gradients.
        """
        device = next(net.parameters()).device
        chunks: dict[str, list[np.ndarray]] = {}
        for x, y in tqdm(_batches(loader), disable=not progress, desc="baselines"):
            x = x.to(device)
            out = self.forward(net, x)
            row = {"pred": out["pred"], "label": y, **{n: out[n] for n in self.names}}
            if extra is not None:
                with torch.enable_grad():
                    row.update(extra(x, out))
            for k, v in row.items():
                chunks.setdefault(k, []).append(np.asarray(v.detach().cpu() if hasattr(v, "detach") else v))
        return {k: np.concatenate(v) for k, v in chunks.items()}
