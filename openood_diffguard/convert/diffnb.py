"""DiffNB (luping-liu/DiffOOD) class-conditional DDPM checkpoints -> diffusers ``UNet2DModel``.

The network is the DDPM CIFAR UNet (``network/ddim/ddim.py: Model``) plus ``label_emb = Embedding(C+1, 4ch)``
added to the time embedding; row C is the null label for classifier-free guidance. Exact correspondences:
timestep features [sin | cos] with freqs exp(-ln(1e4) i / (half-1)) = ``flip_sin_to_cos=False,
freq_shift=1``; GroupNorm(32, eps 1e-6) everywhere; single-head attention (``attention_head_dim=None``);
stride-2 conv after a (0,1,0,1) zero pad = ``downsample_padding=0``; label table = ``num_class_embeds=C+1``.
The same ``down/mid/up`` naming is used by the LDM/taming VQ autoencoder, so the block mappers are shared.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .common import KeyMapper, fill_strict, load_state_dict, write_scheduler, write_sidecar
from .flags import DiffNBFlags  # noqa: F401  (re-exported)


def map_resnet(m: KeyMapper, src: str, dst: str) -> None:
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2")):
        m.copy(f"{src}.{a}", f"{dst}.{b}")
    if f"{src}.temb_proj.weight" in m.source:
        m.copy(f"{src}.temb_proj", f"{dst}.time_emb_proj")
    for short in ("nin_shortcut", "conv_shortcut"):  # 1x1 / 3x3 projection when channels change
        if f"{src}.{short}.weight" in m.source:
            m.copy(f"{src}.{short}", f"{dst}.conv_shortcut")


def map_attn(m: KeyMapper, src: str, dst: str) -> None:
    m.copy(f"{src}.norm", f"{dst}.group_norm")
    for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        m.copy(f"{src}.{a}", f"{dst}.{b}", squeeze=True)


def map_down(m: KeyMapper, levels: int, num_res_blocks: int, attn_levels: set[int], src: str = "", dst: str = "") -> None:
    for lvl in range(levels):
        for j in range(num_res_blocks):
            map_resnet(m, f"{src}down.{lvl}.block.{j}", f"{dst}down_blocks.{lvl}.resnets.{j}")
            if lvl in attn_levels:
                map_attn(m, f"{src}down.{lvl}.attn.{j}", f"{dst}down_blocks.{lvl}.attentions.{j}")
        if lvl != levels - 1:
            m.copy(f"{src}down.{lvl}.downsample.conv", f"{dst}down_blocks.{lvl}.downsamplers.0.conv")


def map_mid(m: KeyMapper, src: str = "", dst: str = "") -> None:
    map_resnet(m, f"{src}mid.block_1", f"{dst}mid_block.resnets.0")
    map_attn(m, f"{src}mid.attn_1", f"{dst}mid_block.attentions.0")
    map_resnet(m, f"{src}mid.block_2", f"{dst}mid_block.resnets.1")


def map_up(m: KeyMapper, levels: int, num_res_blocks: int, attn_levels: set[int], src: str = "", dst: str = "") -> None:
    """``up.{l}`` is indexed by level; diffusers up blocks run from the lowest resolution."""
    for i_up, lvl in enumerate(reversed(range(levels))):
        for j in range(num_res_blocks + 1):
            map_resnet(m, f"{src}up.{lvl}.block.{j}", f"{dst}up_blocks.{i_up}.resnets.{j}")
            if lvl in attn_levels:
                map_attn(m, f"{src}up.{lvl}.attn.{j}", f"{dst}up_blocks.{i_up}.attentions.{j}")
        if lvl != 0:
            m.copy(f"{src}up.{lvl}.upsample.conv", f"{dst}up_blocks.{i_up}.upsamplers.0.conv")


def _attn_levels(flags: DiffNBFlags) -> set[int]:
    return {lvl for lvl in range(len(flags.ch_mult)) if flags.image_size // 2 ** lvl in flags.attn_resolutions}


def unet_config(flags: DiffNBFlags) -> dict:
    attn = _attn_levels(flags)
    levels = range(len(flags.ch_mult))
    cfg = dict(sample_size=flags.image_size, in_channels=flags.in_channels, out_channels=flags.out_ch,
               block_out_channels=tuple(flags.ch * m for m in flags.ch_mult), layers_per_block=flags.num_res_blocks,
               down_block_types=tuple("AttnDownBlock2D" if lvl in attn else "DownBlock2D" for lvl in levels),
               up_block_types=tuple("AttnUpBlock2D" if lvl in attn else "UpBlock2D" for lvl in reversed(levels)),
               attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
               downsample_padding=0, act_fn="silu", time_embedding_type="positional")
    if flags.num_classes:
        cfg["num_class_embeds"] = flags.num_classes + 1
    return cfg


def convert_state_dict(sd: dict, flags: DiffNBFlags):
    from diffusers import UNet2DModel

    model = UNet2DModel(**unet_config(flags))
    m = KeyMapper(sd, "DiffNB")
    m.copy("temb.dense.0", "time_embedding.linear_1")
    m.copy("temb.dense.1", "time_embedding.linear_2")
    m.copy("conv_in", "conv_in")
    levels, attn = len(flags.ch_mult), _attn_levels(flags)
    map_down(m, levels, flags.num_res_blocks, attn)
    map_mid(m)
    map_up(m, levels, flags.num_res_blocks, attn)
    m.copy("norm_out", "conv_norm_out")
    m.copy("conv_out", "conv_out")
    if flags.num_classes:
        m.copy("label_emb", "class_embedding", names=("weight",))
    return fill_strict(model, m, flags.describe())


def convert(src: str | Path, out: str | Path, flags: DiffNBFlags, trust_pickle: bool = False) -> Path:
    unet = convert_state_dict(load_state_dict(src, "DiffNB (DiffOOD)", trust_pickle), flags)
    out = Path(out)
    unet.save_pretrained(out / "unet")
    write_scheduler(out, "linear", 1e-4, 0.02)
    write_sidecar(out, source="diffnb", checkpoint=str(src), flags=dataclasses.asdict(flags),
                  num_classes=flags.num_classes or None, null_class=flags.num_classes or None)
    return out
