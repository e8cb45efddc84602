"""Every experiment preset composes and runs a few steps on the CPU (full-scale presets shrunk), and a
2x2 multirun of the real train.py makes 4 run directories with the right values."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import FAST, ROOT, compose_train

from diffusion_lab.checkpoint import load_module
from diffusion_lab.tasks import train

# The MNIST-family CPU presets run in test_mnist.py (with the skip for absent Fashion-MNIST files).
OWN_TESTS = {"mnist_cpu", "mnist_cpu_cfg", "fashion_mnist_cpu"}
ALL_EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e not in OWN_TESTS]
SHRINK = {  # GPU presets on CPU-sized data and nets
    "ddpm_cifar10": ["data=digits", "net=unet_digits", "trainer=cpu"],
    "iddpm_cifar10": [
        "data=digits",
        "net=unet_digits",
        "trainer=cpu",
        "diffusion.steps=100",
        "net.attention_resolutions=[4]",
        "net.num_heads=1",
    ],
}


TINY_FID = [
    "callbacks.fid.num_samples=4",
    "callbacks.fid.reference_split=val",
    "callbacks.fid.samplers=[{_target_: diffusion_lab.diffusion.Sampler, method: ddim, steps: 2}]",
]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs(tmp_path, name):
    with_fid = "with_fid" in (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
    overrides = [f"experiment={name}", *SHRINK.get(name, []), *FAST, "logger=none", *(TINY_FID if with_fid else [])]
    cfg = compose_train(overrides, tmp_path)
    metrics = train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and math.isfinite(metrics["train/loss_step"])
    # the preset's choices reached the model rebuilt from its checkpoint (e.g. iddpm_cosine: learned range)
    preset = yaml.safe_load((ROOT / "conf" / "experiment" / f"{name}.yaml").read_text())
    process = load_module(tmp_path / "checkpoints" / "last.ckpt").diffusion
    for key in ("mean_type", "var_type", "loss_type", "loss_weighting", "zero_terminal_snr"):
        if key in (preset.get("diffusion") or {}):
            assert getattr(process, key) == preset["diffusion"][key], key
    if with_fid:
        assert metrics["val/fid/ddim2_eta0"] > 0 and 0 <= metrics["val/precision/ddim2_eta0"] <= 1


def test_multirun_2x2_makes_four_runs(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            *FAST,
            "diffusion.schedule=linear,cosine",
            "sampler.steps=5,10",
            "logger=csv",
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted(p for p in Path(tmp_path).iterdir() if p.is_dir() and p.name.isdigit())
    assert len(runs) == 4
    seen = set()
    for run in runs:
        cfg = yaml.safe_load(open(run / ".hydra" / "config.yaml"))
        seen.add((cfg["diffusion"]["schedule"], cfg["sampler"]["steps"]))
        assert (run / "checkpoints" / "last.ckpt").exists() and (run / "csv" / "metrics.csv").exists()
    assert seen == {("linear", 5), ("linear", 10), ("cosine", 5), ("cosine", 10)}


# _base.yaml: shared keys; run.yaml: a checkpoint's own sampler, for sample.py / evaluate.py only (train.py refuses it)
SAMPLERS = sorted(p.stem for p in (ROOT / "conf" / "sampler").glob("[!_]*.yaml") if p.stem != "run")


def test_every_sampler_choice_composes_with_every_preset(tmp_path):
    """A preset that wants another sampler picks it as a group choice (override /sampler: ...), never by setting
    one method's option (sampler.eta): that option would be merged into whatever sampler=... a user picks and
    refused by methods without it (`experiment=mnist_cpu sampler=dpmpp_2m` once failed so). The sampler files hold
    no interpolation, so a preset whose `sampler=ddpm` node equals the default config's composes as the default
    does with every choice; the others (and the default) are composed with each choice, which must win."""
    from hydra.utils import instantiate

    assert not any(re.search(r"\$\{", p.read_text()) for p in (ROOT / "conf" / "sampler").glob("*.yaml"))
    probe = lambda name, sampler: compose_train([*([f"experiment={name}"] if name else []),  # noqa: E731
                                                 f"sampler={sampler}"], tmp_path).sampler  # fmt: skip
    alone = {sampler: probe(None, sampler) for sampler in SAMPLERS}  # each choice as the default config composes it
    own = {sampler: node.method for sampler, node in alone.items()}
    assert own["ddim_eta1"] == "ddim" and len(set(own.values())) > 8
    setters = [e for e in ALL_EXPERIMENTS if probe(e, "ddpm") != alone["ddpm"]]
    assert 0 < len(setters) < len(ALL_EXPERIMENTS)  # today: ect_mnist_cpu, edm_mnist_cpu, zero_snr_v
    for name in [None, *setters]:
        for sampler in SAMPLERS:
            node = alone[sampler] if name is None else probe(name, sampler)
            assert node.method == own[sampler] and instantiate(node).method.name == own[sampler], (name, sampler)
