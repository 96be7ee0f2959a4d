"""``ScoreFusion``: the one entry point used standalone, by the ``fuse`` CLI and by OpenOOD's postprocessor.

Stable API (the OpenOOD ``diffguard_fusion`` postprocessor builds on it)::

    fusion = ScoreFusion("cascade", alpha_out=0.02, alpha_in=0.0)      # or rule="rank", w=0.5, ...
    fusion = ScoreFusion("rank", w=0.5, budget=0.2)   # any rule: only 20 % of ID samples reach diffusion
    fusion.fit({"baseline": b_id_val, "diffusion": d_id_val})           # ID data only
    # cascade: fit({"baseline": b_id_val}) suffices (the band comes from the baseline alone); with a budget
    # d_id_val may be NaN outside fusion.route(b_id_val) (fit the baseline first: see FusionPostprocessor)
    need = fusion.route(b_test)            # bool mask: compute the diffusion score only there (band)
    conf, d = fusion.fuse_batch(b_batch, lambda x: detector_conf(x), images)   # the same, per batch
    conf = fusion({"baseline": b_test, "diffusion": d_test})            # higher = ID
    fusion.last_routed_fraction                                          # share of samples that needed d
    fusion.expected_routed_fraction        # the share of ID samples the band holds (= budget)
    ScoreFusion.sweep("cascade")           # {'alpha_out': [...], 'alpha_in': [...]} default APS grid
    fusion.set_params(alpha_out=0.01)      # cheap: re-derives thresholds from the cached ID fit

Conventions: every input score is **higher = ID** (negate distances first); arrays are 1-D numpy arrays
or torch tensors of equal length; the output is numpy, or a torch tensor on the first tensor's device
when any input was a tensor. Components are named freely; two names have a role: ``baseline`` (the
band's gate and the component weight ``w`` refers to) and ``diffusion`` (what the band routes).
Diffusion scores outside the routed band (cascade, or any rule with a ``budget``) may be NaN: never read.
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
        self.band_ecdf: ECDF | None = None  # baseline ID ECDF: sets the band and ranks samples outside it
        self.missing_fit = 0
        self.last_routed_fraction: float | None = None

    # ------------------------------------------------------------------ parameters
    @classmethod
    def sweep(cls, rule: str, budget: float | None = None) -> dict[str, list]:
        """Default APS grid of ``rule`` (parameter -> candidates); OpenOOD ymls spell keys ``<param>_list``.
        With a ``budget`` the band's start ``alpha_out`` is swept instead of ``alpha_in``."""
        if rule not in RULES:
            raise ValueError(f"unknown fusion rule {rule!r}; choose one of {sorted(RULES)}")
        return RULES[rule].sweep_grid(budget)

    def get_params(self) -> dict[str, Any]:
        return dict(self.rule.params)

    def set_params(self, **params: Any) -> "ScoreFusion":
        """Change rule parameters; re-derives rule state from the cached fit scores (no re-scoring).

        When the band moves onto ID fit samples without a diffusion score, ``missing_fit`` counts them and
        scoring refuses (rules that read the diffusion calibration) until ``fit`` is called with their scores.
        """
        self.rule.set_params(**params)
        if self.is_fitted:
            self._calibrate()
            if not self.missing_fit:
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
        """Fit calibrations on ID scores (e.g. ID-val). ``ood_val_scores`` only for ``uses_ood_val`` rules.

        With a band (cascade, or any rule with a ``budget``) the diffusion scores are only needed inside the
        band, which the baseline's ID scores alone determine: NaN elsewhere is fine (the cascade needs none at
        all). The diffusion calibration is fitted on the ID samples inside the band only, so a fit on routed
        validation scores equals a fit on fully scored ones.
        """
        if ood_val_scores is not None and not self.uses_ood_val:
            raise ValueError(f"fusion rule {self.rule_name!r} is calibrated on ID data only; refusing OOD "
                             f"scores (that would leak OOD statistics). Use rule='logistic' to fit on OOD-val.")
        if ood_val_scores is None and self.uses_ood_val:
            raise ValueError(f"fusion rule {self.rule_name!r} is fitted on ID-val vs OOD-val: pass ood_val_scores")
        cascade = isinstance(self.rule, Cascade)
        if cascade:
            names = sorted(id_scores) if isinstance(id_scores, Mapping) else type(id_scores).__name__
            if not isinstance(id_scores, Mapping) or self.baseline not in id_scores or \
                    not set(id_scores) <= {self.baseline, self.diffusion}:
                raise ValueError(f"the cascade combines exactly a {self.baseline!r} and a {self.diffusion!r} score "
                                 f"(ID fit needs {self.baseline!r}), got {names}")
        self.calibrators, self.band_ecdf = {}, None  # unfitted until this fit succeeds
        # ID diffusion scores may be NaN anywhere here: _calibrate names missing ones inside the band
        fit = self._band_scores(id_scores, "ID fit scores", new=True, inside_finite=False)
        if cascade and self.diffusion not in fit:
            fit[self.diffusion] = np.full_like(fit[self.baseline], np.nan)
        if len(fit) < 2:
            raise ValueError(f"fusion needs at least two scores, got {sorted(fit)}")
        band_ecdf = ECDF().fit(fit[self.baseline], name=f"ID fit scores {self.baseline!r}")
        self.band_ecdf = band_ecdf
        self.components = tuple(fit)
        self.fit_scores = fit
        self.ood_val_scores = None
        try:
            self._calibrate(strict=True)
            if ood_val_scores is not None:
                self.ood_val_scores = self._band_scores(ood_val_scores, "OOD-val scores")
            self.rule.fit(self)
        except Exception:
            self.calibrators = {}
            raise
        return self

    def _band_scores(self, scores: Mapping[str, Any], what: str, new: bool = False,
                     inside_finite: bool = True) -> dict[str, np.ndarray]:
        """Checked scores; with a band the diffusion component may be NaN outside it (and, with
        ``inside_finite=False``, inside it too)."""
        if not isinstance(scores, Mapping) or not scores:
            raise TypeError(f"{what}: expected a dict name -> 1-D scores, got {type(scores).__name__}")
        if self.baseline not in scores:
            raise KeyError(f"{what}: no {self.baseline!r} (baseline) score among {sorted(scores)}")
        if not (self.rule.routes or isinstance(self.rule, Cascade)):
            return self._check_scores(scores, what, new=new)
        b = as_numpy(scores[self.baseline], f"{what} {self.baseline!r}")
        check_finite(b, f"{what} {self.baseline!r}")
        if inside_finite and self.band_ecdf is not None:
            mask = self.rule.needs_diffusion(b, self)
        else:
            mask = np.zeros(b.shape, dtype=bool)
        return self._check_scores(scores, what, new=new, allow_nan={self.diffusion: mask})

    def fit_band(self, baseline_id_scores: Any) -> "ScoreFusion":
        """First half of a routed fit: the band from the baseline's ID scores alone, so that ``route`` picks the
        ID samples whose diffusion score ``fit`` needs (all of them without a band). Unfitted until ``fit``."""
        b = as_numpy(baseline_id_scores, f"ID fit scores {self.baseline!r}")
        self.calibrators = {}
        self.band_ecdf = ECDF().fit(b, name=f"ID fit scores {self.baseline!r}")
        return self

    def band_rows(self, scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The samples of ``scores`` inside the band (all of them without one)."""
        mask = self.rule.needs_diffusion(scores[self.baseline], self)
        return {c: v[mask] for c, v in scores.items()}

    def _calibrate(self, strict: bool = False) -> None:
        """Per-component calibrations from ``fit_scores``; the routed diffusion score on the band only.

        ``strict``: in-band samples without a diffusion score are an error (fresh fit); otherwise (the band
        moved with ``set_params``) they are counted in ``missing_fit`` and scoring refuses until a refit.
        """
        calib = ECDF if self.rule.calibration == "ecdf" else ZScore
        cascade = isinstance(self.rule, Cascade)
        missing = 0
        self.calibrators = {}
        for c, v in self.fit_scores.items():
            if c == self.diffusion and (self.rule.routes or cascade):
                inside = v[self.rule.needs_diffusion(self.fit_scores[self.baseline], self)]
                known = inside[np.isfinite(inside)]
                if cascade:  # only the order inside the band matters: any strictly increasing map will do
                    self.calibrators[c] = ECDF().fit(known) if known.size >= 2 else Squash()
                    continue
                if inside.size > known.size and strict:
                    raise ValueError(f"ID fit scores {c!r}: {inside.size - known.size} of the {inside.size} samples "
                                     f"inside the band have no score (NaN); the band is set by the baseline's ID "
                                     f"scores, compute {c!r} for those (fusion.route(baseline_id_scores))")
                if known.size < 2:
                    raise ValueError(f"ID fit scores {c!r}: {known.size} samples inside the band; need at least 2 "
                                     f"to calibrate (raise the budget or add ID validation data)")
                missing += inside.size - known.size
                self.calibrators[c] = calib().fit(known, name=f"ID fit scores {c!r} inside the band")
            else:
                self.calibrators[c] = calib().fit(v, name=f"ID fit scores {c!r}")
        if self.ood_val_scores is not None:  # only rules fitted on OOD-val keep these
            inside = self.band_rows(self.ood_val_scores)[self.diffusion]
            missing += int((~np.isfinite(inside)).sum())
        self.missing_fit = missing

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
        """Bool mask of samples that need the diffusion score: the band (all True without one)."""
        if self.band_ecdf is None:
            raise RuntimeError("ScoreFusion.route() before fit(id_scores) (or fit_band(baseline_id_scores))")
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
        """Share of ID samples the calibrated band sends to the diffusion detector (the budget; 1 without band)."""
        levels = self.rule.band_levels()
        return 1.0 if levels is None else levels[1] - levels[0]

    def __call__(self, scores: Mapping[str, Any]) -> Any:
        """Fused confidence, higher = ID."""
        like = next((v for v in scores.values() if hasattr(v, "detach")), None) if isinstance(scores, Mapping) else None
        if not self.is_fitted:
            raise RuntimeError("ScoreFusion used before fit(id_scores)")
        if self.missing_fit:
            raise RuntimeError(f"ScoreFusion: {self.missing_fit} fit samples inside the moved band have no "
                               f"{self.diffusion!r} score: fit again with them (scores of the samples "
                               f"fusion.route(baseline fit scores) selects)")
        # a band is never read outside: diffusion scores may be NaN there
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
                "band": self.band_ecdf.state() if self.band_ecdf is not None else None,
                "calibrators": {c: k.state() for c, k in self.calibrators.items()}}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"ScoreFusion({self.rule_name!r}, {args})"
