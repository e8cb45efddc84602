"""Fast solvers on exact test beds: convergence orders against the closed-form probability-flow ODE, agreement
with DDIM where the math says so, the stochastic samplers' output law, parameterization invariance, guidance,
the continuous-time view of the discrete process (sigma_at / t_at_sigma / denoise / fractional respace) and the
new time grids."""

import math

import numpy as np
import pytest
import torch

from diffusion_lab.diffusion import (
    ClassifierFreeGuidance,
    GaussianDiffusion,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    get_betas,
    get_method,
)
from diffusion_lab.diffusion import solvers as S
from diffusion_lab.diffusion.analytic import GaussianData, PointMixture
from diffusion_lab.diffusion.respace import karras_sigmas, sampling_times, space_timesteps

F64 = torch.float64
DATA = GaussianData(mu=0.1, s=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _ddim(eta):
    def fn(diffusion, model, x_T, timesteps, **kw):
        return ddim_sample(diffusion, model, x_T, timesteps, eta=eta, **kw)

    return fn


# Every method with the shared signature; ddim eta=0 is the first-order baseline.
DETERMINISTIC = {
    "ddim": _ddim(0.0),
    "euler": S.euler,
    "heun": S.heun,
    "dpmpp_2m": S.dpmpp_2m,
    "dpmpp_3m": S.dpmpp_3m,
    "unipc": S.unipc,
    "ipndm": S.ipndm,
}
STOCHASTIC = {"ddim_eta1": _ddim(1.0), "euler_ancestral": S.euler_ancestral}


# --------------------------------------------------------------------------- convergence orders
def _errors(diffusion, fn, nfes, spacing, heun=False, **options):
    """RMS error against D(exact flow from t_{N-1} to t_0) at t_0, for each NFE; returns (actual NFE, errors)."""
    x_T = _noise((64, 1, 4, 4))
    model = DATA.model(diffusion)
    actual, errs = [], []
    for n in nfes:
        steps = (n + 1) // 2 if heun else n
        ts = sampling_times(diffusion, spacing, steps)
        a_hi, a_lo = diffusion.alpha_bar_at(ts[-1]), diffusion.alpha_bar_at(ts[0])
        ref = DATA.denoise(DATA.ode_flow(x_T, a_hi, a_lo), a_lo)
        out = fn(diffusion, model, x_T, ts, clip_denoised=False, **options)
        actual.append(2 * steps - 1 if heun else steps)
        errs.append((out - ref).pow(2).mean().sqrt().item())
    return actual, errs


def _slope(nfe, errs):
    return -np.polyfit(np.log(nfe), np.log(errs), 1)[0]


# Least-squares log-log slopes of the RMS error over NFE 40, 80, 160, 320 on the karras grid (measured):
#                       linear  cosine
#   ddim                0.99    0.97
#   heun                2.07    2.14
#   dpmpp_2m            2.07    2.09
#   ipndm fixed weights 2.07    2.14    (variable_step=False) fixed AB weights on a non-uniform grid: second order
#   dpmpp_3m            3.08    3.20
#   dpmpp_3m published  1.70    0.70    (d2_weight="published", the default: second order, erratic here)
#   unipc order=2       3.05    3.07    UniP-2 + UniC: one order above the predictor
#   unipc order=3       4.05    4.24
#   ipndm               3.75    3.36    (variable-step AB, the default) approaching 4 (AB4) from below
# Karras rather than logsnr: on the logsnr grid the steps are uniform in lambda and, for Gaussian data, the
# leading O(h^3) global error of the third-order methods is the integral of a total derivative and nearly
# vanishes, so they show slope 4 (dpmpp_3m 4.02 / 4.04) and hide their true order.
ORDERS = [  # (method, options, slope bounds)
    ("ddim", {}, 0.9, 1.1),
    ("heun", {}, 1.85, 2.3),
    ("dpmpp_2m", {}, 1.85, 2.3),
    ("ipndm", {"variable_step": False}, 1.85, 2.3),
    ("dpmpp_3m", {"d2_weight": "taylor"}, 2.8, 3.5),
    ("unipc", {"order": 2, "lower_order_final": False}, 2.8, 3.4),  # the method's order: UniPC's `sample`
    ("unipc", {"order": 3, "lower_order_final": False}, 3.6, 4.6),  # lowers the final steps at every N
    ("ipndm", {}, 3.0, 4.3),
]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_convergence_orders_on_gaussian_data(schedule):
    diff = GaussianDiffusion.from_schedule(schedule, 1000)
    for name, options, lo, hi in ORDERS:
        nfe, errs = _errors(diff, DETERMINISTIC[name], [40, 80, 160, 320], "karras", heun=name == "heun", **options)
        assert lo < _slope(nfe, errs) < hi, (name, options, errs)
    # the published third-order update is only second order (O(h^3) local error from the halved D2 weight)
    nfe, errs = _errors(diff, S.dpmpp_3m, [80, 160, 320], "karras", d2_weight="published")
    assert _slope(nfe, errs) < 2.3


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_higher_order_beats_ddim_at_equal_nfe(schedule):
    """On the logsnr grid (DPM-Solver's recommendation). RMS errors at NFE 20, linear / cosine: ddim 5.9e-2 / 8.9e-2,
    dpmpp_2m 7.2e-3 / 1.4e-2, dpmpp_3m 1.8e-3 / 7.2e-3, unipc 2.9e-4 / 2.4e-3, ipndm 1.5e-2 / 4.2e-2 (ratio to
    DDIM 0.25 / 0.47; at NFE 40 0.06 / 0.15). Heun spends two evaluations per step, and its trapezoid takes the
    slope at the new level, where h d(eps)/d(x/alpha) ~ 1 - 1/q for a step that shrinks sigma by q: large for the
    first steps down from sigma_max = 157 / 2e4. At NFE 40 on cosine it is still level with DDIM (0.151 vs 0.144
    max error), so it is checked from NFE 80."""
    diff = GaussianDiffusion.from_schedule(schedule, 1000)
    for nfe in (20, 40):
        _, (base,) = _errors(diff, DETERMINISTIC["ddim"], [nfe], "logsnr")
        for name in ("dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"):
            _, (err,) = _errors(diff, DETERMINISTIC[name], [nfe], "logsnr")
            assert err < 0.6 * base, (name, nfe, err, base)
    _, (base,) = _errors(diff, DETERMINISTIC["ddim"], [80], "logsnr")
    _, (err,) = _errors(diff, S.heun, [81], "logsnr", heun=True)
    assert err < 0.6 * base


def test_float32_runs_stay_close_to_float64():
    """Cosine schedule, 20 logsnr times (logSNR step 0.78): along the whole trajectory every deterministic method
    in float32 stays within 1e-5 of its float64 run (measured <= 3.4e-6) and returns float32. iPNDM's fixed AB4
    weights are unstable there (h J ~ -0.54 is outside AB4's interval (-0.3, 0)): the rounding grows ~2x per step
    to 2.4e-3."""
    diff = GaussianDiffusion.from_schedule("cosine", 1000)
    model, x, ts = DATA.model(diff), _noise((64, 1, 4, 4)), sampling_times(diff, "logsnr", 20)

    def gap(fn, **options):
        states = {torch.float32: [], F64: []}
        for dtype, seen in states.items():
            out = fn(diff, model, x.to(dtype), ts, callback=lambda i, x_i, x0, seen=seen: seen.append(x_i), **options)
            assert out.dtype == dtype
        return max((a.double() - b).abs().max().item() for a, b in zip(*states.values()))

    for name, fn in DETERMINISTIC.items():
        assert gap(fn) < 1e-5, name
    assert gap(S.ipndm, variable_step=False) > 1e-4


# --------------------------------------------------------------------------- identities with DDIM
@pytest.mark.parametrize("spacing", ["ddim", "logsnr"])
def test_first_order_methods_are_ddim(spacing):
    """Euler in (x / alpha, sigma) and iPNDM of order 1 are DDIM's update; Euler ancestral with eta = 1 is
    DDIM eta = 1 (= DDPM with beta-tilde) on the same grid, draw for draw."""
    diff = GaussianDiffusion.from_schedule("linear", 1000)
    model = DATA.model(diff)
    x_T, ts = _noise((4, 1, 3, 3)), sampling_times(diff, spacing, 10)
    ref = ddim_sample(diff, model, x_T, ts, clip_denoised=False)
    for out in (S.euler(diff, model, x_T, ts, clip_denoised=False), S.ipndm(diff, model, x_T, ts, max_order=1)):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    ref = ddim_sample(diff, model, x_T, ts, eta=1.0, clip_denoised=False, generator=_gen())
    out = S.euler_ancestral(diff, model, x_T, ts, clip_denoised=False, generator=_gen())
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_adams_bashforth_weights_on_a_uniform_grid():
    for p, fixed in S.AB_COEFFICIENTS.items():
        s = [10.0 + 0.5 * k for k in range(p)]  # newest first (sigma decreases as sampling goes on)
        assert S.adams_bashforth_coefficients(s, s[0] - 0.5) == pytest.approx(fixed, abs=1e-12)


def test_nfe_and_callback_indices():
    diff = GaussianDiffusion.from_schedule("linear", 100)
    data_model = DATA.model(diff)
    calls = []

    def model(x, t, **kw):
        calls.append(t[0].item())
        return data_model(x, t, **kw)

    ts, seen = sampling_times(diff, "karras", 7), []
    for name, fn in {**DETERMINISTIC, **STOCHASTIC}.items():
        calls.clear()
        seen.clear()
        out = fn(diff, model, _noise((2, 1, 2, 2)), ts, generator=_gen(), callback=lambda *a: seen.append(a))
        method = "ddim" if name.startswith("ddim") else name
        assert len(calls) == get_method(method).nfe(7), name
        assert calls[0] == pytest.approx(ts[-1]) and calls[-1] == pytest.approx(ts[0])
        # callback(i, new state, x0_hat at t_i) with i = 6 .. 0; the result is x0_hat at t_0
        assert [a[0] for a in seen] == list(range(6, -1, -1)), name
        assert torch.equal(seen[-1][1], out) and torch.equal(seen[-1][2], out), name
    assert get_method("heun").nfe(10) == 19 and get_method("unipc").nfe(10) == 10


# --------------------------------------------------------------------------- stochastic samplers
def _chain_law(process, mu, s):
    """Exact (mean, variance) per pixel of DDPM's beta-tilde chain on `process` for x0 ~ N(mu, s^2), x_T ~ N(0, 1):
    each step is affine in x_t (E[x0 | x_t] = mu + k (x_t - sqrt(a) mu)) plus independent noise."""
    m, v = 0.0, 1.0
    for t in range(process.num_timesteps - 1, -1, -1):
        a = process.alphas_cumprod[t].item()
        k = s**2 * math.sqrt(a) / (a * s**2 + 1 - a)
        c1, c2 = process.posterior_mean_coef1[t].item(), process.posterior_mean_coef2[t].item()
        m, v = (c1 * k + c2) * m + c1 * (mu - k * math.sqrt(a) * mu), (c1 * k + c2) ** 2 * v
        v += process.posterior_variance[t].item() if t > 0 else 0.0
    return m, v


def test_stochastic_samplers_reproduce_the_data_law():
    """4,000 x 16 pixels. ddpm (all 1000 steps), ddim eta=1 (500 even steps) and euler_ancestral (500 logsnr times)
    are the same beta-tilde chain on their grids, whose exact output law is computed by `_chain_law`: its
    variance is low by 0.0039 / 0.0074 / 0.0049 (1.6 / 3.0 / 2.0 % of s^2 = 0.25; first order in the step),
    the mean by 1e-6. The samples must match that law within 4 standard errors and the data within 4 se + bias."""
    diff = GaussianDiffusion.from_schedule("linear", 1000)
    model, x_T = DATA.model(diff), _noise((4000, 1, 4, 4))
    runs = {
        "ddpm": (ddpm_sample(diff, model, x_T, None, clip_denoised=False, generator=_gen()), diff),
        "ddim_eta1": (
            ddim_sample(diff, model, x_T, "500", eta=1.0, clip_denoised=False, generator=_gen()),
            diff.respace(space_timesteps(1000, "500")),
        ),
        "euler_ancestral": (
            S.euler_ancestral(
                diff, model, x_T, sampling_times(diff, "logsnr", 500), generator=_gen(), clip_denoised=False
            ),
            diff.respace(sampling_times(diff, "logsnr", 500)),
        ),
    }
    n, s2 = x_T.numel(), DATA.s**2
    se_mean, se_var = DATA.s / math.sqrt(n), s2 * math.sqrt(2 / (n - 1))
    for name, (x, process) in runs.items():
        m, v = _chain_law(process, DATA.mu, DATA.s)
        assert abs(m - DATA.mu) < 1e-4 and abs(v - s2) < 0.035 * s2, (name, m, v)
        assert abs(x.mean().item() - m) < 4 * se_mean and abs(x.var().item() - v) < 4 * se_var, name
        assert abs(x.mean().item() - DATA.mu) < 4 * se_mean
        assert abs(x.var().item() - s2) < 4 * se_var + abs(v - s2)


def test_heun_with_churn_samples_the_data_law():
    """Karras Alg. 2 (s_churn = 10: gamma = 0.05 per step) with 200 Heun steps on the logsnr grid. Measured on
    16,000 x 16 pixels: variance +9.6 / +3.2 / -0.4 se at 50 / 100 / 200 steps (Euler with the same churn: -18 se
    at 200 steps, the churn jump is not O(h)). Same generator, same draws."""
    diff = GaussianDiffusion.from_schedule("linear", 1000)
    model, x_T, ts = DATA.model(diff), _noise((4000, 1, 4, 4)), sampling_times(diff, "logsnr", 200)
    x = S.heun(diff, model, x_T, ts, s_churn=10.0, generator=_gen(), clip_denoised=False)
    n, s2 = x.numel(), DATA.s**2
    assert abs(x.mean().item() - DATA.mu) < 4 * DATA.s / math.sqrt(n)
    assert abs(x.var().item() - s2) < 4 * s2 * math.sqrt(2 / (n - 1))
    assert not torch.equal(x, S.heun(diff, model, x_T, ts, clip_denoised=False))
    assert torch.equal(
        S.heun(diff, model, x_T[:8], ts[:20], s_churn=10.0, generator=_gen(5)),
        S.heun(diff, model, x_T[:8], ts[:20], s_churn=10.0, generator=_gen(5)),
    )


# --------------------------------------------------------------------------- parameterizations and guidance
def test_every_method_agrees_across_eps_x0_v_and_learned_range():
    base = GaussianDiffusion.from_schedule("cosine", 1000)
    x_T, ts = _noise((3, 1, 4, 4)), sampling_times(base, "logsnr", 12)
    outs = {}
    for mean_type in ("eps", "x0", "v"):
        for var_type in ("fixed_small", "learned_range"):
            diff = GaussianDiffusion(base.betas, mean_type=mean_type, var_type=var_type)
            model = DATA.model(diff, mean_type, learn_sigma=var_type == "learned_range")
            for name, fn in {**DETERMINISTIC, **STOCHASTIC}.items():
                outs.setdefault(name, []).append(fn(diff, model, x_T, ts, clip_denoised=False, generator=_gen()))
            if var_type == "fixed_small":  # ddpm's variance would come from the (zero) learned channels
                outs.setdefault("ddpm", []).append(
                    ddpm_sample(diff, model, x_T, ts, clip_denoised=False, generator=_gen())
                )
    for name, results in outs.items():
        for out in results[1:]:
            torch.testing.assert_close(out, results[0], rtol=0, atol=1e-6, msg=name)


class _ClassGaussian:
    """Class-conditional exact eps model: x0 | y ~ N(mu_y, 0.5^2); label 3 is the null label."""

    def __init__(self, diffusion):
        self.diffusion, self.mus = diffusion, torch.tensor([-0.4, 0.1, 0.5, 0.0], dtype=F64)

    def __call__(self, x, t, y):
        a = self.diffusion.alpha_bar_at(t.to(F64)).reshape(-1, 1, 1, 1)
        mu = self.mus[y].reshape(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * 0.25 + 1 - a)


def test_guidance_scale_one_is_bit_exact_for_every_method():
    diff = GaussianDiffusion.from_schedule("linear", 1000)
    model, y = _ClassGaussian(diff), torch.tensor([0, 1, 2])
    x_T, ts = _noise((3, 1, 2, 2)), sampling_times(diff, "karras", 8)
    methods = {**DETERMINISTIC, **STOCHASTIC, "ddpm": ddpm_sample}
    for name, fn in methods.items():
        plain = fn(diff, model, x_T, ts, model_kwargs={"y": y}, generator=_gen())
        guided = fn(diff, ClassifierFreeGuidance(model, 1.0, 3), x_T, ts, model_kwargs={"y": y}, generator=_gen())
        assert torch.equal(plain, guided), name
        other = fn(diff, ClassifierFreeGuidance(model, 3.0, 3), x_T, ts, model_kwargs={"y": y}, generator=_gen())
        assert not torch.allclose(plain, other), name


# --------------------------------------------------------------------------- a multimodal target
def test_ode_solvers_map_noise_onto_the_points():
    """Four points in 16 dims blurred by s = 0.02: with 100 steps every ODE solver lands each sample next to a
    point (the final x0_hat at sigma(0) = 0.01 is at typical distance ~0.07 = s^2/sqrt(s^2+sigma^2) sqrt(16)),
    and the four modes get ~1/4 of the samples each (binomial sd 9.8 of 128)."""
    diff = GaussianDiffusion.from_schedule("linear", 1000)
    points = torch.tensor([[1, 1, -1, -1], [1, -1, 1, -1], [-1, 1, 1, -1], [0.5, 0.5, 0.5, 0.5]], dtype=F64)
    data = PointMixture(points.repeat_interleave(4, 1).reshape(4, 1, 4, 4) * 0.6, s=0.02)
    model, x_T = data.model(diff), _noise((512, 1, 4, 4), seed=3)
    for name, fn in DETERMINISTIC.items():
        out = fn(diff, model, x_T, sampling_times(diff, "logsnr", 100), clip_denoised=False)
        idx, dist = data.nearest(out)
        assert dist.max().item() < 0.2 and dist.median().item() < 0.1, (name, dist.max().item())
        assert (torch.bincount(idx, minlength=4) - 128).abs().max().item() < 45, name


# --------------------------------------------------------------------------- inversion
def test_ode_invert_order_one_is_ddim_invert_and_higher_orders_reconstruct():
    """Linear, logsnr, 20 times (measured): RMS error of the latent against the exact flow of x0 from alpha_bar = 1
    0.12 / 0.015 / 0.0023 for orders 1 / 2 / 3, and of the round trip (invert, then ddim / dpmpp_2m / dpmpp_3m on
    the same times) 0.11 / 5.1e-4 / 5.0e-4."""
    diff = GaussianDiffusion.from_schedule("linear", 1000)
    model, ts = DATA.model(diff), sampling_times(diff, "logsnr", 20)
    x0 = DATA.sample(64, (1, 4, 4), _gen(0))
    torch.testing.assert_close(S.ode_invert(diff, model, x0, ts, order=1), ddim_invert(diff, model, x0, ts))
    exact = DATA.ode_flow(x0, 1.0, diff.alpha_bar_at(ts[-1]))
    samplers = {1: _ddim(0.0), 2: S.dpmpp_2m, 3: lambda *a, **k: S.dpmpp_3m(*a, d2_weight="taylor", **k)}
    latent, round_trip = {}, {}
    for order, sample in samplers.items():  # third order needs the Taylor D2 weight (the default is published)
        z = S.ode_invert(diff, model, x0, ts, order=order, d2_weight="taylor")
        latent[order] = (z - exact).pow(2).mean().sqrt().item()
        round_trip[order] = (sample(diff, model, z, ts, clip_denoised=False) - x0).pow(2).mean().sqrt().item()
    assert latent[2] < 0.2 * latent[1] and latent[3] < 0.3 * latent[2], latent
    assert round_trip[1] > 0.05 and max(round_trip[2], round_trip[3]) < 1e-3, round_trip


# --------------------------------------------------------------------------- continuous-time view
def test_sigma_table_round_trips_and_interpolates_log_sigma():
    diff = GaussianDiffusion.from_schedule("cosine", 1000)
    t = torch.arange(1000, dtype=F64)
    assert torch.equal(diff.sigma_at(t), diff.sigmas) and torch.equal(diff.alpha_bar_at(t), diff.alphas_cumprod)
    assert torch.equal(diff.t_at_sigma(diff.sigmas), t) and torch.equal(diff.model_time(t), t)
    tf = torch.rand(1000, generator=_gen(), dtype=F64) * 999
    torch.testing.assert_close(diff.t_at_sigma(diff.sigma_at(tf)), tf, rtol=0, atol=1e-9)
    assert diff.sigma_at(10.25).item() == pytest.approx(
        math.exp(0.75 * math.log(diff.sigmas[10]) + 0.25 * math.log(diff.sigmas[11])), rel=1e-12
    )
    assert diff.alpha_bar_at(10.25).item() == pytest.approx(1 / (1 + diff.sigma_at(10.25).item() ** 2), rel=1e-12)
    assert diff.t_at_sigma(1e-9).item() == 0 and diff.t_at_sigma(1e9).item() == 999


def test_denoise_matches_p_mean_variance_and_the_exact_posterior():
    base = GaussianDiffusion.from_schedule("linear", 1000)
    x = _noise((3, 1, 4, 4))
    for mean_type in ("eps", "x0", "v"):
        diff = GaussianDiffusion(base.betas, mean_type=mean_type)
        model = DATA.model(diff, mean_type)
        for clip in (False, True):
            t = torch.tensor([0, 400, 999])
            out = diff.p_mean_variance(model, x, t, clip_denoised=clip)
            x0, eps = diff.denoise(model, x, t, clip_denoised=clip)
            torch.testing.assert_close(x0, out["pred_x0"], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(eps, out["eps"], rtol=1e-10, atol=1e-10)
        x0, eps = diff.denoise(model, x, 123.4)  # fractional: the exact posterior mean at alpha_bar_at(123.4)
        a = diff.alpha_bar_at(123.4)
        torch.testing.assert_close(x0, DATA.denoise(x, a), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eps, DATA.eps(x, a), rtol=1e-10, atol=1e-10)


def test_model_sees_whole_times_as_int64_and_respaced_times_mapped_back():
    diff = GaussianDiffusion.from_schedule("linear", 100)
    seen = []

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    diff.denoise(model, torch.zeros(2, 1, 2, 2), 7)
    diff.denoise(model, torch.zeros(2, 1, 2, 2, dtype=F64), 7.5)
    diff.respace([0, 50, 99]).denoise(model, torch.zeros(2, 1, 2, 2), 1.5)
    assert seen[0].dtype == torch.long and seen[0].tolist() == [7, 7]
    assert seen[1].dtype == F64 and seen[1].tolist() == [7.5, 7.5]
    assert seen[2].tolist() == [74.5, 74.5]


def test_zero_terminal_snr_is_finite_for_the_data_prediction_methods():
    """alpha_bar_{T-1} = 0: sigma = inf there, a v-model gives x0 = -v, eps = x_t; DPM-Solver++ / UniPC start
    from lambda = -inf with a first-order step; so do the VE methods (refused only with churn)."""
    betas = get_betas("linear", 1000).clone()
    betas[-1] = 1.0
    diff = GaussianDiffusion(betas, mean_type="v")
    assert diff.sigma_at(999).item() == math.inf and diff.alpha_bar_at(999).item() == 0.0
    assert diff.t_at_sigma(math.inf).item() == 999
    x = _noise((64, 1, 2, 2))
    x0, eps = diff.denoise(lambda x, t: 0.3 * x, x, 999)
    torch.testing.assert_close(x0, -0.3 * x)
    torch.testing.assert_close(eps, x)
    ts = sampling_times(diff, "logsnr", 50)
    assert ts[-1] == 999 and ts[-2] == 998 and len(ts) == 50
    model, a0 = DATA.model(diff, "v"), diff.alpha_bar_at(0)
    ref = DATA.denoise(DATA.ode_flow(x, 0.0, a0), a0)  # the exact flow from pure noise (a = 0)
    for fn in (S.dpmpp_2m, S.dpmpp_3m, S.unipc):  # max errors 3.9e-3, 1.3e-4, 6.3e-5 (64 samples)
        out = fn(diff, model, x, ts, clip_denoised=False)
        assert torch.isfinite(out).all() and (out - ref).abs().max().item() < 0.01
    # the VE methods take their first step from sigma / alpha = inf in its finite limit form (issue 43); Heun's
    # trapezoid there (max errors 8.0e-3 for Heun at NFE 99, iPNDM 2.6e-3; DDIM 7.3e-2)
    for fn in (S.heun, S.ipndm):
        out = fn(diff, model, x, ts, clip_denoised=False)
        assert torch.isfinite(out).all() and (out - ref).abs().max().item() < 0.02, fn.__name__
    with pytest.raises(ValueError, match="sampler.method=heun"):
        S.heun(diff, model, x, ts, s_churn=1.0, s_tmax=math.inf)


# --------------------------------------------------------------------------- time grids and respacing
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sampling_times(schedule):
    diff = GaussianDiffusion.from_schedule(schedule, 1000)
    for steps in (2, 10, 37, 2000):
        for spacing in ("logsnr", "karras"):
            ts = sampling_times(diff, spacing, steps)
            assert len(ts) == steps and ts[0] == 0.0 and ts[-1] == 999.0
            assert all(b > a for a, b in zip(ts, ts[1:]))
        lam = -diff.sigma_at(torch.tensor(sampling_times(diff, "logsnr", steps), dtype=F64)).log()
        torch.testing.assert_close(lam.diff(), torch.full_like(lam.diff(), lam.diff().mean().item()), rtol=1e-8, atol=0)
        sig = diff.sigma_at(torch.tensor(sampling_times(diff, "karras", steps), dtype=F64)).flip(0)
        torch.testing.assert_close(
            sig, karras_sigmas(diff.sigmas[0].item(), diff.sigmas[-1].item(), steps), rtol=1e-9, atol=0
        )
    assert sampling_times(diff, "ddim", 50) == space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert sampling_times(diff, "trailing", 10) == space_timesteps(1000, "trailing10")
    assert sampling_times(diff, "even", 1000) == list(range(1000))
    with pytest.raises(ValueError, match="sampler.spacing='cubic'"):
        sampling_times(diff, "cubic", 10)
    with pytest.raises(ValueError, match="sampler.steps=1 "):
        sampling_times(diff, "karras", 1)
    with pytest.raises(ValueError, match="sampler.steps=1001"):
        sampling_times(diff, "ddim", 1001)


def test_fractional_respace():
    diff = GaussianDiffusion.from_schedule("linear", 1000)
    ts = sampling_times(diff, "logsnr", 9)
    sub = diff.respace(ts)
    torch.testing.assert_close(sub.alphas_cumprod, diff.alpha_bar_at(torch.tensor(ts, dtype=F64)), rtol=1e-12, atol=0)
    assert sub.timestep_map.dtype == F64 and torch.equal(sub.timestep_map, diff.model_time(torch.tensor(ts, dtype=F64)))
    kept = [0, 10, 500, 999]  # whole numbers, as ints or floats: the integer result, bit for bit
    ints, floats = diff.respace(kept), diff.respace([float(k) for k in kept])
    acp = diff.alphas_cumprod[kept]
    assert torch.equal(ints.betas, 1 - acp / torch.cat([torch.ones(1, dtype=F64), acp[:-1]]))
    assert torch.equal(ints.betas, floats.betas) and torch.equal(ints.timestep_map, floats.timestep_map)
    assert ints.timestep_map.dtype == torch.long
    # DDIM runs on the fractional process and equals euler on the same times
    model, x_T = DATA.model(diff), _noise((2, 1, 2, 2))
    torch.testing.assert_close(
        ddim_sample(diff, model, x_T, ts, clip_denoised=False), S.euler(diff, model, x_T, ts, clip_denoised=False)
    )
    with pytest.raises(ValueError, match="distinct times"):
        diff.respace([0.5, 0.5, 3.0])


def test_bad_options_raise_clear_errors():
    diff = GaussianDiffusion.from_schedule("linear", 100)
    model, x = DATA.model(diff), _noise((1, 1, 2, 2))
    with pytest.raises(ValueError, match="sampler.order=5"):
        S.unipc(diff, model, x, [0, 50, 99], order=5)
    with pytest.raises(ValueError, match="sampler.max_order=0"):
        S.ipndm(diff, model, x, [0, 50, 99], max_order=0)
    with pytest.raises(ValueError, match="strictly ascending"):
        S.dpmpp_2m(diff, model, x, [99, 50, 0])
    with pytest.raises(ValueError, match="sampler.method='plms' is unknown"):
        get_method("plms")


# --------------------------------------------------------------------------- the network at fractional times
def test_unet_is_continuous_in_t():
    from diffusion_lab.nets import UNet

    torch.manual_seed(0)
    net = UNet(
        image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=()
    ).eval()
    for p in net.parameters():  # the output convolutions are zero-initialised: make t matter
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 1, 8, 8)

    def f(t):
        with torch.no_grad():
            return net(x, torch.full((2,), t))

    assert torch.equal(f(300), f(300.0))  # int64 and float times are the same embedding
    ratios = []
    for h in (1.0, 0.25):  # midpoint residual / step: O(h^2) / O(h), so it shrinks with h
        mid, step = f(300 + h / 2) - (f(300.0) + f(300 + h)) / 2, f(300 + h) - f(300.0)
        ratios.append((mid.norm() / step.norm()).item())
    assert ratios[0] < 0.25 and ratios[1] < 0.4 * ratios[0]  # measured 0.171 and 0.034


def test_final_steps_lower_their_order_as_diffusers_does():
    """lower_order_final counts the final jump to the x0 prediction as a step, as diffusers' schedulers do: UniPC
    lowers at every N (its last ODE step at most second order), DPM-Solver++ below 15 steps (3M's last ODE step
    second order, 2M never lowered); "early" lowers one step earlier (the rule before 2026-12); False never."""
    diff = GaussianDiffusion.from_schedule("cosine", 1000)
    g = S._grid(diff, sampling_times(diff, "ddim", 20))
    last = (g.n - 4, g.n - 3, g.n - 2)  # the last ODE steps; j = n - 1 is the jump
    assert [S._order(j, g, 3, True, None) for j in last] == [3, 3, 2]  # UniPC
    assert [S._order(j, g, 3, "early", None) for j in last] == [3, 2, 1]
    assert [S._order(j, g, 3, False, None) for j in last] == [3, 3, 3]
    assert [S._order(j, g, 3, True, S.DPMPP_FINAL_BELOW) for j in last] == [3, 3, 3]  # 20 steps: no lowering
    g10 = S._grid(diff, sampling_times(diff, "ddim", 10))
    assert [S._order(j, g10, 3, True, S.DPMPP_FINAL_BELOW) for j in (6, 7, 8)] == [3, 3, 2]
    assert [S._order(j, g10, 2, True, S.DPMPP_FINAL_BELOW) for j in (7, 8)] == [2, 2]
    assert [S._order(j, g10, 2, "early", S.DPMPP_FINAL_BELOW) for j in (7, 8)] == [2, 1]
    model, x = DATA.model(diff), _noise((8, 1, 2, 2))
    ts = sampling_times(diff, "ddim", 20)
    for rule in ("early", False):  # each rule reaches the sampler
        default = S.unipc(diff, model, x, ts, order=3)
        assert not torch.allclose(default, S.unipc(diff, model, x, ts, order=3, lower_order_final=rule))
