"""Reliability: exact resume, atomic checkpoints, the non-finite guard, config validation."""

import csv
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from conftest import FAST, ROOT, compose_train

from diffusion_lab.config import ConfigError
from diffusion_lab.lit.checkpointing import resume_at_next_epoch
from diffusion_lab.lit.reliability import AtomicCheckpointIO, NonFiniteLossError, all_finite
from diffusion_lab.tasks import train

SMALL = [
    *FAST,
    "trainer.max_steps=-1",
    "trainer.limit_train_batches=4",
    "data.batch_size=32",
    "logger=none",
    "callbacks.sample_grid.every_n_epochs=100",
    "diffusion.steps=20",
]
RESUME = [*SMALL, "experiment=iddpm_cosine", "timesteps.history_per_term=2"]


MAX_STEPS_NO_VAL = ["trainer.max_steps=100", "trainer.check_val_every_n_epoch=2"]


def _states(ckpt):
    c = torch.load(ckpt, weights_only=True)
    return c["state_dict"], c["current_model_state"], c["timestep_sampler"], c["global_step"]


def _assert_same_run(a, b, step):
    """Two checkpoints of the same training: raw and EMA weights, optimizer moments and the loss-aware
    sampler's history all bit for bit equal."""
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca["global_step"] == cb["global_step"] == step
    for key in ("state_dict", "current_model_state"):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k, (ca[key][k] - cb[key][k]).abs().max())
    for sa, sb in zip(ca["optimizer_states"][0]["state"].values(), cb["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert torch.equal(ca["timestep_sampler"]["history"], cb["timestep_sampler"]["history"])
    assert torch.equal(ca["timestep_sampler"]["counts"], cb["timestep_sampler"]["counts"])


def _csv(run):
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "first,then,mid_epoch",
    [
        (["trainer.max_epochs=1"], ["trainer.max_epochs=3"], False),  # an epoch limit
        (["trainer.max_epochs=100", "trainer.max_steps=6"], ["trainer.max_epochs=100", "trainer.max_steps=12"], True),
        (["trainer.max_epochs=100", "trainer.max_steps=8"], ["trainer.max_epochs=3"], False),  # steps, at an epoch end
        # a max_steps-bounded run stopped by its max_epochs, resumed with more epochs: from the epoch-end checkpoint
        # (validation every epoch) Lightning replayed the epoch's end as one more epoch and trained 4 steps too few;
        (["trainer.max_epochs=1", "trainer.max_steps=100"], ["trainer.max_epochs=3", "trainer.max_steps=100"], False),
        # from the train-end checkpoint (no validation that epoch) it ran one batch past the epoch's end
        (["trainer.max_epochs=1", *MAX_STEPS_NO_VAL], ["trainer.max_epochs=3", *MAX_STEPS_NO_VAL], False),
    ],
    ids=["epochs", "steps_mid_epoch", "steps_at_epoch_end", "max_steps_epoch_limit_raised", "max_steps_train_end"],
)
def test_stop_and_resume_equals_uninterrupted_run(tmp_path, first, then, mid_epoch):
    """Raw and EMA weights, optimizer state, the loss-aware history and the CSV log of a stopped-and-resumed run
    equal the uninterrupted run's, for epoch and step limits (4 batches per epoch). The one exception: a stop
    inside an epoch logs that epoch's running means (`*_epoch`, `*_q<k>`) over each part; every per-step and
    validation row is still equal."""
    logged = [*RESUME, "logger=csv"]
    train(compose_train([*logged, *then], tmp_path / "full"))
    train(compose_train([*logged, *first], tmp_path / "part"))
    train(compose_train([*logged, *then, "ckpt_path=last"], tmp_path / "part"))
    _assert_same_run(
        tmp_path / "full" / "checkpoints" / "last.ckpt", tmp_path / "part" / "checkpoints" / "last.ckpt", 12
    )
    full, part = _csv(tmp_path / "full"), _csv(tmp_path / "part")
    if mid_epoch:
        per_step = lambda rows: [r for r in rows if r["train/loss_step"] or r["val/loss"]]  # noqa: E731
        full, part = per_step(full), per_step(part)
        assert len(full) == 15  # 12 step rows and 3 validation rows (after each of the 3 epochs)
    assert part == full


def test_resume_at_next_epoch_touches_only_a_finished_epoch():
    """A checkpoint written after an epoch ended (at its end, at train end, or after a stop inside it) resumes at
    the next epoch's first batch; one written inside an epoch (or in another layout) is left as Lightning wrote it."""
    progress = lambda r, s, p, c: {"ready": r, "started": s, "processed": p, "completed": c}  # noqa: E731

    def ckpt(epoch, done_batches=4, last=True):
        batches = {"current": progress(*[done_batches] * 4), "total": progress(8, 8, 8, 8), "is_last_batch": last}
        loop = {"epoch_progress": {"current": epoch, "total": dict(epoch)}, "epoch_loop.batch_progress": batches}
        return {"loops": {"fit_loop": loop}}

    for epoch_end in (ckpt(progress(2, 2, 2, 1)), ckpt(progress(2, 2, 2, 2)), ckpt(progress(2, 2, 2, 1), 2, False)):
        assert resume_at_next_epoch(epoch_end)  # on_train_epoch_end; on_train_end; a max_time stop at batch 2 of 4
        loop = epoch_end["loops"]["fit_loop"]
        assert loop["epoch_progress"]["current"] == loop["epoch_progress"]["total"] == progress(2, 2, 2, 2)
        assert loop["epoch_loop.batch_progress"]["current"] == progress(0, 0, 0, 0)
        assert loop["epoch_loop.batch_progress"]["is_last_batch"] is False
        assert loop["epoch_loop.batch_progress"]["total"] == progress(8, 8, 8, 8)
    inside = ckpt(progress(2, 2, 1, 1))  # saved at the validation end of the second epoch's last batch
    assert not resume_at_next_epoch(inside)
    assert inside == ckpt(progress(2, 2, 1, 1))
    assert not resume_at_next_epoch(ckpt(progress(2, 2, 2, 2), 0, False))  # already at an epoch start
    assert not resume_at_next_epoch({"state_dict": {}})
    assert not resume_at_next_epoch({"loops": {"fit_loop": {"epoch_progress": [1, 2]}}})


def test_max_steps_stop_mid_epoch_saves_the_last_step_with_raw_weights(tmp_path):
    train(compose_train([*RESUME, "trainer.max_epochs=100", "trainer.max_steps=10"], tmp_path))
    ema, raw, _, step = _states(tmp_path / "checkpoints" / "last.ckpt")
    assert step == 10  # 2.5 epochs of 4 batches; Lightning alone left the step-8 checkpoint
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)  # current_model_state is not the EMA copy


def test_moved_run_directory_keeps_one_newest_last_ckpt(tmp_path):
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path / "a"))
    (tmp_path / "a").rename(tmp_path / "b")
    train(compose_train([*RESUME, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path / "b"))
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("last*.ckpt"))
    assert names == ["last.ckpt"] and _states(tmp_path / "b" / "checkpoints" / "last.ckpt")[3] == 8


def test_resume_applies_a_changed_lr_and_refuses_structural_changes(tmp_path):
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path))
    train(compose_train([*RESUME, "trainer.max_epochs=2", "ckpt_path=last", "optim.lr=3e-4"], tmp_path))
    c = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert c["optimizer_states"][0]["param_groups"][0]["lr"] == 3e-4 and c["run_config"]["optim"]["lr"] == 3e-4
    with pytest.raises(
        ConfigError, match=r"differs from the checkpoint's in diffusion.schedule \('cosine' -> 'linear'\)"
    ):
        train(compose_train([*RESUME, "trainer.max_epochs=3", "ckpt_path=last", "diffusion.schedule=linear"], tmp_path))
    # a DDPM run resumed under the IDDPM preset: named keys, not KeyError: 'history'
    ddpm = [k for k in RESUME if not k.startswith(("experiment", "timesteps"))]
    train(compose_train([*ddpm, "trainer.max_epochs=1"], tmp_path / "ddpm"))
    with pytest.raises(ConfigError, match=r"diffusion.var_type \('fixed_small' -> 'learned_range'\)"):
        train(compose_train([*RESUME, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path / "ddpm"))


SCHEDULES = {
    "warmup": lambda opt, lr: torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=20),
    "warmup_cosine": lambda opt, lr: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=50, pct_start=0.2, cycle_momentum=False, div_factor=1e3, final_div_factor=1e3
    ),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_changed_lr_on_resume_continues_the_schedule_of_the_new_lr(schedule):
    """Resumed at step 10 with lr 1e-3 -> 3e-4, the next 30 rates are those of a run started at 3e-4 (both
    schedules are linear in the base rate); the scheduler's rates in the param groups must scale with it."""
    from types import SimpleNamespace

    from diffusion_lab.lit.checkpointing import ApplyChangedHyperparameters

    def start(lr):
        opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=lr)
        return opt, SCHEDULES[schedule](opt, lr)

    def rates(opt, sched, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    opt, sched = start(1e-3)
    rates(opt, sched, 10)
    trainer = SimpleNamespace(optimizers=[opt], lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])
    ApplyChangedHyperparameters({"lr": (1e-3, 3e-4)}).on_train_start(trainer, None)
    fresh_opt, fresh_sched = start(3e-4)
    expected = rates(fresh_opt, fresh_sched, 40)[10:]
    assert rates(opt, sched, 30) == pytest.approx(expected, rel=1e-9, abs=0)


def test_resume_plan_applies_a_changed_lr_under_warmup_cosine(tmp_path):
    """OneCycleLR's max_lr is ${optim.lr}: a resume with a new optim.lr is applied (the schedule rescaled by
    ApplyChangedHyperparameters, tested above) instead of refusing the resolved lr_scheduler.max_lr; its
    total_steps (trainer.max_steps) still cannot change within a run."""
    from diffusion_lab.tasks import _resume_plan

    steps = [*RESUME, "lr_scheduler=warmup_cosine", "trainer.max_steps=8", "trainer.max_epochs=1"]
    train(compose_train(steps, tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    optim, _ = _resume_plan(compose_train([*steps, "ckpt_path=last", "optim.lr=3e-4"], tmp_path), last)
    assert set(optim) == {"lr"} and optim["lr"][1] == 3e-4
    with pytest.raises(ConfigError, match=r"lr_scheduler.total_steps \(8 -> 9\)"):
        _resume_plan(compose_train([*steps, "ckpt_path=last", "trainer.max_steps=9"], tmp_path), last)


def test_auto_resume_falls_back_from_a_corrupt_last_ckpt(tmp_path, caplog):
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path))
    ckpts = tmp_path / "checkpoints"
    (ckpts / "last.ckpt").write_bytes((ckpts / "last.ckpt").read_bytes()[:1000])  # a torn write
    (ckpts / ".last.ckpt.abc123.tmp").write_bytes(b"")  # left by a killed write
    train(compose_train([*RESUME, "trainer.max_epochs=2", "auto_resume=true"], tmp_path))
    assert "last.ckpt is unusable" in caplog.text and "epoch0000-step0000004.ckpt" in caplog.text
    assert _states(ckpts / "last.ckpt")[3] == 8 and not list(ckpts.glob("*.tmp"))


def test_auto_resume_and_missing_last(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=last"):
        train(compose_train([*RESUME, "ckpt_path=last"], tmp_path))
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path))
    train(compose_train([*RESUME, "trainer.max_epochs=2", "auto_resume=true"], tmp_path))
    assert _states(tmp_path / "checkpoints" / "last.ckpt")[3] == 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_entry_anywhere_and_never_overflows(bad):
    big = torch.full((64, 64), 3e38)  # finite; its 2-norm overflows float32, its max does not
    tensors = [torch.ones(3, 3), big, torch.zeros(5), torch.zeros(0)]
    assert all_finite(tensors) and all_finite([]) and all_finite(t for t in tensors)
    for i in range(3):  # each non-empty tensor in turn
        hit = [t.clone() for t in tensors]
        hit[i].view(-1)[-1] = bad  # the last entry of one tensor, the others clean
        assert not all_finite(hit), (i, bad)
    assert not all_finite([torch.tensor([bad], dtype=torch.bfloat16), torch.ones(2)])


def test_nonfinite_weights_after_the_step_never_reach_a_checkpoint(tmp_path):
    """Loss and gradients finite, weights NaN after the optimizer step (the `optim.lr=inf` case): stop before the
    EMA update and before any checkpoint of that step; every checkpoint on disk stays finite."""
    base = [*SMALL, "experiment=ddpm_linear", "trainer.limit_train_batches=1", "trainer.max_epochs=3"]
    nan_adam = ["optim._target_=helpers.NaNAdam", "+optim.nan_at_step=2"]
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights after the optimizer step at global step 2"):
        train(compose_train([*base, *nan_adam], tmp_path))
    ckpts = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(_states(p)[3] == 1 for p in ckpts)
    for p in ckpts:
        c = torch.load(p, weights_only=True)
        assert all(torch.isfinite(v).all() for key in ("state_dict", "current_model_state") for v in c[key].values())


def test_nan_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    base = [*SMALL, "experiment=ddpm_linear"]
    train(compose_train([*base, "trainer.max_epochs=1"], tmp_path))
    good = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    # the same run directory, a network that turns NaN at its 3rd training call
    nan_net = ["net._target_=helpers.NaNNet", "+net.nan_at_call=3", "trainer.max_epochs=2"]
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient at global step 2 \(loss terms: loss=nan"):
        train(compose_train([*base, *nan_net], tmp_path))
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == good
    saved = torch.load(tmp_path / "debug" / "nonfinite_step0000002.pt")
    assert saved["t"].shape == (32,)


def test_atomic_checkpoint_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    def crash(obj, f):
        f.write(b"partial") if hasattr(f, "write") else open(f, "wb").write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and list(tmp_path.iterdir()) == [path]


def test_sigkill_mid_training_then_resume_finishes(tmp_path):
    """Two real train.py processes: the first killed with SIGKILL after its epoch-2 checkpoint (~30 s)."""
    run = tmp_path / "run"
    args = [
        sys.executable,
        "train.py",
        "trainer.max_epochs=12",
        "trainer.limit_train_batches=4",
        "data.batch_size=32",
        "net.base_channels=16",
        "trainer.check_val_every_n_epoch=1",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "callbacks.sample_grid.every_n_epochs=1000",
        "sampler.steps=5",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not (last.exists() and torch.load(last, weights_only=False)["epoch"] >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=False)["global_step"]  # loadable after the kill
    assert 8 <= killed_at < 48
    r = subprocess.run([*args, "ckpt_path=last"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(last, weights_only=False)["global_step"] == 48


INVALID = [
    (["diffusion.schedule=quadratic"], r"diffusion.schedule='quadratic'.*linear, cosine"),
    (["sampler.method=dpm_fast"], r"sampler.method='dpm_fast' is unknown; allowed: ddpm, ddim, dpmpp_2m"),
    (["+sampler.order=2"], r"sampler.order is not an option of sampler.method=ddim"),
    (["diffusion.var_type=big"], r"diffusion.var_type='big'.*fixed_small"),
    (["diffusion.loss_type=l1"], r"diffusion.loss_type='l1'.*mse"),
    (["diffusion.mean_type=score"], r"diffusion.mean_type='score'.*eps, x0, v"),
    (["sampler.steps=2000"], r"sampler.steps=2000 must be between 1 and diffusion.steps=1000"),
    (["sampler.eta=-0.5"], r"sampler.eta=-0.5 must be a number >= 0"),
    (["sampler.guidance_scale=3"], r"sampler.guidance_scale=3.*class-conditional"),
    (["net.attention_resolutions=[16]"], r"net.attention_resolutions=\[16\]: \[16\] never reached.*\[8, 4, 2\]"),
    (["data.image_size=12", "net.channel_mult=[1,2,2,2]"], r"data.image_size=12 cannot be halved 3 times"),
    (["diffusion.var_type=learned_range"], r"needs net.learn_sigma=True"),
    (["label_dropout=0.1"], r"label_dropout=0.1 needs a class-conditional net"),
    (["callbacks=with_fid", "callbacks.fid.inception_weights=/nonexistent.pth"], r"fid.inception_weights"),
]


@pytest.mark.parametrize("overrides,match", INVALID, ids=[o[0][-1] for o in INVALID])
def test_invalid_config_fails_fast(tmp_path, overrides, match):
    t0 = time.time()
    with pytest.raises((ConfigError, ValueError, RuntimeError), match=match):
        train(compose_train([*FAST, *overrides], tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained or written
    assert time.time() - t0 < 30


def test_a_checkpoint_written_before_the_renames_and_new_keys_resumes(tmp_path):
    """A run config as the previous release saved it (old timestep-sampler target names, no loss-weighting or
    zero-terminal-SNR keys) resumes: renamed targets and keys added with their old behaviour are not changes."""
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    c = torch.load(last, weights_only=True)
    c["run_config"]["timesteps"]["_target_"] = "diffusion_lab.diffusion.LossSecondMomentSampler"
    for key in ("loss_weighting", "snr_gamma", "p2_k", "p2_gamma", "zero_terminal_snr"):
        del c["run_config"]["diffusion"][key]
    torch.save(c, last)
    train(compose_train([*RESUME, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path))
    assert _states(last)[3] == 8


def test_epochs_after_the_last_save_point_are_checkpointed(tmp_path):
    """Validation (and so Lightning's saves) every 10 epochs, 3 epochs run: last.ckpt still has all 12 steps."""
    train(compose_train([*RESUME, "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=10"], tmp_path))
    assert _states(tmp_path / "checkpoints" / "last.ckpt")[3] == 12


def test_gradient_accumulation_resume_is_exact_and_micro_batches_differ(tmp_path):
    acc = [*RESUME, "+trainer.accumulate_grad_batches=2", "logger=none"]
    train(compose_train([*acc, "trainer.max_epochs=100", "trainer.max_steps=5"], tmp_path / "full"))
    train(compose_train([*acc, "trainer.max_epochs=100", "trainer.max_steps=3"], tmp_path / "part"))
    train(compose_train([*acc, "trainer.max_epochs=100", "trainer.max_steps=5", "ckpt_path=last"], tmp_path / "part"))
    _assert_same_run(
        tmp_path / "full" / "checkpoints" / "last.ckpt", tmp_path / "part" / "checkpoints" / "last.ckpt", 5
    )
    from diffusion_lab.lit.module import batch_seed

    assert batch_seed(42, 0, 0, 0) != batch_seed(42, 0, 1, 0)  # the two micro-batches of step 1 draw differently


def test_resume_without_the_ema_callback_continues_from_the_raw_weights(tmp_path):
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path))
    raw = _states(tmp_path / "checkpoints" / "last.ckpt")[1]
    seen = {}

    class Peek(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    cfg = compose_train([*RESUME, "trainer.max_epochs=2", "ckpt_path=last", "callbacks.ema=null"], tmp_path)
    from diffusion_lab import tasks

    orig = tasks._callbacks
    tasks._callbacks = lambda c, has_logger: [*orig(c, has_logger), Peek()]
    try:
        train(cfg)
    finally:
        tasks._callbacks = orig
    assert all(torch.equal(seen[k], raw[k]) for k in raw)
