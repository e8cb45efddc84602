"""Past one machine (issue 35): SLURM requeue, the derived checkpoint allow-list lives in test_hostile_inputs.py."""

import logging
import os
import signal

import torch
from conftest import compose_train
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
