"""EDM and flow matching as processes beside DDPM (diffusion/continuous.py): the papers' formulas, the losses, the
training distributions, and the solvers on exact models of every process (closed forms, orders, one answer)."""

import csv
import math

import pytest
import torch

from diffusion_lab.diffusion import GaussianDiffusion
from diffusion_lab.diffusion import solvers as S
from diffusion_lab.diffusion.analytic import GaussianData, PointMixture
from diffusion_lab.diffusion.continuous import EDM, Flow, logit_normal_pdf, sd3_shift
from diffusion_lab.diffusion.respace import sampling_times

F64 = torch.float64
DATA = GaussianData(mu=0.1, s=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _processes():
    return {
        "vp": GaussianDiffusion.from_schedule("linear", 1000, mean_type="v"),
        "edm": EDM(),
        "flow": Flow(),
        "flow_shift3_x0": Flow(mean_type="x0", shift=3.0),
        "vp_edm": GaussianDiffusion.from_schedule("cosine", 1000, mean_type="edm"),  # EDM's F on the VP path
    }


# --------------------------------------------------------------------------- EDM (Karras et al. 2022, Table 1)
@pytest.mark.parametrize("sigma", [0.002, 0.3, 1.0, 17.0, 80.0])
def test_edm_preconditioning_and_weight_are_table_1(sigma):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with Table 1's coefficients, and the loss weight lambda."""
    process, sd = EDM(), 0.5
    root = math.sqrt(sigma**2 + sd**2)
    c_skip, c_out, c_in = sd**2 / (sigma**2 + sd**2), sigma * sd / root, 1 / root
    seen = {}

    def net(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.tanh(x_in) + 0.1 * t.reshape(-1, 1, 1, 1)  # any F

    x = _randn(2, 1, 3, 3)
    t = process.t_at_sigma(sigma)
    x0, eps = process.denoise(net, x, float(t))
    torch.testing.assert_close(seen["x_in"], c_in * x, rtol=1e-12, atol=0)
    torch.testing.assert_close(seen["t"], torch.full((2,), math.log(sigma) / 4, dtype=F64), rtol=1e-12, atol=1e-15)
    F = torch.tanh(c_in * x) + 0.1 * math.log(sigma) / 4
    torch.testing.assert_close(x0, c_skip * x + c_out * F, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eps, (x - x0) / sigma, rtol=1e-10, atol=1e-10)
    assert process.param.coefficients(sigma)[:3] == pytest.approx((c_skip, c_out, c_in), rel=1e-14)
    assert process.param.loss_weight(sigma) == pytest.approx((sigma**2 + sd**2) / (sigma * sd) ** 2, rel=1e-14)


def test_edm_loss_is_lambda_times_the_denoiser_error():
    """training_losses at given sigmas equals lambda(sigma) |D - x0|^2 (EDM eq. 2 and Table 1), computed directly."""
    process = EDM()
    x0, noise = _randn(4, 1, 3, 3, seed=1).clamp(-1, 1), _randn(4, 1, 3, 3, seed=2)
    sigma = torch.tensor([0.01, 0.5, 3.0, 60.0], dtype=F64)

    def net(x_in, t):
        return 0.3 * x_in - 0.2

    losses = process.training_losses(net, x0, sigma, noise)
    s = sigma.reshape(-1, 1, 1, 1)
    x = x0 + s * noise
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    D = c_skip * x + c_out * (0.3 * c_in * x - 0.2)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(losses["loss"], lam * (D - x0).pow(2).mean((1, 2, 3)), rtol=1e-10, atol=0)


def test_edm_training_sigmas_are_lognormal():
    """ln sigma ~ N(P_mean = -1.2, P_std = 1.2): the sample moments of 200,000 draws (standard errors ~0.003)."""
    ln = EDM().sample_u(200_000, torch.Generator().manual_seed(0)).log()
    assert ln.mean().item() == pytest.approx(-1.2, abs=0.012) and ln.std().item() == pytest.approx(1.2, abs=0.012)


def test_edm_karras_grid_is_eq_5():
    """spacing=karras on EDM visits sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    process, n = EDM(), 18
    sig = process.sigma_at(torch.tensor(sampling_times(process, "karras", n), dtype=F64)).flip(0)
    i = torch.arange(n, dtype=F64)
    ref = (80 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sig, ref, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- flow matching
def test_flow_loss_is_the_velocity_mse():
    process = Flow()
    x0, noise = _randn(3, 1, 4, 4, seed=3), _randn(3, 1, 4, 4, seed=4)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    delta = _randn(3, 1, 4, 4, seed=5) * 0.1

    def net(x_in, model_t):  # the true velocity plus delta, reading t back from the network time 1000 t
        tt = (model_t / 1000).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(x_in, (1 - tt) * x0 + tt * noise)
        return noise - x0 + delta

    losses = process.training_losses(net, x0, t, noise)
    torch.testing.assert_close(losses["loss"], delta.pow(2).mean((1, 2, 3)), rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["mse"], losses["loss"])


@pytest.mark.parametrize("t", [0.2, 0.7])
def test_flow_marginal_of_gaussian_data(t):
    """x_t = (1 - t) x0 + t eps with x0 ~ N(mu, s^2): N((1 - t) mu, (1 - t)^2 s^2 + t^2) (400,000 draws)."""
    n, g = 400_000, torch.Generator().manual_seed(0)
    x0 = DATA.sample(n, (1,), g)
    x_t = Flow().q_sample(x0, torch.full((n,), t, dtype=F64), torch.randn(n, 1, generator=g, dtype=F64))
    var = (1 - t) ** 2 * DATA.s**2 + t**2
    assert x_t.mean().item() == pytest.approx((1 - t) * DATA.mu, abs=4 * math.sqrt(var / n))
    assert x_t.var().item() == pytest.approx(var, rel=4 * math.sqrt(2 / n))


def test_logit_normal_density_and_draws():
    """The density integrates to 1 and the histogram of 200,000 draws of t = sigmoid(N(m, s^2)) follows it."""
    m, s = 0.5, 0.8
    grid = torch.linspace(1e-6, 1 - 1e-6, 200_001, dtype=F64)
    assert torch.trapezoid(logit_normal_pdf(grid, m, s), grid).item() == pytest.approx(1.0, abs=1e-6)
    t = Flow(t_sampling="logit_normal", logit_mean=m, logit_std=s).sample_u(200_000, torch.Generator().manual_seed(0))
    edges = torch.linspace(0, 1, 21, dtype=F64)
    hist = torch.histc(t, bins=20, min=0, max=1) / (len(t) * 0.05)
    fine = torch.linspace(0, 1, 20_001, dtype=F64)[1:-1]
    pdf = logit_normal_pdf(fine, m, s)
    bin_mean = torch.stack([pdf[(fine > a) & (fine < b)].mean() for a, b in zip(edges, edges[1:])])
    assert (hist - bin_mean).abs().max().item() < 0.05, (hist, bin_mean)


def test_sd3_shift_is_eq_23_and_the_grid_follows_it():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(sd3_shift(t, 3.0), 3 * t / (1 + 2 * t))
    process = Flow(shift=3.0)
    u = process.u_at(torch.tensor(sampling_times(process, "trailing", 4), dtype=F64))
    torch.testing.assert_close(u, sd3_shift(torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=F64), 3.0), rtol=1e-12, atol=0)


def test_flow_refuses_eps_in_one_line():
    with pytest.raises(ValueError, match=r"diffusion.mean_type='eps' cannot recover x0 from pure noise"):
        Flow(mean_type="eps")


# --------------------------------------------------------------------------- every process on exact models
@pytest.mark.parametrize("data", [DATA, PointMixture(_randn(3, 1, 2, 2, seed=7).clamp(-1, 1), s=0.05)])
def test_equal_log_snr_gives_the_same_x0_on_every_process(data):
    """At one log-SNR, the exact networks of the VP, EDM and flow processes (each through its own
    parameterization and network time) denoise the same scaled state to the same x0."""
    procs = _processes()
    vp = procs.pop("vp")
    x_vp = _randn(5, 1, 2, 2, seed=8)
    for t_vp in (50.0, 400.0, 900.0):
        a_vp, s_vp = (float(v) for v in vp.alpha_sigma_at(t_vp))
        ref, _ = vp.denoise(data.model(vp), x_vp, t_vp)
        for name, p in procs.items():
            t = float(p.t_at_sigma(s_vp / a_vp))
            alpha, sigma = (float(v) for v in p.alpha_sigma_at(t))
            assert sigma / alpha == pytest.approx(s_vp / a_vp, rel=1e-9), name
            x0, _ = p.denoise(data.model(p), x_vp * alpha / a_vp, t)
            torch.testing.assert_close(x0, ref, rtol=1e-9, atol=1e-9, msg=f"{name} at VP t={t_vp}")


def _start(process, x_top_t: float, z: torch.Tensor) -> torch.Tensor:
    """The exact marginal of GaussianData at time x_top_t for the standard normal z."""
    alpha, sigma = (float(v) for v in process.alpha_sigma_at(x_top_t))
    return alpha * DATA.mu + math.sqrt(alpha**2 * DATA.s**2 + sigma**2) * z


@pytest.mark.parametrize("name", ["vp", "edm", "flow", "flow_shift3_x0", "vp_edm"])
def test_every_process_maps_the_same_noise_to_mu_plus_s_z(name):
    """Started at the exact marginal from the same z, the ODE of every process ends at x0 = mu + s z."""
    process, z = _processes()[name], _randn(64, 1, 4, 4, seed=9)
    ts = sampling_times(process, "auto", 100)
    out = S.dpmpp_2m(process, DATA.model(process), _start(process, ts[-1], z), ts, clip_denoised=False)
    exact = DATA.solution(process, _start(process, ts[-1], z), ts[-1], ts[0])  # ends with the denoiser at t_0
    assert (out - exact).pow(2).mean().sqrt().item() < 1e-3
    # The flow carries z to the marginal at t_0 exactly, and the denoiser there gives mu + s z shrunk by
    # s alpha / sqrt(alpha^2 s^2 + sigma^2) (-> 1 as t_0 -> data): mu + s z for every process.
    alpha0, sigma0 = (float(v) for v in process.alpha_sigma_at(ts[0]))
    shrink = DATA.s * alpha0 / math.sqrt(alpha0**2 * DATA.s**2 + sigma0**2)
    torch.testing.assert_close(exact, DATA.mu + DATA.s * z * shrink, rtol=1e-9, atol=1e-9)


def _slope(nfes, errs):
    lx, ly = [math.log(n) for n in nfes], [math.log(e) for e in errs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return -sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


ORDERS = [  # (method, options, order): each method's own order (lower_order_final off for UniPC)
    ("ddim", {"eta": 0.0}, 1),
    ("euler", {}, 1),
    ("heun", {}, 2),
    ("dpmpp_2m", {}, 2),
    ("unipc", {"order": 2, "lower_order_final": False}, 3),
]


@pytest.mark.parametrize("name", ["edm", "flow", "vp_edm"])
@pytest.mark.parametrize("method,options,order", ORDERS)
def test_solvers_converge_at_their_order_on_every_process(name, method, options, order):
    """RMS error against the exact flow (analytic.solution) over NFE ~40-160 on the karras grid, both processes.
    Flow starts below t_f = 1 for the VE methods (Euler, Heun need a finite sigma / alpha)."""
    process, z = _processes()[name], _randn(32, 1, 4, 4, seed=10)
    fn, heun = getattr(S, method), method == "heun"
    nfes, errs = [], []
    for n in (40, 80, 160):
        steps = (n + 1) // 2 if heun else n
        ts = sampling_times(process, "karras", steps + 1)
        ts = ts[:-1] if math.isinf(float(process.sigma_at(ts[-1]))) and method in ("euler", "heun") else ts[1:]
        x_T = _start(process, ts[-1], z)
        out = fn(process, DATA.model(process), x_T, ts, clip_denoised=False, **options)
        errs.append((out - DATA.solution(process, x_T, ts[-1], ts[0])).pow(2).mean().sqrt().item())
        nfes.append(2 * len(ts) - 1 if heun else len(ts))
    assert _slope(nfes, errs) == pytest.approx(order, abs=0.35), (nfes, errs)


# --------------------------------------------------------------------------- train.py, checkpoints, resume
def _weights(ckpt):
    c = torch.load(ckpt, weights_only=True)
    return c["global_step"], {**c["state_dict"], **{f"ema.{k}": v for k, v in c["current_model_state"].items()}}


@pytest.mark.parametrize("process", ["edm", "flow"])
def test_train_sample_and_resume_exactly(tmp_path, process):
    """diffusion=edm / flow through train.py: finite losses, a checkpoint that rebuilds the model as data and
    samples finite images, and a run stopped mid-epoch and resumed equal to the uninterrupted one bit for bit."""
    from conftest import FAST, compose_train

    from diffusion_lab.tasks import load_module, train

    run = [*FAST, f"diffusion={process}", "trainer.max_steps=-1", "trainer.limit_train_batches=4", "data.batch_size=16",
           "logger=none", "callbacks.sample_grid.every_n_epochs=100", "trainer.max_epochs=100"]  # fmt: skip
    metrics = train(compose_train([*run, "trainer.max_steps=6"], tmp_path / "full"))
    assert math.isfinite(metrics["train/loss_step"])
    train(compose_train([*run, "trainer.max_steps=3"], tmp_path / "part"))
    train(compose_train([*run, "trainer.max_steps=6", "ckpt_path=last"], tmp_path / "part"))
    (step_a, a), (step_b, b) = (_weights(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("full", "part"))
    assert step_a == step_b == 6 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    ckpt = tmp_path / "full" / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    assert type(module.diffusion).__name__ == {"edm": "EDM", "flow": "Flow"}[process]
    x = module.sample(3, seed=0)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    # evaluate.py with its defaults otherwise: the run's own sampler (sampler=run: Heun / Euler, which the
    # diffusion choice set for training), no DDPM reference row and no bits/dim (the discrete process's)
    from diffusion_lab.tasks import evaluate

    method = module.diffusion.default_method
    overrides = [f"ckpt_path={ckpt}", "grid.nfe=[3]", "num_samples=8", "fid.reference_split=val",
                 "fid.num_reference=32"]  # fmt: skip
    evaluate(compose_train(overrides, tmp_path / "eval", "evaluate"))
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    assert [r["role"] for r in rows] == ["curve"] and rows[0]["sampler"] == f"{method}{2 if method == 'heun' else 3}"
    assert float(rows[0]["fid"]) > 0
    assert "Bits/dim" not in (tmp_path / "eval" / "results.md").read_text()


def test_sample_and_evaluate_default_to_the_runs_own_sampler():
    """sampler=run (sample.py's and evaluate.py's default): the checkpoint's sampler node with the keys set on the
    command line on top; one budget (a given steps or nfe replaces the run's); under an evaluate grid the run's
    steps give way to grid.nfe; a run config without a sampler node gets its process's default method."""
    from omegaconf import OmegaConf

    from diffusion_lab.config import ConfigError, validate_sampler
    from diffusion_lab.tasks import _run_sampler

    edm = EDM()
    run = OmegaConf.create({"sampler": {"_target_": "diffusion_lab.diffusion.Sampler", "method": "heun", "steps": 18,
                                        "spacing": "karras", "s_churn": None}})
    given = OmegaConf.create({"method": None, "steps": None, "nfe": None, "s_churn": None, "eta": None})

    def built(given_keys, grid=False):
        node = _run_sampler(run, edm, OmegaConf.merge(given, given_keys), under_grid=grid)
        return validate_sampler(node, "sampler", edm, conditional=False) if not grid else OmegaConf.to_container(node)

    assert built({}).name == "heun18_karras"
    assert built({"s_churn": 10.0}).name == "heun18_s_churn10_karras"
    assert built({"nfe": 9}).name == "heun5_karras"
    assert "steps" not in built({}, grid=True) and built({}, grid=True)["spacing"] == "karras"
    assert built({"steps": 4}, grid=True)["steps"] == 4
    with pytest.raises(ConfigError, match="eta"):  # an option Heun does not take
        built({"eta": 1.0})
    bare = _run_sampler(OmegaConf.create({}), edm, given, under_grid=False)
    assert validate_sampler(bare, "sampler", edm, conditional=False).method.name == edm.default_method
    with pytest.raises(ConfigError, match=r"sampler.method is null \(sampler=run"):  # train.py has no run to read
        validate_sampler(given, "sampler", edm, conditional=False)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["diffusion=edm", "timesteps=loss_aware"], "draws the integer steps of diffusion=ddpm/iddpm"),
        (["timesteps=own"], "timesteps=own needs a continuous process"),
        (["diffusion=flow", "sampler=ddpm"], "sampler.method=ddpm runs on the steps of diffusion=ddpm/iddpm"),
        (["experiment=mnist_cpu", "diffusion=edm"], "diffusion.schedule is not a key of diffusion_lab.diffusion.EDM"),
    ],
)
def test_process_mismatches_are_refused_in_one_line(tmp_path, overrides, message):
    from conftest import FAST, compose_train

    from diffusion_lab.config import ConfigError
    from diffusion_lab.tasks import train

    with pytest.raises((ConfigError, ValueError), match=message) as e:
        train(compose_train([*FAST, *overrides], tmp_path))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- inversion, inpainting, guidance
@pytest.mark.parametrize("name", ["edm", "flow", "vp_edm"])
def test_ode_inversion_round_trips_on_every_process(name):
    """2M inversion then 2M sampling on the same 30 logsnr times returns x0 (the VP process: 5e-4 at 20 times).
    On flow the last time (pure noise, infinite log-SNR gap) is dropped, as under zero terminal SNR."""
    from diffusion_lab.diffusion import get_method

    process, x0 = _processes()[name], DATA.sample(32, (1, 4, 4), torch.Generator().manual_seed(0))
    ts = sampling_times(process, "logsnr", 31)[:-1]
    model = DATA.model(process)
    z = get_method("dpmpp_2m").invert(process, model, x0, ts)
    back = S.dpmpp_2m(process, model, z, ts, clip_denoised=False)
    assert (back - x0).pow(2).mean().sqrt().item() < 1e-3


@pytest.mark.parametrize("name", ["edm", "flow"])
@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral"])
def test_every_method_inpaints_on_every_process(name, method):
    """paint on EDM and flow keeps the known region bit for bit and fills the rest with finite values; Heun and
    Euler ancestral start below flow's pure-noise time (they need a finite sigma / alpha)."""
    from diffusion_lab.diffusion import ImageGenerators, Sampler, paint

    process = _processes()[name]
    x0 = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    mask = torch.zeros(1, 1, 4, 4, dtype=F64)
    mask[..., :2] = 1
    ts = Sampler(method, steps=8).timesteps(process)
    if method in ("heun", "euler_ancestral") and math.isinf(float(process.sigma_at(ts[-1]))):
        ts = ts[:-1]
    out = paint(process, DATA.model(process), x0, mask, ts, method=method, clip_denoised=False,
                generator=ImageGenerators.for_images(0, range(3)))  # fmt: skip
    assert torch.equal(out[..., :2], x0[..., :2]) and torch.isfinite(out).all()
    assert not torch.allclose(out[..., 2:], x0[..., 2:])


@pytest.mark.parametrize("name", ["edm", "flow", "vp_edm"])
def test_guidance_on_any_parameterization_guides_x0_and_eps(name):
    """Classifier-free guidance mixes the network outputs; every parameterization is affine in its output with
    the same coefficients for both halves, so x0_hat and eps_hat are the same mixture of the two predictions."""
    from diffusion_lab.diffusion import ClassifierFreeGuidance

    process, x = _processes()[name], _randn(4, 1, 3, 3, seed=11)
    cond, null = GaussianData(0.3, 0.4).model(process), DATA.model(process)

    def net(x_in, t, y):
        return torch.where((y == 10).reshape(-1, 1, 1, 1), null(x_in, t), cond(x_in, t))

    y, t = torch.tensor([1, 2, 3, 4]), float(process.t_at_sigma(0.7))
    guided = process.denoise(ClassifierFreeGuidance(net, 2.5, 10), x, t, {"y": y})
    (x0_c, e_c), (x0_u, e_u) = process.denoise(cond, x, t), process.denoise(null, x, t)
    torch.testing.assert_close(guided[0], x0_u + 2.5 * (x0_c - x0_u), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(guided[1], e_u + 2.5 * (e_c - e_u), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- DDIM on every process
@pytest.mark.parametrize("schedule,mean_type", [("linear", "eps"), ("cosine", "v")])
@pytest.mark.parametrize("spacing", ["ddim", "trailing", "logsnr"])
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.0, True), (1.0, False), (1.0, True)])
def test_ddim_on_any_process_equals_the_discrete_ddim(schedule, mean_type, spacing, eta, clip):
    """solvers.ddim (alpha-sigma form, every process) equals DDIM eq. 12 written on the respaced discrete process's
    tables (p_mean_variance's x0 and eps, alphas_cumprod and alphas_cumprod_prev) on the VP process: the same noise
    per image, float64, fractional times (logsnr) included."""
    from diffusion_lab.diffusion import ImageGenerators

    diff = GaussianDiffusion.from_schedule(schedule, 1000, mean_type=mean_type)
    model, x = DATA.model(diff), _randn(6, 1, 4, 4, seed=12)
    ts = sampling_times(diff, spacing, 10)
    gens = [ImageGenerators.for_images(0, range(6)) for _ in range(2)]
    sub, ref = diff.respace(ts), x
    for i in range(len(ts) - 1, -1, -1):
        out = sub.p_mean_variance(model, ref, torch.full((6,), i), clip, None)
        a, a_prev = sub.alphas_cumprod[i].item(), sub.alphas_cumprod_prev[i].item()
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        ref = math.sqrt(a_prev) * out["pred_x0"] + math.sqrt(max(1 - a_prev - sigma**2, 0)) * out["eps"]
        ref = ref + sigma * gens[0].randn(ref.shape[1:], ref.dtype, ref.device) if eta else ref
    out = S.ddim(diff, model, x, ts, eta=eta, clip_denoised=clip, generator=gens[1])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ["edm", "flow", "vp_edm"])
def test_stochastic_ddim_samples_the_posterior_on_every_process(name):
    """DDIM eta = 1 with 200 steps from one fixed start x_T draws x0 ~ p(x0 | x_T): for Gaussian data
    N(mu + s^2 alpha (x_T - alpha mu) / v, s^2 sigma^2 / v) with v = alpha^2 s^2 + sigma^2 at the first time (the
    ODE, eta = 0, would give one point). 4,096 draws of one pixel: mean and std within ~4 standard errors."""
    process = _processes()[name]
    ts = sampling_times(process, "logsnr", 200)
    alpha, sigma = (float(v) for v in process.alpha_sigma_at(ts[-1]))
    x_T = torch.full((4096, 1, 1, 1), _start(process, ts[-1], torch.tensor(0.8)).item(), dtype=F64)
    x = S.ddim(process, DATA.model(process), x_T, ts, eta=1.0, clip_denoised=False,
               generator=torch.Generator().manual_seed(14))  # fmt: skip
    v = alpha**2 * DATA.s**2 + sigma**2
    mean, std = DATA.mu + DATA.s**2 * alpha * (x_T[0].item() - alpha * DATA.mu) / v, DATA.s * sigma / v**0.5
    assert x.mean().item() == pytest.approx(mean, abs=4 * std / 64)
    assert x.std().item() == pytest.approx(std, rel=4 / (2 * 4096) ** 0.5)


def test_euler_from_pure_noise_is_ddim():
    """On flow the first time is pure noise (alpha = 0): Euler takes DDIM's step there and after, so the two
    samplers agree from t_f = 1 (eta = 0; float64)."""
    process, x = Flow(), _randn(8, 1, 4, 4, seed=15)
    ts = sampling_times(process, "trailing", 12)
    assert math.isinf(float(process.sigma_at(ts[-1])))
    model = DATA.model(process)
    torch.testing.assert_close(S.euler(process, model, x, ts, clip_denoised=False),
                               S.ddim(process, model, x, ts, clip_denoised=False), rtol=0, atol=1e-12)  # fmt: skip


@pytest.mark.parametrize("method", ["heun", "euler_ancestral", "ipndm"])
def test_ve_methods_run_from_pure_noise(method):
    """Issue 43: Heun, Euler ancestral and iPNDM start at flow's t = 1 (pure noise, sigma / alpha infinite): they
    bind and give finite samples as near the exact ODE's at NFE 21 as DPM-Solver++(2M)'s (the ancestral one: the
    data's mean and std); with churn, which
    raises sigma / alpha, Euler and Heun are still refused in one line at bind."""
    from diffusion_lab.diffusion import Sampler

    flow, x = Flow(), _randn(256, 1, 2, 2, seed=21)
    s = Sampler(method, nfe=21).bind(flow)
    ts = s.timesteps(flow)
    assert math.isinf(float(flow.sigma_at(ts[-1])))
    out = s(flow, DATA.model(flow), x, generator=torch.Generator().manual_seed(0))
    exact = DATA.solution(flow, x, ts[-1], ts[0])
    assert torch.isfinite(out).all()
    if method == "euler_ancestral":  # a stochastic sampler: its samples have the data's law, not the ODE's map
        assert abs(out.mean().item() - DATA.mu) < 0.1 and abs(out.std().item() - DATA.s) < 0.1
    else:  # RMS errors 0.039 (Heun), 0.042 (iPNDM) where DPM-Solver++(2M) has 0.042 at NFE 21 (trailing)
        assert (out - exact).pow(2).mean().sqrt().item() < 0.06
    with pytest.raises(ValueError, match="with churn .* set sampler.s_churn=0"):
        Sampler(method if method == "heun" else "euler", steps=6, s_churn=1.0).bind(flow)
    assert Sampler(method, steps=6).bind(EDM()).steps == 6


def test_heun_on_flow_is_heun_in_the_flow_time():
    """Heun on flow equals torchdiffeq's heun2 integrating dz/du = v(z, u) over the same grid of flow times (then
    the last step to the x0 prediction, as every sampler here ends), to float64 rounding; and it converges at order
    2 against the exact ODE (log-log slope of the RMS error over NFE 41-161)."""
    from torchdiffeq import odeint

    flow, x = Flow(), _randn(16, 1, 3, 3, seed=22)
    model = DATA.model(flow)
    ts = sampling_times(flow, "trailing", 9)
    u = flow.alpha_sigma_at(torch.tensor(ts[::-1], dtype=F64))[1]  # sigma = u on flow, descending from 1

    def velocity(uu, z):
        t = flow.t_at_sigma(uu / (1 - uu)) if uu < 1 else torch.tensor(float(flow.num_timesteps - 1), dtype=F64)
        x0, eps = flow.denoise(model, z, float(t))
        return eps - x0

    z = odeint(velocity, x, u, method="heun2")[-1]
    ref, _ = flow.denoise(model, z, ts[0])
    torch.testing.assert_close(S.heun(flow, model, x, ts, clip_denoised=False), ref, rtol=0, atol=1e-12)
    errs, nfes = [], []
    for steps in (21, 41, 81):
        grid = sampling_times(flow, "trailing", steps)
        out = S.heun(flow, model, x, grid, clip_denoised=False)
        errs.append((out - DATA.solution(flow, x, grid[-1], grid[0])).pow(2).mean().sqrt().item())
        nfes.append(2 * steps - 1)
    slope = -(math.log(errs[-1]) - math.log(errs[0])) / (math.log(nfes[-1]) - math.log(nfes[0]))
    assert 1.8 < slope < 2.3, (errs, slope)


@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_flow_objective_is_the_velocity_mse_for_any_target(mean_type):
    """Flow's loss weight turns another target's MSE into the velocity MSE: the same network function gives the
    same weighted loss whether it predicts the velocity or x0 / v."""
    x0, noise = _randn(4, 1, 3, 3, seed=16), _randn(4, 1, 3, 3, seed=17)
    u = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=F64)  # t = 1 too: pure noise, alpha = 0
    vel, other = Flow(), Flow(mean_type=mean_type)

    def velocity_net(x_in, t):
        return 0.5 * x_in - 0.1

    def other_net(x_in, t):  # the same prediction expressed as the other target
        tt = (t / 1000).reshape(-1, 1, 1, 1)
        x0_hat, eps_hat = vel.param.to_x0_eps(velocity_net(x_in, t), x_in, 1 - tt, tt)
        return other.param.target(x0_hat, eps_hat, 1 - tt, tt)

    ours, ref = other.training_losses(other_net, x0, u, noise), vel.training_losses(velocity_net, x0, u, noise)
    torch.testing.assert_close(ours["loss"], ref["loss"], rtol=1e-10, atol=1e-12)

