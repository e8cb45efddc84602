"""Past one machine (issue 35): two torchrun nodes, SLURM requeue, Hydra's submitit launchers. (The derived
checkpoint allow-list is tested in test_hostile_inputs.py.)"""

import logging
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from conftest import ROOT, compose_train, evaluate_fid
from test_reliability import RESUME, _assert_same_run

from diffusion_lab.tasks import train

# What SLURM puts in a batch job's environment (enough for Lightning's SLURMEnvironment.detect()).
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0",
         "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # fmt: skip
STEPS = ["trainer.max_epochs=100", "trainer.max_steps=8"]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted 8-step run both signal tests compare with (trained once)."""
    out = tmp_path_factory.mktemp("full")
    train(compose_train([*RESUME, *STEPS], out))
    return out / "checkpoints" / "last.ckpt"


def _fake_scontrol(tmp_path, monkeypatch):
    """An `scontrol` on PATH that records its arguments (a local run has no SLURM controller)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "scontrol.log"


def test_slurm_signal_writes_last_ckpt_requeues_and_the_requeued_job_resumes_exactly(tmp_path, monkeypatch, caplog,
                                                                                    full_run):
    """SLURM's USR1 arrives mid-step 3 (after backward, before the optimizer step) of an 8-step run: last.ckpt holds
    step 3, `scontrol requeue <job>` is called once, the run stops; the requeued job (SLURM_RESTART_COUNT=1, no
    auto_resume or ckpt_path given) resumes from it and ends bit for bit where the uninterrupted run does."""
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
    _assert_same_run(full_run, last, 8)
    assert log.read_text().split() == ["requeue", "4242"]  # no signal this time: no second requeue


def test_the_requeue_callback_is_inert_outside_slurm(tmp_path, monkeypatch):
    """Without SLURM's environment USR1/USR2 keep their own meaning: the callback installs only SIGTERM's handler."""
    for k in SLURM:
        monkeypatch.delenv(k, raising=False)
    seen = []
    monkeypatch.setattr(signal, "signal", lambda sig, handler: seen.append(sig))
    from diffusion_lab.lit.checkpointing import Requeue

    cb = Requeue(tmp_path)
    cb.on_train_start(types.SimpleNamespace(is_global_zero=True), None)
    assert seen == [signal.SIGTERM] and list(cb.previous) == [signal.SIGTERM]


def test_sigterm_mid_step_writes_last_ckpt_stops_and_the_resumed_run_is_bit_exact(tmp_path, full_run):
    """Issue 45: SIGTERM (no SLURM) mid-step 3 of an 8-step run: last.ckpt holds step 3, the run ends with Preempted
    (the entry points exit 1), SIGTERM's handler is restored, and auto_resume=true continues to the same weights,
    optimizer state and sampler history, bit for bit, as the uninterrupted run."""
    from diffusion_lab.lit.checkpointing import Preempted

    before = signal.getsignal(signal.SIGTERM)
    signalled = [*RESUME, *STEPS, "+callbacks.signal._target_=helpers.SignalAt", "+callbacks.signal.step=3",
                 f"+callbacks.signal.signum={int(signal.SIGTERM)}"]  # fmt: skip
    with pytest.raises(Preempted, match="stopped at step 3 on SIGTERM"):
        train(compose_train(signalled, tmp_path / "part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) == before
    train(compose_train([*RESUME, *STEPS, "auto_resume=true"], tmp_path / "part"))
    _assert_same_run(full_run, last, 8)


def test_a_signal_no_training_step_answers_still_requeues_the_job(tmp_path, monkeypatch):
    """SLURM's signal during a long validation or FID evaluation (no step ends): after fallback_s the job is requeued
    anyway (without a new checkpoint), and the process's own handlers come back at teardown."""
    from diffusion_lab.lit.checkpointing import Requeue

    log = _fake_scontrol(tmp_path, monkeypatch)
    for k, v in SLURM.items():
        monkeypatch.setenv(k, v)
    before = signal.getsignal(signal.SIGUSR1)
    cb = Requeue(tmp_path, fallback_s=0.3)
    cb.on_train_start(types.SimpleNamespace(is_global_zero=True), None)
    os.kill(os.getpid(), signal.SIGUSR1)
    deadline = time.time() + 30
    while not log.exists() and time.time() < deadline:
        time.sleep(0.1)
    cb.teardown(None, None, "fit")
    assert log.read_text().split() == ["requeue", "4242"] and signal.getsignal(signal.SIGUSR1) == before


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
    ("train", ["trainer=gpu"], (1, 1, 1)),
    ("train", [], (1, 1, None)),  # trainer=cpu, the default: no GPU asked for (issue 45)
    ("train", ["trainer=ddp", "trainer.accelerator=cpu"], (1, 2, None)),
    ("evaluate", ["ckpt_path=x.ckpt"], (1, 1, None)),  # no trainer node: one task; device=cpu
    ("evaluate", ["ckpt_path=x.ckpt", "device=cuda"], (1, 1, 1)),
])  # fmt: skip
def test_the_slurm_launcher_preset_follows_the_trainer(config, overrides, expect):
    """hydra/launcher=slurm asks SLURM for trainer.num_nodes nodes and one task and GPU per device (none for a CPU
    run), and for USR2
    120 s before the time limit (what lit.Requeue answers)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config, overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == expect
    assert launcher._target_.endswith("SlurmLauncher") and launcher.signal_delay_s == 120
    assert launcher.max_num_timeout > 0  # a job at its time limit is requeued, not lost


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_nodes(args: list[str], run_dir) -> None:
    """`train.py` as two torchrun "nodes" on 127.0.0.1 (--nnodes=2 --nproc-per-node=1, node ranks 0 and 1), the
    way a cluster starts it on two machines: Lightning's TorchElasticEnvironment takes the ranks from torchrun."""
    port = _free_port()
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = lambda rank: [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",  # noqa: E731
                        f"--node-rank={rank}", "--master-addr=127.0.0.1", f"--master-port={port}", "train.py",
                        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=2",
                        *args, f"hydra.run.dir={run_dir}"]  # fmt: skip
    other = subprocess.Popen(cmd(1), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        r = subprocess.run(cmd(0), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        out1, _ = other.communicate(timeout=120)
    finally:
        other.kill()
    assert r.returncode == 0 and other.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:] + out1[-2000:]


def test_two_torchrun_nodes_train_resume_exactly_and_score_as_one_process(tmp_path, inception_path):
    """Two nodes (torchrun, gloo): one set of checkpoints (rank 0's); stopped at step 3 and resumed, the run ends
    bit for bit where the uninterrupted 6-step run does; the FID callback's score at the end (each node samples
    half the images) equals evaluate.py's in one process on the same checkpoint and images."""
    common = ["experiment=iddpm_cosine", "trainer.enable_progress_bar=false", "net.base_channels=16",
              "diffusion.steps=20", "timesteps.history_per_term=2", "data.batch_size=16", "trainer.max_epochs=100",
              "trainer.limit_train_batches=4", "trainer.limit_val_batches=1",
              "callbacks.sample_grid.every_n_epochs=100", "sampler.steps=5", "logger=csv"]  # fmt: skip
    fid = ["callbacks=with_fid", "callbacks.fid.num_samples=12", "callbacks.fid.reference_split=val",
           "callbacks.fid.num_reference=32",
           "callbacks.fid.samplers=[{method: ddim, steps: 5, eta: 1.0}]", f"paths.cache_dir={tmp_path / 'cache'}",
           f"callbacks.fid.inception_weights={inception_path}"]
    _torchrun_two_nodes([*common, "trainer.max_steps=6"], tmp_path / "full")
    _torchrun_two_nodes([*common, "trainer.max_steps=3"], tmp_path / "part")
    _torchrun_two_nodes([*common, *fid, "trainer.max_steps=6", "ckpt_path=last"], tmp_path / "part")
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("full", "part"))
    assert a["global_step"] == b["global_step"] == 6
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert torch.equal(a["timestep_sampler"]["history"], b["timestep_sampler"]["history"])
    assert sorted(p.name for p in (tmp_path / "part").rglob("*.ckpt")) == sorted(
        p.name for p in (tmp_path / "part" / "checkpoints").iterdir()
    ) and len(list((tmp_path / "part").rglob("metrics.csv"))) == 1
    # issue 45: each rank writes its own config and log (rank 1 under rank1/ and train.rank1.log), none interleaved
    run = tmp_path / "full"
    assert (run / ".hydra" / "config.yaml").exists() and (run / "rank1" / ".hydra" / "config.yaml").exists()
    assert (run / "train.log").exists() and (run / "train.rank1.log").exists()
    assert "GLOBAL_RANK: 1" in (run / "train.rank1.log").read_text()
    assert "GLOBAL_RANK: 1" not in (run / "train.log").read_text()

    import csv

    rows = list(csv.DictReader(open(tmp_path / "part" / "csv" / "metrics.csv")))
    two_nodes = [float(r["val/fid/ddim5_eta1"]) for r in rows if r.get("val/fid/ddim5_eta1")]
    one = evaluate_fid(tmp_path / "part" / "checkpoints" / "last.ckpt", ["sampler=ddim", "sampler.steps=5",
                        "+sampler.eta=1.0"], tmp_path / "eval", inception_path)  # fmt: skip
    assert len(two_nodes) == 1 and list(one.values()) == [pytest.approx(two_nodes[0], rel=1e-4)]

