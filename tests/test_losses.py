"""The variational-bound pieces against torch.distributions and closed forms (IDDPM Sec. 2-3)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion_lab.diffusion import GaussianDiffusion, discretized_gaussian_log_likelihood, get_betas, normal_kl


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    lv1, lv2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    expect = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.37, -5.0), (-0.99, -1.0), (1.3, 0.5), (0.0, -8.0)])
def test_decoder_probabilities_sum_to_one(mean, log_scale):
    bins = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).reshape(1, 256)
    logp = discretized_gaussian_log_likelihood(
        bins, torch.tensor(mean, dtype=torch.float64), torch.tensor(log_scale, dtype=torch.float64)
    )
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_vlb_of_perfect_posterior_is_zero():
    """A model whose mean/variance equal the true posterior has KL = 0 for every t > 0."""
    diff = GaussianDiffusion(get_betas("linear", 100), mean_type="x0", var_type="fixed_small")
    torch.manual_seed(0)
    x0 = torch.rand(8, 1, 4, 4) * 2 - 1
    t = torch.randint(1, 100, (8,))
    xt = diff.q_sample(x0, t)
    vb, _ = diff.vb_terms_bpd(lambda x, tt: x0, x0, xt, t)
    assert vb.abs().max().item() < 1e-6


def test_decoder_nll_at_t0_in_bits():
    """At t=0 the term is -log2 p(x0 | x1) of the discretized Gaussian decoder, per dimension."""
    diff = GaussianDiffusion(get_betas("linear", 100), mean_type="x0", var_type="fixed_small")
    x0 = (torch.randint(0, 256, (2, 1, 3, 3)).double() / 127.5 - 1).float()
    t = torch.zeros(2, dtype=torch.long)
    xt = diff.q_sample(x0, t)
    vb, _ = diff.vb_terms_bpd(lambda x, tt: x0, x0, xt, t)
    mean, _, logvar = diff.q_posterior_mean_variance(x0, xt, t)
    expect = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * diff.posterior_log_variance_clipped[0].float())
    torch.testing.assert_close(vb, expect.mean(dim=(1, 2, 3)) / math.log(2.0))


def test_hybrid_vb_has_no_gradient_into_mean_channels():
    """IDDPM stop-gradient: d vb / d (mean output channels) = 0, d vb / d (variance channels) != 0."""
    diff = GaussianDiffusion(get_betas("cosine", 100), var_type="learned_range", loss_type="rescaled_mse")
    torch.manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3) * 2 - 1
    out = torch.randn(4, 4, 3, 3, requires_grad=True)
    losses = diff.training_losses(lambda x, t: out, x0, torch.tensor([0, 5, 50, 99]))
    (grad,) = torch.autograd.grad(losses["vb"].sum(), out)
    assert grad[:, :2].abs().max().item() == 0.0
    assert grad[:, 2:].abs().max().item() > 0.0
    # and the total is mse + vb * T / 1000 (lambda = 0.001 on L_vlb = T L_t)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"] * 100 / 1000)


def test_kl_loss_trains_mean_and_rescaled_kl_scales_by_T():
    diff = GaussianDiffusion(get_betas("linear", 50), var_type="learned_range", loss_type="rescaled_kl")
    torch.manual_seed(0)
    x0 = torch.rand(3, 1, 2, 2) * 2 - 1
    out = torch.randn(3, 2, 2, 2, requires_grad=True)
    losses = diff.training_losses(lambda x, t: out, x0, torch.tensor([3, 10, 40]))
    torch.testing.assert_close(losses["loss"], losses["vb"] * 50)
    (grad,) = torch.autograd.grad(losses["loss"].sum(), out)
    assert grad[:, :1].abs().max().item() > 0.0


def test_prior_bpd_small_for_standard_schedule():
    diff = GaussianDiffusion(get_betas("linear", 1000))
    x0 = torch.ones(1, 1, 2, 2)
    # KL(N(sqrt(a_T), 1 - a_T) || N(0, 1)) closed form at x0 = 1
    a = diff.alphas_cumprod[-1].item()
    expect = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a) / math.log(2)
    assert diff.prior_bpd(x0).item() == pytest.approx(expect, rel=1e-4)
