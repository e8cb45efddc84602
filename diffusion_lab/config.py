"""Validation of a composed run config: one pass, before any data is loaded or any step is run.

Each problem raises `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

from omegaconf import DictConfig

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
    if int(cfg.timesteps.num_timesteps) != T:
        raise ConfigError(f"timesteps.num_timesteps={cfg.timesteps.num_timesteps} must equal diffusion.steps={T}")
