"""Samplers: DDIM determinism and its eta=1 equivalence with DDPM, respaced ancestral steps, inversion,
inpainting and classifier-free guidance."""

import pytest
import torch
from conftest import ROOT, compose_train

from diffusion_lab.diffusion import (
    ClassifierFreeGuidance,
    GaussianDiffusion,
    Sampler,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    get_betas,
    paint,
    slerp,
)
from diffusion_lab.diffusion.samplers import ddpm_step


def _model(x, t, **_):
    """A fixed smooth function of (x, t): enough to exercise the samplers' arithmetic."""
    return torch.tanh(x) * (t.float() / 1000).reshape(-1, 1, 1, 1) + 0.1


def test_ddim_eta0_is_deterministic_without_generator():
    diff = GaussianDiffusion(get_betas("linear", 1000))
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = ddim_sample(diff, _model, x_T, "ddim20", eta=0.0)
    b = ddim_sample(diff, _model, x_T, "ddim20", eta=0.0)
    assert torch.equal(a, b)


def test_ddim_eta1_step_equals_ddpm_posterior():
    """eta=1 on all T steps: DDIM's mean is the posterior mean and its variance is beta-tilde (DDIM Sec. 4.1)."""
    diff = GaussianDiffusion(get_betas("linear", 1000))
    torch.manual_seed(0)
    x = torch.randn(2, 1, 3, 3)
    for step in (1, 10, 500, 999):
        t = torch.full((2,), step)
        out = diff.p_mean_variance(_model, x, t, clip_denoised=False)
        a, a_prev = diff.alphas_cumprod[step], diff.alphas_cumprod_prev[step]
        sigma2 = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        assert sigma2.item() == pytest.approx(diff.posterior_variance[step].item(), rel=1e-10)
        states = []  # one DDIM step from `step` to `step - 1` without noise, then the final jump
        ddim_sample(diff, _model, x, [step - 1, step], eta=1.0, temperature=0.0, clip_denoised=False,
                    callback=lambda i, x_new, x0, seen=states: seen.append(x_new))  # fmt: skip
        torch.testing.assert_close(states[0], out["mean"], rtol=1e-5, atol=1e-5)


def test_ddpm_on_respaced_process_uses_recomputed_betas():
    diff = GaussianDiffusion(get_betas("linear", 1000), var_type="fixed_large")
    kept = [0, 400, 999]
    x_T = torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    states = []
    out = ddpm_sample(
        diff,
        lambda x, t: torch.zeros_like(x) + 0.3,
        x_T,
        kept,
        clip_denoised=False,
        temperature=0.0,
        callback=lambda i, x, x0: states.append(x.item()),
    )
    acp = diff.alphas_cumprod[kept].tolist()
    betas = [1 - acp[0], 1 - acp[1] / acp[0], 1 - acp[2] / acp[1]]
    x = x_T.item()
    for i in (2, 1, 0):  # posterior mean of the respaced process with eps = 0.3, noise switched off
        a, a_prev, b = acp[i], (acp[i - 1] if i else 1.0), betas[i]
        x0 = (x - (1 - a) ** 0.5 * 0.3) / a**0.5
        x = a_prev**0.5 * b / (1 - a) * x0 + (1 - b) ** 0.5 * (1 - a_prev) / (1 - a) * x
        assert states[2 - i] == pytest.approx(x, rel=1e-5)
    assert out.item() == pytest.approx(x, rel=1e-5)


def test_ddpm_temperature_zero_equals_its_mean_path():
    diff = GaussianDiffusion(get_betas("linear", 100))
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    out = diff.p_mean_variance(_model, x_T, torch.full((2,), 99))
    step = ddpm_step(diff, out, x_T, torch.full((2,), 99), temperature=0.0)
    torch.testing.assert_close(step, out["mean"])


def test_inversion_round_trip_on_analytic_model(gaussian_eps):
    diff = GaussianDiffusion(get_betas("linear", 1000))
    model = gaussian_eps(diff, mu=0.1, s=0.5)
    x0 = 0.1 + 0.5 * torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the usual first-order inversion: error shrinks with the step count (0.39 at 20 steps, 0.018 at 500)
    z = ddim_invert(diff, model, x0, "ddim500")
    assert z.std().item() == pytest.approx(1.0, abs=0.1)  # a latent at the noise level of t=998
    assert (ddim_sample(diff, model, z, "ddim500", clip_denoised=False) - x0).abs().max().item() < 0.03
    # fixed-point iterations make it the exact inverse of the decoder's steps
    z = ddim_invert(diff, model, x0, "ddim100", fixed_point_iters=3)
    assert (ddim_sample(diff, model, z, "ddim100", clip_denoised=False) - x0).abs().max().item() < 1e-4


def test_paint_known_region_has_the_new_state_noise_level():
    """After the step from index i the known region is q_sample(x0, i-1): the noise level of the new state,
    not of the old one (the off-by-one of some published implementations)."""
    diff = GaussianDiffusion(get_betas("linear", 100))
    x0 = torch.rand(2, 1, 3, 3, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.ones(1, 1, 1, 1)
    seen = {}
    paint(
        diff,
        _model,
        x0,
        mask,
        None,
        start_index=60,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, x, x0h: seen.setdefault(i, x.clone()),
    )
    g = torch.Generator().manual_seed(0)
    draws = [torch.randn(x0.shape, generator=g) for _ in range(3)]  # x_T, the step's z, the re-noising
    torch.testing.assert_close(seen[60], diff.q_sample(x0, torch.full((2,), 59), draws[2]))
    assert torch.equal(seen[0], x0)


class _CondModel(torch.nn.Module):
    num_classes = 3

    def forward(self, x, t, y):
        return x * 0.1 + (y.float() + 1).reshape(-1, 1, 1, 1) * 0.05 + t.float().reshape(-1, 1, 1, 1) * 1e-4


@pytest.mark.parametrize("scale,label", [(1.0, "cond"), (0.0, "uncond")])
def test_guidance_endpoints_bit_exact(scale, label):
    diff = GaussianDiffusion(get_betas("linear", 100))
    m = _CondModel()
    x_T = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    kw = {"y": y if label == "cond" else torch.full_like(y, 3)}
    plain = ddpm_sample(diff, m, x_T, "10", model_kwargs=kw, generator=torch.Generator().manual_seed(5))
    guided = ddpm_sample(
        diff,
        ClassifierFreeGuidance(m, scale, 3),
        x_T,
        "10",
        model_kwargs={"y": y},
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(plain, guided)


def test_guidance_formula_and_one_batched_forward():
    calls = []

    class Spy(_CondModel):
        def forward(self, x, t, y):
            calls.append(x.shape[0])
            return super().forward(x, t, y)

    m = Spy()
    x, t, y = torch.randn(2, 1, 2, 2), torch.tensor([5, 6]), torch.tensor([0, 2])
    out = ClassifierFreeGuidance(m, 3.0, 3)(x, t, y=y)
    assert calls == [4]
    c, u = _CondModel()(x, t, y), _CondModel()(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(out, u + 3.0 * (c - u))


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(1, 1, 16, 16, generator=g), torch.randn(1, 1, 16, 16, generator=g)
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1, rtol=1e-5, atol=1e-5)
    mid = slerp(z0, z1, 0.5)
    assert mid.norm().item() == pytest.approx(((z0.norm() + z1.norm()) / 2).item(), rel=0.1)


def test_sampler_spec_names_and_errors():
    diff = GaussianDiffusion(get_betas("linear", 1000))
    assert Sampler("ddim", 50).name == "ddim50_eta0" and Sampler("ddpm", 1000).name == "ddpm1000"
    assert Sampler("ddim", 50).timesteps(diff) == list(range(0, 1000, 20))
    with pytest.raises(ValueError, match="sampler.steps=2000 must be between 1 and diffusion.steps=1000"):
        Sampler("ddim", 2000).timesteps(diff)
    with pytest.raises(ValueError, match="sampler.method='dpm_fast' is unknown; allowed: ddpm, ddim, dpmpp_2m"):
        Sampler("dpm_fast", 10)
    with pytest.raises(ValueError, match="sampler.eta=-0.1 must be a number >= 0"):
        Sampler("ddim", 10, eta=-0.1)
    with pytest.raises(ValueError, match=r"sampler.order is not an option of sampler.method=ddim \(it takes: eta"):
        Sampler("ddim", 10, order=2)
    with pytest.raises(ValueError, match="sampler.spacing='cubic' is unknown"):
        Sampler("dpmpp_2m", 10, spacing="cubic")
    with pytest.raises(ValueError, match=r"sampler.steps=10 and sampler.nfe=12 are both set: give one of them"):
        Sampler("dpmpp_2m", steps=10, nfe=12)
    # None is the registry's default, the one home of the defaults: DDPM all T once bound, DDIM 50, solvers 10
    assert Sampler("ddpm").steps is None and Sampler("ddpm").bind(diff).name == "ddpm1000"
    assert Sampler("ddim").steps == 50 and Sampler("unipc").steps == 10 and Sampler("heun", nfe=None).nfe == 19
    assert Sampler("ddim", spacing=None, eta=None, clip_denoised=None) == Sampler("ddim")


@pytest.mark.parametrize(
    "method,nfe,steps,label",
    [("ddim", 10, 10, "DDIM eta=0"), ("heun", 10, 5, "Heun"), ("heun", 9, 5, "Heun"), ("unipc", 7, 7, "UniPC-2")],
)
def test_nfe_budget_gives_the_most_steps_that_fit(method, nfe, steps, label):
    s = Sampler(method, nfe=nfe)
    assert s.steps == steps and s.nfe <= nfe and s.label == label
    assert Sampler(method, nfe=s.nfe + 2).nfe > s.nfe  # a larger budget buys more


def test_every_method_counts_its_network_evaluations():
    """NFE is measured, not declared: a counting model sees exactly Sampler.nfe calls per sample."""
    from diffusion_lab.diffusion import METHODS

    calls = []

    for name in METHODS:
        diff, inner = _process_and_model(name, 100)

        def model(x, t, inner=inner, **kw):
            calls.append(1)
            return inner(x, t, **kw)

        calls.clear()
        s = Sampler(name, nfe=8)
        s(diff, model, torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)))
        assert len(calls) == s.nfe, (name, len(calls), s.nfe)


def _process_and_model(method: str, steps: int):
    """A process and model `method` runs on: the DDPM process with _model, or for the methods of one objective's
    models (MeanFlow's two-time net) that objective's exact model."""
    from diffusion_lab.diffusion import METHODS, Flow, GaussianData

    if "meanflow" in (METHODS[method].objectives or ()):
        flow = Flow(steps=steps)
        return flow, GaussianData(0.1, 0.5).mean_flow_model(flow)
    return GaussianDiffusion(get_betas("linear", steps)), _model


@pytest.mark.parametrize("method", sorted(__import__("diffusion_lab.diffusion", fromlist=["METHODS"]).METHODS))
def test_every_method_inpaints_keeping_the_known_region_exactly(method):
    """paint runs every registered method, with the known region replaced after each of its steps: the result
    equals the original there bit for bit, is finite and moves in the unknown region; a partial run
    (start_index) works too; and the noise of image i comes from its own generator, so the batch does not matter."""
    from diffusion_lab.diffusion import ImageGenerators, sampling_times

    diff, _model = _process_and_model(method, 200)
    x0 = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1
    ts = Sampler(method, nfe=9).timesteps(diff)
    out = paint(diff, _model, x0, mask, ts, method=method, generator=ImageGenerators.for_images(0, range(3)))
    assert torch.equal(out[..., :3], x0[..., :3]) and torch.isfinite(out).all(), method
    assert not torch.allclose(out[..., 3:], x0[..., 3:])
    one = paint(diff, _model, x0[1:2], mask, ts, method=method, generator=ImageGenerators.for_images(0, [1]))
    torch.testing.assert_close(one, out[1:2], rtol=1e-5, atol=1e-6)
    part = paint(diff, _model, x0, mask, sampling_times(diff, "trailing", 8), method=method, start_index=4,
                 generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(part[..., :3], x0[..., :3]) and torch.isfinite(part).all()


def test_sample_py_inpaints_with_a_fast_solver(tiny_ckpt, tmp_path):
    """`sample.py mode=inpaint sampler=dpmpp_2m` used to end in a TypeError traceback; now it writes the strip."""
    from diffusion_lab.tasks import sample

    cfg = compose_train([f"ckpt_path={tiny_ckpt}", "mode=inpaint", "sampler=dpmpp_2m", "num_images=2"], tmp_path,
                        "sample")  # fmt: skip
    assert sample(cfg).exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "sampler").glob("[!_]*.yaml")
                                         if p.stem != "run"))  # run: a checkpoint's own (tests/test_processes.py)
def test_every_sampler_config_builds_its_registered_method(tmp_path, name):
    """`sampler=<name>` composes and instantiates the registry's method of that name (a variant such as ddim_eta1:
    the method its defaults list includes, with options set); `sampler.nfe=10` gives a sampler whose measured NFE
    fits the budget."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffusion_lab.diffusion.registry import METHODS

    path = ROOT / "conf" / "sampler" / f"{name}.yaml"
    base = name if name in METHODS else OmegaConf.load(path).defaults[0]  # a variant: the method it includes
    cfg = compose_train([f"sampler={name}"], tmp_path)
    s = instantiate(cfg.sampler)
    assert s.method is METHODS[base]
    budget = instantiate(compose_train([f"sampler={name}", "sampler.nfe=10"], tmp_path).sampler)
    assert budget.nfe <= 10 and budget.method is METHODS[base]


def test_solver_sweep_names_only_registered_methods():
    """conf/sweep/solver_x_nfe.yaml sweeps sampler configs that exist, each a registered method."""
    from omegaconf import OmegaConf

    from diffusion_lab.diffusion.registry import METHODS

    sweep = OmegaConf.load(ROOT / "conf" / "sweep" / "solver_x_nfe.yaml")
    params = sweep.hydra.sweeper.params
    methods = str(params["sampler"]).split(",")
    assert methods and all(m in METHODS and (ROOT / "conf" / "sampler" / f"{m}.yaml").exists() for m in methods)
    assert [int(k) for k in str(params["sampler.nfe"]).split(",")] == [5, 10, 20, 50]


def _grid(overrides, tmp_path, conditional=False):
    """evaluate.py's (sampler, role) rows for `overrides` on a 100-step process (no checkpoint needed)."""
    from types import SimpleNamespace

    from diffusion_lab.diffusion.objectives import Denoising
    from diffusion_lab.tasks import _samplers

    chosen = [] if any(o.startswith("sampler=") for o in overrides) else ["sampler=ddim"]  # no run to read it from
    cfg = compose_train(["ckpt_path=x.ckpt", "grid.ddpm_steps=[100]", *chosen, *overrides], tmp_path, "evaluate")
    return _samplers(cfg, SimpleNamespace(diffusion=GaussianDiffusion(get_betas("linear", 100)),
                                          conditional=conditional, objective=Denoising()))  # fmt: skip


def test_the_grid_keeps_every_key_of_the_configured_sampler(tmp_path):
    """The grid varies only the method and the NFE: sampler=ddim_eta1 gives eta 1 rows (it used to score eta 0),
    sampler.spacing reaches every curve, options go to the methods that take them, the reference is DDPM on its
    own grid; grid.methods defaults to the configured sampler's method."""
    rows = _grid(["sampler=ddim_eta1", "grid.nfe=[5,10]"], tmp_path)
    assert [(s.name, role) for s, role in rows] == [
        ("ddim5_eta1", "curve"), ("ddim10_eta1", "curve"), ("ddpm100", "reference")]
    rows = _grid(["sampler=ddim_eta1", "grid.methods=[ddim,dpmpp_2m,unipc]", "grid.nfe=[10]",
                  "sampler.spacing=logsnr", "sampler.clip_denoised=false"], tmp_path)  # fmt: skip
    curves = [s for s, role in rows if role == "curve"]
    assert [s.method.name for s in curves] == ["ddim", "dpmpp_2m", "unipc"]
    assert all(s.spacing == "logsnr" and not s.clip_denoised for s in curves)
    assert curves[0].options["eta"] == 1.0 and "eta" not in curves[1].options
    ref = next(s for s, role in rows if role == "reference")
    assert ref.spacing == "even" and not ref.clip_denoised
    rows = _grid(["sampler=unipc", "sampler.order=3", "grid.nfe=[10,20]", "grid.ddpm_steps=[]"], tmp_path)
    assert [(s.name, s.label) for s, _ in rows] == [("unipc10_order3", "UniPC-3"), ("unipc20_order3", "UniPC-3")]


def test_grid_and_sampler_errors_name_the_keys_the_user_typed(tmp_path):
    from diffusion_lab.config import ConfigError

    with pytest.raises(ConfigError, match=r"grid.methods='dpm_fast' is unknown; allowed: ddpm, ddim"):
        _grid(["grid.methods=[ddim,dpm_fast]"], tmp_path)
    with pytest.raises(ConfigError, match=r"grid.nfe\[0\]=0 must be an integer >= 1"):
        _grid(["grid.nfe=[0,10]"], tmp_path)
    with pytest.raises(ConfigError, match=r"sampler.steps=20 is set, but the grid sets the NFE of each row"):
        _grid(["sampler.steps=20"], tmp_path)
    with pytest.raises(ConfigError, match=r"sampler.order=3 is not an option of any grid method \(grid.methods="):
        _grid(["sampler=unipc", "sampler.order=3", "grid.methods=[ddim]"], tmp_path)
    with pytest.raises(ConfigError, match=r"^sampler.steps=10 and sampler.nfe=20 are both set: give one of them"):
        _grid(["grid=null", "sampler.steps=10", "sampler.nfe=20"], tmp_path)


def test_the_default_sampler_fits_a_process_with_fewer_steps_than_its_default():
    """A model of a 20-step process samples with DDIM at its 20 steps when none is given (the registry's DDIM-50
    cannot run there); from 50 steps on, the registry's 50. load_module of such a checkpoint used to fail."""
    from diffusion_lab.diffusion import GaussianDiffusion

    short, long = (GaussianDiffusion.from_schedule("cosine", t) for t in (20, 100))
    assert Sampler.default_for(short).config() == Sampler("ddim", steps=20).config()
    assert Sampler.default_for(long).config() == Sampler("ddim", steps=50).config()
