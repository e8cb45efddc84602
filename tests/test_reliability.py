"""Reliability: exact resume, atomic checkpoints, the non-finite guard, config validation."""

import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import FAST, ROOT, compose_train

from diffusion_lab.config import ConfigError
from diffusion_lab.lit.reliability import AtomicCheckpointIO, NonFiniteLossError
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


def _states(ckpt):
    c = torch.load(ckpt, weights_only=False)
    return c["state_dict"], c["current_model_state"], c["timestep_sampler"], c["global_step"]


def test_stop_and_resume_equals_uninterrupted_run(tmp_path):
    train(compose_train([*RESUME, "trainer.max_epochs=3"], tmp_path / "full"))
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path / "part"))
    train(compose_train([*RESUME, "trainer.max_epochs=3", "ckpt_path=last"], tmp_path / "part"))
    ema_a, raw_a, ts_a, step_a = _states(tmp_path / "full" / "checkpoints" / "last.ckpt")
    ema_b, raw_b, ts_b, step_b = _states(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert step_a == step_b == 12
    for k in raw_a:  # raw weights, EMA weights and the loss-aware sampler's history all continue exactly
        torch.testing.assert_close(raw_b[k], raw_a[k], rtol=0, atol=1e-6)
        torch.testing.assert_close(ema_b[k], ema_a[k], rtol=0, atol=1e-6)
    assert torch.equal(ts_a["history"], ts_b["history"]) and torch.equal(ts_a["counts"], ts_b["counts"])


def test_auto_resume_and_missing_last(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=last"):
        train(compose_train([*RESUME, "ckpt_path=last"], tmp_path))
    train(compose_train([*RESUME, "trainer.max_epochs=1"], tmp_path))
    train(compose_train([*RESUME, "trainer.max_epochs=2", "auto_resume=true"], tmp_path))
    assert _states(tmp_path / "checkpoints" / "last.ckpt")[3] == 8


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
    (["sampler.method=euler"], r"sampler.method='euler'.*ddpm, ddim"),
    (["diffusion.var_type=big"], r"diffusion.var_type='big'.*fixed_small"),
    (["diffusion.loss_type=l1"], r"diffusion.loss_type='l1'.*mse"),
    (["diffusion.mean_type=score"], r"diffusion.mean_type='score'.*eps, x0, v"),
    (["sampler.steps=2000"], r"sampler.steps=2000 must be between 1 and diffusion.steps=1000"),
    (["sampler.eta=-0.5"], r"sampler.eta=-0.5 must be >= 0"),
    (["sampler.guidance_scale=3"], r"sampler.guidance_scale=3.*class-conditional"),
    (["net.attention_resolutions=[16]"], r"net.attention_resolutions contains 16.*\[8, 4, 2\]"),
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
