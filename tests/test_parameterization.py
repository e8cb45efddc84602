"""The parameterizations (diffusion/parameterization.py): closed forms and the invariants between them."""

import pytest
import torch

from diffusion_lab.diffusion.parameterization import PARAMETERIZATIONS, parameterization

# (alpha, sigma): variance-preserving points and two that are not (a VE-like and a flow-like path point).
PATHS = [(0.999**0.5, 0.001**0.5), (0.5**0.5, 0.5**0.5), (0.01, (1 - 1e-4) ** 0.5), (1.0, 3.0), (0.3, 0.7)]


def _x0_eps():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
@pytest.mark.parametrize("alpha,sigma", PATHS)
def test_the_target_converts_back_to_x0_and_eps(name, alpha, sigma):
    """to_x0_eps(target(x0, eps), alpha x0 + sigma eps) = (x0, eps) on any Gaussian path point."""
    p, (x0, eps) = parameterization(name), _x0_eps()
    x_t = alpha * x0 + sigma * eps
    x0_hat, eps_hat = p.to_x0_eps(p.target(x0, eps, alpha, sigma), x_t, alpha, sigma)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)


def test_the_targets_are_the_papers():
    x0, eps = _x0_eps()
    a, s = 0.6, 0.8
    torch.testing.assert_close(PARAMETERIZATIONS["eps"].target(x0, eps, a, s), eps)
    torch.testing.assert_close(PARAMETERIZATIONS["x0"].target(x0, eps, a, s), x0)
    torch.testing.assert_close(PARAMETERIZATIONS["v"].target(x0, eps, a, s), a * eps - s * x0)  # Salimans & Ho eq. 9


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
@pytest.mark.parametrize("alpha,sigma", PATHS)
def test_error_gain_is_the_squared_error_ratio(name, alpha, sigma):
    """An output error e moves eps_hat by c e; error_gain must be c^2, so that w_eps |eps error|^2 =
    weight_from_eps(w_eps) |target error|^2 for every target on every path point."""
    p, (x0, eps) = parameterization(name), _x0_eps()
    x_t, e = alpha * x0 + sigma * eps, torch.full_like(x0, 1e-3)
    out = p.target(x0, eps, alpha, sigma)
    eps_moved = p.to_x0_eps(out + e, x_t, alpha, sigma)[1] - eps
    ratio = (eps_moved.pow(2).sum() / e.pow(2).sum()).item()
    assert ratio == pytest.approx(p.weight_from_eps(1.0, alpha, sigma), rel=1e-9)


@pytest.mark.parametrize("a_bar", [0.999, 0.5, 0.01])
def test_vp_weight_conversions_are_the_papers(a_bar):
    """Hang et al. 2023, Sec. 3.4: |eps err|^2 = SNR |x0 err|^2 = SNR / (SNR + 1) |v err|^2 on the VP path."""
    alpha, sigma, snr = a_bar**0.5, (1 - a_bar) ** 0.5, a_bar / (1 - a_bar)
    assert PARAMETERIZATIONS["eps"].error_gain(alpha, sigma) == 1.0
    assert PARAMETERIZATIONS["x0"].error_gain(alpha, sigma) == pytest.approx(snr, rel=1e-12)
    assert PARAMETERIZATIONS["v"].error_gain(alpha, sigma) == pytest.approx(snr / (snr + 1), rel=1e-12)


def test_x0_and_v_are_defined_at_zero_snr_and_eps_is_not():
    x0, eps = _x0_eps()
    for name in ("x0", "v", "velocity", "edm"):
        p = PARAMETERIZATIONS[name]
        x0_hat, eps_hat = p.to_x0_eps(p.target(x0, eps, 0.0, 1.0), eps, 0.0, 1.0)  # alpha = 0: x_t is the noise
        torch.testing.assert_close(p.network_input(eps, 0.0, 1.0), eps)  # EDM's c_in is 1 / sigma there
        torch.testing.assert_close((x0_hat, eps_hat), (x0, eps), rtol=0, atol=1e-15)
        assert p.defined_at_zero_snr
    assert not PARAMETERIZATIONS["eps"].defined_at_zero_snr


def test_an_unknown_name_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"diffusion.mean_type='score' is unknown; allowed: eps, x0, v, velocity, edm"):
        parameterization("score")


def test_gaussian_diffusion_is_a_process_whose_coefficients_are_its_tables():
    """The Process interface on the discrete VP process: alpha^2 = alpha_bar and sigma^2 = 1 - alpha_bar at whole
    times, log-SNR = 2 log(alpha / sigma), sigma_at = sigma / alpha at fractional times too."""
    from diffusion_lab.diffusion import GaussianDiffusion, Process

    diff = GaussianDiffusion.from_schedule("cosine", 100)
    assert isinstance(diff, Process)
    t = torch.tensor([0.0, 17.0, 50.0, 99.0], dtype=torch.float64)
    alpha, sigma = diff.alpha_sigma_at(t)
    torch.testing.assert_close(alpha**2, diff.alphas_cumprod[t.long()], rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma**2, 1 - diff.alphas_cumprod[t.long()], rtol=1e-14, atol=0)
    tf = torch.tensor([0.25, 17.5, 98.9], dtype=torch.float64)
    alpha, sigma = diff.alpha_sigma_at(tf)
    torch.testing.assert_close(diff.log_snr_at(tf), 2 * (alpha / sigma).log(), rtol=1e-12, atol=0)
    torch.testing.assert_close(diff.sigma_at(tf), sigma / alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha), rtol=1e-15, atol=0)
