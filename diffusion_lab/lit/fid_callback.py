"""FIDCallback: FID/KID and precision/recall of each configured sampler on the EMA weights during training,
correct under DDP.

Every `every_n_epochs` epochs and at the end of fit, each rank draws its share of `num_samples` with
its own seed, computes Inception features of its share, and updates torchmetrics FID/KID with those
and with its slice of the reference features; torchmetrics reduces the states across ranks in
compute(), so the score is that of all ranks' samples against the whole reference set. Precision and recall
(k-NN manifolds) need every feature: the generated ones are gathered from all ranks. Rank 0 logs
`val/{fid,kid,precision,recall,sample_seconds}/<sampler>`, `val/fid_ratio/<sampler>` (FID relative to the
sampler with the most network evaluations, DDPM-T by default) and a grid per sampler.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch

from ..checks import check_choice
from ..data import to_uint8
from ..data.base import SPLITS
from ..diffusion import Sampler
from ..eval.fid import FIDEvaluator
from ..eval.inception import inception_weights
from ..eval.precision_recall import precision_recall
from ..images import log_image, save_grid
from .ema import EMA


class FIDCallback(L.Callback):
    """Args:
    samplers: Sampler objects to score (default DDIM-50 eta 0 and DDPM at the process's T).
    num_samples: generated images per sampler, split across ranks. every_n_epochs: 0 = only at fit end.
    inception_weights: explicit weights path (else resolved offline; see inception.py).
    reference_split: which split of the DataModule is the reference set ("train", "val" or "test").
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
    ):
        check_choice("callbacks.fid.reference_split", reference_split, SPLITS)
        # Sampler objects, or mappings of their fields (as OmegaConf turns dataclasses inside lists into)
        samplers = [
            s if isinstance(s, Sampler) else Sampler(**{k: v for k, v in s.items() if k != "_target_"})
            for s in (samplers or [])
        ]
        self.samplers = samplers  # None: DDIM-50 and DDPM-T, set in setup() once T is known
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.weights_arg, self.cache_dir, self.reference_split = inception_weights, cache_dir, reference_split
        self.batch_size, self.dirpath, self.seed, self.allow_download = batch_size, Path(dirpath), seed, allow_download
        self.evaluator: FIDEvaluator | None = None
        self.results: dict[str, dict[str, float]] = {}

    def setup(self, trainer, pl_module, stage):
        if not self.samplers:
            self.samplers = [Sampler("ddim", 50), Sampler("ddpm", pl_module.diffusion.num_timesteps)]
        # Resolve weights before any training step, so a missing file fails at once; rank 0 first, so that
        # a first-time conversion happens once.
        if not trainer.is_global_zero:
            trainer.strategy.barrier()
        weights = inception_weights(self.weights_arg, self.cache_dir, allow_download=self.allow_download)
        if trainer.is_global_zero and trainer.world_size > 1:
            trainer.strategy.barrier()
        self.evaluator = FIDEvaluator(weights, self.cache_dir, device=pl_module.device)

    def _share(self, trainer) -> tuple[int, int]:
        """(this rank's sample count, its first global sample index): contiguous, sizes differ by at most 1."""
        w, r = trainer.world_size, trainer.global_rank
        base, extra = divmod(self.num_samples, w)
        return base + (r < extra), r * base + min(r, extra)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, dict[str, float]]:
        ev = self.evaluator
        ev.inception.to(module.device)
        ev.device = module.device
        dm = trainer.datamodule
        real = dm.real_images(self.reference_split)
        key = f"{type(dm).__name__}-{self.reference_split}"
        ref = ev.reference_features(key, real) if trainer.is_global_zero or trainer.world_size == 1 else None
        if trainer.world_size > 1:  # every rank reads the cache rank 0 just wrote
            trainer.strategy.barrier()
            ref = ev.reference_features(key, real)
        ref_share = ref[trainer.global_rank :: trainer.world_size]
        n, start = self._share(trainer)
        results = {}
        shape = (module.net.in_channels, module.net.image_size, module.net.image_size)
        for sampler in self.samplers:
            t0 = time.perf_counter()
            chunks = []
            for i in range(start, start + n, self.batch_size):
                m = min(self.batch_size, start + n - i)
                # x_T of sample k is seeded by k alone, so the samples do not depend on how ranks split them.
                x_T = torch.cat(
                    [
                        torch.randn(1, *shape, generator=torch.Generator().manual_seed(self.seed + k))
                        for k in range(i, i + m)
                    ]
                )
                g = torch.Generator().manual_seed(self.seed + i)
                y = torch.arange(i, i + m) % module.net.num_classes if module.conditional else None  # balanced
                chunks.append(to_uint8(module.sample(m, sampler, y=y, generator=g, x_T=x_T)).cpu())
            fake = torch.cat(chunks) if chunks else torch.zeros(0, *real.shape[1:], dtype=torch.uint8)
            seconds = time.perf_counter() - t0
            feats = ev.features(fake)
            scores = ev.score_features(feats, ref_share, self.num_samples, ref.shape[0])
            scores |= precision_recall(ref, self._gather(trainer, feats))
            scores["sample_seconds"], scores["nfe"] = seconds, sampler.nfe
            results[sampler.name] = scores
            if trainer.is_global_zero and fake.shape[0]:
                path = self.dirpath / f"{sampler.name}_step{trainer.global_step:07d}.png"
                grid = save_grid(fake[:64].float() / 127.5 - 1, path)
                log_image(trainer.loggers, f"fid_samples/{sampler.name}", path, grid, trainer.global_step)
        self.results = results
        self._log(trainer, results)
        return results

    @staticmethod
    def _gather(trainer, feats: torch.Tensor) -> torch.Tensor:
        """Every rank's features [N_r, D] -> all of them on every rank (shares differ by at most one row)."""
        if trainer.world_size == 1:
            return feats
        n = torch.tensor([feats.shape[0]], device=trainer.strategy.root_device)
        sizes = trainer.strategy.all_gather(n).reshape(-1).tolist()
        padded = torch.zeros(max(sizes), feats.shape[1], dtype=feats.dtype)
        padded[: feats.shape[0]] = feats
        everything = trainer.strategy.all_gather(padded.to(trainer.strategy.root_device)).cpu()
        return torch.cat([everything[r, :k] for r, k in enumerate(sizes)])

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
