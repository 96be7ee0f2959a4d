"""DiffNB: diffusion neighbourhoods (seed 002; methods.md §2).

Noise the input to timestep t (R independent draws), denoise it back with DDIM under classifier-free
guidance toward the classifier's predicted label, and measure how far the classifier's L2-normalised
logits (or a clipped feature) of these "neighbours" move from those of the input. ID images come back
close to themselves; OOD images are pulled toward the predicted class and move far.

Batching: all R draws and all timesteps of a batch form ONE model batch of B*R*len(timesteps) samples;
the timesteps differ only by their per-sample start index on a shared DDIM grid (the core's
``DDIM.sample`` with a per-sample ``start``), so no Python loop runs over samples, repeats or timesteps.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..batching import map_chunks
from ..diffusion import DDIM, load_unet, noise_to_level
from ..diffusion.models import COMPUTE_DTYPES
from ..guidance import ClassifierFreeGuidance
from ..space import ImageSpace, resolve_normalization
from .base import BACKBONE_PARAMS, Detector, DiffusionBackbone, check_classifier_output

#: the official code's hard-coded timestep set (runner/ood_detect.py:99, reference index 0 dropped).
CODE_TIMESTEPS = (120, 240, 360)


def _embed(net: torch.nn.Module, x: torch.Tensor, space: str, clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, L2-normalised representation) of normalised images: logits, or the pooled penultimate
    feature clipped at ``clip`` (paper's ImageNet "feature5" with threshold 0.3, ReAct-style)."""
    if space == "logits":
        logits = net(x)
        rep = logits
    else:
        logits, rep = net(x, return_feature=True)
        rep = rep.flatten(1)
        if clip is not None:
            rep = rep.clamp(max=clip)
    rep = rep.float()
    return logits, rep / (rep.norm(dim=1, keepdim=True) + 1e-10)  # the code's u = v / (||v|| + 1e-10)


class DiffNB(DiffusionBackbone, Detector):
    name = "diffnb"
    DEFAULTS: dict[str, Any] = {
        "model_path": None,       # local diffusers UNet2DModel dir (train-diffusion output); never downloaded
        "timesteps": [300],       # paper's CIFAR t; [120, 240, 360] = official code's fixed set
        "repeats": 4,             # R independent noise draws
        "cfg_scale": 3.0,         # omega (code: (1 + beta) eps_y - beta eps_null with beta = 2)
        "stride": 20,             # DDIM stride (code: --sample_step 50 with T = 1000)
        "grid": "code",           # code: t -> t - stride -> ... -> 0, the model told t - 1 (15 steps for t = 300);
                                  # exact: ... -> 0 -> clean, the model told t (16 steps)
        "space": "logits",        # "logits" | "feature" (pooled penultimate, clipped)
        "feature_clip": 0.3,      # clip threshold for space="feature" (paper Fig. 12); None = no clip
        "normalization": "cifar10",  # OpenOOD normalization_type of the incoming batches
        "diffusion_size": None,   # side of the diffusion model's input (None = model's sample_size)
        "seed": 0,                # noise seed: R draws, the same for every sample and batch
        "dtype": None,            # None | "bf16" | "fp16": UNet precision (scheduler maths stays fp32)
        **BACKBONE_PARAMS,
        "aggregate": "mean",      # how per-timestep distances combine into the score: mean | max
        "max_model_batch": 1024,  # samples per DDIM pass (x2 inside CFG; halved automatically on out-of-memory);
                                  # results do not depend on it
    }
    cheap_params = ("aggregate", "max_model_batch")  # neither changes the statistics
    heavy_attributes = ("model",)
    PARAM_TYPES = {**DiffusionBackbone.PARAM_TYPES, "timesteps": (list, tuple, int), "feature_clip": (float, type(None)),
                   "diffusion_size": (int,), "model_path": (str, os.PathLike), "dtype": (str,),
                   "normalization": (str, type(None))}

    def validate_params(self) -> None:
        p = self.params
        ts = p["timesteps"]
        if isinstance(ts, int):
            p["timesteps"] = ts = [ts]
        if not ts or any(int(t) <= 0 or int(t) % int(p["stride"]) for t in ts):
            raise ValueError(f"timesteps must be positive multiples of stride={p['stride']} (they start on the "
                             f"DDIM grid), got {ts}")
        if p["space"] not in ("logits", "feature"):
            raise ValueError(f"space must be 'logits' or 'feature', got {p['space']!r}")
        if int(p["repeats"]) < 1:
            raise ValueError("repeats must be >= 1")
        if p["aggregate"] not in ("mean", "max"):
            raise ValueError("aggregate must be 'mean' or 'max'")
        if p["grid"] not in ("code", "exact"):
            raise ValueError(f"grid must be 'code' or 'exact', got {p['grid']!r}")
        if p["dtype"] not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(k for k in COMPUTE_DTYPES if k)} or null, got {p['dtype']!r}")
        self._check_backbone_params()

    # ------------------------------------------------------------------ models
    def setup(self, net, id_loaders=None, ood_loaders=None) -> None:
        self._ensure_models()

    _missing_model = ("set postprocessor_args.model_path to a local class-conditional diffusers UNet2DModel "
                      "directory (train one with `openood-diffguard train-diffusion`)")

    def _load(self, path: str):
        return load_unet(path)

    def image_space(self, images: torch.Tensor) -> ImageSpace:
        mean, std = resolve_normalization(self.params["normalization"])
        size = self.params["diffusion_size"] or getattr(self.model, "sample_size", None)
        codec = getattr(self.model, "codec", None)  # latent models: encode / decode through their VAE
        return ImageSpace(mean, std, diffusion_size=size if codec is None else self.params["diffusion_size"],
                          classifier_size=images.shape[-1], codec=codec)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def statistics(self, net, images, labels=None) -> dict[str, torch.Tensor]:
        self._ensure_models()
        model, p = self.model, self.params
        if model.null_class is None or model.num_classes is None:
            raise ValueError("DiffNB needs a class-conditional model with a null class (num_class_embeds = C + 1)")
        space = self.image_space(images)
        space.validate(images)
        logits, ref = _embed(net, images, p["space"], p["feature_clip"])
        check_classifier_output(logits, model.num_classes)
        pred = logits.argmax(1)

        B, R, ts = images.shape[0], int(p["repeats"]), [int(t) for t in p["timesteps"]]
        sched = model.schedule
        grid = torch.arange(0, sched.num_train_timesteps, int(p["stride"]))
        levels = sched.levels(grid)  # CLEAN, 0, stride, 2 stride, ...
        if max(ts) > int(grid[-1]):
            raise ValueError(f"timestep {max(ts)} beyond the model's schedule (T={sched.num_train_timesteps})")
        x0 = space.to_diffusion(images)
        gen = torch.Generator().manual_seed(int(p["seed"]))
        # R noise images shared by every sample (common random numbers) and by all timesteps (as the code):
        # a sample's score never depends on its batch or position in it, so cached scores stay consistent
        noise = torch.randn((R, 1, *x0.shape[1:]), generator=gen).to(x0.device).expand(R, *x0.shape)
        n_t = len(ts)
        x0_rep = x0.unsqueeze(0).expand(n_t * R, *x0.shape).reshape(-1, *x0.shape[1:])
        noise_rep = noise.unsqueeze(0).expand(n_t, *noise.shape).reshape(-1, *x0.shape[1:])
        t_per = torch.tensor(ts, device=x0.device).repeat_interleave(R * B)
        x_t = noise_to_level(sched, x0_rep, t_per, noise=noise_rep)
        start = t_per // int(p["stride"]) + 1  # index of t on the path (index 0 = CLEAN)
        cond = {"y": pred.repeat(n_t * R)}
        cfg, ddim, step = ClassifierFreeGuidance(model, float(p["cfg_scale"])), DDIM(sched), int(p["max_model_batch"])
        stop = 0
        if p["grid"] == "code":
            # the released code (runner/schedule.py, method.py tran_ddim) moves between the alpha_bar levels
            # t, t - stride, ..., 0 but feeds the model t - 1, and stops at level 0 (not the clean level)
            guided, stop = cfg, 1
            cfg = lambda x, t, c: guided(x, t - 1, c)  # noqa: E731
        # noise is drawn for the whole batch first, so chunking never changes a sample's result
        x_rec = torch.cat(map_chunks(lambda i, j: ddim.sample(cfg, x_t[i:j], levels, start=start[i:j], stop=stop,
                                                              cond={"y": cond["y"][i:j]}), len(x_t), step))
        nb_in = space.to_classifier(space.decode(x_rec).float()).to(images.dtype)
        _, nb = _embed(net, nb_in, p["space"], p["feature_clip"])
        dist = (nb.view(n_t, R, B, -1) - ref.view(1, 1, B, -1)).abs().sum(-1).mean(1)  # [T, B]
        stats = {"pred": pred}
        for t, d in zip(ts, dist):
            stats[f"dist_t{t}"] = d
        return stats

    def confidence(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        d = torch.stack([stats[k] for k in stats if k.startswith("dist_t")])
        score = d.mean(0) if self.params["aggregate"] == "mean" else d.max(0).values
        return -score  # distance is higher = OOD; OpenOOD wants higher = ID
