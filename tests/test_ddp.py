"""Two CPU processes (gloo) through the real `python train.py trainer=ddp`: the loss-aware sampler stays
identical on both ranks, and one Hydra run directory holds one set of outputs."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import FAST, ROOT, evaluate_fid, fid_metrics

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def run_train(args: list[str], run_dir, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "WANDB_MODE": "offline",
    }
    r = subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_loss_aware_sampler_identical_across_ranks(tmp_path):
    run_train(
        [
            "experiment=iddpm_cosine",
            *FAST,
            *DDP,
            "trainer.max_steps=6",
            "diffusion.steps=20",
            "timesteps.history_per_term=2",
            "data.batch_size=16",
            "+callbacks.dump._target_=helpers.DumpSamplerState",
            f"+callbacks.dump.dirpath={tmp_path / 'states'}",
        ],
        tmp_path / "run",
    )
    s0, s1 = (torch.load(tmp_path / "states" / f"rank{r}.pt") for r in (0, 1))
    # 6 steps x 2 ranks x 16 examples = 192 losses over 20 timesteps: warmed up, and equal on both ranks
    assert torch.equal(s0["counts"], torch.full((20,), 2))
    assert torch.equal(s0["history"], s1["history"]) and torch.equal(s0["counts"], s1["counts"])
    assert (s0["history"] > 0).all()
    # one run directory, one set of checkpoints and logs (rank 0)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / ".hydra" / "config.yaml").exists()
    assert list(tmp_path.rglob("*.ckpt")) == [run / "checkpoints" / "last.ckpt"]
    assert len(list(tmp_path.rglob("metrics.csv"))) == 1 and len(list(tmp_path.rglob("config.yaml"))) == 1
    assert not (ROOT / "outputs" / "train" / "runs" / run.name).exists()


def test_fid_callback_on_two_ranks_equals_evaluate_in_one_process_conditional(tmp_path, inception_path):
    """lr=0 keeps the weights; image i depends only on (seed, i) -- its label, x_T and every step's noise -- so the
    2-rank scores (each rank half the samples and half the reference, FID states reduced by torchmetrics, features
    and classifier inputs gathered, batches of 4) equal evaluate.py's in one process on the run's checkpoint (batches
    of 12), for a class-conditional net with stochastic samplers and guidance too."""
    samplers = "[{method: ddim, steps: 5, eta: 1.0, guidance_scale: 2.0}, {method: ddpm, steps: 10}]"
    rows = {"ddim5_eta1_cfg2": ["sampler=ddim", "sampler.steps=5", "+sampler.eta=1.0", "sampler.guidance_scale=2.0"],
            "ddpm10": ["sampler=ddpm", "sampler.steps=10"]}  # stochastic ones (Euler ancestral: the flow case below)
    common = [*FAST, "callbacks=with_fid", "net.num_classes=10", "label_dropout=0.1", "optim.lr=0",
              "trainer.max_steps=2", "diffusion.steps=50", "callbacks.fid.num_samples=12",
              "callbacks.fid.reference_split=val", "callbacks.fid.num_reference=32",
              f"callbacks.fid.samplers={samplers}", "callbacks.fid.batch_size=4",
              f"paths.cache_dir={tmp_path / 'cache'}", f"callbacks.fid.inception_weights={inception_path}"]  # fmt: skip
    _same_as_evaluate(tmp_path, [*common, *DDP], rows, inception_path)


def _same_as_evaluate(tmp_path, train_args, rows, inception_path):
    run_train(train_args, tmp_path / "ddp")
    ddp = fid_metrics(tmp_path / "ddp")
    assert sorted(ddp) == sorted(f"val/fid/{n}" for n in rows) and all(v > 0 for v in ddp.values())
    ckpt = tmp_path / "ddp" / "checkpoints" / "last.ckpt"
    for name, sampler in rows.items():
        one = evaluate_fid(ckpt, sampler, tmp_path / name, inception_path)
        assert one == {name: pytest.approx(ddp[f"val/fid/{name}"], rel=1e-4)}, name


def test_fid_callback_on_two_ranks_equals_evaluate_in_one_process_few_step(tmp_path, inception_path):
    """Issue 45: on flow trained by ECT (lr=0 keeps the weights), the FID callback's 2-rank scores equal
    evaluate.py's in one process on the run's checkpoint: the 2-step consistency sampler (its fresh noise at the
    intermediate level drawn per image) and Euler ancestral from flow's t = 1. DDIM eta 1 runs the same solver driver
    on every process (the conditional DDPM test above); Heun's churn noise is drawn per image as Euler ancestral's is
    (tests/test_seeding.py: no image depends on the batch size)."""
    samplers = "[{method: consistency, steps: 2}, {method: euler_ancestral, steps: 4}]"
    rows = {"consistency2": ["sampler=consistency", "sampler.steps=2"],
            "euler_ancestral4": ["sampler=euler_ancestral", "sampler.steps=4"]}  # fmt: skip
    common = [*FAST, "callbacks=with_fid", "diffusion=flow", "objective=ect", "optim.lr=0", "trainer.max_steps=2",
              "callbacks.fid.num_samples=12", "callbacks.fid.reference_split=val", "callbacks.fid.num_reference=32",
              f"callbacks.fid.samplers={samplers}", "callbacks.fid.batch_size=4",
              f"paths.cache_dir={tmp_path / 'cache'}", f"callbacks.fid.inception_weights={inception_path}"]  # fmt: skip
    _same_as_evaluate(tmp_path, [*common, *DDP], rows, inception_path)


# Stop and resume across 2 ranks: tests/test_cluster.py (two torchrun nodes of one rank each, the same DDP path).


def test_meanflow_step_syncs_gradients_across_ranks(tmp_path):
    """MeanFlow's JVP runs through the net inside DDP's forward: after one step each rank's gradient is the mean of
    both ranks' local gradients (each computed again on its own batch through the bare net), and the two ranks hold
    the same weights after it (a JVP that escaped DDP's reducer would leave each rank with its own)."""
    run_train(
        [
            *FAST,
            *DDP,
            "diffusion=flow",
            "objective=meanflow",
            "net.time_inputs=2",
            "trainer.max_steps=1",
            "data.batch_size=8",
            "+callbacks.record._target_=helpers.RecordGradients",
            f"+callbacks.record.dirpath={tmp_path / 'grads'}",
        ],
        tmp_path / "run",
    )
    r0, r1 = (torch.load(tmp_path / "grads" / f"grads{r}.pt") for r in (0, 1))
    for s0, s1, l0, l1 in zip(r0["synced"], r1["synced"], r0["local"], r1["local"]):
        torch.testing.assert_close(s0, (l0 + l1) / 2, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(s1, s0, rtol=0, atol=0)
    assert any((l0 - l1).abs().max() > 1e-4 for l0, l1 in zip(r0["local"], r1["local"]))  # the ranks' shares differ
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
