"""Checkpoints as data: read them without running code, rebuild a model from one, compare its config on resume.

    module = load_module("outputs/train/runs/<run>/checkpoints/last.ckpt")   # EMA weights, eval mode
    ckpt = read_checkpoint(path)                                           # the dict, or CheckpointError

A checkpoint is untrusted input. It is read with `torch.load(weights_only=True)` (tensors, dicts, numbers,
strings; a pickled payload is refused, not run), its weights must be finite, and the objects its saved run
config describes are built only from ALLOWED_TARGETS (this project's classes and torch optimizers/schedulers);
any other `_target_`, anywhere in the node, is refused before anything is imported.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from .config import build
from .lit import DiffusionModule
from .lit.checkpointing import nonfinite_weights

log = logging.getLogger(__name__)

ALLOWED_TARGETS = frozenset(
    {
        "diffusion_lab.nets.UNet",
        "diffusion_lab.nets.unet.UNet",
        "diffusion_lab.diffusion.GaussianDiffusion",
        "diffusion_lab.diffusion.GaussianDiffusion.from_schedule",
        "diffusion_lab.diffusion.EDM",
        "diffusion_lab.diffusion.Flow",
        "diffusion_lab.diffusion.timesteps.ProcessTimeSampler",
        "diffusion_lab.diffusion.Sampler",
        "diffusion_lab.diffusion.UniformSampler",
        "diffusion_lab.diffusion.LossSecondMomentSampler",
        "diffusion_lab.diffusion.timesteps.UniformSampler",
        "diffusion_lab.diffusion.timesteps.LossSecondMomentSampler",
        "diffusion_lab.diffusion.UniformTimestepSampler",
        "diffusion_lab.diffusion.LossAwareTimestepSampler",
        "diffusion_lab.diffusion.timesteps.UniformTimestepSampler",
        "diffusion_lab.diffusion.timesteps.LossAwareTimestepSampler",
        "diffusion_lab.data.DigitsDataModule",
        "diffusion_lab.data.MNISTDataModule",
        "diffusion_lab.data.FashionMNISTDataModule",
        "diffusion_lab.data.CIFAR10DataModule",
        "diffusion_lab.data.FolderDataModule",
    }
)
# torch's optimizers and LR schedulers whose constructors take only numbers (not LambdaLR & co., which take callables).
ALLOWED_PATTERN = re.compile(r"torch\.optim\.(lr_scheduler\.)?[A-Z][A-Za-z0-9]*")
CALLABLE_TAKING = {"LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler"}


def _torch_optim_class(target: str) -> bool:
    """An Optimizer or LR scheduler class of torch.optim (importing torch.optim runs no checkpoint code)."""
    if not ALLOWED_PATTERN.fullmatch(target) or target.rsplit(".", 1)[1] in CALLABLE_TAKING:
        return False
    import torch.optim
    import torch.optim.lr_scheduler as sched

    module = sched if ".lr_scheduler." in target else torch.optim
    obj = getattr(module, target.rsplit(".", 1)[1], None)
    bases = (torch.optim.Optimizer, sched.LRScheduler, sched.ReduceLROnPlateau)
    return isinstance(obj, type) and issubclass(obj, bases)


# The run-config nodes a checkpoint's model, sampler and data are built from.
BUILT_NODES = ("net", "diffusion", "timesteps", "optim", "lr_scheduler", "sampler", "data")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The checkpoint dict, read as pure data; CheckpointError (one line, naming the file) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={str(path)!r} does not exist (a .ckpt file written by train.py)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes; a write was interrupted): use another checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad file; each becomes one line
        text = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in str(e):  # torch's weights-only unpickler met a non-data object
            # torch's own text goes on to suggest weights_only=False: for an untrusted file, name the object only
            named = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise CheckpointError(
                f"{path} holds pickled Python objects, not only data; it was refused unread "
                f"(diffusion_lab never writes such checkpoints: do not trust this file)"
                + (f"; it asks for {named.group(1)}" if named else "")
            ) from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or another format: {text})"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "run_config" not in ckpt:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a diffusion_lab checkpoint (no state_dict/run_config; it has {keys})")
    return ckpt


def check_finite(ckpt: dict, path: str | Path) -> None:
    if bad := nonfinite_weights(ckpt):
        raise CheckpointError(
            f"{path} has {len(bad)} weight tensors with NaN or inf (first: {bad[0]}): the run diverged before it "
            "was saved; use an earlier checkpoint"
        )


def targets(node: Any, key: str) -> list[tuple[str, str]]:
    """Every (dotted key, `_target_` string) inside a config node, at any depth."""
    found = []
    if isinstance(node, dict | DictConfig):
        for k, v in node.items():
            if k == "_target_":
                found.append((key, str(v)))
            else:
                found += targets(v, f"{key}.{k}")
    elif isinstance(node, list | tuple | ListConfig):
        for i, v in enumerate(node):
            found += targets(v, f"{key}[{i}]")
    return found


def check_targets(cfg: DictConfig, source: str) -> None:
    """CheckpointError when a node that will be built names a target outside ALLOWED_TARGETS (nothing imported)."""
    for name in BUILT_NODES:
        node = cfg.get(name)
        node = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig | ListConfig) else node
        for key, target in targets(node, name):
            if target not in ALLOWED_TARGETS and not _torch_optim_class(target):
                raise CheckpointError(
                    f"{source}: {key}._target_={target!r} is not one of diffusion_lab's own classes; a checkpoint "
                    "may only describe those (refused: building it could run arbitrary code)"
                )


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


def _interpolations(node: Any, key: str = "run_config") -> list[str]:
    """Keys of the string values holding an OmegaConf interpolation or resolver ("${...}")."""
    if isinstance(node, dict):
        return [k for name, v in node.items() for k in _interpolations(v, f"{key}.{name}")]
    if isinstance(node, list | tuple):
        return [k for i, v in enumerate(node) for k in _interpolations(v, f"{key}[{i}]")]
    return [key] if isinstance(node, str) and "${" in node else []


def checkpoint_config(ckpt: dict, path: str | Path) -> DictConfig:
    """The run config saved in a checkpoint, after the checks: train.py saves it resolved, so an interpolation
    (`${node}`, `${oc.decode:...}`, `${oc.env:...}`) can only be an attempt to smuggle a node or read the
    environment past the allow-list; then every `_target_` of the nodes that get built is on the allow-list."""
    if not isinstance(ckpt["run_config"], dict):
        raise CheckpointError(f"{path}: run_config is not a mapping")
    if found := _interpolations(ckpt["run_config"]):
        raise CheckpointError(
            f"{path}: {found[0]} holds an interpolation ({len(found)} in all); a saved run config never does "
            "(refused: it could build objects past the allow-list)"
        )
    cfg = OmegaConf.create(ckpt["run_config"])
    check_targets(cfg, str(path))
    return cfg


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


# ------------------------------------------------------------------ resume: the run config against the checkpoint's
# Keys that may differ on resume without changing what is trained (run length, logging, where things go, hardware).
FREE_ON_RESUME = (
    "ckpt_path", "auto_resume", "paths", "hydra", "logger", "tags", "task_name", "callbacks", "sampler",
    "channels_last", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.default_root_dir", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.precision", "trainer.sync_batchnorm", "data.num_workers", "data.data_dir", "data.debian_dir", "compile",
)  # fmt: skip
# Keys that exist since a later version, with the value that reproduces what older checkpoints did, and
# renamed targets: a checkpoint written before either change resumes as if it had them (the diffusion keys are
# GaussianDiffusion's; EDM and flow checkpoints never lacked them).
ADDED_KEYS = {
    "diffusion.loss_weighting": "none", "diffusion.snr_gamma": 5.0, "diffusion.p2_k": 1.0, "diffusion.p2_gamma": 1.0,
    "diffusion.zero_terminal_snr": False,
}  # fmt: skip
RENAMED_TARGETS = {
    "diffusion_lab.diffusion.UniformSampler": "diffusion_lab.diffusion.UniformTimestepSampler",
    "diffusion_lab.diffusion.LossSecondMomentSampler": "diffusion_lab.diffusion.LossAwareTimestepSampler",
}
# Keys whose new value is applied to the resumed run (the optimizer's values are put into its restored state).
APPLIED_ON_RESUME = ("optim", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm", "label_dropout")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out |= _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: node}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_changes(run: dict, saved: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(applied, refused): the keys whose values differ between the run config and the checkpoint's,
    each as key -> (checkpoint value, run value), split by what a resumed run can take. Optimizer keys other
    than its numbers (`optim._target_`, `optim._partial_`) cannot be applied to a restored optimizer."""
    a = {k: RENAMED_TARGETS.get(v, v) if isinstance(v, str) else v for k, v in _flatten(saved).items()}
    discrete = str(a.get("diffusion._target_", "")).startswith("diffusion_lab.diffusion.GaussianDiffusion")
    a = {**{k: v for k, v in ADDED_KEYS.items() if k not in a and (discrete or not k.startswith("diffusion."))}, **a}
    b = _flatten(run)
    diff = {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    diff = {k: v for k, v in diff.items() if not _under(k, FREE_ON_RESUME)}
    applied = {k: v for k, v in diff.items() if _under(k, APPLIED_ON_RESUME) and not k.split(".")[-1].startswith("_")}
    refused = {k: v for k, v in diff.items() if k not in applied}
    return applied, refused


def newest_valid_checkpoint(directory: Path, skip: Path | None = None) -> Path | None:
    """The most recently written readable, finite checkpoint in a run's checkpoints/ directory."""
    for p in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if skip is not None and p == skip:
            continue
        try:
            check_finite(read_checkpoint(p), p)
            return p
        except CheckpointError:
            continue
    return None
