"""Checkpoints as data, in three homes (issue 35 split them):

    module = load_module("outputs/train/runs/<run>/checkpoints/last.ckpt")   # EMA weights, eval mode
    ckpt = read_checkpoint(path)                                           # the dict, or CheckpointError

- untrusted.py: reading a file nobody vouches for (pure data, finite weights, a run config that builds only this
  project's classes: the allow-list derived from its packages);
- build.py: a DiffusionModule from a run config (train.py's, or a checkpoint's);
- resume.py: which keys may differ from the checkpoint's on resume, and which checkpoint to resume from.
"""

from .build import build_module, init_weights, load_guide, load_module, load_teacher
from .resume import APPLIED_ON_RESUME, FREE_ON_RESUME, newest_valid_checkpoint, resume_changes
from .untrusted import (
    BUILT_NODES,
    CheckpointError,
    allowed_target,
    buildable_targets,
    check_finite,
    check_targets,
    checkpoint_config,
    read_checkpoint,
)

__all__ = [
    "APPLIED_ON_RESUME",
    "BUILT_NODES",
    "FREE_ON_RESUME",
    "CheckpointError",
    "allowed_target",
    "buildable_targets",
    "build_module",
    "check_finite",
    "check_targets",
    "checkpoint_config",
    "load_guide",
    "load_module",
    "init_weights",
    "load_teacher",
    "newest_valid_checkpoint",
    "read_checkpoint",
    "resume_changes",
]
