"""Time grids learned per checkpoint (issue 43): LD3's objective on exact models, the schedule file as untrusted
data, spacing=learned in Sampler, and learn_schedule.py -> evaluate.py / sample.py on a checkpoint."""

import json
import shutil

import pytest
import torch
from conftest import compose_train

from diffusion_lab.checkpoint import load_module
from diffusion_lab.config import ConfigError
from diffusion_lab.diffusion import Sampler, get_betas
from diffusion_lab.diffusion.analytic import GaussianData
from diffusion_lab.diffusion.continuous import Flow
from diffusion_lab.diffusion.gaussian import GaussianDiffusion
from diffusion_lab.diffusion.learned_grid import SCHEDULE_FORMAT, learn_times, positions_of, times_at

pytestmark = pytest.mark.usefixtures("one_thread")
DATA = GaussianData(mu=0.1, s=0.5)


def _bed(process: str):
    d = GaussianDiffusion(get_betas("cosine", 1000), mean_type="eps") if process == "vp" else Flow()
    top = d.num_timesteps - 1
    g = torch.Generator().manual_seed(0)
    x_fit, x_val = (torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64) * d.noise_std(top) for _ in range(2))
    return d, DATA.model(d), x_fit, x_val, lambda x: DATA.solution(d, x, top, 0.0)  # the exact ODE's sample


@pytest.mark.parametrize("process", ["vp", "flow"])
@pytest.mark.parametrize("method", ["dpmpp_2m", "unipc", "euler"])
def test_learned_nfe5_grid_beats_every_fixed_grid_on_held_out_noise(process, method):
    """On the exact Gaussian model, the grid learned against the exact ODE answer on 64 noises has, on 64 other
    noises, a smaller RMS error than each fixed grid (trailing, logsnr, karras) of the same method at NFE 5. Here the
    error is the last jump's (the posterior spread at the lowest time), so the search frees that time; with it
    pinned (the default) the lowest time is the start grid's and the loss is at most the start's."""
    d, model, x_fit, x_val, exact = _bed(process)
    sampler = Sampler(method, nfe=5).bind(d)
    out = learn_times(d, sampler, lambda s: s(d, model, x_fit), exact(x_fit), max_evals=150, lowest="free")
    pinned = learn_times(d, sampler, lambda s: s(d, model, x_fit), exact(x_fit), max_evals=150)
    start = sampler.replace(spacing=pinned["start"]).timesteps(d)
    assert pinned["times"][0] == pytest.approx(start[0], abs=1e-6) and pinned["times"][-1] == start[-1]
    assert pinned["loss"] <= pinned["fixed"][pinned["start"]]

    def err(s):
        return float((s(d, model, x_val) - exact(x_val)).pow(2).mean().sqrt())

    fixed = {}
    for spacing in ("trailing", "logsnr", "karras"):
        try:
            fixed[spacing] = err(sampler.replace(spacing=spacing))
        except ValueError:  # karras/logsnr need 3 visits under flow's zero terminal SNR: NFE 5 has them
            pytest.fail(f"{spacing} refused NFE 5")
    learned = err(sampler.with_times(out["times"]))
    assert learned < 0.9 * min(fixed.values()), (learned, fixed)
    t = out["times"]
    assert len(t) == 5 and t[-1] == d.num_timesteps - 1 and t[0] >= 0
    assert all(b > a for a, b in zip(t, t[1:]))  # strictly ascending visits (decreasing in the sampling order)
    assert out["curve"] == sorted(out["curve"], reverse=True) and out["loss"] <= min(out["fixed"].values())
    again = learn_times(d, sampler, lambda s: s(d, model, x_fit), exact(x_fit), max_evals=150, lowest="free")
    assert again["times"] == t  # the search is deterministic: same trajectories, same grid


def test_positions_and_times_are_inverse():
    for d in (GaussianDiffusion(get_betas("linear", 1000)), Flow()):
        times = Sampler("dpmpp_2m", steps=8, spacing="logsnr").timesteps(d)
        c = positions_of(d, times)
        assert (c[1:] > c[:-1]).all() and 0 <= c[0] and c[-1] <= 1
        back = times_at(d, c)
        assert back[-1] == d.num_timesteps - 1
        f64 = torch.float64
        assert torch.allclose(torch.tensor(back[:-1], dtype=f64), torch.tensor(times[:-1], dtype=f64), atol=1e-6)


def _schedule(path, **changes):
    record = {"format": SCHEDULE_FORMAT, "method": "dpmpp_2m", "options": Sampler("dpmpp_2m").options, "steps": 4,
              "nfe": 4, "times": [20.0, 300.5, 700.0, 999.0], "process": Flow().network_view, "num_timesteps": 1000,
              "checkpoint": {"path": "x.ckpt", "sha256": "0" * 64}, **changes}  # fmt: skip
    path.write_text(json.dumps(record))
    return path


def test_sampler_reads_a_learned_grid_and_refuses_a_mismatch(tmp_path):
    f = _schedule(tmp_path / "a.json")
    s = Sampler("dpmpp_2m", nfe=4, schedule=str(f))
    assert s.spacing == "learned" and s.name == "dpmpp_2m4_learned"
    assert s.timesteps(Flow()) == [20.0, 300.5, 700.0, 999.0]
    assert Sampler("dpmpp_2m", schedule=str(f)).steps == 4  # steps from the file when none are given
    other = _schedule(tmp_path / "b.json", method="unipc", options=Sampler("unipc").options, nfe=4)
    assert Sampler("unipc", nfe=4, schedule=[str(f), str(other)]).timesteps(Flow())[0] == 20.0  # picked by method
    with pytest.raises(ValueError, match="holds no grid learned for dpmpp_2m .* steps=5"):
        Sampler("dpmpp_2m", nfe=5, schedule=str(f))
    with pytest.raises(ValueError, match="holds no grid learned for dpmpp_3m"):
        Sampler("dpmpp_3m", nfe=4, schedule=str(f))
    with pytest.raises(ValueError, match="sampler.spacing=learned needs sampler.schedule"):
        Sampler("dpmpp_2m", nfe=4, spacing="learned")
    with pytest.raises(ValueError, match="but sampler.spacing=karras"):
        Sampler("dpmpp_2m", nfe=4, spacing="karras", schedule=str(f))
    with pytest.raises(ValueError, match="learned on another process"):
        s.bind(GaussianDiffusion(get_betas("linear", 1000)))
    s.bind(Flow())


@pytest.mark.parametrize(
    "content, says",
    [
        ("not json {", "not a schedule file"),
        ('{"format": "other"}', "not a diffusion_lab.schedule/1 file"),
        (None, "times must be 4 strictly ascending"),
        ("[1, 2]", "not a diffusion_lab.schedule/1 file"),
    ],
)
def test_a_broken_schedule_file_is_refused_by_name(tmp_path, content, says):
    f = tmp_path / "s.json"
    if content is None:
        _schedule(f, times=[20.0, 10.0, 700.0, 999.0])
    else:
        f.write_text(content)
    with pytest.raises(ValueError, match=f"sampler.schedule={f}: {says}"):
        Sampler("dpmpp_2m", nfe=4, schedule=str(f))
    with pytest.raises(FileNotFoundError, match="no such file"):
        Sampler("dpmpp_2m", nfe=4, schedule=str(tmp_path / "missing.json"))


def test_learn_schedule_then_evaluate_and_sample_with_it(tiny_ckpt, tmp_path):
    """learn_schedule.py writes a file bound to its checkpoint; evaluate.py and sample.py use it there, and refuse it
    on another checkpoint unless sampler.schedule_transfer=true."""
    from diffusion_lab.tasks import evaluate, learn_schedule, sample

    path = learn_schedule(compose_train([f"ckpt_path={tiny_ckpt}", "sampler=dpmpp_2m", "sampler.nfe=4",
                                         "trajectories=8", "validation=8", "max_evals=12", "teacher.nfe=20"],
                                        tmp_path, "learn_schedule"))  # fmt: skip
    record = json.loads(path.read_text())
    assert path.name == "schedule_dpmpp_2m4.json" and record["steps"] == 4 and len(record["times"]) == 4
    start = Sampler("dpmpp_2m", nfe=4, spacing=record["start"]).timesteps(load_module(tiny_ckpt).diffusion)
    assert record["lowest"] == "pinned" and record["times"][0] == pytest.approx(start[0], abs=1e-6)
    with pytest.raises(ConfigError, match="lowest='lowset' is unknown; allowed: pinned, free"):  # before any work
        learn_schedule(compose_train([f"ckpt_path={tiny_ckpt}", "lowest=lowset"], tmp_path / "bad", "learn_schedule"))
    assert record["loss"]["train"]["learned"] <= min(v for k, v in record["loss"]["train"].items() if k != "learned")
    assert set(record["loss"]["validation"]) >= {"learned", "trailing"} and record["seconds"]["total"] > 0
    args = ["sampler=dpmpp_2m", "sampler.nfe=4", f"sampler.schedule={path}"]
    result = evaluate(compose_train([f"ckpt_path={tiny_ckpt}", "grid=null", "num_samples=8", "bpd_num_images=0",
                                     "fid.reference_split=val", "fid.num_reference=16", *args],
                                    tmp_path / "eval", "evaluate"))  # fmt: skip
    assert [r["sampler"] for r in result["rows"]] == ["dpmpp_2m4_learned"]
    other = tmp_path / "other" / "last.ckpt"
    other.parent.mkdir()
    shutil.copy(tiny_ckpt, other)
    with open(other, "ab") as f:  # other bytes: another checkpoint as far as the file's sha256 can tell
        f.write(b"\0")
    with pytest.raises(ConfigError, match=f"learned for {tiny_ckpt}, not {other}.*schedule_transfer=true"):
        sample(compose_train([f"ckpt_path={other}", "num_samples=4", *args], tmp_path / "s1", "sample"))
    png = sample(compose_train([f"ckpt_path={other}", "num_samples=4", *args, "sampler.schedule_transfer=true"],
                               tmp_path / "s2", "sample"))  # fmt: skip
    assert png.exists()


def test_the_fid_callback_takes_a_learned_grid_only_as_a_transfer(tmp_path):
    """The FID callback scores the weights as they train, which no schedule was learned for: a learned grid in
    callbacks.fid.samplers is refused in one line before training unless schedule_transfer=true."""
    from diffusion_lab.config import validate_train_config
    from diffusion_lab.diffusion.gaussian import GaussianDiffusion as GD

    net_view = GD.from_schedule("linear", 100).network_view  # train.py's default digits process, T=100
    f = _schedule(tmp_path / "s.json", process=net_view, num_timesteps=100, times=[3.0, 40.0, 70.0, 99.0])
    node = f"{{method: dpmpp_2m, nfe: 4, schedule: '{f}'"
    args = ["callbacks=with_fid", "diffusion.steps=100", "callbacks.fid.reference_split=val"]
    with pytest.raises(ConfigError, match=r"callbacks.fid.samplers\[0\].schedule=.*schedule_transfer=true"):
        validate_train_config(compose_train([*args, f"callbacks.fid.samplers=[{node}}}]"], tmp_path))
    validate_train_config(compose_train([*args, f"callbacks.fid.samplers=[{node}, schedule_transfer: true}}]"],
                                        tmp_path))  # fmt: skip
