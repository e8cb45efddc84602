"""Fast training-free samplers: one self-contained function per method (in the style of k-diffusion's sampling.py).

Every method has the signature of `samplers.ddim_sample` and its conventions, so they are interchangeable:

    fn(diffusion, model, x_T, timesteps, *, model_kwargs=None, generator=None, callback=None,
       clip_denoised=True, progress=False, **options) -> x_0                      # [B, C, H, W] each

- `timesteps`: ascending times t_0 < .. < t_{N-1} (ints or floats in [0, T-1], e.g. respace.sampling_times).
  The model is evaluated at t_{N-1}, .., t_0 and the last step goes to the clean image (sigma = 0), whose value
  is the denoiser's x0 prediction at t_0, exactly as DDIM's last step (alpha_bar_prev = 1). So N evaluations
  (NFE) for the single-evaluation methods, 2N - 1 for Heun (registry.Method.nfe).
- x_T: the VP state at t_{N-1} (N(0, I) for pure noise). callback(i, x, x0_hat) after each step with i = N-1 .. 0
  the index of the time just evaluated, x the new state and x0_hat the prediction at t_i (as sample_loop).
- Randomness only from `generator` (a torch.Generator or per-image ImageGenerators, seeding.py). Per-step scalars
  are float64 Python numbers from the time grid (no device sync); tensors stay in x_T's dtype. The model is only
  called through `diffusion.denoise`, so eps / x0 / v and learned-variance models, clipping and classifier-free
  guidance (a wrapped model) all work.
- The last step to sigma = 0 is first order (DDIM): the x0 prediction at t_0, as diffusers' schedulers end
  (final_sigmas_type="zero"). Multistep methods warm up with lower orders and, with lower_order_final, lower the
  order of their last steps counting that final jump as a step, as diffusers does: DPM-Solver++ below 15 steps
  (3M's last ODE step is second order, 2M is not lowered), UniPC at every N (its last ODE step at most second
  order). `_order` says which step gets which order; the choices were measured against diffusers on exact models
  and by FID on the MNIST recipe (bench/solver_peers.py, BENCHMARKS.md).
- `post_step(i, x) -> x` may edit each new state (inpainting: diffusion/inpaint.py), with i as in the callback.

Notation at time t_j: x_t = alpha x0 + sigma eps with (alpha, sigma) = diffusion.alpha_sigma_at(t) (the Process
interface, process.py: sqrt(alpha_bar), sqrt(1 - alpha_bar) on the VP process), s = sigma / alpha (VE noise level
of x / alpha, Karras et al.'s sigma) and lambda = log(alpha / sigma) = -log s (half the log-SNR: log_snr_at / 2).
Data-prediction methods (DPM-Solver++, UniPC) are finite at zero terminal SNR (a = 0 at the first time); the VE
methods (Euler, Heun, Euler ancestral, iPNDM) take their first step from there in a finite form (the limit s -> inf
of the step), and Heun on a linear path (flow) steps in the path's own sigma (= the flow time) throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_choice, check_number
from .seeding import noise_like

UNIPC_ORDERS = (1, 2, 3)  # unipc's `order`
IPNDM_ORDERS = (1, 2, 3, 4)  # ipndm's `max_order`


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


LOWER_ORDER_FINAL = (True, False, "early")  # the multistep methods' `lower_order_final`
DPMPP_FINAL_BELOW = 15  # DPM-Solver++ lowers its last steps only below this many steps (diffusers' rule)


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


def _need_finite_s(g: _Grid, name: str) -> None:
    if not math.isfinite(g.s[0]):
        raise ValueError(
            f"sampler.method={name} works in sigma / alpha, infinite at the first time (pure noise: zero terminal "
            "SNR, flow's t = 1); drop t=T-1 from the timesteps or use euler / dpmpp_2m / dpmpp_3m / unipc"
        )


# --------------------------------------------------------------------------- DPM-Solver++ (data prediction)
D2_WEIGHTS = ("published", "taylor")  # dpmpp_3m's `d2_weight`


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


def _dpmpp(name, order, diffusion, model, x_T, timesteps, model_kwargs, callback, clip, progress, post_step,
           lower_order_final, d2_weight="published"):  # fmt: skip
    check_choice("sampler.lower_order_final", lower_order_final, LOWER_ORDER_FINAL)
    g = _grid(diffusion, timesteps)
    x, hist = x_T, []
    for j in _steps(g.n, progress, name):
        x0, _ = diffusion.denoise(model, x, g.t[j], model_kwargs, clip)
        hist = [x0, *hist[: order - 1]]
        if j == g.n - 1:
            x = x0
        else:
            p = _order(j, g, order, lower_order_final, DPMPP_FINAL_BELOW)
            x = _dpmpp_update(x, hist, g.lam, g.alpha, g.sigma, j, p, d2_weight)
        if post_step is not None:
            x = post_step(g.n - 1 - j, x)
        if callback is not None:
            callback(g.n - 1 - j, x, x0)
    return x


@torch.no_grad()
def dpmpp_2m(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    lower_order_final=True,
):
    """DPM-Solver++(2M), Lu et al. 2022 ("DPM-Solver++"), Algorithm 2: multistep, second order in lambda
    (`_dpmpp_update` with p = 2 after the first step). With lower_order_final=True it is never lowered before the
    final jump (as diffusers and k-diffusion); "early" makes the last ODE step first order below 15 steps."""
    return _dpmpp("dpmpp_2m", 2, diffusion, model, x_T, timesteps, model_kwargs, callback, clip_denoised, progress,
                  post_step, lower_order_final)  # fmt: skip


@torch.no_grad()
def dpmpp_3m(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    lower_order_final=True,
    d2_weight="published",
):
    """Third-order multistep DPM-Solver++ (dpm_solver_pytorch `multistep_dpm_solver_third_update`, dpmsolver++;
    diffusers' DPMSolverMultistepScheduler with solver_order=3): `_dpmpp_update` with p = 3 once three x0
    predictions exist, 2M on the warm-up step and, below 15 steps with lower_order_final, on the last ODE step.
    d2_weight: "published" (phi_3, as the official code and diffusers) or "taylor" (2 phi_3, third order).
    """
    check_choice("sampler.d2_weight", d2_weight, D2_WEIGHTS)
    return _dpmpp("dpmpp_3m", 3, diffusion, model, x_T, timesteps, model_kwargs, callback, clip_denoised, progress,
                  post_step, lower_order_final, d2_weight)  # fmt: skip


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


@torch.no_grad()
def unipc(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    order=2,
    lower_order_final=True,
):
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
    (`_order`, at every N as UniPC's `sample`).
    """
    check_choice("sampler.order", order, UNIPC_ORDERS)
    check_choice("sampler.lower_order_final", lower_order_final, LOWER_ORDER_FINAL)
    g = _grid(diffusion, timesteps)
    x = x_T
    x0, _ = diffusion.denoise(model, x, g.t[0], model_kwargs, clip_denoised)
    hist, hist_lam = [x0], [g.lam[0]]  # newest first
    for j in _steps(g.n, progress, "unipc"):
        m0 = hist[0]
        if j == g.n - 1:
            x = m0
        else:
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
            m_new, _ = diffusion.denoise(model, x, g.t[j + 1], model_kwargs, clip_denoised)
            if j + 1 < g.n - 1:  # UniC corrector, reusing the evaluation at the predicted point
                x = x_ - (c * rhos_c[-1]) * (m_new - m0)
                for rho, d1 in zip(rhos_c[:-1], d1s):
                    x = x - (c * rho) * d1
            hist, hist_lam = [m_new, *hist[: order - 1]], [g.lam[j + 1], *hist_lam[: order - 1]]
        if post_step is not None:
            x = post_step(g.n - 1 - j, x)
        if callback is not None:
            callback(g.n - 1 - j, x, m0)
    return x


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


@torch.no_grad()
def ipndm(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    max_order=4,
    variable_step=True,
):
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
    check_choice("sampler.max_order", max_order, IPNDM_ORDERS)
    g = _grid(diffusion, timesteps)
    x, eps_hist = x_T, []
    for j in _steps(g.n, progress, "ipndm"):
        x0, eps = diffusion.denoise(model, x, g.t[j], model_kwargs, clip_denoised)
        if j == g.n - 1:
            x = x0
        elif not math.isfinite(g.s[j]):  # from pure noise: the Euler (DDIM) step, and no history at s = inf
            x = g.alpha[j + 1] * x0 + g.sigma[j + 1] * eps
        else:
            eps_hist = [eps, *eps_hist[: max_order - 1]]
            p = len(eps_hist)
            if variable_step:
                coeffs = adams_bashforth_coefficients(g.s[j - p + 1 : j + 1][::-1], g.s[j + 1])
            else:
                coeffs = AB_COEFFICIENTS[p]
            e = coeffs[0] * eps_hist[0]
            for c, ek in zip(coeffs[1:], eps_hist[1:]):
                e = e + c * ek
            x = (g.alpha[j + 1] / g.alpha[j]) * x + (g.alpha[j + 1] * (g.s[j + 1] - g.s[j])) * e
        if post_step is not None:
            x = post_step(g.n - 1 - j, x)
        if callback is not None:
            callback(g.n - 1 - j, x, x0)
    return x


# --------------------------------------------------------------------------- DDIM on any process
@torch.no_grad()
def ddim(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    eta=0.0,
    temperature=1.0,
):
    """DDIM (Song et al. 2021, eq. 12) on any Process, in its (alpha, sigma): from t to the next time s,
    x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z with c = eta sigma_s sqrt(1 - SNR_t / SNR_s), which
    on the VP process is eq. 16's sigma_eta = eta sqrt((1 - a_s)/(1 - a_t)) sqrt(1 - a_t/a_s); c = 0 on the last
    step (SNR_s = inf). eta = 0 is deterministic (Euler in exact arithmetic); temperature scales z. Each step with
    eta > 0 draws z, the last one too, as `samplers.ddim_sample` does on the discrete process, which it equals."""
    check_number("sampler.eta", eta)
    g = _grid(diffusion, timesteps)
    x = x_T
    for j in _steps(g.n, progress, "ddim"):
        x0, eps = diffusion.denoise(model, x, g.t[j], model_kwargs, clip_denoised)
        gap = g.lam[j] - g.lam[j + 1]  # log sqrt(SNR_t / SNR_s) <= 0; -inf on the last step
        c = eta * g.sigma[j + 1] * math.sqrt(-math.expm1(2 * gap)) if eta > 0 else 0.0
        x = g.alpha[j + 1] * x0 + math.sqrt(max(g.sigma[j + 1] ** 2 - c**2, 0.0)) * eps
        if eta > 0:
            x = x + (c * temperature) * noise_like(x, generator)
        if post_step is not None:
            x = post_step(g.n - 1 - j, x)
        if callback is not None:
            callback(g.n - 1 - j, x, x0)
    return x


# --------------------------------------------------------------------------- Karras et al. 2022 (VE variables)
def _churn(g: _Grid, diffusion, j: int, x_bar, s_churn, s_tmin, s_tmax, s_noise, generator):
    """Karras et al. 2022 Alg. 2 lines 4-6: raise the noise level s_j -> s_hat = (1 + gamma) s_j by adding
    N(0, s_hat^2 - s_j^2) noise, gamma = min(s_churn / N, sqrt(2) - 1) for s_j in [s_tmin, s_tmax]. s_hat is capped
    at the schedule's largest sigma (the model knows no higher level). Returns (x_bar, s_hat, t_hat, alpha_hat)."""
    gamma = min(s_churn / g.n, math.sqrt(2) - 1) if s_tmin <= g.s[j] <= s_tmax else 0.0
    if gamma <= 0:
        return x_bar, g.s[j], g.t[j], g.alpha[j]
    t_hat = float(diffusion.t_at_sigma(g.s[j] * (1 + gamma)))
    s_hat, alpha_hat = float(diffusion.sigma_at(t_hat)), float(diffusion.alpha_sigma_at(t_hat)[0])
    x_bar = x_bar + math.sqrt(max(s_hat**2 - g.s[j] ** 2, 0.0)) * s_noise * noise_like(x_bar, generator)
    return x_bar, s_hat, t_hat, alpha_hat


def _karras(
    name,
    heun_correction,
    diffusion,
    model,
    x_T,
    timesteps,
    model_kwargs,
    generator,
    callback,
    clip,
    progress,
    post_step,
    s_churn,
    s_tmin,
    s_tmax,
    s_noise,
):
    g = _grid(diffusion, timesteps)
    if heun_correction and s_churn == 0 and diffusion.linear_path:
        return _heun_on_linear_path(diffusion, model, x_T, g, model_kwargs, callback, clip, progress, post_step)
    # From pure noise (alpha = 0: flow's t = 1, zero terminal SNR) x_bar = x_T / alpha is infinite. The exact step
    # from s = inf is x_bar(s') = s' z + int_0^1 D(x_bar(s), s) dr with r = s' / s and z = x_T / sigma (the noise):
    # Euler takes D at r = 0 (DDIM's update), Heun the trapezoid (D at r = 0 and at Euler's x_bar(s')), both finite.
    from_noise = not math.isfinite(g.s[0]) and s_churn == 0
    if not from_noise:
        _need_finite_s(g, name)
    x_bar = None if from_noise else x_T / g.alpha[0]
    for j in _steps(g.n, progress, name):
        if j == 0 and from_noise:
            x0, z = diffusion.denoise(model, x_T, g.t[0], model_kwargs, clip)  # eps_hat = x_T / sigma here
            if g.n == 1:
                x_bar = x0
            else:
                x_bar = x0 + g.s[1] * z
                if heun_correction:
                    x0_next, _ = diffusion.denoise(model, g.alpha[1] * x_bar, g.t[1], model_kwargs, clip)
                    x_bar = 0.5 * (x0 + x0_next) + g.s[1] * z
        else:
            x_bar, s_hat, t_hat, a_hat = _churn(g, diffusion, j, x_bar, s_churn, s_tmin, s_tmax, s_noise, generator)
            # d = (x_bar - D(x_bar; s)) / s is exactly the eps prediction (no cancellation).
            x0, d = diffusion.denoise(model, a_hat * x_bar, t_hat, model_kwargs, clip)
            if j == g.n - 1:
                x_bar = x0
            else:
                dt = g.s[j + 1] - s_hat
                x_next = x_bar + dt * d
                if heun_correction:
                    _, d2 = diffusion.denoise(model, g.alpha[j + 1] * x_next, g.t[j + 1], model_kwargs, clip)
                    x_next = x_bar + (0.5 * dt) * (d + d2)
                x_bar = x_next
        if post_step is not None:  # on the VP state alpha x_bar (alpha = 1 after the last step)
            x_bar = post_step(g.n - 1 - j, g.alpha[j + 1] * x_bar) / g.alpha[j + 1]
        if callback is not None:
            callback(g.n - 1 - j, g.alpha[j + 1] * x_bar, x0)
    return x_bar


def _heun_on_linear_path(diffusion, model, x_T, g: _Grid, model_kwargs, callback, clip, progress, post_step):
    """Heun's method on dx/dsigma = eps - x0 (the velocity) where alpha = 1 - sigma (flow: sigma is the flow time
    u), as flow_matching's and torchdiffeq's heun2 integrate it and ComfyUI samples flow models; finite at sigma = 1.
    The last step is the x0 prediction, as everywhere here."""
    x = x_T
    for j in _steps(g.n, progress, "heun"):
        x0, eps = diffusion.denoise(model, x, g.t[j], model_kwargs, clip)
        if j == g.n - 1:
            x = x0
        else:
            dt, v = g.sigma[j + 1] - g.sigma[j], eps - x0
            x0_next, eps_next = diffusion.denoise(model, x + dt * v, g.t[j + 1], model_kwargs, clip)
            x = x + (0.5 * dt) * (v + eps_next - x0_next)
        if post_step is not None:
            x = post_step(g.n - 1 - j, x)
        if callback is not None:
            callback(g.n - 1 - j, x, x0)
    return x


@torch.no_grad()
def euler(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=math.inf,
    s_noise=1.0,
):
    """Euler steps on the probability-flow ODE dx/ds = (x - D(x; s)) / s in the VE variables x = x_VP / alpha
    (Karras et al. 2022, Alg. 1 without the correction); with s_churn > 0 Alg. 2's stochastic churn.
    Deterministic (s_churn = 0) it is DDIM (eta = 0) in exact arithmetic."""
    return _karras(
        "euler",
        False,
        diffusion,
        model,
        x_T,
        timesteps,
        model_kwargs,
        generator,
        callback,
        clip_denoised,
        progress,
        post_step,
        s_churn,
        s_tmin,
        s_tmax,
        s_noise,
    )


@torch.no_grad()
def heun(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=math.inf,
    s_noise=1.0,
):
    """Heun's second-order method, Karras et al. 2022 Alg. 1 (Alg. 2 with s_churn > 0): an Euler step to s_{j+1},
    then the trapezoidal correction with d' at the new point; the step to s = 0 skips the correction, so
    NFE = 2N - 1. The correction sees h d(eps)/d(x/alpha) ~ 1 - 1/q at the new point of a step that shrinks sigma by
    a factor q, so Heun needs small logSNR steps: with few steps from sigma_max = 157 (linear) or 2e4 (cosine) it is
    worse than DDIM at equal NFE (measured up to NFE 40 on cosine)."""
    return _karras(
        "heun",
        True,
        diffusion,
        model,
        x_T,
        timesteps,
        model_kwargs,
        generator,
        callback,
        clip_denoised,
        progress,
        post_step,
        s_churn,
        s_tmin,
        s_tmax,
        s_noise,
    )


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


@torch.no_grad()
def euler_ancestral(
    diffusion,
    model,
    x_T,
    timesteps,
    *,
    model_kwargs=None,
    generator=None,
    callback=None,
    clip_denoised=True,
    progress=False,
    post_step=None,
    eta=1.0,
    s_noise=1.0,
):
    """k-diffusion sample_euler_ancestral in the VE variables: an Euler step down to s_down, then fresh noise of
    std s_noise s_up (`ancestral_step`); eta = 0 is Euler. No noise on the step to s = 0. From pure noise (s = inf:
    flow's t = 1, zero terminal SNR) the first step is the limit x0 + s_down eps (DDIM's form, finite)."""
    check_number("sampler.eta", eta)
    g = _grid(diffusion, timesteps)
    x_bar = x_T / g.alpha[0] if math.isfinite(g.s[0]) else None
    for j in _steps(g.n, progress, "euler_ancestral"):
        x_in = x_T if x_bar is None else g.alpha[j] * x_bar
        x0, d = diffusion.denoise(model, x_in, g.t[j], model_kwargs, clip_denoised)
        if j == g.n - 1:
            x_bar = x0
        else:
            s_down, s_up = ancestral_step(g.s[j], g.s[j + 1], eta)
            x_bar = x0 + s_down * d if x_bar is None else x_bar + (s_down - g.s[j]) * d
            if s_up > 0:
                x_bar = x_bar + (s_noise * s_up) * noise_like(x_bar, generator)
        if post_step is not None:
            x_bar = post_step(g.n - 1 - j, g.alpha[j + 1] * x_bar) / g.alpha[j + 1]
        if callback is not None:
            callback(g.n - 1 - j, g.alpha[j + 1] * x_bar, x0)
    return x_bar


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

