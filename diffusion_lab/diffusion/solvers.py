"""Fast training-free samplers, k-diffusion style: one driver (`sample`) runs the loop, each method is one short
step function with one signature.

    x0 = dpmpp_2m(diffusion, model, x_T, timesteps, model_kwargs=..., generator=..., callback=..., **options)
    x0 = sample(_ddim_step, diffusion, model, x_T, timesteps, eta=1.0)      # the same driver, a step by hand

Every public sampler has one signature, so they are interchangeable (registry.py registers them by name):

    fn(diffusion, model, x_T, timesteps, *, model_kwargs=None, generator=None, callback=None,
       clip_denoised=True, progress=False, post_step=None, guidance=None, **options) -> x_0   # [B, C, H, W]

- `timesteps`: ascending times t_0 < .. < t_{N-1} (ints or floats in [0, T-1], e.g. respace.sampling_times).
  The model is evaluated at t_{N-1}, .., t_0 and the last step goes to the clean image (sigma = 0), whose value
  is the denoiser's x0 prediction at t_0, exactly as DDIM's last step (alpha_bar_prev = 1). So N evaluations
  (NFE) for the single-evaluation methods, 2N - 1 for Heun (registry.Method.nfe).
- x_T: the VP state at t_{N-1} (N(0, I) for pure noise). callback(i, x, x0_hat) after each step with i = N-1 .. 0
  the index of the time just evaluated, x the new state and x0_hat the prediction at t_i (as samplers.sample_loop).
- `post_step(i, x) -> x` may edit each new state (inpainting: diffusion/inpaint.py), with i as in the callback.
- `guidance` (guidance.py: CFG, autoguidance, APG, on an interval of noise levels) replaces every denoiser call of
  the run, so every method is guided the same way and counts its evaluations.
- Randomness only from `generator` (a torch.Generator or per-image ImageGenerators, seeding.py). Per-step scalars
  are float64 Python numbers from the time grid (no device sync); tensors stay in x_T's dtype. The model is only
  called through `Run.denoise` (the process's `denoise`), so eps / x0 / v and learned-variance models, clipping and
  classifier-free guidance (a wrapped model) all work.
- A step is `step(run, j, x, **options) -> (x_next, x0_hat)`: x the VP state at visit j (t_{N-1} first), x_next the
  state at visit j + 1 (the clean image after j = N - 1) and x0_hat the prediction at t_j. What a multistep method
  carries between steps lives in `run.memory`.
- The last step to sigma = 0 is first order (DDIM): the x0 prediction at t_0, as diffusers' schedulers end
  (final_sigmas_type="zero"). Multistep methods warm up with lower orders and, with lower_order_final, lower the
  order of their last steps counting that final jump as a step, as diffusers does: DPM-Solver++ below 15 steps
  (3M's last ODE step is second order, 2M is not lowered), UniPC at every N (its last ODE step at most second
  order). `_order` says which step gets which order; the choices were measured against diffusers on exact models
  and by FID on the MNIST recipe (bench/solver_peers.py, BENCHMARKS.md).

Notation at time t_j: x_t = alpha x0 + sigma eps with (alpha, sigma) = diffusion.alpha_sigma_at(t) (the Process
interface, process.py: sqrt(alpha_bar), sqrt(1 - alpha_bar) on the VP process), s = sigma / alpha (VE noise level
of x / alpha, Karras et al.'s sigma) and lambda = log(alpha / sigma) = -log s (half the log-SNR: log_snr_at / 2).
Data-prediction methods (DPM-Solver++, UniPC) are finite at zero terminal SNR (a = 0 at the first time); the VE
methods (Euler, Heun, Euler ancestral, iPNDM) take their first step from there in a finite form (the limit s -> inf
of the step), and Heun on a linear path (flow) steps in the path's own sigma (= the flow time) throughout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_choice, check_number
from .seeding import noise_like

UNIPC_ORDERS = (1, 2, 3)  # unipc's `order`
IPNDM_ORDERS = (1, 2, 3, 4)  # ipndm's `max_order`
LOWER_ORDER_FINAL = (True, False, "early")  # the multistep methods' `lower_order_final`
D2_WEIGHTS = ("published", "taylor")  # dpmpp_3m's `d2_weight`
DPMPP_FINAL_BELOW = 15  # DPM-Solver++ lowers its last steps only below this many steps (diffusers' rule)


# --------------------------------------------------------------------------- the driver
@dataclass
class _Grid:
    """The visiting order j = 0..N-1 (t_{N-1} first) plus the clean end at j = N (a = 1, s = 0, lambda = inf)."""

    t: list[float]
    alpha: list[float]
    sigma: list[float]
    s: list[float]
    lam: list[float]

    @property
    def n(self) -> int:
        return len(self.t)


def _grid(diffusion, timesteps: Sequence[float]) -> _Grid:
    times = [float(t) for t in timesteps]
    T = diffusion.num_timesteps
    if not times or any(b <= a for a, b in zip(times, times[1:])) or times[0] < 0 or times[-1] > T - 1:
        raise ValueError(f"sampler timesteps must be strictly ascending times in [0, {T - 1}], got {times[:6]}...")
    t = times[::-1]
    tt = torch.tensor(t, dtype=torch.float64)
    alpha_t, sigma_t = diffusion.alpha_sigma_at(tt)
    alpha, sigma = alpha_t.tolist() + [1.0], sigma_t.tolist() + [0.0]
    s = [sg / al if al > 0 else math.inf for al, sg in zip(alpha[:-1], sigma[:-1])] + [0.0]
    lam = (0.5 * diffusion.log_snr_at(tt)).tolist() + [math.inf]
    return _Grid(t, alpha, sigma, s, lam)


def _steps(n: int, progress: bool, desc: str):
    return tqdm(range(n), desc=desc, leave=False) if progress else range(n)


@dataclass
class Run:
    """One sampling run as a step sees it: the process, the grid, the model and what a step keeps for the next."""

    process: Any
    grid: _Grid
    model: Callable
    model_kwargs: dict | None
    clip: bool
    generator: Any
    guided: Callable | None = None  # guidance.Denoiser: (x, t) -> (x0_hat, eps_hat) under guidance
    memory: dict = field(default_factory=dict)

    def denoise(self, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) [B, C, H, W] each: the model at the VP state x and time t (guided, when guidance is
        given to the sampler: guidance.py)."""
        if self.guided is not None:
            return self.guided(x, t)
        return self.process.denoise(self.model, x, t, self.model_kwargs, self.clip)


Step = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # step(run, j, x, **options) -> (x_next, x0_hat)


@torch.no_grad()
def sample(
    step: Step,
    diffusion,
    model,
    x_T: torch.Tensor,
    timesteps: Sequence[float],
    *,
    model_kwargs: dict | None = None,
    generator=None,
    callback: Callable | None = None,
    clip_denoised: bool = True,
    progress: bool = False,
    post_step: Callable | None = None,
    guidance=None,
    desc: str = "sampling",
    **options,
) -> torch.Tensor:
    """The one sampling loop: the grid of `timesteps`, then for j = 0..N-1 `step(run, j, x, **options)`, each new
    state through post_step and callback (with i = N-1-j, the index of the time just evaluated). Returns x_0.
    guidance: a guidance.Bound (Guidance(...).bind(...)) that every denoiser call of the run goes through."""
    guided = None if guidance is None else guidance.denoiser(diffusion, model, model_kwargs, clip_denoised)
    run = Run(diffusion, _grid(diffusion, timesteps), model, model_kwargs, clip_denoised, generator, guided)
    x = x_T
    for j in _steps(run.grid.n, progress, desc):
        x, x0 = step(run, j, x, **options)
        i = run.grid.n - 1 - j
        if post_step is not None:
            x = post_step(i, x)
        if callback is not None:
            callback(i, x, x0)
    return x


def sampler(name: str, step: Step, choices: Mapping[str, tuple] | None = None, numbers: tuple[str, ...] = (),
            **defaults) -> Callable:  # fmt: skip
    """The public sampler `name` (the module's shared signature): `sample` running `step` with `defaults` updated
    by the options given. An option it does not take is a TypeError; `choices` (option -> allowed values) and
    `numbers` (options that must be finite and >= 0) are checked once, before the first step, and read by the
    registry (fn.choices) for the config's checks."""
    choices = dict(choices or {})

    def fn(diffusion, model, x_T, timesteps, **kwargs):
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in defaults}
        unknown = sorted(set(kwargs) - set(SHARED))
        if unknown:
            raise TypeError(f"{name}() got an unexpected option {unknown[0]!r} (it takes: {', '.join(defaults)})")
        options = {**defaults, **options}
        for key, allowed in choices.items():
            check_choice(f"sampler.{key}", options[key], allowed)
        for key in numbers:
            check_number(f"sampler.{key}", options[key])
        return sample(step, diffusion, model, x_T, timesteps, desc=name, **kwargs, **options)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = step.__doc__
    fn.step, fn.options, fn.choices = step, dict(defaults), choices
    return fn


SHARED = ("model_kwargs", "generator", "callback", "clip_denoised", "progress", "post_step", "guidance")


def _order(j: int, g: _Grid, order: int, lower_order_final: bool | str, final_below: int | None) -> int:
    """Order of the step from j to j+1: limited by the evaluations so far with finite lambda (warm-up) and by
    `lower_order_final`, when the run has fewer than `final_below` steps (None: any number):
    - True: at most the number of steps left, counting the final jump to the x0 prediction as one (diffusers'
      DPMSolverMultistepScheduler below 15 steps and UniPCMultistepScheduler at every N: 3M's last ODE step is
      second order, 2M is never lowered);
    - "early": one step earlier, not counting the jump (this package's rule before 2026-12: the last ODE step is
      first order);
    - False: never."""
    history = j + 1 - (1 if g.lam[0] == -math.inf else 0)
    p = min(order, history)
    if lower_order_final and (final_below is None or g.n < final_below):
        p = min(p, g.n - j - (1 if lower_order_final == "early" else 0))
    return max(p, 1)


def _remember(run: Run, key: str, value: torch.Tensor, keep: int) -> list:
    """run.memory[key] = [value, *the previous ones][:keep] (newest first), returned."""
    run.memory[key] = [value, *run.memory.get(key, [])[: keep - 1]]
    return run.memory[key]


# --------------------------------------------------------------------------- DDIM on any process
def _ddim_step(run: Run, j: int, x, *, eta: float, temperature: float):
    """DDIM (Song et al. 2021, eq. 12) on any Process, in its (alpha, sigma): from t to the next time s,
    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with c = eta sigma_s sqrt(1 - SNR_t / SNR_s), which
    on the VP process is eq. 16's sigma_eta = eta sqrt((1 - a_s)/(1 - a_t)) sqrt(1 - a_t/a_s); c = 0 on the last
    step (SNR_s = inf). eta = 0 is deterministic (Euler in exact arithmetic); temperature scales z. Each step with
    eta > 0 draws z, the last one too, as diffusers' DDIMScheduler does (tests/test_solver_peers.py)."""
    g = run.grid
    x0, eps = run.denoise(x, g.t[j])
    gap = g.lam[j] - g.lam[j + 1]  # log sqrt(SNR_t / SNR_s) <= 0; -inf on the last step
    c = eta * g.sigma[j + 1] * math.sqrt(-math.expm1(2 * gap)) if eta > 0 else 0.0
    x = g.alpha[j + 1] * x0 + math.sqrt(max(g.sigma[j + 1] ** 2 - c**2, 0.0)) * eps
    if eta > 0:
        x = x + (c * temperature) * noise_like(x, run.generator)
    return x, x0


ddim = sampler("ddim", _ddim_step, numbers=("eta", "temperature"), eta=0.0, temperature=1.0)


# --------------------------------------------------------------------------- DPM-Solver++ (data prediction)
def _dpmpp_update(x, hist, lam, alpha, sigma, j: int, p: int, d2_weight: str = "published"):
    """One multistep DPM-Solver++ step of order p in {1, 2, 3} from lam[j] to lam[j+1] (Lu et al. 2022, Alg. 2 and
    the official third-order update), x the state at j, hist the x0 predictions at lam[j], lam[j-1], lam[j-2]
    (newest first). h = lam[j+1] - lam[j] (negative when inverting), r0 = (lam[j] - lam[j-1]) / h,
    r1 = (lam[j-1] - lam[j-2]) / h:
        p = 1: D = m0 (DDIM);  p = 2: D = m0 + (m0 - m1) / (2 r0);
        p = 3: D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) ~ h x0',
               D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2, phi_1 = expm1(-h), phi_2 = phi_1 / h + 1,
               phi_3 = phi_2 / h - 1/2, D = m0 - (phi_2 / phi_1) D1 + (w / phi_1) D2;
        x_{j+1} = (sigma_{j+1} / sigma_j) x - alpha_{j+1} phi_1 D.
    The exact integral of the quadratic Taylor term, alpha_{j+1} int_0^h e^{u-h} u^2/2 du x0'' = -alpha_{j+1} phi_3 h^2
    x0'', needs w = 2 phi_3 ("taylor": third order, measured slope >= 3 on the Gaussian test bed). The official code,
    diffusers and k-diffusion use w = phi_3 ("published": an O(h^3) local error, second order overall), which is
    nonetheless the more accurate at few steps and on grids whose steps grow towards the end, and scores as well or
    better on the MNIST recipe (bench/solver_peers.py, bench/solver_defaults.py): the default."""
    m0 = hist[0]
    h = lam[j + 1] - lam[j]
    phi_1 = math.expm1(-h)
    d = m0
    if p == 2:
        r0 = (lam[j] - lam[j - 1]) / h
        d = m0 + (0.5 / r0) * (m0 - hist[1])
    elif p == 3:
        r0, r1 = (lam[j] - lam[j - 1]) / h, (lam[j - 1] - lam[j - 2]) / h
        phi_2 = phi_1 / h + 1
        phi_3 = phi_2 / h - 0.5
        d1_0, d1_1 = (m0 - hist[1]) / r0, (hist[1] - hist[2]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        w = 2 * phi_3 if d2_weight == "taylor" else phi_3
        d = m0 - (phi_2 / phi_1) * d1 + (w / phi_1) * d2
    return (sigma[j + 1] / sigma[j]) * x - (alpha[j + 1] * phi_1) * d


def _dpmpp_step(run: Run, j: int, x, *, order: int, lower_order_final: bool | str, d2_weight: str = "published"):
    """Multistep DPM-Solver++ of `order` (Lu et al. 2022, Alg. 2; `_dpmpp_update`), the x0 predictions in memory."""
    g = run.grid
    x0, _ = run.denoise(x, g.t[j])
    hist = _remember(run, "x0", x0, order)
    if j == g.n - 1:
        return x0, x0
    p = _order(j, g, order, lower_order_final, DPMPP_FINAL_BELOW)
    return _dpmpp_update(x, hist, g.lam, g.alpha, g.sigma, j, p, d2_weight), x0


def _dpmpp_2m_step(run: Run, j: int, x, *, lower_order_final: bool | str):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++"), Algorithm 2: multistep, second order in lambda
    (`_dpmpp_update` with p = 2 after the first step). With lower_order_final=True it is never lowered before the
    final jump (as diffusers and k-diffusion); "early" makes the last ODE step first order below 15 steps."""
    return _dpmpp_step(run, j, x, order=2, lower_order_final=lower_order_final)


def _dpmpp_3m_step(run: Run, j: int, x, *, lower_order_final: bool | str, d2_weight: str):
    """Third-order multistep DPM-Solver++ (dpm_solver_pytorch `multistep_dpm_solver_third_update`, dpmsolver++;
    diffusers' DPMSolverMultistepScheduler with solver_order=3): `_dpmpp_update` with p = 3 once three x0
    predictions exist, 2M on the warm-up step and, below 15 steps with lower_order_final, on the last ODE step.
    d2_weight: "published" (phi_3, as the official code and diffusers) or "taylor" (2 phi_3, third order)."""
    return _dpmpp_step(run, j, x, order=3, lower_order_final=lower_order_final, d2_weight=d2_weight)


dpmpp_2m = sampler("dpmpp_2m", _dpmpp_2m_step, {"lower_order_final": LOWER_ORDER_FINAL}, lower_order_final=True)
dpmpp_3m = sampler("dpmpp_3m", _dpmpp_3m_step, {"lower_order_final": LOWER_ORDER_FINAL, "d2_weight": D2_WEIGHTS},
                   lower_order_final=True, d2_weight="published")  # fmt: skip


# --------------------------------------------------------------------------- UniPC
def _unipc_coefficients(rks: list[float], h: float, p: int) -> tuple[list[float], list[float], float]:
    """UniPC-bh2 weights (Zhao et al. 2023, Sec. 3, with B(h) = expm1(h), data prediction, so hh = -h).

    R[k][i] = r_i^k, and b as the official multistep_uni_pc_bh_update builds it: h_phi_1 = expm1(hh),
    h_phi_k <- h_phi_k / hh - 1/k!, b_k = h_phi_k k! / B(h). The predictor
    solves the first p-1 equations (rho = 1/2 for p = 2), the corrector all p (rho = 1/2 for p = 1).
    Returns (rhos_p [p-1], rhos_c [p], B(h)).
    """
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k, fact, b = math.expm1(hh) / hh - 1, 1, []
    for k in range(1, p + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R = np.array([[r ** (k - 1) for r in rks] for k in range(1, p + 1)], dtype=np.float64)
    b = np.array(b, dtype=np.float64)
    rhos_p = [] if p == 1 else [0.5] if p == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    rhos_c = [0.5] if p == 1 else np.linalg.solve(R, b).tolist()
    return rhos_p, rhos_c, b_h


def _unipc_step(run: Run, j: int, x, *, order: int, lower_order_final: bool | str):
    """UniPC (Zhao et al. 2023), data prediction, B(h) = expm1(h) ("bh2"), as the official `sample` (multistep).

    Step j -> j+1 of order p (UniP-p predictor with the p-1 previous x0 predictions m_k at lambda_k,
    r_k = (lambda_k - lambda_j) / h, D1_k = (m_k - m_j) / r_k):
        x_ = (sigma_{j+1} / sigma_j) x_j - alpha_{j+1} expm1(-h) m_j,
        x_p = x_ - alpha_{j+1} B(h) sum_k rho^p_k D1_k.
    The model is then evaluated at (x_p, t_{j+1}) -- the next step needs it anyway, so NFE stays N -- and the
    UniC-p corrector raises the order by one (UniPC-p is of order p + 1):
        x_{j+1} = x_ - alpha_{j+1} B(h) (sum_k rho^c_k D1_k + rho^c_p (m_{j+1} - m_j)).
    No corrector on the step to t_0: its evaluation is the returned x0_hat (diffusers applies one there, which the
    final jump discards). order in {1, 2, 3} (2, as diffusers: bench/solver_defaults.py); lower_order_final
    (`_order`, at every N as UniPC's `sample`). Memory: the x0 predictions and their lambdas, newest first.
    """
    g, mem = run.grid, run.memory
    if j == 0:
        mem["m"], mem["lam"] = [run.denoise(x, g.t[0])[0]], [g.lam[0]]
    hist, hist_lam = mem["m"], mem["lam"]
    m0 = hist[0]
    if j == g.n - 1:
        return m0, m0
    h = g.lam[j + 1] - g.lam[j]
    p = _order(j, g, order, lower_order_final, final_below=None)
    rks = [(hist_lam[k] - g.lam[j]) / h for k in range(1, p)] + [1.0]
    rhos_p, rhos_c, b_h = _unipc_coefficients(rks, h, p)
    d1s = [(hist[k] - m0) / rks[k - 1] for k in range(1, p)]
    c = g.alpha[j + 1] * b_h
    x_ = (g.sigma[j + 1] / g.sigma[j]) * x - (g.alpha[j + 1] * math.expm1(-h)) * m0
    x = x_
    for rho, d1 in zip(rhos_p, d1s):
        x = x - (c * rho) * d1
    m_new, _ = run.denoise(x, g.t[j + 1])
    if j + 1 < g.n - 1:  # UniC corrector, reusing the evaluation at the predicted point
        x = x_ - (c * rhos_c[-1]) * (m_new - m0)
        for rho, d1 in zip(rhos_c[:-1], d1s):
            x = x - (c * rho) * d1
    mem["m"], mem["lam"] = [m_new, *hist[: order - 1]], [g.lam[j + 1], *hist_lam[: order - 1]]
    return x, m0


unipc = sampler("unipc", _unipc_step, {"order": UNIPC_ORDERS, "lower_order_final": LOWER_ORDER_FINAL}, order=2,
                lower_order_final=True)  # fmt: skip


# --------------------------------------------------------------------------- iPNDM (Adams-Bashforth on eps)
AB_COEFFICIENTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def adams_bashforth_coefficients(s_points: Sequence[float], s_next: float) -> list[float]:
    """Variable-step Adams-Bashforth weights: c_k = (1/(s_next - s_0)) int_{s_0}^{s_next} L_k(s) ds, with L_k the
    Lagrange basis through s_0 (newest), s_1, .. (older points); equal to AB_COEFFICIENTS on a uniform grid."""
    h = s_next - s_points[0]
    u = [(sp - s_points[0]) / h for sp in s_points]  # u_0 = 0, the older points at u < 0
    coeffs = []
    for k, uk in enumerate(u):
        others = [um for m, um in enumerate(u) if m != k]
        poly = np.polynomial.polynomial.polyfromroots(others) / np.prod([uk - um for um in others])
        integral = np.polynomial.polynomial.polyint(poly)
        coeffs.append(
            float(np.polynomial.polynomial.polyval(1.0, integral) - np.polynomial.polynomial.polyval(0.0, integral))
        )
    return coeffs


def _ipndm_step(run: Run, j: int, x, *, max_order: int, variable_step: bool):
    """Improved PNDM (Zhang & Chen 2023, the DEIS paper's iPNDM): Adams-Bashforth on eps in the DDIM ODE
    d(x / alpha) / ds = eps(x, s), s = sigma / alpha:

        x_{j+1} / alpha_{j+1} = x_j / alpha_j + (s_{j+1} - s_j) sum_k c_k eps_{j-k},

    AB-1..4 (up to `max_order`), lower orders while the history fills. variable_step=True: c_k integrate
    the Lagrange polynomial through the past points exactly (`adams_bashforth_coefficients`), which gives the
    published weights 1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24 on a uniform grid.
    variable_step=False uses those fixed weights on any grid (iPNDM as published). Measured on the Gaussian test bed:
    - fixed weights are second order on non-uniform grids (log-log slope 2.0-2.2; variable-step 3.4-3.8);
    - at high noise h J = (s_{j+1} - s_j) d eps / d(x/alpha) ~ -(1 - exp(-dlambda)), outside AB4's stability
      interval (-0.3, 0) once the logSNR step exceeds ~0.35, so the fixed weights amplify errors ~2x per step on
      logsnr / karras grids with few steps: float32 rounding grows to 2e-3 over 20 cosine logsnr steps (1e-6 with
      variable steps), and a smooth 0.02 error in eps to an RMS error of 39 at NFE 10 (variable steps 0.17, DDIM 0.22);
    - with the exact model on the linear schedule the fixed weights are 1.5-3x more accurate below ~80 NFE
      (logsnr, NFE 10: 0.075 vs 0.24 max error).
    The sampler's defaults (registry.py) pair the published fixed weights with the trailing grid, where they score
    best on the MNIST recipe (FID 35.6 vs 38.1 at NFE 10, 32.6 vs 33.9 at 20) and float32 rounding stays below
    3e-4 (cosine, 10-50 steps); on logsnr / karras use variable_step=True (logsnr at NFE 20: 31.2 vs the fixed
    weights' 37.9; bench/solver_defaults.py).
    """
    g = run.grid
    x0, eps = run.denoise(x, g.t[j])
    if j == g.n - 1:
        return x0, x0
    if not math.isfinite(g.s[j]):  # from pure noise: the Euler (DDIM) step, and no history at s = inf
        return g.alpha[j + 1] * x0 + g.sigma[j + 1] * eps, x0
    eps_hist = _remember(run, "eps", eps, max_order)
    p = len(eps_hist)
    coeffs = adams_bashforth_coefficients(g.s[j - p + 1 : j + 1][::-1], g.s[j + 1]) if variable_step \
        else AB_COEFFICIENTS[p]  # fmt: skip
    e = coeffs[0] * eps_hist[0]
    for c, ek in zip(coeffs[1:], eps_hist[1:]):
        e = e + c * ek
    return (g.alpha[j + 1] / g.alpha[j]) * x + (g.alpha[j + 1] * (g.s[j + 1] - g.s[j])) * e, x0


ipndm = sampler("ipndm", _ipndm_step, {"max_order": IPNDM_ORDERS, "variable_step": (True, False)}, max_order=4,
                variable_step=True)  # fmt: skip


# --------------------------------------------------------------------------- Karras et al. 2022 (VE variables)
def _churn(run: Run, j: int, x_bar, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Alg. 2 lines 4-6: raise the noise level s_j -> s_hat = (1 + gamma) s_j by adding
    N(0, s_hat^2 - s_j^2) noise, gamma = min(s_churn / N, sqrt(2) - 1) for s_j in [s_tmin, s_tmax]. s_hat is capped
    at the schedule's largest sigma (the model knows no higher level). Returns (x_bar, s_hat, t_hat, alpha_hat)."""
    g, diffusion = run.grid, run.process
    gamma = min(s_churn / g.n, math.sqrt(2) - 1) if s_tmin <= g.s[j] <= s_tmax else 0.0
    if gamma <= 0:
        return x_bar, g.s[j], g.t[j], g.alpha[j]
    t_hat = float(diffusion.t_at_sigma(g.s[j] * (1 + gamma)))
    s_hat, alpha_hat = float(diffusion.sigma_at(t_hat)), float(diffusion.alpha_sigma_at(t_hat)[0])
    x_bar = x_bar + math.sqrt(max(s_hat**2 - g.s[j] ** 2, 0.0)) * s_noise * noise_like(x_bar, run.generator)
    return x_bar, s_hat, t_hat, alpha_hat


def _karras_step(run: Run, j: int, x, *, heun: bool, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
    """One step of Karras et al. 2022's Alg. 1 / 2 in the VE variables x_bar = x / alpha, s = sigma / alpha: churn,
    an Euler step d = (x_bar - D(x_bar; s)) / s (exactly the eps prediction, no cancellation), and with `heun` the
    trapezoidal correction at the new point (none on the step to s = 0). From pure noise (alpha = 0: flow's t = 1,
    zero terminal SNR) x_bar is infinite; the exact step from s = inf is x_bar(s') = s' z + int_0^1 D(x_bar(s), s) dr
    with r = s' / s and z = x_T / sigma (the noise): Euler takes D at r = 0 (DDIM's update), Heun the trapezoid (D at
    r = 0 and at Euler's x_bar(s')), both finite. Heun on a linear path (flow) steps in its sigma instead."""
    g = run.grid
    if heun and s_churn == 0 and run.process.linear_path:
        return _heun_on_linear_path(run, j, x)
    if not math.isfinite(g.s[j]):
        if s_churn != 0:
            raise ValueError(
                f"sampler.method={'heun' if heun else 'euler'} with churn works in sigma / alpha, infinite at the "
                "first time (pure noise: zero terminal SNR, flow's t = 1); drop t=T-1 from the timesteps or set "
                "sampler.s_churn=0"
            )
        x0, z = run.denoise(x, g.t[j])  # eps_hat = x_T / sigma here
        if j == g.n - 1:
            return x0, x0
        x_bar = x0 + g.s[j + 1] * z
        if heun:
            x0_next, _ = run.denoise(g.alpha[j + 1] * x_bar, g.t[j + 1])
            x_bar = 0.5 * (x0 + x0_next) + g.s[j + 1] * z
        return g.alpha[j + 1] * x_bar, x0
    x_bar, s_hat, t_hat, a_hat = _churn(run, j, x / g.alpha[j], s_churn, s_tmin, s_tmax, s_noise)
    x0, d = run.denoise(a_hat * x_bar, t_hat)
    if j == g.n - 1:
        return x0, x0
    dt = g.s[j + 1] - s_hat
    x_next = x_bar + dt * d
    if heun:
        _, d2 = run.denoise(g.alpha[j + 1] * x_next, g.t[j + 1])
        x_next = x_bar + (0.5 * dt) * (d + d2)
    return g.alpha[j + 1] * x_next, x0


def _heun_on_linear_path(run: Run, j: int, x):
    """Heun's method on dx/dsigma = eps - x0 (the velocity) where alpha = 1 - sigma (flow: sigma is the flow time
    u), as flow_matching's and torchdiffeq's heun2 integrate it and ComfyUI samples flow models; finite at sigma = 1.
    The last step is the x0 prediction, as everywhere here."""
    g = run.grid
    x0, eps = run.denoise(x, g.t[j])
    if j == g.n - 1:
        return x0, x0
    dt, v = g.sigma[j + 1] - g.sigma[j], eps - x0
    x0_next, eps_next = run.denoise(x + dt * v, g.t[j + 1])
    return x + (0.5 * dt) * (v + eps_next - x0_next), x0


def _euler_step(run: Run, j: int, x, **churn):
    """Euler steps on the probability-flow ODE dx/ds = (x - D(x; s)) / s in the VE variables x = x_VP / alpha
    (Karras et al. 2022, Alg. 1 without the correction); with s_churn > 0 Alg. 2's stochastic churn.
    Deterministic (s_churn = 0) it is DDIM (eta = 0) in exact arithmetic."""
    return _karras_step(run, j, x, heun=False, **churn)


def _heun_step(run: Run, j: int, x, **churn):
    """Heun's second-order method, Karras et al. 2022 Alg. 1 (Alg. 2 with s_churn > 0): an Euler step to s_{j+1},
    then the trapezoidal correction with d' at the new point; the step to s = 0 skips the correction, so
    NFE = 2N - 1. The correction sees h d(eps)/d(x/alpha) ~ 1 - 1/q at the new point of a step that shrinks sigma by
    a factor q, so Heun needs small logSNR steps: with few steps from sigma_max = 157 (linear) or 2e4 (cosine) it is
    worse than DDIM at equal NFE (measured up to NFE 40 on cosine)."""
    return _karras_step(run, j, x, heun=True, **churn)


_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
euler = sampler("euler", _euler_step, numbers=tuple(_CHURN), **_CHURN)
heun = sampler("heun", _heun_step, numbers=tuple(_CHURN), **_CHURN)


def ancestral_step(s_from: float, s_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion get_ancestral_step: (s_down, s_up) with s_down^2 + s_up^2 = s_to^2,
    s_up = min(s_to, eta sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2)); at s_from = inf its limit min(s_to, eta s_to)."""
    if not eta:
        return s_to, 0.0
    if math.isinf(s_from):  # from pure noise: the limit, s_up = min(1, eta) s_to
        s_up = min(s_to, eta * s_to)
    else:
        s_up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    return math.sqrt(s_to**2 - s_up**2), s_up


def _euler_ancestral_step(run: Run, j: int, x, *, eta: float, s_noise: float):
    """k-diffusion sample_euler_ancestral in the VE variables: an Euler step down to s_down, then fresh noise of
    std s_noise s_up (`ancestral_step`); eta = 0 is Euler. No noise on the step to s = 0. From pure noise (s = inf:
    flow's t = 1, zero terminal SNR) the first step is the limit x0 + s_down eps (DDIM's form, finite)."""
    g = run.grid
    x0, d = run.denoise(x, g.t[j])
    if j == g.n - 1:
        return x0, x0
    s_down, s_up = ancestral_step(g.s[j], g.s[j + 1], eta)
    x_bar = x0 + s_down * d if not math.isfinite(g.s[j]) else x / g.alpha[j] + (s_down - g.s[j]) * d
    if s_up > 0:
        x_bar = x_bar + (s_noise * s_up) * noise_like(x_bar, run.generator)
    return g.alpha[j + 1] * x_bar, x0


euler_ancestral = sampler("euler_ancestral", _euler_ancestral_step, numbers=("eta", "s_noise"), eta=1.0, s_noise=1.0)


# --------------------------------------------------------------------------- inversion
@torch.no_grad()
def ode_invert(
    diffusion,
    model,
    x0,
    timesteps,
    *,
    order=2,
    d2_weight="published",
    model_kwargs=None,
    clip_denoised=False,
    progress=False,
):
    """Deterministic encoding x0 -> x at timesteps[-1]: multistep DPM-Solver++ (order 1 = DDIM, 2 = 2M, 3 = 3M)
    run from the clean end up the noise levels, N = len(timesteps) evaluations.

    As `samplers.ddim_invert`: the clean image is the state at alpha_bar = 1, and the first step to t_0 takes eps
    from the model at (x0, t_0) (first order in sigma_0, which is ~0.01 for the usual schedules):
    x_{t_0} = alpha_0 x0 + sigma_0 eps. Then the update of dpmpp_2m / dpmpp_3m with h = lambda_{j+1} - lambda_j < 0
    and the x0 predictions at t_j, t_{j-1}, t_{j-2}. order=1 reproduces ddim_invert (fixed_point_iters=0).
    Pair with the sampler of the same order (and d2_weight) for reconstructions.
    """
    check_choice("ode_invert order", order, (1, 2, 3))
    check_choice("sampler.d2_weight", d2_weight, D2_WEIGHTS)
    g = _grid(diffusion, timesteps)
    t, alpha, sigma, lam = g.t[::-1], g.alpha[-2::-1], g.sigma[-2::-1], g.lam[-2::-1]  # ascending t_0 .. t_{N-1}
    if not math.isfinite(lam[-1]):
        raise ValueError("ode_invert needs alpha_bar > 0 at timesteps[-1]; drop t=T-1 under zero terminal SNR")
    _, eps = diffusion.denoise(model, x0, t[0], model_kwargs, clip_denoised)
    x, hist = alpha[0] * x0 + sigma[0] * eps, []
    for j in _steps(g.n - 1, progress, "inverting"):
        m0, _ = diffusion.denoise(model, x, t[j], model_kwargs, clip_denoised)
        hist = [m0, *hist[: order - 1]]
        x = _dpmpp_update(x, hist, lam, alpha, sigma, j, len(hist), d2_weight)
    return x

