"""Key layout of the openai UNet family (guided-diffusion ADM, and LDM's ``openaimodel``) -> diffusers.

Both originals number their blocks flatly (``input_blocks.N.k``, ``middle_block.k``, ``output_blocks.N.k``);
diffusers nests them per resolution level. The walk below reproduces the original numbering from the
level count, ``num_res_blocks`` and the set of levels with attention; the attention mapping itself is
passed in because ADM (fused qkv) and LDM (spatial transformer) differ.
"""
from __future__ import annotations

from typing import Callable

from .common import KeyMapper

AttnMap = Callable[[KeyMapper, str, str, int], None]


def map_resblock(m: KeyMapper, src: str, dst: str) -> None:
    """openai ``ResBlock`` -> diffusers ``ResnetBlock2D`` (same maths for default and scale-shift norm)."""
    m.copy(f"{src}.in_layers.0", f"{dst}.norm1")
    m.copy(f"{src}.in_layers.2", f"{dst}.conv1")
    m.copy(f"{src}.emb_layers.1", f"{dst}.time_emb_proj")
    m.copy(f"{src}.out_layers.0", f"{dst}.norm2")
    m.copy(f"{src}.out_layers.3", f"{dst}.conv2")
    if f"{src}.skip_connection.weight" in m.source:  # 1x1 conv only when the channel count changes
        m.copy(f"{src}.skip_connection", f"{dst}.conv_shortcut")


def map_openai_unet(m: KeyMapper, levels: int, num_res_blocks: int, attn_levels: set[int], attn: AttnMap,
                    resblock_updown: bool, channels: list[int]) -> None:
    m.copy("time_embed.0", "time_embedding.linear_1")
    m.copy("time_embed.2", "time_embedding.linear_2")
    m.copy("input_blocks.0.0", "conv_in")
    idx = 1
    for lvl in range(levels):
        for j in range(num_res_blocks):
            map_resblock(m, f"input_blocks.{idx}.0", f"down_blocks.{lvl}.resnets.{j}")
            if lvl in attn_levels:
                attn(m, f"input_blocks.{idx}.1", f"down_blocks.{lvl}.attentions.{j}", channels[lvl])
            idx += 1
        if lvl != levels - 1:
            if resblock_updown:
                map_resblock(m, f"input_blocks.{idx}.0", f"down_blocks.{lvl}.downsamplers.0")
            else:
                m.copy(f"input_blocks.{idx}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv")
            idx += 1
    map_resblock(m, "middle_block.0", "mid_block.resnets.0")
    attn(m, "middle_block.1", "mid_block.attentions.0", channels[-1])
    map_resblock(m, "middle_block.2", "mid_block.resnets.1")
    idx = 0
    for up, lvl in enumerate(reversed(range(levels))):
        for i in range(num_res_blocks + 1):
            map_resblock(m, f"output_blocks.{idx}.0", f"up_blocks.{up}.resnets.{i}")
            sub = 1
            if lvl in attn_levels:
                attn(m, f"output_blocks.{idx}.1", f"up_blocks.{up}.attentions.{i}", channels[lvl])
                sub = 2
            if lvl and i == num_res_blocks:
                if resblock_updown:
                    map_resblock(m, f"output_blocks.{idx}.{sub}", f"up_blocks.{up}.upsamplers.0")
                else:
                    m.copy(f"output_blocks.{idx}.{sub}.conv", f"up_blocks.{up}.upsamplers.0.conv")
            idx += 1
    m.copy("out.0", "conv_norm_out")
    m.copy("out.2", "conv_out")


def block_types(levels: int, attn_levels: set[int], resblock_updown: bool, cross_attention: bool = False):
    """diffusers down/up block type names for the level layout (up blocks run from the lowest resolution)."""
    attn_down = "CrossAttnDownBlock2D" if cross_attention else "AttnDownBlock2D"
    attn_up = "CrossAttnUpBlock2D" if cross_attention else "AttnUpBlock2D"
    plain_down = "ResnetDownsampleBlock2D" if resblock_updown else "DownBlock2D"
    plain_up = "ResnetUpsampleBlock2D" if resblock_updown else "UpBlock2D"
    down = [attn_down if lvl in attn_levels else plain_down for lvl in range(levels)]
    up = [attn_up if lvl in attn_levels else plain_up for lvl in reversed(range(levels))]
    return down, up
