"""DiffGuard, classifier-guidance (GDM) path (Gao et al., "DiffGuard: Semantic Mismatch-Guided
Out-of-Distribution Detection using Pre-trained Diffusion Models", ICCV 2023, https://arxiv.org/abs/2308.07687;
code https://github.com/cure-lab/DiffGuard, ``exp6.1``): an unconditional pixel model (ADM-256) inverts the
image with DDIM, stopping early per sample once the noisy state has drifted far enough (AES), then denoises
it with "Clean Grad" classifier guidance toward the predicted label y (log-probabilities summed over seeded
cutouts of the blended x0 prediction). The synthesis is compared with the unguided reconstruction from the
same latent (the official ``uncond_aux``) or with the input. The shared parts live in ``diffguard.py``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Mapping

import torch

from ..diffusion import DDIM, DiffusionModel
from ..diffusion.schedule import _bcast
from ..guidance import ClassifierGuidance, ClipConsistent, log_prob_grad, model_eps
from ..guidance.cutouts import Cutouts
from ..similarity import psnr, select_features
from .base import Param, ParameterError
from .diffguard import UNCOND, VARIANTS, DiffGuard

_LEGACY_PSNR_PEAK = 255.0  # the official code's PSNR peak on [-1, 1] tensors


class DiffGuardGDM(DiffGuard):
    """DiffGuard with classifier guidance on an unconditional model (ICCV 2023,
    https://arxiv.org/abs/2308.07687; code https://github.com/cure-lab/DiffGuard). Registered as
    ``diffguard_gdm``; ``DiffGuard(guidance="classifier")`` (the default) builds it."""

    name = "diffguard_gdm"
    PARAMS = {
        **DiffGuard.PARAMS,
        "guidance": replace(DiffGuard.PARAMS["guidance"], default="classifier",
                            doc="fixed: this class is the classifier-guidance path"),
        "clip_denoised": Param(True, "clip-consistent eps (x0 clamped to [-1, 1]) in inversion and guidance"),
        "max_inversion_steps": Param(90, "cap on inversion steps; null = the whole grid", nullable=True, low=1),
        "aes": Param(True, "adaptive early stop of the inversion (the two rules below)"),
        "aes_psnr_db": Param(None, "null = variant; stop when PSNR (peak 2, dB) of noisy state vs input falls "
                                   "below; false = off", types=(float,), off=True),
        "aes_psnr_legacy": Param(None, "e.g. 48.5: the code's 255-peak PSNR with this threshold (overrides "
                                       "aes_psnr_db)", types=(float,)),
        "aes_dists_sim": Param(None, "null = variant (code 0.38, paper 0.37); ... or when 1 - DISTS falls below; "
                                     "false = off", types=(float,), off=True),
        "forback_skip": Param(None, "null = variant; denoise from stop + forback_skip - 2 levels (2 = the "
                                    "inversion's end)", types=(int,), low=1),
        "classifier_scale": Param(3.0, "classifier guidance scale", low=0),
        "guidance_target": Param(None, "null = variant | x0_blend (code) | x0 (paper Eq. 7) | xt",
                                 choices=ClassifierGuidance.TARGETS),
        "cutouts": Param(8, "cutouts whose log-probabilities are summed; 0 = the whole image, no augmentation",
                         low=0),
        "cutout_min_fraction": Param(224 / 256, "smallest cutout side, as a fraction of the image side", low=0,
                                     low_open=True, high=1),
        "cutout_seed": Param(100, "cutout geometry seed (a table indexed by the sample's own step)", low=0),
        "reference": Param(None, "null = variant | uncond (official: the unguided twin) | input",
                           choices=("uncond", "input")),
    }
    _SWITCHES: ClassVar[tuple[str, ...]] = ("aes_dists_sim",)

    def __init__(self, model: DiffusionModel | None = None, **params: Any) -> None:
        super().__init__(model, **params)
        self._cutouts = self._new_cutouts()

    def _new_cutouts(self) -> Cutouts:
        p = self.params
        return Cutouts(p["cutouts"] or 1, p["cutout_min_fraction"], seed=p["cutout_seed"])

    # ------------------------------------------------------------------ configuration
    def validate_params(self) -> None:
        p, me = self.params, type(self).__name__
        if p["aes_psnr_legacy"] is not None and p["aes_psnr_db"] not in (None, False):
            raise ParameterError(f"{me}: set either 'aes_psnr_db' (dB, peak 2) or 'aes_psnr_legacy' (the code's "
                                 f"255-peak PSNR), not both")
        super().validate_params()

    def effective_params(self) -> dict[str, Any]:
        """The shared resolution, plus the AES PSNR rule as ``aes_psnr = None | ("db", threshold) |
        ("legacy", threshold)``."""
        p = super().effective_params()
        if p["aes_psnr_legacy"] is not None:
            p["aes_psnr"] = ("legacy", float(p["aes_psnr_legacy"]))
        elif p["aes_psnr_db"] is None:
            p["aes_psnr"] = VARIANTS[p["variant"]]["classifier"]["aes_psnr"]
        else:
            p["aes_psnr"] = None if p["aes_psnr_db"] is False else ("db", float(p["aes_psnr_db"]))
        return p

    def _on_expensive_change(self, changed: set[str]) -> None:
        super()._on_expensive_change(changed)
        if changed & {"cutouts", "cutout_min_fraction", "cutout_seed"}:
            self._cutouts = self._new_cutouts()

    # ------------------------------------------------------------------ inversion with adaptive early stop
    def _inversion_eps(self, model: DiffusionModel):
        """Unconditional eps; clip-consistent at t > 0 (guided-diffusion reverse step, raw at t = 0)."""
        raw = model_eps(model, label_key=UNCOND)
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

    # ------------------------------------------------------------------ inversion, then Clean Grad guidance
    def _guided_synthesis(self, net, images, x_px, y, space, eff: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        model, classifier_hw = self.model, tuple(images.shape[-2:])
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

        guidance = ClassifierGuidance(model_eps(model, label_key=UNCOND), model.schedule, grad_fn,
                                      scale=p["classifier_scale"], target=eff["guidance_target"],
                                      clip_x0=1.0 if p["clip_denoised"] else None)
        levels = den_levels

        def eps_fn(x, t, cond):
            index = torch.searchsorted(levels.to(t.device), t.contiguous())  # path index of this step
            return guidance(x, t, {**cond, "cutout_step": cond["start"] - index})

        return eps_fn

