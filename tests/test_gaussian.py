"""Closed forms of the forward process and posterior (DDPM eq. 4, 6, 7) and the parameterizations."""

import pytest
import torch
from helpers import v_target

from diffusion_lab.diffusion import GaussianDiffusion, get_betas


@pytest.fixture
def diff():
    return GaussianDiffusion(get_betas("linear", 1000))


def test_q_sample_mean_and_variance(diff):
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    xt = diff.q_sample(x0, t)
    a = diff.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(a**0.5 * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - a, rel=0.03)
    mean, var, _ = diff.q_mean_variance(x0[:1], t[:1])
    assert mean.item() == pytest.approx(a**0.5 * 0.7) and var.item() == pytest.approx(1 - a)


def test_posterior_matches_ddpm_eq7(diff):
    b, acp = diff.betas, diff.alphas_cumprod
    for t in (1, 10, 500, 999):
        tilde = (1 - acp[t - 1]) / (1 - acp[t]) * b[t]
        assert diff.posterior_variance[t].item() == pytest.approx(tilde.item(), rel=1e-12)
        x0, xt = torch.tensor([[[[0.3]]]]), torch.tensor([[[[-0.5]]]])
        mean, var, logvar = diff.q_posterior_mean_variance(x0, xt, torch.tensor([t]))
        expect = (
            acp[t - 1].sqrt() * b[t] / (1 - acp[t]) * 0.3 + (1 - b[t]).sqrt() * (1 - acp[t - 1]) / (1 - acp[t]) * -0.5
        )
        assert mean.item() == pytest.approx(expect.item(), rel=1e-6)
        assert logvar.exp().item() == pytest.approx(tilde.item(), rel=1e-6)


def test_posterior_is_exact_conditional_of_forward(diff):
    """Bayes: sampling x_{t-1} ~ q(.|x0), x_t ~ q(x_t|x_{t-1}) then regressing gives the posterior (Monte Carlo)."""
    torch.manual_seed(1)
    t = 50
    x0 = torch.zeros(200000, 1, 1, 1) + 0.4
    x_prev = diff.q_sample(x0, torch.full((200000,), t - 1))
    x_t = (1 - diff.betas[t]).sqrt().float() * x_prev + diff.betas[t].sqrt().float() * torch.randn_like(x_prev)
    # regress x_prev on x_t: slope and residual variance equal coef2 and beta-tilde
    xp, xt_ = x_prev.flatten().double(), x_t.flatten().double()
    slope = ((xt_ - xt_.mean()) * (xp - xp.mean())).sum() / ((xt_ - xt_.mean()) ** 2).sum()
    resid = xp - xp.mean() - slope * (xt_ - xt_.mean())
    assert slope.item() == pytest.approx(diff.posterior_mean_coef2[t].item(), rel=0.02)
    assert resid.var().item() == pytest.approx(diff.posterior_variance[t].item(), rel=0.02)


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_parameterizations_recover_x0(mean_type):
    diff = GaussianDiffusion(get_betas("cosine", 100), mean_type=mean_type)
    torch.manual_seed(0)
    # float64: at t = 99 of the cosine schedule alpha_bar ~ 1e-6, and eps -> x0 divides by sqrt(alpha_bar)
    x0, noise = torch.rand(4, 2, 3, 3, dtype=torch.float64) * 2 - 1, torch.randn(4, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 99])
    xt = diff.q_sample(x0, t, noise)
    target = {"eps": noise, "x0": x0, "v": v_target(diff, x0, t, noise)}[mean_type]
    out = diff.p_mean_variance(lambda x, tt: target, xt, t, clip_denoised=False)
    torch.testing.assert_close(out["pred_x0"], x0, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out["eps"], noise, atol=1e-6, rtol=1e-6)
    losses = diff.training_losses(lambda x, tt: target, x0, t, noise=noise)
    assert losses["mse"].abs().max().item() < 1e-10


def test_learned_range_endpoints():
    diff = GaussianDiffusion(get_betas("linear", 1000), var_type="learned_range")
    t = torch.tensor([0, 1, 500, 999])
    like = torch.zeros(4, 1, 2, 2)
    hi = diff.model_log_variance(torch.ones_like(like), t, like)
    lo = diff.model_log_variance(-torch.ones_like(like), t, like)
    torch.testing.assert_close(hi[:, 0, 0, 0], torch.log(diff.betas[t]).float())
    torch.testing.assert_close(lo[:, 0, 0, 0], diff.posterior_log_variance_clipped[t].float())
    # the clipped beta-tilde at t = 0 is beta-tilde_1
    assert lo[0, 0, 0, 0].item() == pytest.approx(torch.log(diff.posterior_variance[1]).item(), rel=1e-6)


def test_fixed_large_uses_beta_with_beta_tilde_1_at_0():
    diff = GaussianDiffusion(get_betas("linear", 1000), var_type="fixed_large")
    like = torch.zeros(3, 1, 1, 1)
    lv = diff.model_log_variance(None, torch.tensor([0, 1, 999]), like).flatten()
    expect = torch.log(torch.stack([diff.posterior_variance[1], diff.betas[1], diff.betas[999]])).float()
    torch.testing.assert_close(lv, expect)


def test_learned_var_needs_2c_channels():
    diff = GaussianDiffusion(get_betas("linear", 10), var_type="learned_range")
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match="6 output channels"):
        diff.training_losses(lambda x, t: x, x, torch.tensor([1, 2]))
