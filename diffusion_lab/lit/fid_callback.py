"""FIDCallback: FID/KID and precision/recall of each configured sampler on the EMA weights during training,
correct under DDP.

Every `every_n_epochs` epochs and at the end of fit, each rank scores its share of `num_samples` through
eval/scoring.py's sample_and_score, the path evaluate.py and the benchmarks use: image i is seeded by
(seed, i), torchmetrics reduces the FID/KID states across ranks in compute(), and precision/recall see every
rank's features, so the score equals a one-process run on the same images. Rank 0 logs
`val/{fid,kid,precision,recall,sample_seconds}/<sampler>`, `val/fid_ratio/<sampler>` (FID relative to the
sampler with the most network evaluations, DDPM-T by default) and a grid per sampler. With `ema_sigma_rels` (a run
with callbacks.ema.post_hoc) it also scores the post-hoc EMA of each sigma_rel rebuilt from the snapshots written so
far (every rank reads them: the run directory must be shared, as for checkpoints), logged as
`val/fid/<sampler>@ema<sigma_rel>`; one the snapshots cannot represent yet is skipped with a log line.
An autoguided sampler (sampler.guide) loads its guide checkpoint at setup (every rank reads it, before the first
step), or rebuilds a guide from this run's post-hoc EMA snapshots at each evaluation once they reach guide.step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from ..checks import check_choice, check_count
from ..data.base import SPLITS
from ..diffusion import Sampler
from ..eval.fid import FIDEvaluator
from ..eval.inception import inception_weights
from ..eval.scoring import sample_and_score
from ..images import log_image, save_grid
from ..phema import sigma_rel_to_gamma
from .ema import EMA

log = logging.getLogger(__name__)


class _Ranks:
    """The trainer's ranks as eval.scoring's World: rank, size and an all-gather of rows (shares may differ by one)."""

    def __init__(self, trainer):
        self.trainer, self.rank, self.size = trainer, trainer.global_rank, trainer.world_size

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return rows
        strategy = self.trainer.strategy
        n = torch.tensor([rows.shape[0]], device=strategy.root_device)
        sizes = strategy.all_gather(n).reshape(-1).tolist()
        padded = torch.zeros(max(sizes), *rows.shape[1:], dtype=rows.dtype)
        padded[: rows.shape[0]] = rows
        everything = strategy.all_gather(padded.to(strategy.root_device)).cpu()
        return torch.cat([everything[r, :k] for r, k in enumerate(sizes)])


class FIDCallback(L.Callback):
    """Args:
    samplers: Samplers (or their config mappings, built by Sampler.from_config) to score; default DDIM-50 eta 0
        and DDPM at the process's T.
    num_samples: generated images per sampler, split across ranks; image i is seeded by (seed, i) alone, as in
        evaluate.py (eval/scoring.py), so the score does not depend on the number of ranks or batch_size.
    every_n_epochs: 0 = only at fit end.
    inception_weights: explicit weights path (else resolved offline; see inception.py).
    reference_split: which split of the DataModule is the reference set ("train", "val" or "test").
    num_reference: only the first N images of that split (None: all), as evaluate.py's fid.num_reference.
    ema_sigma_rels: post-hoc EMA lengths to score as well, from the EMA callback's snapshots (post_hoc=true).
    """

    def __init__(
        self,
        samplers: list[Sampler] | None = None,
        num_samples: int = 1000,
        every_n_epochs: int = 0,
        inception_weights: str | None = None,
        cache_dir: str = ".cache",
        reference_split: str = "train",
        batch_size: int = 250,
        dirpath: str = "fid",
        seed: int = 1234,
        allow_download: bool = True,
        ema_sigma_rels: list[float] | None = None,
        num_reference: int | None = None,
    ):
        check_choice("callbacks.fid.reference_split", reference_split, SPLITS)
        self.num_reference = None if num_reference is None else check_count("callbacks.fid.num_reference",
                                                                             num_reference, 2)  # fmt: skip
        for r in ema_sigma_rels or []:
            try:
                sigma_rel_to_gamma(r)
            except (TypeError, ValueError) as e:
                raise ValueError(f"callbacks.fid.ema_sigma_rels: {e}") from None
        self.ema_sigma_rels = [float(r) for r in ema_sigma_rels or []]
        self.samplers = [s if isinstance(s, Sampler) else Sampler.from_config(s) for s in (samplers or [])]
        self.num_samples = check_count("callbacks.fid.num_samples", num_samples)
        self.every_n_epochs = check_count("callbacks.fid.every_n_epochs", every_n_epochs, 0)
        batch_size = check_count("callbacks.fid.batch_size", batch_size)
        self.weights_arg, self.cache_dir, self.reference_split = inception_weights, cache_dir, reference_split
        self.batch_size, self.dirpath, self.seed, self.allow_download = batch_size, Path(dirpath), seed, allow_download
        self.evaluator: FIDEvaluator | None = None
        self.results: dict[str, dict[str, float]] = {}
        # (module, guide, source) -> a guide checkpoint's frozen net, read as untrusted data: given by train()
        # (checkpoint.load_guide), as reading checkpoints sits above lit/ in the package's layers
        self.guide_loader = None

    def setup(self, trainer, pl_module, stage):
        # none given: the process's default sampler (DDIM-50 on DDPM/IDDPM), and DDPM-T where there is one
        diffusion = pl_module.diffusion
        ddpm = [Sampler("ddpm")] if diffusion.discrete else []
        objective = pl_module.objective
        samplers = self.samplers or [Sampler.default_for(diffusion, objective), *ddpm]
        self.samplers = [s.bind(diffusion, objective.name) for s in samplers]
        self.snapshot_dir = next((cb.snapshot_dir for cb in trainer.callbacks if isinstance(cb, EMA) and cb.post_hoc),
                                 None)  # fmt: skip
        if self.ema_sigma_rels and self.snapshot_dir is None:
            raise ValueError(
                "callbacks.fid.ema_sigma_rels needs the post-hoc snapshots: set callbacks.ema.post_hoc=true"
            )
        for i, s in enumerate(self.samplers):
            if not _autoguided(s):
                continue
            if not s.guide:
                raise ValueError(f"callbacks.fid.samplers[{i}]: autoguidance needs a guide: guide: {{ckpt: <a weaker "
                                 "run's checkpoint>}} or {step: <an earlier snapshot step>, sigma_rel: <width>}")
            if "ckpt" in s.guide:
                if self.guide_loader is None:
                    raise ValueError(f"callbacks.fid.samplers[{i}].guide.ckpt: train.py reads guide checkpoints; with "
                                     "a Trainer of your own set FIDCallback.guide_loader = "
                                     "diffusion_lab.checkpoint.load_guide")  # fmt: skip
                self.samplers[i] = s.with_guide(self.guide_loader(pl_module, s.guide, "this run"))
            elif self.snapshot_dir is None:
                raise ValueError(f"callbacks.fid.samplers[{i}]: a guide from this run's snapshots (sampler.guide.step)"
                                 " needs the post-hoc snapshots: set callbacks.ema.post_hoc=true")  # fmt: skip
        # Resolve weights before any training step, so a missing file fails at once; rank 0 first, so that
        # a first-time conversion happens once.
        if not trainer.is_global_zero:
            trainer.strategy.barrier()
        weights = inception_weights(self.weights_arg, self.cache_dir, allow_download=self.allow_download)
        if trainer.is_global_zero and trainer.world_size > 1:
            trainer.strategy.barrier()
        self.evaluator = FIDEvaluator(weights, self.cache_dir, device=pl_module.device)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, dict[str, float]]:
        ev = self.evaluator
        ev.inception.to(module.device)
        ev.device = module.device
        dm = trainer.datamodule
        real = dm.real_images(self.reference_split)[: self.num_reference]
        key = f"{type(dm).__name__}-{self.reference_split}"
        ref = ev.reference_features(key, real) if trainer.is_global_zero or trainer.world_size == 1 else None
        if trainer.world_size > 1:  # every rank reads the cache rank 0 just wrote
            trainer.strategy.barrier()
            ref = ev.reference_features(key, real)
        results, samplers = {}, self._guided(trainer, module)
        for tag, weights in [("", module), *self._post_hoc(trainer, module)]:
            for sampler in samplers:
                scores, fake = sample_and_score(
                    weights, sampler, num_samples=self.num_samples, seed=self.seed, batch_size=self.batch_size,
                    evaluator=ev, reference=ref, world=_Ranks(trainer),
                )  # fmt: skip
                scores["nfe"] = sampler.nfe
                name = sampler.name + tag
                results[name] = scores
                if trainer.is_global_zero and fake.shape[0]:
                    path = self.dirpath / f"{name}_step{trainer.global_step:07d}.png"
                    grid = save_grid(fake[:64].float() / 127.5 - 1, path)
                    log_image(trainer.loggers, f"fid_samples/{name}", path, grid, trainer.global_step)
        self.results = results
        self._log(trainer, results)
        return results

    def _guided(self, trainer, module) -> list[Sampler]:
        """The samplers to score now, each autoguided one with its guide on module's device: a checkpoint's (loaded
        at setup), or this run's post-hoc EMA at guide.step rebuilt from the snapshots so far (skipped with a log
        line until they reach it)."""
        from .ema import SnapshotError, post_hoc_copy, read_snapshots

        out = []
        for s in self.samplers:
            if _autoguided(s) and "ckpt" not in s.guide:
                if trainer.world_size > 1:  # rank 0 wrote the snapshots
                    trainer.strategy.barrier()
                try:  # the post-hoc EMA of width sigma_rel at the guide's step, as evaluate.py rebuilds it
                    snaps = read_snapshots(self.snapshot_dir)
                    scratch = post_hoc_copy(module, snaps, s.guide["sigma_rel"], int(s.guide["step"]))
                    guided, why = s.with_guide(scratch.net.eval().requires_grad_(False)), ""
                except (ValueError, SnapshotError) as e:
                    guided, why = None, str(e)
                # every rank scores the row or none does (each one's share meets the others' in all_gather)
                if not trainer.strategy.reduce_boolean_decision(guided is not None, all=True):
                    log.info("FID of %s skipped at step %d: %s", s.name, trainer.global_step, why or "another rank "
                             "could not rebuild its guide")  # fmt: skip
                    continue
                s = guided
            elif s.guide_net is not None:
                s.guide_net.to(module.device)
            out.append(s)
        return out

    def _post_hoc(self, trainer, module) -> list[tuple[str, L.LightningModule]]:
        """[("@ema<sigma_rel>", a copy of `module` with that post-hoc EMA's weights)] from the snapshots so far."""
        if not self.ema_sigma_rels:
            return []
        from .ema import SnapshotError, post_hoc_copy, read_snapshots

        if trainer.world_size > 1:  # rank 0 wrote the snapshots
            trainer.strategy.barrier()
        try:
            snaps, why = read_snapshots(self.snapshot_dir), ""
        except SnapshotError as e:
            snaps, why = None, str(e)
        if not trainer.strategy.reduce_boolean_decision(snaps is not None, all=True):  # all ranks, or none
            log.info("FID of post-hoc EMAs skipped at step %d: %s", trainer.global_step, why or "another rank could "
                     "not read the snapshots")  # fmt: skip
            return []
        out = []
        for r in self.ema_sigma_rels:
            try:
                scratch, why = post_hoc_copy(module, snaps, r), ""
            except ValueError as e:
                scratch, why = None, str(e)
            if not trainer.strategy.reduce_boolean_decision(scratch is not None, all=True):  # all ranks, or none
                log.info("FID of the post-hoc EMA %g skipped at step %d: %s", r, trainer.global_step, why or "another "
                         "rank could not rebuild it")  # fmt: skip
                continue
            out.append((f"@ema{r:g}", scratch))
        return out

    def _log(self, trainer, results):
        metrics = {}
        for name, s in results.items():
            for key in ("fid", "kid", "precision", "recall", "sample_seconds"):
                metrics[f"val/{key}/{name}"] = s[key]
        # Each sampler's FID relative to the one with the most network evaluations (DDPM-T by default).
        ref = max(results, key=lambda n: results[n]["nfe"], default=None)
        for name, s in results.items():
            if name != ref and results[ref]["fid"] > 0:
                metrics[f"val/fid_ratio/{name}"] = s["fid"] / results[ref]["fid"]
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
        for k, v in metrics.items():
            trainer.callback_metrics[k] = torch.tensor(v)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.evaluate(trainer, EMA.of(trainer, pl_module))

    def on_train_end(self, trainer, pl_module):
        # Before teardown moves the model off the GPU; EMA.of() gives the averaged copy.
        self.evaluate(trainer, EMA.of(trainer, pl_module))


def _autoguided(s: Sampler) -> bool:
    return s.guidance is not None and s.guidance.rule == "autoguidance"
