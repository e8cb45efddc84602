"""The Process interface: what the solvers, inpainting and the exact models need from a diffusion process.

    alpha, sigma = process.alpha_sigma_at(t)          # x_t = alpha x0 + sigma eps, float64, t of any shape
    x0_hat, eps_hat = process.denoise(model, x_t, t)  # one model call, [B, C, H, W] each

A process is a Gaussian path x_t = alpha(t) x0 + sigma(t) eps (Kingma & Gao 2023, eq. 1) on float times
0 <= t <= num_timesteps - 1, noisier as t grows, plus the network's parameterization (parameterization.py), which
`denoise` applies. The fast solvers (solvers.py) use only this interface, so they have no branch on the process;
the clean end (alpha, sigma) = (1, 0) after the last visited time is the solvers' own.
`GaussianDiffusion` (the discrete VP process of DDPM / IDDPM) implements it; what only the discrete process has
(learned variance, the VLB, respacing, the loss-aware timestep sampler) stays on that class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Process(Protocol):
    num_timesteps: int  # times are floats in [0, num_timesteps - 1]
    default_method: str  # the sampler when none is given: ddim (DDPM), heun (EDM), euler (flow)
    discrete: bool  # DDPM/IDDPM's T steps (ancestral sampling, learned variance, VLB, respacing); False: EDM, flow
    linear_path: bool  # alpha + sigma = 1 (flow): dx/dsigma = eps - x0 is finite at pure noise, so Heun steps in sigma

    def noise_std(self, t) -> float:
        """The std of the pure noise a sampler starting at time t draws (1 on the discrete process, sigma(t))."""
        ...

    def alpha_sigma_at(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)), float64 with t's shape (t a number or a float64 tensor)."""
        ...

    def log_snr_at(self, t) -> torch.Tensor:
        """log(alpha^2 / sigma^2) at t, float64, decreasing in t (-inf where alpha = 0)."""
        ...

    def sigma_at(self, t) -> torch.Tensor:
        """The VE noise level sigma / alpha of x / alpha at t (Karras et al. 2022's sigma), float64."""
        ...

    def t_at_sigma(self, sigma) -> torch.Tensor:
        """The inverse of sigma_at: float64 times, clamped to [0, num_timesteps - 1]."""
        ...

    def solver_time(self, t: torch.Tensor) -> torch.Tensor:
        """Where a training time t (a step, or the process's own variable) sits on [0, num_timesteps - 1]."""
        ...

    def denoise(
        self,
        model: Callable[..., torch.Tensor],
        x_t: torch.Tensor,
        t,
        model_kwargs: dict | None = None,
        clip_denoised: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from one model call at x_t [B, C, H, W] and time t (a number or [B])."""
        ...
