"""Noise predictors for the DDIM loop (``eps_fn(x_t, t, cond) -> eps``), composable:

- ``model_eps``: the model as is, conditioned on ``cond['y']`` if present (else unconditional).
- ``ClassifierFreeGuidance``: eps_u + w (eps_y - eps_u) in one batched forward, optionally only inside
  a spatial ``cond['mask']`` (DiffGuard's Grad-CAM-masked guidance); outside the mask it is eps_u.
- ``ClassifierGuidance``: eps - s sqrt(1 - alpha_bar) grad log p(y | z), with z the noisy image, the
  predicted clean image, or the official DiffGuard blend of both ("Clean Grad").
- ``ClipConsistent``: clamp the predicted x0 and recompute eps (guided-diffusion ``clip_denoised``).
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..diffusion.ddim import _hp
from ..diffusion.models import DiffusionModel
from ..diffusion.schedule import NoiseSchedule, _bcast

GradFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


def model_eps(model: DiffusionModel, label_key: str = "y"):
    """Plain noise prediction; conditional on ``cond[label_key]`` when given."""

    def eps_fn(x, t, cond):
        return model.eps(x, t, cond.get(label_key) if cond else None)

    return eps_fn


class ClassifierFreeGuidance:
    """eps = eps_u + mask * w * (eps_y - eps_u); ``cond['y']`` labels, optional ``cond['mask']`` in [0, 1]
    broadcastable to x, optional per-sample ``cond['cfg_scale']``."""

    def __init__(self, model: DiffusionModel, scale: float) -> None:
        if model.null_class is None:
            raise ValueError("classifier-free guidance needs a model with a null (unconditional) class")
        self.model, self.scale = model, float(scale)

    def __call__(self, x, t, cond):
        y = cond["y"]
        null = torch.full_like(y, self.model.null_class)
        both = self.model.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        eps_y, eps_u = both.chunk(2)
        scale = cond.get("cfg_scale", self.scale)
        scale = _bcast(torch.as_tensor(scale, dtype=eps_u.dtype, device=eps_u.device), eps_u)
        delta = scale * (eps_y - eps_u)
        mask = cond.get("mask")
        if mask is not None:
            delta = mask.to(delta.dtype) * delta
        return eps_u + delta


class ClassifierGuidance:
    """Classifier guidance: eps' = eps - scale * sqrt(1 - alpha_bar_t) * grad_fn(z, cond).

    ``target``: ``"xt"`` (classic, noise-aware classifier), ``"x0"`` (predicted clean image) or
    ``"x0_blend"`` (DiffGuard code: z = f x0 + (1 - f) x_t, f = sqrt(1 - alpha_bar_t)). The gradient is
    taken w.r.t. z only: never back-propagated through the diffusion model. ``clip_x0``: the step uses the
    eps consistent with x0 clamped to +-clip_x0 (guided-diffusion ``clip_denoised``) while z is still built
    from the unclamped x0, as DiffGuard's ``cond_fn`` does.
    """

    TARGETS = ("xt", "x0", "x0_blend")

    def __init__(self, eps_fn, schedule: NoiseSchedule, grad_fn: GradFn, scale: float = 1.0, target: str = "x0_blend",
                 clip_x0: float | None = None) -> None:
        if target not in self.TARGETS:
            raise ValueError(f"target must be one of {self.TARGETS}, got {target!r}")
        self.eps_fn, self.schedule, self.grad_fn = eps_fn, schedule, grad_fn
        self.scale, self.target, self.clip_x0 = float(scale), target, clip_x0

    def __call__(self, x, t, cond):
        with torch.no_grad():
            eps = _hp(self.eps_fn(x, t, cond))
        xf = _hp(x).to(eps.dtype)
        a = _bcast(self.schedule.alpha_bar(t, like=eps), eps)
        x0 = (xf - (1 - a).sqrt() * eps) / a.sqrt()
        if self.target == "xt":
            z = xf
        else:
            z = x0 if self.target == "x0" else (1 - a).sqrt() * x0 + (1 - (1 - a).sqrt()) * xf
        g = _hp(self.grad_fn(z.detach(), cond)).to(eps.dtype)
        if self.clip_x0 is not None:
            eps = (xf - a.sqrt() * x0.clamp(-self.clip_x0, self.clip_x0)) / (1 - a).sqrt()
        return eps - self.scale * (1 - a).sqrt() * g


class ClipConsistent:
    """Clamp the predicted x0 to [-bound, bound] and return the eps consistent with it."""

    def __init__(self, eps_fn, schedule: NoiseSchedule, bound: float = 1.0) -> None:
        self.eps_fn, self.schedule, self.bound = eps_fn, schedule, bound

    def __call__(self, x, t, cond):
        eps = _hp(self.eps_fn(x, t, cond))
        xf = _hp(x).to(eps.dtype)
        a = _bcast(self.schedule.alpha_bar(t, like=eps), eps)
        x0 = ((xf - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-self.bound, self.bound)
        return (xf - a.sqrt() * x0) / (1 - a).sqrt()


def log_prob_grad(classifier: Callable[[torch.Tensor], torch.Tensor], to_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  augment: Callable[[torch.Tensor], torch.Tensor] | None = None, label_key: str = "y") -> GradFn:
    """grad_z sum_crops log softmax(classifier(augment(to_input(z))))[y]: the classifier's log-probability
    gradient (summed over ``augment``'s n views, stacked view-major as [n*B, ...])."""

    def grad_fn(z, cond):
        y = cond[label_key]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            inp = to_input(z) if to_input is not None else z
            views = augment(inp) if augment is not None else inp
            n = views.shape[0] // z.shape[0]
            logp = torch.log_softmax(_hp(classifier(views)), dim=1)  # fp32, or fp64 for exact comparisons
            total = logp.gather(1, y.repeat(n).view(-1, 1)).sum()
            (g,) = torch.autograd.grad(total, z)
        return g

    return grad_fn
