"""Inpainting with any registered sampler: the unknown region is sampled while the known one follows the original's
forward noising (RePaint's replacement, Lugmayr et al. 2022, eq. 8, without its resampling).

    out = paint(diffusion, model, x0, mask, sampling_times(diffusion, "logsnr", 20), method="dpmpp_2m")

Every method takes `post_step(i, x) -> x` after each step (registry.py: the shared signature), so one rule serves
all of them: after the step that evaluated time t_i, the new state is at t_{i-1} and its known region becomes
q(x_{t_{i-1}} | x0) = sqrt(a) x0 + sqrt(1 - a) z with a = alpha_bar(t_{i-1}) and fresh z; after the last step it
is x0 itself, so the known region of the result equals the original exactly.
"""

from __future__ import annotations

import torch

from .registry import get_method
from .respace import visited_times
from .seeding import noise_like


def paint(
    diffusion,
    model,
    x0: torch.Tensor,
    mask: torch.Tensor,
    timesteps=None,
    *,
    method: str = "ddpm",
    start_index: int | None = None,
    clip_denoised: bool = True,
    model_kwargs=None,
    generator=None,
    progress: bool = False,
    callback=None,
    **options,
) -> torch.Tensor:
    """x0: [B, C, H, W] in [-1, 1]; mask: broadcastable to x0, 1 where x0 is known. timesteps: the ascending times
    the method visits (respace.sampling_times), a spacing spec ("ddim20") or None (all T); start_index k starts at
    timesteps[k] instead of the last one (a partial run). method: any registered name, with its **options.
    Starts from x0 noised to the first visited time. Returns x_0 [B, C, H, W]."""
    ts = visited_times(diffusion.num_timesteps, timesteps, start_index)
    spec = get_method(method)
    spec.check_process(diffusion, "paint method")
    fn = spec.fn
    mask = mask.to(device=x0.device, dtype=x0.dtype)

    def noised(t: float) -> torch.Tensor:
        alpha, sigma = (float(v) for v in diffusion.alpha_sigma_at(float(t)))
        return alpha * x0 + sigma * noise_like(x0, generator)

    def keep_known(i: int, x: torch.Tensor) -> torch.Tensor:
        known = x0 if i == 0 else noised(ts[i - 1])
        return mask * known + (1 - mask) * x

    return fn(
        diffusion,
        model,
        noised(ts[-1]),
        ts,
        model_kwargs=model_kwargs,
        generator=generator,
        callback=callback,
        clip_denoised=clip_denoised,
        progress=progress,
        post_step=keep_known,
        **options,
    )
