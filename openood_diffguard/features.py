"""Multi-layer features of an OpenOOD classifier, for feature-space detectors (LFDN).

OpenOOD nets return ``(logits, [f1..f5])`` for ``net(x, return_feature_list=True)``: f1..f4 are the
stage outputs (maps), f5 the pooled penultimate feature. Each selected layer is globally average-pooled
to a vector and the vectors are concatenated: ResNet18 stages 1-4 -> 64+128+256+512 = 960-d; ResNet50
stages 1-3 -> 256+512+1024 = 1792-d (the DLSR paper's App. C.2 setting).

Two ways to put the layers on one scale before diffusion (``FEATURE_NORMS``):

- ``standardize``: z-score every dimension with its mean / std over the ID training data
  (``FeatureStandardizer``, stored in the LFDN checkpoint);
- ``layer_code`` / ``layer_paper``: z-score every layer of every sample over its own channels (no fitted
  statistics), as the released DLSR code (``CustomGroupNorm``: unbiased std + 1e-5) and its paper
  ((f - mean) / sqrt(Var + 1e-5), biased variance) do (``layer_normalize``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm

#: default layers (1-based indices into the feature list) per architecture family
DEFAULT_LAYERS = {"resnet18": (1, 2, 3, 4), "resnet50": (1, 2, 3)}


class ClassifierOutputs(NamedTuple):
    """One classifier forward: logits [B, C], the pooled penultimate feature [B, D] (None when not asked for
    or, with ``feature="optional"``, not offered by the net) and OpenOOD's feature list (``feature="list"``)."""

    logits: torch.Tensor
    feature: torch.Tensor | None = None
    maps: list[torch.Tensor] | None = None


#: what ``classifier_outputs`` asks the net for
FEATURE_MODES = ("none", "penultimate", "optional", "list")


def classifier_outputs(net: torch.nn.Module, x: torch.Tensor, feature: str = "none",
                       owner: str = "this detector") -> ClassifierOutputs:
    """The one forward of an OpenOOD-style classifier every detector and baseline goes through.

    ``feature``: ``"none"`` -> ``net(x)`` (any classifier); ``"penultimate"`` -> ``net(x, return_feature=True)``
    (OpenOOD nets; an error naming ``owner`` otherwise); ``"optional"`` -> the same, falling back to
    ``net(x)`` for plain classifiers (``feature`` None); ``"list"`` -> ``net(x, return_feature_list=True)``.
    The feature is flattened to [B, D]; nothing else is changed (dtype, device), so results are the net's own.
    """
    if feature not in FEATURE_MODES:
        raise ValueError(f"feature must be one of {FEATURE_MODES}, got {feature!r}")
    if feature == "none":
        return ClassifierOutputs(net(x))
    if feature == "list":
        out = net(x, return_feature_list=True)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (list, tuple))):
            raise TypeError("the classifier must follow OpenOOD's interface: net(x, return_feature_list=True) -> "
                            "(logits, [f1, ..., f5])")
        return ClassifierOutputs(out[0], None, list(out[1]))
    try:
        out = net(x, return_feature=True)
    except TypeError as err:
        if feature == "optional":  # a plain classifier: logits only
            return ClassifierOutputs(net(x))
        raise TypeError(f"{type(net).__name__} does not accept return_feature=True; {owner} needs an OpenOOD-style "
                        f"net (net(x, return_feature=True) -> (logits, features))") from err
    if feature == "optional" and torch.is_tensor(out):  # a net that swallows the keyword: logits only
        return ClassifierOutputs(out)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("net(x, return_feature=True) must return (logits, features) (OpenOOD's interface)")
    return ClassifierOutputs(out[0], out[1].flatten(1))


def pooled_features(net: torch.nn.Module, images: torch.Tensor, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(logits, concatenated pooled features [B, D], per-layer widths) for 1-based ``layers``."""
    logits, _, feats = classifier_outputs(net, images, "list")
    if max(layers) > len(feats) or min(layers) < 1:
        raise ValueError(f"layers {list(layers)} out of range: the net returns {len(feats)} feature maps")
    vecs = [feats[i - 1].float().flatten(2).mean(2) if feats[i - 1].ndim > 2 else feats[i - 1].float()
            for i in layers]
    return logits, torch.cat(vecs, 1), [v.shape[1] for v in vecs]


#: feature normalisations an LFDN can be trained on (see the module docstring)
FEATURE_NORMS = ("standardize", "layer_code", "layer_paper")


def layer_normalize(f: torch.Tensor, widths: Sequence[int], kind: str, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample, per-layer z-score of concatenated features [B, sum(widths)] (one pass per layer, not per sample).

    ``layer_code``: (g - mean) / (std + eps) with the unbiased std (DLSR code, ``ldm/util.py`` CustomGroupNorm);
    ``layer_paper``: (g - mean) / sqrt(Var + eps) with the biased variance (DLSR paper, Sec. 3.1)."""
    if kind not in ("layer_code", "layer_paper"):
        raise ValueError(f"kind must be 'layer_code' or 'layer_paper', got {kind!r}")
    if f.ndim != 2 or f.shape[1] != sum(widths):
        raise ValueError(f"features {tuple(f.shape)} do not split into layers of widths {list(widths)}")
    if min(widths) < 2:
        raise ValueError(f"per-layer normalisation needs layers of >= 2 channels, got widths {list(widths)}")
    out = []
    for g in f.split(list(widths), dim=1):
        mean = g.mean(1, keepdim=True)
        if kind == "layer_code":
            out.append((g - mean) / (g.std(1, keepdim=True) + eps))
        else:
            out.append((g - mean) / (g.var(1, unbiased=False, keepdim=True) + eps).sqrt())
    return torch.cat(out, 1)


@dataclass
class FeatureStandardizer:
    """Per-dimension z-scoring of concatenated layer features; ``widths`` records the layer split."""

    mean: torch.Tensor
    std: torch.Tensor
    widths: list[int]

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        if f.shape[1] != self.mean.numel():
            raise ValueError(f"features are {f.shape[1]}-d but the standardiser was fitted on "
                             f"{self.mean.numel()}-d features (different classifier or layers?)")
        return (f - self.mean.to(f.device)) / self.std.to(f.device)

    @classmethod
    def fit(cls, feats: torch.Tensor, widths: list[int], eps: float = 1e-5) -> "FeatureStandardizer":
        return cls(feats.mean(0), feats.std(0) + eps, list(widths))

    def state_dict(self) -> dict:
        return {"mean": self.mean.cpu(), "std": self.std.cpu(), "widths": torch.tensor(self.widths)}

    @classmethod
    def from_state_dict(cls, sd: Mapping) -> "FeatureStandardizer":
        return cls(sd["mean"], sd["std"], [int(w) for w in sd["widths"]])


@torch.no_grad()
def extract_features(net: torch.nn.Module, loader: Iterable, layers: Sequence[int], device=None,
                     progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Pooled features over a loader of OpenOOD batch dicts or (x, y) tuples; returns ([N, D] on CPU, widths)."""
    device = device or next(net.parameters()).device
    chunks, widths = [], None
    for batch in tqdm(loader, disable=not progress, desc="features"):
        x = batch["data"] if isinstance(batch, Mapping) else batch[0]
        _, f, widths = pooled_features(net, x.to(device), layers)
        chunks.append(f.cpu())
    if not chunks:
        raise ValueError("the loader is empty: no ID training data to fit features on")
    return torch.cat(chunks), widths
