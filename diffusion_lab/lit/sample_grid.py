"""SampleGridCallback: sample grids from the EMA weights during training, written as PNG and logged."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from ..diffusion import Sampler
from ..images import log_image, save_grid
from .ema import EMA


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
            images = module.sample(n, s, y=y, seed=self.seed)
            path = self.dirpath / f"{file_name}.png"
            grid = save_grid(images, path, nrow)
            log_image(
                trainer.loggers,
                f"samples/{file_name.split('_', 1)[-1] if '_cfg' in file_name else 'grid'}",
                path,
                grid,
                trainer.global_step,
            )
            paths.append(path)
        return paths

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.is_global_zero and self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.write(trainer, EMA.of(trainer, pl_module), f"epoch_{trainer.current_epoch:04d}")

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.write(trainer, EMA.of(trainer, pl_module), "final")
