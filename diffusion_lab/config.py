"""Validation of a composed run config: one pass, before any data is loaded or any step is run.

Each problem raises `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from .data.base import SPLITS
from .diffusion import LOSS_TYPES, MEAN_TYPES, METHODS, SCHEDULES, VAR_TYPES
from .diffusion.respace import SPACINGS, space_timesteps


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _choice(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def validate_sampler(node: DictConfig, key: str, num_timesteps: int, conditional: bool) -> None:
    """Check one Sampler config node (method, steps, spacing, eta, guidance) against a T-step process."""
    _choice(f"{key}.method", node.get("method", "ddim"), METHODS)
    _choice(f"{key}.spacing", node.get("spacing", "ddim"), SPACINGS)
    steps = int(node.get("steps", 50))
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"{key}.steps={steps} must be between 1 and diffusion.steps={num_timesteps}")
    if steps < num_timesteps:
        try:
            space_timesteps(num_timesteps, f"{node.get('spacing', 'ddim')}{steps}")
        except ValueError as e:
            raise ConfigError(f"{key}.steps={steps} with {key}.spacing={node.get('spacing')!r}: {e}") from None
    if float(node.get("eta", 0.0)) < 0:
        raise ConfigError(f"{key}.eta={node.get('eta')} must be >= 0")
    if node.get("guidance_scale") is not None and not conditional:
        raise ConfigError(
            f"{key}.guidance_scale={node.guidance_scale} needs a class-conditional net (set net.num_classes)"
        )


def _number(key: str, value, minimum: float = 0.0) -> float:
    """A finite real number >= minimum (bools and strings refused), else ConfigError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be a finite number >= {minimum:g}")
    return float(value)


def validate_optim(optim: DictConfig) -> None:
    """The optimizer's numeric arguments (lr, weight_decay, eps, momentum, betas) are numbers in range."""
    for name in ("lr", "weight_decay", "eps", "momentum"):
        if name in optim:
            _number(f"optim.{name}", optim[name])
    if "betas" in optim:
        betas = list(optim.betas)
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1)")


def validate_eval_config(cfg: DictConfig) -> None:
    """evaluate.py / sample.py: counts and splits, before the checkpoint is read or anything is sampled."""
    for key in ("num_samples", "batch_size", "num_images", "points"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r} must be a positive integer")
    fid = cfg.get("fid") or {}
    _choice("fid.reference_split", fid.get("reference_split", "train"), SPLITS)
    if fid.get("num_reference") is not None and int(fid.num_reference) < 2:
        raise ConfigError(f"fid.num_reference={fid.num_reference} must be >= 2 (or null for all)")
    if not cfg.get("ckpt_path"):
        raise ConfigError("ckpt_path is required: ckpt_path=<run dir>/checkpoints/last.ckpt")


def validate_data_against_net(datamodule, net) -> None:
    """A class-conditional net needs exactly the data's number of classes (more would make one class the null
    label of guidance, fewer would index past the embedding)."""
    k = getattr(net, "num_classes", None)
    if k is None:
        return
    n = getattr(datamodule, "num_classes", None)
    if n is None:
        raise ConfigError(f"net.num_classes={k} but the data has no labels (data.labels_from_subdirs=true for folders)")
    if int(n) != int(k):
        source = (
            f" ({len(datamodule.classes)} sub-folders of {datamodule.path})" if hasattr(datamodule, "classes") else ""
        )
        raise ConfigError(f"net.num_classes={k} but the data has {n} classes{source}; set net.num_classes={n}")


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first invalid value in a training config."""
    d, net, data = cfg.diffusion, cfg.net, cfg.data
    _choice("diffusion.schedule", d.schedule, SCHEDULES)
    _choice("diffusion.mean_type", d.mean_type, MEAN_TYPES)
    _choice("diffusion.var_type", d.var_type, VAR_TYPES)
    _choice("diffusion.loss_type", d.loss_type, LOSS_TYPES)
    T = int(d.steps)
    if T < 1:
        raise ConfigError(f"diffusion.steps={T} must be >= 1")
    learns_sigma = d.var_type in ("learned", "learned_range")
    if learns_sigma != bool(net.learn_sigma):
        raise ConfigError(
            f"diffusion.var_type={d.var_type!r} needs net.learn_sigma={learns_sigma} "
            f"(a network with {'2C' if learns_sigma else 'C'} output channels), got net.learn_sigma={net.learn_sigma}"
        )
    size, levels = int(data.image_size), len(net.channel_mult)
    if size % 2 ** (levels - 1):
        raise ConfigError(
            f"data.image_size={size} cannot be halved {levels - 1} times (net.channel_mult={list(net.channel_mult)}); "
            f"use a multiple of {2 ** (levels - 1)}"
        )
    reached = [size // 2**i for i in range(levels)]
    for r in net.attention_resolutions:
        if r not in reached:
            raise ConfigError(f"net.attention_resolutions contains {r}, never reached; resolutions are {reached}")
    conditional = net.get("num_classes") is not None
    if conditional and data.get("num_classes") is None and not data.get("labels_from_subdirs"):
        raise ConfigError(f"net.num_classes={net.num_classes} but data={data._target_} has no labels")
    if not 0.0 <= float(cfg.get("label_dropout", 0.0)) < 1.0:
        raise ConfigError(f"label_dropout={cfg.label_dropout} must be in [0, 1)")
    if float(cfg.get("label_dropout", 0.0)) > 0 and not conditional:
        raise ConfigError(f"label_dropout={cfg.label_dropout} needs a class-conditional net (set net.num_classes)")
    validate_sampler(cfg.sampler, "sampler", T, conditional)
    fid = (cfg.get("callbacks") or {}).get("fid")
    if fid is not None:
        for i, node in enumerate(fid.get("samplers") or []):
            validate_sampler(node, f"callbacks.fid.samplers[{i}]", T, conditional)
        from .eval.inception import InceptionWeightsNotFound, resolve_inception_weights

        try:
            weights, _ = resolve_inception_weights(fid.get("inception_weights"), fid.get("cache_dir"))
        except InceptionWeightsNotFound as e:
            raise ConfigError(f"callbacks.{e}") from None
        if weights is None and not fid.get("allow_download", True):
            raise ConfigError("callbacks.fid: no Inception weights found and callbacks.fid.allow_download=false")
    clip = cfg.trainer.get("gradient_clip_val")
    if clip is not None:
        _number("trainer.gradient_clip_val", clip)
    validate_optim(cfg.optim)
    if int(cfg.timesteps.num_timesteps) != T:
        raise ConfigError(f"timesteps.num_timesteps={cfg.timesteps.num_timesteps} must equal diffusion.steps={T}")
