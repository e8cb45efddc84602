"""Logger set-up around Lightning's loggers: W&B offline when there is no account, sweep groups, tags,
and `wandb.finish()` after every run so that Hydra multiruns do not merge runs."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(Path.home() / ".netrc").authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _sweep_group() -> str | None:
    """The multirun's directory name (one W&B group per sweep), or None outside a Hydra multirun."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def build_loggers(cfg: DictConfig) -> list:
    """Instantiate cfg.logger's nodes; W&B runs get offline mode without credentials, a sweep group and
    tags for schedule / sampler / steps."""
    nodes = cfg.get("logger") or {}
    if "wandb" in nodes and nodes.wandb is not None:
        if not wandb_has_credentials() and os.environ.get("WANDB_MODE") != "online":
            os.environ["WANDB_MODE"] = "offline"
            log.info(
                "W&B: no API key found, logging offline to %s/wandb (`wandb sync` uploads later)", cfg.paths.output_dir
            )
        with open_dict(nodes.wandb):
            nodes.wandb.group = nodes.wandb.get("group") or _sweep_group()
            nodes.wandb.tags = sorted(
                {
                    *(nodes.wandb.get("tags") or []),
                    *(cfg.get("tags") or []),
                    f"schedule={cfg.diffusion.schedule}",
                    f"sampler={cfg.sampler.method}",
                    f"steps={cfg.sampler.steps}",
                }
            )
    return [instantiate(lg) for lg in nodes.values() if lg is not None]


def finish_loggers(loggers: list) -> None:
    """Close W&B runs (so the next run of a multirun starts a new one)."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
