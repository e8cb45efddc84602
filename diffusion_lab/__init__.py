"""diffusion_lab. Importing it registers the resolvers of the Hydra configs: `${rank_path:...}` and `${rank_suffix:}`
(conf/hydra/default.yaml) and `${gpus_per_node:...}` (conf/hydra/launcher/slurm.yaml); the entry scripts import it
before Hydra composes."""

import os

from omegaconf import OmegaConf


def _rank() -> str:
    return os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"


def _rank_path(path: str) -> str:
    """`path` on global rank 0 (and outside torchrun / SLURM tasks), `rank<k>/path` on rank k: each process of a
    multi-node run writes its own .hydra/ (and, with `rank_suffix`, its own log) instead of one file, interleaved."""
    return path if _rank() == "0" else f"rank{_rank()}/{path}"


def _rank_suffix() -> str:
    """'' on rank 0, '.rank<k>' on rank k (the log file train.rank1.log sits beside train.log)."""
    return "" if _rank() == "0" else f".rank{_rank()}"


def _gpus_per_node(device: str, devices):
    """What a SLURM job asks for: None (no GPU) when the run's accelerator or device is the CPU, else its devices."""
    return None if str(device).startswith("cpu") else devices


OmegaConf.register_new_resolver("rank_path", _rank_path, replace=True)
OmegaConf.register_new_resolver("gpus_per_node", _gpus_per_node, replace=True)
OmegaConf.register_new_resolver("rank_suffix", _rank_suffix, replace=True)
