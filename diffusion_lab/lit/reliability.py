"""Crash safety: atomic checkpoint files and a guard that stops on a non-finite loss or gradient."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.cloud_io import _atomic_save
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import atomic_write

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpointing, but through a temp file + rename in the same directory:
    a kill during a write leaves the previous checkpoint intact (Lightning writes in place)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote filesystems: Lightning's own path
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as tmp:
            _atomic_save(checkpoint, tmp)


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard(L.Callback):
    """Stop with a clear error at the first non-finite loss or gradient norm.

    The error names the global step and each loss term; the offending batch's timesteps are saved to
    `dirpath/nonfinite_step<step>.pt`. No checkpoint is written for that step, so the last good one stays.
    """

    def __init__(self, dirpath: str = "debug", check_grads: bool = True):
        self.dirpath, self.check_grads = Path(dirpath), check_grads

    def _fail(self, trainer, pl_module, what: str) -> None:
        info = getattr(pl_module, "last_batch_info", {})
        path = self.dirpath / f"nonfinite_step{trainer.global_step:07d}.pt"
        with atomic_write(path) as tmp:
            torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in info.items()}, tmp)
        terms = ", ".join(f"{k}={float(v.float().mean()):.4g}" for k, v in info.get("losses", {}).items())
        raise NonFiniteLossError(
            f"non-finite {what} at global step {trainer.global_step} (loss terms: {terms}); the batch's timesteps "
            f"are in {path}; the last good checkpoint is untouched. Lower optim.lr or set trainer.gradient_clip_val."
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            self._fail(trainer, pl_module, "loss")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.check_grads:
            return
        norms = [p.grad.detach().norm() for p in pl_module.parameters() if p.grad is not None]
        if norms and not math.isfinite(float(torch.stack(norms).norm())):
            self._fail(trainer, pl_module, "gradient")
