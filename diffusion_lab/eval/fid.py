"""FID and KID through torchmetrics, with one Inception pass per image and cached reference features.

    fid = FIDEvaluator(weights_path, cache_dir)                    # torch-fidelity's TF-compatible InceptionV3
    ref = fid.reference_features("digits-train-8", real_uint8)     # [N, 2048], computed once, cached on disk
    scores = fid.score(fake_uint8, ref)                            # {"fid": .., "kid": .., "kid_std": .., "n": ..}

Images enter as uint8 [N, C, H, W] (greyscale repeated to 3 channels); torch-fidelity resizes them to
299x299 with TensorFlow-compatible bilinear interpolation. The metrics are torchmetrics'
FrechetInceptionDistance and KernelInceptionDistance fed with precomputed features, so one Inception
pass serves both and under DDP torchmetrics sums/gathers each rank's states.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from ..io import atomic_write, load_cache
from .precision_recall import precision_recall

log = logging.getLogger(__name__)
CACHE_VERSION = 1


class PrecomputedFeatures(nn.Module):
    """The 'feature extractor' torchmetrics sees: features [N, 2048] pass through unchanged."""

    num_features = 2048

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1 or 3, H, W] -> uint8 [N, 3, H, W]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"FID expects uint8 images (use diffusion_lab.data.to_uint8), got {images.dtype}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def fold_batch_norms(inception: nn.Module) -> int:
    """Fold each BasicConv2d's eval-mode BatchNorm into its convolution (torch's fuse_conv_bn_eval), in place.

    The network is frozen, so conv -> BN is one affine conv: w' = w * gamma / sqrt(var + eps),
    b' = beta - mean * gamma / sqrt(var + eps). Removes the 94 BN passes (18% of Inception's CPU time);
    features equal the unfolded ones to fp32 rounding (tests/test_fid.py). Returns how many were folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for block in inception.modules():  # torch-fidelity's BasicConv2d: relu(bn(conv(x)))
        conv, bn = getattr(block, "conv", None), getattr(block, "bn", None)
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
            block.conv, block.bn = fuse_conv_bn_eval(block.conv.eval(), block.bn.eval()), nn.Identity()
            folded += 1
    return folded


def _streamed(images) -> bool:
    """A data.ImageStream (a prepared split too large to hold) rather than a tensor; duck-typed, so eval/ does not
    import data/."""
    return hasattr(images, "batches") and hasattr(images, "fingerprint")


class FIDEvaluator:
    """Inception features, cached reference features, and FID/KID via torchmetrics.

    Args:
        weights_path: torch-fidelity-format Inception weights (see inception.py), None to let it download.
        cache_dir: where reference features are cached (`fid_ref/<key>-v<version>.pt`).
        batch_size: images per Inception forward; None: 32 on the CPU (0.063 s/image on 2 cores vs 0.091 at
            100: the 299x299 activations stay in cache, and peak memory is lower), 256 on a GPU.
        kid_subset_size: KID subset size (clipped to N).
    """

    def __init__(
        self,
        weights_path: str | None,
        cache_dir: str | Path = ".cache",
        batch_size: int | None = None,
        kid_subset_size: int = 1000,
        kid_subsets: int = 50,
        device: str | torch.device = "cpu",
    ):
        # antialias=False: torchmetrics' default (antialias=True) resizes with torch's antialiased bilinear,
        # which is not the TensorFlow 1.x resize of the reference FID; False keeps torch-fidelity's TF-exact one.
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=weights_path,
            antialias=False,
        ).to(device)
        fold_batch_norms(self.inception)
        # Channels-last weights: oneDNN picks NHWC convolution kernels, 1.65x faster Inception on 2 CPU
        # cores (100 images: 19.0 s -> 11.5 s), features equal to 1e-5; resize and input stay torch-fidelity's.
        self.inception.to(memory_format=torch.channels_last)
        self.cache_dir, self.device = Path(cache_dir), torch.device(device)
        self.batch_size = batch_size or (32 if self.device.type == "cpu" else 256)
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets

    @torch.no_grad()
    def features(self, images_uint8, desc: str | None = None) -> torch.Tensor:
        """uint8 [N, C, H, W] (a tensor, or a data.ImageStream read batch by batch) -> float32 [N, 2048] pool
        features (on the CPU). With `desc`, a progress bar with a count and an ETA (on a terminal only)."""
        batches = (
            images_uint8.batches(self.batch_size) if _streamed(images_uint8) else images_uint8.split(self.batch_size)
        )
        n = images_uint8.shape[0]
        # disable=None: off when not a TTY
        batches = tqdm(batches, desc=desc, total=math.ceil(n / self.batch_size), unit="batch", leave=False,
                       disable=None if desc else True)  # fmt: skip
        out = [self.inception(to_rgb_uint8(b).to(self.device)).float().cpu() for b in batches]
        return torch.cat(out) if out else torch.zeros(0, 2048)

    def cache_path(self, key: str, images_uint8) -> Path:
        """Keyed by the caller's name plus a hash of the images' shape and bytes (of a stream: its litdata index),
        so changed data misses."""
        if _streamed(images_uint8):
            digest = images_uint8.fingerprint()
        else:
            digest = hashlib.sha1(images_uint8.contiguous().numpy().tobytes()).hexdigest()[:12]
        shape = "x".join(map(str, images_uint8.shape))
        return self.cache_dir / "fid_ref" / f"{key}-{shape}-{digest}-v{CACHE_VERSION}.pt"

    def reference_features(self, key: str, images_uint8) -> torch.Tensor:
        """Real-image features [N, 2048], loaded from the cache or computed and cached (atomically)."""
        path = self.cache_path(key, images_uint8)
        if path.exists():
            log.info("FID reference features: cache hit %s", path)
            return load_cache(path, ("features",))["features"]
        log.info("FID reference features: computing the Inception features of %d images (%s) on %s, once; cached at %s",
                 images_uint8.shape[0], key, self.device, path)  # fmt: skip
        t0 = time.perf_counter()
        feats = self.features(images_uint8, desc=f"reference features ({key})")
        with atomic_write(path) as tmp:
            torch.save({"features": feats, "version": CACHE_VERSION, "key": key}, tmp)
        log.info(
            "FID reference features: computed %d in %.1fs, cached at %s", feats.shape[0], time.perf_counter() - t0, path
        )
        return feats

    def metrics(self, n_fake: int, n_real: int) -> tuple[FrechetInceptionDistance, KernelInceptionDistance]:
        """Fresh torchmetrics FID and KID that take precomputed features."""
        subset = max(2, min(self.kid_subset_size, n_fake, n_real))
        fid = FrechetInceptionDistance(feature=PrecomputedFeatures(), reset_real_features=False)
        kid = KernelInceptionDistance(feature=PrecomputedFeatures(), subset_size=subset, subsets=self.kid_subsets)
        return fid.to(self.device), kid.to(self.device)

    def score_features(
        self,
        fake: torch.Tensor,
        real: torch.Tensor,
        n_fake_total: int | None = None,
        n_real_total: int | None = None,
        seed: int = 0,
    ) -> dict[str, float]:
        """FID/KID of feature sets. Under DDP pass each rank's contiguous share of fake and real features (in index
        order) and the totals; torchmetrics' compute() reduces the states across ranks. KID's subsets are drawn
        from the CPU generator seeded `seed` (torchmetrics draws them from the global RNG, which it restores after),
        so the same features give the same KID on every call and every rank."""
        fid, kid = self.metrics(n_fake_total or fake.shape[0], n_real_total or real.shape[0])
        for m in (fid, kid):
            m.update(real.to(self.device), real=True)
            m.update(fake.to(self.device), real=False)
        with torch.random.fork_rng(devices=[]):  # torchmetrics' KID takes no generator: seed the CPU one, restore
            torch.default_generator.manual_seed(seed)
            kid_mean, kid_std = kid.compute()
        return {
            "fid": float(fid.compute()),
            "kid": float(kid_mean),
            "kid_std": float(kid_std),
            "n": int(n_fake_total or fake.shape[0]),
            "n_ref": int(n_real_total or real.shape[0]),
        }

    def score(
        self, fake_uint8: torch.Tensor, real_features: torch.Tensor, k: int = 3, seed: int = 0
    ) -> dict[str, float]:
        """FID, KID and improved precision/recall (k-NN manifolds, k=3) of generated uint8 images against
        reference features, in one process; one Inception pass. `seed` draws KID's subsets and precision/recall's
        subsample."""
        fake = self.features(fake_uint8)
        return {
            **self.score_features(fake, real_features, seed=seed),
            **precision_recall(real_features, fake, k, device=self.device, seed=seed),
        }
