"""How training writes and reads checkpoints: atomically, finite weights only, as pure data.

- AtomicCheckpointIO: temp file + rename (a kill mid-write leaves the previous file), refuses to write
  non-finite weights, and reads with `torch.load(weights_only=True)` (a checkpoint cannot run code); a
  checkpoint written after an epoch's last batch resumes at the next epoch (resume_at_next_epoch).
- RunCheckpoint: ModelCheckpoint that also writes last.ckpt when trainer.max_steps stops a run inside an
  epoch, and keeps exactly one last.ckpt (no last-v1.ckpt after a run directory is moved).
- Requeue: on a SLURM cluster, SLURM's warning signal (USR1, or USR2 from submitit) writes last.ckpt at the end of
  the step it arrives in, then requeues the job, which resumes from it. Anywhere, SIGTERM (a preemption, a
  scheduler's kill) writes last.ckpt at the end of its step too, within a grace time, and ends the run non-zero.
- AlignLoggingStep: keeps the step of logged rows equal to the optimizer step after a resume.
- ApplyChangedHyperparameters: on resume, puts the run config's changed optimizer values into the
  optimizer state that Lightning restored from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint
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


class RequeueStop(Exception):
    """Raised to end a run after Requeue wrote last.ckpt (the requeued job continues it)."""


class Preempted(RuntimeError):
    """Raised to end a run after SIGTERM: last.ckpt holds the step it arrived in (the entry points exit 1)."""


class Requeue(Checkpoint):
    """Checkpoint and requeue on SLURM's warning signal (`#SBATCH --signal=USR1@120 --requeue`, or submitit's USR2).

    The signal only sets a flag; at the end of the optimizer step it arrives in (after the EMA update: Lightning runs
    Checkpoint callbacks last), the ranks agree on it (one all-reduce per step, only under SLURM), last.ckpt is
    written, and the job is requeued: through the handler that was there before (submitit's, under
    hydra/launcher=slurm, which requeues and exits the process) or `scontrol requeue` from rank 0, after which the
    run ends with RequeueStop. If no training step ends within `fallback_s` of the signal (validation or the FID
    callback running), the job is requeued without a new checkpoint and resumes from the newest last.ckpt. The
    requeued job resumes from last.ckpt (tasks.train does so for a job whose SLURM_RESTART_COUNT is set).
    Written here, not Lightning's auto_requeue (tasks.train turns it off): Lightning saves inside the signal
    handler, mid-step, so the resumed run would not equal the uninterrupted one. USR1/USR2 are left alone outside
    SLURM (Lightning's SLURMEnvironment.detect()).

    SIGTERM, anywhere (a preemption, a scheduler's kill): the same flag, and at the end of the
    step it arrives in last.ckpt is written and the run ends with Preempted (exit 1, so a scheduler requeues it; the
    rerun resumes with auto_resume=true or, on SLURM, by itself). If no step ends within `grace_s` (SLURM's default
    KillWait is 30 s), the process exits 143 without a new checkpoint. Lightning's own SIGTERM handling saves
    nothing here, so it is replaced while training; the ranks agree on the flag with one all-reduce per step.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, dirpath: str | Path, fallback_s: float = 60.0, grace_s: float = 25.0):
        self.last, self.fallback_s, self.grace_s = Path(dirpath) / "last.ckpt", float(fallback_s), float(grace_s)
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        self.timer: threading.Timer | None = None
        self.rank_zero = True

    def _handler(self, signum, frame) -> None:
        self.received = max(signum, self.received or 0)  # SIGTERM (15) outranks the warnings (10, 12)
        if signum == signal.SIGTERM:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = threading.Timer(self.grace_s, self._give_up)
        elif self.timer is None:
            self.timer = threading.Timer(self.fallback_s, self._fallback)
        else:
            return
        self.timer.daemon = True
        self.timer.start()

    def _give_up(self) -> None:
        log.warning("SIGTERM: no training step ended within %.0f s; exiting without a new checkpoint (the run resumes "
                    "from %s)", self.grace_s, self.last)  # fmt: skip
        logging.shutdown()
        os._exit(143)

    def _fallback(self) -> None:
        log.warning("SLURM signal: no training step ended within %.0f s (validation or FID running); requeueing "
                    "without a new checkpoint: the job resumes from %s", self.fallback_s, self.last)  # fmt: skip
        self._requeue(self.received or signal.SIGUSR1)

    def _requeue(self, signum: int) -> None:
        previous = self.previous.get(signum)
        if callable(previous):  # submitit: it pickles the job for the requeue, requeues and exits
            previous(signum, None)
        elif self.rank_zero:
            job = os.environ.get("SLURM_JOB_ID", "")
            if array := os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
            try:
                done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
                ok, why = done.returncode == 0, done.stderr.strip()
            except (OSError, subprocess.TimeoutExpired) as e:
                ok, why = False, str(e)
            if not ok:
                log.warning("scontrol requeue %s failed (%s): rerun the job; it resumes from %s", job, why, self.last)

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning registered its own signal handlers
        self.received, self.timer, self.rank_zero = None, None, trainer.is_global_zero
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (*self.SIGNALS, signal.SIGTERM) if SLURMEnvironment.detect() else (signal.SIGTERM,):
            self.previous[sig] = signal.signal(sig, self._handler)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips the teardown hook when fit raises

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.previous or (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # outside SLURM, or inside a gradient accumulation
        # every rank takes part each step; the largest signal number wins, so all ranks requeue the same way
        signum = int(trainer.strategy.reduce(torch.tensor(float(self.received or 0)), reduce_op="max"))
        if not signum:
            return
        if self.timer is not None:
            self.timer.cancel()
        trainer.save_checkpoint(self.last)
        if signum == signal.SIGTERM:
            log.warning("SIGTERM: wrote %s at step %d; stopping", self.last, trainer.global_step)
            raise Preempted(f"stopped at step {trainer.global_step} on SIGTERM; {self.last} holds it: rerun with "
                            "auto_resume=true to continue")  # fmt: skip
        log.warning("SLURM signal %s: wrote %s at step %d; requeueing", signal.Signals(signum).name, self.last,
                    trainer.global_step)  # fmt: skip
        self._requeue(signum)
        raise RequeueStop(f"stopped at step {trainer.global_step} on SLURM's signal; {self.last} holds it")


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
