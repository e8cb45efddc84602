"""DataModules: shapes, dtype, range, labels, deterministic splits, the offline MNIST, image folders."""

import pytest
import torch
from PIL import Image

from diffusion_lab.data import DigitsDataModule, FolderDataModule, MNISTDataModule
from diffusion_lab.data.base import to_uint8


def _check_batch(dm, shape, num_classes):
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1:] == shape
    assert x.min() >= -1 and x.max() <= 1
    assert y.dtype == torch.long and set(y.tolist()) <= set(range(num_classes))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits(size):
    dm = DigitsDataModule(image_size=size, batch_size=64)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 180
    _check_batch(dm, (1, size, size), 10)
    imgs = dm.real_images("train")
    assert imgs.dtype == torch.uint8 and imgs.max() == 255  # level 16 -> 255
    assert set(torch.unique(imgs).tolist()) <= {round(k * 255 / 16) for k in range(17)}  # 17 grey levels


def test_split_is_deterministic_and_disjoint():
    a, b = DigitsDataModule(), DigitsDataModule()
    a.setup(), b.setup()
    assert torch.equal(a.real_images("val"), b.real_images("val"))
    tr, va = a.split(1797)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == 1797
    c = DigitsDataModule(split_seed=1)
    assert not torch.equal(c.split(1797)[1], va)


def test_uint8_round_trip_rounds():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(x.float() / 127.5 - 1), x)
    assert to_uint8(torch.tensor([0.999 / 127.5 - 1])).item() == 1  # rounding, not truncation


def test_mnist_offline_reads_all_images(tmp_path):
    dm = MNISTDataModule(data_dir=str(tmp_path), image_size=32, download=False, val_fraction=0.0)
    dm.prepare_data()
    images, labels = dm.load_images()
    test_images, test_labels = dm.test_images()
    assert images.shape == (60000, 1, 32, 32) and test_images.shape == (10000, 1, 32, 32)
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert images.dtype == torch.uint8 and images[:, :, :2].max() == 0  # padded border


def _write_images(root, n=6, sub=None, fmt="PNG"):
    d = root / sub if sub else root
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20 + i, 24), (i * 30, 100, 200)).save(d / f"img{i}.{fmt.lower()}", fmt)


def test_folder_with_and_without_labels(tmp_path):
    _write_images(tmp_path / "flat", 4)
    _write_images(tmp_path / "flat" / "nested", 3, fmt="JPEG")
    dm = FolderDataModule(str(tmp_path / "flat"), image_size=16, val_fraction=0.0, batch_size=7)
    dm.setup()
    assert len(dm.train_set) == 7
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (7, 3, 16, 16) and (y == -1).all()
    _write_images(tmp_path / "lab", 3, sub="cat")
    _write_images(tmp_path / "lab", 2, sub="dog")
    dm = FolderDataModule(str(tmp_path / "lab"), image_size=8, channels=1, labels_from_subdirs=True, val_fraction=0.0)
    dm.setup()
    assert dm.num_classes == 2 and sorted(dm.train_set.labels.tolist()) == [0, 0, 0, 1, 1]
    assert dm.train_set.images.shape[1:] == (1, 8, 8)


def test_folder_corrupt_file_both_ways(tmp_path):
    _write_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"broken.png.*skip_corrupt"):
        FolderDataModule(str(tmp_path), image_size=8).setup()
    dm = FolderDataModule(str(tmp_path), image_size=8, skip_corrupt=True, val_fraction=0.0)
    dm.setup()
    assert len(dm.train_set) == 3 and dm.num_skipped == 1


def test_folder_missing_or_empty_fails_naming_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path="):
        FolderDataModule(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="holds no images"):
        FolderDataModule(str(tmp_path))
