"""Name -> "module:Class" tables, resolved lazily (importing a detector pulls in diffusers, piq, ...).

``DETECTORS``: our detectors (each follows ``detectors/base.py``). ``POSTPROCESSORS``: the OpenOOD
postprocessor classes registered under our names (OpenOOD itself is imported only when one is resolved).
"""
from __future__ import annotations

import importlib
from typing import Any

DETECTORS: dict[str, str] = {
    "diffguard": "openood_diffguard.detectors.diffguard:DiffGuard",  # builds one of the two below (``guidance``)
    "diffguard_gdm": "openood_diffguard.detectors.diffguard_gdm:DiffGuardGDM",
    "diffguard_cfg": "openood_diffguard.detectors.diffguard_cfg:DiffGuardCFG",
    "diffnb": "openood_diffguard.detectors.diffnb:DiffNB",
    "lfdn": "openood_diffguard.detectors.lfdn:LFDN",
}

_PP = "openood_diffguard.openood.postprocessors"
POSTPROCESSORS: dict[str, str] = {
    "diffguard": f"{_PP}:DiffGuardPostprocessor",
    "diffguard_gdm": f"{_PP}:DiffGuardGDMPostprocessor",
    "diffguard_cfg": f"{_PP}:DiffGuardCFGPostprocessor",
    "diffnb": f"{_PP}:DiffNBPostprocessor",
    "lfdn": f"{_PP}:LFDNPostprocessor",
    "detector": f"{_PP}:DetectorPostprocessor",  # any DETECTORS entry via postprocessor_args.detector
    "fusion": f"{_PP}:FusionPostprocessor",  # ours + one of OpenOOD's ebo / knn / vim / mls
    "diffguard_fusion": f"{_PP}:FusionPostprocessor",  # postprocessor.name of the fusion_*.yml presets
}


def load(target: str) -> Any:
    """Import ``"package.module:Attr"``."""
    module, _, attr = target.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'module:Attr', got {target!r}")
    return getattr(importlib.import_module(module), attr)


def register_detector(name: str, target: str | type, overwrite: bool = False) -> None:
    """Add a detector (a Detector subclass or its "module:Class" path) under ``name``."""
    if name in DETECTORS and not overwrite and DETECTORS[name] != target:
        raise KeyError(f"detector {name!r} is already registered as {DETECTORS[name]!r}; pass overwrite=True")
    DETECTORS[name] = target  # type: ignore[assignment]


def detector_class(name: str) -> type:
    """Registered name, or a "module:Class" path (a user's own Detector subclass, no registration needed)."""
    if name not in DETECTORS and ":" in str(name):
        return load(name)
    if name not in DETECTORS:
        raise KeyError(f"unknown detector {name!r}; registered: {sorted(DETECTORS)}")
    target = DETECTORS[name]
    if not isinstance(target, str):
        return target
    try:
        return load(target)
    except ImportError as err:
        raise ImportError(f"detector {name!r} ({target}) could not be imported: {err}") from err


def build_detector(name: str, **params: Any):
    """A detector instance from its registered name and parameters."""
    return detector_class(name)(**params)
