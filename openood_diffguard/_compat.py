"""Import-time compatibility fixes for broken-but-common environments.

PyPI's Linux torchvision wheels are linked against CUDA torch. Installed next to a CPU-only torch
(e.g. ``torch==2.13.0+cpu``) their C extension cannot load, and torchvision's own meta registrations
then fail with ``operator torchvision::nms does not exist``, so *nothing* of torchvision imports
(models, transforms, datasets), and with it neither piq nor grad-cam. We only need torchvision's
Python parts, so we declare the two op schemas it registers fakes for and import again.
The C ops (nms, roi_align, ...) stay unavailable, which this package never uses.
"""
from __future__ import annotations

import logging
import sys

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def ensure_torchvision() -> None:
    """Import torchvision, repairing the CPU-torch/CUDA-torchvision mismatch if needed."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    for op, schema in _SCHEMAS.items():
        try:
            torch.library.define(f"torchvision::{op}", schema)
        except RuntimeError:  # already defined
            pass
    import torchvision  # noqa: F401,F811

    logging.getLogger("openood_diffguard").info(
        "torchvision's C extension does not match this torch build (CPU torch with a CUDA torchvision wheel?): "
        "its detection ops are unavailable; models and transforms work.")
