"""How training writes and reads checkpoints: atomically, finite weights only, as pure data.

- AtomicCheckpointIO: temp file + rename (a kill mid-write leaves the previous file), refuses to write
  non-finite weights, and reads with `torch.load(weights_only=True)` (a checkpoint cannot run code); a
  checkpoint written after an epoch's last batch resumes at the next epoch (resume_at_next_epoch).
- RunCheckpoint: ModelCheckpoint that also writes last.ckpt when trainer.max_steps stops a run inside an
  epoch, and keeps exactly one last.ckpt (no last-v1.ckpt after a run directory is moved).
- AlignLoggingStep: keeps the step of logged rows equal to the optimizer step after a resume.
- ApplyChangedHyperparameters: on resume, puts the run config's changed optimizer values into the
  optimizer state that Lightning restored from the checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import atomic_write

log = logging.getLogger(__name__)
WEIGHT_KEYS = ("state_dict", "current_model_state")


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint whose weights hold NaN or inf."""


def nonfinite_weights(checkpoint: dict) -> list[str]:
    """Names ('state_dict/net.stem.weight', ...) of the weight tensors with a NaN or inf entry."""
    bad = []
    for key in WEIGHT_KEYS:
        for name, value in (checkpoint.get(key) or {}).items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
                bad.append(f"{key}/{name}")
    return bad


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save through a temp file + rename (Lightning writes in place), finite weights only; weights-only reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if bad := nonfinite_weights(checkpoint):
            raise NonFiniteCheckpointError(
                f"refusing to write {path}: {len(bad)} weight tensors are not finite (first: {bad[0]}); "
                "the checkpoint on disk is unchanged"
            )
        if "://" in str(path):  # remote filesystems: Lightning's own path
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_write(path) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=True)
        resume_at_next_epoch(checkpoint)
        return checkpoint


def resume_at_next_epoch(checkpoint: dict) -> bool:
    """Set the fit loop's progress of a checkpoint written after an epoch ended (at its end, or at train end after
    a max_epochs stop) to the start of the next epoch, in place; True if it did. An epoch ended early (a max_time
    stop) also resumes at the next epoch's first batch, as Lightning resumes epoch-bounded runs.

    Why: Lightning restarts every trainer.max_steps-bounded run as if inside an epoch (FitLoop.restarting, since
    Lightning-AI/pytorch-lightning#12821). From such a checkpoint it then replays the finished epoch's end and
    counts it as one more epoch (a resume with a raised max_epochs trained one epoch too few, or none), or
    continues past the epoch's last batch (one extra batch, and every later batch shifted). The next epoch's
    start is where the uninterrupted run is, and where Lightning resumes epoch-bounded runs (max_steps=-1) anyway.
    Touches nothing else (steps, optimizer, schedulers); a checkpoint without Lightning's loop state is left alone.
    """
    loop = (checkpoint.get("loops") or {}).get("fit_loop") or {}
    epochs, batches = loop.get("epoch_progress"), loop.get("epoch_loop.batch_progress")
    try:
        cur = epochs["current"]
        finished = cur["ready"] == cur["started"] == cur["processed"] and cur["completed"] in (
            cur["processed"] - 1,
            cur["processed"],
        )
        if not finished or not batches["current"]["ready"]:
            return False
        for part in ("current", "total"):
            epochs[part]["completed"] = epochs[part]["processed"]
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
    except (KeyError, TypeError):  # another Lightning version's layout: leave it to Lightning
        return False
    return True


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (top-k by a monitored value + last.ckpt), with two changes:

    - when trainer.max_steps ends the run inside an epoch, last.ckpt is written after that final step
      (Lightning writes it only at its epoch / validation save points, so the last steps were lost);
    - enable_version_counter defaults to False: last.ckpt is overwritten, never versioned as last-v1.ckpt.
    """

    def __init__(self, *args, enable_version_counter: bool = False, **kwargs):
        super().__init__(*args, enable_version_counter=enable_version_counter, **kwargs)
        self.saved_step = -1  # global step of the newest checkpoint this run wrote

    def last_path(self) -> Path:
        return Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.saved_step = int(checkpoint["global_step"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stops_here = 0 < trainer.max_steps <= trainer.global_step
        if self.save_last and stops_here and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.last_path())

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning writes last.ckpt here only when no last.ckpt was written during the run, so the epochs
        # after the last save point (e.g. past the last validation, or a max_time stop) would be lost.
        if self.save_last and self.saved_step != trainer.global_step:
            trainer.save_checkpoint(self.last_path())

    @property
    def state_key(self) -> str:
        """ModelCheckpoint's key, so the top-k state of checkpoints written with it is restored."""
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)


class AlignLoggingStep(Callback):
    """Logged rows' step is the optimizer step. Lightning's restart bookkeeping adds one to its logging counter
    when a max_steps run resumes from an end-of-epoch checkpoint; this resets it through the loop's (public)
    checkpoint-loading hook, whose state key names the counter, before each batch. Put it first among the
    callbacks: LearningRateMonitor logs in the same hook."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        trainer.fit_loop.epoch_loop.on_load_checkpoint({"_batches_that_stepped": trainer.global_step})


class ApplyChangedHyperparameters(Callback):
    """Resume with changed optimizer values (e.g. optim.lr): Lightning restores the optimizer's param groups
    from the checkpoint, which would silently keep the old values. `changes` maps an optimizer argument to
    (old, new). With an LR scheduler the learning rate is scaled by new / old (warm-up and decay continue from
    where they were, relative to the new base rate); without one it is set."""

    def __init__(self, changes: dict[str, tuple[Any, Any]]):
        self.changes = dict(changes)

    def on_train_start(self, trainer, pl_module) -> None:
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for name, (old, new) in self.changes.items():
                    if name == "lr" and schedulers and old:
                        # the schedulers' own rates (LinearLR's initial_lr; OneCycleLR's initial/max/min) scale too
                        for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                            if key in group:
                                group[key] *= new / old
                    else:
                        group[name] = tuple(new) if isinstance(group[name], tuple) else new
        if "lr" in self.changes and self.changes["lr"][0]:
            old, new = self.changes["lr"]
            for sched in schedulers:
                if hasattr(sched, "base_lrs"):
                    sched.base_lrs = [b * new / old for b in sched.base_lrs]
        log.info("resume: applied the changed optimizer values %s", {k: v[1] for k, v in self.changes.items()})
