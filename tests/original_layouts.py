"""Key/shape layouts of the ORIGINAL checkpoints, written from the structure verified in parity runs
(benchmarks/results/converter_parity.md), so CI can test the converters without the original code.

Each generator returns ``{key: shape}`` in the original naming; :func:`random_state_dict` fills it.
"""
from __future__ import annotations

import torch


def random_state_dict(layout: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(shape, generator=g) + (1.0 if k.endswith(("norm.weight", "norm1.weight",
            "norm2.weight", "norm3.weight", "in_layers.0.weight", "out_layers.0.weight", "out.0.weight",
            "norm_out.weight")) else 0.0) for k, shape in layout.items()}


def _lin(L, p, out, inp, bias=True):
    L[f"{p}.weight"] = (out, inp)
    if bias:
        L[f"{p}.bias"] = (out,)


def _conv(L, p, out, inp, k):
    L[f"{p}.weight"] = (out, inp, k, k)
    L[f"{p}.bias"] = (out,)


def _norm(L, p, ch):
    L[f"{p}.weight"] = (ch,)
    L[f"{p}.bias"] = (ch,)


# ------------------------------------------------------------------ openai UNet (ADM and LDM's openaimodel)
def _openai_resblock(L, p, cin, cout, emb, scale_shift):
    _norm(L, f"{p}.in_layers.0", cin)
    _conv(L, f"{p}.in_layers.2", cout, cin, 3)
    _lin(L, f"{p}.emb_layers.1", 2 * cout if scale_shift else cout, emb)
    _norm(L, f"{p}.out_layers.0", cout)
    _conv(L, f"{p}.out_layers.3", cout, cout, 3)
    if cin != cout:
        _conv(L, f"{p}.skip_connection", cout, cin, 1)


def adm_attention(L, p, ch, **_):
    _norm(L, f"{p}.norm", ch)
    L[f"{p}.qkv.weight"], L[f"{p}.qkv.bias"] = (3 * ch, ch, 1), (3 * ch,)
    L[f"{p}.proj_out.weight"], L[f"{p}.proj_out.bias"] = (ch, ch, 1), (ch,)


def spatial_transformer(L, p, ch, context_dim, depth=1, **_):
    _norm(L, f"{p}.norm", ch)
    _conv(L, f"{p}.proj_in", ch, ch, 1)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for a, ctx in (("attn1", ch), ("attn2", context_dim)):
            _lin(L, f"{b}.{a}.to_q", ch, ch, bias=False)
            _lin(L, f"{b}.{a}.to_k", ch, ctx, bias=False)
            _lin(L, f"{b}.{a}.to_v", ch, ctx, bias=False)
            _lin(L, f"{b}.{a}.to_out.0", ch, ch)
        _lin(L, f"{b}.ff.net.0.proj", 8 * ch, ch)  # GEGLU: 2 x (4 ch)
        _lin(L, f"{b}.ff.net.2", ch, 4 * ch)
        for n in ("norm1", "norm2", "norm3"):
            _norm(L, f"{b}.{n}", ch)
    _conv(L, f"{p}.proj_out", ch, ch, 1)


def openai_unet(model_channels, channel_mult, num_res_blocks, attn_ds, in_ch=3, out_ch=3, scale_shift=False,
                updown=False, num_classes=None, attention=adm_attention, **attn_kw) -> dict:
    L: dict = {}
    emb = 4 * model_channels
    _lin(L, "time_embed.0", emb, model_channels)
    _lin(L, "time_embed.2", emb, emb)
    if num_classes:
        L["label_emb.weight"] = (num_classes, emb)
    _conv(L, "input_blocks.0.0", model_channels, in_ch, 3)
    chans, ch, ds, idx = [model_channels], model_channels, 1, 1
    for lvl, m in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            _openai_resblock(L, f"input_blocks.{idx}.0", ch, m * model_channels, emb, scale_shift)
            ch = m * model_channels
            if ds in attn_ds:
                attention(L, f"input_blocks.{idx}.1", ch, **attn_kw)
            chans.append(ch)
            idx += 1
        if lvl != len(channel_mult) - 1:
            if updown:
                _openai_resblock(L, f"input_blocks.{idx}.0", ch, ch, emb, scale_shift)
            else:
                _conv(L, f"input_blocks.{idx}.0.op", ch, ch, 3)
            chans.append(ch)
            ds, idx = ds * 2, idx + 1
    _openai_resblock(L, "middle_block.0", ch, ch, emb, scale_shift)
    attention(L, "middle_block.1", ch, **attn_kw)
    _openai_resblock(L, "middle_block.2", ch, ch, emb, scale_shift)
    idx = 0
    for lvl, m in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            _openai_resblock(L, f"output_blocks.{idx}.0", ch + chans.pop(), m * model_channels, emb, scale_shift)
            ch, sub = m * model_channels, 1
            if ds in attn_ds:
                attention(L, f"output_blocks.{idx}.1", ch, **attn_kw)
                sub = 2
            if lvl and i == num_res_blocks:
                if updown:
                    _openai_resblock(L, f"output_blocks.{idx}.{sub}", ch, ch, emb, scale_shift)
                else:
                    _conv(L, f"output_blocks.{idx}.{sub}.conv", ch, ch, 3)
                ds //= 2
            idx += 1
    _norm(L, "out.0", ch)
    _conv(L, "out.2", out_ch, ch, 3)
    return L


# ------------------------------------------------------------------ DDPM naming (DiffNB UNet, taming VQ)
def _ddpm_resblock(L, p, cin, cout, temb):
    _norm(L, f"{p}.norm1", cin)
    _conv(L, f"{p}.conv1", cout, cin, 3)
    if temb:
        _lin(L, f"{p}.temb_proj", cout, temb)
    _norm(L, f"{p}.norm2", cout)
    _conv(L, f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(L, f"{p}.nin_shortcut", cout, cin, 1)


def _ddpm_attn(L, p, ch):
    _norm(L, f"{p}.norm", ch)
    for n in ("q", "k", "v", "proj_out"):
        _conv(L, f"{p}.{n}", ch, ch, 1)


def ddpm_unet(ch, ch_mult, num_res_blocks, attn_levels, num_classes=0, temb=True, down=True, up=True,
              in_ch=3, out_ch=3, p="") -> dict:
    L: dict = {}
    t = 4 * ch if temb else 0
    if temb:
        _lin(L, f"{p}temb.dense.0", t, ch)
        _lin(L, f"{p}temb.dense.1", t, t)
    mult = (1,) + tuple(ch_mult)
    block_in = ch * ch_mult[-1]
    if down:
        _conv(L, f"{p}conv_in", ch, in_ch, 3)
        for lvl in range(len(ch_mult)):
            block_in = ch * mult[lvl]
            for j in range(num_res_blocks):
                _ddpm_resblock(L, f"{p}down.{lvl}.block.{j}", block_in, ch * ch_mult[lvl], t)
                block_in = ch * ch_mult[lvl]
                if lvl in attn_levels:
                    _ddpm_attn(L, f"{p}down.{lvl}.attn.{j}", block_in)
            if lvl != len(ch_mult) - 1:
                _conv(L, f"{p}down.{lvl}.downsample.conv", block_in, block_in, 3)
    else:  # decoder: latent -> highest channel count
        _conv(L, f"{p}conv_in", block_in, in_ch, 3)
    _ddpm_resblock(L, f"{p}mid.block_1", block_in, block_in, t)
    _ddpm_attn(L, f"{p}mid.attn_1", block_in)
    _ddpm_resblock(L, f"{p}mid.block_2", block_in, block_in, t)
    if up:
        for lvl in reversed(range(len(ch_mult))):
            out = ch * ch_mult[lvl]
            for j in range(num_res_blocks + 1):
                skip = (ch * mult[lvl] if j == num_res_blocks else out) if down else 0
                _ddpm_resblock(L, f"{p}up.{lvl}.block.{j}", block_in + skip, out, t)
                block_in = out
                if lvl in attn_levels:
                    _ddpm_attn(L, f"{p}up.{lvl}.attn.{j}", block_in)
            if lvl != 0:
                _conv(L, f"{p}up.{lvl}.upsample.conv", block_in, block_in, 3)
    _norm(L, f"{p}norm_out", block_in)
    _conv(L, f"{p}conv_out", out_ch, block_in, 3)
    if num_classes:
        L[f"{p}label_emb.weight"] = (num_classes + 1, t)
    return L


def vq_autoencoder(ch, ch_mult, num_res_blocks, z_channels, embed_dim, n_embed) -> dict:
    L = ddpm_unet(ch, ch_mult, num_res_blocks, set(), temb=False, up=False, out_ch=z_channels, p="encoder.")
    L.update(ddpm_unet(ch, ch_mult, num_res_blocks, set(), temb=False, down=False, in_ch=z_channels, p="decoder."))
    _conv(L, "quant_conv", embed_dim, z_channels, 1)
    _conv(L, "post_quant_conv", z_channels, embed_dim, 1)
    L["quantize.embedding.weight"] = (n_embed, embed_dim)
    return L
