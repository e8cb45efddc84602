"""Logger set-up around Lightning's loggers: W&B offline when there is no account, sweep groups, tags,
and `wandb.finish()` after every run so that Hydra multiruns do not merge runs."""

from __future__ import annotations

import csv
import logging
import netrc
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from .io import atomic_write

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


def build_loggers(cfg: DictConfig, resume_step: int | None = None, wandb_run_id: str | None = None) -> list:
    """Instantiate cfg.logger's nodes; W&B runs get offline mode without credentials, a sweep group and
    tags for schedule / sampler / steps. A resumed run (resume_step = the checkpoint's global step) continues
    the CSV log in place and the W&B run with the checkpoint's id."""
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
                    *([f"schedule={cfg.diffusion.schedule}"] if "schedule" in cfg.diffusion else []),  # not on EDM/flow
                    f"sampler={cfg.sampler.method}",
                    f"steps={cfg.sampler.get('steps') or cfg.sampler.get('nfe')}",
                }
            )
            if wandb_run_id:  # a resumed training run continues its W&B run
                nodes.wandb.id, nodes.wandb.resume = wandb_run_id, "allow"
    loggers = [instantiate(lg) for lg in nodes.values() if lg is not None]
    if resume_step is not None:
        for lg in loggers:
            if isinstance(lg, CSVLogger):
                continue_csv_log(lg, int(resume_step))
    return loggers


@rank_zero_only
def continue_csv_log(logger: CSVLogger, resume_step: int) -> None:
    """Keep the rows a run logged before its checkpoint (step < resume_step) and drop the later ones, which the
    resumed run logs again. Lightning's CSV writer deletes a metrics.csv it finds, so the file is first renamed
    aside (a kill before the kept rows are written back leaves it there, and the next resume uses it)."""
    path = Path(logger.log_dir) / "metrics.csv"
    aside = path.with_name(".metrics.csv.before-resume")
    if path.is_file():
        os.replace(path, aside)
    if not aside.is_file():
        return
    with open(aside, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") and int(r["step"]) < resume_step]
    writer = logger.experiment  # Lightning's writer: its header starts as the kept rows' columns
    writer.metrics_keys = header
    with atomic_write(writer.metrics_file_path) as tmp, open(tmp, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=header)
        out.writeheader()
        out.writerows(rows)
    aside.unlink()
    log.info("resume: kept %d metric rows (steps < %d) of %s", len(rows), resume_step, path)


def finish_loggers(loggers: list) -> None:
    """Close W&B runs (so the next run of a multirun starts a new one)."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
