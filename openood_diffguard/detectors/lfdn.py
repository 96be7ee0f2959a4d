"""LFDN / DLSR: diffusion in the classifier's feature space (DLSR, NeurIPS 2024; code xbyym/DLSR).

z0 = normalised pooled multi-layer features of the classifier under test; noise to timestep t of a T = 100
sqrt-linear schedule (t = 3 by default, as the released code), denoise with the x0-parameterised LFDN and
compare the reconstruction with z0:

- ``mse``   : squared error (sum over dimensions; ``variant: paper`` the mean: rank-equal)
- ``mfsim`` : mean over layers of cos(z0_l, z0_hat_l) (layer 1 skipped as in the code unless ``mfsim_layer1``)
- ``lr``    : mse_first - mse_final, the first-epoch model's error minus the final model's.

Confidence is higher = ID: -mse, +mean cos, ``lr_sign`` * LR.

``variant`` picks whose pipeline runs (the deviations table in docs/deviations/lfdn.md has every item):

- ``code``  the released code: per-sample per-layer z-score with unbiased std + 1e-5 (``CustomGroupNorm``);
  its sampler (noise to level t, t - 1 eta = 1 DDIM steps that use the noise level one step below the model's
  time input, output = the still-noisy state at alpha_bar[0]; the code's last call is an exact identity and
  is skipped); LR ranked higher = OOD (``lr_sign`` -1) with independent noise for the two models.
- ``paper`` the paper's text: per-sample per-layer (f - mean) / sqrt(Var + 1e-5); DDIM from t with one random
  stride s in {1..t+1} down to the clean level, output z0_hat; eta = 1 (its Eq. 3 keeps sigma); MSE = mean;
  MFsim over all layers; higher LR = ID; independent noise for the two models.
- ``ours``  per-dimension standardisation fitted on ID train data; deterministic DDIM (eta 0), stride 1 to the
  clean level; the same noise for both models of LR (common random numbers: lower variance); higher LR = ID.

Noise (every variant): the released code draws fresh noise per sample and call, so its score depends on the
batch and the run. Here a sample's noise never depends on its batch: ``noise: shared`` (default) draws, per
timestep, one forward-noise vector and one vector per stochastic step from ``seed``, used by every sample
(common random numbers); ``noise: per_sample`` gives each sample its own draw, keyed by a hash of its 8-bit
image content (statistically the code's independent draws; DiffNB's keyed generator). Either way a sample's
score is the same at any batch size, shard, cache resume or routed subset, to float rounding.

The LFDN checkpoint records the feature normalisation it was trained on and the classifier it belongs to: a
variant with another normalisation or another classifier is refused with an error, never silently scored.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..diffusion import DDIM, FunctionAdapter, NoiseSchedule
from ..diffusion.models import COMPUTE_DTYPES
from ..diffusion.noise import content_key, keyed_normal
from ..features import DEFAULT_LAYERS, layer_normalize, pooled_features
from ..guidance import model_eps
from ..space import ImageSpace
from .base import Detector, Param, ParameterError, check_images, check_range

SCORES = ("mse", "mfsim", "lr")

#: what each variant runs; ``eta``, ``mfsim_layer1`` and ``lr_sign`` can be overridden by the parameters
VARIANTS: dict[str, dict[str, Any]] = {
    "code": {"feature_norm": "layer_code", "sampler": "code", "eta": 1.0, "mse": "sum", "mfsim_layer1": False,
             "lr_sign": -1.0, "lr_shared_noise": False},
    "paper": {"feature_norm": "layer_paper", "sampler": "paper", "eta": 1.0, "mse": "mean", "mfsim_layer1": True,
              "lr_sign": 1.0, "lr_shared_noise": False},
    "ours": {"feature_norm": "standardize", "sampler": "ddim", "eta": 0.0, "mse": "sum", "mfsim_layer1": False,
             "lr_sign": 1.0, "lr_shared_noise": True},
}


def _derived_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple (seed, timestep, stream): independent streams without a shared generator."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class LFDN(Detector):
    """LFDN / DLSR (NeurIPS 2024, https://arxiv.org/abs/2411.10701; code https://github.com/xbyym/DLSR)."""

    name = "lfdn"
    PARAMS = {
        "variant": Param("code", "code | paper | ours (see the module docstring)", choices=tuple(VARIANTS)),
        "checkpoint": Param(None, "LFDN checkpoint (train-lfdn); null = train in setup() from the ID train loader",
                            types=(str, os.PathLike)),
        "layers": Param(list(DEFAULT_LAYERS["resnet18"]), "1-based feature-list indices; ResNet50: [1, 2, 3]"),
        "timesteps": Param([3], "start timestep(s), 0-based indices of the T = 100 schedule (code: 3)",
                           types=(list, tuple, int)),
        "eta": Param(None, "stochastic DDIM term; null = the variant's (code / paper 1, ours 0)", types=(float, int),
                     low=0),
        "seed": Param(0, "noise seed", low=0),
        "noise": Param("shared", "shared: one noise draw used by every sample; per_sample: a draw per sample keyed "
                                 "by its 8-bit image content (as the code's independent draws); both batch-free",
                       choices=("shared", "per_sample")),
        "dtype": Param(None, "null | bf16 | fp16: autocast the LFDN network (GPU); scheduler maths stays fp32",
                       choices=tuple(COMPUTE_DTYPES)),
        "score": Param("mfsim", "mse | mfsim | lr", choices=tuple(SCORES), cheap=True),
        "mfsim_layer1": Param(None, "include layer 1 in MFsim; null = the variant's (code / ours skip it)",
                              types=(bool,), cheap=True),
        "lr_sign": Param(None, "+1: higher LR = ID, -1: higher LR = OOD; null = the variant's (code -1)",
                         types=(float, int), choices=(1, -1), cheap=True),
        "normalization": Param("cifar10", "OpenOOD normalization_type of the incoming images (input range check)",
                               nullable=True),
        "train": Param({}, "options for on-the-fly training (training.lfdn.TRAIN_DEFAULTS / CODE_TRAIN)"),
        "cache_dir": Param("~/.cache/openood_diffguard/lfdn", "where on-the-fly checkpoints are cached",
                           types=(str, os.PathLike)),
    }
    heavy_attributes = ("final", "first", "standardizer")
    #: parameters whose change makes the loaded LFDN stale
    _model_identity = ("checkpoint", "layers", "variant", "train", "cache_dir")

    def validate_params(self) -> None:
        p = self.params
        if isinstance(p["timesteps"], int):
            p["timesteps"] = [p["timesteps"]]
        ts = p["timesteps"]
        if not ts or any(isinstance(t, bool) or not isinstance(t, int) for t in ts) or len(set(ts)) != len(ts):
            raise ParameterError(f"LFDN: parameter 'timesteps' must be a non-empty list of distinct integers, got {ts!r}")
        low = 1 if VARIANTS[p["variant"]]["sampler"] == "code" else 0  # the code's sampler needs t >= 1
        for t in ts:
            check_range(self, "timesteps", t, low, 99)
        layers = p["layers"]
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in layers) \
                or len(set(layers)) != len(layers):
            raise ParameterError(f"LFDN: parameter 'layers' must be distinct 1-based feature-list indices, got {layers!r}")
        from ..training.lfdn import check_train_options

        check_train_options(p["train"], owner="LFDN: parameter 'train'")

    # ------------------------------------------------------------------ variant
    def option(self, name: str) -> Any:
        """The effective value of a variant-driven option (a parameter set to non-null overrides the variant)."""
        value = self.params.get(name)
        return VARIANTS[self.params["variant"]][name] if value is None else value

    @property
    def feature_norm(self) -> str:
        return VARIANTS[self.params["variant"]]["feature_norm"]

    # ------------------------------------------------------------------ models
    def _on_expensive_change(self, changed: set[str]) -> None:
        if changed & set(self._model_identity):
            self.final = self.first = self.standardizer = None

    def setup(self, net, id_loaders=None, ood_loaders=None) -> None:
        net.eval()
        if self.final is None:
            if self.params["checkpoint"]:
                self.load(self.params["checkpoint"])
            else:
                self._fit_or_load_cached(net, id_loaders)
        self._check_classifier(net)

    def _fit_or_load_cached(self, net, id_loaders) -> None:
        from ..runtime.cache import module_fingerprint
        from ..training.lfdn import FORMAT, fit_lfdn, loader_identity, save_checkpoint, train_config

        if not id_loaders or "train" not in id_loaders:
            raise ValueError("LFDN has no checkpoint: setup() needs the ID train loader (id_loader_dict['train']) "
                             "to train it, or set postprocessor_args.checkpoint")
        loader = id_loaders["train"]
        cfg = train_config(self.params["train"], self.params["variant"])
        # everything the trained model depends on: classifier weights, training data (files + transform, or
        # content), layers, feature normalisation, training options and the checkpoint format
        ident = {"format": FORMAT, "classifier": module_fingerprint(net), "data": loader_identity(loader),
                 "layers": [int(i) for i in self.params["layers"]], "feature_norm": self.feature_norm, "train": cfg}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
        cached = Path(self.params["cache_dir"]).expanduser() / f"lfdn_{key}.pt"
        if not cached.is_file():
            ckpt = fit_lfdn(net, loader, self.params["layers"], cfg, feature_norm=self.feature_norm)
            ckpt["train_data"] = ident["data"]
            save_checkpoint(ckpt, cached)
        self.load(cached)

    def load(self, path) -> None:
        from ..training.lfdn import load_checkpoint

        ck = load_checkpoint(path)
        if list(ck["layers"]) != [int(i) for i in self.params["layers"]]:
            raise ValueError(f"LFDN checkpoint {path} was trained on layers {ck['layers']} but the detector uses "
                             f"{self.params['layers']}: set postprocessor_args.layers accordingly")
        if ck["feature_norm"] != self.feature_norm:
            fits = [v for v, o in VARIANTS.items() if o["feature_norm"] == ck["feature_norm"]]
            raise ValueError(f"LFDN checkpoint {path} was trained on {ck['feature_norm']!r} features but variant "
                             f"{self.params['variant']!r} feeds {self.feature_norm!r} features: use variant {fits} "
                             f"with it, or train one for this variant (train-lfdn --variant "
                             f"{self.params['variant']})")
        schedule = NoiseSchedule.from_config(ck["schedule"])
        if max(self.params["timesteps"]) >= schedule.num_train_timesteps:
            raise ValueError(f"timesteps {self.params['timesteps']} beyond the checkpoint's schedule "
                             f"(T = {schedule.num_train_timesteps})")
        self.final, self.first, self.standardizer = ck["final"], ck["first"], ck["standardizer"]
        self._schedule, self._widths = schedule, list(ck["widths"])
        self._classifier_hash, self._checked_nets = ck["classifier_hash"], {}
        self._loaded_from = str(path)

    def set_models(self, final: torch.nn.Module, first: torch.nn.Module | None = None, *, widths: list[int],
                   standardizer=None, schedule: NoiseSchedule | None = None, classifier: torch.nn.Module | None = None
                   ) -> "LFDN":
        """Score with LFDN networks built in Python (benchmarks, parity checks) instead of a checkpoint.
        ``standardizer`` is needed by (only) ``variant: ours``; ``classifier``: the net whose features they were
        trained on (checked like a checkpoint's), None = not checked; ``schedule``: default T = 100 sqrt-linear."""
        from ..networks import lfdn_schedule

        if (self.feature_norm == "standardize") != (standardizer is not None):
            raise ValueError(f"variant {self.params['variant']!r} ({self.feature_norm} features) "
                             f"{'needs' if self.feature_norm == 'standardize' else 'takes no'} standardizer")
        from ..runtime.cache import module_fingerprint

        self.final, self.first, self.standardizer = final.eval(), None if first is None else first.eval(), standardizer
        self._schedule, self._widths = schedule or lfdn_schedule(), [int(w) for w in widths]
        self._classifier_hash = None if classifier is None else module_fingerprint(classifier)
        self._checked_nets, self._loaded_from = {}, "<set_models>"
        return self

    def _ensure_models(self) -> None:
        if self.final is None and self.params["checkpoint"]:
            self.load(self.params["checkpoint"])
        if self.final is None:
            raise RuntimeError("LFDN is not set up: call setup(net, id_loader_dict) or set a checkpoint")

    def _check_classifier(self, net) -> None:
        """Refuse a checkpoint trained on another classifier's features (checked once per classifier object)."""
        expected = getattr(self, "_classifier_hash", None)
        checked = self.__dict__.setdefault("_checked_nets", {})
        if expected is None or checked.get(id(net)) is net:
            return
        from ..runtime.cache import module_fingerprint
        from ..training.lfdn import LEGACY_HASH, legacy_classifier_hash

        legacy = expected.startswith(LEGACY_HASH)  # a checkpoint written before the one weights fingerprint
        found = LEGACY_HASH + legacy_classifier_hash(net) if legacy else module_fingerprint(net)
        if found != expected:
            raise ValueError(f"the LFDN checkpoint {getattr(self, '_loaded_from', '')} was trained on the features "
                             f"of another classifier (weights hash {expected}, this one {found}): train an LFDN for "
                             "this classifier (train-lfdn, or leave checkpoint empty to train in setup())")
        checked[id(net)] = net

    def fingerprint(self) -> dict[str, Any]:
        """Content hash of the models in use (final, first-epoch, standardiser, schedule), computed once per
        load: the score cache follows the weights, not the checkpoint path."""
        if self.final is None and self.params["checkpoint"]:
            self._ensure_models()
        if self.final is None:
            return {"weights": None}
        from ..runtime.cache import module_fingerprint

        models = (self.final, self.first, self.standardizer)
        memo = self.__dict__.get("_fingerprint_memo")
        if memo is None or any(a is not b for a, b in zip(memo[0], models)):
            h = hashlib.sha256()
            h.update(module_fingerprint(self.final).encode())
            h.update(module_fingerprint(self.first).encode() if self.first is not None else b"-")
            if self.standardizer is not None:
                for v in self.standardizer.state_dict().values():
                    h.update(v.detach().cpu().contiguous().numpy().tobytes())
            h.update(self._schedule.alphas_cumprod.numpy().tobytes())
            memo = (models, h.hexdigest()[:16])
            self._fingerprint_memo = memo
        return {"weights": memo[1]}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for k in ("_fingerprint_memo", "_checked_nets"):  # hold models / classifiers; rebuilt after setup()
            state.pop(k, None)
        return state

    # ------------------------------------------------------------------ noise
    def noise(self, t: int, dim: int, stream: str = "final", keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The noise of timestep ``t``: ``q`` for the forward noising, ``steps`` for the stochastic DDIM steps
        (row i = the step leaving path index i) and, for the paper's sampler, ``stride`` (always shared). Without
        ``keys``: common random numbers, ``q`` [dim] and ``steps`` [n, dim] shared by every sample. With ``keys``
        ([B, 2], one per sample: ``sample_keys``): a different draw per sample, a function of (seed, key),
        ``q`` [B, dim] and ``steps`` [n, B, dim]. ``stream`` "first" is the first-epoch model's independent draw
        (code / paper LR)."""
        base = _derived_seed(int(self.params["seed"]), int(t), stream)
        gen = torch.Generator().manual_seed(base)
        n = int(t) + 2  # one per path index, enough for every sampler
        out = {"q": torch.randn(dim, generator=gen)}
        if VARIANTS[self.params["variant"]]["sampler"] == "paper":
            out["stride"] = torch.randint(1, int(t) + 2, (1,), generator=gen)
        out["steps"] = torch.randn(n, dim, generator=gen)
        if keys is not None:
            z = keyed_normal(keys, (n + 1, dim), seed=base)
            out["q"], out["steps"] = z[:, 0], z[:, 1:].transpose(0, 1)
        return out

    def sample_keys(self, images: torch.Tensor) -> torch.Tensor | None:
        """Per-sample noise keys (``noise: per_sample``): a hash of each image's 8-bit content
        (``diffusion.noise.content_key``), so a sample's noise is the same in any batch; None = shared noise."""
        if self.params["noise"] != "per_sample":
            return None
        return content_key(ImageSpace.for_dataset(self.params["normalization"]).to_unit(images))

    # ------------------------------------------------------------------ denoising
    def _path(self, t: int, noise: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
        """(levels, start index, time shift) of the variant's sampler for start timestep t; stop index 0."""
        sampler = VARIANTS[self.params["variant"]]["sampler"]
        if sampler == "code":
            # the released DDIMSampler (ldm/models/diffusion/ddim.py): the model is told k = t, ..., 1 but the
            # step moves alpha_bar[k - 1] -> alpha_bar[k - 2] (alpha_bar[0] at the end); its last call (k = 1:
            # alpha_bar[0] -> alpha_bar[0], sigma 0) returns its input and is skipped here
            return torch.arange(t), t - 1, 1
        if sampler == "paper":
            s = int(noise["stride"])
            grid = sorted(range(t, -1, -s))
            return self._schedule.levels(grid), len(grid), 0
        return self._schedule.levels(torch.arange(t + 1)), t + 1, 0

    def _denoise(self, model: torch.nn.Module, z_t: torch.Tensor, t: int, noise: Mapping[str, torch.Tensor]) -> torch.Tensor:
        sched = self._schedule
        adapter = FunctionAdapter(lambda x, tt, y: model(x, tt), sched)
        adapter.autocast_dtype = COMPUTE_DTYPES[self.params["dtype"]]  # outputs return in fp32 (DiffusionModel.predict)
        levels, start, shift = self._path(t, noise)
        base = model_eps(adapter)
        eps_fn = base if not shift else (lambda x, tt, c: base(x, tt + shift, c))
        steps = noise["steps"].to(z_t.device)

        def step_noise(i: int, ids: torch.Tensor) -> torch.Tensor:  # [n, D]: shared rows; [n, B, D]: per sample
            return steps[i].expand(len(ids), -1) if steps.ndim == 2 else steps[i].index_select(0, ids)

        return DDIM(sched).sample(eps_fn, z_t, levels, start=start, stop=0, eta=float(self.option("eta")),
                                  noise_fn=step_noise)

    # ------------------------------------------------------------------ scoring
    def features(self, net, images) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(logits, z0 = the variant's normalised features, layer widths) of a normalised image batch."""
        logits, f, widths = pooled_features(net, images, self.params["layers"])
        if widths != self._widths:
            raise ValueError(f"classifier layer widths {widths} differ from the LFDN checkpoint's {self._widths}: "
                             "the checkpoint belongs to another classifier")
        return logits, self._normalise(f, widths), widths

    def _normalise(self, f: torch.Tensor, widths: list[int]) -> torch.Tensor:
        return self.standardizer(f) if self.feature_norm == "standardize" else layer_normalize(f, widths, self.feature_norm)

    @torch.no_grad()
    def statistics(self, net, images, labels=None) -> dict[str, torch.Tensor]:
        check_images(images, "LFDN")
        try:  # NaN / inf / [0, 255] images are refused before anything is computed or cached
            ImageSpace.for_dataset(self.params["normalization"]).validate(images)
        except ValueError as err:
            raise ValueError(f"LFDN: {err} (parameter 'normalization' = {self.params['normalization']!r})") from None
        self._ensure_models()
        self._check_classifier(net)
        logits, z0, widths = self.features(net, images)
        return {"pred": logits.argmax(1), **self._feature_statistics(z0, widths, self.sample_keys(images))}

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor, noise_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Confidence (higher = ID) of precomputed pooled features [B, D] (``features.pooled_features(net, x,
        layers)[1]``, the classifier's raw features before normalisation), as pytorch-ood's ``predict_features``:
        equal to ``predict(net, x)[1]``. With ``noise: per_sample`` the noise is keyed by the images, so pass
        ``noise_keys = self.sample_keys(x)`` (the images' keys; they can be stored instead of the images)."""
        self._ensure_models()
        if not torch.is_tensor(features) or features.ndim != 2 or features.shape[1] != sum(self._widths):
            raise ValueError(f"LFDN.predict_features: features must be pooled features [B, {sum(self._widths)}] "
                             f"(layers {self.params['layers']}, widths {self._widths}), got "
                             f"{tuple(features.shape) if torch.is_tensor(features) else type(features).__name__}")
        if not torch.isfinite(features).all():
            raise ValueError("LFDN.predict_features: features contain NaN/inf")
        if self.params["noise"] == "per_sample" and noise_keys is None:
            raise ValueError("LFDN.predict_features: parameter 'noise' is per_sample, whose noise is keyed by the "
                             "images: pass noise_keys=detector.sample_keys(images) (or use noise: shared)")
        if noise_keys is not None and (noise_keys.ndim != 2 or len(noise_keys) != len(features)):
            raise ValueError(f"LFDN.predict_features: noise_keys must be [B, 2] per-sample keys for {len(features)} "
                             f"features, got shape {tuple(noise_keys.shape)}")
        z0 = self._normalise(features.float(), self._widths)
        return self.confidence(self._feature_statistics(z0, self._widths, noise_keys))

    def _feature_statistics(self, z0: torch.Tensor, widths: list[int], keys: torch.Tensor | None
                            ) -> dict[str, torch.Tensor]:
        """Per-sample reconstruction errors / layer cosines of normalised features ``z0`` (noise keyed by ``keys``)."""
        D = z0.shape[1]
        bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
        mean_mse = self.option("mse") == "mean"
        models = {"": self.final.to(z0.device)}
        if self.first is not None:
            models["first_"] = self.first.to(z0.device)
        stats = {}
        for t in (int(t) for t in self.params["timesteps"]):
            for prefix, model in models.items():
                shared = prefix == "" or self.option("lr_shared_noise")
                noise = self.noise(t, D, "final" if shared else "first", keys)
                z_t = self._schedule.add_noise(z0, noise["q"].to(z0).expand_as(z0), torch.full((len(z0),), t))
                z_hat = self._denoise(model, z_t, t, noise)
                err = (z_hat - z0) ** 2
                stats[f"{prefix}mse_t{t}"] = err.mean(1) if mean_mse else err.sum(1)
                if prefix:
                    continue
                for li, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
                    stats[f"cos_l{li}_t{t}"] = F.cosine_similarity(z_hat[:, a:b], z0[:, a:b], dim=1)
        return stats

    def confidence(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ts = [int(t) for t in self.params["timesteps"]]
        score = self.params["score"]
        per_t = []
        for t in ts:
            if score == "mse":
                per_t.append(-stats[f"mse_t{t}"])
            elif score == "mfsim":
                keys = sorted((k for k in stats if k.startswith("cos_l") and k.endswith(f"_t{t}")),
                              key=lambda k: int(k[5:].split("_")[0]))
                if not self.option("mfsim_layer1") and len(keys) > 1:
                    keys = [k for k in keys if not k.startswith("cos_l1_")]
                per_t.append(torch.stack([stats[k] for k in keys]).mean(0))
            else:
                if f"first_mse_t{t}" not in stats:
                    raise ValueError("score 'lr' needs the first-epoch model: the checkpoint has none")
                per_t.append(float(self.option("lr_sign")) * (stats[f"first_mse_t{t}"] - stats[f"mse_t{t}"]))
        return torch.stack(per_t).mean(0)
