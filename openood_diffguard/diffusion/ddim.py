"""The one DDIM loop every detector uses: inversion x0 -> x_t and synthesis x_t -> x0 (eta = 0
deterministic; ``sample(eta > 0)`` adds DDIM's stochastic term, eta = 1 being DDPM's posterior).

A DDIM *path* is an increasing tensor of timesteps ``levels`` (see ``NoiseSchedule.levels``); index 0
is usually the clean level. Every sample ``b`` of a batch carries its own state: its current index on
the path and the index where it stops. One loop runs over path indices; at each index only the samples
still moving are gathered into the model batch (no Python loop over samples), so samples that finished
early (adaptive early stop) or start late cost nothing.

``eps_fn(x_t, t, cond) -> eps`` is any noise predictor: a plain model (``model_eps``), classifier-free
guidance, classifier guidance, ... (``openood_diffguard.guidance``). ``t`` is a per-sample LongTensor
and ``cond`` a dict of per-sample tensors already restricted to the active samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
#: ``stop_fn(x_new, index, active_ids, cond) -> bool[len(active_ids)]``: True stops that sample at ``index``.
StopFn = Callable[[torch.Tensor, int, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


@dataclass
class InversionResult:
    latents: torch.Tensor  # x at each sample's stop index
    stop_index: torch.Tensor  # LongTensor [B]: path index where each sample stopped
    model_calls: int  # total sample-level model evaluations (for cost accounting)


def _per_sample(value: int | torch.Tensor | None, batch: int, default: int, device) -> torch.Tensor:
    if value is None:
        value = default
    v = torch.as_tensor(value, dtype=torch.long, device=device)
    return v.expand(batch).clone() if v.ndim == 0 else v.clone()


def _take(cond: Mapping[str, torch.Tensor] | None, idx: torch.Tensor, full: int) -> dict:
    """Restrict per-sample entries of ``cond`` (leading dim == batch) to the active samples."""
    if not cond:
        return {}
    return {k: (v.index_select(0, idx.to(v.device)) if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == full else v)
            for k, v in cond.items()}


def _hp(v: torch.Tensor) -> torch.Tensor:
    """Upcast half/bf16 to float32; keep float32/float64 as they are (scheduler maths never in low precision)."""
    return v if v.dtype in (torch.float32, torch.float64) else v.float()


def _ddim_move(x: torch.Tensor, eps: torch.Tensor, a_from: torch.Tensor, a_to: torch.Tensor,
               eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM transport between two noise levels given eps; ``eta > 0`` (denoising only) adds
    sigma * noise with sigma = eta * sqrt((1 - a_to) / (1 - a_from) * (1 - a_from / a_to)) (DDIM Eq. 16)."""
    xf, eps = _hp(x), _hp(eps).to(_hp(x).dtype)
    a_from, a_to = a_from.to(xf.dtype), a_to.to(xf.dtype)
    x0 = (xf - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    if eta == 0:
        return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
    sigma2 = (eta ** 2 * (1 - a_to) / (1 - a_from) * (1 - a_from / a_to)).clamp(min=0)
    return a_to.sqrt() * x0 + (1 - a_to - sigma2).clamp(min=0).sqrt() * eps + sigma2.sqrt() * noise.to(xf.dtype)


class DDIM:
    """Deterministic DDIM over a noise schedule; ``invert`` and ``sample`` are exact inverses for
    ``refine`` large enough (each inversion step solves the implicit equation by fixed point)."""

    def __init__(self, schedule: NoiseSchedule, progress: bool = False) -> None:
        self.schedule = schedule
        self.progress = progress

    def _alpha(self, levels: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
        return self.schedule.alpha_bar(levels[i], like=like)

    @torch.no_grad()
    def invert(
        self,
        eps_fn: EpsFn,
        x: torch.Tensor,
        levels: torch.Tensor,
        start: int | torch.Tensor | None = 0,
        stop: int | torch.Tensor | None = None,
        cond: Mapping[str, torch.Tensor] | None = None,
        convention: str = "target",
        refine: int = 0,
        stop_fn: Optional[StopFn] = None,
    ) -> InversionResult:
        """Run x from path index ``start`` up to ``stop`` (per sample, default: the last level).

        ``convention="target"`` evaluates eps at the noisier level (diffusers ``DDIMInverseScheduler``,
        LDM); ``"source"`` at the current level (guided-diffusion's ``ddim_reverse_sample``; cannot start
        at the clean level). ``refine`` fixed-point iterations make each step the exact inverse of the
        synthesis step. ``stop_fn`` may stop samples early (adaptive early stop); their latents freeze.
        """
        if convention not in ("target", "source"):
            raise ValueError(f"convention must be 'target' or 'source', got {convention!r}")
        B, L = x.shape[0], len(levels)
        start_i = _per_sample(start, B, 0, x.device)
        stop_i = _per_sample(stop, B, L - 1, x.device)
        if torch.any(start_i < 0) or torch.any(stop_i > L - 1) or torch.any(start_i > stop_i):
            raise ValueError(f"need 0 <= start <= stop <= {L - 1} per sample")
        if convention == "source" and int(levels[start_i.min()]) < 0:
            raise ValueError("source-level inversion evaluates the model at the start level: it cannot be the clean level")
        x = x.detach().clone()
        calls = 0
        lo, hi = int(start_i.min()), int(stop_i.max())
        for i in tqdm(range(lo, hi), disable=not self.progress, desc="DDIM inversion", leave=False):
            ids = torch.nonzero((start_i <= i) & (stop_i > i)).flatten()
            if ids.numel() == 0:
                continue
            xa = x.index_select(0, ids)
            ca = _take(cond, ids, B)
            a_s, a_n = self._alpha(levels, i, xa), self._alpha(levels, i + 1, xa)
            t_eval = levels[i + 1] if convention == "target" else levels[i]
            eps = eps_fn(xa, t_eval.to(x.device).expand(len(ids)), ca)
            calls += len(ids)
            xn = _ddim_move(xa, eps, a_s, a_n)
            t_n = levels[i + 1].to(x.device).expand(len(ids))
            for _ in range(refine):  # solve x_n = move(x_s; eps(x_n, t_n)) by fixed point
                eps = eps_fn(xn.to(x.dtype), t_n, ca)
                calls += len(ids)
                xn = _ddim_move(xa, eps, a_s, a_n)
            x.index_copy_(0, ids, xn.to(x.dtype))
            if stop_fn is not None:
                halt = stop_fn(x.index_select(0, ids), i + 1, ids, ca).to(device=x.device, dtype=torch.bool)
                stop_i[ids[halt]] = i + 1
        return InversionResult(x, stop_i, calls)

    def sample(
        self,
        eps_fn: EpsFn,
        x: torch.Tensor,
        levels: torch.Tensor,
        start: int | torch.Tensor | None = None,
        stop: int | torch.Tensor | None = 0,
        cond: Mapping[str, torch.Tensor] | None = None,
        grad: bool = False,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        noise_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Synthesise: move each sample from path index ``start`` (default: last) down to ``stop``.

        ``grad=True`` keeps autograd enabled for eps functions that need gradients (classifier
        guidance differentiates the classifier, never the diffusion model). ``eta > 0`` makes the
        steps stochastic; the noise of every step is drawn for the whole batch from ``generator`` (on
        the CPU, then moved) and then restricted to the moving samples, so a sample's draw depends on
        the seed and its position, never on which other samples are still moving. ``noise_fn(i, ids)``
        replaces that draw: the noise of the step from path index ``i`` for the moving samples ``ids``
        (e.g. common random numbers shared by every sample, which make a score independent of its batch).
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        B, L = x.shape[0], len(levels)
        start_i = _per_sample(start, B, L - 1, x.device)
        stop_i = _per_sample(stop, B, 0, x.device)
        if torch.any(stop_i < 0) or torch.any(start_i > L - 1) or torch.any(stop_i > start_i):
            raise ValueError(f"need 0 <= stop <= start <= {L - 1} per sample")
        x = x.detach().clone()
        hi, lo = int(start_i.max()), int(stop_i.min())
        with torch.set_grad_enabled(grad):
            for i in tqdm(range(hi, lo, -1), disable=not self.progress, desc="DDIM synthesis", leave=False):
                draw = eta and noise_fn is None
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device) if draw else None
                ids = torch.nonzero((start_i >= i) & (stop_i < i)).flatten()
                if ids.numel() == 0:
                    continue
                xa = x.index_select(0, ids)
                a_n, a_s = self._alpha(levels, i, xa), self._alpha(levels, i - 1, xa)
                eps = eps_fn(xa, levels[i].to(x.device).expand(len(ids)), _take(cond, ids, B))
                step_noise = None if not eta else noise.index_select(0, ids) if noise_fn is None else noise_fn(i, ids)
                x.index_copy_(0, ids, _ddim_move(xa, eps, a_n, a_s, eta, step_noise).detach().to(x.dtype))
        return x


def noise_to_level(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor | int,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Forward-diffuse x0 to timestep ``t`` (scalar or per sample) with fresh or given Gaussian noise."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device if generator is None else generator.device,
                            dtype=torch.float32).to(x0.device)
    t = torch.as_tensor(t, dtype=torch.long).expand(x0.shape[0])
    return schedule.add_noise(x0.float(), noise.float(), t).to(x0.dtype)


__all__ = ["DDIM", "InversionResult", "EpsFn", "StopFn", "noise_to_level"]
