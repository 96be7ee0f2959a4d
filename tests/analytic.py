"""Exact noise predictors for Gaussian data: the known answers the tests (and sanity demos) rely on.

For data x0 ~ N(mu, sigma^2 I) and x_t = sqrt(a) x0 + sqrt(1 - a) eps, the MMSE noise predictor is
E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a sigma^2 + 1 - a). For an isotropic Gaussian mixture,
mu is replaced by its posterior mean E[mu | x_t] (softmax responsibilities).
"""
from __future__ import annotations

import torch

from openood_diffguard.diffusion.models import FunctionAdapter
from openood_diffguard.diffusion.schedule import NoiseSchedule, _bcast


class GaussianMixtureModel(FunctionAdapter):
    """Class-conditional ideal eps for an isotropic Gaussian mixture.

    Class ``k < K`` -> component k exactly; the null class ``K`` -> the whole mixture (unconditional).
    ``means``: [K, *sample_shape]; ``sigma``: shared std; ``weights``: mixture weights (default uniform).
    """

    def __init__(self, means: torch.Tensor, sigma: float, schedule: NoiseSchedule, weights: torch.Tensor | None = None) -> None:
        K = means.shape[0]
        super().__init__(self._eps, schedule, num_classes=K, null_class=K)
        self.register_buffer("means", means.double())
        w = torch.full((K,), 1.0 / K) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.register_buffer("log_weights", (w / w.sum()).log().double())
        self.sigma = float(sigma)
        self.sample_size = means.shape[-1] if means.ndim >= 3 else None
        self.in_channels = means.shape[1] if means.ndim >= 3 else None

    def sample_data(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.means.shape[0]
        if labels is None:
            labels = torch.multinomial(self.log_weights.exp().float(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return (self.means[labels] + self.sigma * noise).float(), labels

    def posterior_mean(self, x_t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """E[mu | x_t] under the mixture; ``a``: alpha_bar per sample."""
        x = x_t.double().flatten(1)
        mus = self.means.flatten(1)
        av = a.double().view(-1, 1)
        var = av * self.sigma**2 + 1 - av
        d2 = ((x[:, None, :] - av.sqrt()[:, None] * mus[None]) ** 2).sum(-1)  # [B, K]
        logits = self.log_weights[None] - d2 / (2 * var)
        r = torch.softmax(logits, dim=1)
        return (r @ mus).view_as(x_t)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        a = self.schedule.alpha_bar(t).to(x_t.device)
        K = self.means.shape[0]
        y = torch.full((x_t.shape[0],), K, dtype=torch.long, device=x_t.device) if y is None else y
        mu = torch.empty_like(x_t, dtype=torch.float64)
        cond = y < K
        if cond.any():
            mu[cond] = self.means[y[cond]]
        if (~cond).any():
            mu[~cond] = self.posterior_mean(x_t[~cond], a[~cond])
        ab = _bcast(a.double(), x_t)
        eps = (1 - ab).sqrt() * (x_t.double() - ab.sqrt() * mu) / (ab * self.sigma**2 + 1 - ab)
        return eps.to(x_t.dtype)


def gaussian_model(mean: torch.Tensor, sigma: float, schedule: NoiseSchedule) -> GaussianMixtureModel:
    """Single Gaussian N(mean, sigma^2 I): one-component mixture (label 0 or null give the same eps)."""
    return GaussianMixtureModel(mean[None], sigma, schedule)
