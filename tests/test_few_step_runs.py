"""Objectives through train.py / evaluate.py: init_from starts a new run from another run's weights, a teacher stays
out of the student's checkpoints and EMA, stop-and-resume inside ECT's stages and a MeanFlow run is bit-exact, the
few-step samplers draw the same images at any batch size, and bad input gets one line."""

import copy

import pytest
import torch
from conftest import FAST, compose_train

from diffusion_lab.checkpoint import CheckpointError, build_module, load_module
from diffusion_lab.config import ConfigError
from diffusion_lab.diffusion import Sampler
from diffusion_lab.tasks import _teacher_and_init, evaluate, train

SMALL = [*FAST, "logger=none", "callbacks.sample_grid.every_n_epochs=100", "data.batch_size=16"]
EDM = [*SMALL, "diffusion=edm"]
FLOW = [*SMALL, "diffusion=flow"]


@pytest.fixture(scope="module")
def edm_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("edm")
    train(compose_train([*EDM, "trainer.max_steps=4"], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def flow_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow")
    train(compose_train([*FLOW, "trainer.max_steps=4"], out))
    return out / "checkpoints" / "last.ckpt"


def _ckpt(path):
    return torch.load(path, weights_only=True)


def _net_state(module):
    return {k: v.clone() for k, v in module.net.state_dict().items()}


@pytest.mark.parametrize("weights", ["ema", "raw"])
def test_init_from_starts_a_new_run_from_the_weights(edm_ckpt, tmp_path, weights):
    """The module starts with the checkpoint's EMA (or raw) net weights; the run counts its own steps from 0 with a
    new optimizer."""
    cfg = compose_train([*EDM, "objective=ect", f"init_from={edm_ckpt}", f"init_from_weights={weights}"], tmp_path)
    module = build_module(cfg)
    _teacher_and_init(cfg, module, resuming=False)
    src = load_module(edm_ckpt, ema=weights == "ema")
    assert all(torch.equal(v, src.net.state_dict()[k]) for k, v in module.net.state_dict().items())
    ema, raw = _ckpt(edm_ckpt)["state_dict"], _ckpt(edm_ckpt)["current_model_state"]
    assert not torch.equal(ema["net.stem.weight"], raw["net.stem.weight"])  # the two choices differ
    train(cfg)
    c = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert c["global_step"] == 3 and c["optimizer_states"][0]["state"][0]["step"] == 3
    assert c["run_config"]["objective"]["_target_"].endswith("objectives.ECT")


def test_meanflow_net_started_from_a_flow_checkpoint_is_the_flow_model(flow_ckpt, tmp_path):
    """net.time_inputs=2 from a one-time checkpoint: every tensor is the checkpoint's, the new time embedding's
    output layer is zero, so u(z, r, t) = the flow model's velocity v(z, t) for every r."""
    cfg = compose_train([*FLOW, "objective=meanflow", "net.time_inputs=2", f"init_from={flow_ckpt}"], tmp_path)
    module = build_module(cfg)
    _teacher_and_init(cfg, module, resuming=False)
    flow = load_module(flow_ckpt)
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, r = torch.full((4,), 0.8), torch.tensor([0.8, 0.5, 0.1, 0.0])
    with torch.no_grad():
        u = module.diffusion.average_velocity(module.net.eval(), z, t, r)
        v = flow.net(z, 1000 * t)
    torch.testing.assert_close(u, v, rtol=0, atol=1e-6)
    assert module.net.time_embed2[-1].weight.abs().max() == 0


def test_teacher_is_frozen_and_never_saved(edm_ckpt, tmp_path):
    """ECT with pair=teacher (consistency distillation) learns from teacher=<ckpt>: the student's checkpoint and its
    EMA hold the student's net only, and the teacher's weights are the same after training."""
    before = load_module(edm_ckpt).net.state_dict()
    cfg = compose_train([*EDM, "objective=ect", "objective.pair=teacher", f"teacher={edm_ckpt}",
                         f"init_from={edm_ckpt}", "objective.stage_steps=1",
                         "+callbacks.dump._target_=helpers.DumpTeacher",
                         f"+callbacks.dump.path={tmp_path / 'teacher_after.pt'}"], tmp_path)  # fmt: skip
    module = build_module(cfg)
    _teacher_and_init(cfg, module, resuming=False)
    ema_copy = copy.deepcopy(module)  # what the EMA callback averages: the module, sharing the frozen teacher
    assert ema_copy.teacher is module.teacher and ema_copy.net is not module.net
    assert not any(p.requires_grad for p in module.teacher.parameters()) and not module.teacher.training
    train(cfg)
    c = _ckpt(tmp_path / "checkpoints" / "last.ckpt")
    student_keys = {f"net.{k}" for k in before}
    assert set(c["state_dict"]) == set(c["current_model_state"]) == student_keys
    assert not any("teacher" in k for k in c) and c["run_config"]["teacher"] == str(edm_ckpt)
    after = torch.load(tmp_path / "teacher_after.pt", weights_only=True)  # the trained module's teacher, at its end
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not torch.equal(c["current_model_state"]["net.stem.weight"], before["stem.weight"])  # the student moved


def _same_checkpoints(a, b):
    ca, cb = _ckpt(a), _ckpt(b)
    assert ca["global_step"] == cb["global_step"]
    for key in ("state_dict", "current_model_state"):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k)
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[n], sb[n]) for n in sa)


@pytest.mark.parametrize(
    "overrides",
    [
        ["diffusion=edm", "objective=ect", "objective.stage_steps=2"],  # stages 1, 2, 3 over 6 steps; stop in stage 2
        ["diffusion=flow", "objective=meanflow", "net.time_inputs=2"],
    ],
    ids=["ect_stages", "meanflow"],
)
def test_stop_and_resume_is_bit_exact(tmp_path, overrides):
    common = [*SMALL, *overrides, "trainer.max_epochs=100"]
    train(compose_train([*common, "trainer.max_steps=6"], tmp_path / "full"))
    train(compose_train([*common, "trainer.max_steps=3"], tmp_path / "part"))
    train(compose_train([*common, "trainer.max_steps=6", "ckpt_path=last"], tmp_path / "part"))
    _same_checkpoints(tmp_path / "full" / "checkpoints" / "last.ckpt", tmp_path / "part" / "checkpoints" / "last.ckpt")


def test_meanflow_checkpoint_samples_and_evaluates(tmp_path):
    """A MeanFlow run's own sampler is meanflow (the FID callback's, sampler=run's); evaluate.py grids it over NFE 1
    and 2, and the few-step samplers draw image i from (seed, i) alone, at any batch size."""
    metrics = train(compose_train([*FLOW, "objective=meanflow", "net.time_inputs=2", "trainer.max_steps=2",
                                   "callbacks=with_fid", "callbacks.fid.num_samples=4", "callbacks.fid.batch_size=4",
                                   "callbacks.fid.reference_split=val"], tmp_path / "run"))  # fmt: skip
    assert metrics["val/fid/meanflow1"] > 0  # the FID callback scores the model's own sampler
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)
    for s in (Sampler("meanflow", steps=2), Sampler("meanflow", mid_times=[0.6, 0.3]), Sampler("euler", steps=3)):
        s = s.bind(module.diffusion, "meanflow")
        a, b = (module.sample(7, s, seed=3, batch_size=bs) for bs in (7, 3))
        assert torch.equal(a, b) and a.abs().max() <= 1
    cfg = compose_train([f"ckpt_path={ckpt}", "num_samples=8", "grid.nfe=[1,2]", "bpd_num_images=0",
                         "classifier_score=false", "fid.num_reference=16"], tmp_path / "eval", "evaluate")  # fmt: skip
    rows = evaluate(cfg)["rows"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [("meanflow1", 1), ("meanflow2", 2)]


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["objective=meanflow", "net.time_inputs=2"], ["objective=meanflow needs diffusion=flow"]),
        (["diffusion=flow", "objective=meanflow"], ["objective=meanflow needs net.time_inputs=2"]),
        (["diffusion=flow", "sampler=meanflow"], ["sampler.method=meanflow samples models trained with"]),
        (["objective=ect"], ["objective=ect needs a continuous noise level"]),
        (["diffusion=edm", "objective=ect", "objective.pair=teacher"], ["learns from a teacher: set teacher="]),
        (["diffusion=edm", "objective=ect", "objective.q=1"], ["objective.q=1"]),
        (["diffusion=edm", "init_from=/nonexistent/last.ckpt"], ["/nonexistent/last.ckpt", "does not exist"]),
        (["diffusion=edm", "init_from=INIT", "init_from_weights=best"], ["init_from_weights='best' is unknown"]),
        (["diffusion=edm", "objective=ect", "teacher=INIT"], ["objective=ect learns from none", "drop teacher="]),
    ],
)
def test_bad_objective_input_is_one_line(edm_ckpt, tmp_path, overrides, fragments):
    overrides = [o.replace("INIT", str(edm_ckpt)) for o in overrides]
    with pytest.raises(ValueError) as e:
        train(compose_train([*SMALL, *overrides], tmp_path))
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), str(e.value)
    assert not (tmp_path / "checkpoints").exists()


def test_a_teacher_or_start_that_does_not_fit_is_refused(edm_ckpt, flow_ckpt, tmp_path):
    """Another net or another process: CheckpointError naming the file and both sides, before any step."""
    wide = [*EDM, "objective=ect", "net.base_channels=32"]
    with pytest.raises(CheckpointError, match=r"init_from=.*its net does not fit this run's net"):
        train(compose_train([*wide, f"init_from={edm_ckpt}"], tmp_path / "a"))
    with pytest.raises(CheckpointError, match=r"teacher=.*trained for diffusion=flow .* this run's is diffusion=edm"):
        train(compose_train([*EDM, "objective=ect", "objective.pair=teacher", f"teacher={flow_ckpt}"], tmp_path / "b"))
    with pytest.raises(CheckpointError, match=r"teacher=.*its net does not fit"):
        train(compose_train([*wide, "objective.pair=teacher", f"teacher={edm_ckpt}"], tmp_path / "c"))
    payload = tmp_path / "evil.ckpt"
    torch.save(_ckpt(edm_ckpt) | {"extra": ConfigError("x")}, payload)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        train(compose_train([*EDM, "objective=ect", f"init_from={payload}"], tmp_path / "d"))
    assert not any((tmp_path / d / "checkpoints").exists() for d in "abcd")
