"""DiffusionModule: the LightningModule that trains a network on an objective (diffusion/objectives.py: the process's
denoising loss, ECT, MeanFlow) over a process (DDPM/IDDPM, EDM, flow).

training_step is the algorithm box (DDPM Alg. 1 / IDDPM Sec. 3.3): the objective draws its times and noise and
returns per-example losses with importance weights; weight and reduce, update the timestep sampler with every
rank's losses, log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from ..diffusion import Sampler
from ..diffusion.objectives import Denoising, Objective
from .ema import EMA


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """A 63-bit seed for training batch `batch` of epoch `epoch` on rank `rank`: a hash of the four, so nearby
    values give unrelated random streams (and each micro-batch of an accumulated step its own)."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{int(batch)}/{int(rank)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DiffusionModule(L.LightningModule):
    """Args:
    net: the denoiser, `net(x_t, t, y=None) -> [B, C or 2C, H, W]`.
    diffusion: the process: a GaussianDiffusion (schedule, parameterization, loss type) or a continuous one
        (diffusion/continuous.py: EDM, Flow).
    timestep_sampler: UniformTimestepSampler or LossAwareTimestepSampler over diffusion.num_timesteps (discrete
        process), ProcessTimeSampler (continuous: the process draws its own noise levels; the default there).
    optimizer: partial `(params) -> Optimizer`; lr_scheduler: optional partial `(optimizer) -> scheduler`.
    label_dropout: probability of replacing a label with the null label (classifier-free guidance).
    sampler: the default Sampler for sample grids.
    run_config: the resolved run config (dict), saved in every checkpoint to rebuild the model.
    channels_last: keep the network's weights in channels-last (NHWC) memory format. oneDNN's CPU
        convolutions and cuDNN's tensor-core kernels run faster on it; inputs stay NCHW (the convolution
        follows the weights' format). bench/train_throughput.py: 1.18x training images/s on 2 CPU cores.
    compile: run the training forward through torch.compile(net) (the module and its checkpoints keep the
        plain net; sampling and validation use it uncompiled). Measured in BENCHMARKS.md, section 1.
    seed: the run's seed. Each training batch reseeds the global RNG from (seed, epoch, batch index, rank), so
        t, noise, dropout and label dropout of a batch do not depend on what ran before it: a resumed run (any
        stop point, any rank) continues exactly, with no RNG state to save.
    objective: what a training step minimizes (diffusion/objectives.py), bound here to the process, the timestep
        sampler and the teacher; default the process's own denoising loss.
    teacher: a frozen model (eval mode, no gradients) the objective learns from; kept outside the module's
        parameters, so it is neither saved in checkpoints nor averaged by the EMA.
    """

    def __init__(
        self,
        net: nn.Module,
        diffusion,
        timestep_sampler=None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        label_dropout: float = 0.0,
        sampler: Sampler | None = None,
        run_config: dict | None = None,
        channels_last: bool = True,
        seed: int = 0,
        compile: bool = False,
        objective: Objective | None = None,
        teacher: nn.Module | None = None,
    ):
        super().__init__()
        self.net, self.diffusion = net, diffusion
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.objective = (objective or Denoising()).bind(diffusion, timestep_sampler)
        if teacher is not None:
            self.attach_teacher(teacher)
        if self.objective.time_inputs != getattr(net, "time_inputs", 1):
            raise ValueError(f"objective={self.objective.name} needs net.time_inputs={self.objective.time_inputs}, "
                             f"got net.time_inputs={getattr(net, 'time_inputs', 1)}")  # fmt: skip
        self.optimizer_factory = optimizer or (lambda p: torch.optim.Adam(p, lr=2e-4))
        self.lr_scheduler_factory = lr_scheduler
        self.label_dropout = float(label_dropout)
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout={label_dropout} must be in [0, 1)")
        if self.label_dropout > 0 and not self.conditional:
            raise ValueError(f"label_dropout={label_dropout} needs a class-conditional net (set net.num_classes)")
        self.sampler = sampler or Sampler.default_for(diffusion, self.objective)
        self.run_config = run_config or {}
        self.seed = int(seed)
        # torch.compile's wrapper is kept out of the module tree, so state_dict keys and the EMA copy are unchanged.
        self._train_fn = {"net": torch.compile(self.net) if compile else self.net}

    @property
    def timestep_sampler(self):
        """The objective's timestep sampler (None for an objective that draws its own times)."""
        return self.objective.timesteps

    @property
    def teacher(self) -> nn.Module | None:
        return self.objective.teacher

    @property
    def conditional(self) -> bool:
        return getattr(self.net, "num_classes", None) is not None

    @property
    def null_label(self) -> int | None:
        return self.net.num_classes if self.conditional else None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x_t, t, y=y) if y is not None else self.net(x_t, t)

    def model_kwargs(self, y: torch.Tensor, drop: bool) -> dict:
        """{'y': labels}, with each label replaced by the null label with probability label_dropout."""
        if not self.conditional:
            return {}
        if drop and self.label_dropout > 0:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.label_dropout, self.null_label, y)
        return {"y": y}

    def attach_teacher(self, teacher: nn.Module) -> None:
        """Give the objective a frozen teacher (eval mode, no gradients; not a submodule: never saved or averaged)."""
        teacher = teacher.eval().requires_grad_(False)
        self.objective = self.objective.bind(self.diffusion, self.timestep_sampler, teacher)

    def on_fit_start(self) -> None:
        if self.teacher is not None:  # not a submodule (out of checkpoints and the EMA), so moved here
            self.teacher.to(self.device)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        torch.manual_seed(batch_seed(self.seed, self.current_epoch, batch_idx, self.global_rank))

    def training_step(self, batch, batch_idx):
        x0, y = batch
        out = self.objective(self._train_fn["net"], x0, self.model_kwargs(y, drop=True), step=self.global_step)
        self.last_batch_info = {"t": out.t, "losses": {k: v.detach() for k, v in out.terms.items()}}  # NonFiniteGuard
        # All ranks' (t, unweighted loss) pairs, so every rank's sampler holds the same history.
        gathered_t, gathered_loss = self.all_gather((out.t, out.terms["loss"].detach()))
        self.objective.update(gathered_t.reshape(-1), gathered_loss.reshape(-1))
        loss = (out.terms["loss"] * out.weights).mean()
        self.log_losses("train", out.terms, out.t, loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x0, y = batch
        # Fixed times and noise per batch index, so validation curves are comparable across epochs.
        g = torch.Generator().manual_seed(batch_idx)
        out = self.objective.validation(self.net, x0, self.model_kwargs(y, False), generator=g)
        self.log_losses("val", out.terms, out.t, out.terms["loss"].mean())

    def log_losses(self, stage: str, losses: dict, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Log the reduced loss, each other term's mean ("mse", "vb"), and each by timestep quartile (q0 = the
        least noisy quarter of the process's range .. q3)."""
        on_step = stage == "train"
        sync = stage != "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=sync)
        quartile = ((4 * self.diffusion.solver_time(t)) // self.diffusion.num_timesteps).long().clamp(max=3)
        for key in [k for k in losses if k != "loss"]:
            self.log(f"{stage}/{key}", losses[key].mean(), on_step=on_step, on_epoch=True, sync_dist=sync)
            for q in range(4):
                sel = quartile == q
                if sel.any():
                    self.log(
                        f"{stage}/{key}_q{q}",
                        losses[key][sel].mean(),
                        on_step=False,
                        on_epoch=True,
                        sync_dist=sync,
                        batch_size=int(sel.sum()),
                    )

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer), "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.timestep_sampler is not None:
            checkpoint["timestep_sampler"] = self.timestep_sampler.state_dict()
        checkpoint["run_config"] = self.run_config
        for logger in self.loggers:  # a resumed run continues the same W&B run
            if type(logger).__name__ == "WandbLogger":
                checkpoint["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # state_dict holds the EMA weights; the EMA callback puts the raw ones back. Without it (e.g. resumed
        # with callbacks.ema=null) training must still continue from the raw weights, not from the average.
        # (This hook runs before Lightning loads state_dict into the module.)
        try:
            callbacks = self.trainer.callbacks
        except RuntimeError:  # not attached to a trainer (a plain load)
            callbacks = []
        has_ema = any(isinstance(cb, EMA) for cb in callbacks)
        if "current_model_state" in checkpoint and not has_ema:
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        if "timestep_sampler" in checkpoint and self.timestep_sampler is not None:
            self.timestep_sampler.load_state_dict(checkpoint["timestep_sampler"])

    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: Sampler | None = None,
        y: torch.Tensor | None = None,
        seed: int = 0,
        start: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images start .. start + n - 1 of the run seeded `seed`, [n, C, H, W] in [-1, 1] on the CPU, with this
        module's current weights (eval mode). Each image's label (when y [n] is not given and the net is
        class-conditional), x_T and per-step noise come from its own generator (diffusion.seeding.draw)."""
        from ..diffusion.seeding import draw

        net = self.net
        was_training = net.training
        net.eval()
        try:
            images, _ = draw(
                self.diffusion, net, sampler or self.sampler, (net.in_channels, net.image_size, net.image_size),
                seed=seed, indices=range(start, start + n), batch_size=batch_size, labels=y,
                num_classes=net.num_classes if self.conditional else None, null_label=self.null_label,
                device=self.device, progress=progress,
            )  # fmt: skip
        finally:
            net.train(was_training)
        return images
