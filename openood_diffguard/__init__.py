"""openood-diffguard: diffusion-based OOD detectors (DiffGuard, DiffNB, LFDN) for OpenOOD.

Flow of every detector, mirrored by the sub-packages:
image (classifier-normalised) -> ``space`` (un-normalise, resize) -> ``diffusion`` (invert, synthesise)
-> ``guidance`` (classifier / classifier-free, Grad-CAM masks) -> ``similarity`` (compare)
-> ``detectors`` (score) -> ``fusion`` / ``openood`` (combine, plug into OpenOOD).
Apart from the flow: ``runtime`` (cache, sharding, batching, devices, registry) and ``cli`` (entry points).

Importing the package is cheap (no torch): sub-packages import what they need.
"""
from .runtime.compat import install_import_hook

install_import_hook()  # repairs a CPU-torch / CUDA-torchvision mismatch when torchvision is first imported

__version__ = "0.1.0"  # the only place the version is written (setup.cfg reads it)
