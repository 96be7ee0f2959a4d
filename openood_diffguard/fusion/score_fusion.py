"""``ScoreFusion``: the one entry point used standalone, by the ``fuse`` CLI and by OpenOOD's postprocessor.

Stable API (the OpenOOD ``diffguard_fusion`` postprocessor builds on it)::

    fusion = ScoreFusion("cascade", alpha_out=0.02, alpha_in=0.0)      # or rule="rank", w=0.5, ...
    fusion.fit({"baseline": b_id_val, "diffusion": d_id_val})           # ID data only
    # cascade: fit({"baseline": b_id_val}) suffices (the band comes from the baseline alone)
    need = fusion.route(b_test)            # bool mask: compute the diffusion score only there (cascade)
    conf, d = fusion.fuse_batch(b_batch, lambda x: detector_conf(x), images)   # the same, per batch
    conf = fusion({"baseline": b_test, "diffusion": d_test})            # higher = ID
    fusion.last_routed_fraction                                          # share of samples that needed d
    ScoreFusion.sweep("cascade")           # {'alpha_out': [...], 'alpha_in': [...]} default APS grid
    fusion.set_params(alpha_out=0.01)      # cheap: re-derives thresholds from the cached ID fit

Conventions: every input score is **higher = ID** (negate distances first); arrays are 1-D numpy arrays
or torch tensors of equal length; the output is numpy, or a torch tensor on the first tensor's device
when any input was a tensor. Components are named freely; two names have a role: ``baseline`` (the
cascade's gate and the component weight ``w`` refers to) and ``diffusion`` (what the cascade routes).
Diffusion scores outside the routed band may be NaN for the cascade (they are never read).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from .calibration import ECDF, Squash, ZScore, as_numpy, check_finite
from .rules import RULES, Cascade, FusionRule


def torch_mask(mask: np.ndarray, like: Any) -> Any:
    """A numpy bool mask as an index for ``like`` (a torch tensor on its device, or numpy)."""
    if hasattr(like, "detach"):
        import torch

        return torch.as_tensor(mask, device=like.device)
    return mask


class ScoreFusion:
    RULES = RULES

    def __init__(self, rule: str = "rank", baseline: str = "baseline", diffusion: str = "diffusion",
                 **params: Any) -> None:
        if rule not in RULES:
            raise ValueError(f"unknown fusion rule {rule!r}; choose one of {sorted(RULES)}")
        self.rule_name = rule
        self.rule: FusionRule = RULES[rule](**params)
        self.baseline, self.diffusion = baseline, diffusion
        self.components: tuple[str, ...] = ()
        self.calibrators: dict[str, ECDF | ZScore | Squash] = {}
        self.fit_scores: dict[str, np.ndarray] = {}
        self.ood_val_scores: dict[str, np.ndarray] | None = None
        self.last_routed_fraction: float | None = None

    # ------------------------------------------------------------------ parameters
    @classmethod
    def sweep(cls, rule: str) -> dict[str, list]:
        """Default APS grid of ``rule`` (parameter -> candidates); OpenOOD ymls spell keys ``<param>_list``."""
        if rule not in RULES:
            raise ValueError(f"unknown fusion rule {rule!r}; choose one of {sorted(RULES)}")
        return {k: list(v) for k, v in RULES[rule].SWEEP.items()}

    def get_params(self) -> dict[str, Any]:
        return dict(self.rule.params)

    def set_params(self, **params: Any) -> "ScoreFusion":
        """Change rule parameters; re-derives rule state from the cached fit scores (no re-scoring)."""
        self.rule.set_params(**params)
        if self.is_fitted:
            self.rule.fit(self)
        return self

    @property
    def uses_ood_val(self) -> bool:
        return self.rule.uses_ood_val

    @property
    def is_fitted(self) -> bool:
        return bool(self.calibrators)

    # ------------------------------------------------------------------ fitting
    def fit(self, id_scores: Mapping[str, Any], ood_val_scores: Mapping[str, Any] | None = None) -> "ScoreFusion":
        """Fit calibrations on ID scores (e.g. ID-val). ``ood_val_scores`` only for ``uses_ood_val`` rules."""
        if ood_val_scores is not None and not self.uses_ood_val:
            raise ValueError(f"fusion rule {self.rule_name!r} is calibrated on ID data only; refusing OOD "
                             f"scores (that would leak OOD statistics). Use rule='logistic' to fit on OOD-val.")
        if ood_val_scores is None and self.uses_ood_val:
            raise ValueError(f"fusion rule {self.rule_name!r} is fitted on ID-val vs OOD-val: pass ood_val_scores")
        if isinstance(self.rule, Cascade):
            return self._fit_cascade(id_scores)
        fit = self._check_scores(id_scores, "ID fit scores", new=True)
        if len(fit) < 2:
            raise ValueError(f"fusion needs at least two scores, got {sorted(fit)}")
        self.components = tuple(fit)
        calib = ECDF if self.rule.calibration == "ecdf" else ZScore
        # the cascade gates on baseline ECDF quantiles whatever the calibration
        self.calibrators = {c: calib().fit(v, name=f"ID scores {c!r}") for c, v in fit.items()}
        self.fit_scores = fit
        self.ood_val_scores = None
        if ood_val_scores is not None:
            ood = self._check_scores(ood_val_scores, "OOD-val scores")
            self.ood_val_scores = ood
        self.rule.fit(self)
        return self

    def _fit_cascade(self, id_scores: Mapping[str, Any]) -> "ScoreFusion":
        """The cascade needs only the baseline's ID scores: they set the band. ID diffusion scores are
        optional and may be NaN where not computed (e.g. outside the band); they only choose the monotone
        map of the diffusion score into (1, 2), which does not change the ranking."""
        names = sorted(id_scores) if isinstance(id_scores, Mapping) else type(id_scores).__name__
        if not isinstance(id_scores, Mapping) or self.baseline not in id_scores or \
                not set(id_scores) <= {self.baseline, self.diffusion}:
            raise ValueError(f"the cascade combines exactly a {self.baseline!r} and a {self.diffusion!r} score "
                             f"(ID fit needs {self.baseline!r}), got {names}")
        b = as_numpy(id_scores[self.baseline], f"ID fit scores {self.baseline!r}")
        self.calibrators = {self.baseline: ECDF().fit(b, name=f"ID fit scores {self.baseline!r}")}
        d = np.full_like(b, np.nan)
        if self.diffusion in id_scores:
            d = as_numpy(id_scores[self.diffusion], f"ID fit scores {self.diffusion!r}")
            if d.shape != b.shape:
                raise ValueError(f"ID fit scores: {self.diffusion!r} has {d.size} entries, {self.baseline!r} {b.size}")
        known = d[np.isfinite(d)]
        self.calibrators[self.diffusion] = ECDF().fit(known) if known.size >= 2 else Squash()
        self.components = (self.baseline, self.diffusion)
        self.fit_scores, self.ood_val_scores = {self.baseline: b, self.diffusion: d}, None
        self.rule.fit(self)
        return self

    def _check_scores(self, scores: Mapping[str, Any], what: str, new: bool = False,
                      allow_nan: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if not isinstance(scores, Mapping) or not scores:
            raise TypeError(f"{what}: expected a dict name -> 1-D scores, got {type(scores).__name__}")
        if not new:
            if not self.is_fitted:
                raise RuntimeError("ScoreFusion used before fit(id_scores)")
            if set(scores) != set(self.components):
                raise KeyError(f"{what}: scores {sorted(scores)} do not match the fitted components "
                               f"{sorted(self.components)}")
        out = {c: as_numpy(v, f"{what} {c!r}") for c, v in scores.items()}
        lengths = {c: v.size for c, v in out.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{what}: components have different lengths {lengths}")
        for c, v in out.items():
            mask = (allow_nan or {}).get(c)
            check_finite(v if mask is None else v[mask], f"{what} {c!r}")
        return out

    # ------------------------------------------------------------------ scoring
    def route(self, baseline_scores: Any) -> np.ndarray:
        """Bool mask of samples that need the diffusion score (all True except for the cascade)."""
        if not self.is_fitted:
            raise RuntimeError("ScoreFusion.route() before fit(id_scores)")
        b = as_numpy(baseline_scores, f"baseline scores {self.baseline!r}")
        check_finite(b, f"baseline scores {self.baseline!r}")
        mask = self.rule.needs_diffusion(b, self)
        self.last_routed_fraction = float(mask.mean()) if mask.size else 0.0
        return mask

    def fuse_batch(self, baseline_scores: Any, diffusion_fn: Callable[..., Any], *inputs: Any) -> tuple[Any, Any]:
        """Route one batch, run ``diffusion_fn(*[x[need] for x in inputs])`` on the routed samples only, fuse.

        Returns ``(fused, diffusion)`` where ``diffusion`` is the full-length diffusion confidence with NaN
        for samples that never reached the diffusion model (cache it as such). ``inputs`` are indexed with
        the routing mask (numpy arrays or tensors, e.g. the image batch); nothing runs when no sample is routed.
        """
        need = self.route(baseline_scores)
        b = as_numpy(baseline_scores, f"baseline scores {self.baseline!r}")
        d = np.full_like(b, np.nan)
        if need.any():
            picked = [x[torch_mask(need, x)] for x in inputs]
            d[need] = as_numpy(diffusion_fn(*picked), "diffusion_fn output")
        fused = self({self.baseline: baseline_scores, self.diffusion: d})
        if hasattr(fused, "detach"):
            import torch

            return fused, torch.as_tensor(d, device=fused.device)
        return fused, d

    @property
    def expected_routed_fraction(self) -> float:
        """Share of ID samples the calibrated band sends to the diffusion detector (1 unless cascade)."""
        if isinstance(self.rule, Cascade):
            return 1.0 - float(self.rule.params["alpha_out"]) - float(self.rule.params["alpha_in"])
        return 1.0

    def __call__(self, scores: Mapping[str, Any]) -> Any:
        """Fused confidence, higher = ID."""
        like = next((v for v in scores.values() if hasattr(v, "detach")), None) if isinstance(scores, Mapping) else None
        if not self.is_fitted:
            raise RuntimeError("ScoreFusion used before fit(id_scores)")
        # the cascade never reads diffusion scores outside its band: they may be NaN there
        mask = self.route(scores[self.baseline]) if self.baseline in scores else None
        raw = self._check_scores(scores, "scores", allow_nan={self.diffusion: mask})
        fused = self.rule.combine(raw, self)
        if like is not None:
            import torch

            return torch.as_tensor(fused, device=like.device)
        return fused

    def state(self) -> dict[str, Any]:
        """Fitted state (calibrations + rule parameters): identical fits give identical states."""
        return {"components": self.components, "rule": self.rule_name, "params": self.get_params(),
                "calibrators": {c: k.state() for c, k in self.calibrators.items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ScoreFusion({self.rule_name!r}, {args})"
