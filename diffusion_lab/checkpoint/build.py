"""A DiffusionModule from a run config: train.py's, or the one saved in a checkpoint (read by untrusted.py first).

    module = build_module(cfg)       # to train
    module = load_module(path)       # to sample or evaluate: EMA weights, eval mode
    init_weights(module, path)       # init_from: a new run starts from another run's weights
    module.attach_teacher(load_teacher(path, module))   # teacher: a checkpoint's frozen net, for the objective

A saved config that does not build, or weights that do not fit it, become one CheckpointError line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, build
from ..diffusion.objectives import Denoising
from ..lit import DiffusionModule
from .untrusted import CheckpointError, check_finite, checkpoint_config, read_checkpoint

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, with_sampler: bool = True) -> DiffusionModule:
    """The DiffusionModule a run config describes (train.py's, or one saved in a checkpoint). with_sampler=False
    leaves out the run's grid sampler (sample.py / evaluate.py bring their own). No teacher: train.py attaches one
    (load_teacher); a checkpoint never builds one."""
    diffusion = build(cfg.diffusion, "diffusion")
    objective = build(cfg.objective, "objective") if cfg.get("objective") else Denoising()  # older runs: denoising
    return DiffusionModule(
        net=build(cfg.net, "net"),
        diffusion=diffusion,
        objective=objective,
        timestep_sampler=build(cfg.timesteps, "timesteps"),
        optimizer=build(cfg.optim, "optim"),
        lr_scheduler=build(cfg.lr_scheduler, "lr_scheduler") if cfg.get("lr_scheduler") else None,
        label_dropout=cfg.get("label_dropout", 0.0),
        sampler=build(cfg.sampler, "sampler").bind(diffusion, objective.name) if with_sampler else None,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        channels_last=cfg.get("channels_last", True),
        seed=cfg.get("seed", 0),
        compile=cfg.get("compile", False) and with_sampler,  # never for a model loaded to sample or evaluate
    )


def load_module(ckpt_path: str | Path, map_location: str = "cpu", ema: bool = True, key: str = "ckpt_path"
                ) -> DiffusionModule:  # fmt: skip
    """Rebuild a trained DiffusionModule from a checkpoint alone (its saved run config), in eval mode.

    ema=True loads the EMA weights (the checkpoint's `state_dict`); ema=False the raw training weights. `key` is the
    config key that named the file (ckpt_path, init_from, teacher), for the message when it does not exist.
    """
    ckpt = read_checkpoint(ckpt_path, map_location, key)
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


def _check_same_net(module: DiffusionModule, src: DiffusionModule, path, key: str) -> None:
    """CheckpointError naming both when src (read from `path` for `key`) was trained for another process view or
    has other tensors than module's net; a second time embedding module's net has and src's lacks is allowed
    (net.time_inputs=2 started from a one-time checkpoint keeps its zero start)."""
    if src.diffusion.network_view != module.diffusion.network_view:
        raise CheckpointError(f"{key}={path} was trained for {src.diffusion.network_view}; this run's is "
                              f"{module.diffusion.network_view}: its network means something else here")  # fmt: skip
    mine, theirs = module.net.state_dict(), src.net.state_dict()
    new_time = {k for k in mine if k.startswith("time_embed2.")} - set(theirs)
    if mismatch := _shape_mismatch({k: v for k, v in mine.items() if k not in new_time}, theirs):
        raise CheckpointError(f"{key}={path}: its net does not fit this run's net ({mismatch}): use a checkpoint of "
                              "the same net config")  # fmt: skip


def init_weights(module: DiffusionModule, path: str | Path, weights: str = "ema") -> None:
    """init_from: start `module` (a new run: step 0, its own optimizer) from the weights of another run's checkpoint,
    read as untrusted data; `weights` = ema | raw. CheckpointError naming both when the net or process differs."""
    src = load_module(path, ema=weights == "ema", key="init_from")
    _check_same_net(module, src, path, "init_from")
    missing = module.net.load_state_dict(src.net.state_dict(), strict=False).missing_keys
    if missing:
        log.info("init_from: %d tensors new in this net keep their start (%s, ...)", len(missing), sorted(missing)[0])


def load_teacher(path: str | Path, module: DiffusionModule):
    """teacher: the EMA net of a checkpoint, frozen (eval mode, no gradients), for `module`'s objective; the same
    checks as init_from. It is a separate object: never part of the student's state, checkpoints or EMA."""
    src = load_module(path, ema=True, key="teacher")
    _check_same_net(module, src, path, "teacher")
    return src.net.eval().requires_grad_(False)


def load_guide(module: DiffusionModule, guide: dict | None, source, ema: bool = True, snapshot_dir=None):
    """Autoguidance's guide network for `module` (which `source` names: its checkpoint, or "this run"), frozen in
    eval mode on module's device: another run's checkpoint (guide.ckpt: the same process, image size, channels and
    classes, else ConfigError naming both; its EMA weights unless ema=False), or the post-hoc EMA of width
    guide.sigma_rel at snapshot step guide.step rebuilt from `snapshot_dir` (default: <source's run>/ema_snapshots)."""
    if not guide:
        raise ConfigError("sampler.guidance=autoguidance needs a guide: sampler.guide.ckpt=<a weaker run's "
                          "checkpoint>, or sampler.guide.step=<an earlier snapshot step> and sampler.guide.sigma_rel")
    if "ckpt" in guide:
        other = load_module(guide["ckpt"], ema=ema, key="sampler.guide.ckpt")
        theirs, mine = _what_it_models(other), _what_it_models(module)
        if theirs != mine:
            raise ConfigError(f"sampler.guide.ckpt={guide['ckpt']} models {theirs}; {source} models {mine}: a "
                              "guide must share the process, image size, channels and classes")  # fmt: skip
        net, what = other.net, guide["ckpt"]
    else:
        from ..lit.ema import post_hoc_copy, read_snapshots

        snaps = read_snapshots(snapshot_dir or Path(source).parent.parent / "ema_snapshots")
        try:
            rebuilt = post_hoc_copy(module, snaps, guide["sigma_rel"], int(guide["step"]))
        except ValueError as e:
            raise ConfigError(f"sampler.guide.step={guide['step']} sigma_rel={guide['sigma_rel']}: {e}") from None
        net, what = rebuilt.net, f"the post-hoc EMA sigma_rel={guide['sigma_rel']} at step {guide['step']}"
    net = net.to(module.device).eval().requires_grad_(False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    log.info("autoguidance: guide %s (%d parameters; the guided net %d)", what, count(net), count(module.net))
    return net


def _what_it_models(module) -> str:
    net = module.net
    return (f"{module.diffusion.network_view}, {net.in_channels}x{net.image_size}x{net.image_size}, "
            f"classes={net.num_classes}")  # fmt: skip


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
