"""Time grids learned for one model and one solver: LD3's objective (Tong et al., ICLR 2025, "Learning to Discretize
Denoising Diffusion ODEs", eq. 6 in its hard form) on this package's solvers.

    target = teacher(diffusion, model, x_T)                        # a many-step solver's samples [N, C, H, W]
    run = lambda s: s(diffusion, model, x_T)                       # the samples of a Sampler on the same noise
    out = learn_times(diffusion, Sampler("unipc", nfe=5), run, target)
    Sampler("unipc", nfe=5).with_times(out["times"])               # or schedule=<file> (learn_schedule.py)

A grid of N visited times keeps its first, T-1 (where sampling starts from noise), and places the other N-1 at
positions c in [0, 1] on the log-SNR axis: c = 0 at the top (T-1, or T-2 under zero terminal SNR, where the log-SNR
is still finite), c = 1 at t = 0. As in LD3, both ends stay where the start grid has them (lowest="pinned"): the
solvers take their last jump to the clean image from the lowest visited time, and a squared distance rewards
raising that time, whose jump returns a blurrier mean (MNIST recipe, UniPC-2 at NFE 5, N=1,000: FID 26.9 with it
free, 17.6 pinned at trailing's; BENCHMARKS.md "Learned time grids"). lowest="free" searches it too.

The loss is LD3's: the mean squared distance between the solver's samples on the grid and the teacher's from the
same noise (and labels). It is minimized by Nelder-Mead (scipy), started from the best of the fixed grids, because
the solvers carry their per-step scalars as float64 Python numbers, so no gradient reaches the times, and N-1 <= ~10
positions are few enough for a derivative-free search (LD3 backpropagates through the solver, and relaxes the start
x_T within a ball; neither is done here). Every evaluation of the loss is N network evaluations per trajectory.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..checks import check_choice

FIXED_STARTS = ("trailing", "logsnr", "karras")  # the fixed grids tried first; the best one starts the search
LOWEST = ("pinned", "free")  # the lowest visited time: kept at the start grid's (LD3), or searched
MIN_GAP = 1e-3  # the smallest distance between two positions on [0, 1] (distinct, well-ordered times)


def _axis(diffusion) -> tuple[int, float, float]:
    """(top, lambda at top, lambda at 0): the stretch of the log-SNR axis (lambda = -log sigma, solvers.py) that
    the positions c in [0, 1] cover. top is T-1, or T-2 where sigma at T-1 is infinite (zero terminal SNR)."""
    top = diffusion.num_timesteps - 1
    if not math.isfinite(float(diffusion.sigma_at(float(top)))):
        top -= 1
    return top, -math.log(float(diffusion.sigma_at(float(top)))), -math.log(float(diffusion.sigma_at(0.0)))


def times_at(diffusion, positions: Sequence[float]) -> list[float]:
    """Ascending visited times [t_0, .., t_{N-2}, T-1] from N-1 positions c (increasing: noisy to clean)."""
    top, lam_top, lam_0 = _axis(diffusion)
    c = torch.tensor(sorted(positions, reverse=True), dtype=torch.float64)  # clean first: ascending times
    t = diffusion.t_at_sigma(torch.exp(-(lam_top + c * (lam_0 - lam_top)))).clamp(0, top).tolist()
    return [*t, float(diffusion.num_timesteps - 1)]


def positions_of(diffusion, times: Sequence[float]) -> np.ndarray:
    """The positions c [N-1] (increasing) of an ascending grid's times below T-1 (the inverse of times_at)."""
    top, lam_top, lam_0 = _axis(diffusion)
    below = torch.tensor([min(float(t), top) for t in times[:-1]], dtype=torch.float64)
    lam = -torch.log(diffusion.sigma_at(below))
    return ((lam - lam_top) / (lam_0 - lam_top)).clamp(0, 1).flip(0).numpy().copy()


def _valid(c: np.ndarray) -> bool:
    """Ordered positions at least MIN_GAP apart in [MIN_GAP, 1] (c = 0 is T-1, the start, visited already)."""
    return bool(c[0] >= MIN_GAP and c[-1] <= 1 and np.all(np.diff(c) >= MIN_GAP))


def grid_loss(run: Callable, sampler, target: torch.Tensor, times: Sequence[float]) -> float:
    """LD3's loss of one grid: mean over trajectories of the squared distance per element, ||x - target||^2 / D."""
    x = run(sampler.with_times(times))
    return float((x.double() - target.double()).pow(2).flatten(1).mean(1).mean())


def learn_times(
    diffusion,
    sampler,
    run: Callable,
    target: torch.Tensor,
    *,
    max_evals: int = 200,
    tol: float = 1e-4,
    lowest: str = "pinned",
    log: Callable[[str], None] | None = None,
) -> dict:
    """Learn the times of `sampler` (a deterministic Sampler with its steps set) for the model behind `run`.

    run(sampler) -> x_0 [N, C, H, W]: that sampler's samples from the trajectories' fixed noise (and labels);
    target [N, C, H, W]: the teacher's samples from the same noise; lowest: LOWEST (the module's docstring).
    Returns {"times": ascending [steps] with T-1 last, "start": the fixed spacing it started from, "fixed":
    {spacing: loss}, "loss": the learned grid's loss, "curve": [best loss after each evaluation], "evals",
    "seconds"}. Deterministic: the same inputs give the same times."""
    from scipy.optimize import minimize

    check_choice("lowest", lowest, LOWEST)
    if not sampler.deterministic:
        raise ValueError(f"sampler.method={sampler.method.name} is stochastic: a grid is learned for an ODE solver")
    t0, n = time.perf_counter(), sampler.steps
    if n is None or n < 2:
        raise ValueError(f"sampler.steps={n}: a learned grid needs at least 2 visited times")
    fixed = {}
    for spacing in FIXED_STARTS:
        try:
            times = sampler.replace(spacing=spacing).timesteps(diffusion)
        except ValueError:  # e.g. too few steps for a continuous grid under zero terminal SNR
            continue
        fixed[spacing] = (grid_loss(run, sampler, target, times), times)
    start = min(fixed, key=lambda k: fixed[k][0])
    x0, m = positions_of(diffusion, fixed[start][1]), n - 1
    for i in reversed(range(m)):  # ordered, at least MIN_GAP apart, inside [MIN_GAP, 1] (c = 0 would be T-1 itself)
        x0[i] = min(x0[i], 1 - (m - 1 - i) * MIN_GAP)
    for i in range(m):
        x0[i] = max(x0[i], (x0[i - 1] if i else 0.0) + MIN_GAP)
    free = m if lowest == "free" else m - 1  # pinned: the last position (the lowest time) stays the start's
    curve, best = [], [math.inf, x0]
    if free == 0:  # two visited times, both ends pinned: nothing to search
        return _result(diffusion, fixed, start, best, curve, t0)

    def loss(c: np.ndarray) -> float:
        c = np.append(c, x0[free:])
        if not _valid(c):
            return 1e30  # outside the simplex of ordered positions: never accepted
        value = grid_loss(run, sampler, target, times_at(diffusion, c))
        if value < best[0]:
            best[:] = [value, c.copy()]
        curve.append(best[0])
        if log is not None and len(curve) % 20 == 0:
            log(f"learned grid: {len(curve)} evaluations, loss {best[0]:.4g}")
        return value

    # the initial simplex: the start, and each free position moved 0.4 of the way to its roomier neighbour
    simplex = [x0[:free]]
    for i in range(free):
        lo, hi = (x0[i - 1] if i else 0.0), (x0[i + 1] if i + 1 < m else 1.0)
        step = 0.4 * (hi - x0[i]) if hi - x0[i] >= x0[i] - lo else -0.4 * (x0[i] - lo)
        simplex.append(x0[:free] + step * np.eye(free)[i])
    options = {"maxfev": max_evals, "xatol": 1e-4, "fatol": tol, "initial_simplex": np.array(simplex)}
    minimize(loss, x0[:free], method="Nelder-Mead", options=options)
    return _result(diffusion, fixed, start, best, curve, t0)


def _result(diffusion, fixed: dict, start: str, best: list, curve: list, t0: float) -> dict:
    """learn_times' answer: the best grid found, or the start grid where the search found none better."""
    learned = times_at(diffusion, best[1]) if best[0] < fixed[start][0] else list(fixed[start][1])
    return {
        "times": [float(t) for t in learned],
        "start": start,
        "fixed": {k: v[0] for k, v in fixed.items()},
        "loss": min(best[0], fixed[start][0]),
        "curve": curve,
        "evals": len(curve) + len(fixed),
        "seconds": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- the schedule file (learn_schedule.py)
SCHEDULE_FORMAT = "diffusion_lab.schedule/1"
MAX_SCHEDULE_BYTES = 1 << 20


def load_schedule(path) -> dict:
    """A schedule file, read as untrusted data: a JSON object whose method, options, steps, times (strictly
    ascending finite numbers, `steps` of them), process and checkpoint hash are checked; ValueError naming the file."""
    import json
    from pathlib import Path

    path = Path(str(path))
    how = "learn one with `python learn_schedule.py ckpt_path=... sampler=<method> sampler.nfe=<n>`"
    if not path.is_file():
        raise FileNotFoundError(f"sampler.schedule={path}: no such file ({how})")
    if path.stat().st_size > MAX_SCHEDULE_BYTES:
        raise ValueError(f"sampler.schedule={path}: {path.stat().st_size} bytes is not a schedule file ({how})")
    try:
        s = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"sampler.schedule={path}: not a schedule file ({e.__class__.__name__}); {how}") from None

    def bad(what: str) -> ValueError:
        return ValueError(f"sampler.schedule={path}: {what}; {how}")

    if not isinstance(s, dict) or s.get("format") != SCHEDULE_FORMAT:
        raise bad(f"not a {SCHEDULE_FORMAT} file")
    steps, times = s.get("steps"), s.get("times")
    if not isinstance(s.get("method"), str) or not isinstance(s.get("options"), dict):
        raise bad("method or options missing")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise bad(f"steps={steps!r} must be an integer >= 2")
    if (not isinstance(times, list) or len(times) != steps
            or not all(isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) for t in times)
            or any(b <= a for a, b in zip(times, times[1:])) or times[0] < 0):  # fmt: skip
        raise bad(f"times must be {steps} strictly ascending finite numbers >= 0")
    if not isinstance(s.get("process"), str) or not isinstance(s.get("num_timesteps"), int):
        raise bad("process or num_timesteps missing")
    sha = (s.get("checkpoint") or {}).get("sha256") if isinstance(s.get("checkpoint"), dict) else None
    if not isinstance(sha, str) or len(sha) != 64:
        raise bad("checkpoint.sha256 missing")
    return {**s, "path": str(path)}


def pick_schedule(paths: Sequence, method: str, options: dict, steps: int | None) -> dict:
    """The one schedule among `paths` learned for (method, options, steps) (steps None: the only one for the
    method); ValueError saying what the files hold."""
    found = [load_schedule(p) for p in paths]
    match = [s for s in found if s["method"] == method and s["options"] == options
             and (steps is None or s["steps"] == steps)]  # fmt: skip
    if len(match) == 1:
        return match[0]
    held = ", ".join(f"{s['path']} ({s['method']} {s['options']} steps={s['steps']})" for s in found)
    want = f"{method} {options}" + (f" steps={steps}" if steps is not None else "")
    if not match:
        raise ValueError(f"sampler.schedule holds no grid learned for {want}: {held}; learn one with `python "
                         f"learn_schedule.py ckpt_path=... sampler={method} sampler.steps=<n>`")  # fmt: skip
    raise ValueError(f"sampler.schedule holds {len(match)} grids for {want}: {held}; keep one")


def checkpoint_sha256(path) -> str:
    """io.file_sha256 of a checkpoint, cached while its size and mtime stay (every row of an evaluate grid checks
    its schedule against the same file)."""
    from pathlib import Path

    st = Path(path).stat()
    return _cached_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    from ..io import file_sha256

    return file_sha256(path)
