"""Named beta schedules, computed in float64.

A named schedule never changes once committed: add a new name instead of editing one.

    betas = get_betas("cosine", 1000)   # float64 tensor [T]
    betas = get_betas("linear", 1000, zero_terminal_snr=True)   # alpha_bar_{T-1} = 0 (last beta = 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..checks import check_choice, check_count

SCHEDULES = ("linear", "cosine")


def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM (Ho et al. 2020, Sec. 4) linear schedule beta_1=1e-4 .. beta_T=0.02 for T=1000.

    For other T the end points are scaled by 1000/T (Improved DDPM, Nichol & Dhariwal 2021, Sec. 3.2
    footnote), so alpha_bar_T stays comparable across T; clipped at 0.999 for very short processes (T < 50).
    """
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64).clamp(max=0.999)


def betas_for_alpha_bar(
    num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> torch.Tensor:
    """beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta) for t = 0..T-1 (IDDPM eq. 17)."""
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def cosine_alpha_bar(u: float, s: float = 0.008) -> float:
    """IDDPM eq. 17: f(u) = cos^2(((u + s) / (1 + s)) * pi / 2) with u = t/T; alpha_bar = f(u)/f(0)."""
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int) -> torch.Tensor:
    """Improved DDPM cosine schedule (s = 0.008), betas clipped at 0.999."""
    return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar, max_beta=0.999)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1.

    sqrt(alpha_bar) is shifted so that its last value is 0 and scaled so that its first is unchanged:
    sqrt(alpha_bar')_t = (sqrt(alpha_bar_t) - sqrt(alpha_bar_{T-1})) * sqrt(alpha_bar_0)
    / (sqrt(alpha_bar_0) - sqrt(alpha_bar_{T-1})); betas are recomputed from alpha_bar', so the last beta is
    exactly 1 (SNR_{T-1} = 0: x_{T-1} is pure noise). betas: float64 [T], T >= 2 -> float64 [T] in (0, 1].
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
        raise ValueError("diffusion.zero_terminal_snr=true needs diffusion.steps >= 2")
    sqrt_ab = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


_BUILDERS: dict[str, Callable[[int], torch.Tensor]] = {"linear": linear_betas, "cosine": cosine_betas}


def get_betas(name: str, num_timesteps: int, zero_terminal_snr: bool = False) -> torch.Tensor:
    """Return the named schedule's betas as a float64 tensor [T] with values in (0, 1).

    zero_terminal_snr: rescale them with `rescale_zero_terminal_snr` (values in (0, 1], the last exactly 1).
    """
    check_choice("diffusion.schedule", name, SCHEDULES)
    betas = _BUILDERS[name](check_count("diffusion.steps", num_timesteps))
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas
