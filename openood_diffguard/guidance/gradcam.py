"""Batched Grad-CAM on the device (one forward + one backward for the whole batch).

Same maps as the ``grad-cam`` package's ``GradCAM`` (which DiffGuard's LDM path uses): activations A of
a layer, weights w_c = mean_hw dlogit_y/dA_c (raw logit of the target class), CAM = ReLU(sum_c w_c A_c),
per-image min-max, bilinear upsampling to the output size, min-max again. ``grad-cam`` does the same on
CPU numpy with cv2, one image at a time; it stays the test oracle only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def resolve_layer(net: nn.Module, layer: nn.Module | str) -> nn.Module:
    """``"layer4.-1"`` -> ``net.layer4[-1]`` (dotted path, integers index sequences)."""
    if isinstance(layer, nn.Module):
        return layer
    mod = net
    for part in str(layer).split("."):
        try:
            mod = mod[int(part)] if part.lstrip("-").isdigit() else getattr(mod, part)
        except (AttributeError, IndexError, TypeError) as err:
            raise ValueError(f"Grad-CAM layer {layer!r} not found in {type(net).__name__} (failed at {part!r}); "
                             "pass the module itself or a dotted path such as 'layer4.-1'") from err
    return mod


def _minmax(cam: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    flat = cam.flatten(1)
    lo = flat.min(1).values.view(-1, 1, 1, 1)
    cam = cam - lo
    hi = cam.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return cam / (hi + eps)


class GradCAM:
    """``cam(x, labels, size=None) -> [B, 1, H, W]`` in [0, 1]; ``size`` defaults to the input's."""

    def __init__(self, net: nn.Module, layer: nn.Module | str = "layer4.-1") -> None:
        self.net = net
        self.layer = resolve_layer(net, layer)

    def __call__(self, x: torch.Tensor, labels: torch.Tensor, size: Optional[int | tuple[int, int]] = None) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}

        def hook(_module, _inp, out):
            if not out.requires_grad:  # frozen net, plain input: make A a graph leaf so d logit / dA exists
                out = out.detach().requires_grad_(True)
            store["A"] = out
            return out

        handle = self.layer.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = self.net(x)
                if "A" not in store:
                    raise RuntimeError("Grad-CAM layer was not run by the classifier's forward")
                labels = labels.to(logits.device).long().view(-1, 1)
                target = logits.gather(1, labels).sum()  # samples are independent: one backward for all
                (grad,) = torch.autograd.grad(target, store["A"])
        finally:
            handle.remove()
        A = store["A"].detach().float()
        weights = grad.float().mean(dim=(2, 3), keepdim=True)
        cam = _minmax(F.relu((weights * A).sum(1, keepdim=True)))
        size = size or tuple(x.shape[-2:])
        size = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(cam.shape[-2:]) != size:
            cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
        return _minmax(cam)


def cam_mask(cam: torch.Tensor, threshold: float, size: int | tuple[int, int]) -> torch.Tensor:
    """Binary mask ``cam > threshold`` nearest-downsampled to ``size`` (the latent grid), as DiffGuard's
    LDM sampler does; a negative threshold selects the *low*-activation area (``cam < |threshold|``)."""
    mask = (cam < -threshold) if threshold < 0 else (cam > threshold)
    size = (size, size) if isinstance(size, int) else tuple(size)
    return F.interpolate(mask.float(), size=size, mode="nearest")
