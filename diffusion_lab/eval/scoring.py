"""The one sample-and-score path: uint8 samples -> Inception features -> FID, KID, precision/recall and the
classifier score, with the seconds sampling took. evaluate.py, the FID callback (every rank) and bench/ all call
`sample_and_score`, so their numbers differ only by what they were asked.

    scores, images = sample_and_score(module, Sampler("ddim", 50), num_samples=1000, seed=0, batch_size=250,
                                      evaluator=FIDEvaluator(weights), reference=test_features, classifier=cnn)

Image i of a run is a function of (seed, i) only (diffusion.seeding): batch_size and the number of ranks change
no image, so they change no score. Under DDP (`world`) each rank draws a contiguous share of the indices, FID/KID
states are reduced by torchmetrics across ranks (KID's subsets and precision/recall's subsample are drawn from
`seed`, so every score repeats), and precision/recall and the classifier score see every rank's
images through world.gather.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..checks import check_count
from ..data import to_uint8
from .fid import FIDEvaluator
from .precision_recall import precision_recall


class World(Protocol):
    """The ranks sharing the work: this rank, how many, and an all-gather of [n_r, ...] rows (concatenated in
    rank order)."""

    rank: int
    size: int

    def gather(self, rows: torch.Tensor) -> torch.Tensor: ...


@dataclass
class OneProcess:
    rank: int = 0
    size: int = 1

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


def share(n: int, world: World) -> range:
    """This rank's image indices of n: contiguous, sizes differing by at most one."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return range(start, start + base + (world.rank < extra))


def sample_uint8(module, sampler, indices, seed: int, batch_size: int | None = None, progress: bool = False):
    """Images `indices` (a range) of the run seeded `seed` from a DiffusionModule-like `module` (its
    sample(n, sampler, seed=, start=, batch_size=, progress=)): uint8 [n, C, H, W] on the CPU."""
    return to_uint8(module.sample(len(indices), sampler, seed=seed, start=indices.start if len(indices) else 0,
                                  batch_size=batch_size, progress=progress))  # fmt: skip


def sample_and_score(
    module,
    sampler,
    *,
    num_samples: int,
    seed: int,
    batch_size: int | None,
    evaluator: FIDEvaluator,
    reference: torch.Tensor,
    classifier: torch.nn.Module | None = None,
    world: World | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], torch.Tensor]:
    """(scores, this rank's uint8 images). scores: fid, kid, kid_std, precision, recall (k = 3), n, n_ref, with a
    classifier also cls_score and confident; sample_seconds (this rank's) and seconds_per_sample (per image and
    device). reference: the real images' features [N_ref, 2048] (FIDEvaluator.reference_features)."""
    from .classifier import classifier_score, predict_probs

    world = world or OneProcess()
    check_count("num_samples", num_samples)
    indices = share(num_samples, world)
    t0 = time.perf_counter()
    images = sample_uint8(module, sampler, indices, seed, batch_size, progress)
    seconds = time.perf_counter() - t0
    feats = evaluator.features(images, desc="Inception features" if progress else None)
    # contiguous shares of both sets, so the reduced states hold the rows in index order on any number of ranks
    part = share(reference.shape[0], world)
    scores: dict[str, Any] = evaluator.score_features(
        feats, reference[part.start : part.stop], num_samples, reference.shape[0], seed=seed
    )
    scores |= precision_recall(reference, world.gather(feats), device=evaluator.device, seed=seed)
    if classifier is not None:
        seen = images if len(images) else torch.zeros((1, *images.shape[1:]), dtype=torch.uint8)
        probs = predict_probs(classifier, seen)[: len(images)]  # a rank with no images still sends [0, K]
        scores |= {k: v for k, v in classifier_score(world.gather(probs)).items() if k != "n"}
    scores["sample_seconds"] = seconds
    scores["seconds_per_sample"] = seconds / max(1, len(indices))
    return scores, images
