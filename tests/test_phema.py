"""Post-hoc EMA (EDM2, Karras et al. 2024; diffusion_lab/phema.py and lit/ema.py): the power-function EMA against its
closed form, the reconstruction of a tracked and an untracked sigma_rel, ema-pytorch's coefficients, snapshots
through train.py (exact resume) and refusals of bad snapshot files."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_lab import phema
from diffusion_lab.lit.ema import EMA, SnapshotError, read_snapshots

pytestmark = pytest.mark.usefixtures("one_thread")


class Weights(nn.Module):
    """A 'network' whose weights the test sets at every step."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, dtype=torch.float64))


def _w(k: int) -> torch.Tensor:
    """The weights after optimizer step k, three coordinates that vary smoothly over the run (slow against the
    snapshot spacing: what a few dozen snapshots can carry; a wiggle of period ~250 steps is lost between them)."""
    return torch.tensor([1.0 + 0.01 * k, math.sin(k / 500), (k / 1000) ** 2], dtype=torch.float64)


def _run(cb: EMA, steps: int) -> Weights:
    """Drive the callback as Lightning would: set the weights of step k, then on_train_batch_end at global_step k."""
    module = Weights()
    cb.setup(None, module, "fit")
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    for k in range(1, steps + 1):
        with torch.no_grad():
            module.w.copy_(_w(k))
        trainer.global_step = k
        cb.on_train_batch_end(trainer, module, None, None, None)
    return module


def _closed_form(gamma: float, n: int) -> torch.Tensor:
    """sum_k (k^(g+1) - (k-1)^(g+1)) w_k / n^(g+1): the power EMA with beta_k = (1 - 1/k)^(g+1) after n steps."""
    e = gamma + 1
    return sum((k**e - (k - 1) ** e) * _w(k) for k in range(1, n + 1)) / n**e


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_power_ema_equals_its_closed_form(sigma_rel):
    cb = EMA(kind="power", sigma_rel=sigma_rel)
    _run(cb, 500)
    gamma = phema.sigma_rel_to_gamma(sigma_rel)
    torch.testing.assert_close(cb.averaged.module.w.detach(), _closed_form(gamma, 500), rtol=1e-12, atol=0)


def test_sigma_rel_and_gamma_are_eq_3_both_ways():
    for s in (0.01, 0.05, 0.1, 0.2, 0.28):
        g = phema.sigma_rel_to_gamma(s)
        assert phema.gamma_to_sigma_rel(g) == pytest.approx(s, rel=1e-12)
    assert phema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2 Sec. 3.1: gamma 16.97 at 0.05
    assert phema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)  # and 6.94 at 0.10
    with pytest.raises(ValueError, match=r"sigma_rel=0.3 must be in \(0, 0.2887\)"):
        phema.sigma_rel_to_gamma(0.3)


def _snapshots(tmp_path, steps=4000, every=250, sigma_rels=(0.05, 0.10)):
    cb = EMA(post_hoc=True, post_hoc_sigma_rels=sigma_rels, snapshot_every=every, snapshot_dir=str(tmp_path))
    _run(cb, steps)
    return cb, read_snapshots(tmp_path)


def test_a_tracked_profile_is_reconstructed_from_its_own_snapshot(tmp_path):
    cb, snaps = _snapshots(tmp_path)
    assert [s["step"] for s in snaps] == list(range(250, 4001, 250))
    for i, sigma_rel in enumerate((0.05, 0.10)):
        state = phema.reconstruct(snaps, sigma_rel)
        stored = cb.profiles[i].module.w.detach()
        torch.testing.assert_close(state["w"], stored, rtol=1e-5, atol=0)
        # and the profile itself is the closed form
        torch.testing.assert_close(stored, _closed_form(phema.sigma_rel_to_gamma(sigma_rel), 4000), rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma_rel", [0.06, 0.075, 0.09])
def test_an_untracked_sigma_rel_between_the_two_is_reconstructed(tmp_path, sigma_rel):
    """Synthetic weights whose power EMA at sigma_rel is known in closed form: the least-squares combination of the
    16 x 2 snapshots gives it within 1e-4 (relative)."""
    _, snaps = _snapshots(tmp_path)
    exact = _closed_form(phema.sigma_rel_to_gamma(sigma_rel), 4000)
    got = phema.reconstruct(snaps, sigma_rel)["w"]
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=0)
    # the tracked 0.05 and 0.10 alone (the last snapshot of each) miss it by far more: the solve is doing the work
    assert (snaps[-1]["states"][0]["w"] - exact).abs().max() > 10 * (got - exact).abs().max()


def test_a_sigma_rel_the_snapshots_cannot_represent_is_refused_naming_the_range(tmp_path):
    _, snaps = _snapshots(tmp_path, steps=1000, every=500)  # two snapshot steps only
    with pytest.raises(ValueError, match=r"ema.sigma_rel=0.01: .* the sigma_rel they can represent at step 1000: \["):
        phema.reconstruct(snaps, 0.01)
    with pytest.raises(ValueError, match=r"the snapshots cover steps 500..1000"):
        phema.reconstruct(snaps, 0.07, step=1500)


def test_reconstruction_weights_equal_ema_pytorchs():
    """ema-pytorch's PostHocEMA.solve_weights (EDM2 Alg. 3) on the same snapshot times and profiles: within 1e-6."""
    ema_pytorch = pytest.importorskip("ema_pytorch.post_hoc_ema")
    t_i = [t for t in range(1000, 16001, 1000) for _ in (0, 1)]
    g_i = [phema.sigma_rel_to_gamma(s) for _ in range(16) for s in (0.05, 0.10)]
    for s_r, t_r in ((0.03, 16000), (0.075, 16000), (0.15, 12000)):
        ours = phema.solve_weights(t_i, g_i, [t_r], [phema.sigma_rel_to_gamma(s_r)])
        f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        theirs = ema_pytorch.solve_weights(f64(t_i), f64(g_i), f64([t_r]), f64([phema.sigma_rel_to_gamma(s_r)]))
        torch.testing.assert_close(torch.from_numpy(ours), theirs, rtol=0, atol=1e-6)
        assert ema_pytorch.sigma_rel_to_gamma(s_r) == pytest.approx(phema.sigma_rel_to_gamma(s_r), rel=1e-12)


def test_bad_snapshot_files_are_refused_naming_the_file(tmp_path):
    _snapshots(tmp_path, steps=500, every=250)
    good = sorted(tmp_path.glob("phema-*.pt"))
    data = good[-1].read_bytes()
    good[-1].write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SnapshotError, match=rf"{good[-1].name} is not a readable snapshot"):
        read_snapshots(tmp_path)
    torch.save({"w": torch.zeros(3)}, good[-1])  # someone else's tensors
    with pytest.raises(SnapshotError, match=rf"{good[-1].name} is not a diffusion_lab post-hoc EMA snapshot"):
        read_snapshots(tmp_path)
    with pytest.raises(SnapshotError, match="has no post-hoc EMA snapshots"):
        read_snapshots(tmp_path / "nowhere")


def test_post_hoc_settings_are_validated_where_built():
    with pytest.raises(ValueError, match="callbacks.ema.kind=power needs callbacks.ema.sigma_rel"):
        EMA(kind="power")
    with pytest.raises(ValueError, match=r"callbacks.ema.kind='box' is unknown"):
        EMA(kind="box")
    with pytest.raises(ValueError, match=r"callbacks.ema.post_hoc_sigma_rels: sigma_rel=0.5 must be in"):
        EMA(post_hoc_sigma_rels=(0.05, 0.5))
    with pytest.raises(ValueError, match="two or more distinct post_hoc_sigma_rels"):
        EMA(post_hoc=True, post_hoc_sigma_rels=(0.1, 0.1), snapshot_dir="x")


def test_snapshots_through_train_py_resume_exactly(tmp_path):
    """callbacks.ema.post_hoc through train.py: a run stopped at step 3 and resumed to 6 writes the same snapshots,
    bit for bit, as the uninterrupted run (the profiles travel in the checkpoint); the default EMA is unchanged."""
    from conftest import FAST, compose_train

    from diffusion_lab.tasks import train

    run = [*FAST, "trainer.max_steps=-1", "trainer.limit_train_batches=4", "data.batch_size=16", "logger=none",
           "callbacks.sample_grid.every_n_epochs=100", "trainer.max_epochs=100", "callbacks.ema.post_hoc=true",
           "callbacks.ema.snapshot_every=2"]  # fmt: skip
    train(compose_train([*run, "trainer.max_steps=6"], tmp_path / "full"))
    train(compose_train([*run, "trainer.max_steps=3"], tmp_path / "part"))
    train(compose_train([*run, "trainer.max_steps=6", "ckpt_path=last"], tmp_path / "part"))
    full, part = (read_snapshots(tmp_path / r / "ema_snapshots") for r in ("full", "part"))
    assert [s["step"] for s in full] == [s["step"] for s in part] == [2, 4, 6]
    for a, b in zip(full, part):
        for sa, sb in zip(a["states"], b["states"]):
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    _evaluate_and_sample_take_sigma_rel(tmp_path / "full" / "checkpoints" / "last.ckpt", tmp_path)
    ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    for i, avg in enumerate(ckpt["post_hoc_ema"]["states"]):  # the last snapshot is the checkpoint's profiles
        stored = {k[len("module."):]: v for k, v in avg.items() if k.startswith("module.")}
        assert all(torch.equal(stored[k], full[-1]["states"][i][k]) for k in stored)
    a, b = full[-1]["states"]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two profiles, two averages


def _evaluate_and_sample_take_sigma_rel(ckpt, tmp_path):
    """evaluate.py ema.sigma_rel=[...]: one row per post-hoc EMA plus the run's EMA and the raw weights, and
    fid_vs_ema.png; sample.py ema.sigma_rel=x draws with that EMA; a sigma_rel the snapshots cannot represent is
    refused before anything is sampled, naming the range."""
    import csv

    from conftest import compose_train

    from diffusion_lab.config import ConfigError
    from diffusion_lab.tasks import evaluate, sample

    common = [f"ckpt_path={ckpt}", "sampler=ddim", "sampler.steps=3"]
    scoring = [*common, "grid=null", "fid.reference_split=val", "fid.num_reference=32", "bpd_num_images=0"]
    evaluate(compose_train([*scoring, "num_samples=8", "ema.sigma_rel=[0.06]"], tmp_path / "ev", "evaluate"))
    rows = list(csv.DictReader(open(tmp_path / "ev" / "results.csv")))
    assert [r["ema"] for r in rows] == ["0.06", "run", "raw"]
    assert len({r["fid"] for r in rows}) == 3 and (tmp_path / "ev" / "fid_vs_ema.png").exists()
    with pytest.raises(ConfigError, match=r"ema.sigma_rel=0.2: .* can represent at step 6: \[0.04"):
        evaluate(compose_train([*scoring, "ema.sigma_rel=0.2"], tmp_path / "bad", "evaluate"))
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("results*"))
    png = sample(compose_train([*common, "num_samples=4", "ema.sigma_rel=0.06"], tmp_path / "s1", "sample"))
    own = sample(compose_train([*common, "num_samples=4"], tmp_path / "s2", "sample"))
    assert png.exists() and png.read_bytes() != own.read_bytes()
    # autoguidance by the run's own snapshots (issue 44): a guide rebuilt as the main weights are (step 6, sigma_rel
    # 0.06) leaves the images as they were; the EMA at an earlier snapshot guides them elsewhere
    guided = [*common, "num_samples=4", "ema.sigma_rel=0.06", "sampler.guidance=autoguidance",
              "sampler.guidance_scale=3", "sampler.guide.sigma_rel=0.06"]  # fmt: skip
    same = sample(compose_train([*guided, "sampler.guide.step=6"], tmp_path / "g6", "sample"))
    early = sample(compose_train([*guided, "sampler.guide.step=4"], tmp_path / "g4", "sample"))
    drawn = [np.load(p.parent / "samples.npz")["images"].astype(int) for p in (png, same, early)]
    assert np.abs(drawn[0] - drawn[1]).max() <= 1 and np.abs(drawn[0] - drawn[2]).max() > 8
    with pytest.raises(ConfigError, match=r"sampler.guide.step=60 sigma_rel=0.06: "):
        sample(compose_train([*guided, "sampler.guide.step=60"], tmp_path / "g60", "sample"))


def test_fid_callback_scores_post_hoc_emas_during_training(tmp_path, inception_path):
    """callbacks.fid.ema_sigma_rels: the FID callback also scores the post-hoc EMAs rebuilt from the snapshots so
    far (one the snapshots cannot represent yet is skipped, not an error), and an autoguided row whose guide is this
    run's post-hoc EMA at an earlier step (issue 44), equal to evaluate.py's score of it on the run's checkpoint;
    without post_hoc both are refused in one line before training."""
    from conftest import FAST, compose_train, evaluate_fid, fid_metrics

    from diffusion_lab.config import ConfigError
    from diffusion_lab.tasks import train

    guided = "{method: ddim, steps: 3, guidance: autoguidance, guidance_scale: 2, guide: {step: 4, sigma_rel: 0.07}}"
    run = [*FAST, "callbacks=with_fid", "trainer.max_steps=6", "callbacks.fid.num_samples=12",
           "callbacks.fid.reference_split=val", "callbacks.fid.num_reference=32",
           f"paths.cache_dir={tmp_path / 'cache'}", f"callbacks.fid.inception_weights={inception_path}"]  # fmt: skip
    with pytest.raises(ConfigError, match="callbacks.fid.ema_sigma_rels needs the post-hoc snapshots"):
        train(compose_train([*run, "callbacks.fid.ema_sigma_rels=[0.07,0.2]"], tmp_path / "refused"))
    with pytest.raises(ConfigError, match=r"callbacks.fid.samplers\[0\].guide.step: a guide from this run's snapshots"):
        train(compose_train([*run, f"callbacks.fid.samplers=[{guided}]"], tmp_path / "refused2"))
    past = guided.replace("step: 4", "step: 7")
    with pytest.raises(ConfigError, match=r"samplers\[0\].guide.step=7 is past trainer.max_steps=6"):
        train(compose_train([*run, f"callbacks.fid.samplers=[{past}]", "callbacks.ema.post_hoc=true"], tmp_path / "p"))
    train(compose_train([*run, "callbacks.fid.samplers=[{method: ddim, steps: 3}, " + guided + "]",
                         "callbacks.fid.ema_sigma_rels=[0.07,0.2]", "callbacks.ema.post_hoc=true",
                         "callbacks.ema.snapshot_every=2", "logger=csv"], tmp_path / "run"))  # fmt: skip
    fid = fid_metrics(tmp_path / "run")
    ag = "ddim3_eta0_autoguidance2_by-step4-0.07"
    assert sorted(fid) == sorted(f"val/fid/{n}" for n in ("ddim3_eta0", "ddim3_eta0@ema0.07", ag, f"{ag}@ema0.07"))
    assert fid["val/fid/ddim3_eta0"] != fid["val/fid/ddim3_eta0@ema0.07"]  # 0.2: not representable at step 6
    assert fid[f"val/fid/{ag}"] != fid["val/fid/ddim3_eta0"]  # the guide is used
    one = evaluate_fid(tmp_path / "run" / "checkpoints" / "last.ckpt", [
        "sampler=ddim", "sampler.steps=3", "sampler.guidance=autoguidance", "sampler.guidance_scale=2",
        "sampler.guide.step=4", "sampler.guide.sigma_rel=0.07"], tmp_path / "eval", inception_path)  # fmt: skip
    assert one == {ag: pytest.approx(fid[f"val/fid/{ag}"], rel=1e-4)}


def test_reading_snapshots_shows_a_bar_over_the_files(tmp_path, monkeypatch):
    """Issue 45: rebuilding post-hoc EMAs reads every snapshot; a bar counts the files (tqdm, a terminal only)."""
    from diffusion_lab.lit import ema

    seen = []
    monkeypatch.setattr(ema, "tqdm", lambda it, **kw: seen.append((len(it), kw["unit"], kw["disable"])) or it)
    _, snaps = _snapshots(tmp_path, steps=1000, every=250)
    assert seen == [(len(snaps), "file", None)] and len(snaps) == 4


def test_fid_callback_skips_a_snapshot_guide_on_every_rank_until_it_can_be_rebuilt(tmp_path):
    """A guide from this run's snapshots that cannot be rebuilt yet (no snapshots, or none reaching its step) skips
    its row, by a decision all ranks share (a rank that scored alone would wait for the others in all_gather)."""
    from types import SimpleNamespace

    from diffusion_lab.lit.fid_callback import FIDCallback

    guided = {"method": "ddim", "steps": 3, "guidance": "autoguidance", "guidance_scale": 2.0,
              "guide": {"step": 4, "sigma_rel": 0.07}}  # fmt: skip
    cb = FIDCallback(samplers=[{"method": "ddim", "steps": 3}, guided])
    cb.snapshot_dir = tmp_path  # no snapshots written yet
    asked = []
    ranks = SimpleNamespace(reduce_boolean_decision=lambda ok, all: asked.append((ok, all)) or ok)
    kept = cb._guided(SimpleNamespace(world_size=1, global_step=2, strategy=ranks), module=None)
    assert [s.name for s in kept] == ["ddim3_eta0"] and asked == [(False, True)]
