"""Fusion rules: how calibrated per-detector scores become one confidence (higher = ID).

Every rule sees the components through the calibration fitted by :class:`ScoreFusion` on ID data
(``ECDF`` -> ID-probability in (0, 1), or ``ZScore``). Rules only hold cheap derived state (weights,
band thresholds, a logistic model), so APS can re-set their parameters without re-scoring anything.
Only the cascade is described by a paper (DiffGuard's CIFAR-10 / ImageNet fusions); the others are ours.
"""
from __future__ import annotations

from typing import Any, ClassVar, Mapping

import numpy as np

from .calibration import ECDF


class FusionRule:
    name: ClassVar[str] = ""
    #: ``"ecdf"`` or ``"zscore"``: the per-component calibration this rule consumes
    calibration: ClassVar[str] = "ecdf"
    #: parameters with defaults (unknown keys are rejected)
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: default APS grid: parameter -> candidate values
    SWEEP: ClassVar[dict[str, list]] = {}
    #: True for rules fitted on labelled OOD validation data (like OpenOOD's APS)
    uses_ood_val: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = {}
        self.set_params(**{**self.DEFAULTS, **params})

    def set_params(self, **params: Any) -> None:
        unknown = set(params) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"fusion rule {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                            f"allowed: {sorted(self.DEFAULTS)}")
        self.validate(params)
        self.params.update(params)

    def validate(self, params: Mapping[str, Any]) -> None:
        """Raise ValueError for out-of-range parameters."""

    def fit(self, fusion: "Any") -> None:
        """Derive state from the fitted calibrators / cached fit scores of ``fusion`` (cheap)."""

    def needs_diffusion(self, baseline: np.ndarray, fusion: "Any") -> np.ndarray:
        """Mask of samples whose diffusion score the rule reads (all, except for the cascade)."""
        return np.ones(baseline.shape, dtype=bool)

    def combine(self, raw: Mapping[str, np.ndarray], fusion: "Any") -> np.ndarray:
        """Fused confidence from raw (checked) component scores; calibrate via ``fusion.calibrators``."""
        raise NotImplementedError


def _check_weight(params: Mapping[str, Any]) -> None:
    if "w" in params and not 0.0 <= float(params["w"]) <= 1.0:
        raise ValueError(f"baseline weight w must be in [0, 1], got {params['w']}")


def component_weights(fusion: Any, w: float) -> dict[str, float]:
    """``w`` for the baseline component, ``1 - w`` split equally over the others."""
    others = [c for c in fusion.components if c != fusion.baseline]
    if fusion.baseline not in fusion.components:
        raise KeyError(f"baseline component {fusion.baseline!r} not among the scores {fusion.components}")
    return {fusion.baseline: w, **{c: (1.0 - w) / len(others) for c in others}}


class WeightedRankSum(FusionRule):
    """(A) ``S = w F_b(b) + (1 - w) F_d(d)`` with ID ECDFs F (rank normalisation)."""
    name = "rank"
    DEFAULTS = {"w": 0.5}
    SWEEP = {"w": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}

    def validate(self, params):
        _check_weight(params)

    @staticmethod
    def term(calibrator, raw: np.ndarray) -> np.ndarray:
        """Per-component term that is weighted and summed."""
        return calibrator(raw)

    def combine(self, raw, fusion):
        weights = component_weights(fusion, float(self.params["w"]))
        return sum(weights[c] * self.term(fusion.calibrators[c], raw[c]) for c in fusion.components)


class WeightedZScoreSum(WeightedRankSum):
    """(A') ``S = w z_b + (1 - w) z_d`` with ID mean/std z-scores (keeps the size of score gaps)."""
    name = "zscore"
    calibration = "zscore"


class Cascade(FusionRule):
    """(B) the paper's rule: the baseline decides clear cases, the diffusion detector the uncertain band.

    ``tau_out = F_b^-1(alpha_out)``, ``tau_in = F_b^-1(1 - alpha_in)`` (ID-val quantiles of the baseline).
    ``S = 2 + F_b(b)`` if ``b >= tau_in`` (trusted ID), ``1 + F_d(d)`` if ``tau_out < b < tau_in``
    (hard: only here the diffusion score is read), ``F_b(b)`` if ``b <= tau_out`` (trusted OOD).
    On ID data a fraction ``1 - alpha_out - alpha_in`` reaches the diffusion model.
    """
    name = "cascade"
    DEFAULTS = {"alpha_out": 0.02, "alpha_in": 0.0}
    SWEEP = {"alpha_out": [0.005, 0.01, 0.02, 0.03, 0.04], "alpha_in": [0.0, 0.05, 0.1, 0.2]}

    def validate(self, params):
        a_out = float(params.get("alpha_out", self.params.get("alpha_out", 0.0)))
        a_in = float(params.get("alpha_in", self.params.get("alpha_in", 0.0)))
        if not (0.0 <= a_out <= 1.0 and 0.0 <= a_in <= 1.0 and a_out + a_in <= 1.0):
            raise ValueError(f"cascade band needs 0 <= alpha_out, alpha_in and alpha_out + alpha_in <= 1, "
                             f"got alpha_out={a_out}, alpha_in={a_in}")

    def thresholds(self, fusion) -> tuple[float, float]:
        ecdf: ECDF = fusion.calibrators[fusion.baseline]
        return ecdf.quantile(float(self.params["alpha_out"])), ecdf.quantile(1.0 - float(self.params["alpha_in"]))

    def needs_diffusion(self, baseline, fusion):
        tau_out, tau_in = self.thresholds(fusion)
        return (baseline > tau_out) & (baseline < tau_in)

    def combine(self, raw, fusion):
        b_raw = raw[fusion.baseline]
        mid = self.needs_diffusion(b_raw, fusion)
        out = fusion.calibrators[fusion.baseline](b_raw)             # trusted OOD: F_b in (0, 1)
        out[mid] = 1.0 + fusion.calibrators[fusion.diffusion](raw[fusion.diffusion][mid])  # hard band: (1, 2)
        trusted_id = b_raw >= self.thresholds(fusion)[1]
        out[trusted_id] += 2.0                                       # trusted ID: (2, 3)
        return out


class ProbabilityProduct(WeightedRankSum):
    """(C) product of calibrated ID-probabilities ``F_b^w F_d^(1-w)`` (w = 0.5: plain product), as logs."""
    name = "product"

    @staticmethod
    def term(calibrator, raw):
        return calibrator.log_prob(raw)  # exact where F underflows far below the ID range


class MinProbability(FusionRule):
    """(C') tandem / MoodCat OR-rule: rejected if any detector rejects, ``S = min_c F_c``."""
    name = "min"

    def combine(self, raw, fusion):
        # log F keeps far-OOD samples ordered where F itself underflows
        return np.min(np.stack([fusion.calibrators[c].log_prob(raw[c]) for c in fusion.components]), axis=0)


class LogisticStack(FusionRule):
    """(D) logistic regression on the ECDF log-odds, fitted on ID-val (label 1) vs **OOD-val** (label 0).

    Uses labelled OOD validation data, like OpenOOD's APS; results are not comparable with ID-only rules.
    """
    name = "logistic"
    DEFAULTS = {"C": 1.0}
    SWEEP = {"C": [0.01, 0.1, 1.0, 10.0]}
    uses_ood_val = True

    def validate(self, params):
        if "C" in params and not float(params["C"]) > 0:
            raise ValueError(f"logistic C must be > 0, got {params['C']}")

    @staticmethod
    def _features(raw, fusion) -> np.ndarray:
        return np.stack([fusion.calibrators[c].log_odds(raw[c]) for c in fusion.components], axis=1)

    def fit(self, fusion):
        from sklearn.linear_model import LogisticRegression

        x_id, x_ood = self._features(fusion.fit_scores, fusion), self._features(fusion.ood_val_scores, fusion)
        y = np.r_[np.ones(len(x_id)), np.zeros(len(x_ood))]
        self.model = LogisticRegression(C=float(self.params["C"])).fit(np.concatenate([x_id, x_ood]), y)

    def combine(self, raw, fusion):
        return self.model.decision_function(self._features(raw, fusion))


RULES: dict[str, type[FusionRule]] = {r.name: r for r in
                                      (WeightedRankSum, WeightedZScoreSum, Cascade, ProbabilityProduct,
                                       MinProbability, LogisticStack)}
