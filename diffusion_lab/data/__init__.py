"""DataModules: one ImageDataModule shape (base.py) for every dataset."""

from .base import ImageDataModule, to_model_range, to_uint8
from .digits import DigitsDataModule
from .folder import FolderDataModule
from .stream import ImageStream, StreamDataModule
from .torchvision_sets import CIFAR10DataModule, FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "ImageDataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "FolderDataModule",
    "StreamDataModule",
    "ImageStream",
    "to_model_range",
    "to_uint8",
]
