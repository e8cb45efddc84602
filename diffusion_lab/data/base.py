"""ImageDataModule: the one DataModule shape every dataset shares.

Batches are `(x, y)`: x float32 [B, C, H, W] in [-1, 1] (uint8 k -> k / 127.5 - 1), y int64 [B]
(class labels, or -1 where the dataset has none). Subclasses only say how to load images.
Train/val split is a seeded permutation, identical on every run and every DDP rank; Lightning adds
DistributedSampler under DDP.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


def to_model_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [.., C, H, W] in 0..255 -> float32 in [-1, 1], k -> k / 127.5 - 1."""
    return x_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 with rounding (not truncation): round((x + 1) * 127.5)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class UInt8ImageDataset(Dataset):
    """Images held in memory as uint8 [N, C, H, W], scaled to [-1, 1] per item, optional horizontal flips."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = False):
        self.images, self.labels, self.hflip = images, labels, hflip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        x = to_model_range(self.images[i])
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


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

    def __init__(self, image_size: int = 8, channels: int = 1, num_classes: int | None = None,
                 val_fraction: float = 0.1, batch_size: int = 128, num_workers: int = 0,
                 hflip: bool = False, split_seed: int = 0):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1)")
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
        self.train_set = UInt8ImageDataset(images[train_idx], labels[train_idx], self.hflip)
        self.val_set = UInt8ImageDataset(images[val_idx], labels[val_idx])

    def real_images(self, split: str = "train") -> torch.Tensor:
        """uint8 [N, C, H, W] of a split, e.g. for FID reference statistics."""
        self.setup()
        return (self.train_set if split == "train" else self.val_set).images

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)


def resize_uint8(images: torch.Tensor, size: int, mode: str = "pad") -> torch.Tensor:
    """uint8 [N, C, h, w] -> [N, C, size, size] by zero-padding (centred) or bilinear resizing."""
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


__all__ = ["ImageDataModule", "UInt8ImageDataset", "to_model_range", "to_uint8", "resize_uint8"]
