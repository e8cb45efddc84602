"""Reverse-process samplers on the discrete process: DDPM's ancestral loop (any variance type), DDIM inversion,
`ddim_sample` (the DDIM of solvers.py on a spacing spec), slerp and classifier-free guidance.

Every sampler has the shape `(diffusion, model, x_T, timesteps, *, ..., generator=None, progress=False) -> x_0`:
x_T: [B, C, H, W] at the noise level of the first visited step; the result is in [-1, 1] when
clip_denoised. `timesteps` is a list of kept steps, a spec for `space_timesteps` ("ddim50"), or None
(all T). Intermediate results reach `callback(step_index, x_t, pred_x0)` after every step, and
`post_step(step_index, x_t) -> x_t` may edit the new state first (inpainting, diffusion/inpaint.py); step_index i is
the index of the time just evaluated, the new state is at index i - 1 (the clean image after i = 0).
`generator` is a torch.Generator or per-image ImageGenerators (seeding.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import solvers
from .gaussian import GaussianDiffusion, extract
from .guidance import with_null_half
from .respace import space_timesteps, visited_times
from .seeding import noise_like

StepFn = Callable[..., torch.Tensor]


def as_process(diffusion: GaussianDiffusion, timesteps: Sequence[int] | str | int | None) -> GaussianDiffusion:
    """The process a sampler runs: the full one, or the one respaced to `timesteps` (list or spec)."""
    if timesteps is None:
        return diffusion
    if isinstance(timesteps, (str, int)):
        timesteps = space_timesteps(diffusion.num_timesteps, timesteps)
    if list(timesteps) == list(range(diffusion.num_timesteps)):
        return diffusion
    return diffusion.respace(timesteps)


def ddpm_step(process, out, x_t, t, generator=None, temperature=1.0, **_):
    """Ancestral step x_{t-1} = mean + sigma_t z (DDPM Alg. 2), no noise at t = 0."""
    nonzero = (t != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * temperature * noise_like(x_t, generator)


def sample_loop(
    diffusion: GaussianDiffusion,
    model,
    x_T: torch.Tensor,
    timesteps=None,
    *,
    step: StepFn = ddpm_step,
    start_index: int | None = None,
    clip_denoised: bool = True,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    post_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    guidance=None,
    **step_kwargs,
) -> torch.Tensor:
    """Run `step` from index `start_index` (default: the last) down to 0 of the (respaced) process.

    post_step(i, x_{i-1}) may edit the new state (inpainting); callback(i, x_{i-1}, pred_x0) observes it.
    guidance: a guidance.Bound (any rule, interval): each step's x0 prediction is the rule's mix (guidance.py),
    the variance the guided model's own (_guided_mean_variance).
    """
    process = as_process(diffusion, timesteps)
    if guidance is not None:
        model = _LastOutput(model)
        denoise = guidance.denoiser(process, model, model_kwargs, clip_denoised)
    n = process.num_timesteps
    start = n - 1 if start_index is None else int(start_index)
    if not 0 <= start < n:
        raise ValueError(f"start_index={start_index} must be in [0, {n})")
    x = x_T
    indices = range(start, -1, -1)
    for i in tqdm(indices, desc="sampling", leave=False) if progress else indices:
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        with torch.no_grad():
            if guidance is None:
                out = process.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            else:
                out = _guided_mean_variance(process, denoise, model, x, t, i)
            x = step(process, out, x, t, generator=generator, temperature=temperature, **step_kwargs)
        if post_step is not None:
            x = post_step(i, x)
        if callback is not None:
            callback(i, x, out["pred_x0"])
    return x


class _LastOutput:
    """The guided model, keeping its last raw output [B or 2B, C or 2C, H, W]: the guidance Denoiser calls it first
    each step (for CFG / APG with the conditional rows first), so its first B rows hold the learned variance."""

    def __init__(self, model):
        self.model, self.last = model, None

    def __call__(self, *args, **kwargs):
        self.last = self.model(*args, **kwargs)
        return self.last


def _guided_mean_variance(process, denoise, model: _LastOutput, x: torch.Tensor, t: torch.Tensor, i: int) -> dict:
    """p_mean_variance under guidance at index i (t: [B] of i): pred_x0 / eps the rule's mix (clipped as asked), the
    posterior mean q(x_{t-1} | x_t, pred_x0) (DDPM eq. 7) and the guided model's own variance (a learned one from
    its output: the conditional half's, as ClassifierFreeGuidance keeps; the main model's under autoguidance, at
    any w)."""
    pred_x0, eps = denoise(x, float(i))
    _, var_out = process.split_model_output(model.last[: x.shape[0]], x)
    log_variance = process.model_log_variance(var_out, t, x)
    mean, _, _ = process.q_posterior_mean_variance(pred_x0, x, t)
    return {"mean": mean, "variance": torch.exp(log_variance), "log_variance": log_variance, "pred_x0": pred_x0,
            "eps": eps}  # fmt: skip


def ddpm_sample(
    diffusion,
    model,
    x_T,
    timesteps=None,
    *,
    clip_denoised=True,
    model_kwargs=None,
    generator=None,
    temperature=1.0,
    progress=False,
    callback=None,
    start_index=None,
    post_step=None,
    guidance=None,
):
    """Ancestral sampling (DDPM Alg. 2) on the full or a respaced process, any variance type, any guidance."""
    return sample_loop(
        diffusion,
        model,
        x_T,
        timesteps,
        step=ddpm_step,
        start_index=start_index,
        clip_denoised=clip_denoised,
        model_kwargs=model_kwargs,
        generator=generator,
        temperature=temperature,
        progress=progress,
        callback=callback,
        post_step=post_step,
        guidance=guidance,
    )


def ddim_sample(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    eta=0.0,
    start_index=None,
    **kwargs,
):
    """DDIM sampling (Song et al. 2021, eq. 12): `solvers.ddim` (the one DDIM) on the times `timesteps` names (a
    list, a spacing spec such as "ddim50", or None for all T), started at timesteps[start_index] (default: the last);
    eta=0 is deterministic, eta=1 on all T steps is DDPM with beta-tilde. Takes solvers.ddim's keywords."""
    ts = visited_times(diffusion.num_timesteps, timesteps, start_index)
    return solvers.ddim(diffusion, model, x_T, ts, eta=eta, **kwargs)


@torch.no_grad()
def ddim_invert(
    diffusion,
    model,
    x0,
    timesteps,
    *,
    fixed_point_iters: int = 0,
    clip_denoised=False,
    model_kwargs=None,
    progress=False,
):
    """Deterministic DDIM encoding x_0 -> x at the last kept step (DDIM eq. 13 run forwards, eta = 0).

    Step i maps the state at level a_prev = alpha_bar_{s_{i-1}} (1 for the clean image) to level
    a = alpha_bar_{s_i}: x_i = sqrt(a) (x_{i-1} - sqrt(1 - a_prev) eps) / sqrt(a_prev) + sqrt(1 - a) eps.
    The usual approximation takes eps from the model at the previous state (first order in the step
    size); each of `fixed_point_iters` re-evaluates eps at the new x_i, which converges to the exact
    inverse of `ddim_sample(..., eta=0, clip_denoised=False)`'s step.
    """
    process = as_process(diffusion, timesteps)
    x = x0
    indices = range(process.num_timesteps)
    for i in tqdm(indices, desc="inverting", leave=False) if progress else indices:
        t_prev = torch.full((x.shape[0],), max(i - 1, 0), device=x.device, dtype=torch.long)
        t = torch.full_like(t_prev, i)
        a, a_prev = extract(process.alphas_cumprod, t, x), extract(process.alphas_cumprod_prev, t, x)
        eps = process.p_mean_variance(model, x, t_prev, clip_denoised, model_kwargs)["eps"]
        x0_hat = (x - torch.sqrt(1 - a_prev) * eps) / torch.sqrt(a_prev)
        x_next = torch.sqrt(a) * x0_hat + torch.sqrt(1 - a) * eps
        for _ in range(fixed_point_iters):
            eps = process.p_mean_variance(model, x_next, t, clip_denoised, model_kwargs)["eps"]
            x_next = torch.sqrt(a) * (x - torch.sqrt(1 - a_prev) * eps) / torch.sqrt(a_prev) + torch.sqrt(1 - a) * eps
        x = x_next
    return x


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation per example (DDIM Sec. 5.3): sin((1-a) th)/sin(th) z0 + sin(a th)/sin(th) z1."""
    flat0, flat1 = z0.flatten(1), z1.flatten(1)
    cos = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (z0.ndim - 1)))
    s = torch.sin(theta).clamp(min=1e-8)
    return torch.sin((1 - alpha) * theta) / s * z0 + torch.sin(alpha * theta) / s * z1


class ClassifierFreeGuidance:
    """Wrap a class-conditional model: eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, eq. 6). The samplers
    guide through guidance.py (Sampler.guidance); this wrapper is for a loop of one's own, and the tests' reference.

    One batched forward of 2B per step (conditional and null labels together). s=1 runs only the
    conditional half and s=0 only the unconditional one, so those equal plain sampling bit for bit.
    A learned variance (extra channels) is taken from the conditional output.
    """

    def __init__(self, model, scale: float, null_label: int):
        self.model, self.scale, self.null_label = model, float(scale), int(null_label)

    def __call__(self, x, t, y, **kwargs):
        if self.scale == 1.0:
            return self.model(x, t, y=y, **kwargs)
        if self.scale == 0.0:
            return self.model(x, t, y=torch.full_like(y, self.null_label), **kwargs)
        both = with_null_half({**kwargs, "y": y}, x.shape[0], self.null_label)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), **both)
        cond, uncond = out.chunk(2)
        C = x.shape[1]
        # torch.lerp(u, c, s) = u + s (c - u), exact at s = 0 and s = 1.
        eps = torch.lerp(uncond[:, :C], cond[:, :C], self.scale)
        return torch.cat([eps, cond[:, C:]], dim=1)
