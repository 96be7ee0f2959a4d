"""DiffGuard, classifier-free path (Gao et al., "DiffGuard: Semantic Mismatch-Guided Out-of-Distribution
Detection using Pre-trained Diffusion Models", ICCV 2023, https://arxiv.org/abs/2308.07687; code
https://github.com/cure-lab/DiffGuard, ``ldm-exp2.25``): a class-conditional model (LDM cin256-v2, DiT, the
CIFAR-10 pixel DDPM) inverts the image with the null class, then re-synthesises it with classifier-free
guidance toward the predicted label y, applied only where the Grad-CAM of y exceeds ``cam_cut``.
The synthesis is compared with the input. The shared parts live in ``diffguard.py``.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Mapping

import torch

from ..diffusion import DDIM
from ..guidance import ClassifierFreeGuidance, model_eps
from ..guidance.gradcam import GradCAM, cam_mask
from .base import Param, ParameterError
from .diffguard import UNCOND, DiffGuard


class DiffGuardCFG(DiffGuard):
    """DiffGuard with masked classifier-free guidance (ICCV 2023, https://arxiv.org/abs/2308.07687; code
    https://github.com/cure-lab/DiffGuard). Registered as ``diffguard_cfg``; ``DiffGuard(guidance="cfg")``
    builds it."""

    name = "diffguard_cfg"
    PARAMS = {
        **DiffGuard.PARAMS,
        "guidance": replace(DiffGuard.PARAMS["guidance"], default="cfg",
                            doc="fixed: this class is the classifier-free path"),
        "cfg_scale": Param(10.0, "guidance scale w: eps_u + w (eps_y - eps_u)", low=0),
        "cam_cut": Param(None, "null = variant (code 0.3, paper 0.2); Grad-CAM threshold (negative: guide the "
                               "low-activation area); false = CFG everywhere", types=(float,), off=True, low=-1, high=1),
        "cam_layer": Param("layer4.-1", "classifier module whose Grad-CAM masks the guidance (dotted path)"),
    }
    _SWITCHES: ClassVar[tuple[str, ...]] = ("cam_cut",)

    def validate_params(self) -> None:
        p, me = self.params, type(self).__name__
        if not isinstance(p["cam_layer"], str) or not p["cam_layer"]:
            raise ParameterError(f"{me}: parameter 'cam_layer' must be a dotted module path such as 'layer4.-1', "
                                 f"got {p['cam_layer']!r}")
        super().validate_params()

    # ------------------------------------------------------------------ models
    def _check_model(self) -> None:
        if self.model.null_class is None:
            raise ValueError("guidance 'cfg' needs a class-conditional diffusion model with a null class")
        n = self.params["num_classes"]
        if n is not None and self.model.num_classes is not None and n > self.model.num_classes:
            raise ValueError(self._too_many_classes(n))

    def _check_classes(self, num_classes: int) -> None:
        if self.model.num_classes is not None and num_classes > self.model.num_classes:
            raise ValueError(self._too_many_classes(num_classes))

    def _too_many_classes(self, n: int) -> str:
        m = self.model
        return (f"DiffGuard: the classifier has {n} classes but the diffusion model has {m.num_classes} real classes "
                f"(its null class is {m.null_class}): classifier-free guidance toward a label >= {m.num_classes} "
                "would guide toward the null class or a row the model was never trained on. Use the diffusion "
                "model trained on the classifier's classes (num_class_embeds = classes + 1)")

    # ------------------------------------------------------------------ masked CFG
    def _guided_synthesis(self, net, images, x_px, y, space, eff: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        model = self.model
        inv_levels, den_levels = self.paths(eff)
        ddim = DDIM(model.schedule)
        z0 = space.codec.encode(x_px) if space.codec is not None else x_px
        with torch.no_grad():
            inv = ddim.invert(model_eps(model, label_key=UNCOND), z0, inv_levels,
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
