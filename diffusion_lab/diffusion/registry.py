"""The sampler registry: every reverse-process method by name, with what the rest of the code needs to know.

    method = get_method("heun")
    method.fn(diffusion, model, x_T, timesteps, model_kwargs=..., generator=..., callback=..., **options)
    method.nfe(10) == 19; method.steps_for_nfe(10) == 5; method.label({}) == "Heun"

Every `fn` has one signature (solvers.sampler's; see solvers.py for the conventions): ascending `timesteps`,
x_T at the last of them, the result x_0. Adding a sampler is one function + one `register(Method(...))` below +
one conf/sampler/<name>.yaml naming the method (a preset of options is a file that includes it, e.g. ddim_eta1.yaml).
This is the one home of every sampler default (steps, grid, options): the config files leave them null. Nothing
outside this module compares method names: labels, NFE, which options a method takes and their valid values,
whether it is deterministic, and whether inversion supports it are all read from here. Every method inpaints
(inpaint.paint, through the shared `post_step`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_choice, check_number
from . import few_step, solvers
from .samplers import ddim_invert, ddpm_sample


def _nonneg(name: str) -> Callable[[Any], None]:
    return lambda v: check_number(f"sampler.{name}", v)


CHECKS: dict[str, Callable[[str], Callable[[Any], None]]] = {
    "eta": _nonneg,
    "temperature": _nonneg,
    "s_churn": _nonneg,
    "s_tmin": _nonneg,
    "s_tmax": _nonneg,
    "s_noise": _nonneg,
}


@dataclass(frozen=True)
class Method:
    """One registered sampler.

    name: the config value (`sampler.method=<name>`); fn: the sampler function.
    title: display name; `label(options)` adds the options that differ from their defaults.
    options: the options it accepts -> default, each validated by `checks`, else by the function's allowed values
        (`fn.choices`, solvers.sampler), else by `CHECKS`.
    spacing: its default timestep discretization (respace.sampling_times); steps: its default number of visited
        times (None: all of the process's T, DDPM's ancestral sampling).
    evals_per_step: network evaluations per visited time, `extra_last` fewer in all (Heun: 2 and 1 -> 2N - 1).
    stochastic: options -> whether it draws noise (DDIM: eta > 0).
    invert: (diffusion, model, x0, timesteps, **options) -> x at timesteps[-1], for deterministic inversion (it
        takes the sampler's options and uses those it needs).
    in_name: options always written in the log name (DDIM's eta, for names like ddim50_eta0).
    from_noise: options -> whether it can start at pure noise (alpha = 0: flow's t = 1, zero terminal SNR); every
        method can but Euler and Heun with churn (their churn raises sigma / alpha, infinite there).
    discrete: it needs the discrete process (GaussianDiffusion: its tables and respacing); refused elsewhere.
    objectives: the training objectives whose models it samples (None: any; consistency: ect, meanflow: meanflow).
    times: (diffusion, options) -> the ascending times to visit, or None for the spacing grid: an option that
        fixes the grid (the few-step samplers' mid_sigmas / mid_times), with `fixed_steps` its number of visits.
    guided: the guidance it takes: "any" (every rule and interval, through guidance.py's denoiser: the solvers'
        driver, DDPM's ancestral loop), None (none).
    """

    name: str
    fn: Callable
    title: str
    options: Mapping[str, Any] = field(default_factory=dict)
    checks: Mapping[str, Callable[[Any], None]] = field(default_factory=dict)
    spacing: str = "auto"
    steps: int | None = 10
    evals_per_step: int = 1
    extra_last: int = 0
    stochastic: Callable[[Mapping[str, Any]], bool] = lambda o: False
    invert: Callable | None = None
    in_name: tuple[str, ...] = ()
    from_noise: Callable[[Mapping[str, Any]], bool] = lambda o: True  # False: needs a finite sigma / alpha at start
    discrete: bool = False  # runs on the discrete process's own steps (GaussianDiffusion.respace): DDPM, DDIM
    objectives: tuple[str, ...] | None = None
    times: Callable[[Any, Mapping[str, Any]], list | None] = lambda diffusion, o: None
    fixed_steps: Callable[[Mapping[str, Any]], int | None] = lambda o: None
    guided: str | None = "any"

    def check_process(self, diffusion, key: str = "sampler.method", objective: str | None = None) -> None:
        """ValueError naming `key` when this method needs the discrete process and `diffusion` is another, or (when
        `objective` names the model's training objective) a model trained by another objective."""
        if self.discrete and not diffusion.discrete:
            raise ValueError(
                f"{key}={self.name} runs on the steps of diffusion=ddpm/iddpm; on this process use ddim "
                "(sampler=ddim_eta1 is the stochastic one) or an ODE solver"
            )
        if objective is not None and self.objectives is not None and objective not in self.objectives:
            raise ValueError(
                f"{key}={self.name} samples models trained with objective={'|'.join(self.objectives)}; this model was "
                f"trained with objective={objective}: use one of its samplers (ddim, dpmpp_2m, unipc, euler, ...)"
            )

    def nfe(self, steps: int) -> int:
        """Network evaluations of a run visiting `steps` times."""
        return self.evals_per_step * int(steps) - self.extra_last

    def steps_for_nfe(self, nfe: int) -> int:
        """The most visited times whose NFE does not exceed `nfe` (at least 1)."""
        return max(1, (int(nfe) + self.extra_last) // self.evals_per_step)

    def resolve(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The full option dict: defaults updated with `given`; ValueError for an option it does not take."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            takes = ", ".join(self.options) or "no options"
            raise ValueError(f"sampler.{unknown[0]} is not an option of sampler.method={self.name} (it takes: {takes})")
        opts = {**self.options, **given}
        choices = getattr(self.fn, "choices", {})  # solvers.sampler's allowed values, checked as the function does
        for k, v in opts.items():
            if k in self.checks:
                self.checks[k](v)
            elif k in choices:
                check_choice(f"sampler.{k}", v, choices[k])
            elif k in CHECKS:
                CHECKS[k](k)(v)
        return opts

    def label(self, options: Mapping[str, Any]) -> str:
        """'DDIM eta=0', 'UniPC-2', 'Heun': the title plus the options that differ from the defaults."""
        if "order" in self.options and "{order}" in self.title:
            title = self.title.format(order=options.get("order", self.options["order"]))
            shown = {k: v for k, v in options.items() if k != "order" and v != self.options[k]}
        else:
            title = self.title
            shown = {k: v for k, v in options.items() if k in self.in_name or v != self.options[k]}
        return " ".join([title, *(f"{k}={_fmt(v)}" for k, v in shown.items())])

    def log_name(self, steps: int, options: Mapping[str, Any]) -> str:
        """'ddim50_eta0', 'ddpm1000', 'unipc10_order2': name, steps, then always-named and non-default options."""
        parts = [f"{self.name}{steps}"]
        parts += [f"{k}{_fmt(v)}" for k, v in options.items() if k in self.in_name or v != self.options[k]]
        return "_".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) and math.isfinite(v) else str(v)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method, or ValueError naming sampler.method and the allowed names."""
    check_choice("sampler.method", name, METHODS)
    return METHODS[name]


def _ode_inverter(order: int) -> Callable:
    def invert(diffusion, model, x0, timesteps, d2_weight="published", **_options):
        return solvers.ode_invert(diffusion, model, x0, timesteps, order=order, d2_weight=d2_weight)

    return invert


def _ddim_inverter(diffusion, model, x0, timesteps, **_options):
    """DDIM's inversion: on the discrete process with one fixed-point iteration per step (close to the exact
    inverse of the eta = 0 decoder, samplers.ddim_invert); on a continuous one the first-order ODE inversion,
    which is ddim_invert without the iteration."""
    if diffusion.discrete:
        return ddim_invert(diffusion, model, x0, timesteps, fixed_point_iters=1)
    return solvers.ode_invert(diffusion, model, x0, timesteps, order=1)


_KARRAS_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}

register(
    Method(
        "ddpm",
        ddpm_sample,
        "DDPM",
        {"temperature": 1.0},
        spacing="even",
        steps=None,
        stochastic=lambda o: o["temperature"] > 0,
        discrete=True,
    )
)
register(
    Method(
        "ddim",
        solvers.ddim,  # on any process; diffusers' DDIMScheduler on the discrete one (tests/test_solver_peers.py)
        "DDIM",
        {"eta": 0.0, "temperature": 1.0},
        spacing="ddim",
        steps=50,
        stochastic=lambda o: o["eta"] > 0 and o["temperature"] > 0,
        invert=_ddim_inverter,
        in_name=("eta",),
    )
)
register(
    Method(
        "dpmpp_2m",
        solvers.dpmpp_2m,
        "DPM-Solver++(2M)",
        {"lower_order_final": True},
        invert=_ode_inverter(2),
    )
)
register(
    Method(
        "dpmpp_3m",
        solvers.dpmpp_3m,
        "DPM-Solver++(3M)",
        {"lower_order_final": True, "d2_weight": "published"},
        invert=_ode_inverter(3),
    )
)
register(
    Method(
        "unipc",
        solvers.unipc,
        "UniPC-{order}",
        {"order": 2, "lower_order_final": True},
    )
)
register(
    Method(
        "ipndm",
        solvers.ipndm,
        "iPNDM",
        {"max_order": 4, "variable_step": False},  # the published weights on trailing: best on MNIST at 10-20 NFE
        spacing="trailing",  # with the fixed weights logsnr is far worse (FID 37.9 vs 32.6 at 20 NFE)
    )
)
register(
    Method(
        "euler",
        solvers.euler,
        "Euler",
        dict(_KARRAS_CHURN),
        stochastic=lambda o: o["s_churn"] > 0 and o["s_noise"] > 0,
        from_noise=lambda o: o["s_churn"] == 0,  # the plain step from alpha = 0 is DDIM's
    )
)
register(
    Method(
        "heun",
        solvers.heun,
        "Heun",
        dict(_KARRAS_CHURN),
        spacing="logsnr",  # Heun's second evaluation needs small steps: auto's trailing half is far worse
        evals_per_step=2,
        extra_last=1,
        stochastic=lambda o: o["s_churn"] > 0 and o["s_noise"] > 0,
        from_noise=lambda o: o["s_churn"] == 0,  # flow: Heun in u; else the first step is finite (solvers._karras_step)
    )
)
register(
    Method(
        "euler_ancestral",
        solvers.euler_ancestral,
        "Euler ancestral",
        {"eta": 1.0, "s_noise": 1.0},
        spacing="trailing",  # fresh noise at every step: trailing beats logsnr and karras at 10 and 20 NFE
        stochastic=lambda o: o["eta"] > 0 and o["s_noise"] > 0,
    )
)


# ------------------------------------------------------------------ few-step samplers (diffusion/few_step.py)
def _mid_points(name: str) -> Callable[[Any], None]:
    def check(v):
        if v is None:
            return
        ok = isinstance(v, list | tuple) and len(v) > 0 and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)
        if not ok or any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError(f"sampler.{name}={v!r} must be a non-empty list of positive numbers, descending")

    return check


def _few_step_times(option: str, to_time: Callable) -> Callable:
    """The visited times when `option` (intermediate points after the first visit at T-1, descending) is set."""

    def times(diffusion, options):
        mids = options.get(option)
        if mids is None:
            return None
        t = [float(to_time(diffusion, float(m))) for m in mids]
        top = diffusion.num_timesteps - 1
        if any(not 0 <= x < top for x in t) or any(b >= a for a, b in zip([top, *t], t)):
            raise ValueError(f"sampler.{option}={list(mids)} must lie inside the process's range, below its first "
                             "time, and map to distinct times")  # fmt: skip
        return [*reversed(t), float(top)]

    return times


register(
    Method(
        "consistency",
        few_step.consistency,
        "Consistency",
        {"mid_sigmas": None},
        {"mid_sigmas": _mid_points("mid_sigmas")},
        spacing="trailing",
        steps=1,
        stochastic=lambda o: True,  # fresh noise at every visit after the first
        objectives=("ect",),
        times=_few_step_times("mid_sigmas", lambda d, s: d.t_at_sigma(s)),
        fixed_steps=lambda o: None if o["mid_sigmas"] is None else 1 + len(o["mid_sigmas"]),
    )
)
register(
    Method(
        "meanflow",
        few_step.meanflow,
        "MeanFlow",
        {"mid_times": None},
        {"mid_times": _mid_points("mid_times")},
        spacing="trailing",
        steps=1,
        objectives=("meanflow",),
        guided=None,
        times=_few_step_times("mid_times", lambda d, u: d.t_at_u(torch.tensor(u, dtype=torch.float64))),
        fixed_steps=lambda o: None if o["mid_times"] is None else 1 + len(o["mid_times"]),
    )
)
