"""LFDN / DLSR: diffusion in the classifier's feature space (seed 003; methods.md §3).

z0 = standardised pooled multi-layer features of the classifier under test; noise to timestep t
(T = 100 sqrt-linear schedule, t = 3 by default as the released code), denoise back to the clean level
with the x0-parameterised LFDN, and compare the reconstruction with z0:

- ``mse``   : sum_d (z0 - z0_hat)^2                   (code's sum; rank-equal to the paper's mean)
- ``mfsim`` : mean over layers of cos(z0_l, z0_hat_l)  (layer 1 skipped as in the code; option to keep)
- ``lr``    : mse_first - mse_final, the first-epoch model's error minus the final model's.

Signs (conf higher = ID): conf_mse = -mse; conf_mfsim = +mean cos (the paper's MFsim score is -mean cos,
higher = OOD). LR: reading MSE as a negative log-likelihood, mse_first - mse_final = log p_final - log
p_first, the likelihood ratio of Ren et al.: the final model has learnt what is specific to ID data, the
first-epoch model only generic feature statistics, so ID samples gain more from training -> LR is
higher for ID and conf_lr = +LR. The released code ranks higher LR as OOD (test_LR.py:119); we think
that is a sign slip and keep ``lr_sign`` (cheap, default +1) to reproduce it with -1.

Sampler: the core DDIM loop with stride 1 from t to the clean level. ``eta = 0`` (default) is
deterministic: for fixed seeded noise the score is a deterministic function of the input. ``eta = 1``
is the code's stochastic (DDPM-like) path, also ending at the clean level.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..diffusion import DDIM, FunctionAdapter, NoiseSchedule, noise_to_level
from ..diffusion.models import COMPUTE_DTYPES
from ..features import DEFAULT_LAYERS, pooled_features
from ..guidance import model_eps
from .base import Detector

SCORES = ("mse", "mfsim", "lr")


class LFDN(Detector):
    name = "lfdn"
    DEFAULTS: dict[str, Any] = {
        "checkpoint": None,        # LFDN checkpoint (train-lfdn); None = train in setup() from the ID train loader
        "layers": list(DEFAULT_LAYERS["resnet18"]),  # 1-based feature-list indices; ResNet50: [1, 2, 3]
        "timesteps": [3],          # start timestep(s) of the T = 100 schedule (code: 3; paper: 3-10 best)
        "eta": 0.0,                # 0 = deterministic DDIM (default); 1 = the code's stochastic path
        "seed": 0,                 # noise seed
        "dtype": None,             # None | "bf16" | "fp16": autocast the LFDN network (GPU); scheduler maths stays fp32
        "score": "mfsim",          # mse | mfsim | lr (paper's best: MFsim)
        "mfsim_layer1": False,     # include layer 1 in MFsim (code skips it)
        "lr_sign": 1.0,            # +1: higher LR = ID (maths); -1 reproduces the released code's ranking
        "train": {},               # options for on-the-fly training (training.lfdn.TRAIN_DEFAULTS)
        "cache_dir": "~/.cache/openood_diffguard/lfdn",  # where on-the-fly checkpoints are cached
    }
    cheap_params = ("score", "mfsim_layer1", "lr_sign")
    heavy_attributes = ("final", "first", "standardizer")
    PARAM_TYPES = {"timesteps": (list, tuple, int), "checkpoint": (str, os.PathLike), "dtype": (str,),
                   "cache_dir": (str, os.PathLike)}

    def validate_params(self) -> None:
        p = self.params
        if p["score"] not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {p['score']!r}")
        if isinstance(p["timesteps"], int):
            p["timesteps"] = [p["timesteps"]]
        if not p["timesteps"] or any(not 0 <= int(t) < 100 for t in p["timesteps"]):
            raise ValueError(f"timesteps must lie in [0, 99] (T = 100), got {p['timesteps']}")
        if float(p["eta"]) < 0:
            raise ValueError("eta must be >= 0")
        if p["dtype"] not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(k for k in COMPUTE_DTYPES if k)} or null, got {p['dtype']!r}")

    # ------------------------------------------------------------------ models
    def setup(self, net, id_loaders=None, ood_loaders=None) -> None:
        if self.final is not None:
            return
        net.eval()
        if self.params["checkpoint"]:
            self.load(self.params["checkpoint"])
            return
        from ..training.lfdn import classifier_hash, fit_lfdn, save_checkpoint

        key = hashlib.sha256(repr((classifier_hash(net), list(self.params["layers"]),
                                   sorted(self.params["train"].items()))).encode()).hexdigest()[:16]
        cached = Path(self.params["cache_dir"]).expanduser() / f"lfdn_{key}.pt"
        if cached.is_file():
            self.load(cached)
            return
        if not id_loaders or "train" not in id_loaders:
            raise ValueError("LFDN has no checkpoint: setup() needs the ID train loader (id_loader_dict['train']) "
                             "to train it, or set postprocessor_args.checkpoint")
        ckpt = fit_lfdn(net, id_loaders["train"], self.params["layers"], self.params["train"])
        save_checkpoint(ckpt, cached)
        self.load(cached)

    def load(self, path) -> None:
        from ..training.lfdn import load_checkpoint

        ck = load_checkpoint(path)
        if list(ck["layers"]) != [int(i) for i in self.params["layers"]]:
            raise ValueError(f"LFDN checkpoint {path} was trained on layers {ck['layers']} but the detector uses "
                             f"{self.params['layers']}: set postprocessor_args.layers accordingly")
        self.final, self.first, self.standardizer = ck["final"], ck["first"], ck["standardizer"]
        self._schedule = NoiseSchedule.from_config(ck["schedule"])
        self._loaded_from = str(path)

    def fingerprint(self) -> dict[str, Any]:
        return {"lfdn": getattr(self, "_loaded_from", None)}

    # ------------------------------------------------------------------ denoising
    def _denoise(self, model: torch.nn.Module, z_t: torch.Tensor, t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """z_t at per-sample timesteps t -> z0_hat at the clean level, stride 1 (the core DDIM loop;
        eta > 0 = the code's stochastic steps, noise from ``gen``)."""
        sched = self._schedule
        adapter = FunctionAdapter(lambda x, tt, y: model(x, tt), sched)
        adapter.autocast_dtype = COMPUTE_DTYPES[self.params["dtype"]]  # outputs return in fp32 (DiffusionModel.predict)
        levels = sched.levels(torch.arange(int(t.max()) + 1))  # CLEAN, 0, 1, ..., t_max
        return DDIM(sched).sample(model_eps(adapter), z_t, levels, start=t + 1, stop=0,
                                  eta=float(self.params["eta"]), generator=gen)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def statistics(self, net, images, labels=None) -> dict[str, torch.Tensor]:
        if self.final is None:
            raise RuntimeError("LFDN is not set up: call setup(net, id_loader_dict) or set a checkpoint")
        logits, f, widths = pooled_features(net, images, self.params["layers"])
        if widths != self.standardizer.widths:
            raise ValueError(f"classifier layer widths {widths} differ from the LFDN checkpoint's "
                             f"{self.standardizer.widths}: the checkpoint belongs to another classifier")
        z0 = self.standardizer(f)
        ts = [int(t) for t in self.params["timesteps"]]
        B, n_t = z0.shape[0], len(ts)
        gen = torch.Generator().manual_seed(int(self.params["seed"]))
        z0_rep = z0.repeat(n_t, 1)
        t_per = torch.tensor(ts, device=z0.device).repeat_interleave(B)
        noise = torch.randn(z0_rep.shape, generator=gen).to(z0.device)
        z_t = noise_to_level(self._schedule, z0_rep, t_per, noise=noise)
        models = {"": self.final.to(z0.device)}
        if self.first is not None:
            models["first_"] = self.first.to(z0.device)
        stats = {"pred": logits.argmax(1)}
        bounds = torch.tensor([0, *widths]).cumsum(0).tolist()
        for prefix, model in models.items():
            z_hat = self._denoise(model, z_t, t_per, torch.Generator().manual_seed(int(self.params["seed"]) + 1))
            mse = ((z_hat - z0_rep) ** 2).sum(1).view(n_t, B)
            for t, m in zip(ts, mse):
                stats[f"{prefix}mse_t{t}"] = m
            if prefix:
                continue
            for li, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
                cos = F.cosine_similarity(z_hat[:, a:b], z0_rep[:, a:b], dim=1).view(n_t, B)
                for t, c in zip(ts, cos):
                    stats[f"cos_l{li}_t{t}"] = c
        return stats

    def confidence(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        ts = [int(t) for t in self.params["timesteps"]]
        score = self.params["score"]
        per_t = []
        for t in ts:
            if score == "mse":
                per_t.append(-stats[f"mse_t{t}"])
            elif score == "mfsim":
                keys = sorted(k for k in stats if k.startswith("cos_l") and k.endswith(f"_t{t}"))
                if not self.params["mfsim_layer1"] and len(keys) > 1:
                    keys = [k for k in keys if not k.startswith("cos_l1_")]
                per_t.append(torch.stack([stats[k] for k in keys]).mean(0))
            else:
                if f"first_mse_t{t}" not in stats:
                    raise ValueError("score 'lr' needs the first-epoch model: the checkpoint has none")
                per_t.append(float(self.params["lr_sign"]) * (stats[f"first_mse_t{t}"] - stats[f"mse_t{t}"]))
        return torch.stack(per_t).mean(0)
