"""DiffGuard (Gao et al., "DiffGuard: Semantic Mismatch-Guided Out-of-Distribution Detection using Pre-trained
Diffusion Models", ICCV 2023, https://arxiv.org/abs/2308.07687; code https://github.com/cure-lab/DiffGuard):
re-synthesise the image guided by the classifier's label; ID images survive, OOD images drift toward the
(wrong) predicted class. Score = similarity(reference, synthesis).

Two algorithms, one detector each, composed from the shared parts in this module (``DiffGuard``: models,
image space, DDIM grids and paths, guide labels, similarities, confidence); both batched with per-sample
state (no loop over samples):

``DiffGuardGDM`` (``diffguard_gdm.py``, registered ``diffguard_gdm``; ``guidance: classifier``): unconditional
  pixel model, official ``exp6.1``. DDIM inversion (source-level eps, clip-consistent except at t=0),
  adaptive early stop per sample on the noisy state (PSNR OR DISTS-similarity below a threshold; cap 90 of
  100 steps); then denoising from ``forback_skip - 2`` levels above the stop with "Clean Grad" classifier
  guidance (gradient of the sum over 8 seeded cutouts of log softmax[y], taken on the blend of x_t and the
  unclipped x0 prediction, scale 3). The reference is the unguided reconstruction from the same latent (the
  official ``uncond_aux``), run in the same batch. Score = 1 - DISTS at 224.
``DiffGuardCFG`` (``diffguard_cfg.py``, registered ``diffguard_cfg``; ``guidance: cfg``): class-conditional
  latent model, official ``ldm-exp2.25``; also the CIFAR-10 preset. Full DDIM inversion with the null class,
  then classifier-free guidance toward y with scale w, applied only where the Grad-CAM of y exceeds
  ``cam_cut``. Reference = input. Score = 1 - DISTS (LDM, 256) or -l1 between raw logits (CIFAR).

``DiffGuard(guidance=..., **params)`` (registered ``diffguard``, the name of the packaged presets) builds the
detector of that path: ``guidance`` is each detector's fixed tag, and a parameter of the other path is
rejected (it had no effect there).

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
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from ..diffusion import DiffusionModel, load_dit, load_unet
from ..similarity import EMBEDDING_SIMILARITIES, PerceptualDistance, classifier_embedding, embedding_similarities
from ..space import ImageSpace, resolve_normalization
from .base import (BACKBONE_PARAMS, Detector, DiffusionBackbone, Param, ParameterError, check_choice,
                   check_classifier_output, check_images)

_PERCEPTUAL = ("dists", "lpips")
UNCOND = "diffusion_label"  # cond key that is never set: the diffusion model runs unconditionally

#: what a null parameter resolves to, per variant and guidance path (classifier = GDM, cfg = LDM / CIFAR); each
#: path's table holds only that path's parameters (plus ``aes_psnr``, the resolved form of the two AES PSNR ones).
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
                           reference="uncond"),                  # runner.uncond_aux: True
        "cfg": dict(timestep_spacing="ldm",                      # make_ddim_timesteps (+1, 1000 dropped)
                    inversion_convention="target",               # DDIMForward: eps at the target level
                    clean_level="alpha0",                        # alphas_prev[0] = alpha_bar[0] at both ends
                    cam_cut=0.3),                                # latent-diffusion-model.yaml cam_cut
    },
    "paper": {
        "classifier": dict(timestep_spacing="leading", inversion_convention="source",  # Eq. 6: eps(x_t)
                           clean_level="first_step", aes_psnr=("db", 6.39), aes_dists_sim=0.37,  # Table 4
                           forback_skip=2, guidance_target="x0",  # Eq. 7: x0_hat as a substitute of x_t
                           reference="input"),                    # Fig. 1: similarity to the input
        "cfg": dict(timestep_spacing="leading", inversion_convention="source", clean_level="first_step",
                    cam_cut=0.2),                                 # Fig. 7: cut-point ~0.2
    },
}
GUIDANCE = ("classifier", "cfg")  # the two paths, in VARIANTS' order
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


def path_class(guidance: Any) -> type["DiffGuard"]:
    """The detector of a guidance path: ``classifier`` -> DiffGuardGDM, ``cfg`` -> DiffGuardCFG."""
    check_choice("DiffGuard", "guidance", guidance, GUIDANCE)
    from .diffguard_cfg import DiffGuardCFG  # the path modules import this one: resolved at call time
    from .diffguard_gdm import DiffGuardGDM

    return DiffGuardGDM if guidance == "classifier" else DiffGuardCFG


class DiffGuard(DiffusionBackbone, Detector):
    """DiffGuard's shared parts, and the factory of its two detectors (Gao et al., ICCV 2023,
    https://arxiv.org/abs/2308.07687; code https://github.com/cure-lab/DiffGuard).

    ``DiffGuard(guidance="classifier" | "cfg", **params)`` returns a ``DiffGuardGDM`` or a ``DiffGuardCFG``
    (both subclasses of this class); ``guidance`` defaults to ``classifier``, as before the split. The
    subclasses implement ``_guided_synthesis`` and add their path's parameters to ``DEFAULTS``.
    """

    name = "diffguard"
    PARAMS = {
        "model_type": Param("unet", "unet (UNet2DModel dir) | dit (DiT pipeline dir) | ldm (`convert ldm` dir); or "
                                    "model=adapter", choices=("unet", "dit", "ldm")),
        "model_path": Param(None, "local path only, never downloaded", types=(str, os.PathLike)),
        "num_classes": Param(None, "classifier classes (checked against the logits); null = any", types=(int,), low=1),
        "normalization": Param("imagenet", "OpenOOD normalization_type / dataset name", nullable=True),
        "diffusion_size": Param(256, "pixel side the diffusion model (or its VAE) sees; null = image size",
                                nullable=True, low=1),
        "dtype": Param("fp32", "fp32 | bf16 (diffusion model: see cast_weights; guidance classifier: autocast)",
                       choices=("fp32", "bf16")),
        **BACKBONE_PARAMS,
        "variant": Param("code", "code (released code) | paper (paper text): what every null resolves to",
                         choices=tuple(VARIANTS)),
        "guidance": Param("classifier", "classifier (DiffGuardGDM) | cfg (DiffGuardCFG): the path; fixed per class",
                          choices=GUIDANCE),
        "num_steps": Param(100, "DDIM steps of the grid", low=1),
        "timestep_spacing": Param(None, "null = variant | leading | trailing | linspace | guided_diffusion | ldm",
                                  choices=_SPACINGS),
        "steps_offset": Param(0, "added to the grid (LDM's own +1 is part of the 'ldm' rule)", low=0),
        "inversion_convention": Param(None, "null = variant | source (guided-diffusion, paper Eq. 6) | target (LDM)",
                                      choices=("source", "target")),
        "clean_level": Param(None, "null = variant | first_step | alpha0 | one (where the clean image sits on the "
                                   "path)", choices=_CLEAN_LEVELS),
        "inversion_refine": Param(0, "fixed-point refinements per inversion step (0 = as the official code)", low=0),
        "similarities": Param(("dists",), "computed: dists, lpips, logits_l1, logits_cos, feature_l2, feature_cos"),
        "score_size": Param(224, "side for DISTS/LPIPS (GDM 224, LDM 256); null = as is", nullable=True, low=1),
        "score_antialias": Param(False, "antialiased downsizing to score_size (torchvision >= 0.17's Resize); "
                                        "false = < 0.17"),
        "similarity": Param("dists", "which computed similarity is the confidence", cheap=True),
        "label_mode": Param("pred", "pred | oracle (analysis only)", choices=("pred", "oracle")),
        "oracle_seed": Param(0, "seed of the OOD samples' random labels in oracle mode", low=0),
        "metric_weights": Param(None, "folder with vgg16 / dists / lpips weights; null = torch hub checkpoints/",
                                types=(str, os.PathLike)),
        "pretrained_metrics": Param(True, "false = random VGG/DISTS weights (tests, benchmarks)"),
    }
    heavy_attributes = ("model", "_perceptual")
    #: parameters whose ``false`` means off, resolved to None by ``effective_params``
    _SWITCHES: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, model: DiffusionModel | None = None, **params: Any) -> "DiffGuard":
        if cls is DiffGuard:  # the factory: the detector of the requested path
            cls = path_class(params.get("guidance", DiffGuard.DEFAULTS["guidance"]))
        return super().__new__(cls)

    def __init__(self, model: DiffusionModel | None = None, **params: Any) -> None:
        self._reject_other_path(params)
        super().__init__(model, **params)
        self._perceptual: dict[str, PerceptualDistance] | None = None

    def __setstate__(self, state: dict) -> None:
        params = state.get("params", {})
        if set(params) - set(self.DEFAULTS):  # pickled before the split: every path's parameters in one class
            self.__class__ = path_class(params["guidance"])
            state = {k: v for k, v in state.items() if k != "_cutouts" or "cutouts" in self.DEFAULTS}
            state["params"] = {k: v for k, v in params.items() if k in self.DEFAULTS}  # the rest had no effect
        self.__dict__.update(state)

    # ------------------------------------------------------------------ configuration
    def _reject_other_path(self, params: Mapping[str, Any]) -> None:
        """A parameter of the other path is an error naming that path (it never had an effect here)."""
        own = self.DEFAULTS["guidance"]
        for guidance in GUIDANCE:
            other = path_class(guidance) if guidance != own else None
            foreign = [k for k in params if other is not None and k in other.DEFAULTS and k not in self.DEFAULTS]
            if foreign:
                raise ParameterError(f"{type(self).__name__}: parameter {foreign[0]!r} belongs to DiffGuard's "
                                     f"{guidance!r} path ({other.__name__}, guidance: {guidance}); it has no effect "
                                     f"with guidance {own!r}: remove it")

    def set_params(self, **params: Any) -> "DiffGuard":
        self._reject_other_path(params)
        return super().set_params(**params)

    def validate_params(self) -> None:
        p, me = self.params, type(self).__name__
        if p["guidance"] != self.DEFAULTS["guidance"]:
            raise ParameterError(f"{me}: parameter 'guidance' is fixed to {self.DEFAULTS['guidance']!r} (this class "
                                 f"is that path), got {p['guidance']!r}; use DiffGuard(guidance={p['guidance']!r}, ...) "
                                 "or the other path's class")
        known = set(_PERCEPTUAL) | set(EMBEDDING_SIMILARITIES)
        p["similarities"] = tuple(p["similarities"])
        bad = set(p["similarities"]) - known
        if bad or not p["similarities"]:
            raise ParameterError(f"{me}: unknown similarities {sorted(bad)}; choose from {sorted(known)}")
        check_choice(me, "similarity", p["similarity"], sorted(known))
        eff = self.effective_params()
        if eff["clean_level"] == "one" and eff["inversion_convention"] == "source":
            raise ParameterError(f"{me}: clean_level 'one' needs inversion_convention 'target' (source-level "
                                 "inversion would evaluate the model at the clean level); use clean_level "
                                 "'first_step' with 'source'")
        if p["label_mode"] == "oracle":
            warnings.warn("DiffGuard oracle-label mode reads the test labels (GT for ID, random for OOD): "
                          "analysis only, not a detector", stacklevel=4)

    def effective_params(self) -> dict[str, Any]:
        """``params`` with every null variant-driven parameter replaced by the ``variant``'s value for this
        guidance path, and false (off) switches as None."""
        p = dict(self.params)
        for key, value in VARIANTS[p["variant"]][p["guidance"]].items():
            if key in p and p[key] is None:
                p[key] = value
        for key in self._SWITCHES:
            if p[key] is False:
                p[key] = None
        return p

    _model_identity = ("model_path", "model_type")

    def _on_expensive_change(self, changed: set[str]) -> None:
        super()._on_expensive_change(changed)
        if changed & {"metric_weights", "pretrained_metrics"}:
            self._perceptual = None

    # ------------------------------------------------------------------ models
    def setup(self, net, id_loaders=None, ood_loaders=None) -> None:
        net.eval()
        self._ensure_models()

    _missing_model = "set model_path (a local diffusers directory) or pass model=<DiffusionModel adapter>"

    def _load(self, path: str) -> DiffusionModel:
        return _LOADERS[self.params["model_type"]]()(path)

    def _check_classes(self, num_classes: int) -> None:
        """Hook: requirements on the classifier's class count given the loaded diffusion model."""

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
        self._check_classes(emb_in["logits"].shape[1])
        pred = emb_in["logits"].argmax(1)
        y = self._guide_labels(images, pred, labels, emb_in["logits"].shape[1])
        x_px = space.to_pixels(images)
        out = self._guided_synthesis(net, images, x_px, y, space, eff)
        return {"pred": pred, "guide_label": y, "input": x_px, "embedding": emb_in, **out}

    def _guided_synthesis(self, net: torch.nn.Module, images: torch.Tensor, x_px: torch.Tensor, y: torch.Tensor,
                          space: ImageSpace, eff: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The path: ``synthesis``, ``latents``, ``stop_index`` (and ``reference`` when it is not the input)."""
        raise NotImplementedError

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
