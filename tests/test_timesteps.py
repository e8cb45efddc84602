"""Timestep samplers: uniform, and IDDPM's loss-aware importance sampling (eq. 18)."""

import pytest
import torch

from diffusion_lab.diffusion import LossAwareTimestepSampler, UniformTimestepSampler


def test_uniform_weights_are_one():
    t, w = UniformTimestepSampler(10).sample(1000, "cpu", generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 9 and torch.all(w == 1)


def test_loss_aware_is_uniform_before_warmup():
    s = LossAwareTimestepSampler(5, history_per_term=3)
    s.update(torch.tensor([0, 1, 2, 3, 4, 0, 1]), torch.arange(7.0))
    assert not s.warmed_up()
    torch.testing.assert_close(s.probabilities(), torch.full((5,), 0.2, dtype=torch.float64))


def test_loss_aware_probabilities_match_formula():
    T, H, u = 4, 3, 0.001
    s = LossAwareTimestepSampler(T, history_per_term=H, uniform_prob=u)
    hist = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5], [4.0, 0.0, 1.0], [2.0, 2.0, 9.0]])
    for j in range(H):
        s.update(torch.arange(T), hist[:, j])
    assert s.warmed_up()
    rms = (hist**2).mean(1).sqrt().double()
    expect = rms / rms.sum() * (1 - u) + u / T
    torch.testing.assert_close(s.probabilities(), expect)
    # an extra loss drops the oldest
    s.update(torch.tensor([0]), torch.tensor([10.0]))
    rms[0] = torch.tensor([2.0, 3.0, 10.0]).pow(2).mean().sqrt()
    torch.testing.assert_close(s.probabilities(), rms / rms.sum() * (1 - u) + u / T)
    _, w = s.sample(100, "cpu", generator=torch.Generator().manual_seed(0))
    t, w = s.sample(100, "cpu", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(w.double(), 1 / (T * s.probabilities()[t]), rtol=1e-6, atol=0)


def test_importance_weighted_mean_is_unbiased():
    T = 50
    losses = torch.linspace(0.01, 5.0, T) ** 2  # a loss curve spanning two orders of magnitude
    s = LossAwareTimestepSampler(T)
    for _ in range(10):
        s.update(torch.arange(T), losses)
    g = torch.Generator().manual_seed(123)
    estimates = []
    for _ in range(200):
        t, w = s.sample(256, "cpu", generator=g)
        estimates.append((losses[t] * w).mean())
    est = torch.stack(estimates)
    # mean of 200 batches vs the uniform mean, within 4 standard errors
    assert abs(est.mean().item() - losses.mean().item()) < 4 * est.std().item() / 200**0.5
    assert abs(est.mean().item() - losses.mean().item()) / losses.mean().item() < 0.02


def test_state_dict_round_trip():
    s = LossAwareTimestepSampler(6, history_per_term=2)
    s.update(torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 2]), torch.rand(13))
    s2 = LossAwareTimestepSampler(6, history_per_term=2)
    s2.load_state_dict(s.state_dict())
    torch.testing.assert_close(s2.probabilities(), s.probabilities())
    with pytest.raises(ValueError, match="expected"):
        LossAwareTimestepSampler(7, history_per_term=2).load_state_dict(s.state_dict())


@pytest.mark.parametrize("T,K,B", [(5, 3, 7), (3, 4, 50), (1000, 10, 1024)])
def test_history_holds_the_last_k_losses_per_t_in_order(T, K, B):
    """After any sequence of batches (with repeated t, and more than K of one t in a batch), row t holds
    the last K losses seen for t, oldest first, and counts[t] = min(seen, K)."""
    s = LossAwareTimestepSampler(T, history_per_term=K)
    seen = {t: [] for t in range(T)}
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        t, losses = torch.randint(0, T, (B,), generator=g), torch.rand(B, generator=g, dtype=torch.float64)
        s.update(t, losses)
        for ti, li in zip(t.tolist(), losses.tolist()):
            seen[ti].append(li)
    for ti, ls in seen.items():
        last = ls[-K:]
        assert int(s.counts[ti]) == len(last)
        assert s.history[ti, : len(last)].tolist() == last


def test_old_names_still_import_with_a_deprecation_warning():
    from diffusion_lab.diffusion import LossSecondMomentSampler, UniformSampler

    with pytest.warns(DeprecationWarning, match="now UniformTimestepSampler"):
        assert isinstance(UniformSampler(10), UniformTimestepSampler)
    with pytest.warns(DeprecationWarning, match="now LossAwareTimestepSampler"):
        assert isinstance(LossSecondMomentSampler(10), LossAwareTimestepSampler)
