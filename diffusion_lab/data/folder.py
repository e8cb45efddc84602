"""Any folder of images (recursive; png, jpg, jpeg, bmp, webp, gif, tif), resized and centre-cropped.

With labels_from_subdirs=true, each first-level sub-folder is a class (sorted names -> 0..K-1).
Images are decoded once at setup and held in memory as uint8.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import functional as TF

from ..checks import check_choice
from .base import ImageDataModule

log = logging.getLogger(__name__)
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def to_8bit(im: Image.Image, f: Path) -> Image.Image:
    """16-bit greyscale (PIL modes I;16*, and I as PNG stores it) scaled to 8 bits: round(v * 255 / 65535).
    PIL's own convert("L") clips such values at 255 (a 0..65535 gradient turns 94% white). Other wide modes
    (32-bit integer, float) have no fixed range: refused with the file named."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        v = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.rint(v * 255.0 / 65535.0).clip(0, 255).astype(np.uint8), mode="L")
    if im.mode in ("I", "F"):
        raise ValueError(
            f"{f}: {im.mode!r} images ({'32-bit integer' if im.mode == 'I' else 'float'}) have no "
            "fixed value range; convert them to 8- or 16-bit PNG or JPEG"
        )
    return im


class FolderDataModule(ImageDataModule):
    def __init__(
        self,
        path: str,
        image_size: int = 32,
        channels: int = 3,
        labels_from_subdirs: bool = False,
        skip_corrupt: bool = False,
        hflip: bool = True,
        **kwargs,
    ):
        if channels not in (1, 3):
            check_choice("data.channels", channels, (1, 3))
        super().__init__(image_size=image_size, channels=channels, hflip=hflip, **kwargs)
        self.path, self.labels_from_subdirs, self.skip_corrupt = Path(path), labels_from_subdirs, skip_corrupt
        self.files = self._list_files()
        self.classes = sorted({f.relative_to(self.path).parts[0] for f in self.files}) if labels_from_subdirs else []
        if labels_from_subdirs:
            self.num_classes = len(self.classes)

    def _list_files(self) -> list[Path]:
        """Checked at construction, so a bad path fails before any training."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"data.path={str(self.path)!r} is not a directory")
        files = sorted(p for p in self.path.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
        if not files:
            raise ValueError(f"data.path={str(self.path)!r} holds no images ({', '.join(sorted(EXTENSIONS))})")
        return files

    def _load(self, f: Path) -> torch.Tensor:
        """uint8 [C, S, S]: resize the short side to S, centre crop."""
        with Image.open(f) as im:
            im = to_8bit(im, f).convert("L" if self.channels == 1 else "RGB")
            x = TF.pil_to_tensor(im)
        x = TF.resize(x, self.image_size, antialias=True)
        return TF.center_crop(x, [self.image_size, self.image_size])

    def read(self, f: Path) -> tuple[torch.Tensor, int] | None:
        """(uint8 [C, S, S], label) of one file; None for an unreadable one under skip_corrupt, else ValueError
        naming it. The in-memory set and `diffusion_lab.data.prepare` both read through this."""
        try:
            image = self._load(f)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            if self.skip_corrupt:
                return None
            raise ValueError(f"cannot read image {f}: {e} (set data.skip_corrupt=true to skip such files)") from e
        return image, (self.classes.index(f.relative_to(self.path).parts[0]) if self.labels_from_subdirs else -1)

    def load_images(self):
        images, labels, skipped = [], [], 0
        for f in self.files:
            item = self.read(f)
            if item is None:
                skipped += 1
                continue
            images.append(item[0])
            labels.append(item[1])
        if skipped:
            log.warning("data: skipped %d unreadable images of %d in %s", skipped, len(self.files), self.path)
        self.num_skipped = skipped
        if not images:
            raise ValueError(f"data.path={str(self.path)!r}: no readable images")
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)
