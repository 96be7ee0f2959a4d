"""LFDN: the residual-MLP feature denoiser of DLSR (NeurIPS 2024; released code xbyym/DLSR).

x0-parameterised: given a noisy feature vector z_t and t it predicts z_0. Layout as the official
config: SiLU -> Linear(d_in -> width) input projection (activation before the projection, as coded);
sinusoidal time embedding [cos | sin] of size ``width`` -> Linear(width -> d_in) -> SiLU ->
Linear(d_in -> d_in); ``blocks`` residual blocks
    h = Lin(SiLU(GN(x))) + Lin(SiLU(emb));  x <- x + Lin0(Dropout(SiLU(GN(h))))
with GN = GroupNorm(1 group) and Lin0 zero-initialised (each block starts as the identity); head
GN -> SiLU -> zero-initialised Linear(width -> d_in). Width 1440, 16 blocks, d_in 720 = 86.7M parameters.

The layout is the released ``ldm/modules/diffusionmodules/latent.py`` LFDN with ``time_embed_dim = in_channels``
and ``bottleneck_channels = model_channels`` (its config); only the module names differ, so
``from_released_state_dict`` / ``to_released_state_dict`` map weights between the two exactly.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..diffusion import NoiseSchedule

#: LDM's sqrt-linear ("scaled_linear") schedule with T = 100, x0 prediction (config/Config.yaml:4-8).
LFDN_SCHEDULE = {"num_train_timesteps": 100, "beta_schedule": "scaled_linear", "beta_start": 0.0015,
                 "beta_end": 0.0195, "prediction_type": "sample"}


def lfdn_schedule(**overrides) -> NoiseSchedule:
    return NoiseSchedule.from_config({**LFDN_SCHEDULE, **overrides})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] (guided-diffusion / LDM layout)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


#: package module path -> released module path (``ldm.modules.diffusionmodules.latent.LFDN``)
_RELEASED_NAMES = ((r"^proj\.", "input_proj."), (r"^time\.", "time_embed."), (r"^head\.", "out."),
                   (r"^blocks\.(\d+)\.inp\.", r"res_blocks.\1.in_layers."),
                   (r"^blocks\.(\d+)\.emb\.", r"res_blocks.\1.emb_layers."),
                   (r"^blocks\.(\d+)\.out\.", r"res_blocks.\1.out_layers."))
_PACKAGE_NAMES = ((r"^input_proj\.", "proj."), (r"^time_embed\.", "time."), (r"^out\.", "head."),
                  (r"^res_blocks\.(\d+)\.in_layers\.", r"blocks.\1.inp."),
                  (r"^res_blocks\.(\d+)\.emb_layers\.", r"blocks.\1.emb."),
                  (r"^res_blocks\.(\d+)\.out_layers\.", r"blocks.\1.out."))
#: where the LFDN sits inside the released LFDM (``DiffusionWrapper.diffusion_model``)
RELEASED_PREFIX = "model.diffusion_model."


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    raise KeyError(f"unexpected LFDN parameter name {key!r}")


def to_released_state_dict(state: dict) -> dict:
    """An ``LFDNet`` state dict under the released LFDN's parameter names (no LFDM prefix)."""
    return {_rename(k, _RELEASED_NAMES): v for k, v in state.items()}


def from_released_state_dict(state: dict, use_ema: bool = True) -> dict:
    """A released LFDN (or whole LFDM, prefix ``model.diffusion_model.``) state dict -> ``LFDNet`` names.
    With ``use_ema`` an LFDM's EMA copy is taken where present, as the released test code does (``ema_scope``;
    ``LitEma`` stores ``model_ema.<parameter name without dots>``)."""
    if any(k.startswith(RELEASED_PREFIX) for k in state):
        bare = {}
        for k, v in state.items():
            if k.startswith(RELEASED_PREFIX):
                name = k[len(RELEASED_PREFIX):]
                ema = "model_ema." + ("diffusion_model." + name).replace(".", "")
                bare[name] = state[ema] if use_ema and ema in state else v
        state = bare
    return {_rename(k, _PACKAGE_NAMES): v for k, v in state.items()}


class ResBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.GroupNorm(1, width), nn.SiLU(), nn.Linear(width, width))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, width))
        self.out = nn.Sequential(nn.GroupNorm(1, width), nn.SiLU(), nn.Dropout(dropout), _zero(nn.Linear(width, width)))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.inp(x) + self.emb(emb))


class LFDNet(nn.Module):
    def __init__(self, in_dim: int, width: int = 1440, blocks: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.config = {"in_dim": int(in_dim), "width": int(width), "blocks": int(blocks), "dropout": float(dropout)}
        self.width = width
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(in_dim, width))
        self.time = nn.Sequential(nn.Linear(width, in_dim), nn.SiLU(), nn.Linear(in_dim, in_dim))
        self.blocks = nn.ModuleList(ResBlock(width, in_dim, dropout) for _ in range(blocks))
        self.head = nn.Sequential(nn.GroupNorm(1, width), nn.SiLU(), _zero(nn.Linear(width, in_dim)))

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=z_t.device).expand(z_t.shape[0])
        emb = self.time(timestep_embedding(t, self.width).to(z_t.dtype))
        h = self.proj(z_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(h)
