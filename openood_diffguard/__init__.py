"""openood-diffguard: diffusion-based OOD detectors (DiffGuard, DiffNB, LFDN) for OpenOOD.

Flow of every detector, mirrored by the sub-packages:
image (classifier-normalised) -> ``space`` (un-normalise, resize) -> ``diffusion`` (invert, synthesise)
-> ``guidance`` (classifier / classifier-free, Grad-CAM masks) -> ``similarity`` (compare)
-> ``detectors`` (score) -> ``fusion`` / ``openood`` (combine, plug into OpenOOD).
"""
from ._compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"
