"""Reading a checkpoint nobody vouches for: the dict as pure data, finite weights, and a saved run config that
builds only what this project can build.

    ckpt = read_checkpoint(path)            # torch.load(weights_only=True): a pickled payload is refused, not run
    check_finite(ckpt, path)
    cfg = checkpoint_config(ckpt, path)     # no interpolation; every `_target_` on the allow-list

The allow-list is derived, not written by hand: every class defined in the packages a run config builds from
(BUILDABLE_PACKAGES: the networks, the diffusion math, the DataModules), under its module's name and under its
package's when the package exports it, with its `from_*` constructors; and torch's optimizers and LR schedulers
whose constructors take only numbers. A new DataModule or process is allowed once it is in its package. Any other
`_target_`, anywhere in a node that gets built, is refused before anything is imported.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..lit.checkpointing import nonfinite_weights

# The packages whose classes a run config's nodes build (conf/net, conf/diffusion, conf/timesteps, conf/sampler,
# conf/data): all pure constructors of our own code; lit/ (callbacks, the module) is built by train.py, never
# from a checkpoint.
BUILDABLE_PACKAGES = ("diffusion_lab.nets", "diffusion_lab.diffusion", "diffusion_lab.data")
# torch's optimizers and LR schedulers whose constructors take only numbers (not LambdaLR & co., which take callables).
ALLOWED_PATTERN = re.compile(r"torch\.optim\.(lr_scheduler\.)?[A-Z][A-Za-z0-9]*")
CALLABLE_TAKING = {"LambdaLR", "MultiplicativeLR", "SequentialLR", "ChainedScheduler", "CyclicLR"}  # CyclicLR: scale_fn
# The run-config nodes a checkpoint's model, sampler and data are built from.
BUILT_NODES = ("net", "diffusion", "timesteps", "objective", "optim", "lr_scheduler", "sampler", "data")
# (`init_from` and `teacher` are paths, never built from a checkpoint: a teacher is another checkpoint, read as data.)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


@functools.cache
def buildable_targets() -> frozenset[str]:
    """Every `_target_` string that names a class of BUILDABLE_PACKAGES (or one of its `from_*` constructors):
    `<module>.<Class>` for each class defined in one of their modules, and `<package>.<Class>` for each the
    package exports. Importing our own packages runs only our code."""
    names = set()
    for pkg_name in BUILDABLE_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for mod in [pkg, *_submodules(pkg)]:
            for attr, obj in vars(mod).items():
                if not inspect.isclass(obj) or not obj.__module__.startswith(pkg_name) or attr.startswith("_"):
                    continue  # classes only, ours only (not torch.nn.Module imported into a module)
                for prefix in {f"{obj.__module__}.{obj.__qualname__}", f"{mod.__name__}.{attr}"}:
                    names.add(prefix)
                    names.update(f"{prefix}.{m}" for m in vars(obj) if m.startswith("from_")
                                 and isinstance(vars(obj)[m], classmethod))  # fmt: skip
    return frozenset(names)


def _submodules(pkg) -> list:
    out = []
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            out.append(importlib.import_module(info.name))
        except ModuleNotFoundError:  # a module whose optional dependency is absent: nothing of it can be built here
            continue
    return out


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


def allowed_target(target: str) -> bool:
    """Whether a checkpoint's run config may build `target` (a class of ours, or a numbers-only torch optimizer or
    LR scheduler)."""
    return target in buildable_targets() or _torch_optim_class(target)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", key: str = "ckpt_path") -> dict:
    """The checkpoint dict, read as pure data; CheckpointError (one line, naming the file, or `key` when it is
    missing) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{key}={str(path)!r} does not exist (a .ckpt file written by train.py)")
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
    """CheckpointError when a node that will be built names a target outside the allow-list (nothing imported)."""
    for name in BUILT_NODES:
        node = cfg.get(name)
        node = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig | ListConfig) else node
        for key, target in targets(node, name):
            if not allowed_target(target):
                raise CheckpointError(
                    f"{source}: {key}._target_={target!r} is not one of diffusion_lab's own classes; a checkpoint "
                    "may only describe those (refused: building it could run arbitrary code)"
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
