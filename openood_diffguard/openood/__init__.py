"""OpenOOD v1.5 integration: postprocessors, registration, launcher.

OpenOOD is optional and heavy (its package init imports faiss, libmr, imgaug, ...): nothing here imports
it until a postprocessor class is requested or ``register()`` is called, and then a missing OpenOOD gives
an ImportError that names the install command.
"""
from __future__ import annotations

from typing import Any

#: the commit the integration is tested against (OpenOOD v1.5 has no release tags)
OPENOOD_COMMIT = "3c35632ee91b54b09d1f085d04f94744cece7d0b"
#: the same three steps as the README's "Install" section (OpenOOD is not on PyPI and its setup.py names
#: faiss-gpu, which has no wheels: its dependencies come from our ``openood`` extra, then it is installed --no-deps)
INSTALL_STEPS = (
    'pip install "openood-diffguard[openood]"',
    "pip install --no-build-isolation libmr",
    f'pip install --no-deps "openood @ git+https://github.com/Jingkang50/OpenOOD@{OPENOOD_COMMIT}"',
)
INSTALL_HINT = "OpenOOD is not installed (it is not on PyPI); install it with: " + " && ".join(INSTALL_STEPS)


def require_openood() -> Any:
    """Import and return the ``openood`` package, or raise ImportError with the install command."""
    try:
        import openood
        import openood.postprocessors  # noqa: F401  (the part we subclass; fails on missing faiss/libmr)
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} (import failed: {err})") from err
    return openood


_LAZY = {
    "DetectorPostprocessor": "postprocessors", "DiffGuardPostprocessor": "postprocessors",
    "DiffGuardGDMPostprocessor": "postprocessors", "DiffGuardCFGPostprocessor": "postprocessors",
    "DiffNBPostprocessor": "postprocessors", "LFDNPostprocessor": "postprocessors",
    "FusionPostprocessor": "postprocessors", "register": "registration", "build_postprocessor": "registration",
    "postprocessor_config": "registration", "register_benchmark": "benchmarks", "registered": "registration",
    "unregister": "registration", "OpenOODBindingError": "registration",
}

__all__ = ["INSTALL_HINT", "INSTALL_STEPS", "OPENOOD_COMMIT", "require_openood", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
