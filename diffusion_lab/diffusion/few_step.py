"""Few-step samplers for models trained to jump: consistency models (objective=ect) and MeanFlow (objective=meanflow).

    x0 = consistency(process, model, x_T, timesteps, generator=g)      # Song et al. 2023, Alg. 1
    x0 = meanflow(flow, model, x_T, timesteps)                          # Geng et al. 2025, Alg. 2

Both have the signature and conventions of solvers.py (ascending `timesteps`, x_T at the last, one network
evaluation per visited time, `post_step`, `callback`) and are registered in registry.py as `sampler=consistency`
and `sampler=meanflow`; sampler.steps=1 is the one-step sample.
"""

from __future__ import annotations

import math

import torch

from .seeding import noise_like
from .solvers import Run, sampler


def _consistency_step(run: Run, j: int, x, *, mid_sigmas=None):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) on any process, with f(x, t) = the process's x0
    prediction (process.denoise): x0 = f(x_T, t_{N-1}); then for each later time t_j (VE noise level s_j, on the
    process's path alpha_j): x = alpha_j (x0 + sqrt(s_j^2 - s_min^2) z), x0 = f(x, t_j). s_min = the process's
    smallest noise level (sigma at t = 0: EDM's sigma_min), as diffusers' CMStochasticIterativeScheduler adds it.
    N network evaluations; steps = 1 is the one-step sample f(x_T, t_{N-1}). `mid_sigmas` is the registry's option
    that sets the times (registry._few_step_times), unused here."""
    g = run.grid
    x0, _ = run.denoise(x, g.t[j])
    if j + 1 == g.n:
        return x0, x0
    s_min = float(run.process.sigma_at(0))
    std = math.sqrt(max(g.s[j + 1] ** 2 - s_min**2, 0.0))
    return g.alpha[j + 1] * (x0 + std * noise_like(x0, run.generator)), x0


def _meanflow_step(run: Run, j: int, x, *, mid_times=None):
    """MeanFlow sampling (Geng et al. 2025, eq. 12 / Alg. 2) on the flow z_t = (1 - t) x + t eps: from t to the next
    time r (0 after the last), z_r = z_t - (t - r) u(z_t, r, t), u the network's average velocity
    (Flow.average_velocity, a two-time net). N evaluations; steps = 1 is x = z_1 - u(z_1, 0, 1). The callback's
    x0_hat is z_t - t u(z_t, r, t) (exact when r = 0); clip_denoised clamps the final image to [-1, 1].
    `mid_times` is the registry's option that sets the times (registry._few_step_times), unused here."""
    g, diffusion = run.grid, run.process
    if run.guided is not None:
        raise ValueError("sampler.method=meanflow takes no guidance (its average velocity is not a denoiser)")
    if not getattr(diffusion, "averages_velocity", False):
        raise ValueError("sampler.method=meanflow needs a MeanFlow model (diffusion=flow, objective=meanflow)")
    if j == 0:  # the flow time of each visit, then 0
        run.memory["u"] = diffusion.u_at(torch.tensor(g.t, dtype=torch.float64)).tolist() + [0.0]
    u = run.memory["u"]
    velocity = diffusion.average_velocity(run.model, x, u[j], u[j + 1], run.model_kwargs)
    x0 = x - u[j] * velocity
    x = x - (u[j] - u[j + 1]) * velocity
    if j + 1 == g.n and run.clip:
        x = x.clamp(-1, 1)
    return x, x0


consistency = sampler("consistency", _consistency_step, mid_sigmas=None)
meanflow = sampler("meanflow", _meanflow_step, mid_times=None)
