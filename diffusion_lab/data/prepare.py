"""Write a dataset as litdata chunks for `data=stream` (stream.py says what a prepared set holds).

    python -m diffusion_lab.data.prepare data=mnist out=/data/mnist_stream
    python -m diffusion_lab.data.prepare data=folder data.path=/my/images data.skip_corrupt=true out=/data/mine
    python train.py data=stream data.path=/data/mnist_stream

Any data choice works. An image folder is decoded one file at a time in litdata's workers (never held whole); the
torchvision sets and digits are small and are read by their DataModule first. The train/val split is the data
choice's own (its split_seed); a corrupt image stops the run with its path named, unless data.skip_corrupt=true.
meta.json is written last: a set without it was interrupted and is refused by data=stream.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

from ..io import atomic_write
from .folder import FolderDataModule
from .stream import FORMAT, HASHES, META, StreamDataModule, chunk_hashes

log = logging.getLogger(__name__)
MARK = "diffusion_lab-prepare: "  # finds our message inside the error litdata raises for a failed worker


class _FolderItems:
    """The items of an image folder, decoded on demand in litdata's workers (picklable)."""

    def __init__(self, dm: FolderDataModule):
        self.dm = dm

    def __call__(self, job):
        i, position = job
        try:
            item = self.dm.read(self.dm.files[i])
        except ValueError as e:
            raise ValueError(f"{MARK}{e}") from e
        if item is not None:  # None: skipped under skip_corrupt
            yield {"image": item[0].numpy(), "label": item[1], "index": position}


class _TensorItems:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        self.images, self.labels = images, labels

    def __call__(self, i):
        label = -1 if self.labels is None else int(self.labels[i])
        yield {"image": np.ascontiguousarray(self.images[i].numpy()), "label": label, "index": i}


def _write(fn, inputs: list, out: Path, chunk_bytes: str, num_workers: int) -> int:
    from litdata import optimize

    if not inputs:
        return 0
    try:
        optimize(fn=fn, inputs=inputs, output_dir=str(out), chunk_bytes=chunk_bytes, num_workers=num_workers,
                 mode="overwrite", verbose=True, start_method="fork")  # fmt: skip
    except RuntimeError as e:
        text = str(e)
        if MARK in text:  # our one line, from inside the worker's traceback
            raise ValueError(text.split(MARK, 1)[1].splitlines()[0]) from None
        raise
    return sum(c["chunk_size"] for c in json.loads((out / "index.json").read_text())["chunks"])  # items written


def prepare(dm, out: str | Path, chunk_bytes: str = "64MB", num_workers: int = 1) -> dict:
    """Write `dm`'s splits (train, val, test where it has one) under `out`, then out/meta.json; returns the meta."""
    out = Path(out)
    if isinstance(dm, StreamDataModule):
        raise ValueError("data=stream is a prepared set already: prepare from its source (data=mnist, data=folder)")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out={str(out)!r} is a file: prepare into a new directory")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"out={str(out)!r} is not empty: prepare into a new directory (nothing was changed)")
    counts = {}
    if isinstance(dm, FolderDataModule):
        train_idx, val_idx = dm.split(len(dm.files))
        for split, idx in (("train", train_idx), ("val", val_idx)):
            jobs = [(int(i), k) for k, i in enumerate(idx.tolist())]
            counts[split] = _write(_FolderItems(dm), jobs, out / split, chunk_bytes, num_workers)
        counts["test"] = 0
    else:
        dm.prepare_data()
        dm.setup()
        splits = {"train": (dm.train_set.images, dm.train_set.labels), "val": (dm.val_set.images, dm.val_set.labels)}
        if hasattr(dm, "test_images"):
            splits["test"] = dm.test_images()
        for split, (images, labels) in splits.items():
            counts[split] = _write(_TensorItems(images, labels), list(range(images.shape[0])), out / split,
                                   chunk_bytes, num_workers)  # fmt: skip
    meta = {"format": FORMAT, "id": uuid.uuid4().hex, "image_size": dm.image_size, "channels": dm.channels,
            "num_classes": dm.num_classes,
            "counts": counts, "source": type(dm).__name__,
            HASHES: {split: chunk_hashes(out / split) for split, n in counts.items() if n}}  # fmt: skip
    with atomic_write(out / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))
    log.info("prepared %s into %s: %s", type(dm).__name__, out, counts)
    return meta


def main(cfg) -> None:
    """`python -m diffusion_lab.data.prepare data=<choice> [data.key=value ...] out=<dir> [chunk_bytes=64MB]`."""
    from hydra.utils import instantiate

    try:
        if cfg.get("out") is None:
            raise ValueError("out=<dir> is required: where to write the prepared set")
        prepare(instantiate(cfg.data), cfg.out, str(cfg.chunk_bytes), int(cfg.num_workers))
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        cause = e.__cause__ or e
        # one line, as diffusion_lab.cli; after a newline, since litdata's progress bar may have left its line open
        print(f"\nerror: {str(cause).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    import hydra

    hydra.main(version_base="1.3", config_path="../../conf", config_name="prepare")(main)()
