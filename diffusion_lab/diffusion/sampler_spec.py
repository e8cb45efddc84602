"""`Sampler`: a named, configurable sampler (method, steps, spacing, eta) as Hydra builds it.

    sampler = Sampler(method="ddim", steps=50)          # == ddim_sample(..., "ddim50", eta=0)
    x0 = sampler(diffusion, model, x_T, generator=g)
The functions in samplers.py stay the API; this object only holds the choices a sweep varies
(`sampler.steps=10,50,100`) and names the result for logs ("ddim50_eta0.0").
"""

from __future__ import annotations

from dataclasses import dataclass

from .respace import SPACINGS, space_timesteps
from .samplers import ClassifierFreeGuidance, ddim_sample, ddpm_sample

METHODS = ("ddpm", "ddim")


@dataclass
class Sampler:
    method: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    spacing: str = "ddim"  # see respace.py: ddim, uniform, quad, trailing, even
    clip_denoised: bool = True
    temperature: float = 1.0
    guidance_scale: float | None = None  # classifier-free guidance; None = no guidance

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"sampler.method={self.method!r} is unknown; allowed: {', '.join(METHODS)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"sampler.spacing={self.spacing!r} is unknown; allowed: {', '.join(SPACINGS)}")
        if self.eta < 0:
            raise ValueError(f"sampler.eta={self.eta} must be >= 0")
        if int(self.steps) < 1:
            raise ValueError(f"sampler.steps={self.steps} must be >= 1")

    @property
    def name(self) -> str:
        """Log name, e.g. 'ddim50_eta0.0', 'ddpm1000', 'ddim50_eta0.0_cfg3.0'."""
        base = f"ddim{self.steps}_eta{self.eta:g}" if self.method == "ddim" else f"ddpm{self.steps}"
        return base + (f"_cfg{self.guidance_scale:g}" if self.guidance_scale is not None else "")

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The kept timesteps; raises ValueError naming sampler.steps when impossible for T."""
        if self.steps > num_timesteps:
            raise ValueError(f"sampler.steps={self.steps} exceeds the process's diffusion.steps={num_timesteps}")
        if self.steps == num_timesteps:
            return list(range(num_timesteps))
        return space_timesteps(num_timesteps, f"{self.spacing}{self.steps}")

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
        null_label: int | None = None,
    ):
        if self.guidance_scale is not None:
            if null_label is None or not model_kwargs or "y" not in model_kwargs:
                raise ValueError(
                    "sampler.guidance_scale needs a class-conditional model (net.num_classes) and labels y"
                )
            model = ClassifierFreeGuidance(model, self.guidance_scale, null_label)
        kw = dict(
            clip_denoised=self.clip_denoised,
            model_kwargs=model_kwargs,
            generator=generator,
            temperature=self.temperature,
            progress=progress,
            callback=callback,
        )
        ts = self.timesteps(diffusion.num_timesteps)
        if self.method == "ddpm":
            return ddpm_sample(diffusion, model, x_T, ts, **kw)
        return ddim_sample(diffusion, model, x_T, ts, eta=self.eta, **kw)
