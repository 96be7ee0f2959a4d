"""DiffGuard (ICCV 2023): re-synthesise the image guided by the classifier's label; ID images survive,
OOD images drift toward the (wrong) predicted class. Score = similarity(reference, synthesis).

Two guidance paths (methods.md section 1), both batched with per-sample state (no loop over samples):

``guidance: classifier`` (GDM, unconditional pixel model, official ``exp6.1``):
  DDIM inversion of the image placed at the first grid level (source-level eps, clip-consistent except at
  t=0), adaptive early stop per sample on the noisy state (PSNR with peak 2 < 6.39 dB OR DISTS-similarity
  < 0.38; cap 90 of 100 steps); then denoising from ``stop + forback_skip - 1`` on the clean-prefixed
  path with "Clean Grad" classifier guidance (gradient of sum over 8 cutouts of log softmax[y] taken on the
  blend of x_t and the unclipped x0 prediction, scale 3). The reference is the unguided reconstruction
  from the same latent (the official ``uncond_aux``), run in the same batch; ``reference: input`` is the
  paper's variant. Score = 1 - DISTS at 224.
``guidance: cfg`` (class-conditional latent model, official ``ldm-exp2.25``; also the CIFAR-10 preset):
  full DDIM inversion with the null class (target-level eps), then classifier-free guidance toward y with
  scale w, applied only where the Grad-CAM of y exceeds ``cam_cut`` (``cam_cut: null`` = everywhere).
  Reference = input. Score = 1 - DISTS (LDM, 256) or -l1 between raw logits (CIFAR).

``label_mode: oracle`` guides ID samples with their ground-truth label and OOD samples (label -1) with a
random label: the paper's oracle ablation, for analysis only (it reads the test labels).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..diffusion import DDIM, DiffusionModel, load_dit, load_unet
from ..diffusion.schedule import _bcast
from ..guidance import ClassifierFreeGuidance, ClassifierGuidance, ClipConsistent, log_prob_grad, model_eps
from ..guidance.cutouts import Cutouts
from ..guidance.gradcam import GradCAM, cam_mask
from ..similarity import (EMBEDDING_SIMILARITIES, PerceptualDistance, classifier_embedding, embedding_similarities, psnr,
                          select_features)
from ..space import ImageSpace, resolve_normalization
from .base import BACKBONE_PARAMS, Detector, DiffusionBackbone, check_classifier_output

_PERCEPTUAL = ("dists", "lpips")
_LEGACY_PSNR_PEAK = 255.0  # the official code's PSNR peak on [-1, 1] tensors
_UNCOND = "diffusion_label"  # cond key that is never set: the diffusion model runs unconditionally


def _load_ldm():
    from ..diffusion import models

    if not hasattr(models, "load_ldm"):
        raise ImportError("model_type 'ldm' needs openood_diffguard.diffusion.models.load_ldm (the LDM converter); "
                          "convert cin256-v2 with `openood-diffguard convert ldm` or pass model=CrossAttnUNetAdapter(...)")
    return models.load_ldm


_LOADERS = {"unet": lambda: load_unet, "dit": lambda: load_dit, "ldm": _load_ldm}


class DiffGuard(DiffusionBackbone, Detector):
    name = "diffguard"
    DEFAULTS: dict[str, Any] = {
        # models and spaces
        "model_type": "unet",  # unet (UNet2DModel dir) | dit (DiT pipeline dir) | ldm (`convert ldm` dir); or model=adapter
        "model_path": None,  # local path only, never downloaded
        "num_classes": None,  # classifier classes (checked against the logits); None = any
        "normalization": "imagenet",  # OpenOOD normalization_type / dataset name
        "diffusion_size": 256,  # pixel side the diffusion model (or its VAE) sees; None = image size
        "dtype": "fp32",  # fp32 | bf16 (diffusion model: see cast_weights; guidance classifier: autocast)
        **BACKBONE_PARAMS,
        # DDIM path
        "guidance": "classifier",  # classifier (GDM) | cfg (LDM / DiT / CIFAR)
        "num_steps": 100,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "inversion_convention": "source",  # source (guided-diffusion) | target (LDM / diffusers)
        "inversion_refine": 0,  # fixed-point refinements per inversion step (0 = as the official code)
        "clip_denoised": True,  # clip-consistent eps (x0 clamped to [-1, 1]); classifier path only
        # adaptive early stop (classifier path)
        "max_inversion_steps": 90,  # cap on inversion steps; None = the whole grid
        "aes": True,
        "aes_psnr_db": 6.39,  # stop when PSNR (peak 2, dB) of noisy state vs input falls below; None = off
        "aes_psnr_legacy": None,  # e.g. 48.5: use the code's 255-peak PSNR and this threshold instead
        "aes_dists_sim": 0.38,  # ... or when 1 - DISTS falls below (paper 0.37); None = off
        "forback_skip": 3,  # denoise from stop + forback_skip - 1 (2 = exact matching levels)
        # classifier guidance
        "classifier_scale": 3.0,
        "guidance_target": "x0_blend",  # x0_blend (code) | x0 | xt
        "cutouts": 8,  # 0 = the whole image, no augmentation
        "cutout_min_fraction": 224 / 256,
        "cutout_seed": 100,
        # classifier-free guidance
        "cfg_scale": 10.0,
        "cam_cut": 0.3,  # Grad-CAM threshold (paper 0.2); None = CFG everywhere
        "cam_layer": "layer4.-1",
        # scoring
        "reference": "uncond",  # uncond (official GDM) | input
        "similarities": ("dists",),  # computed: dists, lpips, logits_l1, logits_cos, feature_l2, feature_cos
        "score_size": 224,  # side for DISTS/LPIPS (GDM 224, LDM 256); None = as is
        "similarity": "dists",  # cheap: which computed similarity is the confidence
        "label_mode": "pred",  # pred | oracle (analysis only)
        "oracle_seed": 0,
        "metric_weights": None,  # folder with vgg16 / dists / lpips weights; None = torch hub checkpoints/
        "pretrained_metrics": True,  # False = random VGG/DISTS weights (tests, benchmarks)
    }
    cheap_params = ("similarity",)
    heavy_attributes = ("model", "_perceptual")
    PARAM_TYPES = {**DiffusionBackbone.PARAM_TYPES, "num_classes": (int,), "diffusion_size": (int, type(None)),
                   "max_inversion_steps": (int, type(None)), "aes_psnr_db": (float, type(None)),
                   "aes_psnr_legacy": (float,), "aes_dists_sim": (float, type(None)), "cam_cut": (float, type(None)),
                   "score_size": (int, type(None)), "normalization": (str, type(None)), "model_path": (str, os.PathLike), "metric_weights": (str, os.PathLike)}

    def __init__(self, model: DiffusionModel | None = None, **params: Any) -> None:
        super().__init__(model, **params)
        self._perceptual: dict[str, PerceptualDistance] | None = None
        self._cutouts = Cutouts(self.params["cutouts"] or 1, self.params["cutout_min_fraction"],
                                seed=self.params["cutout_seed"])

    # ------------------------------------------------------------------ configuration
    def validate_params(self) -> None:
        p = self.params
        choices = {"guidance": ("classifier", "cfg"), "reference": ("uncond", "input"), "label_mode": ("pred", "oracle"),
                   "dtype": ("fp32", "bf16"), "model_type": ("unet", "dit", "ldm"),
                   "inversion_convention": ("source", "target")}
        for key, allowed in choices.items():
            if p[key] not in allowed:
                raise ValueError(f"DiffGuard: {key} must be one of {allowed}, got {p[key]!r}")
        known = set(_PERCEPTUAL) | set(EMBEDDING_SIMILARITIES)
        p["similarities"] = tuple(p["similarities"])
        bad = set(p["similarities"]) - known
        if bad or not p["similarities"]:
            raise ValueError(f"DiffGuard: unknown similarities {sorted(bad)}; choose from {sorted(known)}")
        if p["guidance"] == "cfg" and p["reference"] == "uncond":
            raise ValueError("DiffGuard: reference 'uncond' is the classifier-guidance (GDM) setting; use 'input' with cfg")
        self._check_backbone_params()
        if p["label_mode"] == "oracle":
            warnings.warn("DiffGuard oracle-label mode reads the test labels (GT for ID, random for OOD): "
                          "analysis only, not a detector", stacklevel=3)

    _model_identity = ("model_path", "model_type")

    def _on_expensive_change(self, changed: set[str]) -> None:
        super()._on_expensive_change(changed)
        if changed & {"metric_weights", "pretrained_metrics"}:
            self._perceptual = None
        if changed & {"cutouts", "cutout_min_fraction", "cutout_seed"}:
            self._cutouts = Cutouts(self.params["cutouts"] or 1, self.params["cutout_min_fraction"],
                                    seed=self.params["cutout_seed"])

    # ------------------------------------------------------------------ models
    def setup(self, net, id_loaders=None, ood_loaders=None) -> None:
        net.eval()
        self._ensure_models()

    _missing_model = "set model_path (a local diffusers directory) or pass model=<DiffusionModel adapter>"

    def _load(self, path: str) -> DiffusionModel:
        return _LOADERS[self.params["model_type"]]()(path)

    def _check_model(self) -> None:
        if self.params["guidance"] == "cfg" and self.model.null_class is None:
            raise ValueError("guidance 'cfg' needs a class-conditional diffusion model with a null class")

    def _metric(self, kind: str) -> PerceptualDistance:
        if self._perceptual is None:
            self._perceptual = {}
        if kind not in self._perceptual:
            self._perceptual[kind] = PerceptualDistance(kind, self.params["score_size"], self.params["pretrained_metrics"],
                                                        self.params["metric_weights"])
        return self._perceptual[kind]

    def _space(self) -> ImageSpace:
        mean, std = resolve_normalization(self.params["normalization"])
        return ImageSpace(mean, std, diffusion_size=self.params["diffusion_size"], codec=self.model.codec)

    def _grid(self) -> torch.Tensor:
        p = self.params
        return self.model.schedule.timesteps(p["num_steps"], p["timestep_spacing"], p["steps_offset"])

    # ------------------------------------------------------------------ scoring
    def synthesise(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The images behind the score, for a normalised batch: ``input`` pixels in [-1, 1], the inverted
        ``latents``, the guided ``synthesis``, the ``reference`` it is compared with (the unconditional
        twin, or the input), plus ``pred``, ``guide_label``, ``stop_index`` and the input embedding."""
        model = self._ensure_models()
        net.eval()
        model.to(images.device)
        space = self._space()
        space.validate(images)
        with torch.no_grad():
            emb_in = classifier_embedding(net, images)
        check_classifier_output(emb_in["logits"], self.params["num_classes"])
        pred = emb_in["logits"].argmax(1)
        y = self._guide_labels(pred, labels, emb_in["logits"].shape[1])
        x_px = space.to_pixels(images)
        if self.params["guidance"] == "classifier":
            out = self._classifier_path(net, x_px, y, space, tuple(images.shape[-2:]))
        else:
            out = self._cfg_path(net, images, x_px, y, space)
        return {"pred": pred, "guide_label": y, "input": x_px, "embedding": emb_in, **out}

    def statistics(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        syn = self.synthesise(net, images, labels)
        stats = {"pred": syn["pred"], "guide_label": syn["guide_label"], "stop_index": syn["stop_index"]}
        stats.update(self._similarities(net, images, self._space(), syn.get("reference"), syn["synthesis"], syn["embedding"]))
        return stats

    @property
    def needs_labels(self) -> bool:
        return self.params["label_mode"] == "oracle"

    def confidence(self, stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        key = f"sim_{self.params['similarity']}"
        if key not in stats:
            have = sorted(k[4:] for k in stats if k.startswith("sim_"))
            raise KeyError(f"similarity {self.params['similarity']!r} was not computed (have {have}); add it to "
                           "'similarities' (an expensive parameter) and re-run statistics")
        return stats[key].float()

    def _guide_labels(self, pred: torch.Tensor, labels: torch.Tensor | None, num_classes: int) -> torch.Tensor:
        if self.params["label_mode"] == "pred":
            return pred
        if labels is None:
            raise ValueError("label_mode 'oracle' needs the test labels (ID >= 0, OOD = -1) passed to statistics()")
        labels = labels.to(pred.device).long()
        g = torch.Generator().manual_seed(int(self.params["oracle_seed"]))
        rand = torch.randint(0, num_classes, labels.shape, generator=g).to(pred.device)
        return torch.where(labels >= 0, labels, rand)

    # ------------------------------------------------------------------ GDM: classifier guidance
    def _inversion_eps(self, model: DiffusionModel):
        """Unconditional eps; clip-consistent at t > 0 (guided-diffusion reverse step, raw at t = 0)."""
        raw = model_eps(model, label_key=_UNCOND)
        if not self.params["clip_denoised"]:
            return raw

        def eps_fn(x, t, cond):
            e = raw(x, t, cond)
            clipped = ClipConsistent(lambda *_: e, model.schedule)(x, t, cond)
            return torch.where(_bcast(t > 0, e), clipped, e)

        return eps_fn

    def _early_stop(self, x_px: torch.Tensor):
        p = self.params
        if not p["aes"] or (p["aes_psnr_db"] is None and p["aes_psnr_legacy"] is None and p["aes_dists_sim"] is None):
            return None
        metric, ref_feats = None, None
        if p["aes_dists_sim"] is not None:  # official: 1 - DISTS on (x + 1) / 2 unclamped, at the model resolution
            metric = self._metric("dists").with_options(size=None, check_range=False)
            ref_feats = metric.features(x_px * 0.5 + 0.5)  # the input never changes: encode it once

        def stop_fn(x_new, index, ids, cond):
            ref = x_px.index_select(0, ids)
            halt = torch.zeros(len(ids), dtype=torch.bool, device=x_new.device)
            if p["aes_psnr_legacy"] is not None:
                halt |= psnr(x_new, ref, peak=_LEGACY_PSNR_PEAK) < p["aes_psnr_legacy"]
            elif p["aes_psnr_db"] is not None:
                halt |= psnr(x_new, ref, peak=2.0) < p["aes_psnr_db"]
            if metric is not None:
                sim = 1 - metric.distance(x_new.float() * 0.5 + 0.5, ref_features=select_features(ref_feats, ids))
                halt |= sim < p["aes_dists_sim"]
            return halt

        return stop_fn

    def _classifier_path(self, net, x_px, y, space, classifier_hw):
        p, model = self.params, self.model
        sched, B = model.schedule, len(x_px)
        grid = self._grid()
        inv_levels, den_levels = sched.levels(grid, include_clean=False), sched.levels(grid)
        cap = len(inv_levels) - 1 if p["max_inversion_steps"] is None else min(int(p["max_inversion_steps"]), len(inv_levels) - 1)
        ddim = DDIM(sched)
        inv = ddim.invert(self._inversion_eps(model), x_px, inv_levels, stop=cap, convention=p["inversion_convention"],
                          refine=p["inversion_refine"], stop_fn=self._early_stop(x_px))
        stop = inv.stop_index
        start = (stop + p["forback_skip"] - 1).clamp(1, len(den_levels) - 1)
        twin = p["reference"] == "uncond"
        reps = 2 if twin else 1
        lat = inv.latents.repeat(reps, 1, 1, 1)
        guided = torch.arange(reps * B, device=x_px.device) < B  # first copy guided, second = plain reconstruction
        cond = {"y": y.repeat(reps), "guided": guided, "start": start.repeat(reps)}
        eps_fn = self._clean_grad_eps(net, space, den_levels, classifier_hw)
        out = ddim.sample(eps_fn, lat, den_levels, start=start.repeat(reps), stop=0, cond=cond)
        return {"synthesis": out[:B], "reference": out[B:] if twin else None, "latents": inv.latents, "stop_index": stop}

    def _clean_grad_eps(self, net, space, den_levels, classifier_hw):
        """ClassifierGuidance whose classifier sees cutouts of the blended x0 (only on guided rows)."""
        p, model = self.params, self.model
        out_side = min(classifier_hw)
        cutouts = self._cutouts if p["cutouts"] else None
        autocast = p["dtype"] == "bf16"

        def to_input(z):
            return space.from_unit(z * 0.5 + 0.5)

        def grad_fn(z, cond):
            g = torch.zeros_like(z)
            rows = cond["guided"].nonzero().flatten()
            if rows.numel() == 0 or p["classifier_scale"] == 0:
                return g
            if cutouts is not None:
                cutouts.out_size = out_side
                step = cond["cutout_step"].index_select(0, rows)
                augment = lambda v: cutouts(v, step)  # noqa: E731
            else:
                augment = lambda v: torch.nn.functional.interpolate(v, size=classifier_hw, mode="nearest")  # noqa: E731
            with torch.autocast(z.device.type, dtype=torch.bfloat16, enabled=autocast):
                g[rows] = log_prob_grad(net, to_input, augment)(z.index_select(0, rows), {"y": cond["y"].index_select(0, rows)}).to(g.dtype)
            return g

        guidance = ClassifierGuidance(model_eps(model, label_key=_UNCOND), model.schedule, grad_fn,
                                      scale=p["classifier_scale"], target=p["guidance_target"],
                                      clip_x0=1.0 if p["clip_denoised"] else None)
        levels = den_levels

        def eps_fn(x, t, cond):
            index = torch.searchsorted(levels.to(t.device), t.contiguous())  # path index of this step
            return guidance(x, t, {**cond, "cutout_step": cond["start"] - index})

        return eps_fn

    # ------------------------------------------------------------------ LDM / DiT / CIFAR: masked CFG
    def _cfg_path(self, net, images, x_px, y, space):
        p, model = self.params, self.model
        sched = model.schedule
        levels = sched.levels(self._grid())
        ddim = DDIM(sched)
        z0 = space.codec.encode(x_px) if space.codec is not None else x_px
        with torch.no_grad():
            inv = ddim.invert(model_eps(model, label_key=_UNCOND), z0, levels, convention=p["inversion_convention"],
                              refine=p["inversion_refine"])
        cond = {"y": y}
        if p["cam_cut"] is not None:
            cam = GradCAM(net, p["cam_layer"])(images, y, size=tuple(x_px.shape[-2:]))
            cond["mask"] = cam_mask(cam, float(p["cam_cut"]), tuple(z0.shape[-2:]))
        with torch.no_grad():
            z = ddim.sample(ClassifierFreeGuidance(model, p["cfg_scale"]), inv.latents, levels, cond=cond)
            x_syn = space.decode(z).float().clamp(-1, 1)
        return {"synthesis": x_syn, "latents": inv.latents, "stop_index": inv.stop_index}

    # ------------------------------------------------------------------ similarities
    def _score_pixels(self, px: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> [0, 1] at ``score_size``: resize first, then clamp (official postprocess order)."""
        size = self.params["score_size"]
        px = px.float()
        if size is not None and tuple(px.shape[-2:]) != (size, size):
            px = F.interpolate(px, size=(size, size), mode="bilinear", align_corners=False)
        return px.clamp(-1, 1) * 0.5 + 0.5

    def _similarities(self, net, images, space, x_ref, x_syn, emb_in) -> dict[str, torch.Tensor]:
        names = self.params["similarities"]
        ref_px = space.to_unit(images) * 2 - 1 if x_ref is None else x_ref
        ref_unit, syn_unit = self._score_pixels(ref_px), self._score_pixels(x_syn)
        out = {}
        for kind in _PERCEPTUAL:
            if kind in names:
                d = self._metric(kind).to(images.device).distance(syn_unit, ref_unit)
                out[f"sim_{kind}"] = 1 - d if kind == "dists" else -d  # official: 1 - DISTS, -LPIPS
        emb_names = [n for n in names if n in EMBEDDING_SIMILARITIES]
        if emb_names:
            size = images.shape[-1]
            with torch.no_grad():
                emb_syn = classifier_embedding(net, space.to_classifier(x_syn.float(), size=size))
                emb_ref = emb_in if x_ref is None else classifier_embedding(net, space.to_classifier(x_ref.float(), size=size))
            out.update({f"sim_{k}": v for k, v in embedding_similarities(emb_ref, emb_syn, emb_names).items()})
        return out
