"""EMA of the network weights (DDPM: decay 0.9999), as a Lightning callback on torch's AveragedModel.

    callbacks.ema: {_target_: diffusion_lab.lit.EMA, decay: 0.995}
    callbacks.ema: {kind: power, sigma_rel: 0.10}          # EDM2's power-function EMA (diffusion_lab/phema.py)
    callbacks.ema: {post_hoc: true, snapshot_every: 400}   # + two power profiles' snapshots for post-hoc EMA
    EMA.of(trainer, pl_module)   # the module holding the averaged weights (pl_module itself without EMA)

Own callback instead of Lightning's EMAWeightAveraging: that one copies the average over the raw weights at
train end (so a checkpoint written then resumes from EMA weights) and has no public accessor for the averaged copy.
The checkpoint layout is Lightning's, so checkpoints of either load with the other: `state_dict` holds the EMA
weights, `current_model_state` the raw ones, `averaging_state` the AveragedModel's counter; with post_hoc also
`post_hoc_ema` (the tracked profiles, for exact resume). Snapshots: `<snapshot_dir>/phema-<step>.pt`, each both
profiles' weights as data (read back by read_snapshots below). ema-pytorch's PostHocEMA is not
used: its profiles are modules of their own outside Lightning's checkpoint (no exact resume) and its snapshots
are float16 by default; its reconstruction weights equal ours (tests/test_phema.py).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from ..checks import check_choice, check_count
from ..io import atomic_write
from ..phema import power_beta, reconstruct, sigma_rel_to_gamma

KINDS = ("exponential", "power")  # callbacks.ema.kind
SNAPSHOT_FORMAT = "diffusion_lab.phema/1"


class EMA(L.Callback):
    """Exponential moving average ema <- d_n * ema + (1 - d_n) * w after the n-th optimizer step.

    d_n = decay, or with warmup d_n = min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage with
    num_updates): without it a short run's average keeps decay^n of its random initial weights (0.999^800 = 45%
    after 800 steps); with it the horizon grows with the run until it reaches 1 / (1 - decay).
    Validation runs on the EMA weights (swapped in and back). The raw weights stay in the module after fit.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        update_every_n_steps: int = 1,
        warmup: bool = False,
        kind: str = "exponential",
        sigma_rel: float | None = None,
        post_hoc: bool = False,
        post_hoc_sigma_rels: tuple[float, ...] = (0.05, 0.10),
        snapshot_every: int = 1000,
        snapshot_dir: str | None = None,
    ):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must be in [0, 1]")
        check_count("callbacks.ema.update_every_n_steps", update_every_n_steps)
        check_choice("callbacks.ema.kind", kind, KINDS)
        self.decay, self.update_every_n_steps, self.warmup = float(decay), int(update_every_n_steps), bool(warmup)
        self.kind, self.gamma = kind, None
        if kind == "power":
            if sigma_rel is None:
                raise ValueError("callbacks.ema.kind=power needs callbacks.ema.sigma_rel (EDM2 used 0.05-0.15)")
            self.gamma = self._gamma("callbacks.ema.sigma_rel", sigma_rel)
        self.post_hoc = bool(post_hoc)
        self.sigma_rels = tuple(float(s) for s in post_hoc_sigma_rels)
        self.gammas = [self._gamma("callbacks.ema.post_hoc_sigma_rels", s) for s in self.sigma_rels]
        if self.post_hoc and (len(set(self.sigma_rels)) < 2 or snapshot_dir is None or int(snapshot_every) < 1):
            raise ValueError(
                "callbacks.ema.post_hoc=true needs two or more distinct post_hoc_sigma_rels (got "
                f"{list(self.sigma_rels)}), snapshot_every >= 1 (got {snapshot_every}) and a snapshot_dir (got "
                f"{snapshot_dir})"
            )
        self.snapshot_every, self.snapshot_dir = int(snapshot_every), snapshot_dir
        self.averaged: AveragedModel | None = None
        self.profiles: list[AveragedModel] = []  # post-hoc: one average per post_hoc_sigma_rels entry
        self.latest_update_step = 0

    @staticmethod
    def _gamma(key: str, sigma_rel) -> float:
        try:
            return sigma_rel_to_gamma(sigma_rel)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: {e}") from None

    def decay_at(self, step: int, delta: int = 1) -> float:
        """The decay used by the update after optimizer step `step` (1-based), `delta` steps after the previous one:
        exponential: decay (warmup: min(decay, (1 + step) / (10 + step))); power: (1 - delta/step)^(gamma + 1)."""
        if self.kind == "power":
            return power_beta(self.gamma, step, delta)
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @staticmethod
    def of(trainer: L.Trainer, pl_module: L.LightningModule) -> L.LightningModule:
        """The module with the EMA weights during fit; pl_module itself when there is no EMA callback."""
        for cb in trainer.callbacks:
            if isinstance(cb, EMA) and cb.averaged is not None:
                return cb.averaged.module
        return pl_module

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":
            self.averaged = AveragedModel(pl_module, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
            if self.post_hoc:
                self.profiles = [AveragedModel(pl_module, use_buffers=True) for _ in self.sigma_rels]

    def on_fit_start(self, trainer, pl_module):
        # setup() runs before the strategy moves the module to its device; keep the average beside the weights.
        for avg in [self.averaged, *self.profiles]:
            if avg is not None:
                avg.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > self.latest_update_step and (step - 1) % self.update_every_n_steps == 0:
            delta = step - self.latest_update_step if self.latest_update_step else step
            self.averaged.multi_avg_fn = get_ema_multi_avg_fn(self.decay_at(step, delta))
            self.averaged.update_parameters(pl_module)
            for gamma, avg in zip(self.gammas, self.profiles):
                avg.multi_avg_fn = get_ema_multi_avg_fn(power_beta(gamma, step, delta))
                avg.update_parameters(pl_module)
            self.latest_update_step = step
        if self.post_hoc and step % self.snapshot_every == 0 and step > 0 and trainer.is_global_zero:
            self._write_snapshot(step)

    def _write_snapshot(self, step: int) -> None:
        """<snapshot_dir>/phema-<step>.pt: every profile's module weights at this step, as data, written atomically;
        a non-finite average stops the run (the snapshot would poison every reconstruction that uses it)."""
        states = [{k[len("module.") :]: v.detach().cpu().clone() for k, v in avg.state_dict().items()
                   if k.startswith("module.")} for avg in self.profiles]  # fmt: skip
        for sigma_rel, state in zip(self.sigma_rels, states):
            bad = [k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
            if bad:
                raise RuntimeError(f"post-hoc EMA profile sigma_rel={sigma_rel} is not finite at step {step} "
                                   f"({bad[0]}): no snapshot written")  # fmt: skip
        payload = {"format": SNAPSHOT_FORMAT, "step": step, "sigma_rels": list(self.sigma_rels),
                   "gammas": list(self.gammas), "states": states}  # fmt: skip
        with atomic_write(Path(self.snapshot_dir) / f"phema-{step:09d}.pt") as tmp:
            torch.save(payload, tmp)

    def _swap(self, pl_module: L.LightningModule) -> None:
        ema = itertools.chain(self.averaged.module.parameters(), self.averaged.module.buffers())
        raw = itertools.chain(pl_module.parameters(), pl_module.buffers())
        with torch.no_grad():
            for a, b in zip(ema, raw):
                tmp = a.detach().clone()
                a.copy_(b)
                b.copy_(tmp)

    def on_validation_epoch_start(self, trainer, pl_module):
        if self.averaged is not None and not trainer.sanity_checking:
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.averaged is not None and not trainer.sanity_checking:
            self._swap(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"latest_update_step": self.latest_update_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.latest_update_step = int(state_dict.get("latest_update_step", 0))

    @property
    def state_key(self) -> str:
        return "EMAWeightAveraging"  # the key Lightning's callback used, so older checkpoints resume

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.averaged is None:
            return
        if self.profiles:
            checkpoint["post_hoc_ema"] = {"sigma_rels": list(self.sigma_rels),
                                          "states": [avg.state_dict() for avg in self.profiles]}  # fmt: skip
        averaged = self.averaged.state_dict()
        checkpoint["current_model_state"] = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k[len("module.") :]: v for k, v in averaged.items() if k.startswith("module.")}
        checkpoint["averaging_state"] = {k: v for k, v in averaged.items() if not k.startswith("module.")}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if self.averaged is None:
            return
        saved = checkpoint.get("post_hoc_ema")
        if self.profiles and saved is not None:
            if [float(s) for s in saved["sigma_rels"]] != list(self.sigma_rels):
                raise ValueError(f"callbacks.ema.post_hoc_sigma_rels={list(self.sigma_rels)} differs from the "
                                 f"checkpoint's {saved['sigma_rels']}: resume with the run's own")  # fmt: skip
            for avg, state in zip(self.profiles, saved["states"]):
                avg.load_state_dict(state)
        # post_hoc turned on at a resume: the profiles start there (their first update copies the weights), so
        # reconstructions from them describe the run from that step on only
        if "current_model_state" in checkpoint:
            state = {f"module.{k}": v for k, v in checkpoint["state_dict"].items()}
            state |= checkpoint.get("averaging_state") or {"n_averaged": torch.tensor(1, dtype=torch.long)}
            self.averaged.load_state_dict(state)
            pl_module.load_state_dict(checkpoint["current_model_state"])
        else:  # a checkpoint without EMA: start the average from its weights
            self.averaged.module.load_state_dict(checkpoint["state_dict"])


class SnapshotError(ValueError):
    """A post-hoc EMA snapshot that cannot be used; the message names the file."""


def post_hoc_copy(module: L.LightningModule, snapshots: list[dict], sigma_rel: float, step: int | None = None):
    """A copy of `module` holding the post-hoc EMA of width sigma_rel at `step` (default: the last snapshot's),
    rebuilt from read_snapshots' list (phema.reconstruct); ValueError when the snapshots cannot represent it."""
    import copy

    state = reconstruct(snapshots, float(sigma_rel), step)
    scratch = copy.deepcopy(module)
    scratch.load_state_dict(state)
    return scratch


def read_snapshots(directory: str | Path) -> list[dict]:
    """A run's post-hoc EMA snapshots (`<run>/ema_snapshots/phema-<step>.pt`, written by lit.EMA with post_hoc),
    sorted by step, each read as pure data and checked: SnapshotError naming the file when one is truncated, not
    ours, inconsistent with the others (profiles, tensor names) or not finite."""
    files = sorted(Path(directory).glob("phema-*.pt"))
    if not files:
        raise SnapshotError(f"{directory} has no post-hoc EMA snapshots (phema-*.pt): train with "
                              "callbacks.ema.post_hoc=true")  # fmt: skip
    out = []
    # each file holds a copy of the net per profile: a bar over them (with an ETA, on a terminal only)
    for f in tqdm(files, desc="post-hoc EMA snapshots", unit="file", leave=False, disable=None):
        try:
            snap = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line naming it
            raise SnapshotError(f"{f} is not a readable snapshot (truncated or not data: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        ok = (isinstance(snap, dict) and snap.get("format") == SNAPSHOT_FORMAT and isinstance(snap.get("step"), int)
              and isinstance(snap.get("states"), list) and len(snap["states"]) == len(snap.get("gammas") or [])
              and all(isinstance(st, dict) and all(torch.is_tensor(v) for v in st.values()) for st in snap["states"]))
        if not ok:
            raise SnapshotError(f"{f} is not a diffusion_lab post-hoc EMA snapshot ({SNAPSHOT_FORMAT})")
        if out and (snap["gammas"] != out[0]["gammas"] or snap["states"][0].keys() != out[0]["states"][0].keys()):
            raise SnapshotError(f"{f} tracks other profiles or another network than {files[0]}: keep one run's "
                                  "snapshots per directory")  # fmt: skip
        bad = [k for st in snap["states"] for k, v in st.items()
               if torch.is_floating_point(v) and not v.isfinite().all()]  # fmt: skip
        if bad:
            raise SnapshotError(f"{f} has NaN or inf weights ({bad[0]}): remove it to reconstruct from the others")
        out.append(snap)
    return sorted(out, key=lambda s: s["step"])
