"""OpenAI guided-diffusion (ADM) checkpoints -> diffusers ``UNet2DModel``.

Exact correspondences (verified numerically against the original code, see
benchmarks/results/converter_parity.md):
- timestep features [cos | sin], freqs exp(-ln(1e4) i / half)  = ``flip_sin_to_cos=True, freq_shift=0``;
- ``use_scale_shift_norm``  = ``resnet_time_scale_shift="scale_shift"`` (norm, then ``*(1+scale)+shift``);
- ``resblock_updown``       = ``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D`` and
  ``downsample_type/upsample_type="resnet"`` (resample between norm+SiLU and the first conv, both paths);
- GroupNorm32 (32 groups, eps 1e-5, also in attention) = ``norm_num_groups=32, norm_eps=1e-5``, and
  ``attn_norm_num_groups=32``: without it diffusers drops the mid-block attention norm under scale-shift;
- fused ``qkv`` 1x1 conv: the legacy order is per head ``(h, [q k v], d)``, the new order
  ``([q k v], h, d)``; both are de-interleaved into ``to_q/to_k/to_v``;
- ``learn_sigma``: 6 output channels, eps first, then the variance interpolation value;
- ``class_cond``: ``label_emb`` added to the time embedding = ``num_class_embeds`` (no null class).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .common import KeyMapper, fill_strict, load_state_dict, write_scheduler, write_sidecar
from .flags import PRESETS, ADMFlags  # noqa: F401  (re-exported: adm.ADMFlags, adm.PRESETS)
from .openai_unet import block_types, map_openai_unet

_SCHEDULES = {"linear": ("linear", 1e-4, 0.02), "cosine": ("squaredcos_cap_v2", 1e-4, 0.02)}


def _levels(flags: ADMFlags) -> tuple[list[int], set[int], int]:
    mult = flags.resolved_mult()
    channels = [int(flags.num_channels * m) for m in mult]
    attn_ds = {flags.image_size // r for r in flags.attention_resolutions}
    attn_levels = {lvl for lvl in range(len(mult)) if 2 ** lvl in attn_ds}
    if channels[0] != flags.num_channels:
        raise ValueError(f"channel_mult[0] = {mult[0]} != 1 is not representable in diffusers UNet2DModel "
                         "(its time-embedding input width is tied to the first block width)")
    heads_dim = set()
    for lvl in sorted(attn_levels) + [len(mult) - 1]:
        ch = channels[lvl]
        heads_dim.add(flags.num_head_channels if flags.num_head_channels > 0 else ch // flags.num_heads)
    if len(heads_dim) != 1:
        raise ValueError(f"num_heads={flags.num_heads} with num_head_channels=-1 gives head widths {sorted(heads_dim)} "
                         "across levels; diffusers UNet2DModel has one attention_head_dim for all levels, so this "
                         "architecture cannot be converted exactly")
    return channels, attn_levels, heads_dim.pop()


def unet_config(flags: ADMFlags) -> dict:
    channels, attn_levels, head_dim = _levels(flags)
    down, up = block_types(len(channels), attn_levels, flags.resblock_updown)
    cfg = dict(sample_size=flags.image_size, in_channels=flags.in_channels,
               out_channels=flags.in_channels * (2 if flags.learn_sigma else 1),
               block_out_channels=tuple(channels), layers_per_block=flags.num_res_blocks,
               down_block_types=tuple(down), up_block_types=tuple(up), attention_head_dim=head_dim,
               norm_num_groups=32, norm_eps=1e-5, attn_norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
               time_embedding_type="positional", act_fn="silu", downsample_padding=1,
               resnet_time_scale_shift="scale_shift" if flags.use_scale_shift_norm else "default",
               downsample_type="resnet" if flags.resblock_updown else "conv",
               upsample_type="resnet" if flags.resblock_updown else "conv")
    if flags.class_cond:
        cfg["num_class_embeds"] = flags.num_classes
    return cfg


def split_qkv(weight: torch.Tensor, heads: int, legacy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused qkv (3C, ...) -> q, k, v (C, ...). Legacy layout is (heads, 3, d), new layout (3, heads, d)."""
    three_c = weight.shape[0]
    d = three_c // (3 * heads)
    rest = weight.shape[1:]
    w = weight.reshape(heads, 3, d, *rest).transpose(0, 1) if legacy else weight.reshape(3, heads, d, *rest)
    return tuple(w[i].reshape(heads * d, *rest) for i in range(3))


def _attention_mapper(head_dim: int, legacy: bool):
    def attn(m: KeyMapper, src: str, dst: str, channels: int) -> None:
        m.copy(f"{src}.norm", f"{dst}.group_norm")
        heads = channels // head_dim
        for name in ("weight", "bias"):
            t = m.get(f"{src}.qkv.{name}")
            if t is None:
                continue
            if t.shape[0] != 3 * channels:
                raise ValueError(f"{src}.qkv.{name} has {t.shape[0]} rows, expected 3 x {channels} "
                                 "(check --num-channels / --channel-mult)")
            for part, tensor in zip(("to_q", "to_k", "to_v"), split_qkv(t, heads, legacy)):
                m.set(f"{dst}.{part}.{name}", tensor.reshape(tensor.shape[0], -1) if tensor.ndim > 1 else tensor)
        m.copy(f"{src}.proj_out", f"{dst}.to_out.0", squeeze=True)
    return attn


def convert_state_dict(sd: dict, flags: ADMFlags):
    from diffusers import UNet2DModel

    channels, attn_levels, head_dim = _levels(flags)
    model = UNet2DModel(**unet_config(flags))
    m = KeyMapper(sd, "ADM")
    map_openai_unet(m, len(channels), flags.num_res_blocks, attn_levels,
                    _attention_mapper(head_dim, not flags.use_new_attention_order), flags.resblock_updown, channels)
    if flags.class_cond:
        m.copy("label_emb", "class_embedding", names=("weight",))
    return fill_strict(model, m, flags.describe())


def flags_for(src: str | Path, preset: str | None = None, **overrides) -> ADMFlags:
    """Preset by name (or by the checkpoint's file stem), then explicit overrides."""
    name = preset or Path(src).stem
    base = PRESETS.get(name, ADMFlags()) if preset is None else PRESETS[preset]
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def convert(src: str | Path, out: str | Path, flags: ADMFlags, trust_pickle: bool = False) -> Path:
    sd = load_state_dict(src, "ADM (guided-diffusion)", trust_pickle)
    unet = convert_state_dict(sd, flags)
    out = Path(out)
    unet.save_pretrained(out / "unet")
    kind, b0, b1 = _SCHEDULES[flags.noise_schedule]
    write_scheduler(out, kind, b0, b1, variance_type="learned_range" if flags.learn_sigma else "fixed_small")
    write_sidecar(out, source="adm", checkpoint=str(src), flags=dataclasses.asdict(flags),
                  num_classes=flags.num_classes if flags.class_cond else None, null_class=None)
    return out
