"""Streaming data (issue 35): the MNIST recipe's training step fed from litdata chunks against the in-memory set.

    python bench/stream.py              # prepares MNIST (and a 10x copy) once under outputs/bench/stream, ~8 min
    python bench/stream.py --repeats 1  # a quicker look
    python bench/stream.py --render     # the section again from bench/results/stream.json

Each measurement is a fresh process (`--worker`): experiment=mnist_cpu's module, EMA and Lightning loop, `steps`
timed training steps after `warmup`, images/s and the process's peak RSS (VmHWM). The modes alternate (memory,
stream, stream_cached, memory, ...) so drift on this noisy machine hits each; ratios are of medians. `stream`
reads the prepared set in place (its chunks' sha256 checked once, before training: timed on its own);
`stream_cached` reads it as a remote set (`data.path=local:<dir>`: litdata copies each chunk into a fresh cache, as
an s3:// download, and each copy's sha256 is checked on its first read, inside the timed steps). The 10x set is the
MNIST training set written ten times (590,000 images): its run shows whether memory grows with the set.
Target: streamed images/s >= 0.9x in-memory, with the hash checks.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time

import lightning as L
import torch
from harness.common import (
    RUNS,
    machine,
    machine_line,
    peak_rss_mib,
    run_worker,
    saved_result,
    summary,
    write_result,
)
from harness.mnist import compose

OUT = RUNS / "stream"
BATCH, WARMUP, STEPS = 64, 10, 40


def prepared(name: str, dm_factory) -> tuple[str, float]:
    """A prepared set under outputs/bench/stream/<name> (made once; its preparation seconds kept beside it)."""
    from diffusion_lab.data.prepare import prepare

    path, took = OUT / name, OUT / f"{name}.seconds"
    if not (path / "meta.json").exists():
        t0 = time.perf_counter()
        prepare(dm_factory(), path, chunk_bytes="64MB", num_workers=2)
        took.write_text(f"{time.perf_counter() - t0:.1f}")
    return str(path), float(took.read_text())


def mnist_dm():
    from hydra.utils import instantiate

    return instantiate(compose(["experiment=mnist_cpu"]).data)


def mnist_x10_dm():
    from diffusion_lab.data import ImageDataModule

    class TenTimes(ImageDataModule):
        """The MNIST training set written ten times (no val split)."""

        def __init__(self):
            super().__init__(image_size=28, channels=1, num_classes=10, val_fraction=0.0)

        def load_images(self):
            dm = mnist_dm()
            dm.setup()
            return dm.train_set.images.repeat(10, 1, 1, 1), dm.train_set.labels.repeat(10)

    return TenTimes()


class StepClock(L.Callback):
    def __init__(self):
        self.t = {}

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in (WARMUP, WARMUP + STEPS):
            self.t[trainer.global_step] = time.perf_counter()


def worker(mode: str, path: str) -> dict:
    import tempfile

    from hydra.utils import instantiate

    from diffusion_lab.checkpoint import build_module

    cache = tempfile.mkdtemp(prefix="stream_cache_", dir=OUT)  # empty: every chunk is downloaded
    stream = ["data=stream", f"data.path={path}", "net=unet_mnist", f"data.cache_dir={cache}"]
    if mode == "stream_cached":
        stream[1] = f"data.path=local:{path}"
    cfg = compose(["experiment=mnist_cpu", "logger=none", f"data.batch_size={BATCH}",
                   *(stream if mode != "memory" else [])])  # fmt: skip
    L.seed_everything(cfg.seed, workers=True)
    dm, module, clock = instantiate(cfg.data), build_module(cfg), StepClock()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=WARMUP + STEPS, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                        callbacks=[instantiate(cfg.callbacks.ema), clock], enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    seconds = clock.t[WARMUP + STEPS] - clock.t[WARMUP]
    shutil.rmtree(cache)
    return {"mode": mode, "images_per_s": STEPS * BATCH / seconds, "peak_rss_mib": peak_rss_mib()}


def hash_seconds(path: str, repeats: int = 3) -> float:
    """Median seconds of StreamDataModule's checks before training (index, sizes, every chunk's sha256)."""
    from diffusion_lab.data import StreamDataModule

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        StreamDataModule(path)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


MODES = ("memory", "stream", "stream_cached")


def run(repeats: int) -> dict:
    t0 = time.perf_counter()
    mnist, mnist_s = prepared("mnist", mnist_dm)
    x10, x10_s = prepared("mnist_x10", mnist_x10_dm)
    check = {"mnist": hash_seconds(mnist), "mnist_x10": hash_seconds(x10)}
    rows = []
    for _ in range(repeats):
        for mode in MODES:
            path = mnist if mode != "memory" else ""
            rows.append(run_worker("stream.py", mode, path))
            summary("stream", f"{rows[-1]['mode']}: {rows[-1]['images_per_s']:.0f} images/s, "
                              f"peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB")  # fmt: skip
    rows.append(run_worker("stream.py", "stream_x10", x10))
    disk = {n: sum(f.stat().st_size for f in (OUT / n).rglob("*") if f.is_file()) for n in ("mnist", "mnist_x10")}
    return {"machine": machine(), "rows": rows, "prepare_seconds": {"mnist": mnist_s, "mnist_x10": x10_s},
            "hash_check_seconds": check,
            "disk_bytes": disk, "batch": BATCH, "warmup": WARMUP, "steps": STEPS,
            "torch_threads": torch.get_num_threads(), "wall_seconds": time.perf_counter() - t0}  # fmt: skip


def verdict(res: dict) -> str:
    modes = [m for m in MODES if any(r["mode"] == m for r in res["rows"])]
    med = {m: statistics.median(r["images_per_s"] for r in res["rows"] if r["mode"] == m) for m in modes}
    ratios = {m: med[m] / med["memory"] for m in modes[1:]}
    said = ", ".join(f"{m} {v:.2f}x" for m, v in ratios.items())
    return f"in-memory images/s: {said} ({'met' if min(ratios.values()) >= 0.9 else 'not met'}: target >= 0.9x)"


def section(res: dict, cmd: str) -> str:
    names = {"memory": "in memory (`data=mnist`)", "stream": "streamed (`data=stream`, MNIST prepared)",
             "stream_cached": "streamed as a remote set (`data.path=local:<dir>`: copied into a cache, hashed)",
             "stream_x10": "streamed, the 10x set (590,000 images)"}  # fmt: skip
    lines = ["| data | images/s (each run) | median | peak RSS MiB (each run) |", "|---|---|---|---|"]
    for m in (*MODES, "stream_x10"):
        rs = [r for r in res["rows"] if r["mode"] == m]
        if not rs:
            continue
        speeds = ", ".join(f"{r['images_per_s']:.0f}" for r in rs)
        peaks = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in rs)
        median = statistics.median(r["images_per_s"] for r in rs)
        lines.append(f"| {names[m]} | {speeds} | {median:.0f} | {peaks} |")
    p, d = res["prepare_seconds"], res["disk_bytes"]
    c = res.get("hash_check_seconds")
    checked = (f"Checking a local set before training (index, sizes, every chunk's sha256; median of 3): MNIST "
               f"{c['mnist']:.2f} s, the 10x set {c['mnist_x10']:.2f} s. " if c else "")  # fmt: skip
    return f"""### Streaming data: the MNIST recipe's step from litdata chunks (`{cmd}`)

Machine: {machine_line(res['machine'])}. Each run is a fresh process: experiment=mnist_cpu's module with its EMA in
Lightning's loop, batch {res['batch']}, {res['steps']} steps timed after {res['warmup']}; runs alternate between the
modes. Preparing (`python -m diffusion_lab.data.prepare data=mnist out=...`, 2 litdata workers): MNIST (60,000 train,
val and test) {p['mnist']:.0f} s, {d['mnist'] / 2**20:.0f} MiB on disk; the 10x set {p['mnist_x10']:.0f} s,
{d['mnist_x10'] / 2**20:.0f} MiB. {checked}Wall time: {res['wall_seconds'] / 60:.1f} min.

{chr(10).join(lines)}

Target: {verdict(res)}.
"""


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--render", action="store_true")
    a = p.parse_args()
    if a.render:
        res = saved_result(p, "stream", "python bench/stream.py")
    else:
        res = run(a.repeats)
        res["command"] = "python bench/stream.py" + (f" --repeats {a.repeats}" if a.repeats != 3 else "")
    write_result("stream", res, section(res, res["command"]))
    summary("stream", verdict(res))


if __name__ == "__main__":
    main()
