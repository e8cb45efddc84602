"""Exact test beds: data distributions whose ideal denoiser E[x0 | x_t] is known in closed form.

    data = GaussianData(mu=0.1, s=0.5)                       # x0 ~ N(mu, s^2 I)
    model = data.model(diffusion, mean_type="v")             # the perfect network for that process
    x0 = dpmpp_2m(diffusion, model, x_T, times)              # compare with data.ode_flow(...) / data.sample(...)

With x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = alpha_bar_t), the marginal of x_t is known, so the optimal eps, x0
and v predictions follow from E[x0 | x_t]: eps = (x_t - sqrt(a) E[x0|x_t]) / sqrt(1 - a) = E[eps | x_t] and
v = sqrt(a) eps - sqrt(1 - a) x0. The `model` callables take the network time [B] and map it back with
`diffusion.t_at_model_time`, so pass the process the model was trained on (not a respaced one). Any process (EDM,
flow: diffusion/continuous.py) works, through the VP process with the same SNR.
"""

from __future__ import annotations

import math

import torch

from .parameterization import parameterization


def _per_example(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar as a number or [B] -> broadcastable [B, 1, ..] in like's dtype/device."""
    a = torch.as_tensor(a, dtype=torch.float64)
    if a.ndim == 0:
        return a.to(device=like.device, dtype=like.dtype)
    return a.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class _Exact:
    """Shared part: the exact model built on `denoise(x_t, alpha_bar)` and `eps(x_t, alpha_bar)`."""

    def eps(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        """E[eps | x_t] = (x_t - sqrt(a) E[x0 | x_t]) / sqrt(1 - a) (finite for a < 1)."""
        a = _per_example(alpha_bar, x_t)
        return (x_t - a.sqrt() * self.denoise(x_t, alpha_bar)) / (1 - a).sqrt()

    def model(self, diffusion, mean_type: str | None = None, learn_sigma: bool = False):
        """A callable model(x_in, t, **kw) -> the exact network output for `diffusion`, any Process (process.py).

        It undoes what the process does around the network: t is the network time (`diffusion.model_time`, the
        timestep itself on an unrespaced GaussianDiffusion), x_in the network input (`param.network_input`, x_t
        unless preconditioned). The exact E[x0 | x_t] on a path point (alpha, sigma) is the VP one at
        a = alpha^2 / (alpha^2 + sigma^2) for the state x_t / sqrt(alpha^2 + sigma^2). mean_type: the target
        (default the process's own). learn_sigma appends C zero channels (a learned-variance net's 2C output).
        """
        param = diffusion.param if mean_type is None else parameterization(mean_type)

        def model(x_in, t, **_):
            tt = diffusion.t_at_model_time(t.to(torch.float64))
            alpha, sigma = (_per_example(v, x_in) for v in diffusion.alpha_sigma_at(tt))
            x_t = x_in / param.input_scale(alpha, sigma)
            norm = (alpha**2 + sigma**2).sqrt()
            a, x_vp = alpha**2 / norm**2, x_t / norm
            out = param.target(self.denoise(x_vp, a), self.eps(x_vp, a), alpha, sigma)
            return torch.cat([out, torch.zeros_like(out)], 1) if learn_sigma else out

        return model

    def ode_flow(self, x: torch.Tensor, alpha_from, alpha_to, steps: int = 2000) -> torch.Tensor:
        """The probability-flow ODE's solution from level alpha_from to alpha_to (alpha_bar numbers in (0, 1)),
        by classical RK4 in lambda = log(alpha / sigma) on the VE state x_bar = x / alpha, whose flow is
        d x_bar / d lambda = E[x0 | alpha x_bar] - x_bar (Karras et al. 2022 eq. 4 with sigma = exp(-lambda)).
        `steps` equal steps in lambda (fourth order): 2,000 from t = 999 to 0 agree with GaussianData's closed form
        to 3e-11 on the linear schedule and 5e-10 on the cosine one (tests/test_solvers.py). A reference for
        solvers, not a sampler."""
        lam0, lam1 = (0.5 * math.log(a / (1 - a)) for a in (float(alpha_from), float(alpha_to)))
        h = (lam1 - lam0) / steps

        def f(lam: float, xb: torch.Tensor) -> torch.Tensor:
            a = 1.0 / (1.0 + math.exp(-2 * lam))
            return self.denoise(math.sqrt(a) * xb, a) - xb

        lam, xb = lam0, x * math.sqrt(1 + math.exp(-2 * lam0))
        for _ in range(steps):
            k1 = f(lam, xb)
            k2 = f(lam + h / 2, xb + (h / 2) * k1)
            k3 = f(lam + h / 2, xb + (h / 2) * k2)
            k4 = f(lam + h, xb + h * k3)
            xb, lam = xb + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4), lam0 + h * (_ + 1)
        return xb / math.sqrt(1 + math.exp(-2 * lam1))

    def solution(self, diffusion, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """What an exact ODE sampler returns when it starts from x at time t_from and, like every sampler here,
        ends with the denoiser at its last time t_to: E[x0 | flow(x) at t_to], on any Process (the flow in the VE
        variables x / alpha is the same for every path with the same sigma / alpha). The instrument that measures
        a solver's own error (the model being exact): `(sampler_output - solution).pow(2).mean().sqrt()`."""
        (a_from, x_vp), a_to = self._vp(diffusion, t_from, x), self._vp(diffusion, t_to)[0]
        return self.denoise(self.ode_flow(x_vp, a_from, a_to), a_to)

    @staticmethod
    def _vp(diffusion, t: float, x: torch.Tensor | None = None):
        """(the VP alpha_bar with the same SNR as the process at t, x rescaled to that VP state)."""
        alpha, sigma = (float(v) for v in diffusion.alpha_sigma_at(float(t)))
        norm2 = alpha**2 + sigma**2
        return alpha**2 / norm2, None if x is None else x / math.sqrt(norm2)


class GaussianData(_Exact):
    """x0 ~ N(mu, s^2 I), independent pixels. Then x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I) and

    E[x0 | x_t] = mu + s^2 sqrt(a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a),
    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).
    """

    def __init__(self, mu: float = 0.1, s: float = 0.5):
        self.mu, self.s = float(mu), float(s)

    def _var(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.s**2 + 1 - a

    def denoise(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        a = _per_example(alpha_bar, x_t)
        return self.mu + self.s**2 * a.sqrt() * (x_t - a.sqrt() * self.mu) / self._var(a)

    def eps(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        a = _per_example(alpha_bar, x_t)
        return (1 - a).sqrt() * (x_t - a.sqrt() * self.mu) / self._var(a)

    def ode_flow(self, x: torch.Tensor, alpha_from, alpha_to) -> torch.Tensor:
        """The probability-flow ODE's exact solution from level alpha_from to alpha_to (both alpha_bar).

        For Gaussian data the flow is the increasing affine map between the two marginals:
        x_to = sqrt(a_to) mu + sqrt(a_to s^2 + 1 - a_to) (x - sqrt(a_from) mu) / sqrt(a_from s^2 + 1 - a_from);
        a_to = 1 gives x_0 = mu + s (x - sqrt(a) mu) / sqrt(a s^2 + 1 - a).
        """
        a0, a1 = _per_example(alpha_from, x), _per_example(alpha_to, x)
        z = (x - a0.sqrt() * self.mu) / self._var(a0).sqrt()
        return a1.sqrt() * self.mu + self._var(a1).sqrt() * z

    def average_velocity(self, z: torch.Tensor, t, r) -> torch.Tensor:
        """The exact MeanFlow target u(z, r, t) = (z - z_r) / (t - r) on the flow z_t = (1 - t) x0 + t eps, z_r the
        flow map of z from t to r: (z_r - (1 - r) mu) / sd_r = (z - (1 - t) mu) / sd_t, sd_t = sqrt((1 - t)^2 s^2
        + t^2) (shared/REFERENCE.md). Written without the 0/0 at r = t, where it is the velocity dz/dt:
            u = -mu + (s^2 (t + r - 2) + t + r) / (sd_t + sd_r) (z - (1 - t) mu) / sd_t.
        t, r: numbers or [B] tensors (differentiable, for MeanFlow's JVP); z [B, ...]."""
        t, r = _per_example(t, z), _per_example(r, z)
        sd_t, sd_r = (((1 - v) ** 2 * self.s**2 + v**2).sqrt() for v in (t, r))
        return -self.mu + (self.s**2 * (t + r - 2) + t + r) / (sd_t + sd_r) * (z - (1 - t) * self.mu) / sd_t

    def mean_flow_model(self, flow):
        """The exact two-time network of `flow` (continuous.Flow), called as Flow.average_velocity calls one:
        model(z, network_time(t), h=network_time(t) - network_time(r)) -> u(z, r, t)."""

        def model(z, model_t, h, **_):
            t = flow.u_at_network_time(model_t)
            return self.average_velocity(z, t, t - flow.u_at_network_time(h))

        return model

    def sample(self, n: int, shape, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
        """n draws of x0, [n, *shape]."""
        return self.mu + self.s * torch.randn((n, *shape), generator=generator, dtype=dtype)


class PointMixture(_Exact):
    """A finite set of K points [K, *shape] blurred by N(0, s^2 I), uniform weights. Given component k,
    x_t ~ N(sqrt(a) p_k, v I) with v = a s^2 + 1 - a, so by Bayes

        w_k(x_t) = softmax_k(-|x_t - sqrt(a) p_k|^2 / (2 v)),
        E[x0 | x_t] = sum_k w_k (p_k + s^2 sqrt(a) (x_t - sqrt(a) p_k) / v).
    """

    def __init__(self, points: torch.Tensor, s: float = 0.01):
        self.points, self.s = torch.as_tensor(points), float(s)

    def weights(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        """Posterior component probabilities [B, K] (log-sum-exp stable)."""
        a = _per_example(alpha_bar, x_t).reshape(-1, 1)  # [B or 1, 1]
        p = self.points.to(x_t).flatten(1)  # [K, D]
        d2 = ((x_t.flatten(1)[:, None, :] - a[:, :, None].sqrt() * p[None]) ** 2).sum(-1)  # [B, K]
        return torch.softmax(-d2 / (2 * (a * self.s**2 + 1 - a)), dim=1)

    def denoise(self, x_t: torch.Tensor, alpha_bar) -> torch.Tensor:
        a = _per_example(alpha_bar, x_t).reshape(-1, 1)
        p = self.points.to(x_t).flatten(1)
        w = self.weights(x_t, alpha_bar)
        mean_p = w @ p  # [B, D]: sum_k w_k p_k
        x = x_t.flatten(1)
        x0 = mean_p + self.s**2 * a.sqrt() * (x - a.sqrt() * mean_p) / (a * self.s**2 + 1 - a)
        return x0.reshape(x_t.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0, [n, *shape]: a uniformly chosen point plus N(0, s^2) noise."""
        k = torch.randint(len(self.points), (n,), generator=generator)
        p = self.points.to(torch.float64)[k]
        return p + self.s * torch.randn(p.shape, generator=generator, dtype=p.dtype)

    def nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [B], Euclidean distance [B]) of the nearest point to each x."""
        d = torch.cdist(x.flatten(1).to(torch.float64), self.points.flatten(1).to(torch.float64))
        dist, idx = d.min(1)
        return idx, dist
