"""ImageDataModule: the one DataModule shape every dataset shares.

Batches are `(x, y)`: x float32 [B, C, H, W] in [-1, 1] (uint8 k -> k / 127.5 - 1), y int64 [B]
(class labels, or -1 where the dataset has none). Subclasses only say how to load images.
Train/val split is a seeded permutation, identical on every run and every DDP rank. The training order
is EpochSampler's: a function of (seed, epoch) that a resumed run continues mid-epoch.
"""

from __future__ import annotations

import os

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..checks import check_choice, check_count

SPLITS = ("train", "val", "test")  # "test": the datasets that have a separate test set (MNIST, Fashion, CIFAR)


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [.., C, H, W] in 0..255 -> float32 in [-1, 1], k -> k / 127.5 - 1."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 with rounding (not truncation): round((x + 1) * 127.5)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class UInt8ImageDataset(Dataset):
    """Images held in memory as uint8 [N, C, H, W], scaled to [-1, 1] per item.

    An item is `dataset[i]` or `dataset[(i, flip)]`: EpochSampler decides the horizontal flips, so that they
    are part of the (seeded, resumable) data order rather than draws from the global RNG.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, key):
        i, flip = key if isinstance(key, tuple) else (key, False)
        x = to_model_range(self.images[i])
        return (x.flip(-1) if flip else x), self.labels[i]


class EpochSampler(DistributedSampler):
    """The training order: epoch e's permutation (and flips) depend only on (seed, e), like DistributedSampler's
    (which this is, so Lightning leaves it in place under DDP and each rank takes its share).

    `position()` -> (epoch, batches already trained in it) is read when an epoch's iteration starts; the first
    batches are skipped, so a run resumed mid-epoch sees exactly the batches the uninterrupted run saw.
    Yields (index, flip) keys for UInt8ImageDataset.
    """

    def __init__(
        self, dataset, batch_size: int, hflip: bool, seed: int, num_replicas: int = 1, rank: int = 0, position=None
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.hflip, self.position = batch_size, hflip, position

    def __iter__(self):
        epoch, skip = self.position() if self.position else (self.epoch, 0)
        self.set_epoch(epoch)
        indices = list(super().__iter__())  # this rank's share of the (seed + epoch) permutation
        flips = torch.zeros(len(self.dataset), dtype=torch.bool)
        if self.hflip:
            flips = (
                torch.rand(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch + 2**40)) < 0.5
            )
        keys = [(i, bool(flips[i])) for i in indices]
        return iter(keys[skip * self.batch_size :])


class ImageDataModule(L.LightningDataModule):
    """Common DataModule: subclasses implement `load_images() -> (uint8 [N, C, H, W], int64 [N])`.

    Args:
        image_size: side of the square images the network sees (resized/padded by the subclass).
        channels: 1 (grey) or 3 (RGB).
        num_classes: number of label classes, or None when there are no labels.
        val_fraction: fraction of images held out for validation (deterministic, seeded).
        batch_size: per device. num_workers: DataLoader workers (0 keeps in-memory data in process).
        hflip: random horizontal flips of training images (not for digits).
    """

    def __init__(
        self,
        image_size: int = 8,
        channels: int = 1,
        num_classes: int | None = None,
        val_fraction: float = 0.1,
        batch_size: int = 128,
        num_workers: int = 0,
        hflip: bool = False,
        split_seed: int = 0,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
        batch_size = check_count("data.batch_size", batch_size)
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        self.val_fraction, self.batch_size, self.num_workers = val_fraction, batch_size, num_workers
        self.hflip, self.split_seed = hflip, split_seed
        self.train_set = self.val_set = None

    def load_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def split(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(train indices, val indices): a permutation seeded by split_seed only."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val = int(round(n * self.val_fraction))
        return perm[n_val:], perm[:n_val]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = self.load_images()
        train_idx, val_idx = self.split(images.shape[0])
        self.train_set = UInt8ImageDataset(images[train_idx], labels[train_idx])
        self.val_set = UInt8ImageDataset(images[val_idx], labels[val_idx])

    def num_train(self) -> int:
        """Images in the training split (a streamed set counts them without reading them)."""
        self.setup()
        return len(self.train_set)

    def check_batch_size(self, world_size: int | None = None) -> None:
        """ValueError when a rank's share of the training set holds no full batch (drop_last would train nothing)."""
        n = self.num_train()
        world = world_size or (self.trainer.world_size if self.trainer is not None else 1)
        if n // world < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the training set ({n} images"
                + (f" over {world} ranks" if world > 1 else "")
                + f"): no full batch to train on; use data.batch_size <= {n // world}"
            )

    def real_images(self, split: str = "train") -> torch.Tensor:
        """uint8 [N, C, H, W] of a split ("train", "val", or "test" where the dataset has a test set), e.g. for
        FID reference statistics."""
        check_choice("reference_split", split, SPLITS)
        if split == "test":
            if not hasattr(self, "test_images"):
                raise ValueError(f"reference_split=test: {type(self).__name__} has no test set; use train or val")
            return self.test_images()[0]
        self.setup()
        return (self.train_set if split == "train" else self.val_set).images

    def _position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained): Lightning's restored batch progress when a run resumes inside an
        epoch (the iterator is made before the epoch loop resets it), 0 when an epoch starts."""
        t = self.trainer
        return t.current_epoch, int(t.fit_loop.epoch_loop.batch_progress.current.ready)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        self.check_batch_size()
        sampler = EpochSampler(
            self.train_set,
            self.batch_size,
            self.hflip,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),  # seed_everything's seed, as Lightning's own sampler
            num_replicas=t.world_size if t is not None else 1,
            rank=t.global_rank if t is not None else 0,
            position=self._position if t is not None else None,
        )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


def resize_uint8(images: torch.Tensor, size: int, mode: str = "pad") -> torch.Tensor:
    """uint8 [N, C, h, w] -> [N, C, size, size] by zero-padding (centred) or bilinear resizing."""
    check_choice("data.resize_mode", mode, ("pad", "resize"))
    h = images.shape[-1]
    if size == h:
        return images
    if mode == "pad":
        if size < h:
            raise ValueError(f"data.image_size={size} is smaller than the images ({h}); use resize")
        lo = (size - h) // 2
        return F.pad(images, (lo, size - h - lo, lo, size - h - lo))
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


__all__ = [
    "ImageDataModule",
    "UInt8ImageDataset",
    "EpochSampler",
    "SPLITS",
    "to_model_range",
    "to_uint8",
    "resize_uint8",
]
