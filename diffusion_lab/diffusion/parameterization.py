"""What the network predicts: one short class per target, the one home for its conversions.

    param = parameterization("v")                        # diffusion.mean_type's value; unknown names refused here
    target = param.target(x0, eps, alpha, sigma)         # what the MSE compares the output with
    x0_hat, eps_hat = param.to_x0_eps(out, x_t, alpha, sigma)
    w = param.weight_from_eps(w_eps, snr)                # a weight on the eps-MSE as one on this target's MSE

On a Gaussian path x_t = alpha x0 + sigma eps (Kingma & Gao 2023, eq. 1; the VP process has alpha = sqrt(a),
sigma = sqrt(1 - a)), x0, eps, v and the network's output are [B, C, H, W]; alpha and sigma are numbers or
tensors that broadcast against them ([B, 1, 1, 1]); snr = alpha^2 / sigma^2 is a float64 tensor of any shape.
Nothing here depends on how alpha and sigma were made, so a new process reuses these and a new target is one class.
"""

from __future__ import annotations

import torch

from ..checks import check_choice


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps = (x_t - alpha x0) / sigma: the noise a denoised estimate implies (finite while sigma > 0)."""
    return (x_t - alpha * x0) / sigma


class Parameterization:
    """The target of one parameterization. Subclasses set `name`, `defined_at_zero_snr` and the three methods."""

    name: str = ""
    defined_at_zero_snr: bool = True  # False: x0 cannot be recovered at alpha = 0 (pure noise)

    def target(self, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """The training target for x_t = alpha x0 + sigma eps."""
        raise NotImplementedError

    def to_x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network's output at x_t."""
        raise NotImplementedError

    def weight_from_eps(self, w_eps: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
        """The weight on this target's MSE equal to w_eps on the eps-MSE: |eps - eps_hat|^2 = k |target error|^2,
        so the weight is w_eps * k (Hang et al. 2023, Sec. 3.4; Kingma & Gao 2023, Table 1)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Parameterization({self.name!r})"


class Eps(Parameterization):
    """The noise (DDPM eq. 14): x0 = (x_t - sigma eps) / alpha, undefined at alpha = 0."""

    name, defined_at_zero_snr = "eps", False

    def target(self, x0, eps, alpha, sigma):
        return eps

    def to_x0_eps(self, out, x_t, alpha, sigma):
        return (x_t - sigma * out) / alpha, out

    def weight_from_eps(self, w_eps, snr):
        return w_eps


class X0(Parameterization):
    """The clean image: eps = (x_t - alpha x0) / sigma; |eps error|^2 = SNR |x0 error|^2."""

    name = "x0"

    def target(self, x0, eps, alpha, sigma):
        return x0

    def to_x0_eps(self, out, x_t, alpha, sigma):
        return out, eps_from_x0(x_t, out, alpha, sigma)

    def weight_from_eps(self, w_eps, snr):
        return w_eps * snr


class V(Parameterization):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022, eq. 9 with alpha^2 + sigma^2 = 1). Solved for any path:
    alpha x_t - sigma v = (alpha^2 + sigma^2) x0 and sigma x_t + alpha v = (alpha^2 + sigma^2) eps, finite at
    alpha = 0; |eps error|^2 = SNR / (SNR + 1) |v error|^2 on the VP path."""

    name = "v"

    def target(self, x0, eps, alpha, sigma):
        return alpha * eps - sigma * x0

    def to_x0_eps(self, out, x_t, alpha, sigma):
        norm = alpha * alpha + sigma * sigma
        return (alpha * x_t - sigma * out) / norm, (sigma * x_t + alpha * out) / norm

    def weight_from_eps(self, w_eps, snr):
        return w_eps * snr / (snr + 1.0)


PARAMETERIZATIONS: dict[str, Parameterization] = {p.name: p for p in (Eps(), X0(), V())}


def parameterization(name: str) -> Parameterization:
    """The registered parameterization called `name` (diffusion.mean_type); one line naming the key otherwise."""
    check_choice("diffusion.mean_type", name, PARAMETERIZATIONS)
    return PARAMETERIZATIONS[name]
