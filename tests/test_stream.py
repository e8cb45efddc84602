"""Streaming data (issue 35): litdata chunks written by `python -m diffusion_lab.data.prepare`, trained from with
`data=stream`. The prepared digits set holds the in-memory set's images bit for bit; an epoch visits each image
once, split between ranks; a stop mid-epoch resumes exactly; memory does not grow with the set; bad input is one
line."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, ROOT, compose_train
from PIL import Image

pytest.importorskip("litdata")

from diffusion_lab.data import (  # noqa: E402
    DigitsDataModule,
    FolderDataModule,
    ImageDataModule,
    ImageStream,
    StreamDataModule,
)
from diffusion_lab.data.prepare import prepare  # noqa: E402
from diffusion_lab.tasks import train  # noqa: E402


@pytest.fixture(scope="module")
def digits_stream(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "digits"
    prepare(DigitsDataModule(), out, chunk_bytes="64KB")  # several chunks, so the shuffle crosses chunks
    return out


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory):
    """201 training digits in 3 chunks: 12 batches of 16 per epoch, so a short run crosses epochs."""
    out = tmp_path_factory.mktemp("stream") / "small"
    prepare(DigitsDataModule(val_fraction=0.888), out, chunk_bytes="8KB")
    return out


def _raw(path):
    from diffusion_lab.data.stream import _streaming_dataset

    ds = _streaming_dataset()(str(path), shuffle=False, raw=True)
    return [ds[i] for i in range(len(ds))]


def test_prepare_writes_every_image_and_label_of_each_split(digits_stream):
    dm = DigitsDataModule()
    dm.setup()
    meta = json.loads((digits_stream / "meta.json").read_text())
    assert meta["counts"] == {"train": 1617, "val": 180} and (meta["image_size"], meta["channels"]) == (8, 1)
    for split, held in (("train", dm.train_set), ("val", dm.val_set)):
        items = _raw(digits_stream / split)
        assert [i for _, _, i in items] == list(range(len(held)))
        assert torch.equal(torch.stack([x for x, _, _ in items]), held.images)
        assert [y for _, y, _ in items] == held.labels.tolist()
    assert len(list((digits_stream / "train").glob("chunk-*.bin"))) > 1


def _epoch_indices(path, seed, epoch, drop_last=True):
    """Indices this process (one rank under torch.distributed) sees in one epoch (the loader as training builds it,
    which drops each rank's last partial batch)."""
    from litdata import StreamingDataLoader

    from diffusion_lab.data.stream import _streaming_dataset

    ds = _streaming_dataset()(str(path), shuffle=True, drop_last=drop_last, seed=seed, raw=True)
    loader = StreamingDataLoader(ds, batch_size=32, drop_last=drop_last)
    for _ in range(epoch):  # the loader counts its epochs itself
        for _ in loader:
            pass
    return [int(i) for _, _, idx in loader for i in idx]


def test_an_epoch_visits_each_image_at_most_once_in_an_order_set_by_seed_and_epoch(digits_stream):
    """The streamed order is litdata's (chunks, then a window within them), not the in-memory EpochSampler's
    permutation, so the two runs cannot see the same order; what they share is the set of images per epoch."""
    first = _epoch_indices(digits_stream / "train", seed=42, epoch=0)
    assert len(first) == len(set(first)) and len(first) >= 1617 - 2 * 64 - 32  # drop_last per chunk boundary
    assert first == _epoch_indices(digits_stream / "train", seed=42, epoch=0)
    assert first != _epoch_indices(digits_stream / "train", seed=42, epoch=1)
    assert first != _epoch_indices(digits_stream / "train", seed=7, epoch=0)
    assert first != sorted(first)


def _rank_worker(rank, path, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.save(_epoch_indices(path, seed=42, epoch=0, drop_last=False), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_each_see_their_own_share_and_nothing_twice(digits_stream, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(str(digits_stream / "train"), port, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert sorted(a + b) == list(range(1617))  # every index exactly once in the epoch, none on both ranks
    assert abs(len(a) - len(b)) <= 64 and a != sorted(a)


STREAM = ["net=unet_digits", "data.batch_size=16", "trainer.max_epochs=100", "logger=none",
          "callbacks.sample_grid.every_n_epochs=100", "trainer.check_val_every_n_epoch=100"]  # fmt: skip


def test_a_stop_mid_epoch_resumes_exactly(small_stream, tmp_path):
    """12 batches per epoch: stopped at step 4, resumed to 15 (into the next epoch), the weights, EMA and optimizer
    moments equal the uninterrupted run's bit for bit; the loader's position came back from the checkpoint."""
    fast = [o for o in FAST if not o.startswith(("trainer.max_steps", "trainer.max_epochs", "trainer.check_val"))]
    common = [*fast, "data=stream", f"data.path={small_stream}", *STREAM]
    train(compose_train([*common, "trainer.max_steps=15"], tmp_path / "full"))
    train(compose_train([*common, "trainer.max_steps=4"], tmp_path / "part"))
    ckpt = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # the StreamingDataLoader's state
    train(compose_train([*common, "trainer.max_steps=15", "ckpt_path=last"], tmp_path / "part"))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("full", "part"))
    assert a["global_step"] == b["global_step"] == 15
    for key in ("state_dict", "current_model_state"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[n], sb[n]) for n in sa)


def test_a_resume_that_skipped_the_loader_state_would_differ(small_stream, tmp_path):
    """The resume test discriminates: the same stop, resumed from a checkpoint without the loader's state, restarts
    the epoch's order and ends elsewhere."""
    fast = [o for o in FAST if not o.startswith(("trainer.max_steps", "trainer.max_epochs", "trainer.check_val"))]
    common = [*fast, "data=stream", f"data.path={small_stream}", *STREAM]
    train(compose_train([*common, "trainer.max_steps=6"], tmp_path / "full"))
    train(compose_train([*common, "trainer.max_steps=3"], tmp_path / "part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["loops"]["fit_loop"]["state_dict"].pop("combined_loader")
    torch.save(ckpt, last)
    train(compose_train([*common, "trainer.max_steps=6", "ckpt_path=last"], tmp_path / "part"))
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True) for r in ("full", "part"))
    assert not all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def _cli(args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "offline"})  # fmt: skip


def _one_line(r, *words):
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), r.stderr[-2000:]


def test_a_missing_set_or_a_truncated_chunk_is_one_line_and_exit_2(digits_stream, tmp_path):
    r = _cli(["train.py", "data=stream", f"data.path={tmp_path / 'nothing'}", "net=unet_digits",
              f"hydra.run.dir={tmp_path / 'run1'}"])  # fmt: skip
    _one_line(r, "data.path=", "nothing", "has no meta.json", "diffusion_lab.data.prepare")
    broken = tmp_path / "broken"
    shutil.copytree(digits_stream, broken)
    chunk = sorted((broken / "train").glob("chunk-*.bin"))[1]
    chunk.write_bytes(chunk.read_bytes()[:100])
    r = _cli(["train.py", "data=stream", f"data.path={broken}", "net=unet_digits",
              f"hydra.run.dir={tmp_path / 'run2'}"])
    _one_line(r, str(chunk), "100 bytes", "truncated")
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_prepare_names_a_corrupt_image_and_honours_skip_corrupt(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((12, 12, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "3.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*3\.png.*data\.skip_corrupt=true"):
        prepare(FolderDataModule(str(folder), image_size=8, val_fraction=0.2), tmp_path / "out1")
    assert not (tmp_path / "out1" / "meta.json").exists()  # an interrupted set is never taken for a prepared one
    meta = prepare(FolderDataModule(str(folder), image_size=8, val_fraction=0.2, skip_corrupt=True), tmp_path / "out2")
    assert meta["counts"]["train"] + meta["counts"]["val"] == 4
    r = _cli(["-m", "diffusion_lab.data.prepare", "data=folder", f"data.path={folder}", f"out={tmp_path / 'out3'}",
              f"hydra.run.dir={tmp_path / 'prep'}"])  # fmt: skip
    _one_line(r, "cannot read image", "3.png")
    r = _cli(["-m", "diffusion_lab.data.prepare", f"out={tmp_path / 'out2'}", f"hydra.run.dir={tmp_path / 'prep2'}"])
    _one_line(r, "out=", "is not empty")  # a prepared set is never overwritten


def test_fid_reference_features_of_a_stream_equal_the_tensors_and_are_cached(tmp_path):
    from diffusion_lab.eval.fid import FIDEvaluator
    from diffusion_lab.eval.inception import inception_weights

    images = torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8)

    class Few(ImageDataModule):  # any DataModule: 16 training images of 3x16x16
        def load_images(self):
            return images, torch.zeros(20, dtype=torch.long)

    out = tmp_path / "few"
    prepare(Few(image_size=16, channels=3, val_fraction=0.2), out)
    dm = StreamDataModule(str(out))
    stream = dm.real_images("train")
    assert isinstance(stream, ImageStream) and stream.shape == (16, 3, 16, 16)
    ev = FIDEvaluator(inception_weights(None, ROOT / ".cache", allow_download=False), tmp_path / "cache")
    streamed = ev.reference_features("few-train", stream)
    assert torch.allclose(streamed, ev.features(stream.tensor()), atol=1e-5)
    assert len(list((tmp_path / "cache" / "fid_ref").glob("few-train-*.pt"))) == 1
    assert torch.equal(ev.reference_features("few-train", stream), streamed)  # from the cache


# VmHWM, not ru_maxrss: the latter carries over the forking parent's (pytest's) peak across exec.
RSS_WORKER = """
import sys, torch
from diffusion_lab.data import StreamDataModule
dm = StreamDataModule(sys.argv[1], batch_size=64)
n = sum(x.shape[0] for x, _ in dm.train_dataloader())
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(n, int(status["VmHWM"].split()[0]) // 1024)
"""


def test_a_ten_times_larger_set_does_not_raise_the_peak_memory(tmp_path):
    """One epoch streamed from 2,000 and from 20,000 images of 3x32x32 (6 and 59 MiB of pixels): the process's peak
    RSS grows by less than the loader's cache (a few 1 MiB chunks), not by the 53 MiB an in-memory set would add."""
    gen = torch.Generator().manual_seed(0)

    class Synthetic(ImageDataModule):
        def __init__(self, n):
            super().__init__(image_size=32, channels=3, val_fraction=0.0)
            self.n = n

        def load_images(self):
            return torch.randint(0, 256, (self.n, 3, 32, 32), dtype=torch.uint8, generator=gen), torch.zeros(
                self.n, dtype=torch.long
            )

    peaks = {}
    for n in (2000, 20000):
        prepare(Synthetic(n), tmp_path / str(n), chunk_bytes="1MB")
        r = _cli(["-c", RSS_WORKER, str(tmp_path / str(n))])
        assert r.returncode == 0, r.stderr[-2000:]
        seen, peaks[n] = map(int, r.stdout.split()[-2:])
        assert seen == n // 64 * 64 or seen >= n - 64 * 20  # every full batch of each chunk
    assert peaks[20000] - peaks[2000] < 20, peaks  # MiB


@pytest.mark.parametrize("attack", ["pickle_format", "path_in_chunk_name", "compressed"])
def test_a_hostile_index_is_refused_before_litdata_reads_it(small_stream, tmp_path, attack):
    """A prepared set is untrusted input (a checkpoint may name one): litdata would unpickle items whose index says
    `pickle`, and write or read a chunk named `../x` outside its directory. Both are refused, naming the file."""
    hostile = tmp_path / "hostile"
    shutil.copytree(small_stream, hostile)
    index = hostile / "train" / "index.json"
    data = json.loads(index.read_text())
    if attack == "pickle_format":
        data["config"]["data_format"] = ["pickle", "int", "int"]
    elif attack == "compressed":
        data["config"]["compression"] = "zstd"
    else:
        data["chunks"][0]["filename"] = "../../victim.bin"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"index\.json .*refused unread"):
        StreamDataModule(str(hostile))


def test_two_sets_of_the_same_shape_never_share_cached_fid_features(small_stream, tmp_path):
    """Re-preparing the same images (or preparing another dataset of the same shape and count) gives another
    fingerprint: prepare draws an id for each set, part of the FID cache key."""
    again = tmp_path / "again"
    prepare(DigitsDataModule(val_fraction=0.888), again, chunk_bytes="8KB")
    a, b = (StreamDataModule(str(p)).real_images("train") for p in (small_stream, again))
    chunks = [json.loads((p / "train" / "index.json").read_text())["chunks"] for p in (small_stream, again)]
    assert chunks[0] == chunks[1]  # the same chunks (litdata's index differs only by its timestamp)
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize("where", ["header", "pixels"])
def test_a_chunk_with_one_changed_byte_is_refused_by_name(small_stream, tmp_path, where):
    """Issue 45: prepare records each chunk's sha256 in meta.json; one flipped byte of the same-size chunk, in
    litdata's header or in the image bytes, is refused naming the chunk before any batch is read (it used to train
    on silently, or end in a bare KeyError)."""
    StreamDataModule(str(small_stream))  # the intact set constructs
    damaged = tmp_path / "damaged"
    shutil.copytree(small_stream, damaged)
    chunk = sorted((damaged / "train").glob("chunk-*.bin"))[0]
    data = bytearray(chunk.read_bytes())
    at = 2 if where == "header" else len(data) - 10  # the item offsets first; the last image's pixels at the end
    data[at] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"chunk {re.escape(str(chunk))} does not match the sha256"):
        StreamDataModule(str(damaged))


@pytest.mark.parametrize("where,workers", [("header", 0), ("pixels", 1)])
def test_a_remote_chunk_is_checked_after_its_download(small_stream, tmp_path, where, workers):
    """Issue 45: a remote set's chunks (here litdata's `local:` prefix, which copies each chunk into its cache as an
    s3:// download does) are checked against prepare's sha256 when first read after the download, in the loader's
    worker too: a damaged stored copy, or a cached copy damaged later, is refused naming it (one line through the
    CLI's formatter) and removed from the cache, so the run after a repair fetches it again; the FID reference pass
    over the split is checked the same way. The intact set trains every batch."""
    from diffusion_lab.cli import one_line

    remote = tmp_path / "remote"
    shutil.copytree(small_stream, remote)
    batches = 201 // 16 * 16

    def module(cache):
        dm = StreamDataModule(f"local:{remote}", batch_size=16, num_workers=workers, cache_dir=str(tmp_path / cache))
        dm.setup()
        return dm

    def flip(chunk):
        data = bytearray(chunk.read_bytes())
        data[2 if where == "header" else len(data) - 10] ^= 0xFF
        chunk.write_bytes(bytes(data))

    def refused(dm, named):
        with pytest.raises(ValueError) as caught:
            list(dm.train_dataloader())
        line = one_line(caught.value)
        assert re.fullmatch(rf"chunk {re.escape(named)} does not match the sha256 .* after its download \(removed "
                            r"from the cache, .*chunk-0-1\.bin\); run again .*", line), line  # fmt: skip

    assert sum(x.shape[0] for x, _ in module("cache0").train_dataloader()) == batches
    (cached,) = (tmp_path / "cache0").rglob("chunk-0-1.bin")
    flip(cached)  # a copy damaged in the cache after its download: checked before its first read
    refused(module("cache0"), f"local:{remote}/train/chunk-0-1.bin")
    assert not cached.exists()
    chunk = remote / "train" / "chunk-0-1.bin"
    intact = chunk.read_bytes()
    flip(chunk)  # the stored copy: damaged in every download
    refused(module("cache1"), f"local:{chunk}")
    assert not list((tmp_path / "cache1").rglob("chunk-0-1.bin"))
    with pytest.raises(ValueError, match="chunk-0-1.bin does not match the sha256"):
        module("cache2").real_images("train").tensor()
    chunk.write_bytes(intact)  # repaired: the next run fetches it again
    assert sum(x.shape[0] for x, _ in module("cache1").train_dataloader()) == batches


def test_a_local_cached_set_checks_sizes_up_front_and_other_urls_are_refused(small_stream, tmp_path):
    """`local:<dir>` is a directory here too: a truncated chunk is named before any read (litdata would wait two
    minutes for it); a URL litdata cannot stream from is refused in one line naming data.path."""
    broken = tmp_path / "broken"
    shutil.copytree(small_stream, broken)
    chunk = broken / "train" / "chunk-0-2.bin"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"chunk {re.escape(str(chunk))} is 100 bytes"):
        StreamDataModule(f"local:{broken}")
    with pytest.raises(ValueError, match=r"data.path='file:///x': litdata streams from a directory or from s3://"):
        StreamDataModule("file:///x")


def test_a_hash_list_naming_other_files_is_refused_and_an_old_set_warns(small_stream, tmp_path, caplog):
    """The hash list is data: one that names a file outside the set is refused unread; a set prepared before the
    hashes is read with a one-line warning."""
    hostile = tmp_path / "hostile"
    shutil.copytree(small_stream, hostile)
    meta = json.loads((hostile / "meta.json").read_text())
    hashes = meta["chunk_sha256"]["train"]
    hashes["../../victim.bin"] = hashes.pop(sorted(hashes)[0])
    (hostile / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="chunk_sha256 for train does not list that split's chunks.*refused unread"):
        StreamDataModule(str(hostile))
    del meta["chunk_sha256"]
    (hostile / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="diffusion_lab.data.stream"):
        StreamDataModule(str(hostile))
    assert [r.getMessage() for r in caplog.records if "before chunk hashes" in r.getMessage()]
