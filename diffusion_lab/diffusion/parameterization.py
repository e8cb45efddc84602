"""What the network predicts: one short class per target, the one home for its conversions.

    param = parameterization("v")                        # diffusion.mean_type's value; unknown names refused here
    target = param.target(x0, eps, alpha, sigma)         # what the MSE compares the output with
    out = model(param.network_input(x_t, alpha, sigma), t)   # x_t itself, or EDM's c_in-scaled input
    x0_hat, eps_hat = param.to_x0_eps(out, x_t, alpha, sigma)
    w = param.weight_from_eps(w_eps, alpha, sigma)       # a weight on the eps-MSE as one on this target's MSE

On a Gaussian path x_t = alpha x0 + sigma eps (Kingma & Gao 2023, eq. 1: the VP process has alpha = sqrt(a),
sigma = sqrt(1 - a); EDM alpha = 1; rectified flow alpha = 1 - t, sigma = t), x0, eps and the network's output are
[B, C, H, W]; alpha and sigma are numbers or tensors that broadcast against them ([B, 1, 1, 1]). Nothing here
depends on how alpha and sigma were made, so every process reuses these and a new target is one class.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_choice, check_number


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

    def input_scale(self, alpha, sigma):
        """c with network input c x_t: 1 unless the parameterization preconditions the input."""
        return 1.0

    def network_input(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """What the network is given at x_t: input_scale * x_t (x_t itself, the same tensor, when that is 1)."""
        c = self.input_scale(alpha, sigma)
        return x_t if isinstance(c, float) and c == 1.0 else c * x_t

    def to_x0_eps(self, out: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from the network's output at x_t."""
        raise NotImplementedError

    def predict(self, out: torch.Tensor, x_t: torch.Tensor, alpha, sigma, clip: bool = False):
        """to_x0_eps; with `clip`, x0_hat clamped to [-1, 1] and eps_hat re-derived from it (the denoisers')."""
        x0, eps = self.to_x0_eps(out, x_t, alpha, sigma)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = eps_from_x0(x_t, x0, alpha, sigma)
        return x0, eps

    def error_gain(self, alpha, sigma):
        """k with |eps - eps_hat|^2 = k |target - output|^2 (the output enters x0_hat and eps_hat linearly)."""
        raise NotImplementedError

    def weight_from_eps(self, w_eps, alpha, sigma):
        """The weight on this target's MSE equal to w_eps on the eps-MSE: w_eps * error_gain (Hang et al. 2023,
        Sec. 3.4; Kingma & Gao 2023, Table 1)."""
        return w_eps * self.error_gain(alpha, sigma)

    def __repr__(self) -> str:
        return f"Parameterization({self.name!r})"


class Eps(Parameterization):
    """The noise (DDPM eq. 14): x0 = (x_t - sigma eps) / alpha, undefined at alpha = 0."""

    name, defined_at_zero_snr = "eps", False

    def target(self, x0, eps, alpha, sigma):
        return eps

    def to_x0_eps(self, out, x_t, alpha, sigma):
        return (x_t - sigma * out) / alpha, out

    def error_gain(self, alpha, sigma):
        return 1.0


class X0(Parameterization):
    """The clean image: eps = (x_t - alpha x0) / sigma; |eps error|^2 = SNR |x0 error|^2."""

    name = "x0"

    def target(self, x0, eps, alpha, sigma):
        return x0

    def to_x0_eps(self, out, x_t, alpha, sigma):
        return out, eps_from_x0(x_t, out, alpha, sigma)

    def error_gain(self, alpha, sigma):
        return alpha**2 / sigma**2  # the SNR


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

    def error_gain(self, alpha, sigma):
        return alpha**2 / (alpha**2 + sigma**2) ** 2  # SNR / (SNR + 1) on the VP path


class Velocity(Parameterization):
    """The rectified-flow velocity u = eps - x0 (Liu et al. 2023; Lipman et al. 2023 with the linear path
    x_t = (1 - t) x0 + t eps, where u = dx_t/dt). Solved for any path: x0 = (x_t - sigma u) / (alpha + sigma),
    eps = (x_t + alpha u) / (alpha + sigma); finite at alpha = 0."""

    name = "velocity"

    def target(self, x0, eps, alpha, sigma):
        return eps - x0

    def to_x0_eps(self, out, x_t, alpha, sigma):
        norm = alpha + sigma
        return (x_t - sigma * out) / norm, (x_t + alpha * out) / norm

    def error_gain(self, alpha, sigma):
        return alpha**2 / (alpha + sigma) ** 2


class EDMPrecond(Parameterization):
    """EDM's preconditioned network F (Karras et al. 2022, Table 1 and eq. 7): D(x; s) = c_skip(s) x +
    c_out(s) F(c_in(s) x; c_noise(s)) with c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), on the VE view x = x_t / alpha, s = sigma / alpha (alpha = 1 on EDM's own
    process). Multiplied through by alpha, with n = sqrt(sigma^2 + alpha^2 sd^2): network input x_t / n, target
    F = (sigma x0 - alpha sd^2 eps) / (sd n), x0 = alpha sd^2 x_t / n^2 + (sigma sd / n) F; finite at alpha = 0.
    c_noise = log(s) / 4 is the process's network time (diffusion/continuous.py)."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = check_number("diffusion.sigma_data", sigma_data, minimum=1e-12, finite=True)

    def coefficients(self, s):
        """(c_skip, c_out, c_in, c_noise) at VE noise level s (a number or a tensor): EDM Table 1."""
        sd = self.sigma_data
        root = (s**2 + sd**2) ** 0.5
        log = torch.log(s) if isinstance(s, torch.Tensor) else math.log(s)
        return sd**2 / (s**2 + sd**2), s * sd / root, 1 / root, log / 4

    def loss_weight(self, s):
        """lambda(s) = (s^2 + sd^2) / (s sd)^2 on |D - x0|^2 (EDM Table 1): 1 / c_out^2, so 1 on |F - target|^2."""
        return (s**2 + self.sigma_data**2) / (s * self.sigma_data) ** 2

    def _norm(self, alpha, sigma):
        return (sigma**2 + alpha**2 * self.sigma_data**2) ** 0.5

    def input_scale(self, alpha, sigma):
        return 1 / self._norm(alpha, sigma)

    def target(self, x0, eps, alpha, sigma):
        sd = self.sigma_data
        return (sigma * x0 - alpha * sd**2 * eps) / (sd * self._norm(alpha, sigma))

    def to_x0_eps(self, out, x_t, alpha, sigma):
        sd, n = self.sigma_data, self._norm(alpha, sigma)
        x0 = (alpha * sd**2 / n**2) * x_t + (sigma * sd / n) * out
        return x0, eps_from_x0(x_t, x0, alpha, sigma)

    def error_gain(self, alpha, sigma):
        return alpha**2 * self.sigma_data**2 / self._norm(alpha, sigma) ** 2


PARAMETERIZATIONS: dict[str, Parameterization] = {p.name: p for p in (Eps(), X0(), V(), Velocity(), EDMPrecond())}


def parameterization(name: str) -> Parameterization:
    """The registered parameterization called `name` (diffusion.mean_type); one line naming the key otherwise."""
    check_choice("diffusion.mean_type", name, PARAMETERIZATIONS)
    return PARAMETERIZATIONS[name]
