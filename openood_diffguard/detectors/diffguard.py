"""DiffGuard (ICCV 2023): re-synthesise the image guided by the classifier's label; ID images survive,
OOD images drift toward the (wrong) predicted class. Score = similarity(reference, synthesis).

Two guidance paths, both batched with per-sample state (no loop over samples):

``guidance: classifier`` (GDM, unconditional pixel model, official ``exp6.1``):
  DDIM inversion (source-level eps, clip-consistent except at t=0), adaptive early stop per sample on the
  noisy state (PSNR OR DISTS-similarity below a threshold; cap 90 of 100 steps); then denoising from
  ``forback_skip - 2`` levels above the stop with "Clean Grad" classifier guidance (gradient of the sum
  over 8 seeded cutouts of log softmax[y], taken on the blend of x_t and the unclipped x0 prediction,
  scale 3). The reference is the unguided reconstruction from the same latent (the official
  ``uncond_aux``), run in the same batch. Score = 1 - DISTS at 224.
``guidance: cfg`` (class-conditional latent model, official ``ldm-exp2.25``; also the CIFAR-10 preset):
  full DDIM inversion with the null class, then classifier-free guidance toward y with scale w, applied
  only where the Grad-CAM of y exceeds ``cam_cut``. Reference = input. Score = 1 - DISTS (LDM, 256) or
  -l1 between raw logits (CIFAR).

``variant`` says whose text a null parameter follows: ``code`` = the released code (cure-lab/DiffGuard
6125295: guided-diffusion conventions on the classifier path, its vendored latent-diffusion sampler on the
cfg path), ``paper`` = the paper's text, with textbook DDIM where the paper is silent. ``VARIANTS`` lists
every value; ``effective_params()`` shows what a detector resolves to; docs/deviations/diffguard.md has the
table of differences and their measured effect.

Batch independence: the early stop, start index, cutout geometry (a table indexed by the sample's own
step), Grad-CAM and guidance are per sample, and oracle labels for OOD samples are drawn from the sample's
content, so a sample's score does not depend on the other samples of its batch.

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
from .base import (BACKBONE_PARAMS, Detector, DiffusionBackbone, ParameterError, check_choice, check_classifier_output,
                   check_images, check_range)

_PERCEPTUAL = ("dists", "lpips")
_LEGACY_PSNR_PEAK = 255.0  # the official code's PSNR peak on [-1, 1] tensors
_UNCOND = "diffusion_label"  # cond key that is never set: the diffusion model runs unconditionally

#: what a null parameter resolves to, per variant and guidance path (classifier = GDM, cfg = LDM / CIFAR).
#: code: cure-lab/DiffGuard 6125295 (exp6.1 over guided-diffusion-psnr-dists.yaml; ldm-exp2.25 over
#: latent-diffusion-model.yaml); paper: the ICCV 2023 text, textbook DDIM where it says nothing.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "code": {
        "classifier": dict(timestep_spacing="guided_diffusion",  # respace.space_timesteps("ddimN")
                           inversion_convention="source",        # ddim_reverse_sample: eps at the current level
                           clean_level="first_step",             # image at the grid's first level, denoise to 1
                           aes_psnr=("legacy", 48.5),            # metrics.PSNR: peak 255 on [-1, 1] (= 6.39 dB)
                           aes_dists_sim=0.38,                   # exp6.1 early_stop_thresh (base config: 0.37)
                           forback_skip=3,                       # forback_skip_diff: 3
                           guidance_target="x0_blend",           # cond_fn: f x0_hat + (1 - f) x_t
                           cam_cut=None,                         # no DSG on the GDM path
                           reference="uncond"),                  # runner.uncond_aux: True
        "cfg": dict(timestep_spacing="ldm",                      # make_ddim_timesteps (+1, 1000 dropped)
                    inversion_convention="target",               # DDIMForward: eps at the target level
                    clean_level="alpha0",                        # alphas_prev[0] = alpha_bar[0] at both ends
                    aes_psnr=None, aes_dists_sim=None,            # no AES on the LDM path
                    forback_skip=2,                               # full grid back from the inversion's end
                    guidance_target="x0_blend", cam_cut=0.3,      # latent-diffusion-model.yaml cam_cut
                    reference="input"),
    },
    "paper": {
        "classifier": dict(timestep_spacing="leading", inversion_convention="source",  # Eq. 6: eps(x_t)
                           clean_level="first_step", aes_psnr=("db", 6.39), aes_dists_sim=0.37,  # Table 4
                           forback_skip=2, guidance_target="x0",  # Eq. 7: x0_hat as a substitute of x_t
                           cam_cut=None, reference="input"),      # Fig. 1: similarity to the input
        "cfg": dict(timestep_spacing="leading", inversion_convention="source", clean_level="first_step",
                    aes_psnr=None, aes_dists_sim=None, forback_skip=2, guidance_target="x0",
                    cam_cut=0.2, reference="input"),              # Fig. 7: cut-point ~0.2
    },
}
_SPACINGS = ("leading", "trailing", "linspace", "guided_diffusion", "ldm")
_CLEAN_LEVELS = ("first_step", "alpha0", "one")


def official_grid(rule: str, num_train_timesteps: int, num_steps: int) -> torch.Tensor:
    """The released code's DDIM grids. ``guided_diffusion``: ``space_timesteps(T, "ddimN")``, the smallest
    integer stride giving exactly N steps from 0 (none exists for some N, e.g. 60 of 1000: an error, as
    there). ``ldm``: ``make_ddim_timesteps('uniform')`` as DiffGuard vendors it, stride T // N from 1 with a
    final T dropped, which gives N + 1 steps when N does not divide T (30 -> 1, 34, ..., 991)."""
    T = num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ParameterError(f"DiffGuard: parameter 'num_steps' must be in [1, {T}], got {num_steps}")
    if rule == "guided_diffusion":
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == num_steps:
                return torch.arange(0, T, stride)
        raise ParameterError(f"DiffGuard: parameter 'num_steps' = {num_steps}: guided-diffusion's ddim{num_steps} "
                             f"has no integer stride giving exactly {num_steps} of {T} steps (the official code "
                             "raises here too); choose another num_steps or timestep_spacing 'leading'")
    if rule == "ldm":
        ts = torch.arange(0, T, T // num_steps) + 1
        return ts[ts < T]
    raise ValueError(f"unknown official grid rule {rule!r}")


def content_labels(images: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A pseudo-random label per sample drawn from the sample's own pixels (and ``seed``), never from its
    position in the batch: the same image gets the same label in any batch."""
    P = 2_147_483_647  # Mersenne prime 2^31 - 1: products of two residues stay below 2^62
    bits = images.detach().float().contiguous().view(torch.int32).flatten(1).long() % P
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randint(1, P, (bits.shape[1],), generator=g, dtype=torch.long).to(bits.device)
    h = ((bits * w) % P).sum(1) % P  # < 2^49 before the last reduction: no overflow
    h = (h * 48271 + int(seed) % P) % P  # one Lehmer step mixes the low bits
    return h % num_classes


def _load_ldm():
    from ..diffusion import models

    if not hasattr(models, "load_ldm"):
        raise ImportError("model_type 'ldm' needs openood_diffguard.diffusion.models.load_ldm (the LDM converter); "
                          "convert cin256-v2 with `openood-diffguard convert ldm` or pass model=CrossAttnUNetAdapter(...)")
    return models.load_ldm


_LOADERS = {"unet": lambda: load_unet, "dit": lambda: load_dit, "ldm": _load_ldm}
_OFF = "false = off"


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
        "variant": "code",  # code (released code) | paper (paper text): what every null below resolves to
        # DDIM path
        "guidance": "classifier",  # classifier (GDM) | cfg (LDM / DiT / CIFAR)
        "num_steps": 100,
        "timestep_spacing": None,  # null = variant | leading | trailing | linspace | guided_diffusion | ldm
        "steps_offset": 0,  # added to the grid (LDM's own +1 is part of the 'ldm' rule)
        "inversion_convention": None,  # null = variant | source (guided-diffusion, paper Eq. 6) | target (LDM)
        "clean_level": None,  # null = variant | first_step | alpha0 | one (where the clean image sits on the path)
        "inversion_refine": 0,  # fixed-point refinements per inversion step (0 = as the official code)
        "clip_denoised": True,  # clip-consistent eps (x0 clamped to [-1, 1]); classifier path only
        # adaptive early stop (classifier path)
        "max_inversion_steps": 90,  # cap on inversion steps; None = the whole grid
        "aes": True,
        "aes_psnr_db": None,  # null = variant; stop when PSNR (peak 2, dB) of noisy state vs input falls below; false = off
        "aes_psnr_legacy": None,  # e.g. 48.5: the code's 255-peak PSNR with this threshold (overrides aes_psnr_db)
        "aes_dists_sim": None,  # null = variant (code 0.38, paper 0.37); ... or when 1 - DISTS falls below; false = off
        "forback_skip": None,  # null = variant; denoise from stop + forback_skip - 2 levels (2 = the inversion's end)
        # classifier guidance
        "classifier_scale": 3.0,
        "guidance_target": None,  # null = variant | x0_blend (code) | x0 (paper Eq. 7) | xt
        "cutouts": 8,  # 0 = the whole image, no augmentation
        "cutout_min_fraction": 224 / 256,
        "cutout_seed": 100,
        # classifier-free guidance
        "cfg_scale": 10.0,
        "cam_cut": None,  # null = variant (code 0.3, paper 0.2); Grad-CAM threshold; false = CFG everywhere
        "cam_layer": "layer4.-1",
        # scoring
        "reference": None,  # null = variant | uncond (official GDM) | input
        "similarities": ("dists",),  # computed: dists, lpips, logits_l1, logits_cos, feature_l2, feature_cos
        "score_size": 224,  # side for DISTS/LPIPS (GDM 224, LDM 256); None = as is
        "score_antialias": False,  # antialiased downsizing to score_size (torchvision >= 0.17's Resize); false = < 0.17
        "similarity": "dists",  # cheap: which computed similarity is the confidence
        "label_mode": "pred",  # pred | oracle (analysis only)
        "oracle_seed": 0,
        "metric_weights": None,  # folder with vgg16 / dists / lpips weights; None = torch hub checkpoints/
        "pretrained_metrics": True,  # False = random VGG/DISTS weights (tests, benchmarks)
    }
    cheap_params = ("similarity",)
    heavy_attributes = ("model", "_perceptual")
    PARAM_TYPES = {**DiffusionBackbone.PARAM_TYPES, "num_classes": (int,), "diffusion_size": (int, type(None)),
                   "max_inversion_steps": (int, type(None)), "timestep_spacing": (str,), "inversion_convention": (str,),
                   "clean_level": (str,), "aes_psnr_db": (float, bool), "aes_psnr_legacy": (float,),
                   "aes_dists_sim": (float, bool), "forback_skip": (int,), "guidance_target": (str,),
                   "cam_cut": (float, bool), "reference": (str,), "score_size": (int, type(None)),
                   "normalization": (str, type(None)), "model_path": (str, os.PathLike),
                   "metric_weights": (str, os.PathLike)}

    def __init__(self, model: DiffusionModel | None = None, **params: Any) -> None:
        super().__init__(model, **params)
        self._perceptual: dict[str, PerceptualDistance] | None = None
        self._cutouts = Cutouts(self.params["cutouts"] or 1, self.params["cutout_min_fraction"],
                                seed=self.params["cutout_seed"])

    # ------------------------------------------------------------------ configuration
    def validate_params(self) -> None:
        p, me = self.params, "DiffGuard"
        choices = {"variant": tuple(VARIANTS), "guidance": ("classifier", "cfg"), "label_mode": ("pred", "oracle"),
                   "dtype": ("fp32", "bf16"), "model_type": ("unet", "dit", "ldm")}
        nullable = {"timestep_spacing": _SPACINGS, "inversion_convention": ("source", "target"),
                    "clean_level": _CLEAN_LEVELS, "guidance_target": ClassifierGuidance.TARGETS,
                    "reference": ("uncond", "input")}
        for key, allowed in choices.items():
            check_choice(me, key, p[key], allowed)
        for key, allowed in nullable.items():
            if p[key] is not None:
                check_choice(me, key, p[key], allowed)
        for key in ("aes_psnr_db", "aes_dists_sim", "cam_cut"):  # a number, null (= variant) or false (= off)
            if p[key] is True:
                raise ParameterError(f"{me}: parameter {key!r} must be a number, null (the variant's value) or "
                                     f"false (off), got true")
        for key in ("aes_psnr_db", "aes_psnr_legacy", "aes_dists_sim"):
            if isinstance(p[key], float) and p[key] != p[key]:
                raise ParameterError(f"{me}: parameter {key!r} must be a number, got NaN")
        if p["aes_psnr_legacy"] is not None and p["aes_psnr_db"] not in (None, False):
            raise ParameterError(f"{me}: set either 'aes_psnr_db' (dB, peak 2) or 'aes_psnr_legacy' (the code's "
                                 f"255-peak PSNR), not both")
        for key, low in (("num_classes", 1), ("diffusion_size", 1), ("num_steps", 1), ("steps_offset", 0),
                         ("inversion_refine", 0), ("max_inversion_steps", 1), ("forback_skip", 1), ("cutouts", 0),
                         ("cutout_seed", 0), ("score_size", 1), ("oracle_seed", 0)):
            check_range(me, key, p[key], low)
        check_range(me, "classifier_scale", p["classifier_scale"], 0.0)
        check_range(me, "cfg_scale", p["cfg_scale"], 0.0)
        check_range(me, "cutout_min_fraction", p["cutout_min_fraction"], 0.0, 1.0, low_open=True)
        if not isinstance(p["cam_cut"], bool):
            check_range(me, "cam_cut", p["cam_cut"], -1.0, 1.0)  # negative: guide the low-activation area
        if not isinstance(p["cam_layer"], str) or not p["cam_layer"]:
            raise ParameterError(f"{me}: parameter 'cam_layer' must be a dotted module path such as 'layer4.-1', "
                                 f"got {p['cam_layer']!r}")
        known = set(_PERCEPTUAL) | set(EMBEDDING_SIMILARITIES)
        p["similarities"] = tuple(p["similarities"])
        bad = set(p["similarities"]) - known
        if bad or not p["similarities"]:
            raise ParameterError(f"{me}: unknown similarities {sorted(bad)}; choose from {sorted(known)}")
        check_choice(me, "similarity", p["similarity"], sorted(known))
        eff = self.effective_params()
        if eff["guidance"] == "cfg" and eff["reference"] == "uncond":
            raise ParameterError(f"{me}: reference 'uncond' is the classifier-guidance (GDM) setting; use 'input' with cfg")
        if eff["clean_level"] == "one" and eff["inversion_convention"] == "source":
            raise ParameterError(f"{me}: clean_level 'one' needs inversion_convention 'target' (source-level "
                                 "inversion would evaluate the model at the clean level); use clean_level "
                                 "'first_step' with 'source'")
        self._check_backbone_params()
        if p["label_mode"] == "oracle":
            warnings.warn("DiffGuard oracle-label mode reads the test labels (GT for ID, random for OOD): "
                          "analysis only, not a detector", stacklevel=3)

    def effective_params(self) -> dict[str, Any]:
        """``params`` with every null variant-driven parameter replaced by the ``variant``'s value for this
        guidance path; AES PSNR as ``aes_psnr = None | ("db", threshold) | ("legacy", threshold)`` and
        false (off) switches as None."""
        p = dict(self.params)
        table = VARIANTS[p["variant"]][p["guidance"]]
        for key, value in table.items():
            if key != "aes_psnr" and p.get(key) is None:
                p[key] = value
        if p["aes_psnr_legacy"] is not None:
            p["aes_psnr"] = ("legacy", float(p["aes_psnr_legacy"]))
        elif p["aes_psnr_db"] is None:
            p["aes_psnr"] = table["aes_psnr"]
        else:
            p["aes_psnr"] = None if p["aes_psnr_db"] is False else ("db", float(p["aes_psnr_db"]))
        for key in ("aes_dists_sim", "cam_cut"):
            if p[key] is False:
                p[key] = None
        return p

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
        if self.params["guidance"] != "cfg":
            return
        if self.model.null_class is None:
            raise ValueError("guidance 'cfg' needs a class-conditional diffusion model with a null class")
        n = self.params["num_classes"]
        if n is not None and self.model.num_classes is not None and n > self.model.num_classes:
            raise ValueError(self._too_many_classes(n))

    def _too_many_classes(self, n: int) -> str:
        m = self.model
        return (f"DiffGuard: the classifier has {n} classes but the diffusion model has {m.num_classes} real classes "
                f"(its null class is {m.null_class}): classifier-free guidance toward a label >= {m.num_classes} "
                "would guide toward the null class or a row the model was never trained on. Use the diffusion "
                "model trained on the classifier's classes (num_class_embeds = classes + 1)")

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

    def _grid(self, eff: Mapping[str, Any]) -> torch.Tensor:
        sched, spacing = self.model.schedule, eff["timestep_spacing"]
        if spacing in ("guided_diffusion", "ldm"):
            grid = official_grid(spacing, sched.num_train_timesteps, eff["num_steps"]) + eff["steps_offset"]
            if int(grid.max()) >= sched.num_train_timesteps:
                raise ParameterError(f"DiffGuard: steps_offset {eff['steps_offset']} moves the {spacing} grid past "
                                     f"timestep {sched.num_train_timesteps - 1}")
            return grid
        return sched.timesteps(eff["num_steps"], spacing, eff["steps_offset"])

    def paths(self, eff: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inversion path, denoising path) of timesteps (``CLEAN`` = -1 is alpha_bar = 1): ``first_step``
        places the image at the grid's first level and denoises to the clean level (guided-diffusion);
        ``alpha0`` uses alpha_bar[0] as the clean level at both ends (latent-diffusion's DDIM); ``one`` is
        textbook DDIM (alpha_bar = 1 at both ends)."""
        eff = self.effective_params() if eff is None else eff
        sched, grid = self.model.schedule, self._grid(eff)
        if eff["clean_level"] == "first_step":
            return sched.levels(grid, include_clean=False), sched.levels(grid)
        if eff["clean_level"] == "alpha0":
            path = grid if int(grid[0]) == 0 else torch.cat([torch.zeros(1, dtype=grid.dtype), grid])
            path = sched.levels(path, include_clean=False)
            return path, path
        path = sched.levels(grid)
        return path, path

    # ------------------------------------------------------------------ scoring
    def synthesise(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The images behind the score, for a normalised batch: ``input`` pixels in [-1, 1], the inverted
        ``latents``, the guided ``synthesis``, the ``reference`` it is compared with (the unconditional
        twin, or the input), plus ``pred``, ``guide_label``, ``stop_index`` and the input embedding."""
        check_images(images, "DiffGuard")
        model = self._ensure_models()
        net.eval()
        model.to(images.device)
        space = self._space()
        space.validate(images)
        eff = self.effective_params()
        with torch.no_grad():
            emb_in = classifier_embedding(net, images)
        check_classifier_output(emb_in["logits"], self.params["num_classes"])
        if eff["guidance"] == "cfg" and model.num_classes is not None and emb_in["logits"].shape[1] > model.num_classes:
            raise ValueError(self._too_many_classes(emb_in["logits"].shape[1]))
        pred = emb_in["logits"].argmax(1)
        y = self._guide_labels(images, pred, labels, emb_in["logits"].shape[1])
        x_px = space.to_pixels(images)
        if eff["guidance"] == "classifier":
            out = self._classifier_path(net, x_px, y, space, tuple(images.shape[-2:]), eff)
        else:
            out = self._cfg_path(net, images, x_px, y, space, eff)
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

    def _guide_labels(self, images: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor | None,
                      num_classes: int) -> torch.Tensor:
        if self.params["label_mode"] == "pred":
            return pred
        if labels is None:
            raise ValueError("label_mode 'oracle' needs the test labels (ID >= 0, OOD = -1) passed to statistics()")
        labels = labels.to(pred.device).long()
        if labels.shape != pred.shape:
            raise ValueError(f"label_mode 'oracle': got {tuple(labels.shape)} labels for {len(pred)} images")
        rand = content_labels(images, num_classes, self.params["oracle_seed"]).to(pred.device)
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

    def _early_stop(self, x_px: torch.Tensor, eff: Mapping[str, Any]):
        psnr_rule, dists_sim = eff["aes_psnr"], eff["aes_dists_sim"]
        if not eff["aes"] or (psnr_rule is None and dists_sim is None):
            return None
        metric, ref_feats = None, None
        if dists_sim is not None:  # official: 1 - DISTS on (x + 1) / 2 unclamped, at the model resolution
            metric = self._metric("dists").with_options(size=None, check_range=False)
            ref_feats = metric.features(x_px * 0.5 + 0.5)  # the input never changes: encode it once

        def stop_fn(x_new, index, ids, cond):
            ref = x_px.index_select(0, ids)
            halt = torch.zeros(len(ids), dtype=torch.bool, device=x_new.device)
            if psnr_rule is not None:
                kind, threshold = psnr_rule
                halt |= psnr(x_new, ref, peak=_LEGACY_PSNR_PEAK if kind == "legacy" else 2.0) < threshold
            if metric is not None:
                sim = 1 - metric.distance(x_new.float() * 0.5 + 0.5, ref_features=select_features(ref_feats, ids))
                halt |= sim < dists_sim
            return halt

        return stop_fn

    def _classifier_path(self, net, x_px, y, space, classifier_hw, eff):
        model = self.model
        B = len(x_px)
        inv_levels, den_levels = self.paths(eff)
        top = len(inv_levels) - 1
        cap = top if eff["max_inversion_steps"] is None else min(int(eff["max_inversion_steps"]), top)
        ddim = DDIM(model.schedule)
        inv = ddim.invert(self._inversion_eps(model), x_px, inv_levels, stop=cap, convention=eff["inversion_convention"],
                          refine=eff["inversion_refine"], stop_fn=self._early_stop(x_px, eff))
        stop = inv.stop_index
        # the latent of inversion index i sits at denoising index i + offset; forback_skip 2 starts there,
        # 3 (the code) one level noisier
        offset = len(den_levels) - len(inv_levels)
        start = (stop + offset + eff["forback_skip"] - 2).clamp(1, len(den_levels) - 1)
        twin = eff["reference"] == "uncond"
        reps = 2 if twin else 1
        lat = inv.latents.repeat(reps, 1, 1, 1)
        guided = torch.arange(reps * B, device=x_px.device) < B  # first copy guided, second = plain reconstruction
        cond = {"y": y.repeat(reps), "guided": guided, "start": start.repeat(reps)}
        eps_fn = self._clean_grad_eps(net, space, den_levels, classifier_hw, eff)
        out = ddim.sample(eps_fn, lat, den_levels, start=start.repeat(reps), stop=0, cond=cond)
        return {"synthesis": out[:B], "reference": out[B:] if twin else None, "latents": inv.latents, "stop_index": stop}

    def _clean_grad_eps(self, net, space, den_levels, classifier_hw, eff):
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
                                      scale=p["classifier_scale"], target=eff["guidance_target"],
                                      clip_x0=1.0 if p["clip_denoised"] else None)
        levels = den_levels

        def eps_fn(x, t, cond):
            index = torch.searchsorted(levels.to(t.device), t.contiguous())  # path index of this step
            return guidance(x, t, {**cond, "cutout_step": cond["start"] - index})

        return eps_fn

    # ------------------------------------------------------------------ LDM / DiT / CIFAR: masked CFG
    def _cfg_path(self, net, images, x_px, y, space, eff):
        model = self.model
        inv_levels, den_levels = self.paths(eff)
        ddim = DDIM(model.schedule)
        z0 = space.codec.encode(x_px) if space.codec is not None else x_px
        with torch.no_grad():
            inv = ddim.invert(model_eps(model, label_key=_UNCOND), z0, inv_levels,
                              convention=eff["inversion_convention"], refine=eff["inversion_refine"])
        cond = {"y": y}
        if eff["cam_cut"] is not None:
            cam = GradCAM(net, eff["cam_layer"])(images, y, size=tuple(x_px.shape[-2:]))
            cond["mask"] = cam_mask(cam, float(eff["cam_cut"]), tuple(z0.shape[-2:]))
        start = inv.stop_index + len(den_levels) - len(inv_levels)  # the level the inversion ended at
        with torch.no_grad():
            z = ddim.sample(ClassifierFreeGuidance(model, eff["cfg_scale"]), inv.latents, den_levels, start=start,
                            cond=cond)
            x_syn = space.decode(z).float().clamp(-1, 1)
        return {"synthesis": x_syn, "latents": inv.latents, "stop_index": inv.stop_index}

    # ------------------------------------------------------------------ similarities
    def _score_pixels(self, px: torch.Tensor) -> torch.Tensor:
        """[-1, 1] pixels -> [0, 1] at ``score_size``: resize first, then clamp (official postprocess order).
        Downsizing antialiases only with ``score_antialias`` (torchvision's tensor ``Resize`` before 0.17,
        which the official code was tested with, did not; from 0.17 on it does by default)."""
        size = self.params["score_size"]
        px = px.float()
        if size is not None and tuple(px.shape[-2:]) != (size, size):
            px = F.interpolate(px, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=bool(self.params["score_antialias"]) and size < min(px.shape[-2:]))
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
