"""Test-only callbacks, importable by spawned DDP processes."""

import os
from pathlib import Path

import lightning as L
import torch


class DumpSamplerState(L.Callback):
    """At the end of training, each rank writes its timestep sampler's state to dirpath/rank<r>.pt."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.timestep_sampler.state_dict(), self.dirpath / f"rank{trainer.global_rank}.pt")


class DumpTeacher(L.Callback):
    """At the end of training, writes the module's frozen teacher's state dict to `path` (its checkpoints hold none)."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().clone() for k, v in pl_module.teacher.state_dict().items()}, self.path)


class SignalAt(L.Callback):
    """Sends this process `signum` (default SIGUSR1, SLURM's warning signal) in the middle of training step `step`,
    between the backward pass and the optimizer step, as SLURM might."""

    def __init__(self, step: int, signum: int = 10):
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


class NaNNet(torch.nn.Module):
    """A U-Net that returns NaN from its `nan_at_call`-th training forward on (to test the non-finite guard)."""

    def __init__(self, nan_at_call: int = 3, **unet_kwargs):
        super().__init__()
        from diffusion_lab.nets import UNet

        self.unet = UNet(**unet_kwargs)
        self.in_channels, self.image_size, self.num_classes = self.unet.in_channels, self.unet.image_size, None
        self.nan_at_call, self.calls = nan_at_call, 0

    def forward(self, x, t, y=None):
        out = self.unet(x, t, y)
        if self.training:
            self.calls += 1
            if self.calls >= self.nan_at_call:
                return out * float("nan")
        return out


class NaNAdam(torch.optim.Adam):
    """Adam whose `nan_at_step`-th step writes a NaN into the first parameter (loss and gradients stay finite),
    to test the check of the weights after the optimizer step."""

    def __init__(self, params, nan_at_step: int = 2, **kwargs):
        super().__init__(params, **kwargs)
        self.nan_at_step, self.steps = nan_at_step, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps >= self.nan_at_step:
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return loss


def v_target(diff, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho 2022's v = sqrt(a_t) eps - sqrt(1 - a_t) x0, written out here as the tests' closed form."""
    a = diff.alphas_cumprod[t].reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


class RecordGradients(L.Callback):
    """After the backward pass of the first optimizer step, each rank writes dirpath/grads<r>.pt: its synced
    gradients (what the optimizer will use), its local gradients (the same batch and random draws through the bare
    net, outside DDP: its own share) and, at the end of training, its weights."""

    def __init__(self, dirpath: str):
        self.dirpath, self.batch = Path(dirpath), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch, self.batch_idx = batch, batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step != 0:
            return
        from diffusion_lab.lit.module import batch_seed

        params = [p for p in pl_module.net.parameters() if p.requires_grad]
        synced = [p.grad.detach().clone() for p in params]
        x0, y = self.batch
        torch.manual_seed(batch_seed(pl_module.seed, pl_module.current_epoch, self.batch_idx, trainer.global_rank))
        out = pl_module.objective(pl_module.net, x0, pl_module.model_kwargs(y, drop=True), step=0)
        local = torch.autograd.grad((out.terms["loss"] * out.weights).mean(), params)
        self.record = {"synced": synced, "local": [g.detach() for g in local]}

    def on_train_end(self, trainer, pl_module):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        weights = [p.detach().clone() for p in pl_module.net.parameters()]
        torch.save({**self.record, "weights": weights}, self.dirpath / f"grads{trainer.global_rank}.pt")
