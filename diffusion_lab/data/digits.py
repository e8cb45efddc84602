"""scikit-learn's digits (1,797 greyscale 8x8 images, 17 levels 0..16, labels 0-9): the embedded default."""

from __future__ import annotations

import torch

from ..checks import check_choice
from .base import ImageDataModule, resize_uint8


class DigitsDataModule(ImageDataModule):
    """Digits as uint8 [N, 1, S, S]: level k in 0..16 -> round(k * 255 / 16); S = 8, or 16/32 padded or resized."""

    def __init__(self, image_size: int = 8, resize_mode: str = "pad", channels: int = 1, **kwargs):
        if channels != 1:
            raise ValueError(f"data.channels={channels}: digits are greyscale, allowed: 1")
        kwargs.setdefault("num_classes", 10)
        super().__init__(image_size=image_size, channels=1, **kwargs)
        check_choice("data.resize_mode", resize_mode, ("pad", "resize"))
        self.resize_mode = resize_mode

    def load_images(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.from_numpy(d.images).reshape(-1, 1, 8, 8)
        images = (images * 255.0 / 16.0).round().to(torch.uint8)
        return resize_uint8(images, self.image_size, self.resize_mode), torch.from_numpy(d.target).long()
