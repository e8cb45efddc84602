"""Objectives that converge sooner: Min-SNR (Hang et al. 2023) and P2 (Choi et al. 2022) weights against
their closed forms, zero terminal SNR (Lin et al. 2024, Alg. 1), and both with the rest of the training loop."""

import math

import pytest
import torch
from conftest import FAST, compose_train
from helpers import v_target

from diffusion_lab.diffusion import (
    GaussianDiffusion,
    LossAwareTimestepSampler,
    ddim_sample,
    ddpm_sample,
    get_betas,
    snr_loss_weight,
)

WEIGHTINGS = [  # (loss_weighting, options, eps-MSE weight w(SNR) as the paper writes it)
    ("min_snr", {"snr_gamma": 5.0}, lambda snr: min(snr, 5.0) / snr),
    ("p2", {"p2_k": 1.0, "p2_gamma": 0.5}, lambda snr: 1.0 / (1.0 + snr) ** 0.5),
    ("p2", {"p2_k": 1.0, "p2_gamma": 1.0}, lambda snr: 1.0 / (1.0 + snr)),
]
# Target-space factor: |eps - eps_hat|^2 = SNR |x0 - x0_hat|^2 = SNR / (SNR + 1) |v - v_hat|^2.
TO_TARGET = {
    "eps": lambda snr: 1.0,
    "x0": lambda snr: snr,
    "v": lambda snr: snr / (snr + 1.0),
    # EDM's F on the VP path (c_out = sigma_bar sd / sqrt(sigma_bar^2 + sd^2), sigma_bar^2 = 1 / SNR, sd = 0.5):
    # |eps err|^2 = SNR c_out^2 |F err|^2 = sd^2 SNR / (1 + sd^2 SNR)
    "edm": lambda snr: 0.25 * snr / (1.0 + 0.25 * snr),
}


def hand_snr(betas: torch.Tensor, t: int) -> float:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t) with alpha_bar_t = prod_{s <= t} (1 - beta_s), in Python floats."""
    a = math.prod(1.0 - b for b in betas[: t + 1].tolist())
    return a / (1.0 - a)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v", "edm"])
@pytest.mark.parametrize("weighting,opts,w_eps", WEIGHTINGS)
def test_weights_equal_the_papers_closed_forms(mean_type, weighting, opts, w_eps):
    betas = get_betas("linear", 1000)
    diff = GaussianDiffusion(betas, mean_type=mean_type, loss_weighting=weighting, **opts)
    ts = [0, 50, 200, 500, 999]
    snrs = [hand_snr(betas, t) for t in ts]
    assert max(snrs) > 5 > min(snrs)  # both sides of min-SNR's clamp
    for t, snr in zip(ts, snrs):
        expect = w_eps(snr) * TO_TARGET[mean_type](snr)
        assert diff.snr[t].item() == pytest.approx(snr, rel=1e-12)
        assert diff.mse_weights[t].item() == pytest.approx(expect, rel=1e-12), (t, snr)


def test_eps_min_snr_loss_is_weight_times_plain_mse():
    diff = GaussianDiffusion(get_betas("cosine", 1000), loss_weighting="min_snr")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1, torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 3, 100, 400, 800, 999])
    losses = diff.training_losses(lambda x, tt: 0.7 * x, x0, t, noise=noise)
    x_t = diff.q_sample(x0, t, noise)
    plain = ((noise - 0.7 * x_t) ** 2).mean(dim=(1, 2, 3))
    w = torch.tensor([min(s, 5.0) / s for s in (hand_snr(diff.betas, i) for i in t.tolist())])
    torch.testing.assert_close(losses["mse"], plain)  # logged unweighted
    torch.testing.assert_close(losses["loss"], (w * plain.double()).float(), rtol=1e-6, atol=0)
    assert w[0] < 1e-3 and w[-1] == 1.0  # the weights really differ from none's


def fixed_eps_error_outputs(diff, x0, t, noise, delta):
    """The eps, x0 and v outputs of one model whose eps-error is delta: eps_hat = eps + delta, and x0_hat, v_hat
    derived from it: x0_hat = x0 - sqrt((1 - a) / a) delta, v_hat = v + delta / sqrt(a)."""
    a = diff.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return {
        "eps": noise + delta,
        "x0": x0 - ((1 - a) / a).sqrt() * delta,
        "v": v_target(diff, x0, t, noise) + delta / a.sqrt(),
    }


@pytest.mark.parametrize("weighting,opts,w_eps", WEIGHTINGS)
def test_parameterizations_give_the_same_weighted_loss(weighting, opts, w_eps):
    """A model with a fixed eps-error has the same weighted loss w(SNR) |delta|^2 as eps, x0 or v predictor."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(5, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise, delta = (torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0, 10, 300, 700, 999])
    betas = get_betas("linear", 1000)
    expect = torch.tensor([w_eps(hand_snr(betas, i)) for i in t.tolist()], dtype=torch.float64)
    expect = expect * (delta**2).mean(dim=(1, 2, 3))
    plain = {}
    for mean_type in ("eps", "x0", "v"):
        diff = GaussianDiffusion(betas, mean_type=mean_type, loss_weighting=weighting, **opts)
        out = fixed_eps_error_outputs(diff, x0, t, noise, delta)[mean_type]
        losses = diff.training_losses(lambda x, tt, out=out: out, x0, t, noise=noise)
        torch.testing.assert_close(losses["loss"], expect, rtol=1e-10, atol=0)
        plain[mean_type] = losses["mse"]
    # unweighted (loss_weighting=none), the three MSEs differ by the SNR factors of the conversion
    snr = GaussianDiffusion(betas).snr[t]
    torch.testing.assert_close(plain["x0"] * snr, plain["eps"], rtol=1e-10, atol=0)
    torch.testing.assert_close(plain["v"] * snr / (snr + 1), plain["eps"], rtol=1e-10, atol=0)


# ----------------------------------------------------------------- zero terminal SNR (Lin et al. 2024)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_zero_terminal_snr_is_shifted_and_scaled_sqrt_alpha_bar(schedule):
    T = 1000
    betas = get_betas(schedule, T)
    zbetas = get_betas(schedule, T, zero_terminal_snr=True)
    diff = GaussianDiffusion(zbetas, mean_type="v")
    s = torch.cumprod(1 - betas, 0).sqrt()
    expect = (s - s[-1]) * s[0] / (s[0] - s[-1])  # Alg. 1: shift so the last is 0, scale so the first is kept
    assert zbetas[-1].item() == 1.0 and diff.alphas_cumprod[-1].item() == 0.0 and diff.snr[-1].item() == 0.0
    assert ((zbetas > 0) & (zbetas <= 1)).all() and (diff.alphas_cumprod[1:] < diff.alphas_cumprod[:-1]).all()
    torch.testing.assert_close(diff.sqrt_alphas_cumprod, expect, rtol=1e-10, atol=1e-15)
    assert diff.alphas_cumprod[0].item() == pytest.approx(torch.cumprod(1 - betas, 0)[0].item(), rel=1e-14)
    assert diff.zero_terminal_snr and not GaussianDiffusion(betas).zero_terminal_snr


def test_zero_terminal_snr_refuses_eps_prediction():
    msg = r"zero_terminal_snr=true needs a diffusion.mean_type defined at pure noise \(x0, v, velocity or edm; eps"
    with pytest.raises(ValueError, match=msg):
        GaussianDiffusion.from_schedule("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match=msg):
        GaussianDiffusion(get_betas("cosine", 10, zero_terminal_snr=True), mean_type="eps")
    with pytest.raises(ValueError, match="diffusion.steps >= 2"):
        get_betas("linear", 1, zero_terminal_snr=True)


@pytest.mark.parametrize("mean_type", ["v", "x0"])
@pytest.mark.parametrize("var_type,loss_type", [("fixed_small", "mse"), ("learned_range", "rescaled_mse")])
@pytest.mark.parametrize("weighting", ["none", "min_snr", "p2"])
def test_zero_terminal_snr_finite_at_the_last_step(mean_type, var_type, loss_type, weighting):
    T = 50
    diff = GaussianDiffusion.from_schedule(
        "linear", T, zero_terminal_snr=True, mean_type=mean_type, var_type=var_type, loss_type=loss_type,
        loss_weighting=weighting,
    )  # fmt: skip
    C = 1
    w = torch.randn(2 * C if diff.learns_sigma else C, C, 1, 1, generator=torch.Generator().manual_seed(0))
    w.requires_grad_(True)
    model = lambda x, tt: torch.tanh(torch.nn.functional.conv2d(x, w))  # noqa: E731
    x0 = torch.rand(4, C, 4, 4) * 2 - 1
    t = torch.tensor([0, 1, T - 2, T - 1])
    losses = diff.training_losses(model, x0, t)
    for k, v in losses.items():
        assert torch.isfinite(v).all(), k
    (grad,) = torch.autograd.grad(losses["loss"].sum(), w)
    assert torch.isfinite(grad).all()
    if weighting != "none":  # an x0 / v model's eps-error is 0 at SNR = 0, so its MSE weight is 0 there
        assert diff.mse_weights[-1].item() == 0.0
        vb_part = (T / 1000) * losses["vb"][-1].item() if diff.learns_sigma else 0.0
        assert losses["loss"][-1].item() == pytest.approx(vb_part, abs=1e-12)
    x_t = torch.randn(4, C, 4, 4)
    for clip in (True, False):
        out = diff.p_mean_variance(model, x_t, torch.full((4,), T - 1), clip_denoised=clip)
        for k, v in out.items():
            assert torch.isfinite(v).all(), (k, clip)
        assert torch.equal(out["eps"], x_t)  # at alpha_bar = 0, x_t is the noise
    assert diff.prior_bpd(x0).abs().max().item() == 0.0  # q(x_{T-1} | x0) = N(0, I) exactly


@pytest.mark.parametrize("mean_type", ["x0", "v"])
def test_zero_terminal_snr_exact_targets_recover_x0_and_eps(mean_type):
    diff = GaussianDiffusion(get_betas("cosine", 100, zero_terminal_snr=True), mean_type=mean_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 98, 99])
    target = x0 if mean_type == "x0" else v_target(diff, x0, t, noise)
    out = diff.p_mean_variance(lambda x, tt: target, diff.q_sample(x0, t, noise), t, clip_denoised=False)
    torch.testing.assert_close(out["pred_x0"], x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(out["eps"], noise, atol=1e-9, rtol=0)
    assert diff.training_losses(lambda x, tt: target, x0, t, noise=noise)["mse"].abs().max().item() < 1e-20


def test_weights_finite_at_snr_zero():
    zero = torch.zeros(1, dtype=torch.float64)
    assert snr_loss_weight(zero, "eps", "min_snr", snr_gamma=5.0).item() == 1.0  # lim min(SNR, 5) / SNR
    assert snr_loss_weight(zero, "eps", "p2", p2_k=2.0, p2_gamma=0.5).item() == pytest.approx(2**-0.5)
    for mean_type in ("x0", "v"):
        for weighting in ("min_snr", "p2"):
            assert snr_loss_weight(zero, mean_type, weighting).item() == 0.0


class GaussianDataV:
    """The exact E[v | x_t] for data x0 ~ N(mu, s^2) per pixel, finite at alpha_bar = 0 (where it is -mu).

    E[x0 | x_t] = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / (a s^2 + 1 - a), E[eps | x_t] = (x_t - sqrt(a) E[x0|x_t])
    / sqrt(1 - a) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), v = sqrt(a) eps - sqrt(1 - a) x0.
    """

    def __init__(self, diffusion, mu=0.1, s=0.5):
        self.acp, self.mu, self.s = diffusion.alphas_cumprod, mu, s

    def __call__(self, x, t, **_):
        a = self.acp[t].to(x.dtype).reshape(-1, 1, 1, 1)
        z = (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)
        x0, eps = self.mu + a.sqrt() * self.s**2 * z, (1 - a).sqrt() * z
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def test_zero_terminal_snr_v_model_samples_from_pure_noise():
    """Sampling from t = T-1 (alpha_bar = 0) with the exact v-model of N(0.1, 0.5^2) data.

    DDIM's first step maps x_T to sqrt(a') mu + sqrt(1 - a') x_T (pred_x0 = E[x0] = mu, eps = x_T); DDPM's
    first step ignores x_T (the posterior coefficient of x_t is 0 there); and DDIM on all T steps follows the
    probability-flow ODE, whose map from N(0, 1) to N(mu, s^2) is x_0 = mu + s x_T."""
    diff = GaussianDiffusion.from_schedule("linear", 1000, zero_terminal_snr=True, mean_type="v")
    model = GaussianDataV(diff)
    x_T = torch.randn(256, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []
    kw = dict(clip_denoised=False, callback=lambda i, x, pred_x0: seen.append((x, pred_x0)))
    x = ddim_sample(diff, model, x_T, "trailing100", **kw)
    a_prev = diff.alphas_cumprod[989].item()  # trailing100 visits 999, 989, ..., 9
    assert torch.isfinite(x).all() and torch.equal(seen[0][1], torch.full_like(x_T, 0.1))
    torch.testing.assert_close(seen[0][0], a_prev**0.5 * 0.1 + (1 - a_prev) ** 0.5 * x_T, rtol=1e-12, atol=1e-15)
    firsts = []
    for x_start in (x_T, -x_T):
        seen.clear()
        x = ddpm_sample(diff, model, x_start, "trailing100", generator=torch.Generator().manual_seed(1), **kw)
        assert torch.isfinite(x).all()
        firsts.append(seen[0][0])
    assert diff.posterior_mean_coef2[-1].item() == 0.0 and torch.equal(firsts[0], firsts[1])
    x = ddim_sample(diff, model, x_T[:64], None, clip_denoised=False)
    assert (x - (0.1 + 0.5 * x_T[:64])).abs().max().item() < 0.01  # 0.0065 measured on 20,000 draws


# ----------------------------------------------------------------- with the rest of the training loop
@pytest.mark.parametrize("mean_type", ["eps", "v"])
@pytest.mark.parametrize("weighting,opts,w_eps", WEIGHTINGS)
def test_weighting_drives_the_loss_aware_sampler(mean_type, weighting, opts, w_eps):
    """The loss-aware sampler sees the weighted loss: with the same model and noise, each t's loss is w_t times
    the unweighted one, so p_t (sqrt of the mean squared loss, uniform_prob = 0) is proportional to w_t p_t(none)."""
    T, K = 20, 3
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(T * K, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(T * K, 1, 4, 4, generator=g)
    t = torch.arange(T).repeat(K)
    probs = {}
    for name, kw in (("none", {}), (weighting, opts)):
        diff = GaussianDiffusion(get_betas("linear", T), mean_type=mean_type, loss_weighting=name, **kw)
        sampler = LossAwareTimestepSampler(T, history_per_term=K, uniform_prob=0.0)
        losses = diff.training_losses(lambda x, tt: 0.5 * x, x0, t, noise=noise)
        sampler.update(t, losses["loss"])
        assert sampler.warmed_up()
        probs[name] = sampler.probabilities()
        ts, iw = sampler.sample(8, generator=torch.Generator().manual_seed(2))
        loss = (diff.training_losses(lambda x, tt: 0.5 * x, x0[:8], ts)["loss"] * iw).mean()  # module's reduction
        assert torch.isfinite(loss)
    ratio = probs[weighting] / (probs["none"] * diff.mse_weights)
    torch.testing.assert_close(ratio / ratio[0], torch.ones(T, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("weighting,opts,w_eps", WEIGHTINGS)
@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_learned_variance_vb_term_is_unweighted(weighting, opts, w_eps, mean_type):
    """Hybrid loss = w_t mse + T/1000 vb: vb and its gradient (into the variance channels only) equal none's."""
    T = 100
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=g) * 2 - 1
    noise = torch.randn(4, 2, 3, 3, generator=g)
    out = torch.randn(4, 4, 3, 3, generator=g)
    t = torch.tensor([0, 5, 50, 99])
    res = {}
    for name, kw in (("none", {}), (weighting, opts)):
        diff = GaussianDiffusion(
            get_betas("cosine", T), mean_type=mean_type, var_type="learned_range", loss_type="rescaled_mse",
            loss_weighting=name, **kw,
        )  # fmt: skip
        o = out.clone().requires_grad_(True)
        losses = diff.training_losses(lambda x, tt, o=o: o, x0, t, noise=noise)
        (grad_vb,) = torch.autograd.grad(losses["vb"].sum(), o, retain_graph=True)
        (grad,) = torch.autograd.grad(losses["loss"].sum(), o)
        res[name] = losses, grad_vb, grad, diff.mse_weights[t].float()
    (l0, gvb0, g0, _), (l1, gvb1, g1, w) = res["none"], res[weighting]
    assert torch.equal(l1["vb"], l0["vb"]) and torch.equal(l1["mse"], l0["mse"]) and torch.equal(gvb1, gvb0)
    torch.testing.assert_close(l1["loss"], w * l1["mse"] + l1["vb"] * T / 1000)
    torch.testing.assert_close(g1[:, 2:], g0[:, 2:])  # variance channels: only the (unweighted) vb term
    torch.testing.assert_close(g1[:, :2], w.reshape(-1, 1, 1, 1) * g0[:, :2])  # mean channels: weighted mse


def test_invalid_objective_options_name_the_key():
    with pytest.raises(ValueError, match=r"^diffusion.loss_weighting='foo' is unknown; allowed: none, min_snr, p2$"):
        GaussianDiffusion.from_schedule("linear", 10, loss_weighting="foo")
    with pytest.raises(ValueError, match=r"diffusion.loss_weighting='min_snr' needs diffusion.loss_type mse"):
        GaussianDiffusion.from_schedule(
            "linear", 10, var_type="learned_range", loss_type="kl", loss_weighting="min_snr"
        )
    for key, value in (("snr_gamma", 0.0), ("p2_k", -1.0), ("p2_gamma", -0.5)):
        with pytest.raises(ValueError, match=rf"^diffusion.{key}={value} must be"):
            GaussianDiffusion.from_schedule("linear", 10, **{key: value})
    with pytest.raises(ValueError, match=r"diffusion.zero_terminal_snr='yes' must be true or false"):
        GaussianDiffusion.from_schedule("linear", 10, zero_terminal_snr="yes", mean_type="v")


def test_respace_keeps_objective_and_zero_terminal_snr():
    diff = GaussianDiffusion.from_schedule(
        "linear", 100, zero_terminal_snr=True, mean_type="v", loss_weighting="p2", p2_gamma=0.5, p2_k=2.0
    )
    r = diff.respace([0, 49, 99])  # trailing-style: keeps T-1
    assert r.objective_kwargs == diff.objective_kwargs == {
        "loss_weighting": "p2", "snr_gamma": 5.0, "p2_k": 2.0, "p2_gamma": 0.5,
    }  # fmt: skip
    assert r.zero_terminal_snr and r.betas[-1].item() == 1.0
    torch.testing.assert_close(r.mse_weights, diff.mse_weights[[0, 49, 99]])


def test_short_min_snr_training_on_digits(tmp_path):
    """A few steps through tasks.train with min-SNR (v prediction, loss-aware t): finite loss, below the
    unweighted MSE, and the checkpoint rebuilds the same objective."""
    from diffusion_lab.tasks import load_module, train

    overrides = [*FAST, "logger=none", "diffusion.loss_weighting=min_snr", "diffusion.mean_type=v"]
    metrics = train(compose_train([*overrides, "timesteps=loss_aware"], tmp_path))
    assert math.isfinite(metrics["train/loss_step"])
    # v-prediction's min-SNR weight min(SNR, 5) / (SNR + 1) is < 1 at every t, and the sampler's importance
    # weights are 1 until every t has a full history: the weighted loss is below the logged plain MSE
    assert metrics["train/loss_step"] < metrics["train/mse_step"]
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.diffusion.loss_weighting == "min_snr" and module.diffusion.snr_gamma == 5.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["diffusion.loss_weighting=foo"], "diffusion.loss_weighting='foo' is unknown; allowed: none, min_snr, p2"),
        (
            ["diffusion.zero_terminal_snr=true"],
            "diffusion.zero_terminal_snr=true needs a diffusion.mean_type defined at pure noise (x0, v, velocity "
            "or edm; eps cannot be predicted from pure noise)",
        ),
    ],
)
def test_train_refuses_undefined_objectives_before_writing(tmp_path, overrides, message):
    """Raised where the diffusion is built, before any step or file (Hydra wraps it; the ValueError is the cause)."""
    from diffusion_lab.tasks import train

    with pytest.raises(Exception) as info:
        train(compose_train([*FAST, "logger=none", *overrides], tmp_path))
    err = info.value
    while not isinstance(err, ValueError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, ValueError) and str(err) == message
    assert not (tmp_path / "checkpoints").exists()
