"""Import-time compatibility fixes for broken-but-common environments.

PyPI's Linux torchvision wheels are linked against CUDA torch. Installed next to a CPU-only torch
(e.g. ``torch==2.13.0+cpu``) their C extension cannot load, and torchvision's own meta registrations
then fail with ``operator torchvision::nms does not exist``, so *nothing* of torchvision imports
(models, transforms, datasets), and with it neither piq nor OpenOOD. We only need torchvision's
Python parts, so we declare the two op schemas it registers fakes for and import again.
The C ops (nms, roi_align, ...) stay unavailable, which this package never uses.

``import openood_diffguard`` must stay cheap (the command line answers ``--help`` without torch), so the
repair is not done eagerly: :func:`install_import_hook` puts a finder on ``sys.meta_path`` that wraps the
loader of the first ``import torchvision`` (by anyone, after this package was imported) with the repair.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys

_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _is_op_mismatch(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and "torchvision::" in str(err)


def _define_schemas() -> None:
    import torch

    for op, schema in _SCHEMAS.items():
        try:
            torch.library.define(f"torchvision::{op}", schema)
        except RuntimeError:  # already defined
            pass
    logging.getLogger("openood_diffguard").info(
        "torchvision's C extension does not match this torch build (CPU torch with a CUDA torchvision wheel?): "
        "its detection ops are unavailable; models and transforms work.")


def _drop_submodules() -> None:
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> None:
    """Import torchvision now, repairing the CPU-torch/CUDA-torchvision mismatch if needed."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if not _is_op_mismatch(err):
            raise
    _drop_submodules()
    sys.modules.pop("torchvision", None)
    _define_schemas()
    import torchvision  # noqa: F401,F811


class _RepairingLoader(importlib.abc.Loader):
    """torchvision's own loader; on the op-schema failure: declare the schemas and execute it again."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self.loader.exec_module(module)
        except RuntimeError as err:
            if not _is_op_mismatch(err):
                raise
            _drop_submodules()  # half-imported submodules would keep the failed state
            _define_schemas()
            self.loader.exec_module(module)
        finally:  # the module keeps torchvision's real loader (resources, reload)
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
        uninstall_import_hook()  # imported: later imports are torchvision's business


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision" or "torchvision" in sys.modules:
            return None
        # stays installed until the import succeeds: importlib.util.find_spec probes (diffusers, transformers)
        # ask finders without importing
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RepairingLoader(spec.loader)
        return spec


_HOOK = _TorchvisionHook()


def install_import_hook() -> None:
    """Repair torchvision when it is first imported (nothing happens if it is already imported)."""
    if "torchvision" not in sys.modules and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_import_hook() -> None:
    while _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
