"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
Sec. 3 and App. C): power-function EMA profiles, and the average of any relative length sigma_rel rebuilt after
training from snapshots of two tracked profiles.

    gamma = sigma_rel_to_gamma(0.10)                       # EDM2 Alg. 2 (std_to_exp)
    beta = power_beta(gamma, step)                         # ema <- beta ema + (1 - beta) w after optimizer step
    x = solve_weights(t_i, gamma_i, t_r, gamma_r)          # EDM2 Alg. 3: snapshot i's weight in the average r
    state = combine([snapshot state dicts], x[:, 0])       # sum_i x_i theta_i

The profile of the power-function EMA at training time t is p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
[0, t] (eq. 2), whose relative standard deviation is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))
(eq. 3). The discrete average after step n with beta_n = (1 - 1/n)^(gamma + 1) (EDM2 `power_function_beta` with
t_delta / t_next = 1/n) is exactly sum_k (k^(gamma+1) - (k-1)^(gamma+1)) w_k / n^(gamma+1). Pure math on floats
and tensors: no Lightning, no files (the EMA callback in lit/ema.py keeps the profiles and writes the snapshots).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 3: the relative standard deviation of the power profile with exponent gamma (> -1)."""
    g = float(gamma)
    return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """EDM2 Alg. 2: the exponent gamma whose profile has relative length sigma_rel, the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0 (eq. 3 solved for gamma). sigma_rel must lie in
    (0, sqrt(1/12)) = (0, 0.2887): sigma_rel -> sqrt(1/12) is gamma -> 0, the uniform average of the whole run."""
    s = float(sigma_rel)
    if not 0 < s < math.sqrt(1 / 12):
        raise ValueError(f"sigma_rel={sigma_rel} must be in (0, {math.sqrt(1 / 12):.4f}) (gamma > 0)")
    t = s**-2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


def power_beta(gamma: float, step: int, delta: int = 1) -> float:
    """The decay of the update after optimizer step `step` (1-based) when the previous update was `delta` steps
    earlier: (1 - delta / step)^(gamma + 1) (EDM2 `power_function_beta`; 0 at the first update: a copy)."""
    return (1.0 - delta / step) ** (gamma + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """<p_a, p_b> = integral of the two power profiles' product (EDM2 App. C.3 `p_dot_p`); broadcasts."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    return (gamma_a + 1) * (gamma_b + 1) * t_ratio**t_exp / ((gamma_a + gamma_b + 1) * t_max)


def solve_weights(t_i: Sequence[float], gamma_i: Sequence[float], t_r: Sequence[float], gamma_r: Sequence[float]):
    """EDM2 Alg. 3: the coefficients X [n_in, n_out] (float64) with sum_i X[i, r] p_i closest in L2 to p_r, from the
    normal equations A X = B (A = <p_i, p_j>, B = <p_i, p_r>), solved as least squares so that a singular A (a
    snapshot stored twice) still gives the minimum-norm answer."""
    a, b = _normal_equations(t_i, gamma_i, t_r, gamma_r)
    return np.linalg.lstsq(a, b, rcond=None)[0]


def _normal_equations(t_i, gamma_i, t_r, gamma_r):
    """(A = <p_i, p_j> [n_in, n_in], B = <p_i, p_r> [n_in, n_out]) in float64."""
    rv = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 1)  # noqa: E731
    cv = lambda x: np.asarray(x, dtype=np.float64).reshape(1, -1)  # noqa: E731
    return (profile_inner(rv(t_i), rv(gamma_i), cv(t_i), cv(gamma_i)),
            profile_inner(rv(t_i), rv(gamma_i), cv(t_r), cv(gamma_r)))  # fmt: skip


def fit_error(t_i, gamma_i, t_r: float, gamma_r: float) -> float:
    """Relative L2 error |sum_i x_i p_i - p_r| / |p_r| of the best reconstruction of profile (t_r, gamma_r) from
    the snapshots (closed form from the inner products): how well the snapshots can represent that average."""
    a, b = _normal_equations(t_i, gamma_i, [t_r], [gamma_r])
    b = b[:, 0]
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    rr = float(profile_inner(np.float64(t_r), np.float64(gamma_r), np.float64(t_r), np.float64(gamma_r)))
    return math.sqrt(max(float(x @ a @ x - 2 * x @ b + rr), 0.0) / rr)


def combine(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i weights[i] * states[i], key by key, accumulated in float64 and returned in each tensor's dtype
    (integer tensors, e.g. counters, are taken from the last state)."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} snapshots for {len(weights)} weights")
    out = {}
    for key, last in states[-1].items():
        if not torch.is_floating_point(last):
            out[key] = last.clone()
            continue
        acc = torch.zeros(last.shape, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            acc += float(w) * state[key].to(torch.float64)
        out[key] = acc.to(last.dtype)
    return out


MAX_FIT_ERROR = 0.05  # a sigma_rel whose profile the snapshots fit worse than this (relative L2) is refused


def representable(steps: Sequence[int], gammas: Sequence[float], step: int, max_error: float = MAX_FIT_ERROR):
    """(lowest, highest) sigma_rel whose profile at `step` the snapshots (every step x every tracked gamma) fit
    within max_error, scanned on a log grid from 0.005 to 0.285; None if none fits."""
    t_i = [t for t in steps for _ in gammas]
    g_i = [g for _ in steps for g in gammas]
    grid = np.exp(np.linspace(math.log(0.005), math.log(0.285), 120))
    ok = [s for s in grid if fit_error(t_i, g_i, step, sigma_rel_to_gamma(s)) <= max_error]
    return (float(min(ok)), float(max(ok))) if ok else None


def reconstruct(snapshots: Sequence[dict], sigma_rel: float, step: int | None = None,
                max_error: float = MAX_FIT_ERROR) -> dict[str, torch.Tensor]:
    """The power-function EMA with relative length sigma_rel at training step `step` (default: the last snapshot's)
    from snapshots [{"step": t, "gammas": [...], "states": [state per gamma]}] (lit.ema.read_snapshots): EDM2
    Alg. 3's coefficients over every (snapshot, profile), then the weighted sum. ValueError naming the sigma_rel
    range the snapshots can represent when the fit error exceeds max_error, or when `step` is past the last one."""
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots to reconstruct from")
    steps = [int(s["step"]) for s in snapshots]
    step = max(steps) if step is None else int(step)
    if not 0 < step <= max(steps):
        raise ValueError(f"ema step={step}: the snapshots cover steps {min(steps)}..{max(steps)}")
    gamma_r = sigma_rel_to_gamma(sigma_rel)
    t_i = [float(s["step"]) for s in snapshots for _ in s["gammas"]]
    g_i = [float(g) for s in snapshots for g in s["gammas"]]
    err = fit_error(t_i, g_i, step, gamma_r)
    if err > max_error:
        span = representable(sorted(set(steps)), snapshots[0]["gammas"], step, max_error)
        where = f"[{span[0]:.3f}, {span[1]:.3f}]" if span else "none"
        raise ValueError(f"ema.sigma_rel={sigma_rel}: the snapshots miss its profile by {err:.1%} (relative L2, "
                         f"limit {max_error:.0%}); the sigma_rel they can represent at step {step}: {where}")
    x = solve_weights(t_i, g_i, [step], [gamma_r])[:, 0]
    return combine([st for s in snapshots for st in s["states"]], x)
