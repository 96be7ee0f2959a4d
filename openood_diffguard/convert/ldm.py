"""CompVis latent-diffusion ``cin256-v2`` (``model.ckpt``) -> diffusers directory

    unet/ (UNet2DConditionModel)  vqvae/ (VQModel)  class_embedding.safetensors  scheduler/

loadable with :func:`openood_diffguard.diffusion.load_ldm` (``CrossAttnUNetAdapter`` + ``LatentCodec``).

The checkpoint holds ``model.diffusion_model.*`` (openai UNet with spatial transformers),
``first_stage_model.*`` (taming VQ autoencoder), ``cond_stage_model.embedding.weight`` (ClassEmbedder,
1001 x 512, row 1000 = null, fed as a length-1 cross-attention context) and schedule buffers (checked
against the sqrt-linear 0.0015..0.0195 schedule, which is diffusers ``scaled_linear``) plus
``scale_factor`` (the VQ latent scaling, 1.0 when absent). Exact correspondences:
- LDM ``attention_resolutions`` are downsampling factors (not image sizes as in ADM);
- ``num_heads=1`` with ``num_head_channels=-1`` -> one head of width ``ch`` per level; diffusers names the
  head COUNT ``attention_head_dim`` in ``UNet2DConditionModel``, so a per-level tuple of counts is written;
- ``SpatialTransformer`` / ``BasicTransformerBlock`` keys are diffusers ``Transformer2DModel`` keys verbatim
  (GroupNorm eps 1e-6, 1x1-conv proj_in/out, GEGLU ff) once the block prefix is renamed;
- the VQ encoder/decoder use the DDPM ``down/mid/up`` naming (shared mapper with DiffNB), pad-then-stride
  downsampling (``downsample_padding=0``), GroupNorm eps 1e-6; encode = pre-quantisation latents.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .common import KeyMapper, fill_strict, load_state_dict, write_scheduler, write_sidecar
from .diffnb import map_down, map_mid, map_up
from .flags import LDMFlags  # noqa: F401  (re-exported)
from .openai_unet import block_types, map_openai_unet

UNET, VQ, COND = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
#: LatentDiffusion schedule/bookkeeping buffers: not weights; alphas_cumprod is checked, the rest ignored
_SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor", "lvlb_weights",
                     "cond_ids", "model_ema.decay", "model_ema.num_updates"}


def _unet_levels(f: LDMFlags) -> tuple[list[int], set[int], list[int]]:
    channels = [f.model_channels * m for m in f.channel_mult]
    attn_levels = {lvl for lvl in range(len(channels)) if 2 ** lvl in f.attention_resolutions}
    heads = [f.num_heads if f.num_head_channels == -1 else ch // f.num_head_channels for ch in channels]
    return channels, attn_levels, heads


def unet_config(f: LDMFlags) -> dict:
    channels, attn_levels, heads = _unet_levels(f)
    down, up = block_types(len(channels), attn_levels, f.resblock_updown, cross_attention=True)
    if f.resblock_updown:
        raise ValueError("resblock_updown with cross-attention blocks has no diffusers UNet2DConditionModel equivalent")
    return dict(sample_size=f.image_size, in_channels=f.in_channels, out_channels=f.out_channels,
                block_out_channels=tuple(channels), layers_per_block=f.num_res_blocks, down_block_types=tuple(down),
                up_block_types=tuple(up), mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=f.context_dim,
                attention_head_dim=tuple(heads), transformer_layers_per_block=f.transformer_depth,
                norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                act_fn="silu", use_linear_projection=False,
                resnet_time_scale_shift="scale_shift" if f.use_scale_shift_norm else "default")


def vq_config(f: LDMFlags, scaling_factor: float) -> dict:
    n = len(f.vq_ch_mult)
    return dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(f.vq_ch * m for m in f.vq_ch_mult),
                layers_per_block=f.vq_num_res_blocks, act_fn="silu", latent_channels=f.vq_z_channels,
                sample_size=f.vq_resolution, num_vq_embeddings=f.vq_n_embed, norm_num_groups=32,
                vq_embed_dim=f.vq_embed_dim, scaling_factor=scaling_factor)


def _spatial_transformer(m: KeyMapper, src: str, dst: str, channels: int) -> None:
    """Keys inside a SpatialTransformer already carry the diffusers Transformer2DModel names."""
    inner = [k for k in m.source if k.startswith(src + ".")]
    if not inner:
        m.missing.append(f"{src}.*")
    for k in inner:
        m.set(dst + k[len(src):], m.get(k))


def split_checkpoint(sd: dict) -> tuple[dict, dict, dict, dict]:
    """(unet, vq, class embedder, schedule buffers) by key prefix; anything else is unexpected."""
    parts: tuple[dict, dict, dict, dict] = ({}, {}, {}, {})
    unknown = []
    for k, v in sd.items():
        for part, prefix in zip(parts, (UNET, VQ, COND)):
            if k.startswith(prefix):
                part[k[len(prefix):]] = v
                break
        else:
            if k in _SCHEDULE_BUFFERS or k.startswith("model_ema."):  # EMA copy: not used (cin256-v2 use_ema False)
                parts[3][k] = v
            else:
                unknown.append(k)
    if unknown:
        raise ValueError(f"unexpected keys in the LDM checkpoint ({len(unknown)}): {sorted(unknown)[:12]}; "
                         f"expected prefixes {UNET!r}, {VQ!r}, {COND!r} (a cin256-v2 model.ckpt)")
    if not parts[0]:
        raise ValueError(f"no '{UNET}*' keys: this is not a LatentDiffusion checkpoint")
    return parts


def convert_unet(sd: dict, f: LDMFlags):
    from diffusers import UNet2DConditionModel

    channels, attn_levels, _ = _unet_levels(f)
    model = UNet2DConditionModel(**unet_config(f))
    m = KeyMapper(sd, "LDM UNet")
    map_openai_unet(m, len(channels), f.num_res_blocks, attn_levels, _spatial_transformer, f.resblock_updown, channels)
    return fill_strict(model, m, f.describe())


def convert_vq(sd: dict, f: LDMFlags, scaling_factor: float = 1.0):
    from diffusers import VQModel

    model = VQModel(**vq_config(f, scaling_factor))
    m = KeyMapper(sd, "LDM VQ autoencoder")
    levels = len(f.vq_ch_mult)
    attn = {lvl for lvl in range(levels) if f.vq_resolution // 2 ** lvl in f.vq_attn_resolutions}
    if attn:
        raise ValueError("VQ autoencoders with attention inside the levels are not supported (cin256-v2 has none)")
    for part, mapper in (("encoder.", map_down), ("decoder.", map_up)):
        m.copy(f"{part}conv_in", f"{part}conv_in")
        mapper(m, levels, f.vq_num_res_blocks, attn, src=part, dst=part)
        map_mid(m, src=part, dst=part)
        m.copy(f"{part}norm_out", f"{part}conv_norm_out")
        m.copy(f"{part}conv_out", f"{part}conv_out")
    m.copy("quant_conv", "quant_conv")
    m.copy("post_quant_conv", "post_quant_conv")
    m.copy("quantize.embedding", "quantize.embedding", names=("weight",))
    return fill_strict(model, m, f.describe())


def expected_alphas_cumprod(f: LDMFlags) -> torch.Tensor:
    betas = torch.linspace(f.linear_start ** 0.5, f.linear_end ** 0.5, f.timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def convert(src: str | Path, out: str | Path, f: LDMFlags, trust_pickle: bool = False) -> Path:
    from safetensors.torch import save_file

    unet_sd, vq_sd, cond_sd, buffers = split_checkpoint(load_state_dict(src, "LDM cin256-v2", trust_pickle))
    if "alphas_cumprod" in buffers:
        err = float((buffers["alphas_cumprod"].double() - expected_alphas_cumprod(f)).abs().max())
        if err > 1e-5:
            raise ValueError(f"the checkpoint's alphas_cumprod differs from sqrt-linear {f.linear_start}..{f.linear_end} "
                             f"by {err:.2e}: pass the right --linear-start/--linear-end")
    emb = cond_sd.get("embedding.weight")
    if emb is None or set(cond_sd) != {"embedding.weight"}:
        raise ValueError(f"expected exactly '{COND}embedding.weight' (ClassEmbedder), found {sorted(cond_sd)}")
    if tuple(emb.shape) != (f.n_classes, f.context_dim):
        raise ValueError(f"class embedder is {tuple(emb.shape)}, flags say ({f.n_classes}, {f.context_dim})")
    scale = float(buffers["scale_factor"]) if "scale_factor" in buffers else 1.0
    out = Path(out)
    convert_unet(unet_sd, f).save_pretrained(out / "unet")
    convert_vq(vq_sd, f, scale).save_pretrained(out / "vqvae")
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": emb.float().contiguous()}, str(out / "class_embedding.safetensors"))
    write_scheduler(out, "scaled_linear", f.linear_start, f.linear_end, f.timesteps)
    write_sidecar(out, source="ldm", checkpoint=str(src), flags=dataclasses.asdict(f), num_classes=f.n_classes - 1,
                  null_class=f.n_classes - 1, scale_factor=scale)
    return out
