"""The training objectives (diffusion/objectives.py) and the few-step samplers (diffusion/few_step.py) by their
numbers: denoising = the process's own loss, ECT at its first stage = the denoising loss, the MeanFlow JVP target =
central finite differences, the exact Gaussian average velocity makes the MeanFlow loss vanish and gives
mu + s z in one step, and the consistency sampler = diffusers' CMStochasticIterativeScheduler."""

import math

import pytest
import torch

from diffusion_lab.diffusion import EDM, Flow, GaussianDiffusion, Sampler
from diffusion_lab.diffusion.analytic import GaussianData
from diffusion_lab.diffusion.objectives import ECT, Denoising, MeanFlow
from diffusion_lab.diffusion.timesteps import LossAwareTimestepSampler, UniformTimestepSampler
from diffusion_lab.nets import UNet

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
DATA = GaussianData(mu=0.1, s=0.5)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _net(time_inputs=1, dtype=torch.float32, learn_sigma=False, seed=0):
    torch.manual_seed(seed)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), time_inputs=time_inputs, learn_sigma=learn_sigma)  # fmt: skip
    with torch.no_grad():  # a net whose output depends on every input (the zero-initialized head and h-embedding)
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=_gen(seed + 1)))
    return net.to(dtype).eval()


PROCESSES = {
    "ddpm": (lambda: GaussianDiffusion.from_schedule("linear", 100), lambda p: UniformTimestepSampler(100), False),
    "iddpm": (lambda: GaussianDiffusion.from_schedule("cosine", 100, var_type="learned_range",
                                                      loss_type="rescaled_mse"),
              lambda p: LossAwareTimestepSampler(100), True),
    "edm": (lambda: EDM(), lambda p: None, False),
    "flow": (lambda: Flow(t_sampling="logit_normal"), lambda p: None, False),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PROCESSES))
def test_denoising_objective_is_the_process_loss(name):
    """objective=denoising draws t from the timestep sampler, then the process's training_losses draws the noise:
    the same numbers, bit for bit, as calling them directly (what DiffusionModule.training_step did before)."""
    make, sampler, learn_sigma = PROCESSES[name]
    process, net, x0 = make(), _net(learn_sigma=learn_sigma), torch.randn(6, 1, 8, 8, generator=_gen(3))
    objective = Denoising().bind(process, sampler(process))
    torch.manual_seed(7)
    out = objective(net, x0)
    torch.manual_seed(7)
    t, w = objective.timesteps.sample(6)
    ref = process.training_losses(net, x0, t)
    assert torch.equal(out.t, t) and torch.equal(out.weights, w)
    assert out.terms.keys() == ref.keys() and all(torch.equal(out.terms[k], ref[k]) for k in ref)


def test_ect_first_stage_is_the_denoising_loss():
    """Stage 0 has r = 0 for every t, so the target is x0 itself: the ECT loss is the L2 distance between the
    denoiser's x0 and x0, weighted 1/t, i.e. sqrt(CHW c_out^2 mse_F) / t with mse_F EDM's own loss term on the same
    t and noise (F's error is |D - x0| / c_out)."""
    edm, net, x0 = EDM(), _net(dtype=F64), torch.randn(8, 1, 8, 8, generator=_gen(1), dtype=F64)
    ect = ECT(first_stage=0).bind(edm)
    out = ect(net, x0, generator=_gen(5))
    g = _gen(5)
    t = (ect.p_mean + ect.p_std * torch.randn(8, generator=g, dtype=F64)).exp()
    noise = torch.randn(x0.shape, generator=g, dtype=F64)
    assert torch.equal(ect.r_of(t, 0), torch.zeros(8, dtype=F64))
    mse_f = edm.training_losses(net, x0, t, noise)["mse"]
    c_out = t * 0.5 / (t**2 + 0.25).sqrt()
    torch.testing.assert_close(out.terms["loss"], (64 * c_out**2 * mse_f).sqrt() / t, rtol=1e-12, atol=0)
    # from stage 1 on, r > 0 where t is large (ECT's sigmoid mapping: t > ln 7 at q = 2) and r/t -> 1 - 2^-stage
    t = torch.tensor([0.5, 1.9, 2.0, 80.0], dtype=F64)
    r1 = ect.r_of(t, 1)
    assert r1[0] == r1[1] == 0 and r1[2] > 0 and abs(float(r1[3] / t[3]) - (1 - (1 + 8 * math.exp(-80)) / 2)) < 1e-12
    assert float(ect.r_of(t, 5)[3] / t[3]) == pytest.approx(1 - 1 / 32, rel=1e-12)


def test_ect_pairs_share_noise_and_dropout():
    """pair=noise: x_r = x0 + r eps with the x_t's eps; the target pass reuses the first pass's dropout mask (a net
    with dropout gives the same f at r = t as the gradient pass), and the stage follows the step."""
    edm = EDM()
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
               attention_resolutions=(4,), dropout=0.5).to(F64).train()  # fmt: skip
    ect = ECT(first_stage=40, mapping="const").bind(edm)  # r = t (1 - 2^-40): f(x_r) = f(x_t) up to 1e-12
    x0 = torch.randn(4, 1, 8, 8, generator=_gen(2), dtype=F64)
    out = ect(net, x0, generator=_gen(3))
    assert out.terms["mse"].max() < 1e-20  # same mask; without it dropout 0.5 differs by O(1)
    assert ect.stage(0) == 40 and ect.stage(3 * 25_000 + 1) == 43


def _jvp_target_fd(objective, net, z, t, r, v, eps=1e-5):
    """u_tgt = v - (t - r) du/dt with du/dt by central differences along (z, t, r) + eps (v, 1, 0)."""
    u = lambda z_, t_: objective.process.average_velocity(net, z_, t_, r)
    dudt = (u(z + eps * v, t + eps) - u(z - eps * v, t - eps)) / (2 * eps)
    return v - (t - r).reshape(-1, 1, 1, 1) * dudt


def test_meanflow_jvp_target_equals_finite_differences():
    """The JVP (torch.func.jvp through the U-Net, attention and both time embeddings) against a central
    finite-difference estimate of du/dt in float64."""
    flow, net = Flow(), _net(time_inputs=2, dtype=F64)
    mf = MeanFlow().bind(flow)
    z, v = (torch.randn(3, 1, 8, 8, generator=_gen(s), dtype=F64) for s in (1, 2))
    t, r = torch.tensor([0.9, 0.5, 0.3], dtype=F64), torch.tensor([0.1, 0.5, 0.05], dtype=F64)
    u, u_tgt = mf.target(net, z, t, r, v)
    assert torch.equal(u, flow.average_velocity(net, z, t, r))
    with torch.no_grad():
        err = [float((u_tgt - _jvp_target_fd(mf, net, z, t, r, v, eps)).abs().max()) for eps in (1e-5, 1e-6, 1e-7)]
    # central differences converge at second order to the JVP (the 1000 t time scale makes their constant large)
    assert 50 < err[0] / err[1] < 200 and err[2] < 2e-7, err
    assert (u_tgt - v)[0].abs().max() > 1e-3  # the derivative term is not negligible here


def test_meanflow_loss_vanishes_on_the_exact_average_velocity():
    """For Gaussian data the average velocity is known in closed form (GaussianData.average_velocity): it satisfies
    MeanFlow's identity u = v - (t - r) du/dt with the flow's velocity v(z, t) = u(z, t, t), so the loss against
    that target is 0 at every (r, t). (Training regresses on the conditional velocity eps - x0 instead, whose mean
    given z_t is v: the same minimizer, a loss that does not vanish.)"""
    flow = Flow()
    model = DATA.mean_flow_model(flow)
    mf = MeanFlow(ratio=0.5).bind(flow)
    t, r = mf.times(64, _gen(1))
    assert (r < t).sum() > 20 and (r == t).sum() > 20
    z = torch.randn(64, 1, 4, 4, generator=_gen(2), dtype=F64)
    u, u_tgt = mf.target(model, z, t, r, DATA.average_velocity(z, t, t))
    assert (u - u_tgt).abs().max() < 1e-13 and (u - DATA.average_velocity(z, t, t)).abs().max() > 1e-2
    # the instantaneous velocity is E[eps - x0 | z_t]: the exact flow model's
    z, t = torch.randn(5, 1, 4, 4, generator=_gen(2), dtype=F64), torch.full((5,), 0.3, dtype=F64)
    v = DATA.model(flow)(z, flow.network_time(t))
    torch.testing.assert_close(DATA.average_velocity(z, t, t), v, rtol=0, atol=1e-14)
    # and the average over [r, t] is the secant of the flow map: u = (z - z_r) / (t - r)
    r = torch.full((5,), 0.1, dtype=F64)
    sd = lambda s: math.sqrt((1 - s) ** 2 * DATA.s**2 + s**2)
    z_r = (1 - 0.1) * DATA.mu + sd(0.1) / sd(0.3) * (z - (1 - 0.3) * DATA.mu)
    torch.testing.assert_close(DATA.average_velocity(z, t, r), (z - z_r) / 0.2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_meanflow_sampler_on_the_exact_model_is_the_data_map(steps):
    """z_0 = z_1 - u(z_1, 0, 1) = mu + s z_1 exactly, in one jump or several (each jump is exact)."""
    flow = Flow()
    sampler = Sampler("meanflow", steps=steps, clip_denoised=False).bind(flow, "meanflow")
    z = torch.randn(6, 1, 4, 4, generator=_gen(3), dtype=F64)
    x = sampler(flow, DATA.mean_flow_model(flow), z)
    torch.testing.assert_close(x, DATA.mu + DATA.s * z, rtol=0, atol=1e-12)
    assert sampler.nfe == steps


def test_few_step_samplers_are_refused_on_other_models():
    """Each few-step sampler samples the models of its objective; one line otherwise."""
    with pytest.raises(ValueError, match="sampler.method=meanflow samples models trained with objective=meanflow"):
        Sampler("meanflow").bind(Flow())
    with pytest.raises(ValueError, match="objective=ect"):
        Sampler("consistency").bind(EDM(), "meanflow")
    with pytest.raises(ValueError, match="needs diffusion=flow"):
        MeanFlow().bind(EDM())
    with pytest.raises(ValueError, match="objective=ect needs a continuous noise level"):
        ECT().bind(GaussianDiffusion.from_schedule("linear", 100))
    with pytest.raises(ValueError, match="disagrees"):
        Sampler("consistency", steps=3, mid_sigmas=[0.8])
    with pytest.raises(ValueError, match="descending"):
        Sampler("consistency", mid_sigmas=[0.5, 0.8])


def test_consistency_sampler_equals_diffusers():
    """Multistep consistency sampling (Song et al. 2023, Alg. 1) against diffusers' CMStochasticIterativeScheduler
    with the same denoiser, sigmas (80, 0.821), x_T and noise generator. diffusers applies the consistency-model
    preconditioning with its sigma_min itself, so our EDM process runs with mean_type=x0 on that same denoiser."""
    diffusers = pytest.importorskip("diffusers")
    edm = EDM(mean_type="x0")
    sd, s_min = 0.5, 0.002
    weight = torch.randn(1, 1, 3, 3, generator=_gen(4))

    def F(x_in, c_noise):  # any network: a fixed convolution, modulated by the noise level
        scale = 1 + 0.01 * c_noise.reshape(-1, 1, 1, 1)
        return torch.tanh(torch.nn.functional.conv2d(x_in, weight, padding=1)) * scale

    def denoiser(x, model_t):  # D(x, sigma) with diffusers' boundary-condition c_skip / c_out (sigma_min = 0.002)
        s = (4 * model_t).exp().reshape(-1, 1, 1, 1)
        c_skip = sd**2 / ((s - s_min) ** 2 + sd**2)
        c_out = (s - s_min) * sd / (s**2 + sd**2).sqrt()
        return c_skip * x + c_out * F(x / (s**2 + sd**2).sqrt(), 250 * s.log())

    x_T = 80 * torch.randn(4, 1, 8, 8, generator=_gen(5))
    for mids in ([], [0.821]):
        sampler = Sampler("consistency", mid_sigmas=mids or None).bind(edm, "ect")
        ours = sampler(edm, denoiser, x_T.clone(), generator=_gen(6))
        sch = diffusers.CMStochasticIterativeScheduler(sigma_min=s_min, sigma_max=80.0, sigma_data=sd)
        sch.set_timesteps(num_inference_steps=1)
        sch.sigmas = torch.tensor([80.0, *mids, s_min])
        sch.timesteps = 250 * sch.sigmas[:-1].double().log()
        x, g = x_T.clone(), _gen(6)
        for t in sch.timesteps:
            out = F(sch.scale_model_input(x, t), torch.full((4,), float(t)))
            x = sch.step(out, t, x, generator=g).prev_sample
        torch.testing.assert_close(ours, x, rtol=0, atol=2e-5)
        assert sampler.nfe == 1 + len(mids)


def _rectified_flow_pytorch_mean_flow():
    """rectified-flow-pytorch's MeanFlow class, loaded from its mean_flow.py alone (the package's __init__ imports a
    training stack its loss does not use; make install adds the package with --no-deps)."""
    import importlib.util

    pytest.importorskip("einops")
    spec = importlib.util.find_spec("rectified_flow_pytorch")
    if spec is None:
        pytest.skip("rectified-flow-pytorch is not installed (make install adds it)")
    path = spec.submodule_search_locations[0] + "/mean_flow.py"
    module_spec = importlib.util.spec_from_file_location("rfp_mean_flow", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.MeanFlow


def test_meanflow_loss_equals_rectified_flow_pytorch():
    """Our MeanFlow loss and gradients against rectified-flow-pytorch 0.14.0's on the same net, batch, noise and
    (r, t). Its conventions mapped: it calls model(z, t, t - r) (ours: net(z, 1000 t, h=1000 (t - r))) and averages
    the squared error over the D pixels before the adaptive weight 1 / (l + eps)^p, where MeanFlow's paper sums
    them: ours with c = D eps is D^(1 - p) times its loss. (It decides r = t once per batch, not per example as the
    paper does; with its prob_default_flow_obj=0 and r = t given for some examples both are per example here.)"""
    peer_class = _rectified_flow_pytorch_mean_flow()
    net, flow, D, p, eps = _net(time_inputs=2), Flow(), 64, 0.75, 1e-3
    x0 = torch.randn(6, 1, 8, 8, generator=_gen(1))
    t = torch.tensor([0.9, 0.7, 0.5, 0.5, 0.2, 0.95])
    r = torch.tensor([0.1, 0.7, 0.25, 0.5, 0.05, 0.0])  # two examples with r = t (flow matching)
    noise = torch.randn(x0.shape, generator=_gen(2), dtype=F64)
    ours = MeanFlow(p=p, c=D * eps).bind(flow)
    ours.times = lambda n, generator=None: (t.double(), r.double())
    loss = ours(net, x0, generator=_gen(2)).terms["loss"].mean()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    peer = peer_class(lambda z, tt, d: net(z, 1000 * tt, h=1000 * d), data_shape=(1, 8, 8), adaptive_loss_weight_p=p,
                      eps=eps, prob_default_flow_obj=0.0)  # fmt: skip
    draws = iter([t, r])
    peer.sample_times = lambda batch: next(draws)
    peer_loss = peer(x0, noise=noise.float())
    peer_grads = torch.autograd.grad(peer_loss, list(net.parameters()))
    scale = D ** (1 - p)
    torch.testing.assert_close(loss, scale * peer_loss, rtol=1e-5, atol=0)
    for a, b in zip(grads, peer_grads):
        torch.testing.assert_close(a, scale * b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("process", [EDM(), Flow()], ids=["edm", "flow"])
def test_ect_teacher_pair_is_an_euler_step_of_the_teachers_ode(process):
    """pair=teacher (consistency distillation): x_r is one Euler step of the teacher's probability-flow ODE in the VE
    variables (Karras et al. 2022, eq. 4: dx/ds = (x - D(x; s)) / s on x / alpha, s = sigma / alpha)."""
    teacher = _net(dtype=F64, seed=3)
    ect = ECT(pair="teacher").bind(process, teacher=teacher)
    s_t, s_r = torch.tensor([0.5, 3.0, 20.0], dtype=F64), torch.tensor([0.2, 2.9, 5.0], dtype=F64)
    u_t, u_r = process.u_at_sigma(s_t), process.u_at_sigma(s_r)
    x_t = process.q_sample(torch.randn(3, 1, 8, 8, generator=_gen(1), dtype=F64), u_t,
                           torch.randn(3, 1, 8, 8, generator=_gen(2), dtype=F64))  # fmt: skip
    a_t, a_r = (process.path(u)[0].reshape(-1, 1, 1, 1) for u in (u_t, u_r))
    d = process.denoise_u(teacher, x_t, u_t)[0]
    st, sr = s_t.reshape(-1, 1, 1, 1), s_r.reshape(-1, 1, 1, 1)
    euler = x_t / a_t + (sr - st) * (x_t / a_t - d) / st
    torch.testing.assert_close(ect._teacher_step(x_t, u_t, u_r, None), a_r * euler, rtol=0, atol=1e-12)
