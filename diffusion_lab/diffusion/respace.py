"""Which timesteps a shortened sampler visits: `space_timesteps(T, spec) -> sorted list[int]`.

Specs (N = number of kept steps, all results sorted ascending and distinct):
    "ddimN"      DDIM's fixed integer stride: range(0, T, stride) with exactly N steps
                 (T=1000, ddim50 -> 0, 20, .., 980)
    "uniformN"   DDIM's linear trajectory floor(c * i), c = T / N, i = 0..N-1
    "quadN"      DDIM's quadratic trajectory floor(c * i^2) with c = 0.8 T / (N-1)^2 (as in DDIM's CIFAR-10 code)
    "trailingN"  steps that end at T-1: round(T - i T / N) - 1, i = 0..N-1
    "N" / "10,15,20"  IDDPM: T split into equal sections, each strided evenly with that many steps
The respaced process itself is `GaussianDiffusion.respace(timesteps)`.

`sampling_times(diffusion, spacing, steps)` is the sampler-facing entry: the integer spacings above, plus two
continuous-time grids for the fast solvers (float times through `GaussianDiffusion.t_at_sigma`):
    "logsnr"     uniform in lambda = -log sigma from lambda(T-1) to lambda(0) (DPM-Solver, Lu et al. 2022, Sec. 3.3)
    "karras"     Karras et al. 2022 eq. 5, rho = 7, from sigma(T-1) down to sigma(0)
    "ays", "ays_xl"  Align Your Steps' published SD1.5 / SDXL levels (sigma 14.6 down to 0.15 / 0.11), log-linearly
                 interpolated to other step counts; they start below sigma(T-1) where the process reaches higher
and "auto": "trailing" below AUTO_LOGSNR_FROM = 20 steps, "logsnr" from there on, the default of the multistep
solvers. On the MNIST recipe (cosine schedule) trailing scores far better at 5 and 10 NFE (DPM-Solver++(2M): FID
47 vs 192 and 37 vs 39; UniPC-3 at 10: 35 vs 87), ties or wins at 15 for 3M and UniPC (2M already prefers logsnr
there), and logsnr is better from 20 for all three (2M: 30.6 vs 34.2 at 20, 30.0 vs 31.8 at 50); the
point-mixture exact model agrees (bench/solver_defaults.py, bench/solver_peers.py, BENCHMARKS.md).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from ..checks import check_choice

SPACINGS = ("ddim", "uniform", "quad", "trailing", "even")
# Align Your Steps (Sabour et al. 2024): the published 10-step noise levels (VE sigma, descending, without the final
# 0) for Stable Diffusion 1.5 ("ays") and XL ("ays_xl"), as diffusers' AysSchedules lists them.
AYS_SIGMAS = {
    "ays": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152),
    "ays_xl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113),
}
CONTINUOUS_SPACINGS = ("logsnr", "karras", *AYS_SIGMAS)
AUTO_SPACING, AUTO_LOGSNR_FROM = "auto", 20  # "auto": trailing below 20 steps, logsnr from 20


def _sections(T: int, counts: list[int]) -> list[int]:
    """IDDPM space_timesteps: split [0, T) into len(counts) equal sections, stride each evenly."""
    size_per, extra = divmod(T, len(counts))
    steps, start = [], 0
    for i, n in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if n > size or n < 1:
            raise ValueError(f"cannot take {n} steps from a section of {size} timesteps (T={T})")
        stride = 1 if n <= 1 else (size - 1) / (n - 1)
        steps += [start + round(stride * j) for j in range(n)]
        start += size
    return steps


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """Kept timesteps for `spec` (see module docstring) out of a T-step process; raises ValueError if impossible."""
    T, spec = int(num_timesteps), str(spec).strip()
    m = re.fullmatch(r"(ddim|uniform|quad|trailing|even)?(\d+)", spec)
    if m is None:
        if re.fullmatch(r"\d+(,\d+)+", spec):
            return sorted(set(_sections(T, [int(c) for c in spec.split(",")])))
        raise ValueError(
            f"timestep spacing {spec!r} is not understood; allowed: ddimN, uniformN, quadN, trailingN, N or 'N1,N2,..'"
        )
    kind, n = m.group(1) or "even", int(m.group(2))
    if not 1 <= n <= T:
        raise ValueError(f"sampler.steps={n} must be between 1 and the process's {T} timesteps")
    if kind == "ddim":
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == n:
                return list(range(0, T, stride))
        raise ValueError(f"cannot create exactly {n} steps with an integer stride out of T={T}; try uniform{n}")
    if kind == "uniform":
        steps = [math.floor(i * T / n) for i in range(n)]
    elif kind == "quad":
        c = 0.8 * T / max(n - 1, 1) ** 2
        steps = [math.floor(c * i * i) for i in range(n)]
    elif kind == "trailing":
        steps = [round(T - i * T / n) - 1 for i in range(n)]
    else:
        steps = _sections(T, [n])
    steps = sorted(set(steps))
    if len(steps) != n:
        raise ValueError(f"{spec!r} gives only {len(steps)} distinct timesteps out of T={T}; use fewer steps")
    return steps


def visited_times(num_timesteps: int, timesteps=None, start_index: int | None = None) -> list:
    """The ascending times a sampler visits: `timesteps` as given (a list), a spacing spec through space_timesteps
    ("ddim50"), or None for all T; with start_index k only the first k + 1 (a run started at timesteps[k])."""
    if timesteps is None:
        ts = list(range(int(num_timesteps)))
    elif isinstance(timesteps, (str, int)):
        ts = space_timesteps(num_timesteps, timesteps)
    else:
        ts = list(timesteps)
    if start_index is not None:
        if not 0 <= int(start_index) < len(ts):
            raise ValueError(f"start_index={start_index} must be in [0, {len(ts)})")
        ts = ts[: int(start_index) + 1]
    return ts


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 eq. 5, descending float64 [n]:
    sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i = 0..n-1."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def ays_sigmas(table: str, steps: int) -> list[float]:
    """An AYS table's noise levels at `steps` visits, descending: the table itself at 10, else its log-linear
    interpolation (Sabour et al. 2024, as ComfyUI's AlignYourStepsScheduler): log sigma linear in the position."""
    levels = AYS_SIGMAS[table]
    if steps == len(levels):
        return list(levels)
    xs, new = np.linspace(0, 1, len(levels)), np.linspace(0, 1, steps)
    return np.exp(np.interp(new, xs, np.log(levels[::-1])))[::-1].tolist()


def sampling_times(diffusion, spacing: str, steps: int) -> list:
    """Ascending times a sampler visits: `steps` of them, ints for the integer spacings, floats for
    "logsnr" / "karras" (both include t = 0 and t = T-1). Raises ValueError naming sampler.spacing / sampler.steps.

    With zero terminal SNR (sigma_{T-1} = inf) the continuous grids put steps - 1 times on [0, T-2] and keep T-1
    as the first visited time.
    """
    T, steps = diffusion.num_timesteps, int(steps)
    if spacing == AUTO_SPACING:
        spacing = "trailing" if steps < AUTO_LOGSNR_FROM else "logsnr"
    if spacing in SPACINGS:
        if not 1 <= steps <= T:
            raise ValueError(f"sampler.steps={steps} must be between 1 and diffusion.steps={T}")
        return list(range(T)) if steps == T else space_timesteps(T, f"{spacing}{steps}")
    check_choice("sampler.spacing", spacing, SPACINGS + CONTINUOUS_SPACINGS + (AUTO_SPACING,))
    if steps < 2 or T < 2:
        raise ValueError(f"sampler.steps={steps} must be >= 2 for sampler.spacing={spacing} (both ends are kept)")
    if spacing in AYS_SIGMAS:  # the published levels on this process's time axis (clamped to its range)
        times = diffusion.t_at_sigma(torch.tensor(ays_sigmas(spacing, steps), dtype=torch.float64)).flip(0).tolist()
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError(f"sampler.spacing={spacing} at {steps} steps gives repeated times on this process (its "
                             "noise range does not hold the AYS levels 0.11-14.6): use another spacing")  # fmt: skip
        return times
    top = T - 1
    sigma_max = float(diffusion.sigmas[top])
    if not math.isfinite(sigma_max):  # zero terminal SNR: grid on [0, T-2], then T-1 itself
        top, steps = T - 2, steps - 1
        sigma_max = float(diffusion.sigmas[top])
        if steps < 2 or top < 1:
            raise ValueError(
                f"sampler.steps={steps + 1} must be >= 3 for sampler.spacing={spacing} at zero terminal SNR"
            )
    sigma_min = float(diffusion.sigmas[0])
    if spacing == "logsnr":
        sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
    else:
        sigmas = karras_sigmas(sigma_min, sigma_max, steps)
    times = diffusion.t_at_sigma(sigmas).flip(0).tolist()
    times[0], times[-1] = 0.0, float(top)
    if top != T - 1:
        times.append(float(T - 1))
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError(f"sampler.steps={steps} is too many for sampler.spacing={spacing}: times are not distinct")
    return times
