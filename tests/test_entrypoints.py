"""sample.py and evaluate.py from a checkpoint written by a short digits run."""

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_train
from PIL import Image

from diffusion_lab.tasks import evaluate, sample


@pytest.mark.parametrize("mode", ["grid", "inpaint", "interpolate", "progression"])
def test_sample_modes(tiny_ckpt, tmp_path, mode):
    cfg = compose_train(
        [f"ckpt_path={tiny_ckpt}", f"mode={mode}", "num_samples=16", "num_images=3", "points=4", "sampler.steps=5"],
        tmp_path,
        "sample",
    )
    path = sample(cfg)
    img = np.asarray(Image.open(path))
    assert path.name == f"{mode}.png" and img.ndim == 3 and img.shape[0] > 32
    if mode == "grid":
        arr = np.load(tmp_path / "samples.npz")["images"]
        assert arr.shape == (16, 8, 8, 1) and arr.dtype == np.uint8


def test_sample_cli_ddpm(tiny_ckpt, tmp_path):
    """The real entry point, as a user runs it."""
    r = subprocess.run(
        [
            sys.executable,
            "sample.py",
            f"ckpt_path={tiny_ckpt}",
            "sampler=ddpm",
            "num_samples=4",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "grid.png").exists()


def test_sample_rejects_bad_sampler(tiny_ckpt, tmp_path):
    cfg = compose_train([f"ckpt_path={tiny_ckpt}", "sampler.steps=500"], tmp_path, "sample")
    with pytest.raises(ValueError, match=r"sampler.steps=500 must be between 1 and diffusion.steps=100"):
        sample(cfg)


def test_evaluate_writes_table_plot_and_bpd(tiny_ckpt, tmp_path):
    args = [
        f"ckpt_path={tiny_ckpt}",
        "num_samples=24",
        "grid.ddim_steps=[5]",
        "grid.ddpm_steps=[100]",
        "bpd_num_images=4",
        "fid.reference_split=val",
        "fid.num_reference=48",
    ]
    result = evaluate(compose_train([*args, "batch_size=12"], tmp_path, "evaluate"))
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    # issue 45: the same command again (another batch size, the global RNG elsewhere) repeats every score of a row:
    # KID's subsets (24 of the 48 references) and precision/recall's subsample come from the evaluation seed
    torch.manual_seed(1234)
    evaluate(compose_train([*args, "batch_size=8", "bpd_num_images=0", "grid.ddpm_steps=[]"], tmp_path / "again",
                           "evaluate"))  # fmt: skip
    again = list(csv.DictReader(open(tmp_path / "again" / "results.csv")))
    timings = {"sample_seconds", "seconds_per_sample"}
    assert [{k: v for k, v in r.items() if k not in timings} for r in again] == [
        {k: v for k, v in r.items() if k not in timings} for r in rows[:1]
    ]
    assert [r["sampler"] for r in rows] == ["ddim5_eta0", "ddpm100"]
    assert [r["nfe"] for r in rows] == ["5", "100"] and [r["role"] for r in rows] == ["curve", "reference"]
    assert all(float(r["fid"]) > 0 and r["n"] == "24" and r["n_ref"] == "48" for r in rows)
    assert all(0 <= float(r["precision"]) <= 1 and 0 <= float(r["recall"]) <= 1 for r in rows)
    assert (tmp_path / "fid_vs_nfe.png").stat().st_size > 1000
    md = (tmp_path / "results.md").read_text()
    assert "| ddim5_eta0 | DDIM eta=0 | 5 |" in md and "Bits/dim on 4 held-out images" in md
    assert 0 < result["bpd"]["bpd"] < 20


def test_evaluate_cli_solver_grid(tiny_ckpt, tmp_path):
    """The solver grid from the command line: one row per (method, NFE) with its measured NFE, DDPM-T as the
    reference row, one FID-vs-NFE plot."""
    r = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            f"ckpt_path={tiny_ckpt}",
            "grid.methods=[ddim,heun]",
            "grid.nfe=[3,6]",
            "num_samples=8",
            "batch_size=8",
            "bpd_num_images=0",
            "fid.reference_split=val",
            "fid.num_reference=16",
            f"hydra.run.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    got = [(r["sampler"], r["nfe"], r["role"]) for r in rows]
    assert got == [
        ("ddim3_eta0", "3", "curve"),
        ("ddim6_eta0", "6", "curve"),
        ("heun2", "3", "curve"),
        ("heun3", "5", "curve"),
        ("ddpm100", "100", "reference"),
    ]
    assert (tmp_path / "fid_vs_nfe.png").stat().st_size > 1000


def test_sample_on_an_old_checkpoint_without_a_sampler_node_and_a_short_process(tmp_path, caplog):
    """Issue 45's corner: a checkpoint whose saved config predates the `sampler` node, on a process of T=20 < 50
    (DDIM's default steps), with diffusion.mean_type=edm on the discrete VP process: sample.py draws with the
    process's default method at all of its T steps, and the images are finite and in range."""
    from conftest import FAST

    from diffusion_lab.tasks import train

    run = tmp_path / "run"
    train(compose_train([*FAST, "trainer.max_steps=3", "diffusion.steps=20", "diffusion.mean_type=edm",
                         "logger=none"], run))  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["run_config"]["diffusion"]["mean_type"] == "edm"
    del state["run_config"]["sampler"]  # as written before the sampler node existed
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    with caplog.at_level("INFO", logger="diffusion_lab.tasks"):
        png = sample(compose_train([f"ckpt_path={old}", "num_samples=4"], tmp_path / "s", "sample"))
    assert "sampler: the run's own, method=ddim, steps=20," in caplog.text  # DDIM at all 20 steps, not its 50
    images = np.load(tmp_path / "s" / "samples.npz")["images"]
    assert png.exists() and images.shape[0] == 4 and images.dtype == np.uint8
