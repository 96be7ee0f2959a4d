"""The detector contract every method implements (pytorch-ood-like: small fit/predict surface).

A detector turns a batch of *classifier-normalised* images into raw per-sample statistics
(``statistics``, the expensive part: diffusion, similarity) and then into a confidence
(``confidence``, cheap: sign, which similarity, thresholds). Higher confidence = more in-distribution,
as in OpenOOD. Keeping the two apart is what lets OpenOOD's APS sweeps and repeated passes re-use cached
statistics (``cheap_params`` are excluded from the cache key).
"""
from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .params import Param, ParameterError, check_choice, check_params, check_range, legacy_schema, plain

__all__ = ["Detector", "DiffusionBackbone", "BACKBONE_PARAMS", "Param", "ParameterError", "check_choice", "check_range",
           "check_images", "check_classifier_output"]


class Detector(ABC):
    #: short name, also the OpenOOD postprocessor name
    name: ClassVar[str] = ""
    #: the schema: every parameter with its default, types, allowed values and doc (``params.Param``);
    #: unknown keys are rejected. ``DEFAULTS`` and ``cheap_params`` are derived from it.
    PARAMS: ClassVar[dict[str, Param]] = {}
    #: parameter -> default (derived from ``PARAMS``)
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: parameters that only change ``confidence`` (re-score cached statistics; derived from ``PARAMS``)
    cheap_params: ClassVar[tuple[str, ...]] = ()
    #: attributes holding heavy models: dropped when pickled, rebuilt lazily by ``setup``/``_ensure_models``
    heavy_attributes: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "PARAMS" not in own and {"DEFAULTS", "PARAM_TYPES", "cheap_params"} & set(own):
            # the older DEFAULTS + PARAM_TYPES + cheap_params declaration (third-party detectors)
            cls.PARAMS = legacy_schema(own.get("DEFAULTS", cls.DEFAULTS), getattr(cls, "PARAM_TYPES", {}),
                                       getattr(cls, "cheap_params", ()), inherited=cls.PARAMS)
        cls.DEFAULTS = {k: p.default for k, p in cls.PARAMS.items()}
        cls.cheap_params = tuple(k for k, p in cls.PARAMS.items() if p.cheap)

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.PARAMS)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown parameter(s) {sorted(unknown)}; "
                            f"allowed: {sorted(self.PARAMS)}")
        self.params: dict[str, Any] = {**{k: copy.deepcopy(v) for k, v in self.DEFAULTS.items()}, **params}
        for k in self.heavy_attributes:
            setattr(self, k, None)
        check_params(type(self).__name__, self.PARAMS, self.params)
        self.validate_params()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **kwargs: Any) -> "Detector":
        """A detector from a parameter mapping (a yml's ``postprocessor_args``, or ``config()`` output);
        ``kwargs`` are constructor arguments that are not parameters (e.g. ``model=``)."""
        return cls(**kwargs, **dict(config))

    def config(self) -> dict[str, Any]:
        """The parameters as plain yml data; ``type(d).from_config(config)`` rebuilds an equal detector."""
        return {k: plain(v) for k, v in self.params.items()}

    # ------------------------------------------------------------------ parameters
    def set_params(self, **params: Any) -> "Detector":
        unknown = set(params) - set(self.PARAMS)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown parameter(s) {sorted(unknown)}")
        expensive = {k for k in params if k not in self.cheap_params and params[k] != self.params.get(k)}
        before = dict(self.params)
        self.params.update(params)
        try:
            check_params(type(self).__name__, self.PARAMS, self.params)
            self.validate_params()
        except Exception:
            self.params = before  # a rejected change leaves the detector as it was
            raise
        if expensive:
            self._on_expensive_change(expensive)
        return self

    def validate_params(self) -> None:
        """Hook: checks that relate several parameters (and normalisation of values); runs after the schema
        check, on construction and every ``set_params``."""

    def _on_expensive_change(self, changed: set[str]) -> None:
        """Hook: drop state derived from changed expensive parameters (default: nothing)."""

    def fingerprint(self) -> dict[str, Any]:
        """Extra identity of the models in use (e.g. checkpoint hashes); part of the cache key."""
        return {}

    def cache_key(self) -> str:
        """Hash of everything that determines ``statistics``: name, expensive params, model fingerprints."""
        expensive = {k: v for k, v in sorted(self.params.items()) if k not in self.cheap_params}
        blob = json.dumps({"name": self.name, "params": expensive, "models": self.fingerprint()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ scoring
    @property
    def needs_labels(self) -> bool:
        """True when ``statistics`` must see the test labels (analysis modes such as DiffGuard's oracle
        labels); loaders then pass ``batch['label']`` instead of None."""
        return False

    def setup(self, net: torch.nn.Module, id_loaders: Mapping[str, Iterable] | None = None,
              ood_loaders: Mapping[str, Iterable] | None = None) -> None:
        """Load models / fit statistics on ID data. Called once; must be idempotent."""

    @abstractmethod
    def statistics(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Raw per-sample statistics (leading dim B) for a normalised batch; must include ``pred``."""

    @abstractmethod
    def confidence(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[B] confidence from ``statistics`` output, higher = more ID. Uses cheap parameters only."""

    def predict(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.statistics(net, images, labels)
        return stats["pred"], self.confidence(stats)

    def statistics_loader(self, net: torch.nn.Module, loader: Iterable, progress: bool = True,
                          device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Statistics over a loader yielding OpenOOD batch dicts (``data``, ``label``) or (x, y) tuples."""
        chunks: dict[str, list[torch.Tensor]] = {}
        labels: list[torch.Tensor] = []
        device = device or next(net.parameters()).device
        for batch in tqdm(loader, disable=not progress, desc=f"{self.name} scoring"):
            x, y = (batch["data"], batch["label"]) if isinstance(batch, Mapping) else (batch[0], batch[1])
            stats = self.statistics(net, x.to(device), torch.as_tensor(y).to(device) if self.needs_labels else None)
            for k, v in stats.items():
                chunks.setdefault(k, []).append(v.detach().cpu())
            labels.append(torch.as_tensor(y).cpu())
        out = {k: torch.cat(v) for k, v in chunks.items()}
        out["label"] = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ pickling (OpenOOD pickles postprocessors)
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in self.heavy_attributes:
            state[k] = None
        return state

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


class DiffusionBackbone:
    """Mixin for detectors that run a diffusion model ``self.model`` loaded from ``model_path`` (or passed
    in by the user): the precision and compilation of its backbone are parameters like any other.

    Subclasses add ``BACKBONE_PARAMS`` to their ``PARAMS`` (next to their own ``dtype``), implement
    ``_load`` and call ``_ensure_models`` before scoring.
    """

    #: True when the model was passed in by the user (never reloaded from model_path)
    _user_model: bool = False
    #: parameters whose change makes a loaded model stale
    _model_identity: tuple[str, ...] = ("model_path",)

    def __init__(self, model: Any = None, **params: Any) -> None:
        super().__init__(**params)
        self.model = model  # a DiffusionModel adapter, or None = load from model_path in setup()
        self._user_model = model is not None

    #: what to tell a user who set no model_path
    _missing_model: str = "set model_path to a local diffusers model directory (weights are never downloaded)"

    def _load(self, path: str) -> Any:
        """The detector's loader for ``model_path`` (a DiffusionModel adapter)."""
        raise NotImplementedError

    def _check_model(self) -> None:
        """Hook: detector-specific requirements on the loaded model."""

    def _ensure_models(self) -> Any:
        """Load the model once (unless the user passed one), then apply dtype / cast / compile (idempotent)."""
        if self.model is None:
            path = self.params["model_path"]
            if path is None:
                raise ValueError(f"{type(self).__name__} needs a diffusion model: {self._missing_model}")
            self.model = self._load(path)
        self._weights_fingerprint()  # before any cast: the identity of the weights as loaded
        self.model.configure(self.params["dtype"], self.params["cast_weights"], self.params["compile"])
        self._check_model()
        return self.model

    def _weights_fingerprint(self) -> str:
        """Content hash of the diffusion model's weights, computed once per loaded (or passed-in) model: the
        cache key follows the weights, not the path (retraining into the same folder gives a new key)."""
        from ..runtime.cache import module_fingerprint

        memo = getattr(self, "_fingerprint_memo", None)
        if memo is None or memo[0] is not self.model:
            memo = (self.model, module_fingerprint(self.model))
            self._fingerprint_memo = memo
        return memo[1]

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_fingerprint_memo", None)  # holds the model; recomputed after the lazy reload
        return state

    def fingerprint(self) -> dict[str, Any]:
        if self.model is None and self.params.get("model_path") is None:
            return {"weights": None}
        if self.model is None:
            self._ensure_models()
        return {"weights": self._weights_fingerprint(), "adapter": type(self.model).__name__}

    def _on_expensive_change(self, changed: set[str]) -> None:
        if self._user_model or self.model is None:
            return
        # a new checkpoint, or leaving a low-precision weight cast (the fp32 weights must be reloaded)
        uncast = bool(changed & {"dtype", "cast_weights"}) and self.model.weights_dtype is not None
        if changed & set(self._model_identity) or uncast:
            self.model = None


#: precision / compilation parameters of the diffusion backbone (see ``DiffusionModel.configure``)
BACKBONE_PARAMS: dict[str, Param] = {
    "cast_weights": Param(False, "false: autocast fp32 weights to dtype; true: store the backbone in dtype "
                                 "(faster on GPU)"),
    "compile": Param(False, "torch.compile the backbone: false | true | {mode: ..., backend: ..., dynamic: ...}",
                     types=(bool, dict)),
}


def check_classifier_output(logits: torch.Tensor, num_classes: int | None) -> None:
    """Clear errors for a classifier whose output does not match the detector's class count."""
    if logits.ndim != 2:
        raise ValueError(f"classifier must return logits [B, C], got shape {tuple(logits.shape)}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"classifier has {logits.shape[1]} classes but the diffusion model / config expects "
                         f"{num_classes}; use the checkpoint and config of the same dataset")
    if not torch.isfinite(logits).all():
        raise ValueError("classifier returned NaN/inf logits")


# ---------------------------------------------------------------------------------------- validation
def check_images(images: Any, owner: str = "detector") -> None:
    """The same first check in every detector: a non-empty, finite, floating [B, C, H, W] tensor.
    (The value range is checked against the normalisation by ``ImageSpace.validate``.)"""
    if not torch.is_tensor(images) or images.ndim != 4:
        raise ValueError(f"{owner}: expected a batch of images [B, C, H, W], got "
                         f"{tuple(images.shape) if torch.is_tensor(images) else type(images).__name__}")
    if images.shape[0] == 0:
        raise ValueError(f"{owner}: empty batch (0 images): nothing to score")
    if not images.is_floating_point():
        raise ValueError(f"{owner}: images must be a floating-point tensor (normalised as the classifier expects), "
                         f"got {images.dtype}")
    finite = torch.isfinite(images.detach()).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"{owner}: images contain NaN/inf at batch positions {bad[:10]}"
                         f"{' ...' if len(bad) > 10 else ''}")
