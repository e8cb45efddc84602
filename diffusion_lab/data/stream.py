"""Streaming data (litdata): training sets that do not fit in memory, read from local disk or object storage.

    python -m diffusion_lab.data.prepare data=mnist out=/data/mnist_stream     # once: litdata chunks + meta.json
    python train.py data=stream data.path=/data/mnist_stream                     # or data.path=s3://bucket/prefix
    python train.py data=stream data.path=local:/nfs/mnist_stream   # a shared disk, copied into litdata's cache

`prepare` (prepare.py) writes each split (train, val, and test where the dataset has one) as litdata chunks of
{"image": uint8 [C, H, W], "label": int, "index": int} under <out>/<split>/, and <out>/meta.json (image size,
channels, classes, counts, where it came from, and the sha256 of every chunk, checked before a local set is
used, or after each download of a remote one). StreamDataModule trains from them: litdata streams the chunks
(downloading remote ones into a bounded cache, `data.max_cache_size`), shuffles by (seed, epoch), gives each rank
its share, and its StreamingDataLoader's state goes into Lightning's checkpoint, so a run stopped mid-epoch resumes
at the same sample. Horizontal flips are a function of (seed, epoch, image index) too. The validation and test
splits are read whole (they are small); the training split is never held in memory: its FID reference features
are computed by streaming it (ImageStream) and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..io import file_sha256
from .base import ImageDataModule, to_model_range

META = "meta.json"
FORMAT = "diffusion_lab-stream-1"
HASHES = "chunk_sha256"  # meta.json: {split: {chunk file name: sha256 hex}}
log = logging.getLogger(__name__)


LOCAL_CACHED = "local:"  # litdata's prefix for a local directory read like a remote one (copied into its cache)


REMOTE = ("s3://", "gs://", "r2://", "azure://", "hf://", LOCAL_CACHED)  # what litdata downloads from


def _is_remote(path: str) -> bool:
    """An object store URL (s3://...) or litdata's `local:<dir>` (a slow shared disk copied chunk by chunk into a
    node-local cache): chunks that litdata downloads, checked after the download."""
    return str(path).startswith(REMOTE)


def _read(where: str, mode: str = "r"):
    """A file's text (or bytes), local or remote (fsspec, Lightning's dependency: s3:// etc. with their backend)."""
    where = str(where).removeprefix(LOCAL_CACHED)
    if _is_remote(where):
        import fsspec

        with fsspec.open(where, mode) as f:
            return f.read()
    return Path(where).read_text() if mode == "r" else Path(where).read_bytes()


def read_meta(path: str) -> dict:
    """A prepared set's meta.json; ValueError naming data.path (and what to do) when it is missing or not ours."""
    if "://" in str(path) and not _is_remote(path):
        raise ValueError(f"data.path={str(path)!r}: litdata streams from a directory or from "
                         f"{', '.join(REMOTE)}<...>; give one of those")  # fmt: skip
    where = f"{str(path).rstrip('/')}/{META}"
    try:
        meta = json.loads(_read(where))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"data.path={str(path)!r} has no {META}: prepare it first with "
            f"`python -m diffusion_lab.data.prepare data=<choice> out={path}`"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(f"data.path={str(path)!r}: {where} is unreadable ({e}); prepare the set again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("counts"), dict):
        raise ValueError(f"data.path={str(path)!r}: {where} is not a diffusion_lab stream ({FORMAT}); prepare it again")
    return meta


CHUNK_NAME = re.compile(r"chunk-\d+-\d+\.bin")
INDEX_CONFIG = {"data_format": ["numpy", "int", "int"], "compression": None, "encryption": None,
                "item_loader": "PyTreeLoader"}  # fmt: skip


def check_index(split_dir: str, check_sizes: bool = True) -> list[dict]:
    """The chunks of one prepared split, after checking its index.json (see StreamDataModule.check_chunks)."""
    where = f"{split_dir}/index.json"
    try:
        index = json.loads(_read(where))
        config, chunks = index["config"], index["chunks"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where} is missing or unreadable ({e}); prepare the set again") from None
    bad = {k: config.get(k) for k, v in INDEX_CONFIG.items() if config.get(k) != v}
    if bad or set(re.findall(r'"type": "([^"]*)"', str(config.get("data_spec")))) - {"builtins.dict"}:
        raise ValueError(
            f"{where} is not a set diffusion_lab.data.prepare wrote ({bad or 'data_spec'}); refused unread"
        )
    for c in chunks:
        name = str(c.get("filename"))
        if not CHUNK_NAME.fullmatch(name):
            raise ValueError(f"{where} names a chunk {name!r} that is not a plain chunk file; refused unread")
        if check_sizes:
            f = Path(split_dir.removeprefix(LOCAL_CACHED)) / name
            size = f.stat().st_size if f.is_file() else None
            if size != c.get("chunk_bytes"):
                raise ValueError(
                    f"chunk {f} is "
                    + ("missing" if size is None else f"{size} bytes, its index says {c['chunk_bytes']}")
                    + " (a truncated or partial copy); copy or prepare the set again"
                )
    return chunks


def chunk_hashes(split_dir: str | Path) -> dict[str, str]:
    """{chunk file name: sha256 hex} of one local split, in its index's order (prepare records them in meta.json)."""
    return {c["filename"]: file_sha256(Path(split_dir) / c["filename"]) for c in check_index(str(split_dir))}


def recorded_hashes(path: str, meta: dict, split: str, chunks: list[dict]) -> dict[str, str]:
    """{chunk file name: sha256} that prepare recorded for one split, in its index's order, after checking it: the
    hash list is data, so one naming another file than the index's (or not hex digests) is refused unread."""
    recorded = meta[HASHES].get(split) if isinstance(meta[HASHES], dict) else None
    if not isinstance(recorded, dict) or sorted(recorded) != sorted(c["filename"] for c in chunks) or not all(
        isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in recorded.values()
    ):
        raise ValueError(f"data.path={path!r}: {META}'s {HASHES} for {split} does not list that split's chunks "
                         "(an altered meta.json); refused unread: prepare the set again")  # fmt: skip
    return {c["filename"]: recorded[c["filename"]] for c in chunks}  # the index's order: litdata's chunk_index


def check_chunk(f: Path, sha256: str, origin: str | None = None) -> None:
    """ValueError naming the chunk when its bytes are not the ones prepare hashed (a damaged or altered copy); a
    downloaded copy (`origin`: where from) is removed from litdata's cache first, so the next run fetches it again."""
    if file_sha256(f) == sha256:
        return
    if origin is None:
        raise ValueError(f"chunk {f} does not match the sha256 prepare recorded for it (changed bytes: a damaged or "
                         "altered copy); copy or prepare the set again")  # fmt: skip
    try:
        f.unlink(missing_ok=True)
        cached = f"removed from the cache, {f}"
    except OSError as e:  # a read-only cache: the message stays about the chunk
        cached = f"its cached copy {f} could not be removed ({e.strerror}): delete it"
    raise ValueError(f"chunk {origin} does not match the sha256 prepare recorded for it after its download "
                     f"({cached}); run again to fetch it again, or prepare the set again if the stored copy is "
                     "damaged")  # fmt: skip


def _meta_value(path: str, key: str):
    """OmegaConf resolver `${stream_meta:<path>,<key>}`: conf/data/stream.yaml takes the net's image size, channels
    and classes from the prepared set itself."""
    return read_meta(path)[key]


OmegaConf.register_new_resolver("stream_meta", _meta_value, replace=True, use_cache=True)


def _streaming_dataset():
    from litdata import StreamingDataset

    class ImageStreamDataset(StreamingDataset):
        """litdata's StreamingDataset whose items are (x float32 [C, H, W] in [-1, 1], label) like the in-memory
        sets, with the flip of image `index` in epoch e a function of (seed, e, index)."""

        def __init__(self, *args, hflip: bool = False, raw: bool = False, hashes: dict[str, str] | None = None,
                     **kwargs):  # fmt: skip
            super().__init__(*args, **kwargs)
            self.hflip, self.raw = hflip, raw
            self.hashes, self.checked = hashes, set()
            self.names = list(hashes or ())  # the index's order: litdata's chunk_index

        def check_download(self, index) -> None:
            """A remote chunk's cached copy against its recorded sha256, before the first item read from each copy
            that is already there (litdata publishes a download by renaming a finished file) and else right after
            the read that downloaded it. Each loader worker keeps what it checked (name, inode, mtime): a
            re-downloaded copy is checked again, and so is each chunk once per epoch when the workers are not
            persistent. Chunks read by byte ranges (random access) are not cached whole and not checked; nor is a
            copy litdata evicts within the one read that downloaded it. Why here: litdata downloads lazily, in the
            loader's workers, and offers no hook between a download and its use."""
            chunk = getattr(index, "chunk_index", None)  # a ChunkedIndex (litdata's iteration; a numpy int)
            if not self.names or chunk is None:
                return
            name = self.names[int(chunk)]
            f = Path(self.input_dir.path) / name
            try:
                stat = f.stat()
                key = (name, stat.st_ino, stat.st_mtime_ns)
                if key not in self.checked:
                    check_chunk(f, self.hashes[name], origin=f"{self.input_dir.url}/{name}")
                    self.checked.add(key)
            except FileNotFoundError:  # not downloaded yet, or evicted by another reader of the cache
                return

        def __getitem__(self, index):
            self.check_download(index)  # a damaged chunk is named before litdata parses its header
            try:
                item = super().__getitem__(index)
            except Exception:
                self.check_download(index)  # the read that downloaded it failed on the damage: named, not a KeyError
                raise
            self.check_download(index)
            image = torch.as_tensor(item["image"])
            if self.raw:
                return image, int(item["label"]), int(item["index"])
            x = to_model_range(image)
            if self.hflip and random.Random(f"{self.seed}/{self.current_epoch}/{int(item['index'])}").random() < 0.5:
                x = x.flip(-1)
            return x, int(item["label"])

    return ImageStreamDataset


class ImageStream:
    """One prepared split, read in order as uint8 batches without holding it: FIDEvaluator takes it in place of an
    image tensor (features computed batch by batch; the cache keyed by the split's litdata index)."""

    def __init__(self, path: str, count: int, shape: tuple[int, ...], cache_dir: str | None = None,
                 hashes: dict[str, str] | None = None):  # fmt: skip
        self.path, self.count, self.item_shape, self.cache_dir = str(path), int(count), tuple(shape), cache_dir
        self.hashes = hashes  # a remote split's chunk sha256s, checked after each download

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.count, *self.item_shape)

    def __len__(self) -> int:
        return self.count

    def fingerprint(self) -> str:
        """A hash of the split's litdata index and of the set's meta.json, which holds the id `prepare` drew for
        it: two sets of the same shape and count (MNIST, Fashion-MNIST) differ, and a re-prepared set misses."""
        root = self.path.rstrip("/").rsplit("/", 1)[0]
        data = _read(f"{self.path.rstrip('/')}/index.json", "rb") + _read(f"{root}/{META}", "rb")
        return hashlib.sha1(data).hexdigest()[:12]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 [<= batch_size, C, H, W] batches in the split's order."""
        from litdata import StreamingDataLoader

        ds = _streaming_dataset()(self.path, shuffle=False, raw=True, cache_dir=self.cache_dir, hashes=self.hashes)
        for images, _, _ in StreamingDataLoader(ds, batch_size=batch_size):
            yield images

    def tensor(self, limit: int | None = None) -> torch.Tensor:
        n = self.count if limit is None else min(limit, self.count)
        out = torch.empty((n, *self.item_shape), dtype=torch.uint8)
        done = 0
        for b in self.batches(256):
            k = min(b.shape[0], n - done)
            out[done : done + k] = b[:k]
            done += k
            if done >= n:
                break
        return out

    def __getitem__(self, key):
        """[:n] -> the first n images as a tensor (bounded); [:None] -> the stream itself."""
        if isinstance(key, slice) and key.start in (None, 0) and key.step in (None, 1):
            return self if key.stop is None or key.stop >= self.count else self.tensor(key.stop)
        raise TypeError("an ImageStream can only be cut as [:n]")


class StreamDataModule(ImageDataModule):
    """Trains from a set written by `python -m diffusion_lab.data.prepare` (see the module docstring).

    Args:
        path: the prepared set's directory or URL (s3://...).
        batch_size / num_workers: per device, as for the in-memory sets.
        hflip: random horizontal flips, a function of (seed, epoch, index).
        max_cache_size: litdata's cache bound for remote chunks (e.g. "10GB").
        cache_dir: where litdata keeps downloaded chunks (null: its default).
        image_size / channels / num_classes: the set's own (conf/data/stream.yaml reads them from its meta.json);
        a different value is refused.
    """

    def __init__(self, path: str, image_size: int | None = None, channels: int | None = None,
                 num_classes: int | None = None, batch_size: int = 128, num_workers: int = 0, hflip: bool = False,
                 max_cache_size: str = "10GB", cache_dir: str | None = None, **kwargs):  # fmt: skip
        self.path = str(path).rstrip("/")
        self.meta = read_meta(self.path)
        for key, given in (("image_size", image_size), ("channels", channels), ("num_classes", num_classes)):
            if given is not None and given != self.meta[key]:
                raise ValueError(
                    f"data.{key}={given} but the prepared set {self.path} has {self.meta[key]}: "
                    f"leave data.{key} to the set (or prepare it again with data.{key}={given})"
                )
        super().__init__(image_size=self.meta["image_size"], channels=self.meta["channels"],
                         num_classes=self.meta["num_classes"], batch_size=batch_size, num_workers=num_workers,
                         hflip=hflip, **kwargs)  # fmt: skip
        self.max_cache_size, self.cache_dir = max_cache_size, cache_dir
        if self.meta["counts"].get("train", 0) < 1:
            raise ValueError(f"data.path={self.path!r}: its train split is empty; prepare the set again")
        self.check_chunks()  # before any work

    def _split(self, split: str) -> str:
        return f"{self.path}/{split}"

    def check_chunks(self) -> None:
        """Each split's litdata index is what `prepare` writes (numpy image, int label, int index, uncompressed, plain
        chunk names: litdata would otherwise pick a pickle deserializer or a path outside the set from it); a local
        set's chunks are all there, at the size the index records and with the sha256 meta.json records (one pass
        over the set before training; a `local:` set's sizes too); a remote set's chunks are checked against the
        sha256 after each download (ImageStreamDataset). A set prepared without hashes is read with a warning;
        ValueError naming the file otherwise."""
        local = not _is_remote(self.path)
        on_disk = local or self.path.startswith(LOCAL_CACHED)  # local:<dir> too: its sizes are checked up front
        if HASHES not in self.meta:
            log.warning("data.path=%s was prepared before chunk hashes: changed bytes in its chunks cannot be found; "
                        "prepare it again to add them", self.path)  # fmt: skip
        self.hashes = {}  # a remote set's {split: {chunk: sha256}}; a local set is checked here, whole
        for split, n in self.meta["counts"].items():
            if n:
                chunks = check_index(self._split(split), check_sizes=on_disk)
                if HASHES in self.meta:
                    hashes = recorded_hashes(self.path, self.meta, split, chunks)
                    if local:
                        for name, sha256 in hashes.items():
                            check_chunk(Path(self._split(split)) / name, sha256)
                    else:
                        self.hashes[split] = hashes  # checked after each download (ImageStreamDataset)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's seed, as the in-memory EpochSampler
        dataset = _streaming_dataset()
        self.train_set = dataset(self._split("train"), shuffle=True, drop_last=True, seed=seed, hflip=self.hflip,
                                 max_cache_size=self.max_cache_size, cache_dir=self.cache_dir,
                                 hashes=self.hashes.get("train"))  # fmt: skip
        has_val = self.meta["counts"].get("val", 0) > 0
        self.val_set = (dataset(self._split("val"), shuffle=False, cache_dir=self.cache_dir,
                                hashes=self.hashes.get("val")) if has_val else None)  # fmt: skip

    def num_train(self) -> int:
        return self.meta["counts"]["train"]  # litdata's len() is this rank's share

    def train_dataloader(self):
        from litdata import StreamingDataLoader

        class EpochStreamingLoader(StreamingDataLoader):
            """litdata's loader with its epoch taken from the trainer at each epoch's start. Why: litdata counts
            epochs itself and clears its restored state only when an epoch runs out, which Lightning's fetcher
            does not always let it see after a resume, so the epoch after a mid-epoch resume repeated the
            previous epoch's order."""

            def __init__(self, *args, position, **kwargs):
                super().__init__(*args, **kwargs)
                self.position = position

            def __iter__(self):
                epoch, done = self.position() if self.position else (None, None)
                if done == 0:  # an epoch's first batch: a fresh epoch (litdata numbers it epoch + 1)
                    self.restore, self.current_epoch = False, epoch
                return super().__iter__()

        self.setup()
        self.check_batch_size()
        position = self._position if self.trainer is not None else None  # outside a Trainer: litdata's own count
        return EpochStreamingLoader(self.train_set, batch_size=self.batch_size, num_workers=self.num_workers,
                                    drop_last=True, position=position)  # fmt: skip

    def val_dataloader(self):
        from litdata import StreamingDataLoader

        self.setup()
        if self.val_set is None:
            return []
        return StreamingDataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)

    def stream(self, split: str) -> ImageStream:
        if self.meta["counts"].get(split, 0) < 1:
            have = ", ".join(k for k, v in self.meta["counts"].items() if v)
            raise ValueError(f"{self.path} has no {split} split (prepared: {have}): choose another")
        shape = (self.channels, self.image_size, self.image_size)
        return ImageStream(self._split(split), self.meta["counts"][split], shape, self.cache_dir,
                           self.hashes.get(split))  # fmt: skip

    def real_images(self, split: str = "train"):
        """The training split as an ImageStream (never held whole: FIDEvaluator streams it, `[:n]` reads n
        images); the validation and test splits as uint8 tensors."""
        stream = self.stream(split)
        return stream if split == "train" else stream.tensor()
