"""Step 1 of every detector: classifier space <-> diffusion space.

OpenOOD hands postprocessors *normalised* images (``(x01 - mean) / std`` at the classifier's
resolution). Diffusion models want [-1, 1] pixels at their own resolution, or latents. ``ImageSpace``
owns both directions; ``to_classifier`` is differentiable (classifier guidance, Grad-CAM).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: OpenOOD's normalisation table (openood/preprocessors/transform.py), keyed by normalization_type.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet200": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "covid": ((0.4907, 0.4907, 0.4907), (0.2697, 0.2697, 0.2697)),
    "aircraft": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "cub": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "cars": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
_ALIASES = {"cifar6": "cifar10", "osr_cifar6": "cifar10", "cifar50": "cifar100", "osr_cifar50": "cifar100",
            "tin20": "imagenet", "osr_tin20": "imagenet", "tin": "imagenet"}
UNKNOWN = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def resolve_normalization(name: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for an OpenOOD ``normalization_type`` or dataset name (OSR names like ``cifar6_seed1``
    map to their parent); unknown names get OpenOOD's default 0.5/0.5."""
    if name is None:
        return UNKNOWN
    key = str(name).lower()
    if key in NORMALIZATION:
        return NORMALIZATION[key]
    for prefix, target in _ALIASES.items():
        if key.startswith(prefix):
            return NORMALIZATION[target]
    return UNKNOWN


@dataclass
class ImageSpace:
    """Conversions between the classifier's normalised space and the diffusion model's space.

    ``diffusion_size``: side of the diffusion model's pixel input (None = keep). ``classifier_size``:
    side the classifier expects (None = the size the image arrived with). ``codec``: a ``LatentCodec``
    for latent models. ``tolerance``: how far outside [0, 1] un-normalised pixels may stray before
    ``validate`` calls the input un-normalised or wrongly normalised.
    """

    mean: Sequence[float] = UNKNOWN[0]
    std: Sequence[float] = UNKNOWN[1]
    diffusion_size: Optional[int] = None
    classifier_size: Optional[int] = None
    codec: Optional[torch.nn.Module] = None
    resize_mode: str = "bilinear"
    tolerance: float = 0.1

    @classmethod
    def for_dataset(cls, name: str | None, **kwargs) -> "ImageSpace":
        mean, std = resolve_normalization(name)
        return cls(mean, std, **kwargs)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if mean.shape[1] != x.shape[1] and bool((mean == mean.flatten()[0]).all() and (std == std.flatten()[0]).all()):
            mean, std = mean[:, :1], std[:, :1]  # channel-independent stats (e.g. OpenOOD's 0.5/0.5) fit any channel count
        if mean.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"images have {x.shape[1]} channels but mean/std have {mean.shape[1]}")
        return mean, std

    def validate(self, x: torch.Tensor) -> None:
        """Raise a clear error for non-image input: wrong rank, NaN/inf, or pixels far outside [0, 1]."""
        if not torch.is_tensor(x) or x.ndim != 4:
            raise ValueError(f"expected a batch of images [B, C, H, W], got {getattr(x, 'shape', type(x))}")
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"images contain NaN/inf (batch positions {bad[:10]})")
        u = self.to_unit(x)
        lo, hi = float(u.min()), float(u.max())
        if lo < -self.tolerance or hi > 1 + self.tolerance:
            raise ValueError(
                f"un-normalised pixels span [{lo:.3f}, {hi:.3f}], expected [0, 1]: the batch must be normalised "
                f"with mean={tuple(self.mean)} std={tuple(self.std)} (OpenOOD's preprocessing); check "
                "`normalization_type` / the dataset name, or pass mean/std explicitly")

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x * std + mean

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(u)
        return (u - mean) / std

    def _resize(self, x: torch.Tensor, size: Optional[int]) -> torch.Tensor:
        if size is None or tuple(x.shape[-2:]) == (size, size):
            return x
        if self.resize_mode in ("bilinear", "bicubic"):
            return F.interpolate(x, size=(size, size), mode=self.resize_mode, align_corners=False,
                                 antialias=size < x.shape[-1])
        return F.interpolate(x, size=(size, size), mode=self.resize_mode)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised classifier input -> diffusion pixels in [-1, 1] at ``diffusion_size`` (clamped)."""
        return self._resize(self.to_unit(x).clamp(0, 1) * 2 - 1, self.diffusion_size)

    def to_diffusion(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised classifier input -> the diffusion model's space (pixels, or latents via ``codec``)."""
        px = self.to_pixels(x)
        return self.codec.encode(px) if self.codec is not None else px

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> pixels in [-1, 1] (decodes latents; identity for pixel models)."""
        return self.codec.decode(z) if self.codec is not None else z

    def pixels_to_unit(self, px: torch.Tensor, size: Optional[int] = None, clamp: bool = True) -> torch.Tensor:
        u = (px.clamp(-1, 1) if clamp else px) * 0.5 + 0.5
        return self._resize(u, size)

    def to_classifier(self, px: torch.Tensor, size: Optional[int] = None, clamp: bool = True) -> torch.Tensor:
        """Diffusion pixels [-1, 1] -> normalised classifier input at ``size`` / ``classifier_size``.
        Differentiable; ``clamp=False`` keeps gradients for out-of-range pixels (guidance)."""
        return self.from_unit(self.pixels_to_unit(px, size or self.classifier_size, clamp))
