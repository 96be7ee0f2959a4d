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


#: parameters every rule has: the compute budget and where its band starts (see ``FusionRule.band_levels``)
BAND_DEFAULTS: dict[str, Any] = {"budget": None, "alpha_out": 0.02}


class FusionRule:
    """Base of the fusion rules. Every rule can be *budgeted*: with ``budget = rho`` only the samples whose
    baseline score falls in the ID-quantile band ``(F_b^-1(a), F_b^-1(a + rho))``, ``a = min(alpha_out,
    1 - rho)``, reach the diffusion detector and are fused by the rule; the rest is ranked by the baseline
    alone: ``S = F_b(b)`` below the band (trusted OOD), ``1 + s(rule)`` inside, ``2 + F_b(b)`` above (trusted
    ID), with ``s`` a strictly increasing map of the rule's score into (0, 1). ``rho`` is the share of ID
    samples routed (exactly, in expectation); the OOD share depends on the OOD data and is reported.
    """
    name: ClassVar[str] = ""
    #: ``"ecdf"`` or ``"zscore"``: the per-component calibration this rule consumes
    calibration: ClassVar[str] = "ecdf"
    #: parameters with defaults (unknown keys are rejected)
    DEFAULTS: ClassVar[dict[str, Any]] = dict(BAND_DEFAULTS)
    #: default APS grid: parameter -> candidate values
    SWEEP: ClassVar[dict[str, list]] = {}
    #: APS grid of the band's start when a budget is set (all below 0.05: the 95 %-ID-recall threshold then
    #: lies inside the band, where the diffusion score decides)
    BAND_SWEEP: ClassVar[dict[str, list]] = {"alpha_out": [0.005, 0.01, 0.02, 0.03, 0.04]}
    #: True for rules fitted on labelled OOD validation data (like OpenOOD's APS)
    uses_ood_val: ClassVar[bool] = False
    #: True when ``fuse`` already lies in (0, 1) (no squashing inside the band)
    unit_interval: ClassVar[bool] = False
    #: False when the in-band ranking ignores the diffusion calibration (the cascade: any monotone map)
    reads_diffusion_calibration: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = {}
        self.set_params(**{**self.DEFAULTS, **params})

    def set_params(self, **params: Any) -> None:
        unknown = set(params) - set(self.DEFAULTS)
        if unknown:
            raise TypeError(f"fusion rule {self.name!r}: unknown parameter(s) {sorted(unknown)}; "
                            f"allowed: {sorted(self.DEFAULTS)}")
        _check_band(self.name, {**self.params, **params})
        self.validate(params)
        self.params.update(params)

    def validate(self, params: Mapping[str, Any]) -> None:
        """Raise ValueError for out-of-range parameters."""

    @classmethod
    def sweep_grid(cls, budget: float | None = None) -> dict[str, list]:
        """Default APS grid; with a budget the band's start ``alpha_out`` is swept (never the budget itself)."""
        if budget is None:
            return {k: list(v) for k, v in cls.SWEEP.items()}
        grid = {k: list(v) for k, v in cls.SWEEP.items() if k not in ("alpha_in", "alpha_out")}
        return {**grid, **{k: list(v) for k, v in cls.BAND_SWEEP.items()}}

    # ------------------------------------------------------------------ band
    def band_levels(self) -> tuple[float, float] | None:
        """ID-quantile levels ``(lo, hi)`` of the routed band, or None: no band, every sample is routed."""
        rho = self.params.get("budget")
        if rho is None:
            return None
        lo = min(float(self.params["alpha_out"]), 1.0 - float(rho))
        return lo, min(1.0, lo + float(rho))

    @property
    def routes(self) -> bool:
        return self.band_levels() is not None

    def thresholds(self, fusion: Any) -> tuple[float, float]:
        levels = self.band_levels()
        if levels is None:
            return -np.inf, np.inf
        ecdf: ECDF = fusion.band_ecdf
        return ecdf.quantile(levels[0]), ecdf.quantile(levels[1])

    def fit(self, fusion: "Any") -> None:
        """Derive state from the fitted calibrators / cached fit scores of ``fusion`` (cheap)."""

    def needs_diffusion(self, baseline: np.ndarray, fusion: "Any") -> np.ndarray:
        """Mask of samples whose diffusion score the rule reads: the band (everything without a budget)."""
        tau_out, tau_in = self.thresholds(fusion)
        return (baseline > tau_out) & (baseline < tau_in)

    def combine(self, raw: Mapping[str, np.ndarray], fusion: "Any") -> np.ndarray:
        """Fused confidence from raw (checked) component scores: the rule inside the band, the baseline outside."""
        if not self.routes:
            return self.fuse(raw, fusion)
        b_raw = raw[fusion.baseline]
        mid = self.needs_diffusion(b_raw, fusion)
        out = fusion.band_ecdf(b_raw)                                  # trusted OOD: F_b in (0, 1)
        if mid.any():
            inner = self.fuse({c: v[mid] for c, v in raw.items()}, fusion)
            out[mid] = 1.0 + (inner if self.unit_interval else squash(inner))  # routed: (1, 2)
        out[b_raw >= self.thresholds(fusion)[1]] += 2.0                # trusted ID: (2, 3)
        return out

    def fuse(self, raw: Mapping[str, np.ndarray], fusion: "Any") -> np.ndarray:
        """The rule's fused confidence of samples that have every score; calibrate via ``fusion.calibrators``."""
        raise NotImplementedError


def squash(x: np.ndarray) -> np.ndarray:
    """Strictly increasing map of the real line onto (0, 1)."""
    return 0.5 + np.arctan(x) / np.pi


def _check_band(name: str, params: Mapping[str, Any]) -> None:
    rho = params.get("budget")
    if rho is not None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < float(rho) <= 1.0:
            raise ValueError(f"fusion rule {name!r}: budget (share of ID samples routed to the diffusion "
                             f"detector) must be in (0, 1] or null, got {rho!r}")
        if float(params.get("alpha_in", 0.0)) != 0.0:
            raise ValueError(f"fusion rule {name!r}: give either budget or alpha_in (the budget sets the band's "
                             f"top), got budget={rho}, alpha_in={params['alpha_in']}")
    a_out = params.get("alpha_out", 0.0)
    if isinstance(a_out, bool) or not isinstance(a_out, (int, float)) or not 0.0 <= float(a_out) <= 1.0:
        raise ValueError(f"fusion rule {name!r}: alpha_out (ID share below the band) must be in [0, 1], "
                         f"got {a_out!r}")
    if rho is None and "alpha_in" not in params and float(a_out) != BAND_DEFAULTS["alpha_out"]:
        raise ValueError(f"fusion rule {name!r}: alpha_out places the band of a budget; without budget every "
                         f"sample is fused (set budget too), got alpha_out={a_out}")


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
    DEFAULTS = {"w": 0.5, **BAND_DEFAULTS}
    SWEEP = {"w": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]}
    unit_interval = True  # a convex combination of ECDF values

    def validate(self, params):
        _check_weight(params)

    @staticmethod
    def term(calibrator, raw: np.ndarray) -> np.ndarray:
        """Per-component term that is weighted and summed."""
        return calibrator(raw)

    def fuse(self, raw, fusion):
        weights = component_weights(fusion, float(self.params["w"]))
        return sum(weights[c] * self.term(fusion.calibrators[c], raw[c]) for c in fusion.components)


class WeightedZScoreSum(WeightedRankSum):
    """(A') ``S = w z_b + (1 - w) z_d`` with ID mean/std z-scores (keeps the size of score gaps)."""
    name = "zscore"
    calibration = "zscore"
    unit_interval = False


class Cascade(FusionRule):
    """(B) the paper's rule: the baseline decides clear cases, the diffusion detector the uncertain band.

    ``tau_out = F_b^-1(alpha_out)``, ``tau_in = F_b^-1(1 - alpha_in)`` (ID-val quantiles of the baseline).
    ``S = 2 + F_b(b)`` if ``b >= tau_in`` (trusted ID), ``1 + F_d(d)`` if ``tau_out < b < tau_in``
    (hard: only here the diffusion score is read), ``F_b(b)`` if ``b <= tau_out`` (trusted OOD).
    On ID data a fraction ``1 - alpha_out - alpha_in`` reaches the diffusion model; with ``budget = rho``
    the band is ``(alpha_out, alpha_out + rho)`` instead (``alpha_in`` must stay 0).
    """
    name = "cascade"
    DEFAULTS = {"alpha_out": 0.02, "alpha_in": 0.0, "budget": None}
    SWEEP = {"alpha_out": [0.005, 0.01, 0.02, 0.03, 0.04], "alpha_in": [0.0, 0.05, 0.1, 0.2]}
    unit_interval = True
    reads_diffusion_calibration = False

    def validate(self, params):
        a_out = float(params.get("alpha_out", self.params.get("alpha_out", 0.0)))
        a_in = float(params.get("alpha_in", self.params.get("alpha_in", 0.0)))
        if not (0.0 <= a_out <= 1.0 and 0.0 <= a_in <= 1.0 and a_out + a_in <= 1.0):
            raise ValueError(f"cascade band needs 0 <= alpha_out, alpha_in and alpha_out + alpha_in <= 1, "
                             f"got alpha_out={a_out}, alpha_in={a_in}")

    def band_levels(self):
        if self.params.get("budget") is not None:
            return super().band_levels()
        return float(self.params["alpha_out"]), 1.0 - float(self.params["alpha_in"])

    def fuse(self, raw, fusion):
        return fusion.calibrators[fusion.diffusion](raw[fusion.diffusion])


class ProbabilityProduct(WeightedRankSum):
    """(C) product of calibrated ID-probabilities ``F_b^w F_d^(1-w)`` (w = 0.5: plain product), as logs."""
    name = "product"
    unit_interval = False

    @staticmethod
    def term(calibrator, raw):
        return calibrator.log_prob(raw)  # exact where F underflows far below the ID range


class MinProbability(FusionRule):
    """(C') tandem / MoodCat OR-rule: rejected if any detector rejects, ``S = min_c F_c``."""
    name = "min"

    def fuse(self, raw, fusion):
        # log F keeps far-OOD samples ordered where F itself underflows
        return np.min(np.stack([fusion.calibrators[c].log_prob(raw[c]) for c in fusion.components]), axis=0)


class LogisticStack(FusionRule):
    """(D) logistic regression on the ECDF log-odds, fitted on ID-val (label 1) vs **OOD-val** (label 0).

    Uses labelled OOD validation data, like OpenOOD's APS; results are not comparable with ID-only rules.
    """
    name = "logistic"
    DEFAULTS = {"C": 1.0, **BAND_DEFAULTS}
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

        # with a budget only the band is fused: fit on the ID-val / OOD-val samples inside it
        x_id, x_ood = (self._features(fusion.band_rows(scores), fusion)
                       for scores in (fusion.fit_scores, fusion.ood_val_scores))
        if len(x_id) < 2 or len(x_ood) < 2:
            raise ValueError(f"logistic fusion: the band holds {len(x_id)} ID-val and {len(x_ood)} OOD-val samples "
                             f"with every score; need at least 2 of each (raise the budget or add validation data)")
        y = np.r_[np.ones(len(x_id)), np.zeros(len(x_ood))]
        self.model = LogisticRegression(C=float(self.params["C"])).fit(np.concatenate([x_id, x_ood]), y)

    def fuse(self, raw, fusion):
        return self.model.decision_function(self._features(raw, fusion))


RULES: dict[str, type[FusionRule]] = {r.name: r for r in
                                      (WeightedRankSum, WeightedZScoreSum, Cascade, ProbabilityProduct,
                                       MinProbability, LogisticStack)}
