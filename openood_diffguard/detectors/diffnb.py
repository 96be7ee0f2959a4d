"""DiffNB: diffusion neighbourhoods (Liu et al., "Diffusion Denoising Process for Perceptron Bias in
Out-of-distribution Detection", arXiv 2211.11255; released code luping-liu/DiffOOD).

Noise the input to timestep t (R draws), denoise it back with DDIM under classifier-free guidance toward
the classifier's predicted label, and measure how far the classifier's logits (or a clipped feature) of
these "neighbours" move from a reference. ID images come back close to themselves; OOD images are pulled
toward the predicted class and move far.

``variant`` picks how faithful the pipeline is, aspect by aspect (each aspect parameter left null takes the
variant's value; set it to override; docs/deviations/diffnb.md has the full table):

============  =====================  ================  ======================  =====================
variant       timesteps              reference         noise                   representation, grid
============  =====================  ================  ======================  =====================
``code``      [120, 240, 360]        ``noised``        ``per_sample``          L2-normalised, ``code``
``paper``     [300]                  ``clean``         ``per_sample``          raw, ``exact``
``hybrid``    [300]                  ``clean``         ``shared``              L2-normalised, ``code``
============  =====================  ================  ======================  =====================

- ``reference: noised`` is the released code's t = 0 entry (runner/ood_detect.py:99, 182-193): per repeat
  r, sqrt(abar_0) x + sqrt(1 - abar_0) eps_r (abar_0 = 1 - beta_0, noise std 0.01 on the [-1, 1] image)
  is classified as it is, and the neighbours of repeat r are compared with it. ``clean``: the input itself.
- ``noise: per_sample``: each sample gets its own R noise images (as the code's ``randn_like(batch)`` and
  the paper's Alg. 2), keyed by the sample's 8-bit content (``diffusion.noise``), so a score never depends
  on the batch. ``shared``: R noise images drawn once from ``seed`` and used by *every* sample (common
  random numbers; the package default before ``variant`` existed). In both, repeat r uses the same noise
  image at every t (as the code).
- The score of timestep t is S_t = mean_r sum |u_ref - u_t,r| (detect/ood_detect.py:23, 51-52). The code
  reports one AUROC per t; here every S_t is a statistic ``dist_t<t>`` and ``aggregate`` (cheap) makes the
  confidence -mean / -max over t, or -S_t of one t (``aggregate: 120`` or ``"t120"``): per-t metric rows
  re-score the cached statistics. ``DiffNB.confidences(stats)`` gives every t's confidence at once.

Batching: all R draws and all timesteps of a batch form ONE model batch of B*R*len(timesteps) samples;
the timesteps differ only by their per-sample start index on a shared DDIM grid (the core's
``DDIM.sample`` with a per-sample ``start``), so no Python loop runs over samples, repeats or timesteps.
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Mapping

import torch

from ..runtime.batching import map_chunks
from ..diffusion import DDIM, load_unet, noise_to_level
from ..diffusion.models import COMPUTE_DTYPES
from ..diffusion.noise import content_key, keyed_normal
from ..features import classifier_outputs
from ..guidance import ClassifierFreeGuidance
from ..space import ImageSpace, resolve_normalization
from .base import (BACKBONE_PARAMS, Detector, DiffusionBackbone, Param, ParameterError, check_choice,
                   check_classifier_output, check_images)

#: the official code's hard-coded timestep set (runner/ood_detect.py:99, reference index 0 dropped).
CODE_TIMESTEPS = (120, 240, 360)

#: what each ``variant`` means for the aspects where the paper, the released code and this package differ
VARIANTS: dict[str, dict[str, Any]] = {
    # luping-liu/DiffOOD 1c87ba0 as released (runner/ood_detect.py, runner/schedule.py, detect/ood_detect.py)
    "code": {"timesteps": list(CODE_TIMESTEPS), "reference": "noised", "noise": "per_sample", "l2_normalize": True,
             "grid": "code"},
    # the paper's text: Alg. 2-3 (fresh eps per input, denoise to x_0, sum |f(x) - f(x_rec)| of raw logits), t = 300
    "paper": {"timesteps": [300], "reference": "clean", "noise": "per_sample", "l2_normalize": False,
              "grid": "exact"},
    # this package's earlier default: the paper's t and clean reference, the code's sampler and normalisation,
    # noise images shared by all samples
    "hybrid": {"timesteps": [300], "reference": "clean", "noise": "shared", "l2_normalize": True, "grid": "code"},
}
#: parameters that take the variant's value when null
VARIANT_ASPECTS = ("timesteps", "reference", "noise", "l2_normalize", "grid")


def _embed(net: torch.nn.Module, x: torch.Tensor, space: str, clip: float | None,
           l2_normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, representation) of normalised images: logits, or the pooled penultimate feature clipped
    at ``clip`` (paper's ImageNet "feature5" with threshold 0.3, ReAct-style); L2-normalised as the code's
    u = v / (||v|| + 1e-10), or raw (the paper's text)."""
    out = classifier_outputs(net, x, "none" if space == "logits" else "penultimate", owner="DiffNB (space: feature)")
    logits = out.logits
    rep = logits if space == "logits" else out.feature
    if clip is not None and space != "logits":
        rep = rep.clamp(max=clip)
    rep = rep.float()
    return logits, rep / (rep.norm(dim=1, keepdim=True) + 1e-10) if l2_normalize else rep


def timestep_of(selector: Any) -> int | None:
    """The timestep an ``aggregate`` value selects (120 or "t120"), None for "mean" / "max"."""
    if isinstance(selector, numbers.Integral) and not isinstance(selector, bool):
        return int(selector)
    if isinstance(selector, str) and selector not in ("mean", "max"):
        digits = selector[1:] if selector[:1] == "t" else selector
        if digits.isdigit():
            return int(digits)
    return None


class DiffNB(DiffusionBackbone, Detector):
    """DiffNB (Liu et al., https://arxiv.org/abs/2211.11255; code https://github.com/luping-liu/DiffOOD)."""

    name = "diffnb"
    PARAMS = {
        "model_path": Param(None, "local diffusers UNet2DModel dir (train-diffusion output); never downloaded",
                            types=(str, os.PathLike)),
        "variant": Param("code", "code | paper | hybrid: the defaults of the aspects below (module docstring)",
                         choices=tuple(VARIANTS)),
        "timesteps": Param(None, "null = the variant's: code [120, 240, 360], paper / hybrid [300]",
                           types=(list, tuple, int)),
        "reference": Param(None, "null = the variant's: noised (code's t = 0 entry) | clean (the input)",
                           choices=("noised", "clean")),
        "noise": Param(None, "null = the variant's: per_sample (content-keyed) | shared (R images for all)",
                       choices=("per_sample", "shared")),
        "l2_normalize": Param(None, "null = the variant's: true (code) | false (paper: raw logits / features)",
                              types=(bool,)),
        "repeats": Param(4, "R noise draws", low=1),
        "cfg_scale": Param(3.0, "omega (code: (1 + beta) eps_y - beta eps_null with beta = 2)", low=0),
        "stride": Param(20, "DDIM stride (code: --sample_step 50 with T = 1000)", low=1),
        "grid": Param(None, "null = the variant's. code: t -> t - stride -> ... -> 0, the model told t - 1 (15 steps "
                            "for t = 300); exact: ... -> 0 -> clean, the model told t (16 steps)",
                      choices=("code", "exact")),
        "space": Param("logits", "logits | feature (pooled penultimate, clipped)", choices=("logits", "feature")),
        "feature_clip": Param(0.3, "clip threshold for space feature (paper Fig. 12); null = no clip",
                              nullable=True, low=0, low_open=True),
        "normalization": Param("cifar10", "OpenOOD normalization_type of the incoming batches"),
        "diffusion_size": Param(None, "side of the diffusion model's input (null = the model's sample_size)",
                                types=(int,), low=1),
        "seed": Param(0, "noise seed (both noise modes); a sample's noise never depends on its batch",
                      low=0, high=2 ** 63 - 1),
        "dtype": Param(None, "null | bf16 | fp16: UNet precision (scheduler maths stays fp32)",
                       choices=tuple(COMPUTE_DTYPES)),
        **BACKBONE_PARAMS,
        "aggregate": Param("mean", "per-t scores -> confidence: mean | max | one timestep (120 or t120)",
                           types=(str, int), cheap=True),
        "max_model_batch": Param(1024, "samples per DDIM pass (x2 inside CFG; halved automatically on "
                                       "out-of-memory); results do not depend on it", low=1, cheap=True),
    }
    heavy_attributes = ("model",)

    def settings(self) -> dict[str, Any]:
        """The aspects the variant decides, resolved: an explicit parameter wins over the variant's value."""
        p, v = self.params, VARIANTS[self.params["variant"]]
        out = {k: (v[k] if p[k] is None else p[k]) for k in VARIANT_ASPECTS}
        out["timesteps"] = [int(t) for t in ([out["timesteps"]] if isinstance(out["timesteps"], numbers.Integral)
                                             else out["timesteps"])]
        return out

    def validate_params(self) -> None:
        p, me = self.params, type(self).__name__
        ts = p["timesteps"]
        if ts is not None:
            items = [ts] if isinstance(ts, numbers.Integral) else list(ts)
            if not items or any(not isinstance(t, numbers.Integral) or isinstance(t, bool) for t in items):
                raise ParameterError(f"{me}: parameter 'timesteps' must be a non-empty list of integers "
                                     f"(or null = the variant's), got {ts!r}")
            if len(set(items)) != len(items):
                raise ParameterError(f"{me}: parameter 'timesteps' has duplicates: {ts!r}")
        stride, resolved = int(p["stride"]), self.settings()["timesteps"]
        if any(t <= 0 or t % stride for t in resolved):
            raise ParameterError(f"{me}: parameter 'timesteps' must be positive multiples of stride={stride} "
                                 f"(they start on the DDIM grid), got {resolved}")
        agg, t_sel = p["aggregate"], timestep_of(p["aggregate"])
        if t_sel is None:
            check_choice(me, "aggregate", agg, ("mean", "max"))
        elif t_sel not in resolved:
            raise ParameterError(f"{me}: parameter 'aggregate' selects t = {t_sel}, which is not among the "
                                 f"timesteps {resolved}")

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

    def noise(self, images: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[R, B, *shape] noise images (``shape``: one sample in diffusion space) for normalised ``images``."""
        R, B, seed = int(self.params["repeats"]), images.shape[0], int(self.params["seed"])
        if self.settings()["noise"] == "shared":
            # R noise images shared by every sample (common random numbers) and by all timesteps
            gen = torch.Generator().manual_seed(seed)
            return torch.randn((R, 1, *shape), generator=gen).to(images.device).expand(R, B, *shape)
        mean, std = resolve_normalization(self.params["normalization"])
        keys = content_key(ImageSpace(mean, std).to_unit(images))
        return keyed_normal(keys, (R, *shape), seed).transpose(0, 1)

    # ------------------------------------------------------------------ scoring
    #: ``statistics(..., keep_images=True)`` also returns the pictures behind the score (report galleries)
    captures_images = True
    gallery_kinds = {"noised": "input noised to the first timestep, first noise draw",
                     "neighbour": "its denoised neighbour under guidance toward the predicted label"}

    @torch.no_grad()
    def statistics(self, net, images, labels=None, keep_images: bool = False):
        """Per-sample ``pred`` and ``dist_t<t>``; with ``keep_images`` also ``{"noised", "neighbour"}``
        pixels in [-1, 1] of the first timestep's first noise draw: ``(stats, pictures)``. The statistics
        are the same either way (the pictures are slices of tensors the score is computed from)."""
        check_images(images, type(self).__name__)
        ImageSpace(*resolve_normalization(self.params["normalization"])).validate(images)  # before any model work
        self._ensure_models()
        model, p, s = self.model, self.params, self.settings()
        if model.null_class is None or model.num_classes is None:
            raise ValueError("DiffNB needs a class-conditional model with a null class (num_class_embeds = C + 1)")
        space = self.image_space(images)
        embed = lambda x: _embed(net, x, p["space"], p["feature_clip"], s["l2_normalize"])  # noqa: E731
        logits, clean_rep = embed(images)
        check_classifier_output(logits, model.num_classes)
        pred = logits.argmax(1)

        B, R, ts = images.shape[0], int(p["repeats"]), s["timesteps"]
        sched = model.schedule
        grid = torch.arange(0, sched.num_train_timesteps, int(p["stride"]))
        levels = sched.levels(grid)  # CLEAN, 0, stride, 2 stride, ...
        if max(ts) > int(grid[-1]):
            raise ValueError(f"DiffNB: parameter 'timesteps' reaches {max(ts)}, beyond the model's schedule "
                             f"(T={sched.num_train_timesteps}, stride {p['stride']})")
        x0 = space.to_diffusion(images)
        noise = self.noise(images, tuple(x0.shape[1:])).to(x0.device)  # [R, B, ...], the same at every t
        n_t = len(ts)
        x0_rep = x0.unsqueeze(0).expand(n_t * R, *x0.shape).reshape(-1, *x0.shape[1:])
        noise_rep = noise.unsqueeze(0).expand(n_t, *noise.shape).reshape(-1, *x0.shape[1:])
        t_per = torch.tensor(ts, device=x0.device).repeat_interleave(R * B)
        x_t = noise_to_level(sched, x0_rep, t_per, noise=noise_rep)
        start = t_per // int(p["stride"]) + 1  # index of t on the path (index 0 = CLEAN)
        cond = {"y": pred.repeat(n_t * R)}
        cfg, ddim, step = ClassifierFreeGuidance(model, float(p["cfg_scale"])), DDIM(sched), int(p["max_model_batch"])
        stop = 0
        if s["grid"] == "code":
            # the released code (runner/schedule.py, method.py tran_ddim) moves between the alpha_bar levels
            # t, t - stride, ..., 0 but feeds the model t - 1, and stops at level 0 (not the clean level)
            guided, stop = cfg, 1
            cfg = lambda x, t, c: guided(x, t - 1, c)  # noqa: E731
        # noise is drawn for the whole batch first, so chunking never changes a sample's result
        x_rec = torch.cat(map_chunks(lambda i, j: ddim.sample(cfg, x_t[i:j], levels, start=start[i:j], stop=stop,
                                                              cond={"y": cond["y"][i:j]}), len(x_t), step))
        # rows are (t, repeat, sample)-major: the first B rows are the first timestep's first draw
        pics = {"noised": space.decode(x_t[:B]).float(), "neighbour": space.decode(x_rec[:B]).float()} if keep_images else None
        if s["reference"] == "noised":
            # the code's t = 0 entry: x noised to level 0 with repeat r's noise, classified without denoising
            x_ref = noise_to_level(sched, x0.unsqueeze(0).expand(R, *x0.shape).reshape(-1, *x0.shape[1:]), 0,
                                   noise=noise.reshape(-1, *x0.shape[1:]))
            x_rec = torch.cat([x_ref, x_rec])
        _, rep = embed(space.to_classifier(space.decode(x_rec).float()).to(images.dtype))
        ref = rep[:R * B].view(1, R, B, -1) if s["reference"] == "noised" else clean_rep.view(1, 1, B, -1)
        nb = rep[-n_t * R * B:].view(n_t, R, B, -1)
        dist = (nb - ref).abs().sum(-1).mean(1)  # [T, B]
        stats = {"pred": pred}
        for t, d in zip(ts, dist):
            stats[f"dist_t{t}"] = d
        return (stats, pics) if keep_images else stats

    def confidences(self, stats: Mapping[str, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Every timestep's confidence -S_t, as the released code reports them (one AUROC per t)."""
        return {int(k[len("dist_t"):]): -torch.as_tensor(v) for k, v in stats.items() if k.startswith("dist_t")}

    def confidence(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        agg, t_sel = self.params["aggregate"], timestep_of(self.params["aggregate"])
        if t_sel is not None:
            return -torch.as_tensor(stats[f"dist_t{t_sel}"])
        d = torch.stack([torch.as_tensor(stats[k]) for k in stats if k.startswith("dist_t")])
        score = d.mean(0) if agg == "mean" else d.max(0).values
        return -score  # distance is higher = OOD; OpenOOD wants higher = ID
