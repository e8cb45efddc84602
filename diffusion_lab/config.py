"""The checks that need the whole run config (one field against another), before any data is loaded or any
step is run. A single value is validated where it is constructed (GaussianDiffusion, UNet, Sampler, the
DataModules, DiffusionModule); `build` turns such a constructor's error into a ConfigError with its message.

Every problem raises `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import re

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checks import check_choice, check_count, check_number
from .data.base import SPLITS


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _choice(key: str, value, allowed) -> None:
    try:
        check_choice(key, value, allowed)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _count(key: str, value, minimum: int = 1) -> int:
    """checks.check_count as a ConfigError (a config key's value)."""
    try:
        return check_count(key, value, minimum)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _root_cause(e: BaseException) -> BaseException:
    """The constructor's own exception inside Hydra's InstantiationException wrappers."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def build(node, key: str):
    """instantiate(node); a constructor's ValueError becomes a ConfigError with its message (Hydra wraps it)."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = _root_cause(e)
        if isinstance(cause, ValueError):
            raise ConfigError(str(cause)) from None
        unknown = isinstance(cause, TypeError) and re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if unknown:  # a key left over from another choice of the group (a DDPM preset's diffusion.schedule on EDM)
            name = f"{key}.{unknown.group(1)}"
            raise ConfigError(
                f"{name} is not a key of {node.get('_target_')} (a typo, or left by another {key} choice or a preset "
                f"written for one); remove it with ~{name} or use a preset for this {key}"
            ) from None
        raise


def validate_sampler(node, key: str, diffusion, conditional: bool, objective: str = "denoising", checkpoint=None):
    """The Sampler a config node (or object) describes, checked against the process it will run on and the
    objective that trained the model (conf/objective's choice), and bound to it (DDPM's default steps become its T).
    A learned grid (sampler.schedule) must have been learned for `checkpoint` (the file sample.py / evaluate.py
    read; None: weights as they train), unless sampler.schedule_transfer."""
    from .diffusion import Sampler

    if not isinstance(node, Sampler) and node.get("method") is None:
        raise ConfigError(f"{key}.method is null (sampler=run: a checkpoint's own sampler, which only sample.py and "
                          "evaluate.py read); name one: sampler=ddim, heun, dpmpp_2m, ...")
    try:
        if not isinstance(node, Sampler):  # a Hydra node or a plain mapping, with or without _target_
            node = Sampler.from_config(OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node)
                                       else node)  # fmt: skip
        sampler = node.bind(diffusion, objective)
    except ValueError as e:
        raise ConfigError(str(e) if key == "sampler" else f"{key}: {e}") from None
    if sampler.guidance is not None and sampler.guidance.rule != "autoguidance" and not conditional:
        raise ConfigError(
            f"{key}.guidance_scale={sampler.guidance_scale:g} ({sampler.guidance.rule}) needs a class-conditional net: "
            f"train one with net.num_classes set, guide by {key}.guidance=autoguidance, or drop {key}.guidance_scale"
        )
    if sampler.schedule is not None and not sampler.schedule_transfer:
        _check_schedule_checkpoint(sampler.schedule, key, checkpoint)
    return sampler


def _check_schedule_checkpoint(schedule: dict, key: str, checkpoint) -> None:
    from .diffusion.learned_grid import checkpoint_sha256

    where = f"{key}.schedule={schedule['path']}"
    learned_for = (schedule.get("checkpoint") or {}).get("path", "another checkpoint")
    if checkpoint is None:
        raise ConfigError(f"{where} was learned for {learned_for}, and here the weights are the ones training: set "
                          f"{key}.schedule_transfer=true to use it anyway")  # fmt: skip
    if checkpoint_sha256(checkpoint) != schedule["checkpoint"]["sha256"]:
        raise ConfigError(f"{where} was learned for {learned_for}, not {checkpoint} (their sha256 differ): learn one "
                          f"for it (python learn_schedule.py ckpt_path={checkpoint} ...), or set "
                          f"{key}.schedule_transfer=true to use it across checkpoints of one run")  # fmt: skip


def _number(key: str, value, minimum: float = 0.0, maximum: float = math.inf) -> float:
    """A finite real number in [minimum, maximum] (bools and strings refused), else ConfigError naming the key."""
    try:
        return check_number(key, value, minimum, finite=True, maximum=maximum)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# Diffusion models train at 1e-5 to 1e-3: above 10 an lr is a typo. Far above it (~3e37 with beta1 = 0.9) Adam's
# first step size lr / (1 - beta1) passes float32's maximum and torch stops with an overflow traceback instead of
# the non-finite guard's one line, so the bound is checked here, before any work.
LR_MAX = 10.0


def validate_optim(optim: DictConfig) -> None:
    """The optimizer's numeric arguments (lr, weight_decay, eps, momentum, betas) are numbers in range; fused is a
    bool or null (a typo such as 'ture' would otherwise be truthy)."""
    for name in ("lr", "weight_decay", "eps", "momentum"):
        if name in optim:
            _number(f"optim.{name}", optim[name], maximum=LR_MAX if name == "lr" else math.inf)
    if "betas" in optim:
        betas = list(optim.betas)
        if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"optim.betas={betas} must be two numbers in [0, 1)")
    fused = optim.get("fused")
    if fused is not None and not isinstance(fused, bool):
        raise ConfigError(f"optim.fused={fused!r} must be true, false or null")


def validate_lr_scheduler(cfg: DictConfig) -> None:
    """The LR scheduler is built once on a throwaway optimizer, so its own checks run before any work; an argument
    its class does not take (a preset's setting for another scheduler) and a step count that is not one (OneCycleLR's
    total_steps follows trainer.max_steps, -1 in an epoch-based run) are named by key."""
    node = cfg.get("lr_scheduler")
    if not node:
        return
    import importlib
    import inspect

    import torch

    target = str(node.get("_target_"))
    module, _, name = target.rpartition(".")
    try:
        takes = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ConfigError(f"lr_scheduler._target_={target!r} cannot be imported ({type(e).__name__})") from None
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
    for key in node:
        if key.startswith("_"):
            continue
        if key not in takes and not open_ended:
            raise ConfigError(
                f"lr_scheduler.{key} is not an argument of {target} (a setting for another scheduler?): "
                f"remove it with ~lr_scheduler.{key}"
            )
        default = takes[key].default if key in takes else None
        if isinstance(default, int | float) and not isinstance(default, bool) and isinstance(node[key], str):
            raise ConfigError(f"lr_scheduler.{key}={node[key]!r} must be a number")
    total = node.get("total_steps")
    if "total_steps" in node and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ConfigError(
            f"lr_scheduler.total_steps={total} must be a positive step count; it follows trainer.max_steps, so set "
            "trainer.max_steps (or, for a run bounded by epochs or time, use lr_scheduler=warmup)"
        )
    try:
        build(node, "lr_scheduler")(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3))
    except (ValueError, TypeError, ArithmeticError, InstantiationException) as e:  # e.g. div_factor=0
        cause = _root_cause(e)
        raise ConfigError(f"lr_scheduler ({target}): {(str(cause) or type(cause).__name__).splitlines()[0]}") from None


def validate_eval_config(cfg: DictConfig) -> None:
    """evaluate.py / sample.py: counts and splits, before the checkpoint is read or anything is sampled."""
    for key in ("num_samples", "batch_size", "num_images", "points"):
        if cfg.get(key) is not None:
            _count(key, cfg.get(key))
    fid = cfg.get("fid") or {}
    _choice("fid.reference_split", fid.get("reference_split", "train"), SPLITS)
    if fid.get("num_reference") is not None:  # null: all of the split
        _count("fid.num_reference", fid.num_reference, 2)
    if cfg.get("mode") == "inpaint":
        from .sample_modes import MASKS

        _choice("mask", cfg.get("mask"), MASKS)
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


def _check_fid_guide(cfg: DictConfig, key: str, guide) -> None:
    """An autoguided FID-callback row's guide, before training: named; a checkpoint that exists; a snapshot step
    of this run's post-hoc EMA that the run reaches."""
    from pathlib import Path

    if not guide:
        raise ConfigError(f"{key}: autoguidance needs a guide: guide: {{ckpt: <a weaker run's checkpoint>}} or "
                          "{step: <an earlier snapshot step>, sigma_rel: <its EMA width>}")  # fmt: skip
    if "ckpt" in guide:
        if not Path(str(guide["ckpt"])).is_file():
            raise ConfigError(f"{key}.guide.ckpt={guide['ckpt']} does not exist (a .ckpt file written by train.py)")
        return
    if not (cfg.callbacks.get("ema") or {}).get("post_hoc"):
        raise ConfigError(f"{key}.guide.step: a guide from this run's snapshots needs them: set "
                          "callbacks.ema.post_hoc=true (or guide by guide.ckpt=<a checkpoint>)")  # fmt: skip
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps is not None and max_steps > 0 and guide["step"] > max_steps:
        raise ConfigError(f"{key}.guide.step={guide['step']} is past trainer.max_steps={max_steps}: the run never "
                          "reaches it")  # fmt: skip


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first cross-field problem of a training config (the process is built here,
    so its own checks run too)."""
    net, data = cfg.net, cfg.data
    diffusion = build(cfg.diffusion, "diffusion")
    if diffusion.learns_sigma != bool(net.learn_sigma):
        what = f"diffusion.var_type={diffusion.var_type!r}" if "var_type" in cfg.diffusion else "this diffusion"
        raise ConfigError(
            f"{what} needs net.learn_sigma={diffusion.learns_sigma} "
            f"(a network with {'2C' if diffusion.learns_sigma else 'C'} output channels), "
            f"got net.learn_sigma={net.learn_sigma}"
        )
    conditional = net.get("num_classes") is not None
    if conditional and data.get("num_classes") is None and not data.get("labels_from_subdirs"):
        raise ConfigError(f"net.num_classes={net.num_classes} but data={data._target_} has no labels")
    objective = build(cfg.objective, "objective").bind(diffusion) if cfg.get("objective") else None
    trained_by = objective.name if objective else "denoising"
    own = validate_sampler(cfg.sampler, "sampler", diffusion, conditional, trained_by)
    if own.guidance is not None and own.guidance.rule == "autoguidance":
        raise ConfigError("sampler.guidance=autoguidance: training's sample grids load no guide network; guide the "
                          "trained checkpoint with sample.py or evaluate.py")  # fmt: skip
    if objective is not None and objective.time_inputs != net.get("time_inputs", 1):
        raise ConfigError(f"objective={objective.name} needs net.time_inputs={objective.time_inputs} (got "
                          f"{net.get('time_inputs', 1)}): set net.time_inputs={objective.time_inputs}")  # fmt: skip
    fid = (cfg.get("callbacks") or {}).get("fid")
    if fid is not None:
        for i, node in enumerate(fid.get("samplers") or []):
            row = validate_sampler(node, f"callbacks.fid.samplers[{i}]", diffusion, conditional, trained_by)
            if row.guidance is not None and row.guidance.rule == "autoguidance":
                _check_fid_guide(cfg, f"callbacks.fid.samplers[{i}]", row.guide)
        if fid.get("ema_sigma_rels") and not (cfg.callbacks.get("ema") or {}).get("post_hoc"):
            raise ConfigError("callbacks.fid.ema_sigma_rels needs the post-hoc snapshots: set "
                              "callbacks.ema.post_hoc=true")  # fmt: skip
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
    validate_lr_scheduler(cfg)
    precision = str(cfg.trainer.get("precision"))
    if cfg.optim.get("fused") and precision.endswith("-mixed") and (clip or 0) > 0:
        # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales inside its step
        raise ConfigError(
            f"optim.fused=true cannot be combined with trainer.precision={precision} and "
            f"trainer.gradient_clip_val={clip}: use optim.fused=null, or trainer.gradient_clip_val=0"
        )
