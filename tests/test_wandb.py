"""logger=wandb with no account: offline mode is chosen automatically and the offline run directory holds
the config, the logged metric keys and the sample images."""

import re
import time

import torch
from conftest import FAST, compose_train

from diffusion_lab.tasks import train


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc credentials
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    train(compose_train([*FAST, "logger=wandb", "callbacks.sample_grid.every_n_epochs=1"], tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list(tmp_path.rglob("*"))[:20]
    run = runs[0]
    keys = (b"diffusion", b"schedule", b"train/loss_step", b"val/loss", b"samples")
    # The record stream is written by wandb's own service process: once (a loaded machine, 2026-11-30) the file
    # still held only its 7-byte header when finish() had returned, so wait for it, up to 60 s.
    deadline = time.monotonic() + 60
    while True:
        data = b"".join(p.read_bytes() for p in run.glob("*.wandb"))  # the offline run's record stream
        if all(k in data for k in keys) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for key in keys:
        assert key in data, key
    assert list(run.rglob("*.png"))  # the sample grids


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    short = [*FAST, "logger=wandb", "trainer.max_steps=-1", "trainer.limit_train_batches=2", "data.batch_size=16"]
    train(compose_train([*short, "trainer.max_epochs=1"], tmp_path))
    run_id = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["wandb_run_id"]
    train(compose_train([*short, "trainer.max_epochs=2", "ckpt_path=last"], tmp_path))
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # both directories are the same W&B run; wandb appends -1 to the second one's name when both start in one second
    same_run = rf"offline-run-\d{{8}}_\d{{6}}-{run_id}(-\d+)?"
    assert len(runs) == 2 and all(re.fullmatch(same_run, r.name) for r in runs), runs
