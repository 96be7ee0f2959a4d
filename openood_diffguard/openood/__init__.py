"""OpenOOD v1.5 integration: postprocessors, registration, launcher.

OpenOOD is optional and heavy (its package init imports faiss, libmr, imgaug, ...): nothing here imports
it until a postprocessor class is requested or ``register()`` is called, and then a missing OpenOOD gives
an ImportError that names the install command.
"""
from __future__ import annotations

from typing import Any

INSTALL_HINT = (
    "OpenOOD is not installed (it is not on PyPI). Install it from git, e.g.\n"
    "  pip install \"numpy<2\" statsmodels timm foolbox faiss-cpu Cython wheel && "
    "pip install --no-build-isolation libmr\n"
    "  pip install git+https://github.com/Jingkang50/OpenOOD\n"
    "(see README, section 'Using it inside OpenOOD')."
)


def require_openood() -> Any:
    """Import and return the ``openood`` package, or raise ImportError with the install command."""
    try:
        import openood
        import openood.postprocessors  # noqa: F401  (the part we subclass; fails on missing faiss/libmr)
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT}\nUnderlying error: {err}") from err
    return openood


_LAZY = {
    "DetectorPostprocessor": "postprocessors", "DiffGuardPostprocessor": "postprocessors",
    "DiffNBPostprocessor": "postprocessors", "LFDNPostprocessor": "postprocessors",
    "FusionPostprocessor": "postprocessors", "register": "registration", "build_postprocessor": "registration",
    "postprocessor_config": "registration",
}

__all__ = ["INSTALL_HINT", "require_openood", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
