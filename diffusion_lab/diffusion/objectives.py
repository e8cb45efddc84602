"""Training objectives: what a training step minimizes, one short class each (as NVlabs/edm's training/loss.py).

    objective = Denoising().bind(process, timesteps)            # built from conf/objective/*.yaml, bound by the module
    out = objective(net, x0, model_kwargs, step=global_step)    # Losses: per-example terms [B], weights [B], times [B]
    loss = (out.terms["loss"] * out.weights).mean()

- `Denoising`: the process's own loss (DDPM/IDDPM's L_simple / L_hybrid / VLB, EDM's, flow matching's) at the times
  the timestep sampler draws: what every run trained before objectives existed, bit for bit.
- `ECT`: Easy Consistency Tuning (Geng et al., ICLR 2025): consistency training with the pair (t, r) on the same
  noise, r shrinking towards t in stages, started from a diffusion model; `pair=teacher` takes x_r one ODE step of a
  frozen teacher instead (consistency distillation, Song et al. 2023, Alg. 2).
- `MeanFlow`: the average velocity u(z_t, r, t) of a flow (Geng, Deng, Bai, Kolter, He 2025) through the identity
  u = v - (t - r) du/dt, du/dt a Jacobian-vector product (torch.func.jvp).

An objective is built from config without a process and bound to the run's process (and timestep sampler, teacher)
by `bind`, which refuses a process it cannot train in one line. It draws from `generator` when one is given (the
validation batches), else from the global RNG, which the module reseeds for every batch from (seed, step, rank).
The model is an argument, as everywhere in diffusion/.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..checks import check_choice, check_count, check_number
from .losses import mean_flat
from .timesteps import ProcessTimeSampler, UniformTimestepSampler


@dataclass
class Losses:
    """terms: per-example [B] tensors; "loss" is minimized (times `weights`), the others are logged (e.g. "mse",
    and by quartile of `t`). weights: importance weights [B] (1 unless the timestep sampler is loss-aware).
    t: the training times [B] in the process's own variable (process.solver_time places them on [0, T-1])."""

    terms: dict[str, torch.Tensor]
    weights: torch.Tensor
    t: torch.Tensor


def _per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, .., 1] in like's dtype/device."""
    return v.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def _rand(shape, generator: torch.Generator | None, normal: bool) -> torch.Tensor:
    """float64 CPU draws (from `generator`, else the global RNG): the same numbers on every device."""
    draw = torch.randn if normal else torch.rand
    return draw(shape, generator=generator, dtype=torch.float64)


class Objective:
    """The interface: `bind`, `__call__` (a training batch), `validation` (a batch with fixed draws), `update`
    (losses of every rank, for a learning timestep sampler). `name` is the conf/objective choice; `sampler` the
    sampler a model trained by it uses when none is given (None: the process's own)."""

    name = "objective"
    sampler: str | None = None
    needs_teacher = False  # whether bind needs a teacher (train.py refuses a run without teacher=<ckpt>)
    time_inputs = 1  # how many times the network takes (MeanFlow: t and t - r)
    tunes = False  # meant to start from a trained diffusion model (init_from): ECT

    process = None
    timesteps = None
    teacher = None

    def bind(self, process, timesteps=None, teacher=None) -> Objective:
        """A copy bound to the run's process (and timestep sampler / frozen teacher); ValueError naming the key."""
        bound = copy.copy(self)
        bound.process, bound.timesteps, bound.teacher = process, timesteps, teacher
        bound.check(process)
        return bound

    def check(self, process) -> None:
        """ValueError when this objective cannot train `process`."""

    def __deepcopy__(self, memo):
        """A copy that shares the frozen teacher (the EMA deep-copies the module, and with it this objective)."""
        new = copy.copy(self)
        memo[id(self)] = new
        for k, v in vars(self).items():
            setattr(new, k, v if k == "teacher" else copy.deepcopy(v, memo))
        return new

    def __call__(self, net, x0: torch.Tensor, model_kwargs: dict | None = None, step: int = 0,
                 generator: torch.Generator | None = None) -> Losses:  # fmt: skip
        """The per-example losses of a batch x0 [B, C, H, W] in [-1, 1] at optimizer step `step`."""
        raise NotImplementedError

    def validation(self, net, x0, model_kwargs=None, generator=None) -> Losses:
        """The loss at draws fixed by `generator` (comparable across epochs), at the objective's first stage."""
        return self(net, x0, model_kwargs, step=0, generator=generator)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        if self.timesteps is not None:
            self.timesteps.update(t, losses)


class Denoising(Objective):
    """The process's own loss (process.training_losses) at times from the timestep sampler: DDPM's uniform or
    IDDPM's loss-aware steps on the discrete process (timesteps=uniform|loss_aware), the process's own noise-level
    distribution on EDM and flow (timesteps=own)."""

    name = "denoising"

    def bind(self, process, timesteps=None, teacher=None) -> Denoising:
        own = isinstance(timesteps, ProcessTimeSampler)
        if not process.discrete:
            if timesteps is not None and not own:
                raise ValueError(
                    f"timesteps={type(timesteps).__name__} draws the integer steps of diffusion=ddpm/iddpm; this "
                    "process draws its own noise levels: use timesteps=own"
                )
            timesteps = ProcessTimeSampler(process)
        elif own:
            raise ValueError("timesteps=own needs a continuous process (diffusion=edm or flow); use timesteps=uniform")
        timesteps = timesteps or UniformTimestepSampler(process.num_timesteps)
        if timesteps.num_timesteps != process.num_timesteps:
            raise ValueError(
                f"timesteps.num_timesteps={timesteps.num_timesteps} must equal diffusion.steps={process.num_timesteps}"
            )
        return super().bind(process, timesteps, teacher)

    def __call__(self, net, x0, model_kwargs=None, step=0, generator=None) -> Losses:
        t, weights = self.timesteps.sample(x0.shape[0], x0.device, generator=generator)
        noise = None if generator is None else torch.randn(x0.shape, generator=generator).to(x0)
        return Losses(self.process.training_losses(net, x0, t, noise=noise, model_kwargs=model_kwargs), weights, t)

    def validation(self, net, x0, model_kwargs=None, generator=None) -> Losses:
        """Uniform times on the process's range (integer steps, or the process's own distribution), not the
        loss-aware ones, and noise, both from `generator`."""
        t = self.process.sample_u(x0.shape[0], generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        terms = self.process.training_losses(net, x0, t, noise=noise, model_kwargs=model_kwargs)
        return Losses(terms, torch.ones_like(terms["loss"]), t)


# ---------------------------------------------------------------------------------------------------- ECT
ECT_MAPPINGS = ("sigmoid", "const")
ECT_PAIRS = ("noise", "teacher")


def _same_dropout(device: torch.device):
    """(save, restore) of the RNG that dropout draws from on `device`, so two forward passes share one mask (ECT's
    trick: its reference code saves CUDA's state only; the CPU Dropout of nets/layers.py draws from the CPU RNG)."""
    if device.type == "cuda":
        return (lambda: torch.cuda.get_rng_state(device)), (lambda s: torch.cuda.set_rng_state(s, device))
    return torch.get_rng_state, torch.set_rng_state


class ECT(Objective):
    """Easy Consistency Tuning (Geng et al., ICLR 2025, Sec. 3; the consistency condition of Song et al. 2023).

    In the VE noise level sigma of the process (EDM's sigma; flow's t / (1 - t)):
        t ~ lognormal(p_mean, p_std),  r = t max(0, 1 - a(t) / q^stage),  a(t) = 1 + k sigmoid(-b t) (sigmoid) or 1
        x_t, x_r = the same x0 and noise at t and r (pair=noise; pair=teacher: x_r = one Euler step of the frozen
            teacher's probability-flow ODE from x_t, consistency distillation)
        loss = d(f(x_t, t), stopgrad f(x_r, r)) / (t - r),  f = the process's x0 prediction; f(x_r, 0) = x0
        d(x, y) = sqrt(|x - y|^2 + c^2) - c over all pixels (pseudo-Huber; c = 0: the L2 norm, ECT on CIFAR-10)
    The stage is first_stage + step // stage_steps: stage 0 has r = 0 everywhere, where the target is x0 and the
    loss is the denoising loss in the distance d with weight 1 / t (diffusion pretraining as a special case of
    consistency training); ECT tunes from stage 1 (its code's stage 0) and doubles q^stage every stage_steps
    (CIFAR-10: 25,000 of 200,000 steps). Both passes share one dropout mask; f(x_r) runs without gradient on the
    same weights (no EMA target). Defaults are ECT's CIFAR-10 ones (P_mean -1.1, P_std 2, q 2, k 8, b 1, c 0)."""

    name = "ect"
    sampler = "consistency"
    tunes = True

    def __init__(
        self,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        mapping: str = "sigmoid",
        c: float = 0.0,
        stage_steps: int = 25_000,
        first_stage: int = 1,
        pair: str = "noise",
    ):
        self.p_mean = check_number("objective.p_mean", p_mean, minimum=-math.inf, finite=True)
        self.p_std = check_number("objective.p_std", p_std, finite=True)
        self.q = check_number("objective.q", q, finite=True)
        if not self.q > 1:
            raise ValueError(f"objective.q={q} must be > 1 (the gap t - r shrinks by q every stage)")
        self.k = check_number("objective.k", k, finite=True)
        self.b = check_number("objective.b", b, finite=True)
        self.c = check_number("objective.c", c, finite=True)
        check_choice("objective.mapping", mapping, ECT_MAPPINGS)
        check_choice("objective.pair", pair, ECT_PAIRS)
        stage_steps, first_stage = check_count("objective.stage_steps", stage_steps), check_count(
            "objective.first_stage", first_stage, 0)
        self.mapping, self.stage_steps, self.first_stage, self.pair = mapping, stage_steps, first_stage, pair
        self.needs_teacher = pair == "teacher"

    def check(self, process) -> None:
        if process.discrete:
            raise ValueError(
                "objective=ect needs a continuous noise level (diffusion=edm or flow); a diffusion=ddpm/iddpm network "
                "is defined on T discrete steps: tune an edm_mnist_cpu or flow_mnist_cpu checkpoint"
            )

    def stage(self, step: int) -> int:
        return self.first_stage + int(step) // self.stage_steps

    def r_of(self, t: torch.Tensor, stage: int) -> torch.Tensor:
        """r = t max(0, 1 - a(t) / q^stage) (ECT's mapping function), float64 [B]."""
        a = 1 + self.k * torch.sigmoid(-self.b * t) if self.mapping == "sigmoid" else torch.ones_like(t)
        return t * (1 - a / self.q**stage).clamp(min=0)

    def distance(self, diff: torch.Tensor) -> torch.Tensor:
        """Pseudo-Huber over all pixels of diff [B, C, H, W] -> [B] (c = 0: the L2 norm)."""
        sq = diff.pow(2).flatten(1).sum(1)
        return (sq + self.c**2).sqrt() - self.c

    def __call__(self, net, x0, model_kwargs=None, step=0, generator=None) -> Losses:
        p, B = self.process, x0.shape[0]
        t = (self.p_mean + self.p_std * _rand(B, generator, normal=True)).exp()
        r = self.r_of(t, self.stage(step))
        noise = _rand(x0.shape, generator, normal=True).to(device=x0.device, dtype=x0.dtype)
        u_t = p.u_at_sigma(t).to(x0.device)
        x_t = p.q_sample(x0, u_t, noise)
        save, restore = _same_dropout(x0.device)
        state = save()
        f_t = p.denoise_u(net, x_t, u_t, model_kwargs)[0]
        target = x0
        if bool((r > 0).any()):
            with torch.no_grad():
                u_r = p.u_at_sigma(r).to(x0.device)
                if self.pair == "teacher":  # one ODE step of the teacher (consistency distillation)
                    x_r = self._teacher_step(x_t, u_t, u_r, model_kwargs)
                else:
                    x_r = p.q_sample(x0, u_r, noise)
                restore(state)
                f_r = torch.nan_to_num(p.denoise_u(net, x_r, u_r, model_kwargs)[0])
            target = torch.where(_per_example(r > 0, x0).bool(), f_r, x0)
        diff = f_t - target
        weight = 1 / (t - r)
        loss = self.distance(diff) * weight.to(x0)
        return Losses({"loss": loss, "mse": mean_flat(diff.detach() ** 2)}, torch.ones_like(loss), u_t)

    def _teacher_step(self, x_t, u_t, u_r, model_kwargs):
        """x at r from x_t at t by one DDIM step of the teacher (Euler on its probability-flow ODE in x / alpha and
        sigma / alpha): x_r = alpha_r x0_hat + sigma_r eps_hat, at per-example times."""
        x0_hat, eps_hat = self.process.denoise_u(self.teacher, x_t, u_t, model_kwargs)
        alpha_r, sigma_r = (_per_example(v, x_t) for v in self.process.path(u_r))
        return alpha_r * x0_hat + sigma_r * eps_hat


# ---------------------------------------------------------------------------------------------------- MeanFlow
class MeanFlow(Objective):
    """MeanFlow (Geng, Deng, Bai, Kolter, He 2025, eqs. 6-10) on the flow z_t = (1 - t) x + t eps, v = eps - x:
        t, r: two logit-normal(p_mean, p_std) draws, t the larger; with probability 1 - ratio per example r = t
        u, du/dt = jvp(u_theta, (z_t, r, t), (v, 0, 1))          (forward-mode AD through the network)
        u_tgt = stopgrad(v - (t - r) du/dt)
        loss = sg(1 / (|u - u_tgt|^2 + c)^p) |u - u_tgt|^2       (sum over pixels: the adaptive weight, eq. 10)
    With r = t it is flow matching. The network takes t and t - r (net.time_inputs=2). Defaults are the paper's
    CIFAR-10 ones (py-meanflow's cifar10 script: logit-normal(-2, 2), 75% of pairs with r != t, p = 0.75, c = 1e-3).
    """

    name = "meanflow"
    sampler = "meanflow"
    time_inputs = 2

    def __init__(self, p_mean: float = -2.0, p_std: float = 2.0, ratio: float = 0.75, p: float = 0.75,
                 c: float = 1e-3):  # fmt: skip
        self.p_mean = check_number("objective.p_mean", p_mean, minimum=-math.inf, finite=True)
        self.p_std = check_number("objective.p_std", p_std, finite=True)
        self.ratio = check_number("objective.ratio", ratio, maximum=1.0)
        self.p = check_number("objective.p", p, finite=True)
        self.c = check_number("objective.c", c, minimum=1e-12, finite=True)

    def check(self, process) -> None:
        if not getattr(process, "averages_velocity", False):
            raise ValueError("objective=meanflow needs diffusion=flow with diffusion.mean_type=velocity (it learns the "
                             "flow's average velocity)")  # fmt: skip

    def times(self, n: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r) float64 [n], 0 < r <= t < 1."""
        a, b = (torch.sigmoid(self.p_mean + self.p_std * _rand(n, generator, normal=True)) for _ in range(2))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        return t, torch.where(_rand(n, generator, normal=False) < self.ratio, r, t)

    def target(self, net, z, t, r, v, model_kwargs=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_theta(z, r, t), stopgrad u_tgt), each [B, C, H, W]; t, r [B] in z's dtype; v the tangent of z."""
        u_fn: Callable = lambda z_, t_, r_: self.process.average_velocity(net, z_, t_, r_, model_kwargs)
        # the fused attention kernels (flash / memory-efficient, CPU and CUDA) have no forward-mode derivative: the
        # JVP runs attention through SDPA's math backend
        with sdpa_kernel(SDPBackend.MATH):
            u, dudt = torch.func.jvp(u_fn, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
        return u, (v - _per_example(t - r, z) * dudt).detach()

    def __call__(self, net, x0, model_kwargs=None, step=0, generator=None) -> Losses:
        t64, r64 = self.times(x0.shape[0], generator)
        t, r = t64.to(x0), r64.to(x0)
        noise = _rand(x0.shape, generator, normal=True).to(x0)
        z = self.process.q_sample(x0, t64.to(x0.device), noise)
        u, u_tgt = self.target(net, z, t, r, noise - x0, model_kwargs)
        err = (u - u_tgt).pow(2).flatten(1).sum(1)
        loss = err / (err.detach() + self.c) ** self.p
        return Losses({"loss": loss, "mse": err.detach() / x0[0].numel()}, torch.ones_like(loss), t64.to(x0.device))


OBJECTIVES = {cls.name: cls for cls in (Denoising, ECT, MeanFlow)}
