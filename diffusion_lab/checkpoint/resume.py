"""Resuming: which keys of a run config may differ from its checkpoint's, and which checkpoint to resume from.

    applied, refused = resume_changes(run_config, ckpt["run_config"])
    path = newest_valid_checkpoint(run_dir / "checkpoints")

train.py applies the first set to the resumed run and refuses the second in one line naming the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .untrusted import CheckpointError, check_finite, read_checkpoint

# Keys that may differ on resume without changing what is trained (run length, logging, where things go, hardware).
FREE_ON_RESUME = (
    "ckpt_path", "auto_resume", "paths", "hydra", "logger", "tags", "task_name", "callbacks", "sampler",
    "channels_last", "trainer.max_epochs", "trainer.max_steps", "trainer.max_time", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.default_root_dir", "trainer.check_val_every_n_epoch",
    "trainer.limit_val_batches", "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
    "trainer.precision", "trainer.sync_batchnorm", "data.num_workers", "data.data_dir", "data.debian_dir",
    "data.cache_dir", "data.max_cache_size", "compile", "init_from", "init_from_weights",
)  # fmt: skip
# Keys that exist since a later version, with the value that reproduces what older checkpoints did (the objective
# node and net.time_inputs since objectives exist), and
# renamed targets: a checkpoint written before either change resumes as if it had them (the diffusion keys are
# GaussianDiffusion's; EDM and flow checkpoints never lacked them).
ADDED_KEYS = {
    "diffusion.loss_weighting": "none", "diffusion.snr_gamma": 5.0, "diffusion.p2_k": 1.0, "diffusion.p2_gamma": 1.0,
    "diffusion.zero_terminal_snr": False, "objective._target_": "diffusion_lab.diffusion.objectives.Denoising",
    "net.time_inputs": 1, "teacher": None,
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
