"""Diffusion core: schedules, model adapters and the single DDIM loop (invert / synthesise)."""
from .ddim import DDIM, InversionResult, noise_to_level
from .models import (CrossAttnUNetAdapter, DiffusionModel, DiTAdapter, FunctionAdapter, LatentCodec,
                     UNetAdapter, load_dit, load_ldm, load_unet)
from .schedule import CLEAN, NoiseSchedule

__all__ = ["DDIM", "InversionResult", "noise_to_level", "DiffusionModel", "UNetAdapter", "CrossAttnUNetAdapter",
           "DiTAdapter", "FunctionAdapter", "LatentCodec", "load_unet", "load_dit", "load_ldm", "NoiseSchedule", "CLEAN"]
