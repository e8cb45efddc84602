"""Image files and image logging: sample grids as PNG (atomically), sent to the loggers that take images.

grid = save_grid(images, "samples/final.png")        # images [N, C, H, W] in [-1, 1]
log_image(trainer.loggers, "samples/grid", path, grid, step)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from .io import atomic_write


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


def log_image(loggers, key: str, path: str | Path, grid: torch.Tensor, step: int) -> None:
    """Send a grid [3, H, W] in [0, 1] to every logger that takes images (W&B: the file, TensorBoard: the tensor)."""
    for logger in loggers:
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key=key, images=[str(path)], step=step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            logger.experiment.add_image(key, grid, step)
