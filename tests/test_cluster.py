"""Past one machine (issue 35): SLURM requeue, the derived checkpoint allow-list lives in test_hostile_inputs.py."""

import logging
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_train
from test_reliability import RESUME, _assert_same_run

from diffusion_lab.tasks import train

# What SLURM puts in a batch job's environment (enough for Lightning's SLURMEnvironment.detect()).
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
STEPS = ["trainer.max_epochs=100", "trainer.max_steps=8"]


def _fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments (a local run has no SLURM controller)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "scontrol.log"


def test_slurm_signal_writes_last_ckpt_requeues_and_the_requeued_job_resumes_exactly(tmp_path, monkeypatch, caplog):
    """SLURM's USR1 arrives mid-step 3 (after backward, before the optimizer step) of an 8-step run: last.ckpt holds
    step 3, `scontrol requeue <job>` is called once, the run stops; the requeued job (SLURM_RESTART_COUNT=1, no
    auto_resume or ckpt_path given) resumes from it and ends bit for bit where the uninterrupted run does."""
    train(compose_train([*RESUME, *STEPS], tmp_path / "full"))
    log = _fake_scontrol(tmp_path, monkeypatch)
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    before = signal.getsignal(signal.SIGUSR1)
    signalled = [*RESUME, *STEPS, "+callbacks.signal._target_=helpers.SignalAt", "+callbacks.signal.step=3"]
    train(compose_train(signalled, tmp_path / "part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert log.read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is gone with the run

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train(compose_train([*RESUME, *STEPS], tmp_path / "part"))
    assert f"Restoring states from the checkpoint path at {last}" in caplog.text  # resumed, not retrained
    _assert_same_run(tmp_path / "full" / "checkpoints" / "last.ckpt", last, 8)
    assert log.read_text().split() == ["requeue", "4242"]  # no signal this time: no second requeue


def test_the_requeue_callback_is_inert_outside_slurm(tmp_path, monkeypatch):
    """Without SLURM's environment the signal keeps its own meaning: the callback installs no handler."""
    for k in SLURM:
        monkeypatch.delenv(k, raising=False)
    seen = []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: seen.append(sig))
    from diffusion_lab.lit.checkpointing import Requeue

    cb = Requeue(tmp_path)
    cb.on_train_start(None, None)
    assert seen == [] and cb.previous == {}


def test_a_local_submitit_sweep_runs_each_job_apart_and_reports_the_failed_one(tmp_path):
    """`train.py -m hydra/launcher=local` (submitit's local executor, the SLURM launcher's twin): two jobs, one
    directory each; the one with an impossible batch size fails with its one-line error, reported by the sweep,
    and the other trains to its end."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "logger=none",
         "trainer.max_steps=3", "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "net.base_channels=16",
         "callbacks.sample_grid.every_n_epochs=100", "data.batch_size=16,100000"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert r.returncode != 0
    assert "error: data.batch_size=100000 is larger than the training set" in r.stderr
    assert torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert "Job completed successfully" in (sweep / "0" / "train.log").read_text()
    assert not (sweep / "1" / "checkpoints").exists()


@pytest.mark.parametrize("config,overrides,expect", [
    ("train", ["trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"], (2, 4, 4)),
    ("train", [], (1, 1, 1)),
    ("evaluate", ["ckpt_path=x.ckpt"], (1, 1, 1)),  # no trainer node: one task
])  # fmt: skip
def test_the_slurm_launcher_preset_follows_the_trainer(config, overrides, expect):
    """hydra/launcher=slurm asks SLURM for trainer.num_nodes nodes and one task and GPU per device, and for USR2
    120 s before the time limit (what lit.Requeue answers)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config, overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == expect
    assert launcher._target_.endswith("SlurmLauncher") and launcher.signal_delay_s == 120
    assert launcher.max_num_timeout > 0  # a job at its time limit is requeued, not lost
