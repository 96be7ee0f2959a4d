"""Similarities in the classifier's output/feature space (higher = more similar), per sample.

DiffGuard's CIFAR-10 setting (Table 5) scores -||logits(x) - logits(x_syn)||_1 on raw logits; the
official code's ``logits`` distance is the same sum. Cosine and feature-space variants are offered for
analysis. ``ClassifierEmbedding`` computes logits + pooled features once per image so the fixed input is
never re-encoded.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..features import classifier_outputs


def logits_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -(a.float() - b.float()).abs().sum(1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


def negative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -(a.float() - b.float()).flatten(1).norm(dim=1)


#: name -> (which embedding, similarity function)
EMBEDDING_SIMILARITIES: dict[str, tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "logits_l1": ("logits", logits_l1),
    "logits_cos": ("logits", cosine),
    "feature_l2": ("feature", negative_l2),
    "feature_cos": ("feature", cosine),
}


def classifier_embedding(net: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{'logits': [B, C], 'feature': [B, D] or absent} for OpenOOD nets (``return_feature=True``) or
    plain classifiers (logits only); one forward through ``features.classifier_outputs``."""
    out = classifier_outputs(net, x, "optional")
    return {"logits": out.logits} if out.feature is None else {"logits": out.logits, "feature": out.feature}


def embedding_similarities(ref: dict[str, torch.Tensor], syn: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """Similarity per requested name between two ``classifier_embedding`` outputs."""
    out = {}
    for name in names:
        if name not in EMBEDDING_SIMILARITIES:
            raise ValueError(f"unknown embedding similarity {name!r}; expected one of {sorted(EMBEDDING_SIMILARITIES)}")
        key, fn = EMBEDDING_SIMILARITIES[name]
        if key not in ref:
            raise ValueError(f"{name} needs pooled features: the classifier must accept return_feature=True (OpenOOD nets do)")
        out[name] = fn(ref[key], syn[key])
    return out
