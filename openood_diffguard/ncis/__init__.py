"""NCIS (Doorenbos et al., "Non-linear Class-wise Invariant Sampling"): outliers synthesised in a diffusion
model's conditioning-embedding space, used to train the classifier with an energy regulariser; the test
score is the energy (OpenOOD ``ebo``).

Stages (each reusable on its own, ``openood-diffguard ncis <stage>`` on the command line):
``learn_embeddings`` (embed) -> ``num_invariants`` + ``fit_cvpn`` (fit) -> ``ClassGaussians`` boundary
samples mapped back with the cVPN inverse (sample) -> ``generate_outliers`` (generate) ->
``train_with_outliers`` or OpenOOD's ``train_oe`` pipeline with trainer ``ncis`` (train).
"""
from __future__ import annotations

import importlib
from typing import Any

# name -> submodule; loaded on first use, so the command line (ncis/cli.py) imports no torch for --help
_LAZY = {
    **dict.fromkeys(("EmbeddingBackend", "PixelUNetBackend", "StableDiffusionBackend", "patched_row", "substitute_rows"),
                    "backends"),
    **dict.fromkeys(("CVPN", "ConditionalCoupling", "Orthogonal", "fit_cvpn", "invariant_mse", "num_invariants"), "cvpn"),
    **dict.fromkeys(("embed_batch", "learn_embeddings"), "embed"),
    **dict.fromkeys(("generate_outliers", "load_outlier_images", "write_openood_files"), "generate"),
    "ClassGaussians": "sampler",
    **dict.fromkeys(("EnergyHead", "energy_regularised_loss", "energy_scores", "ood_transform",
                     "random_interpolation_resize", "train_with_outliers"), "train"),
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
