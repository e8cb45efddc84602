"""Shared fixtures: the analytic model for the math tests, Hydra composition and a tiny checkpoint for the runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from diffusion_lab.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
# under pytest-xdist (make test: -n 2) the workers share the cores: one thread each on 2 cores, and so do the
# processes a test starts (train.py / evaluate.py subprocesses read OMP_NUM_THREADS)
THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
torch.set_num_threads(THREADS)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
keep_freed_memory()  # in-process runs with the malloc settings train.py's own process has (diffusion_lab.cli.run)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small tensors: faster, and ~10x faster than two on a loaded machine).
    A module of such tests says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gaussian_eps():
    """(diffusion, mu, s) -> the exact eps model of data N(mu, s^2) per pixel (diffusion_lab.diffusion.analytic)."""
    from diffusion_lab.diffusion import GaussianData

    return lambda diffusion, mu=0.1, s=0.5: GaussianData(mu, s).model(diffusion, "eps")


def compose_train(overrides: list[str], tmp_path: Path, config_name: str = "train") -> DictConfig:
    """Compose conf/<config_name>.yaml like `python <config_name>.py <overrides>`, writing into tmp_path."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.data_dir = str(ROOT / "data")
        cfg.paths.cache_dir = str(ROOT / ".cache")
    return cfg



def evaluate_fid(ckpt, sampler: list[str], out: Path, inception_path: str) -> dict[str, float]:
    """evaluate.py in this process on `ckpt` with one sampler (12 samples against the first 32 validation digits, as
    the FID callback's DDP tests score): {row name: FID}."""
    import csv

    from diffusion_lab.tasks import evaluate

    evaluate(compose_train([f"ckpt_path={ckpt}", "grid=null", *sampler, "num_samples=12", "fid.reference_split=val",
                            "fid.num_reference=32", "classifier_score=false", "bpd_num_images=0",
                            f"fid.inception_weights={inception_path}"], out, "evaluate"))  # fmt: skip
    return {r["sampler"]: float(r["fid"]) for r in csv.DictReader(open(out / "results.csv"))}


def fid_metrics(run_dir: Path) -> dict[str, float]:
    """The FID callback's scores in a run's CSV log: {"val/fid/<row>": FID} (the last value of each)."""
    import csv

    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/fid/") and v}


FAST = [
    "trainer.max_epochs=1",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.check_val_every_n_epoch=1",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "net.base_channels=16",
    "callbacks.sample_grid.num_samples=4",
    "sampler.steps=5",
]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of a 30-step digits run on a 100-step process (for sample/evaluate tests)."""
    from diffusion_lab.tasks import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(compose_train([*FAST, "trainer.max_steps=30", "diffusion.steps=100", "logger=none"], out))
    return out / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def inception_path() -> str:
    """The FID Inception weights, resolved once per session into the repository's .cache (converted from the
    offline TorchScript the first time, with its feature check): the runs that keep their own paths.cache_dir pass
    them as callbacks.fid.inception_weights / fid.inception_weights instead of converting them again each."""
    from diffusion_lab.eval.inception import resolve_inception_weights

    path, _ = resolve_inception_weights(None, ROOT / ".cache")
    return "null" if path is None else path
