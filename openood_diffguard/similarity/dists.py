"""Perceptual distances (DISTS, LPIPS) computed by piq, with explicit weight files and cached references.

piq's constructors download VGG16 and the learned layer weights from GitHub on first use, which hangs or
fails offline. Here the files are read from one explicit directory (the torch-hub ``checkpoints/`` dir
by default, where piq itself would have put them) and a missing file is a clear error naming it, where
to put it and where to get it. The metric maths stays piq's own (``get_features`` / ``compute_distance``
of a real ``piq.DISTS`` / ``piq.LPIPS`` instance); we only split the forward so that the features of a
fixed reference image are computed once (DiffGuard's adaptive early stop compares every inversion step
with the same input).

Inputs are images in [0, 1] (piq's convention). ``check_range=False`` allows unclamped images, which the
official early-stop rule feeds to DISTS on noisy states.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: file name in the weights dir -> where to download it on a connected machine
WEIGHT_FILES = {
    "vgg16": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "dists": ("dists_weights.pt", "https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/dists_weights.pt"),
    "lpips": ("lpips_weights.pt",
              "https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt"),
}
_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
_DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)  # input + the five VGG stages (alpha/beta split)


def weights_dir(path: str | Path | None = None) -> Path:
    """Where DISTS/LPIPS weights are read from: ``path`` or ``<torch hub dir>/checkpoints``."""
    return Path(path).expanduser() if path is not None else Path(torch.hub.get_dir()) / "checkpoints"


def _load_weight_files(names: Sequence[str], root: Path) -> dict:
    missing = [(WEIGHT_FILES[n][0], WEIGHT_FILES[n][1]) for n in names if not (root / WEIGHT_FILES[n][0]).is_file()]
    if missing:
        lines = "\n".join(f"  - {root / f}   (download: {url})" for f, url in missing)
        raise FileNotFoundError(
            f"perceptual-metric weights missing (nothing is downloaded at run time). Put these files there:\n{lines}\n"
            f"or pass weights_dir=<folder holding them>; pretrained=False builds random weights (tests/benchmarks only).")
    out = {}
    for n in names:
        file = root / WEIGHT_FILES[n][0]
        try:
            out[n] = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt/wrong file
            raise RuntimeError(f"could not read {file} ({type(err).__name__}: {err}); replace it with a fresh copy "
                               f"of {WEIGHT_FILES[n][1]}") from err
    return out


def _vgg16_features(state: dict | None) -> nn.Sequential:
    """torchvision's VGG16 ``features`` stack (no classifier head), optionally with its weights."""
    from torchvision.models.vgg import cfgs, make_layers

    feats = make_layers(cfgs["D"], batch_norm=False)
    if state is not None:
        sub = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        feats.load_state_dict(sub)
    return feats.eval()


def _build_piq(kind: str, pretrained: bool, root: Path, generator: torch.Generator | None):
    """A genuine piq.DISTS / piq.LPIPS instance whose weights come from local files (or are random)."""
    import piq
    from piq.perceptual import VGG16_LAYERS, ContentLoss

    if pretrained:
        files = _load_weight_files(["vgg16", kind], root)
        vgg, w = _vgg16_features(files["vgg16"]), files[kind]
    else:
        vgg, w = _vgg16_features(None), None
    layers = [VGG16_LAYERS[name] for name in _LAYERS]
    vgg = vgg[: int(layers[-1]) + 1]  # drop pool5: never used, and it fails on images below 32 px
    if kind == "dists":
        if w is None:  # random positive alpha/beta summing to 1, so DISTS stays in [0, 1] like the real one
            ab = torch.rand(2, 1, sum(_DISTS_CHANNELS), 1, 1, generator=generator) + 0.1
            ab = ab / ab.sum()
            w = {"alpha": ab[0], "beta": ab[1]}
        weights = list(torch.split(w["alpha"], _DISTS_CHANNELS, dim=1)) + list(torch.split(w["beta"], _DISTS_CHANNELS, dim=1))
        module = piq.DISTS.__new__(piq.DISTS)
        ContentLoss.__init__(module, vgg, layers=layers, weights=weights, replace_pooling=True, reduction="none",
                             normalize_features=False, allow_layers_weights_mismatch=True)
    elif kind == "lpips":
        if w is None:
            w = [torch.rand(1, c, 1, 1, generator=generator) for c in _DISTS_CHANNELS[1:]]
        module = piq.LPIPS.__new__(piq.LPIPS)
        ContentLoss.__init__(module, vgg, layers=layers, weights=list(w), replace_pooling=False, reduction="none",
                             normalize_features=True)
    else:
        raise ValueError(f"unknown perceptual metric {kind!r}; expected 'dists' or 'lpips'")
    return module.eval()


class PerceptualDistance(nn.Module):
    """Per-sample DISTS or LPIPS distance (0 = identical) between images in [0, 1].

    ``size``: side both images are resized to first (bilinear, no antialias, as torchvision's tensor
    ``Resize`` did in the official code): DiffGuard scores GDM at 224 and LDM at 256; None keeps the
    size. ``features(ref)`` + ``distance(x, ref_features=...)`` reuse a fixed reference.
    """

    def __init__(self, kind: str = "dists", size: Optional[int] = None, pretrained: bool = True,
                 weights_path: str | Path | None = None, check_range: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.kind, self.size, self.check_range = kind, size, check_range
        g = torch.Generator().manual_seed(seed)
        self.metric = _build_piq(kind, pretrained, weights_dir(weights_path), g)
        self.pretrained = pretrained
        for p in self.metric.parameters():
            p.requires_grad_(False)

    def with_options(self, size: Optional[int] = None, check_range: bool = True) -> "PerceptualDistance":
        """Same network and weights, other resize / range-check settings (no second VGG in memory)."""
        other = copy.copy(self)
        other.size, other.check_range = size, check_range
        return other

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.kind.upper()} expects RGB batches [B, 3, H, W], got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{self.kind.upper()} input contains NaN/inf")
        if self.check_range and (float(x.min()) < -1e-3 or float(x.max()) > 1 + 1e-3):
            raise ValueError(f"{self.kind.upper()} expects images in [0, 1], got [{float(x.min()):.3f}, "
                             f"{float(x.max()):.3f}] (map [-1, 1] pixels with x * 0.5 + 0.5)")
        x = x.float()
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.kind == "dists" and min(x.shape[-2:]) > 256:  # piq.DISTS.forward's own downsampling
            x = F.interpolate(x, scale_factor=256 / min(x.shape[-2:]), recompute_scale_factor=False, mode="bilinear")
        return x

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Reference features (cache these for a fixed image)."""
        self.metric.model.to(x.device)
        with torch.no_grad():
            return self.metric.get_features(self._prepare(x))

    def distance(self, x: torch.Tensor, ref: torch.Tensor | None = None,
                 ref_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """[B] distance of ``x`` to ``ref`` (or to precomputed ``ref_features``)."""
        if (ref is None) == (ref_features is None):
            raise ValueError("pass exactly one of ref / ref_features")
        fy = self.features(ref) if ref_features is None else ref_features
        fx = self.features(x)
        if fx[0].shape != fy[0].shape:
            raise ValueError(f"image and reference differ in shape: {tuple(fx[0].shape)} vs {tuple(fy[0].shape)}")
        with torch.no_grad():
            d = self.metric.compute_distance(fx, fy)
            total = torch.cat([(di * w.to(di)).mean(dim=[2, 3]) for di, w in zip(d, self.metric.weights)], dim=1).sum(1)
        return 1 - total if self.kind == "dists" else total

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return self.distance(x, ref)


def select_features(features: list[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
    """Rows ``ids`` of cached reference features (the samples still active in a loop)."""
    return [f.index_select(0, ids.to(f.device)) for f in features]


def psnr(x: torch.Tensor, ref: torch.Tensor, peak: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB; ``peak=2`` for [-1, 1] images. DiffGuard's code used peak 255 on [-1, 1]
    tensors, i.e. PSNR + 20 log10(127.5) = PSNR + 42.11 dB (its threshold 48.5 is 6.39 dB here)."""
    mse = (x.float() - ref.float()).pow(2).flatten(1).mean(1)
    return 20 * torch.log10(peak / mse.sqrt())
