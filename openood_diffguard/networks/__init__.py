"""Networks trained by this package (the LFDN feature denoiser)."""
from .lfdn import LFDNet, lfdn_schedule

__all__ = ["LFDNet", "lfdn_schedule"]
