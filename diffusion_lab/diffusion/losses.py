"""Log-likelihood pieces of the variational bound (DDPM eq. 5, IDDPM Sec. 2), all elementwise.

Tensors are broadcastable; reductions to per-example `[B]` values use `mean_flat`.
"""

from __future__ import annotations

import math

import torch


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise.

    = 0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x), exact through erf (IDDPM uses a tanh approximation; erf is exact and as cheap)."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) under a Gaussian discretized to 256 bins of width 2/255 on [-1, 1] (DDPM eq. 13).

    x: [B, C, H, W], values k/127.5 - 1 for integer k in 0..255; means/log_scales broadcastable
    (log_scales is the log standard deviation). The outermost bins extend to -inf and +inf, so the
    probabilities of the 256 bins sum to 1 exactly. Returns log-probabilities in nats, shape of x.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
