"""Per-score calibration fitted on in-distribution scores only.

Scores of different detectors live on unrelated scales (energy ~ 10, 1 - DISTS ~ 0.7, -KNN distance ~ -1),
so every fusion rule first maps each score through a monotone calibration fitted on **ID data only**
(OpenOOD ``id['val']``): the ID test statistics are unknown at fit time and OOD statistics would leak the
answer. Both calibrations are strictly increasing, so a single score keeps its ranking (AUROC) unchanged.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def as_numpy(x: Any, name: str = "scores") -> np.ndarray:
    """1-D float64 numpy copy of a numpy array / torch tensor / list (torch imported lazily)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of per-sample scores, got shape {arr.shape}")
    return arr


def check_finite(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} of {x.size} scores are NaN/inf (first at index "
                         f"{int(np.flatnonzero(bad)[0])}); fix the detector or drop those samples")


def fit_input(x: Any, name: str) -> np.ndarray:
    """Checked 1-D finite ID scores with at least two samples."""
    x = as_numpy(x, name)
    check_finite(x, name)
    if x.size < 2:
        raise ValueError(f"{name}: need at least 2 ID scores to calibrate, got {x.size}")
    return x


class ECDF:
    """Smoothed empirical CDF of ID scores: ``F(s)`` ~ P_ID(score <= s), strictly increasing, in (0, 1).

    Between ID values it interpolates the mid-ranks ``(i + 1) / (n + 1)`` linearly; beyond the ID range
    it decays exponentially with the ID standard deviation as scale, so far-OOD samples stay ordered
    (a plain step ECDF would tie them all at 0 and lose the other detector's tie-break).
    ``F(s)`` is the calibrated ID-probability (an ID p-value) that the product/min rules combine.
    """

    def __init__(self) -> None:
        self.knots: np.ndarray | None = None
        self.levels: np.ndarray | None = None
        self.sorted: np.ndarray | None = None
        self.scale = 1.0

    def fit(self, x: Any, name: str = "scores") -> "ECDF":
        x = fit_input(x, name)
        self.sorted = np.sort(x)
        n = x.size
        knots, counts = np.unique(self.sorted, return_counts=True)
        cum = np.cumsum(counts)
        # mid-rank of a tied block, so ties sit in the middle of their block
        self.knots, self.levels = knots, (cum - 0.5 * counts + 0.5) / (n + 1)
        spread = float(np.std(x))
        self.scale = spread if spread > 0 else 1.0
        return self

    def _require_fit(self) -> None:
        if self.knots is None:
            raise RuntimeError("ECDF used before fit(): call ScoreFusion.fit(id_scores) first")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._require_fit()
        lo, hi = self.knots[0], self.knots[-1]
        p_lo, p_hi = self.levels[0], self.levels[-1]
        p = np.interp(x, self.knots, self.levels) if self.knots.size > 1 else np.full_like(x, p_lo)
        below, above = x < lo, x > hi
        p[below] = p_lo * np.exp((x[below] - lo) / self.scale)
        p[above] = 1.0 - (1.0 - p_hi) * np.exp(-(x[above] - hi) / self.scale)
        return p

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """``log F(x)``, exact in the lower tail where ``F`` underflows (product rule)."""
        self._require_fit()
        with np.errstate(divide="ignore"):  # underflow only in the lower tail, replaced below
            out = np.log(self(x))
        below = x < self.knots[0]
        out[below] = np.log(self.levels[0]) + (x[below] - self.knots[0]) / self.scale
        return out

    def log_odds(self, x: np.ndarray) -> np.ndarray:
        """``log F / (1 - F)``, finite in both tails (logistic rule)."""
        self._require_fit()
        p = self(x)
        with np.errstate(divide="ignore"):  # p == 1 only in the upper tail, replaced below
            log_sf = np.log1p(-p)
        above = x > self.knots[-1]
        log_sf[above] = np.log1p(-self.levels[-1]) - (x[above] - self.knots[-1]) / self.scale
        return self.log_prob(x) - log_sf

    def quantile(self, q: float) -> float:
        """ID quantile; ``q = 0`` -> -inf and ``q = 1`` -> +inf (empty band, not the extreme sample)."""
        self._require_fit()
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile level must be in [0, 1], got {q}")
        if q == 0.0:
            return -np.inf
        if q == 1.0:
            return np.inf
        return float(np.quantile(self.sorted, q))

    def state(self) -> tuple:
        """Everything the fit determined (used by leakage tests)."""
        return (self.knots.copy(), self.levels.copy(), self.scale)


class ZScore:
    """``(s - mean_ID) / std_ID``: keeps score gaps (unlike ranks), sensitive to ID outliers."""

    def __init__(self) -> None:
        self.mean: float | None = None
        self.std = 1.0

    def fit(self, x: Any, name: str = "scores") -> "ZScore":
        x = fit_input(x, name)
        self.mean = float(x.mean())
        std = float(x.std())
        self.std = std if std > 0 else 1.0
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None:
            raise RuntimeError("ZScore used before fit(): call ScoreFusion.fit(id_scores) first")
        return (x - self.mean) / self.std

    def state(self) -> tuple:
        return (self.mean, self.std)


class Squash:
    """Fixed strictly increasing map onto (0, 1), ``1/2 + arctan(s)/pi``: no fit.

    Used for the cascade's diffusion score when no ID diffusion scores were computed: inside the band only
    the order of the diffusion scores matters, so any strictly monotone map gives the same ranking.
    """

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return 0.5 + np.arctan(x) / np.pi

    def state(self) -> tuple:
        return ("arctan",)

