"""Guidance (diffusion/guidance.py) on exact models: APG equals diffusers' normalized_guidance, an interval that covers
every step is plain CFG and an empty one is no guidance (with the NFE to match), autoguidance by the model itself is
no guidance, the mixed denoiser of two exact Gaussian models is the closed form, and every rule gives the same
images at any batch size."""

import math

import pytest
import torch

from diffusion_lab.diffusion import EDM, ClassifierFreeGuidance, Flow, GaussianData, GaussianDiffusion, Sampler
from diffusion_lab.diffusion import solvers as S
from diffusion_lab.diffusion.guidance import Guidance, apg_update
from diffusion_lab.diffusion.respace import sampling_times
from diffusion_lab.diffusion.seeding import draw

F64 = torch.float64
NULL = 3  # the null label of the toy conditional model (labels 0..2)
COND, UNCOND = GaussianData(mu=0.3, s=0.4), GaussianData(mu=0.0, s=0.6)

pytestmark = pytest.mark.usefixtures("one_thread")


def _conditional(diffusion):
    """An exact class-conditional model: N(0.3 + 0.1 y, 0.4^2) per pixel given y, N(0, 0.6^2) for the null label."""
    uncond = UNCOND.model(diffusion)
    conds = [GaussianData(mu=COND.mu + 0.1 * k, s=COND.s).model(diffusion) for k in range(NULL)]

    def model(x, t, y, **_):
        out = uncond(x, t)
        for k, m in enumerate(conds):
            out = torch.where((y == k).reshape(-1, 1, 1, 1), m(x, t), out)
        return out

    return model


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


PROCESSES = {"vp": lambda: GaussianDiffusion.from_schedule("cosine", 1000), "edm": EDM, "flow": Flow}


# --------------------------------------------------------------------------- APG = diffusers
@pytest.mark.parametrize("eta,threshold,momentum", [(0.0, 0.0, 0.0), (0.0, 2.0, -0.5), (0.5, 1.0, -0.75),
                                                    (1.0, 0.0, 0.3)])  # fmt: skip
def test_apg_equals_diffusers_normalized_guidance(eta, threshold, momentum):
    """Four guided calls in a row on random [4, 3, 8, 8] predictions (momentum carried between them): our
    D_u + w apg_update(D_c - D_u, D_c) is diffusers' normalized_guidance with its MomentumBuffer."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    g = torch.Generator().manual_seed(0)
    buffer, state = MomentumBuffer(momentum), {}
    for _ in range(4):
        cond, uncond = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
        theirs = normalized_guidance(cond, uncond, 4.0, buffer if momentum else None, eta, threshold)
        ours = uncond + 4.0 * apg_update(cond - uncond, cond, state, eta, threshold, momentum)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert (ours - (uncond + 4.0 * (cond - uncond))).abs().max() > 0.1  # not CFG (momentum: from the 2nd call)


def test_apg_with_eta_one_no_cap_no_momentum_is_cfg():
    process = PROCESSES["vp"]()
    model, x, y = _conditional(process), _randn(4, 1, 3, 3, seed=1), torch.tensor([0, 1, 2, 0])
    ts = sampling_times(process, "logsnr", 8)
    apg = Guidance("apg", 2.5, eta=1.0, norm_threshold=0.0, momentum=0.0).bind(null_label=NULL)
    cfg = Guidance("cfg", 2.5).bind(null_label=NULL)
    a = S.unipc(process, model, x, ts, model_kwargs={"y": y}, guidance=apg, clip_denoised=False)
    b = S.unipc(process, model, x, ts, model_kwargs={"y": y}, guidance=cfg, clip_denoised=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the interval
@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m", "unipc", "heun", "euler_ancestral"])
def test_full_interval_is_cfg_and_empty_interval_is_no_guidance(name, method):
    """Guidance on (0, inf] equals CFG as a wrapped model (the network outputs mixed), 2 evaluations per call; on an
    interval no step reaches it equals the unguided sampler bit for bit, 1 evaluation per call."""
    process = PROCESSES[name]()
    model, y = _conditional(process), torch.tensor([0, 1, 2, 1])
    ts = sampling_times(process, "logsnr" if name == "vp" else "karras", 6)
    x = _randn(4, 1, 3, 3, seed=2) * process.noise_std(ts[-1])
    fn, kw = getattr(S, method), {"model_kwargs": {"y": y}, "clip_denoised": True}
    if method == "euler_ancestral":
        kw["generator"] = torch.Generator().manual_seed(5)

    def run(guidance=None, wrapped=model):
        if "generator" in kw:
            kw["generator"].manual_seed(5)
        calls = []

        def counting(x, t, **k):
            calls.append(x.shape[0])
            return wrapped(x, t, **k)

        out = fn(process, counting, x, ts, guidance=guidance, **kw)
        return out, sum(calls) // x.shape[0]

    evals = Sampler(method, steps=6).nfe
    full = Guidance("cfg", 2.0, interval=(0.0, math.inf)).bind(null_label=NULL)
    guided, n_guided = run(full)
    reference, _ = run(wrapped=ClassifierFreeGuidance(model, 2.0, NULL))
    torch.testing.assert_close(guided, reference, rtol=0, atol=1e-10)
    assert n_guided == 2 * evals
    empty = Guidance("cfg", 2.0, interval=(1e6, 1e7)).bind(null_label=NULL)
    out, n_empty = run(empty)
    plain, _ = run()
    assert torch.equal(out, plain) and n_empty == evals
    assert (guided - plain).abs().max() > 1e-3  # guidance did something


def test_a_partial_interval_guides_only_the_steps_inside_it():
    """On (0.5, 2]: the evaluations whose sigma lies inside are guided (2 each), the others not; the Sampler's NFE
    counts exactly those."""
    process = EDM()
    model, y = _conditional(process), torch.tensor([0, 2])
    sampler = Sampler("heun", steps=8, guidance="cfg", guidance_scale=2.0, guidance_interval=[0.5, 2.0]).bind(process)
    sigmas = [float(process.sigma_at(t)) for t in sampler.timesteps(process)]
    seen = []

    def counting(x, t, **k):
        seen.append(x.shape[0])
        return model(x, t, **k)

    sampler(process, counting, _randn(2, 1, 2, 2, seed=3) * 80.0, model_kwargs={"y": y}, null_label=NULL)
    inside = sum(0.5 < s <= 2.0 for s in sigmas) + sum(0.5 < s <= 2.0 for s in sigmas[:-1])  # Heun's 2nd evals
    assert 0 < inside < 15
    assert sampler.nfe == sum(seen) // 2 == 15 + inside  # 2N - 1 evaluations, the guided ones twice


# --------------------------------------------------------------------------- autoguidance
@pytest.mark.parametrize("w", [0.0, 0.5, 2.0, 7.0])
def test_autoguidance_by_the_model_itself_is_no_guidance(w):
    process = Flow()
    model, x = UNCOND.model(process), _randn(3, 1, 4, 4, seed=4)
    ts = sampling_times(process, "trailing", 8)
    guided = S.dpmpp_2m(process, model, x, ts, guidance=Guidance("autoguidance", w).bind(guide=model))
    assert torch.equal(guided, S.dpmpp_2m(process, model, x, ts))


@pytest.mark.parametrize("name", list(PROCESSES))
def test_autoguidance_of_two_exact_models_is_the_mixed_denoiser(name):
    """Main N(mu, s^2), guide N(mu, s_g^2) with s_g != s: D = D_g + w (D_m - D_g) with the Gaussian denoiser
    D(x_t) = mu + s^2 alpha (x_t - alpha mu) / (alpha^2 s^2 + sigma^2), at several times; eps follows from it."""
    process = PROCESSES[name]()
    main, guide = GaussianData(mu=0.2, s=0.5), GaussianData(mu=0.2, s=0.8)
    w, x = 2.5, _randn(2, 1, 3, 3, seed=6)
    calls = []

    def counted(model, who):
        return lambda x_in, t, **kw: calls.append(who) or model(x_in, t, **kw)

    denoiser = Guidance("autoguidance", w).bind(guide=counted(guide.model(process), "guide")).denoiser(
        process, counted(main.model(process), "main"), None, False)  # fmt: skip

    def exact(data, x_t, alpha, sigma):
        return data.mu + data.s**2 * alpha * (x_t - alpha * data.mu) / (alpha**2 * data.s**2 + sigma**2)

    for t in sampling_times(process, "logsnr" if name == "vp" else "karras", 5)[:-1]:
        alpha, sigma = (float(v) for v in process.alpha_sigma_at(t))
        x_t = x * math.sqrt(alpha**2 * 0.25 + sigma**2)
        x0, eps = denoiser(x_t, t)
        d_main, d_guide = exact(main, x_t, alpha, sigma), exact(guide, x_t, alpha, sigma)
        torch.testing.assert_close(x0, d_guide + w * (d_main - d_guide), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps, (x_t - alpha * x0) / sigma, rtol=1e-9, atol=1e-9)
    assert calls == ["main", "guide"] * 4  # two networks per call


# --------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("keys", [
    {"guidance": "cfg", "guidance_scale": 2.0},
    {"guidance": "cfg", "guidance_scale": 2.0, "guidance_interval": [0.3, 5.0]},
    {"guidance": "apg", "guidance_scale": 3.0, "apg_norm_threshold": 0.5, "apg_momentum": -0.5},
    {"guidance": "autoguidance", "guidance_scale": 2.0},
])  # fmt: skip
def test_same_seed_same_images_at_any_batch_size_under_every_rule(keys):
    process = PROCESSES["vp"]()
    model = _conditional(process)
    sampler = Sampler("ddim", steps=6, eta=1.0, **keys).bind(process)
    if keys["guidance"] == "autoguidance":
        sampler = sampler.with_guide(GaussianData(mu=0.3, s=0.7).model(process))
    out = {b: draw(process, model, sampler, (1, 3, 3), seed=9, indices=range(5), batch_size=b, num_classes=NULL,
                   null_label=NULL, dtype=F64)[0] for b in (2, 5)}  # fmt: skip
    assert torch.equal(out[2], out[5])


# --------------------------------------------------------------------------- bad keys, one line each
@pytest.mark.parametrize("keys,message", [
    ({"guidance": "pag", "guidance_scale": 2.0}, "sampler.guidance='pag' is unknown"),
    ({"guidance": "apg"}, "sampler.guidance=apg needs sampler.guidance_scale"),
    ({"guidance_scale": 2.0, "apg_eta": 0.5}, "sampler.apg_eta is APG's"),
    ({"guidance_scale": 2.0, "guidance_interval": [2.0, 1.0]}, "sampler.guidance_interval=[2.0, 1.0] must be"),
    ({"guidance_scale": 2.0, "guidance_interval": "low"}, "sampler.guidance_interval='low' must be"),
    ({"guidance": "apg", "guidance_scale": 2.0, "apg_momentum": 1.5}, "sampler.apg_momentum=1.5 must lie"),
    ({"guidance_scale": -1.0}, "sampler.guidance_scale"),
    ({"guide": {"ckpt": "a.ckpt"}, "guidance_scale": 2.0}, "sampler.guide is autoguidance's"),
    ({"guide": {"weights": "a.ckpt"}, "guidance": "autoguidance", "guidance_scale": 2.0}, "sampler.guide.weights"),
])  # fmt: skip
def test_bad_guidance_keys_are_refused_in_one_line(keys, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        Sampler("unipc", steps=5, **keys)
    assert "\n" not in str(e.value)


def test_meanflow_refuses_guidance():
    with pytest.raises(ValueError, match="sampler.method=meanflow"):
        Sampler("meanflow", guidance_scale=2.0)


@pytest.mark.parametrize("var_type", ["fixed_small", "learned_range"])
def test_ddpm_ancestral_steps_take_every_rule(var_type):
    """DDPM's ancestral loop is guided through the one denoiser (issue 44): CFG on (0, inf] equals CFG as a wrapped
    model (ClassifierFreeGuidance mixes the network outputs, a learned variance is the conditional half's) with 2
    evaluations per step; an empty interval, and autoguidance by the model itself, equal the unguided loop with 1;
    a partial interval is counted by Sampler.nfe as evaluated; APG and a weaker guide move the samples."""
    from diffusion_lab.diffusion import ddpm_sample

    process = GaussianDiffusion.from_schedule("linear", 100, var_type=var_type)

    def with_variance(exact, shift=0.0):  # a learned variance channel: v in [-1, 1], learned_range's frac
        def net(x, t, y=None):
            v = torch.tanh(x + shift + (0 if y is None else 0.01 * y.reshape(-1, 1, 1, 1)))
            return torch.cat([exact(x, t, y), v], 1) if process.learns_sigma else exact(x, t, y)

        return net

    model = with_variance(_conditional(process))

    x, y, ts = _randn(4, 1, 3, 3, seed=4), torch.tensor([0, 1, 2, 1]), Sampler("ddpm", steps=10).timesteps(process)

    def run(guidance=None, wrapped=model):
        calls = []

        def counting(x, t, **k):
            calls.append(x.shape[0])
            return wrapped(x, t, **k)

        out = ddpm_sample(process, counting, x, ts, model_kwargs={"y": y}, guidance=guidance,
                          generator=torch.Generator().manual_seed(5))  # fmt: skip
        return out, sum(calls) // x.shape[0]

    plain, n_plain = run()
    guided, n_guided = run(Guidance("cfg", 2.0, interval=(0.0, math.inf)).bind(null_label=NULL))
    wrapped, _ = run(wrapped=ClassifierFreeGuidance(model, 2.0, NULL))
    torch.testing.assert_close(guided, wrapped, rtol=0, atol=1e-10)
    assert n_plain == 10 and n_guided == 20 and (guided - plain).abs().max() > 1e-2
    empty, n_empty = run(Guidance("cfg", 2.0, interval=(1e6, 1e7)).bind(null_label=NULL))
    # a guide of the same x0 but another variance: the variance is the main model's, so the unguided loop
    itself, _ = run(Guidance("autoguidance", 3.0).bind(guide=with_variance(_conditional(process), shift=0.7)))
    assert torch.equal(empty, plain) and n_empty == 10
    torch.testing.assert_close(itself, plain, rtol=0, atol=1e-10)
    weak = GaussianData(mu=0.3, s=0.7).model(process)
    weaker = with_variance(lambda x, t, y: weak(x, t))
    for g in (Guidance("apg", 2.0).bind(null_label=NULL), Guidance("autoguidance", 2.0).bind(guide=weaker)):
        assert (run(g)[0] - plain).abs().max() > 1e-2
    sampler = Sampler("ddpm", steps=10, guidance_scale=2.0, guidance_interval=[0.5, 5.0]).bind(process)
    inside = sum(0.5 < float(process.sigma_at(t)) <= 5.0 for t in ts)
    assert 0 < inside < 10 and sampler.nfe == 10 + inside
    assert run(sampler.guidance.bind(null_label=NULL))[1] == sampler.nfe
    ddim = Sampler("ddim", steps=10, guidance_scale=2.0, guidance_interval=[0.5, 5.0]).bind(process)  # its dry run
    assert ddim.nfe == 10 + sum(0.5 < float(process.sigma_at(t)) <= 5.0 for t in ddim.timesteps(process))


# --------------------------------------------------------------------------- evaluate.py's grid, the FID callback
def test_evaluate_grid_crosses_guidance_entries_with_scales(tmp_path):
    """grid.guidance rows (none, or guidance keys replacing the sampler's) x grid.guidance_scales for the entries
    without a scale; each row's NFE counts its guided evaluations twice, an interval's only inside it."""
    from types import SimpleNamespace

    from conftest import compose_train

    from diffusion_lab.config import ConfigError
    from diffusion_lab.diffusion.objectives import Denoising
    from diffusion_lab.tasks import _samplers

    entries = ("[none,{guidance: cfg},{guidance: apg, apg_norm_threshold: 2},"
               "{guidance_scale: 4, guidance_interval: [0.3, 2.0]}]")
    cfg = compose_train(["ckpt_path=x.ckpt", "grid.nfe=[10]", "grid.ddpm_steps=[]", "sampler=unipc",
                         f"grid.guidance={entries}", "grid.guidance_scales=[1.5,3]"], tmp_path, "evaluate")  # fmt: skip
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    model = SimpleNamespace(diffusion=diffusion, conditional=True, objective=Denoising())
    rows = {s.name: s.nfe for s, _ in _samplers(cfg, model)}
    inside = sum(0.3 < float(diffusion.sigma_at(t)) <= 2.0 for t in Sampler("unipc", nfe=10).timesteps(diffusion))
    assert rows == {"unipc10": 10, "unipc10_cfg1.5": 20, "unipc10_cfg3": 20, "unipc10_apg1.5_eta0_r2_beta-0.5": 20,
                    "unipc10_apg3_eta0_r2_beta-0.5": 20, "unipc10_cfg4_in0.3-2": 10 + inside}  # fmt: skip
    assert 0 < inside < 10
    cfg.grid.guidance = ["{guidance: cfg}"]
    with pytest.raises(ConfigError, match="grid.guidance has '{guidance: cfg}': each entry is 'none' or a mapping"):
        _samplers(cfg, model)
    cfg.grid.guidance = [{"guidance": "cfg", "scale": 2}]
    with pytest.raises(ConfigError, match="scale is not a guidance key"):
        _samplers(cfg, model)


def test_fid_callback_scores_autoguidance_by_a_checkpoint_as_evaluate_does(tiny_ckpt, tmp_path, inception_path):
    """Issue 44: the FID callback loads a guide checkpoint at setup (train.py gives it the loader); its score of the
    autoguided row equals evaluate.py's on the run's checkpoint with the same guide. A guide that does not exist is
    refused before training, naming the key and the file; training's own sample grids load no guide, and say so.
    (A guide from the run's own snapshots, and a guided row against the unguided one: tests/test_phema.py.)"""
    from conftest import FAST, compose_train, evaluate_fid, fid_metrics

    from diffusion_lab.config import ConfigError
    from diffusion_lab.tasks import train

    guided = f"{{method: ddim, steps: 3, guidance: autoguidance, guidance_scale: 2, guide: {{ckpt: {tiny_ckpt}}}}}"
    run = [*FAST, "diffusion.steps=100", "callbacks=with_fid", "trainer.max_steps=2", "callbacks.fid.num_samples=12",
           "callbacks.fid.reference_split=val", "callbacks.fid.num_reference=32", "logger=csv",
           f"paths.cache_dir={tmp_path / 'cache'}", f"callbacks.fid.inception_weights={inception_path}"]  # fmt: skip
    missing = guided.replace(str(tiny_ckpt), str(tmp_path / "nope.ckpt"))
    with pytest.raises(ConfigError, match=r"callbacks.fid.samplers\[0\].guide.ckpt=.*nope.ckpt does not exist"):
        train(compose_train([*run, f"callbacks.fid.samplers=[{missing}]"], tmp_path / "missing"))
    assert not (tmp_path / "missing" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="sampler.guidance=autoguidance: training's sample grids load no guide"):
        train(compose_train([*FAST, "sampler.guidance=autoguidance", "sampler.guidance_scale=2",
                             "sampler.guide.ckpt=a.ckpt"], tmp_path / "b"))  # fmt: skip
    train(compose_train([*run, f"callbacks.fid.samplers=[{guided}]"], tmp_path / "run"))
    fid = fid_metrics(tmp_path / "run")
    ag = f"ddim3_eta0_autoguidance2_by-{tiny_ckpt.parent.parent.name}-last"
    assert list(fid) == [f"val/fid/{ag}"]  # (an unguided callback would score evaluate's unguided FID, not this)
    one = evaluate_fid(tmp_path / "run" / "checkpoints" / "last.ckpt", [
        "sampler=ddim", "sampler.steps=3", "sampler.guidance=autoguidance", "sampler.guidance_scale=2",
        f"sampler.guide.ckpt={tiny_ckpt}"], tmp_path / "eval", inception_path)  # fmt: skip
    assert one == {ag: pytest.approx(fid[f"val/fid/{ag}"], rel=1e-4)}


def test_sample_py_autoguidance_by_a_checkpoint(tiny_ckpt, tmp_path):
    """sample.py with sampler.guide.ckpt: the checkpoint itself as its guide draws the unguided images; a guide of
    another image size is refused in one line naming both, before anything is drawn."""
    import numpy as np
    from conftest import FAST, compose_train

    from diffusion_lab.config import ConfigError
    from diffusion_lab.tasks import sample, train

    common = [f"ckpt_path={tiny_ckpt}", "sampler=ddim", "sampler.steps=4", "num_samples=6"]
    plain = sample(compose_train(common, tmp_path / "plain", "sample"))
    guided = sample(compose_train([*common, "sampler.guidance=autoguidance", "sampler.guidance_scale=3",
                                   f"sampler.guide.ckpt={tiny_ckpt}"], tmp_path / "self", "sample"))  # fmt: skip
    images = [np.load(p.parent / "samples.npz")["images"].astype(int) for p in (plain, guided)]
    assert np.abs(images[0] - images[1]).max() <= 1  # the same images (eps re-derived after clipping: 1 ulp)
    # inpainting takes autoguidance (no labels needed): by the checkpoint itself, the unguided result; by a weaker
    # run (3 steps), other images
    weak = tmp_path / "weak"
    train(compose_train([*FAST, "logger=none", "diffusion.steps=100"], weak))
    paint = [*common, "mode=inpaint", "num_images=3", "sampler.guidance=autoguidance", "sampler.guidance_scale=3"]
    pngs = [sample(compose_train(args, tmp_path / name, "sample")) for name, args in (
        ("p0", [*common, "mode=inpaint", "num_images=3"]), ("p1", [*paint, f"sampler.guide.ckpt={tiny_ckpt}"]),
        ("p2", [*paint, f"sampler.guide.ckpt={weak / 'checkpoints' / 'last.ckpt'}"]))]  # fmt: skip
    from PIL import Image

    a, b, c = (np.asarray(Image.open(p)).astype(int) for p in pngs)
    assert a.shape == b.shape == c.shape and np.abs(a - b).max() <= 1 and np.abs(a - c).max() > 8
    other = tmp_path / "other"
    train(compose_train([*FAST, "logger=none", "data.image_size=16", "diffusion.steps=100"], other))
    with pytest.raises(ConfigError, match=r"sampler.guide.ckpt=.*models .*1x16x16.*models .*1x8x8.* a guide must"):
        sample(compose_train([*common, "sampler.guidance=autoguidance", "sampler.guidance_scale=3",
                              f"sampler.guide.ckpt={other / 'checkpoints' / 'last.ckpt'}"], tmp_path / "bad", "sample"))
    assert not (tmp_path / "bad" / "grid.png").exists()


@pytest.mark.parametrize("preset", ["cfg", "cfg_interval", "apg", "autoguidance"])
def test_each_guidance_preset_composes_into_a_sampler(preset, tmp_path):
    """conf/guidance/<preset>.yaml (guidance=<preset> on sample.py / evaluate.py) sets the sampler's guidance keys;
    a Sampler builds from them (autoguidance with its guide named on the command line)."""
    from conftest import compose_train
    from omegaconf import OmegaConf

    extra = ["sampler.guide.step=800", "sampler.guide.sigma_rel=0.05"] if preset == "autoguidance" else []
    for config in ("sample", "evaluate"):
        cfg = compose_train(["ckpt_path=x.ckpt", "sampler=unipc", f"guidance={preset}", *extra], tmp_path, config)
        s = Sampler.from_config(OmegaConf.to_container(cfg.sampler, resolve=True))
        assert s.guidance.rule == ("cfg" if preset.startswith("cfg") else preset)
        assert (s.guidance.interval is not None) == (preset == "cfg_interval")
