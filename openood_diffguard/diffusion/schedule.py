"""Noise schedules (from diffusers scheduler configs) and prediction-type conversion.

Kept separate from models and samplers, as in diffusers. All schedule maths is float64 on the host
and cast to the sample's dtype/device at use, so bf16 models never degrade the DDIM algebra.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

#: timestep sentinel for the clean level (alpha_bar = 1); the model is never evaluated there.
CLEAN = -1

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """Cumulative signal rates alpha_bar[t], t = 0..T-1, plus the model's prediction type."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {_PREDICTION_TYPES}, got {self.prediction_type!r}")
        a = self.alphas_cumprod
        if a.ndim != 1 or len(a) < 2 or not torch.all((a > 0) & (a <= 1)) or not torch.all(a[1:] <= a[:-1]):
            raise ValueError("alphas_cumprod must be a decreasing 1-D sequence in (0, 1]")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_betas(cls, betas: torch.Tensor, prediction_type: str = "epsilon") -> "NoiseSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, 0), prediction_type)

    @classmethod
    def from_config(cls, config: Any = None, **overrides: Any) -> "NoiseSchedule":
        """Build from a diffusers scheduler, its ``config`` or a plain dict (diffusers key names).

        Supported ``beta_schedule``: linear, scaled_linear (LDM's sqrt-linear), squaredcos_cap_v2 / cosine,
        or explicit ``trained_betas``. Defaults follow diffusers' DDPMScheduler.
        """
        if config is not None and hasattr(config, "config") and not isinstance(config, Mapping):
            config = config.config  # a diffusers scheduler object
        cfg = dict(config or {})
        cfg.update(overrides)
        T = int(cfg.get("num_train_timesteps", 1000))
        prediction_type = cfg.get("prediction_type", "epsilon")
        if cfg.get("trained_betas") is not None:
            return cls.from_betas(torch.as_tensor(cfg["trained_betas"], dtype=torch.float64), prediction_type)
        kind = cfg.get("beta_schedule", "linear")
        b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        if kind == "linear":
            betas = torch.linspace(b0, b1, T, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, T, dtype=torch.float64) ** 2
        elif kind in ("squaredcos_cap_v2", "cosine"):
            betas = _cosine_betas(T)
        else:
            raise ValueError(f"unknown beta_schedule {kind!r}; expected one of {_BETA_SCHEDULES}")
        return cls.from_betas(betas, prediction_type)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = "scheduler") -> "NoiseSchedule":
        """Read ``scheduler_config.json`` from a local diffusers model directory (never the hub)."""
        import json
        from pathlib import Path

        root = Path(path)
        candidates = [root / subfolder / "scheduler_config.json"] if subfolder else []
        candidates.append(root / "scheduler_config.json")
        for c in candidates:
            if c.is_file():
                return cls.from_config(json.loads(c.read_text()))
        raise FileNotFoundError(
            f"no scheduler_config.json under {root} (looked in {', '.join(map(str, candidates))}); "
            "pass the schedule explicitly, e.g. NoiseSchedule.from_config({'beta_schedule': 'linear'})"
        )

    # ------------------------------------------------------------------ queries
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor | None = None) -> torch.Tensor:
        """alpha_bar at integer timesteps ``t`` (``CLEAN`` = -1 gives 1). Returns ``like``'s dtype/device."""
        t = torch.as_tensor(t, dtype=torch.long)
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])  # index 0 = CLEAN
        out = table[(t.cpu() + 1).clamp_(0, self.num_train_timesteps)]
        if like is not None:
            out = out.to(device=like.device, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32)
        return out

    def timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """Increasing timestep grid of ``num_steps`` levels, with diffusers' spacing rules.

        ``leading`` with T=1000, 100 steps gives 0, 10, ..., 990 (= guided-diffusion ``ddim100``);
        ``steps_offset=1`` gives LDM's 1, 41, ..., 961 for 25 steps.
        """
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
        if spacing == "leading":
            ts = torch.arange(num_steps) * (T // num_steps) + steps_offset
        elif spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / num_steps)).long().flip(0) - 1
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, num_steps).round()
        else:
            raise ValueError(f"spacing must be leading, trailing or linspace, got {spacing!r}")
        ts = ts.long()
        if ts.min() < 0 or ts.max() >= T or not torch.all(ts[1:] > ts[:-1]):
            raise ValueError(f"invalid timestep grid {ts.tolist()} for T={T}")
        return ts

    def levels(self, timesteps: torch.Tensor | list[int], include_clean: bool = True) -> torch.Tensor:
        """A DDIM path: increasing timesteps, optionally starting at the clean level ``CLEAN``."""
        ts = torch.as_tensor(timesteps, dtype=torch.long).flatten()
        if ts.numel() == 0 or not torch.all(ts[1:] > ts[:-1]):
            raise ValueError("timesteps must be strictly increasing")
        if ts.min() < 0 or ts.max() >= self.num_train_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        return torch.cat([torch.tensor([CLEAN]), ts]) if include_clean else ts

    # ------------------------------------------------------------------ conversions
    def split_prediction(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model output (epsilon / v / x0 per ``prediction_type``) -> (eps, x0_hat), in float32."""
        a = _bcast(self.alpha_bar(t, like=x_t), x_t)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        dt = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        out, x = output.to(dt), x_t.to(dt)
        if self.prediction_type == "epsilon":
            eps = out
            x0 = (x - s1a * eps) / sa
        elif self.prediction_type == "v_prediction":
            x0 = sa * x - s1a * out
            eps = s1a * x + sa * out
        else:  # sample
            x0 = out
            eps = (x - sa * x0) / s1a
        return eps, x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.alpha_bar(t, like=x0), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars [B] (or a scalar) -> broadcastable against ``like`` [B, ...]."""
    if v.ndim == 0:
        return v
    return v.view(-1, *([1] * (like.ndim - 1)))
