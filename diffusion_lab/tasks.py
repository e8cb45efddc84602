"""Entry-point bodies: `train(cfg)` (and, from their own modules, evaluate/sample) build objects from the
composed Hydra config's `_target_` nodes, run, and return metrics."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import WeightAveraging
from omegaconf import DictConfig, OmegaConf

from .config import validate_train_config
from .lit import DiffusionModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> DiffusionModule:
    """The DiffusionModule for a run config (also used to rebuild one from a checkpoint's saved config)."""
    return DiffusionModule(
        net=instantiate(cfg.net),
        diffusion=instantiate(cfg.diffusion),
        timestep_sampler=instantiate(cfg.timesteps),
        optimizer=instantiate(cfg.optim),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        label_dropout=cfg.get("label_dropout", 0.0),
        sampler=instantiate(cfg.sampler),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )


def load_module(ckpt_path: str | Path, map_location: str = "cpu", ema: bool = True) -> DiffusionModule:
    """Rebuild a trained DiffusionModule from a checkpoint alone (its saved run config).

    ema=True loads the EMA weights (Lightning's WeightAveraging stores them as the checkpoint's
    state_dict); ema=False loads the raw training weights.
    """
    ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=False)
    cfg = OmegaConf.create(ckpt["run_config"])
    module = build_module(cfg)
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    module.load_state_dict(state)
    module.on_load_checkpoint(ckpt)
    return module.eval()


def _callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # EMA last, so any callback that runs in the same hook sees the weights before the EMA swap.
    return sorted(callbacks, key=lambda c: isinstance(c, WeightAveraging))


def _resolve_ckpt_path(cfg: DictConfig) -> str | None:
    path = cfg.get("ckpt_path")
    if path == "last":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.exists() else None
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"ckpt_path={path!r} does not exist")
    return path


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, seed, build data/model/callbacks/loggers/trainer, fit, and return the final metrics."""
    validate_train_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=_callbacks(cfg), logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt_path(cfg))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("final metrics: %s", metrics)
    log.info("outputs in %s", cfg.paths.output_dir)
    return metrics
