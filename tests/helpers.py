"""Test-only callbacks, importable by spawned DDP processes."""

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
