"""`Sampler`: a named, configured reverse-process sampler, as Hydra builds it and as every table names it.

    sampler = Sampler("ddim", steps=50)                    # == ddim_sample(..., sampling_times(d, "ddim", 50), eta=0)
    sampler = Sampler("dpmpp_2m", nfe=10)                  # steps from the NFE budget; spacing = the method's default
    grid_row = Sampler.from_config(cfg.sampler, method="unipc", nfe=20)   # another method and NFE, other keys kept
    sampler = Sampler("unipc", steps=10, order=2, spacing="karras")
    x0 = sampler(diffusion, model, x_T, generator=g)
    sampler.name, sampler.label, sampler.nfe              # 'unipc10_order2_karras', 'UniPC-2', 10

The method (its function, options, NFE rule, label, defaults) comes from the registry (registry.py); a key left
None takes the registry's default, so conf/sampler/*.yaml name the method and leave the rest null. Every invariant is
checked once: the method and its options at construction, the steps against a process's T in `timesteps`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from ..checks import check_choice, check_count, check_number
from .guidance import Guidance
from .registry import Method, get_method
from .respace import AUTO_SPACING, CONTINUOUS_SPACINGS, SPACINGS, sampling_times

LEARNED = "learned"  # the spacing of a grid learned for one checkpoint (learned_grid.py, learn_schedule.py)
ALL_SPACINGS = (*SPACINGS, *CONTINUOUS_SPACINGS, AUTO_SPACING, LEARNED)
# the keys every method takes
GUIDANCE_KEYS = ("guidance", "guidance_scale", "guidance_interval", "apg_eta", "apg_norm_threshold", "apg_momentum",
                 "guide")  # fmt: skip
BASE_KEYS = ("method", "steps", "nfe", "spacing", "clip_denoised", "schedule", "schedule_transfer", *GUIDANCE_KEYS)
GUIDE_KEYS = ("ckpt", "step", "sigma_rel")  # sampler.guide: autoguidance's guide network


class Sampler:
    """Args (None everywhere means the registry's default for the method: registry.py is their one home):
    method: a registered method name (ddpm, ddim, dpmpp_2m, dpmpp_3m, unipc, ipndm, euler, heun, euler_ancestral).
    steps: visited times (the process is respaced to them); the method's default (DDPM: all of the process's T).
    nfe: a network-evaluation budget instead: the most steps whose NFE fits (Heun: 2 steps - 1). Not with steps.
    spacing: how the times are chosen (respace.sampling_times).
    clip_denoised: clamp each x0 prediction to [-1, 1] (DPM-Solver++'s thresholding, static); default true.
    guidance: the guidance rule, cfg | autoguidance | apg (guidance.py; None: cfg when guidance_scale is set).
    guidance_scale: its scale w (None: no guidance). guidance_interval: [sigma_lo, sigma_hi], guided only for the
        VE noise level sigma in (lo, hi] (None: every step). apg_eta, apg_norm_threshold, apg_momentum: APG's.
        Guided evaluations count twice in `nfe` (sampler.nfe / steps set the steps as without guidance).
    guide: autoguidance's guide network, {ckpt: a weaker run's checkpoint} or {step: an earlier post-hoc EMA
        snapshot step of this run, sigma_rel: its EMA width}; loaded by the entry points (`with_guide`).
    schedule: a learned grid's file, or a list of them (one is picked by method, options and steps, so an evaluate
        grid can hold one per row): spacing=learned (learned_grid.load_schedule; learn_schedule.py writes them).
    schedule_transfer: use a schedule learned for another checkpoint (of the same run, or as the FID callback does,
        the weights as they train); the entry points refuse that otherwise (config.validate_sampler).
    **options: the method's own options (eta, temperature, order, s_churn, ...), validated by the registry.
    """

    def __init__(
        self,
        method: str = "ddim",
        steps: int | None = None,
        nfe: int | None = None,
        spacing: str | None = None,
        clip_denoised: bool | None = None,
        guidance_scale: float | None = None,
        schedule: str | list[str] | None = None,
        schedule_transfer: bool | None = None,
        guidance: str | None = None,
        guidance_interval: list[float] | None = None,
        apg_eta: float | None = None,
        apg_norm_threshold: float | None = None,
        apg_momentum: float | None = None,
        guide: Mapping[str, Any] | None = None,
        **options: Any,
    ):
        self.method: Method = get_method(method)
        guide = {k: v for k, v in dict(guide or {}).items() if v is not None} or None
        given = dict(steps=steps, nfe=nfe, spacing=spacing, clip_denoised=clip_denoised, guidance_scale=guidance_scale,
                     schedule=schedule, schedule_transfer=schedule_transfer, guidance=guidance,
                     guidance_interval=guidance_interval, apg_eta=apg_eta, apg_norm_threshold=apg_norm_threshold,
                     apg_momentum=apg_momentum, guide=guide)  # fmt: skip
        self.arguments = {"method": method, **{k: v for k, v in {**given, **options}.items() if v is not None}}
        self.options = self.method.resolve({k: v for k, v in options.items() if v is not None})
        if steps is not None and nfe is not None:
            raise ValueError(
                f"sampler.steps={steps} and sampler.nfe={nfe} are both set: give one of them (the other null)"
            )
        if nfe is not None:
            if isinstance(nfe, bool) or not isinstance(nfe, int | float) or int(nfe) != nfe or nfe < self.method.nfe(1):
                raise ValueError(f"sampler.nfe={nfe!r} must be an integer >= {self.method.nfe(1)} for {method}")
            steps = self.method.steps_for_nfe(int(nfe))
        if (fixed := self.method.fixed_steps(self.options)) is not None:  # the option that sets the grid
            if steps is not None and steps != fixed:
                raise ValueError(f"sampler.steps={steps} (or sampler.nfe) disagrees with the {fixed} visits the "
                                 f"options of sampler.method={method} set: drop one")  # fmt: skip
            steps = fixed
        self.schedule, self._times, self.schedule_transfer = None, None, False  # a learned grid: file, times
        if schedule is not None or spacing == LEARNED:
            steps = self._learned(schedule, spacing, steps, schedule_transfer)
        steps = self.method.steps if steps is None else steps
        if isinstance(steps, float) and steps.is_integer():  # 10.0 from arithmetic on a count
            steps = int(steps)
        # None: all of the process's steps (bind / timesteps)
        self.steps = None if steps is None else check_count("sampler.steps", steps)
        self.spacing = spacing or (LEARNED if self.schedule is not None else self.method.spacing)
        check_choice("sampler.spacing", self.spacing, ALL_SPACINGS)
        if clip_denoised is not None and not isinstance(clip_denoised, bool):
            raise ValueError(f"sampler.clip_denoised={clip_denoised!r} must be true or false")
        self.clip_denoised = True if clip_denoised is None else clip_denoised
        self.guidance = self._guidance(guidance, guidance_scale, guidance_interval, apg_eta, apg_norm_threshold,
                                       apg_momentum, guide)  # fmt: skip
        self.guidance_scale = None if self.guidance is None else self.guidance.scale
        self.guide = guide  # the guide network's spec; the network itself: with_guide
        self._guide_net, self._nfe = None, None  # set by with_guide and (with an interval) by bind

    def _guidance(self, rule, scale, interval, eta, norm_threshold, momentum, guide) -> Guidance | None:
        """The Guidance the keys describe (None without guidance_scale), checked against the method."""
        extra = {"guidance_interval": interval, "apg_eta": eta, "apg_norm_threshold": norm_threshold,
                 "apg_momentum": momentum}  # fmt: skip
        if scale is None:
            if rule is not None:
                raise ValueError(f"sampler.guidance={rule} needs sampler.guidance_scale (w; 1 is no guidance)")
            if given := next((k for k, v in extra.items() if v is not None), None):
                raise ValueError(f"sampler.{given} is set but sampler.guidance_scale is not: set both, or drop it")
            if guide:
                raise ValueError("sampler.guide is autoguidance's: set sampler.guidance=autoguidance and "
                                 "sampler.guidance_scale, or drop sampler.guide")  # fmt: skip
            return None
        g = Guidance(rule or "cfg", scale, interval, eta=eta, norm_threshold=norm_threshold, momentum=momentum)
        if guide and g.rule != "autoguidance":
            raise ValueError(f"sampler.guide is autoguidance's, not {g.rule}'s: set sampler.guidance=autoguidance, "
                             "or drop sampler.guide")  # fmt: skip
        if guide:
            _check_guide(guide)
        name = self.method.name
        if self.method.guided is None:
            raise ValueError(f"sampler.method={name} takes no guidance: drop sampler.guidance_scale")
        return g

    def _learned(self, schedule, spacing, steps, transfer) -> int:
        """Read the learned grid (the file among `schedule` for this method, options and steps); its steps."""
        from .learned_grid import pick_schedule

        if spacing not in (None, LEARNED):
            raise ValueError(f"sampler.schedule is set but sampler.spacing={spacing}: set sampler.spacing=learned "
                             "(or drop sampler.schedule)")  # fmt: skip
        if not schedule:
            raise ValueError("sampler.spacing=learned needs sampler.schedule=<file> (python learn_schedule.py "
                             f"ckpt_path=... sampler={self.method.name} sampler.nfe=<n> writes one)")  # fmt: skip
        if transfer is not None and not isinstance(transfer, bool):
            raise ValueError(f"sampler.schedule_transfer={transfer!r} must be true or false")
        if self.method.stochastic(self.options):
            raise ValueError(f"sampler.spacing=learned: sampler.method={self.method.name} is stochastic here; "
                             "grids are learned for the deterministic solvers")  # fmt: skip
        paths = [schedule] if isinstance(schedule, str) else list(schedule)
        self.schedule = pick_schedule(paths, self.method.name, self.options, steps)
        self._times = [float(t) for t in self.schedule["times"]]
        self.schedule_transfer = bool(transfer)
        return self.schedule["steps"]

    def with_times(self, times) -> Sampler:
        """This sampler on the given ascending times (spacing=learned, no file): what learned_grid tries."""
        out = copy.copy(self)
        out.spacing, out._times, out.steps = LEARNED, [float(t) for t in times], len(times)
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any], **changes: Any) -> Sampler:
        """The one way to build a Sampler from config keys (a Hydra node, a plain dict, a checkpoint's run config;
        `_target_` ignored), with `changes` applied: changing `method` keeps only the options the new method takes,
        changing `steps` or `nfe` replaces both."""
        keys = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
        if "method" in changes:
            takes = get_method(changes["method"]).options
            keys = {k: v for k, v in keys.items() if k in BASE_KEYS or k in takes}
        if "steps" in changes or "nfe" in changes:
            keys.pop("steps", None), keys.pop("nfe", None)
        return cls(**{**keys, **changes})

    @classmethod
    def default_for(cls, diffusion, objective=None) -> Sampler:
        """The model's own sampler, bound: its objective's (consistency for ECT, meanflow for MeanFlow) or its
        process's default_method, at the registry's steps or at all of its T when it has fewer (e.g. DDIM on a
        20-step process): what a model samples with when no sampler is given."""
        s = cls(getattr(objective, "sampler", None) or diffusion.default_method)
        if s.steps is not None and s.steps > diffusion.num_timesteps:
            s = s.replace(steps=diffusion.num_timesteps)
        return s.bind(diffusion, getattr(objective, "name", "denoising"))

    def bind(self, diffusion, objective: str = "denoising") -> Sampler:
        """This sampler with its steps made explicit for `diffusion` (DDPM's default: all T); ValueError naming
        sampler.steps when the process cannot give them, or sampler.method when it needs the discrete process or a
        model trained by another `objective` (the run's conf/objective choice)."""
        self.method.check_process(diffusion, objective=objective)
        if self.schedule is not None and (self.schedule["process"], self.schedule["num_timesteps"]) != (
            diffusion.network_view, diffusion.num_timesteps
        ):
            raise ValueError(f"sampler.schedule={self.schedule['path']} was learned on another process "
                             f"({self.schedule['process']}), not this model's {diffusion.network_view}")  # fmt: skip
        times = self.timesteps(diffusion)
        if not self.method.from_noise(self.options) and math.isinf(float(diffusion.sigma_at(times[-1]))):
            raise ValueError(
                f"sampler.method={self.method.name} with churn (sampler.s_churn > 0) raises sigma / alpha, infinite at "
                "the first time here (pure noise: diffusion=flow's t = 1 or zero terminal SNR); set sampler.s_churn=0"
            )
        bound = self if self.steps is not None else self.replace(steps=diffusion.num_timesteps)
        if bound.guidance is not None and bound.guidance.interval is not None:
            bound._nfe = bound._count_evaluations(diffusion)
        return bound

    def _count_evaluations(self, diffusion) -> int:
        """The network evaluations of one sample on `diffusion`, counted on a 1-pixel run of a zero model (which of
        them fall inside the guidance interval depends on the times each method evaluates: Heun's second, churn)."""
        import torch

        calls = []

        channels = 2 if getattr(diffusion, "learns_sigma", False) else 1  # a learned-variance process splits 2C

        def zero(x, t, **_):
            calls.append(x.shape[0])
            return torch.zeros_like(x).repeat(1, channels, 1, 1)

        x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
        guidance = self.guidance.bind(null_label=1, guide=zero)
        y = torch.zeros(1, dtype=torch.long)
        self.method.fn(diffusion, zero, x, self.timesteps(diffusion), model_kwargs={"y": y}, guidance=guidance,
                       generator=torch.Generator().manual_seed(0), clip_denoised=self.clip_denoised,
                       **self.options)  # fmt: skip
        return sum(calls)

    def bound_guidance(self, model=None, null_label: int | None = None):
        """The guidance.Bound a solver takes (`guidance=`), or None without guidance; autoguidance's guide has its
        rows padded as `model`'s are (seeding.PaddedModel), so the images do not depend on the batch size."""
        if self.guidance is None:
            return None
        from .seeding import PaddedModel

        guide = self._guide_net
        if guide is not None and isinstance(model, PaddedModel):
            guide = PaddedModel(guide, model.rows)
        return self.guidance.bind(null_label=null_label, guide=guide)

    def with_guide(self, net) -> Sampler:
        """This sampler with autoguidance's guide network (what sampler.guide names, loaded by the entry point)."""
        out = copy.copy(self)
        out._guide_net = net
        return out

    @property
    def guide_net(self):
        """Autoguidance's guide network given by with_guide, or None."""
        return self._guide_net

    # ------------------------------------------------------------------ what tables and plots show
    @property
    def nfe(self) -> int | None:
        """Network evaluations per sample, a guided evaluation counting two (its batch is 2B, or it runs two
        networks); None until bound (and, with a guidance interval, until bound to its process)."""
        if self.steps is None:
            return None
        if self.guidance is None:
            return self.method.nfe(self.steps)
        if self.guidance.interval is None or self.guidance.evaluations == 1:
            return self.method.nfe(self.steps) * self.guidance.evaluations
        return self._nfe

    @property
    def deterministic(self) -> bool:
        return not self.method.stochastic(self.options)

    @property
    def name(self) -> str:
        """Log name: 'ddim50_eta0', 'ddpm1000', 'heun10' (+ '_<spacing>' when not the default, '_cfg3')."""
        base = self.method.log_name("T" if self.steps is None else self.steps, self.options)
        base += f"_{self.spacing}" if self.spacing != self.method.spacing else ""
        if self.guidance is None:
            return base
        g = self.guidance
        plain = g.rule == "cfg" and g.interval is None  # the name it always had: '_cfg3'
        return base + (f"_cfg{g.scale:g}" if plain else f"_{g.describe()}") + self._guide_name()

    def _guide_name(self) -> str:
        """'_by-step800-0.05' (this run's snapshots) or '_by-<run dir>-<file stem>' (another checkpoint)."""
        if not self.guide:
            return ""
        if "ckpt" not in self.guide:
            return f"_by-step{self.guide['step']}-{self.guide['sigma_rel']:g}"
        path = str(self.guide["ckpt"]).replace("\\", "/").split("/")
        run = path[-3] if len(path) >= 3 and path[-2] == "checkpoints" else path[-2] if len(path) >= 2 else ""
        return f"_by-{run}-{path[-1].rsplit('.', 1)[0]}".replace("_by--", "_by-")

    @property
    def label(self) -> str:
        """Display name of the method with its options ('DDIM eta=0', 'UniPC-2'): one curve in a plot."""
        spacing = f" ({self.spacing})" if self.spacing != self.method.spacing else ""
        return self.method.label(self.options) + spacing

    def config(self) -> dict[str, Any]:
        """The constructor arguments, defaults resolved (a plain dict, e.g. for a results row or a Hydra node)."""
        return {
            "method": self.method.name,
            "steps": self.steps,
            "spacing": self.spacing,
            "clip_denoised": self.clip_denoised,
            "guidance_scale": self.guidance_scale,
            **({k: v for k, v in self.guidance.config().items() if k != "guidance_scale"} if self.guidance else {}),
            **({"guide": dict(self.guide)} if self.guide else {}),
            **({"schedule": self.schedule["path"]} if self.schedule is not None else {}),
            **self.options,
        }

    def replace(self, **changes: Any) -> Sampler:
        """A copy with some arguments changed (like dataclasses.replace; Sampler.from_config's rules): what was
        given stays given, what was left to the registry stays the registry's (a new method's own defaults)."""
        return Sampler.from_config(self.arguments, **changes)

    def __repr__(self) -> str:
        return f"Sampler({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Sampler) and self.config() == other.config()

    # ------------------------------------------------------------------ running it
    def timesteps(self, diffusion) -> list:
        """The ascending times it visits on `diffusion`; ValueError naming sampler.steps when its T cannot give them."""
        if self._times is not None:
            if self._times[-1] != diffusion.num_timesteps - 1:
                raise ValueError(f"sampler.spacing=learned: the grid starts at t={self._times[-1]:g}, not at this "
                                 f"process's first time {diffusion.num_timesteps - 1}")  # fmt: skip
            return list(self._times)
        fixed = self.method.times(diffusion, self.options)
        if fixed is not None:
            return fixed
        return sampling_times(diffusion, self.spacing, diffusion.num_timesteps if self.steps is None else self.steps)

    def __call__(
        self,
        diffusion,
        model,
        x_T,
        *,
        model_kwargs=None,
        generator=None,
        progress=False,
        callback=None,
        post_step=None,
        null_label: int | None = None,
    ):
        """x_0 [B, C, H, W] from x_T [B, C, H, W] (the state at the first visited time: seeding.draw scales its
        N(0, I) noise by the process's noise_std there)."""
        guidance = None
        if self.guidance is not None:
            g = self.guidance
            if g.rule != "autoguidance" and (null_label is None or not model_kwargs or "y" not in model_kwargs):
                raise ValueError(f"sampler.guidance={g.rule} needs a class-conditional model (net.num_classes) and "
                                 "labels y; an unconditional model is guided by sampler.guidance=autoguidance")
            guidance = self.bound_guidance(model, null_label)
        extra = {"guidance": guidance} if guidance is not None else {}
        return self.method.fn(
            diffusion,
            model,
            x_T,
            self.timesteps(diffusion),
            model_kwargs=model_kwargs,
            generator=generator,
            callback=callback,
            clip_denoised=self.clip_denoised,
            progress=progress,
            post_step=post_step,
            **extra,
            **self.options,
        )


def _check_guide(guide: Mapping[str, Any]) -> None:
    """sampler.guide: {ckpt} or {step, sigma_rel}, values of the right kind (the files are read by the entry point)."""
    unknown = sorted(set(guide) - set(GUIDE_KEYS))
    if unknown:
        raise ValueError(f"sampler.guide.{unknown[0]} is not a key of sampler.guide (it takes: "
                         f"{', '.join(GUIDE_KEYS)})")
    if "ckpt" in guide and ({"step", "sigma_rel"} & guide.keys()):
        raise ValueError("sampler.guide.ckpt and sampler.guide.step / sigma_rel are both set: the guide is another "
                         "checkpoint or this run's own snapshots, not both")  # fmt: skip
    if "ckpt" in guide and not isinstance(guide["ckpt"], str):
        raise ValueError(f"sampler.guide.ckpt={guide['ckpt']!r} must be a checkpoint path")
    if "ckpt" not in guide:
        if set(guide) != {"step", "sigma_rel"}:
            raise ValueError("sampler.guide needs ckpt=<a weaker run's checkpoint>, or both step=<an earlier snapshot "
                             "step of this run> and sigma_rel=<its post-hoc EMA width>")  # fmt: skip
        check_count("sampler.guide.step", guide["step"], why="(a training step)")
        check_number("sampler.guide.sigma_rel", guide["sigma_rel"], maximum=0.2887)
