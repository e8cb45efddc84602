"""Two CPU processes (gloo) through the real `python train.py trainer=ddp`: the loss-aware sampler stays
identical on both ranks, and one Hydra run directory holds one set of outputs."""

import os
import subprocess
import sys

import torch
from conftest import FAST, ROOT

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def run_train(args: list[str], run_dir, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "WANDB_MODE": "offline"}
    r = subprocess.run([sys.executable, "train.py", *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_loss_aware_sampler_identical_across_ranks(tmp_path):
    run_train(["experiment=iddpm_cosine", *FAST, *DDP, "trainer.max_steps=6", "diffusion.steps=20",
               "timesteps.history_per_term=2", "data.batch_size=16",
               "+callbacks.dump._target_=helpers.DumpSamplerState", f"+callbacks.dump.dirpath={tmp_path / 'states'}"],
              tmp_path / "run")
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
