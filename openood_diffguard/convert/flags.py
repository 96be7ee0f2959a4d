"""Architecture flags of the original checkpoints (plain dataclasses, no torch: the ``convert`` command's
options and defaults are built from them without importing the converters)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class FlagsMixin:
    """For the architecture-flag dataclasses: one-line description used in error messages."""

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


_DEFAULT_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


@dataclass
class ADMFlags(FlagsMixin):
    """guided-diffusion ``create_model`` flags (names as in its ``script_util``)."""

    image_size: int = 256
    num_channels: int = 256
    num_res_blocks: int = 2
    channel_mult: tuple = ()
    attention_resolutions: tuple = (32, 16, 8)
    num_heads: int = 4
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    learn_sigma: bool = True
    class_cond: bool = False
    num_classes: int = 1000
    use_new_attention_order: bool = False
    noise_schedule: str = "linear"
    in_channels: int = 3

    def resolved_mult(self) -> tuple:
        if self.channel_mult:
            return tuple(self.channel_mult)
        if self.image_size not in _DEFAULT_MULT:
            raise ValueError(f"no default channel_mult for image_size {self.image_size}: pass --channel-mult")
        return _DEFAULT_MULT[self.image_size]


#: the released checkpoints (README of openai/guided-diffusion), keyed by file stem
PRESETS: dict[str, ADMFlags] = {
    "256x256_diffusion": ADMFlags(class_cond=True),
    "256x256_diffusion_uncond": ADMFlags(class_cond=False),
    "128x128_diffusion": ADMFlags(image_size=128, num_head_channels=-1, num_heads=4, class_cond=True),
    "64x64_diffusion": ADMFlags(image_size=64, num_channels=192, num_res_blocks=3, class_cond=True,
                                use_new_attention_order=True, noise_schedule="cosine"),
}


@dataclass
class LDMFlags(FlagsMixin):
    """``configs/latent-diffusion/cin256-v2.yaml`` (unet_config, first_stage_config, cond_stage_config)."""

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 192
    attention_resolutions: tuple = (8, 4, 2)
    num_res_blocks: int = 2
    channel_mult: tuple = (1, 2, 3, 5)
    num_heads: int = 1
    num_head_channels: int = -1
    transformer_depth: int = 1
    context_dim: int = 512
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    n_classes: int = 1001
    linear_start: float = 0.0015
    linear_end: float = 0.0195
    timesteps: int = 1000
    vq_embed_dim: int = 3
    vq_n_embed: int = 8192
    vq_z_channels: int = 3
    vq_ch: int = 128
    vq_ch_mult: tuple = (1, 2, 4)
    vq_num_res_blocks: int = 2
    vq_resolution: int = 256
    vq_attn_resolutions: tuple = ()


@dataclass
class DiffNBFlags(FlagsMixin):
    """``Model`` section of DiffOOD's ``config/ddim_cifar10_cond.yml``."""

    image_size: int = 32
    num_classes: int = 10
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    in_channels: int = 3
    out_ch: int = 3

    @classmethod
    def from_original(cls, cfg: dict) -> "DiffNBFlags":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items() if k in names})
