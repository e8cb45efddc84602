"""EMA of the network weights (DDPM: decay 0.9999), as a Lightning callback on torch's AveragedModel.

    callbacks.ema: {_target_: diffusion_lab.lit.EMA, decay: 0.995}
    EMA.of(trainer, pl_module)   # the module holding the averaged weights (pl_module itself without EMA)

Own callback instead of Lightning's EMAWeightAveraging: that one copies the average over the raw weights at
train end (so a checkpoint written then resumes from EMA weights) and has no public accessor for the averaged copy.
The checkpoint layout is Lightning's, so checkpoints of either load with the other: `state_dict` holds the EMA
weights, `current_model_state` the raw ones, `averaging_state` the AveragedModel's counter.
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(L.Callback):
    """Exponential moving average ema <- d_n * ema + (1 - d_n) * w after the n-th optimizer step.

    d_n = decay, or with warmup d_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with
    num_updates): without it a short run's average keeps decay^n of its random initial weights (0.999^800 = 45%
    after 800 steps); with it the horizon grows with the run until it reaches 1 / (1 - decay).
    Validation runs on the EMA weights (swapped in and back). The raw weights stay in the module after fit.
    """

    def __init__(self, decay: float = 0.9999, update_every_n_steps: int = 1, warmup: bool = False):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must be in [0, 1]")
        if int(update_every_n_steps) < 1:
            raise ValueError(f"callbacks.ema.update_every_n_steps={update_every_n_steps} must be >= 1")
        self.decay, self.update_every_n_steps, self.warmup = float(decay), int(update_every_n_steps), bool(warmup)
        self.averaged: AveragedModel | None = None
        self.latest_update_step = 0

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step `step` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @staticmethod
    def of(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
        """The module with the EMA weights during fit; pl_module itself when there is no EMA callback."""
        for cb in trainer.callbacks:
            if isinstance(cb, EMA) and cb.averaged is not None:
                return cb.averaged.module
        return pl_module

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            self.averaged = AveragedModel(pl_module, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)

    def on_fit_start(self, trainer, pl_module):
        # setup() runs before the strategy moves the module to its device; keep the average beside the weights.
        if self.averaged is not None:
            self.averaged.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > self.latest_update_step and (step - 1) % self.update_every_n_steps == 0:
            self.averaged.multi_avg_fn = get_ema_multi_avg_fn(self.decay_at(step))
            self.averaged.update_parameters(pl_module)
            self.latest_update_step = step

    def _swap(self, pl_module: L.LightningModule) -> None:
        ema = itertools.chain(self.averaged.module.parameters(), self.averaged.module.buffers())
        raw = itertools.chain(pl_module.parameters(), pl_module.buffers())
        with torch.no_grad():
            for a, b in zip(ema, raw):
                tmp = a.detach().clone()
                a.copy_(b)
                b.copy_(tmp)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.averaged is not None and not trainer.sanity_checking:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.averaged is not None and not trainer.sanity_checking:
            self._swap(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self.latest_update_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.latest_update_step = int(state_dict.get("latest_update_step", 0))

    @property
    def state_key(self) -> str:
        return "EMAWeightAveraging"  # the key Lightning's callback used, so older checkpoints resume

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.averaged is None:
            return
        averaged = self.averaged.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k[len("module.") :]: v for k, v in averaged.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in averaged.items() if not k.startswith("module.")}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if self.averaged is None:
            return
        if "current_model_state" in checkpoint:
            state = {f"module.{k}": v for k, v in checkpoint["state_dict"].items()}
            state |= checkpoint.get("averaging_state") or {"n_averaged": torch.tensor(1, dtype=torch.long)}
            self.averaged.load_state_dict(state)
            pl_module.load_state_dict(checkpoint["current_model_state"])
        else:  # a checkpoint without EMA: start the average from its weights
            self.averaged.module.load_state_dict(checkpoint["state_dict"])
