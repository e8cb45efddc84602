"""Callbacks: sample grids from the EMA weights, written as PNG and sent to the loggers."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from ..diffusion import Sampler
from ..io import atomic_write
from .ema import EMA


def ema_module(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
    """The module holding the EMA weights (see EMA.of); pl_module itself without an EMA callback."""
    return EMA.of(trainer, pl_module)


def log_image(trainer: L.Trainer, key: str, path: str | Path, grid: torch.Tensor, step: int) -> None:
    """Send a grid [3, H, W] in [0, 1] to every logger that takes images (W&B, TensorBoard)."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=key, images=[str(path)], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image(key, grid, step)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, min_side: int = 32) -> torch.Tensor:
    """Write images [N, C, H, W] in [-1, 1] as one PNG grid (atomically); returns the grid [3, H', W'] in [0, 1].

    Images smaller than min_side pixels are enlarged (nearest neighbour) so that a person can read them.
    """
    nrow = nrow or max(1, int(math.sqrt(images.shape[0])))
    images = (images.float().cpu() + 1) / 2
    if images.shape[-1] < min_side:
        images = F.interpolate(images, scale_factor=min_side // images.shape[-1], mode="nearest")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0).clamp(0, 1)
    with atomic_write(path) as tmp:
        save_image(grid, tmp, format="png")
    return grid


class SampleGridCallback(L.Callback):
    """Write sample grids from the EMA weights: `samples/epoch_XXXX.png` every `every_n_epochs` epochs and
    `samples/final.png` at the end of training. Fixed x_T (seed), rank 0 only; conditional models get one row
    per class 0..num_classes-1."""

    def __init__(
        self,
        dirpath: str = "samples",
        every_n_epochs: int = 1,
        num_samples: int = 64,
        sampler: Sampler | None = None,
        seed: int = 0,
        guidance_scales: list[float] | None = None,
    ):
        self.dirpath, self.every_n_epochs, self.num_samples = Path(dirpath), every_n_epochs, num_samples
        self.sampler, self.seed = sampler, seed
        self.guidance_scales = list(guidance_scales or [])

    def write(self, trainer: L.Trainer, module: L.LightningModule, name: str) -> list[Path]:
        """One grid (`name.png`), or for a conditional model with guidance_scales one per scale
        (`name_cfg<s>.png`), each from the same x_T."""
        sampler = self.sampler or module.sampler
        y, nrow, variants = None, None, [(name, sampler)]
        if module.conditional:
            k = module.net.num_classes
            nrow = max(1, self.num_samples // k)
            y = torch.arange(k).repeat_interleave(nrow)
            variants = [
                (f"{name}_cfg{s:g}", sampler.replace(guidance_scale=float(s))) for s in self.guidance_scales
            ] or variants
        n = y.shape[0] if y is not None else self.num_samples
        paths = []
        for file_name, s in variants:
            images = module.sample(n, s, y=y, generator=torch.Generator().manual_seed(self.seed))
            path = self.dirpath / f"{file_name}.png"
            grid = save_grid(images, path, nrow)
            log_image(
                trainer,
                f"samples/{file_name.split('_', 1)[-1] if '_cfg' in file_name else 'grid'}",
                path,
                grid,
                trainer.global_step,
            )
            paths.append(path)
        return paths

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.write(trainer, ema_module(trainer, pl_module), f"epoch_{trainer.current_epoch:04d}")

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.write(trainer, ema_module(trainer, pl_module), "final")
