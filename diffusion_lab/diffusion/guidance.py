"""Guidance as one piece every sampler uses: a rule, its scale, and a noise interval outside which it is off.

    g = Guidance("cfg", scale=2.0, interval=(0.3, 1.0))              # CFG only for sigma in (0.3, 1.0]
    g = Guidance("autoguidance", scale=2.0)                           # needs guide=<a weaker net of the same task>
    g = Guidance("apg", scale=4.0, eta=0.0, norm_threshold=8.0, momentum=-0.5)
    x0 = solvers.unipc(process, model, x_T, ts, guidance=g.bind(null_label=10), model_kwargs={"y": y})

Every rule mixes two denoisers D = D(x; sigma) (the x0 predictions) of one state and time (Kynkäänniemi et al. 2024,
Karras et al. 2024, Sadat et al. 2025 all define guidance on D):
- cfg (Ho & Salimans 2022, eq. 6): D = D_u + w (D_c - D_u), D_u the same net given the null label;
- autoguidance (Karras et al. 2024, eq. 1 / Sec. 3): D = D_guide + w (D_main - D_guide), D_guide a weaker model of
  the same task and conditioning (shorter training, a smaller net, an earlier EMA); unconditional models too;
- apg (Sadat, Hilliges, Weber, ICLR 2025, Alg. 1): CFG's difference d = D_c - D_u with negative momentum
  (d <- d + beta d_prev), its norm capped at r (d <- d min(1, r / |d|)), then split into the parts parallel and
  orthogonal to D_c and the parallel part scaled by eta: D = D_u + w (d_orth + eta d_par). eta = 1, r = 0 and
  beta = 0 is CFG. Equal to diffusers' `normalized_guidance` (tests/test_guidance.py), applied to D as the paper does.
The mixed D gives eps = (x - alpha D) / sigma (the linear rules mix eps the same way, exactly); clipping to [-1, 1]
comes after the mix. Outside the interval (sigma = the VE noise level sigma / alpha of the evaluation's time,
Process.sigma_at) the sampler sees D_c alone: one network evaluation instead of two. cfg and apg run both halves as
one batch of 2B (the NFE counts it as two evaluations, as the time it takes does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..checks import check_choice, check_number
from .parameterization import eps_from_x0

RULES = ("cfg", "autoguidance", "apg")
APG_DEFAULTS = {"eta": 0.0, "norm_threshold": 0.0, "momentum": -0.5}  # the paper's eta and beta; r is per model


class Guidance:
    """rule: cfg | autoguidance | apg; scale: w >= 0 (w = 1 is the main / conditional model alone);
    interval: (sigma_lo, sigma_hi) with 0 <= lo < hi, guidance on for sigma in (lo, hi] (None: everywhere);
    eta, norm_threshold (0: no cap), momentum (beta in (-1, 1)): APG's, refused for the other rules."""

    def __init__(self, rule: str = "cfg", scale: float = 1.0, interval=None, *, eta=None, norm_threshold=None,
                 momentum=None):  # fmt: skip
        check_choice("sampler.guidance", rule, RULES)
        self.rule = rule
        self.scale = check_number("sampler.guidance_scale", scale)
        apg = {"eta": eta, "norm_threshold": norm_threshold, "momentum": momentum}
        given = [k for k, v in apg.items() if v is not None]
        if rule != "apg" and given:
            raise ValueError(f"sampler.apg_{given[0]} is APG's: set sampler.guidance=apg, or drop it")
        self.eta = check_number("sampler.apg_eta", APG_DEFAULTS["eta"] if eta is None else eta, minimum=-math.inf)
        self.norm_threshold = check_number("sampler.apg_norm_threshold",
                                           APG_DEFAULTS["norm_threshold"] if norm_threshold is None else norm_threshold)
        beta = APG_DEFAULTS["momentum"] if momentum is None else momentum
        self.momentum = check_number("sampler.apg_momentum", beta, minimum=-math.inf)
        if not -1 < self.momentum < 1:
            raise ValueError(f"sampler.apg_momentum={beta!r} must lie in (-1, 1) (the paper's is -0.5)")
        self.interval = None
        if interval is not None:
            ok = isinstance(interval, list | tuple) and len(interval) == 2 and all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in interval)
            if not ok or not 0 <= interval[0] < interval[1]:
                raise ValueError(f"sampler.guidance_interval={list(interval) if ok else interval!r} must be "
                                 "[sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi (sigma_hi may be .inf)")
            self.interval = (float(interval[0]), float(interval[1]))

    @property
    def evaluations(self) -> int:
        """Network evaluations of one guided denoiser call: 1 when the scale makes it one model (w = 0: D_u alone
        for cfg and apg; w = 1: D_c alone for cfg, D_main for autoguidance), else 2."""
        if self.rule == "autoguidance":
            return 1 if self.scale == 1.0 else 2
        return 1 if self.scale == 0.0 or (self.rule == "cfg" and self.scale == 1.0) else 2

    def active(self, sigma: float) -> bool:
        """Whether guidance applies at the VE noise level sigma (the interval (lo, hi], or everywhere)."""
        return self.interval is None or self.interval[0] < sigma <= self.interval[1]

    def bind(self, *, null_label: int | None = None, guide: Callable | None = None) -> Bound:
        """This rule with what it mixes: cfg / apg need the null label, autoguidance the guide model."""
        if self.rule == "autoguidance":
            if guide is None:
                raise ValueError("sampler.guidance=autoguidance needs a guide: sampler.guide.ckpt=<a weaker run's "
                                 "checkpoint> or sampler.guide.step=<an earlier EMA snapshot step>")  # fmt: skip
        elif null_label is None:
            raise ValueError(f"sampler.guidance={self.rule} needs a class-conditional model (net.num_classes) and "
                             "labels y; an unconditional model is guided by sampler.guidance=autoguidance")
        return Bound(self, null_label, guide)

    def describe(self) -> str:
        """'cfg2', 'apg4_eta0_r8_beta-0.5', 'autoguidance2_in0.3-1' (log names)."""
        out = f"{self.rule}{self.scale:g}"
        if self.rule == "apg":
            out += f"_eta{self.eta:g}_r{self.norm_threshold:g}_beta{self.momentum:g}"
        if self.interval is not None:
            out += f"_in{self.interval[0]:g}-{self.interval[1]:g}"
        return out

    def config(self) -> dict:
        return {"guidance": self.rule, "guidance_scale": self.scale,
                "guidance_interval": None if self.interval is None else list(self.interval),
                **({f"apg_{k}": getattr(self, k) for k in APG_DEFAULTS} if self.rule == "apg" else {})}  # fmt: skip


def with_null_half(kwargs: dict, batch: int, null_label: int) -> dict:
    """model_kwargs for one batch of 2B, the conditional half first: y [B] -> [y, the null label], every other
    per-example input [B, ...] repeated (MeanFlow's second time h), the rest as it is."""
    both = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (batch,) else v for k, v in kwargs.items()}
    both["y"] = torch.cat([kwargs["y"], torch.full_like(kwargs["y"], null_label)])
    return both


def apg_update(diff: torch.Tensor, cond: torch.Tensor, state: dict, eta: float, norm_threshold: float,
               momentum: float) -> torch.Tensor:  # fmt: skip
    """APG's update from d = D_c - D_u [B, ...] and D_c [B, ...] (Sadat et al. 2025, Alg. 1): momentum (the running
    d_avg = d + beta d_avg_prev in state["avg"]), the norm cap per image, the projection on D_c (in float64)."""
    dims = list(range(1, diff.ndim))
    if momentum:
        diff = diff + momentum * state["avg"] if "avg" in state else diff
        state["avg"] = diff
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    d, c = diff.double(), torch.nn.functional.normalize(cond.double(), dim=dims)
    parallel = (d * c).sum(dim=dims, keepdim=True) * c
    orthogonal = d - parallel
    return (orthogonal + eta * parallel).to(diff.dtype)


@dataclass
class Bound:
    """A Guidance with its null label or guide model: `denoiser` gives a sampler's denoise for one run."""

    rule: Guidance
    null_label: int | None = None
    guide: Callable | None = None

    def denoiser(self, process, model, model_kwargs, clip: bool) -> Denoiser:
        return Denoiser(self, process, model, model_kwargs or {}, clip)


@dataclass
class Denoiser:
    """(x, t) -> (x0_hat, eps_hat) [B, C, H, W] under guidance, for one sampling run (APG's momentum lives here).
    What it costs is counted once, by Sampler.nfe (a dry run through it where an interval decides)."""

    bound: Bound
    process: object
    model: Callable
    model_kwargs: dict
    clip: bool
    state: dict = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        g, p = self.bound.rule, self.process
        on = g.interval is None or g.active(float(p.sigma_at(t)))  # sigma only when an interval asks
        if g.evaluations == 1 or not on:
            kwargs = self.model_kwargs
            if on and g.scale == 0.0 and g.rule != "autoguidance":  # w = 0: the unconditional model alone
                kwargs = {**kwargs, "y": torch.full_like(kwargs["y"], self.bound.null_label)}
            return p.denoise(self.model, x, t, kwargs, self.clip)
        if g.rule == "autoguidance":
            x0_c, eps_c = p.denoise(self.model, x, t, self.model_kwargs, False)
            x0_u, eps_u = p.denoise(self.bound.guide, x, t, self.model_kwargs, False)
        else:  # the conditional and the null-label halves in one batch
            both = with_null_half(self.model_kwargs, x.shape[0], self.bound.null_label)
            x0, eps = p.denoise(self.model, torch.cat([x, x]), t, both, False)
            (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        alpha, sigma = (float(v) for v in p.alpha_sigma_at(t))
        if g.rule == "apg":
            x0 = x0_u + g.scale * apg_update(x0_c - x0_u, x0_c, self.state, g.eta, g.norm_threshold, g.momentum)
            eps = eps_from_x0(x, x0, alpha, sigma)
        else:  # torch.lerp(u, c, w) = u + w (c - u): exact at w = 0 and 1, and eps mixed as x0 is
            x0, eps = torch.lerp(x0_u, x0_c, g.scale), torch.lerp(eps_u, eps_c, g.scale)
        if self.clip:
            x0 = x0.clamp(-1, 1)
            eps = eps_from_x0(x, x0, alpha, sigma)
        return x0, eps
