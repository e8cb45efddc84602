"""space_timesteps spec forms and the respaced process (IDDPM Sec. 4, DDIM Sec. 4.2 / App. D)."""

import math

import pytest
import torch

from diffusion_lab.diffusion import GaussianDiffusion, get_betas, space_timesteps


def test_ddim50_of_1000():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))


def test_ddim_impossible_stride_raises():
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim300")


def test_even_and_sections_match_iddpm():
    assert space_timesteps(1000, "1000") == list(range(1000))
    assert space_timesteps(100, "10") == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    # IDDPM docstring example: 300 steps, sections "10,15,20" -> strides per section
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45 and steps[:10] == [round(i * 99 / 9) for i in range(10)]
    assert steps[10] == 100 and steps[-1] == 299


def test_quad_and_uniform_and_trailing():
    q = space_timesteps(1000, "quad10")
    assert q == [math.floor(0.8 * 1000 / 81 * i * i) for i in range(10)]
    assert space_timesteps(1000, "uniform4") == [0, 250, 500, 750]
    assert space_timesteps(1000, "trailing4") == [249, 499, 749, 999]


@pytest.mark.parametrize("spec", ["ddim0", "2000", "quad900", "foo10", "10,x"])
def test_bad_specs_raise(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


def test_respaced_betas_by_hand():
    diff = GaussianDiffusion(get_betas("linear", 1000), var_type="learned_range")
    kept = [0, 400, 999]
    r = diff.respace(kept)
    acp = diff.alphas_cumprod
    expect = torch.stack([1 - acp[0], 1 - acp[400] / acp[0], 1 - acp[999] / acp[400]])
    torch.testing.assert_close(r.betas, expect)
    torch.testing.assert_close(r.alphas_cumprod, acp[kept])
    assert r.timestep_map.tolist() == kept
    # the model is called with the original timesteps
    seen = []
    r.p_mean_variance(
        lambda x, t: (seen.append(t.tolist()), torch.zeros(1, 2, 1, 1))[1], torch.zeros(1, 1, 1, 1), torch.tensor([1])
    )
    assert seen == [[400]]
    # learned_range interpolates in the respaced betas: v=1 gives log beta'_1
    lv = r.model_log_variance(torch.ones(1, 1, 1, 1), torch.tensor([1]), torch.zeros(1, 1, 1, 1))
    assert lv.item() == pytest.approx(math.log(expect[1].item()), rel=1e-6)


@pytest.mark.parametrize("table, key", [("ays", "StableDiffusionSigmas"), ("ays_xl", "StableDiffusionXLSigmas")])
def test_ays_spacing_is_diffusers_table_and_its_log_linear_interpolation(table, key):
    """spacing=ays / ays_xl visits Align Your Steps' published levels (diffusers' AysSchedules, without its final 0)
    at 10 steps, on any process (EDM: sigma itself); at 19 steps the log-linear interpolation keeps every table
    level at the even positions and puts the geometric mean of its neighbours between them."""
    from diffusers.schedulers import AysSchedules

    from diffusion_lab.diffusion.continuous import EDM
    from diffusion_lab.diffusion.respace import ays_sigmas, sampling_times

    published = AysSchedules[key][:-1]
    assert ays_sigmas(table, 10) == published
    edm = EDM()
    times = sampling_times(edm, table, 10)
    assert times == sorted(times) and len(times) == 10
    assert edm.sigma_at(torch.tensor(times, dtype=torch.float64)).flip(0).tolist() == pytest.approx(published, rel=1e-9)
    fine = ays_sigmas(table, 19)
    assert fine[::2] == pytest.approx(published, rel=1e-12)
    assert fine[1::2] == pytest.approx([(a * b) ** 0.5 for a, b in zip(published, published[1:])], rel=1e-12)
    assert all(b < a for a, b in zip(fine, fine[1:]))
