"""train.py end to end through Hydra's compose API, and a short real training whose loss falls."""

import csv

import pytest
import torch
from conftest import FAST, compose_train

from diffusion_lab.tasks import load_module, train


def test_train_writes_checkpoint_grid_and_finite_loss(tmp_path):
    cfg = compose_train(FAST, tmp_path)
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "samples" / "final.png").exists()
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert any(r.get("train/loss_step") for r in rows)
    # the checkpoint alone rebuilds the model (config saved inside), EMA weights by default
    module = load_module(tmp_path / "checkpoints" / "last.ckpt")
    assert module.net.base_channels == 16
    x = module.sample(2, seed=0)
    assert x.shape == (2, 1, 8, 8) and x.abs().max() <= 1


def test_warmup_cosine_peaks_at_optim_lr_and_ends_near_zero(tmp_path):
    """lr_scheduler=warmup_cosine reads optim.lr and trainer.max_steps: the logged rate (LearningRateMonitor,
    every step) rises from lr/1000 to lr over pct_start of the run, then falls monotonically to lr/1e6."""
    train(compose_train([*FAST, "trainer.max_steps=8", "lr_scheduler=warmup_cosine", "lr_scheduler.pct_start=0.375",
                         "optim.lr=2e-3"], tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    lrs = [float(r["lr-Adam"]) for r in rows if r.get("lr-Adam")]
    assert len(lrs) == 8 and lrs[0] == pytest.approx(2e-6) and lrs[2] == pytest.approx(2e-3)
    assert lrs[:3] == sorted(lrs[:3]) and lrs[2:] == sorted(lrs[2:], reverse=True) and lrs[-1] == pytest.approx(2e-9)


# A small net on digits without sample grids: the settings the short training tests share.
SHORT_RUN = [
    "trainer.enable_progress_bar=false",
    "data.batch_size=64",
    "net.base_channels=16",
    "net.num_res_blocks=1",
    "callbacks.sample_grid.every_n_epochs=1000",
    "callbacks.sample_grid.num_samples=4",
    "sampler.steps=5",
]

def test_short_training_loss_falls(tmp_path):
    """100 steps on digits: the training MSE falls well below its start (~0.7 over the first steps; ~0.16 at step
    100 here, 2026-12-07)."""
    cfg = compose_train(
        [
            *SHORT_RUN,
            "trainer.max_epochs=100",
            "trainer.max_steps=100",
            "trainer.check_val_every_n_epoch=100",
            "trainer.log_every_n_steps=5",
            "optim.lr=1e-3",
        ],
        tmp_path,
    )
    train(cfg)
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("train/loss_step")]
    losses = [float(r["train/loss_step"]) for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first > 0.5 and last < 0.5 * first, (first, last)


def test_iddpm_short_run_vb_and_mse_fall(tmp_path):
    """experiment=iddpm_cosine on digits: the validation mse and vb (uniform t, fixed noise) both fall."""
    cfg = compose_train(
        [*SHORT_RUN, "experiment=iddpm_cosine", "trainer.max_epochs=6", "trainer.check_val_every_n_epoch=2"],
        tmp_path,
    )
    train(cfg)
    rows = [r for r in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if r.get("val/vb")]
    first, last = rows[0], rows[-1]
    assert len(rows) == 3  # 150 steps: mse 0.84 -> 0.47, vb 5.2 -> 1.8 (here, 2026-12-07)
    assert float(last["val/mse"]) < 0.7 * float(first["val/mse"]), (first["val/mse"], last["val/mse"])
    assert float(last["val/vb"]) < 0.7 * float(first["val/vb"]), (first["val/vb"], last["val/vb"])
