"""A DiffusionModule from a run config: train.py's, or the one saved in a checkpoint (read by untrusted.py first).

    module = build_module(cfg)       # to train
    module = load_module(path)       # to sample or evaluate: EMA weights, eval mode

A saved config that does not build, or weights that do not fit it, become one CheckpointError line.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import build
from ..lit import DiffusionModule
from .untrusted import CheckpointError, check_finite, checkpoint_config, read_checkpoint


def build_module(cfg: DictConfig, with_sampler: bool = True) -> DiffusionModule:
    """The DiffusionModule a run config describes (train.py's, or one saved in a checkpoint). with_sampler=False
    leaves out the run's grid sampler (sample.py / evaluate.py bring their own)."""
    diffusion = build(cfg.diffusion, "diffusion")
    return DiffusionModule(
        net=build(cfg.net, "net"),
        diffusion=diffusion,
        timestep_sampler=build(cfg.timesteps, "timesteps"),
        optimizer=build(cfg.optim, "optim"),
        lr_scheduler=build(cfg.lr_scheduler, "lr_scheduler") if cfg.get("lr_scheduler") else None,
        label_dropout=cfg.get("label_dropout", 0.0),
        sampler=build(cfg.sampler, "sampler").bind(diffusion) if with_sampler else None,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        channels_last=cfg.get("channels_last", True),
        seed=cfg.get("seed", 0),
        compile=cfg.get("compile", False) and with_sampler,  # never for a model loaded to sample or evaluate
    )


def load_module(ckpt_path: str | Path, map_location: str = "cpu", ema: bool = True) -> DiffusionModule:
    """Rebuild a trained DiffusionModule from a checkpoint alone (its saved run config), in eval mode.

    ema=True loads the EMA weights (the checkpoint's `state_dict`); ema=False the raw training weights.
    """
    ckpt = read_checkpoint(ckpt_path, map_location)
    check_finite(ckpt, ckpt_path)
    try:
        module = build_module(checkpoint_config(ckpt, ckpt_path), with_sampler=False)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - the saved config itself is bad input
        raise CheckpointError(f"{ckpt_path}: its run config does not build a model ({_cause(e)})") from None
    state = ckpt["state_dict"] if ema or "current_model_state" not in ckpt else ckpt["current_model_state"]
    mismatch = _shape_mismatch(module.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"{ckpt_path}: its weights do not fit the network its config describes ({mismatch})")
    module.load_state_dict(state)
    if "timestep_sampler" in ckpt:
        module.timestep_sampler.load_state_dict(ckpt["timestep_sampler"])
    return module.eval()


def _cause(e: BaseException) -> str:
    while e.__cause__ is not None:  # Hydra wraps the constructor's error in InstantiationException
        e = e.__cause__
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _shape_mismatch(expected: dict, got: dict) -> str:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [k for k in expected if k in got and tuple(expected[k].shape) != tuple(got[k].shape)]
    if wrong:
        k = wrong[0]
        return (
            f"{len(wrong)} tensors differ in shape, e.g. {k}: checkpoint {tuple(got[k].shape)}, "
            f"config {tuple(expected[k].shape)}"
        )
    if missing or extra:
        return f"{len(missing)} tensors missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})"
    return ""
