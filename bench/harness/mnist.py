"""The MNIST recipes the benchmarks share: datasets, training runs (reused when done, refused when the preset
changed since), the evaluation setup (test-set features, the classifier) and Hydra composition.

    from harness.mnist import DATASETS, recipe_checkpoint, mnist_setup
    ckpt = recipe_checkpoint(DATASETS["mnist"])              # trains experiment=mnist_cpu on first use
    evaluator, test_features, classifier, info, datamodule = mnist_setup(DATASETS["mnist"])
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .common import CACHE, ROOT, RUNS

GUIDANCE_EXPERIMENT = "mnist_cpu_cfg"  # the class-conditional recipe

# The net ablation (throughput and ablation stages) and the eps runs of bench/convergence.py predate the recipe's
# move to v-prediction: pinned, so that a re-run reproduces the recorded tables.
EPS_OBJECTIVE = ["diffusion.mean_type=eps"]

# Candidate nets at 28x28 (28 -> 14 -> 7, attention at 7x7 and in the middle), as net.* overrides.
NETS = {
    "c32b1": ["net.base_channels=32", "net.num_res_blocks=1"],
    "c32b2": ["net.base_channels=32", "net.num_res_blocks=2"],
    "c48b1": ["net.base_channels=48", "net.num_res_blocks=1"],
    "c64b1": ["net.base_channels=64", "net.num_res_blocks=1"],
    "c64b2": ["net.base_channels=64", "net.num_res_blocks=2"],
}
RESULTS_JSON = ROOT / "bench" / "results" / "mnist_stages.json"


@dataclass(frozen=True)
class Dataset:
    """What the recipe and table stages need to know of a dataset (`--data`)."""

    key: str  # its --data value
    title: str  # in headings: "MNIST"
    experiment: str  # its CPU preset
    run: str  # its recipe's run directory under outputs/bench/mnist (also names its rows cache)
    datamodule: str  # class in diffusion_lab.data
    stage: str  # prefix of its stage keys in mnist_stages.json ("" for MNIST, whose keys predate --data)
    history: bool = False  # its section carries the targets and the archived earlier recipes (MNIST)

    @property
    def test_set(self) -> str:
        return f"the 10,000 {self.title} test images"

    @property
    def flag(self) -> str:
        """The --data flag that selects it on a command line (empty for MNIST, the default)."""
        return "" if self.key == "mnist" else f" --data {self.key}"

    @property
    def samples_png(self) -> str:
        return f"{self.stage or 'mnist_'}recipe_samples.png"


DATASETS = {
    d.key: d
    for d in (
        Dataset("mnist", "MNIST", "mnist_cpu", "recipe", "MNISTDataModule", "", history=True),
        Dataset("fashion_mnist", "Fashion-MNIST", "fashion_mnist_cpu", "fashion_recipe", "FashionMNISTDataModule",
                "fashion_"),
    )
}


TEST_SET = "the 10,000 MNIST test images"  # the reference the MNIST benchmarks score against

def load_stages() -> dict:
    return json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}


def save_stage(name: str, data: dict) -> None:
    from diffusion_lab.io import atomic_write

    stages = load_stages()
    stages[name] = data
    with atomic_write(RESULTS_JSON) as tmp:
        tmp.write_text(json.dumps(stages, indent=1, default=float))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = hydra_compose("train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths = {
            "output_dir": str(RUNS / "mnist_throughput"),
            "cache_dir": str(CACHE),
            "data_dir": str(ROOT / "data"),
            "root_dir": str(ROOT),
        }
    return cfg


def train_run(
    name: str, overrides: list[str], experiment: str = "mnist_cpu", env: dict | None = None
) -> tuple[Path, float]:
    """`python train.py experiment=<experiment> <overrides>` into outputs/bench/mnist/<name> (reused when done);
    (last checkpoint, wall seconds of the training process)."""
    run_dir = RUNS / "mnist" / name
    ckpt, done = run_dir / "checkpoints" / "last.ckpt", run_dir / "DONE"
    if done.exists() and ckpt.exists():
        check_same_recipe(run_dir, overrides, experiment)
    else:
        cmd = [sys.executable, "train.py", f"experiment={experiment}", *overrides, f"hydra.run.dir={run_dir}",
               "logger=csv", "trainer.enable_progress_bar=false"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, check=True, env=env)
        done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    return ckpt, float(done.read_text())


def check_same_recipe(run_dir: Path, overrides: list[str], experiment: str) -> None:
    """A finished run is reused only if it trained what `experiment=<experiment> <overrides>` composes today (the
    preset may have changed since): otherwise stop with one line, leaving the old run for its owner to move."""
    from omegaconf import OmegaConf

    def leaves(cfg) -> dict:
        out = {}
        for key in RECIPE_KEYS:
            v = OmegaConf.select(cfg, key)
            if OmegaConf.is_dict(v):
                out |= {f"{key}.{k}": x for k, x in OmegaConf.to_container(v).items()}
            else:
                out[key] = OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        return out

    from diffusion_lab.checkpoint.resume import ADDED_KEYS

    now = leaves(compose([f"experiment={experiment}", *overrides]))
    # a run from before a key existed trained with the value that reproduces it (objective, net.time_inputs, ...)
    saved = {**{k: v for k, v in ADDED_KEYS.items() if k in now}, **leaves(OmegaConf.load(run_dir / ".hydra" /
                                                                                         "config.yaml"))}
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key) != now.get(key):
            sys.exit(f"error: {run_dir} was trained with {key}={saved.get(key)}, the preset now gives "
                     f"{now.get(key)}: move that run directory aside (or delete it) to retrain")


RECIPE_KEYS = ["diffusion", "net", "objective", "init_from", "optim", "lr_scheduler", "label_dropout",
               "data.batch_size", "data.image_size", "trainer.max_steps", "callbacks.ema.decay", "seed"]


def recipe_checkpoint(ds: Dataset) -> Path:
    """The dataset's recipe checkpoint (trained on first use; a run of an older preset is refused)."""
    return train_run(ds.run, [], ds.experiment)[0]


def cond_run(ds: Dataset) -> tuple[Path, float]:
    """The class-conditional recipe's run (GUIDANCE_EXPERIMENT, trained on first use): (checkpoint, seconds)."""
    return train_run(f"{ds.run}_cond", [], GUIDANCE_EXPERIMENT)


def mnist_setup(ds: Dataset):
    """(evaluator, test-set features, classifier, its info, the DataModule) of an MNIST-like dataset."""
    import diffusion_lab.data
    from diffusion_lab.eval.classifier import classifier_for

    from .common import fid_evaluator

    ev, dm = fid_evaluator(), getattr(diffusion_lab.data, ds.datamodule)(data_dir=str(ROOT / "data"), image_size=28)
    ref = ev.reference_features(f"{ds.datamodule}-test", dm.test_images()[0])
    classifier, info = classifier_for(dm, str(CACHE))
    return ev, ref, classifier, info, dm
