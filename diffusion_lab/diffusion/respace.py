"""Which timesteps a shortened sampler visits: `space_timesteps(T, spec) -> sorted list[int]`.

Specs (N = number of kept steps, all results sorted ascending and distinct):
    "ddimN"      DDIM's fixed integer stride: range(0, T, stride) with exactly N steps
                 (T=1000, ddim50 -> 0, 20, .., 980)
    "uniformN"   DDIM's linear trajectory floor(c * i), c = T / N, i = 0..N-1
    "quadN"      DDIM's quadratic trajectory floor(c * i^2) with c = 0.8 T / (N-1)^2 (as in DDIM's CIFAR-10 code)
    "trailingN"  steps that end at T-1: round(T - i T / N) - 1, i = 0..N-1
    "N" / "10,15,20"  IDDPM: T split into equal sections, each strided evenly with that many steps
The respaced process itself is `GaussianDiffusion.respace(timesteps)`.
"""

from __future__ import annotations

import math
import re

SPACINGS = ("ddim", "uniform", "quad", "trailing", "even")


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
