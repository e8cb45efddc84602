import math

import pytest
import torch

from diffusion_lab.diffusion import GaussianDiffusion, get_betas


def test_linear_endpoints_and_monotone_alpha_bar():
    betas = get_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    acp = GaussianDiffusion(betas).alphas_cumprod
    assert ((acp > 0) & (acp < 1)).all() and (acp[1:] < acp[:-1]).all()


@pytest.mark.parametrize("t", [0, 1, 250, 500, 900, 999])
def test_cosine_matches_closed_form(t):
    T, s = 1000, 0.008
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    beta = get_betas("cosine", T)[t].item()
    assert beta == pytest.approx(min(1 - f((t + 1) / T) / f(t / T), 0.999), rel=1e-12)
    # alpha_bar_t = f(t/T)/f(0) wherever no clipping happened before t (IDDPM eq. 17)
    acp = GaussianDiffusion(get_betas("cosine", T)).alphas_cumprod
    if t < 990:
        assert acp[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)


def test_cosine_beta_clipped_at_0999():
    betas = get_betas("cosine", 1000)
    assert betas.max().item() == pytest.approx(0.999) and (betas <= 0.999).all()


def test_unknown_schedule_names_key():
    with pytest.raises(ValueError, match=r"diffusion.schedule='quadratic'.*linear, cosine"):
        get_betas("quadratic", 10)
