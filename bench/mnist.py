"""MNIST on 2 CPU cores: the net-size ablation behind experiment=mnist_cpu, the recipe's cost and quality, and
DDIM's Table 1 re-checked on MNIST (issue 15).

    python bench/mnist.py --stage throughput   # images/s of candidate nets (each in its own process)
    python bench/mnist.py --stage ablation     # each candidate trained for the same wall-clock budget, scored
    python bench/mnist.py --stage recipe       # experiment=mnist_cpu end to end: minutes, loss, FID, classifier
    python bench/mnist.py --stage table        # DDIM eta {0,1} x S {10,20,50,100} and DDPM-1000, N=1,000
    python bench/mnist.py --stage ema          # the recipe's EMA horizon: other averages of the same run, N=1,000
    python bench/mnist.py --stage guidance     # experiment=mnist_cpu_cfg: DDIM-50 at guidance scales 1, 1.5, 2, 3
    python bench/mnist.py --stage table --cond --num-samples 300   # Table 1 on that class-conditional model
    python bench/mnist.py                      # all stages, then the BENCHMARKS.md section
    python bench/mnist.py --stage table --num-samples 300   # fewer samples per row (scored rows are cached)
    python bench/mnist.py --data fashion_mnist              # recipe and table for experiment=fashion_mnist_cpu

FID is torch-fidelity's Inception through diffusion_lab.eval.fid against the 10,000 MNIST test images; the
floor is the FID of 2,000 real training images against the same reference. The classifier score is
exp(E KL(p(y|x) || p(y))) of diffusion_lab.eval.classifier's CNN (10 is the maximum) and the share of samples
it classifies with confidence >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from harness.common import ROOT, RUNS, classifier_note, machine, machine_line, peak_rss_mib, run_worker, summary
from harness.mnist import (
    DATASETS,
    EPS_OBJECTIVE,
    GUIDANCE_EXPERIMENT,
    NETS,
    Dataset,
    compose,
    cond_run,
    load_stages,
    mnist_setup,
    recipe_checkpoint,
    save_stage,
    train_run,
)


def worker_throughput(net: str, batch: int, warmup: int, steps: int, precision: str | None = None) -> dict:
    """Our full training step (train.yaml's callbacks: EMA, non-finite guard) on MNIST-shaped images; `precision`
    e.g. "bf16-mixed" (CPU autocast) as trainer.precision."""
    from hydra.utils import instantiate

    from diffusion_lab.checkpoint import build_module
    from diffusion_lab.data import ImageDataModule

    cfg = compose(["experiment=mnist_cpu", "logger=none", f"data.batch_size={batch}", *NETS[net], *EPS_OBJECTIVE]
                  + ([f"+trainer.precision={precision}"] if precision else []))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch * (warmup + steps), 1, 28, 28), generator=g, dtype=torch.uint8)

    class Images(ImageDataModule):
        def load_images(self):
            return images, torch.full((images.shape[0],), -1)

    dm = Images(image_size=28, channels=1, val_fraction=0.0, batch_size=batch)
    L.seed_everything(0)
    module = build_module(cfg)
    stamps = []

    class Timer(L.Callback):
        def on_train_batch_end(self, *args):
            stamps.append(time.perf_counter())

    callbacks = [instantiate(cfg.callbacks.nonfinite_guard), instantiate(cfg.callbacks.ema), Timer()]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=False,
        max_steps=warmup + steps,
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=dm)
    sec = (stamps[-1] - stamps[warmup - 1]) / steps
    params = sum(p.numel() for p in module.net.parameters())
    return {"images_per_s": batch / sec, "step_seconds": sec, "params": params, "peak_rss_mib": peak_rss_mib()}


def stage_throughput(repeats: int = 3) -> dict:
    """Images/s per (net, batch): `repeats` interleaved rounds, each side in its own process; medians."""
    cases = [(n, 128) for n in NETS] + [("c32b1", 64), ("c32b1", 256)]
    runs: dict[str, list] = {f"{n}@{b}": [] for n, b in cases}
    info = {}
    for r in range(repeats):
        for n, b in cases:
            out = run_worker("mnist.py", "throughput", n, str(b))
            runs[f"{n}@{b}"].append(out["images_per_s"])
            info[f"{n}@{b}"] = out
            summary("mnist", f"round {r}: {n} batch {b}: {out['images_per_s']:.1f} images/s")
    table = {
        k: {
            "images_per_s": statistics.median(v),
            "spread": (min(v), max(v)),
            "params": info[k]["params"],
            "peak_rss_mib": info[k]["peak_rss_mib"],
        }
        for k, v in runs.items()
    }
    save_stage("throughput", {"machine": machine(), "repeats": repeats, "table": table})
    return table


# The ablation: each candidate trained for the same wall-clock budget from the same seed, then scored alike.
CANDIDATES = {
    "c32b1_bs128": ["net.base_channels=32", "net.num_res_blocks=1", "data.batch_size=128"],
    "c32b1_bs64": ["net.base_channels=32", "net.num_res_blocks=1", "data.batch_size=64"],
    "c32b2_bs128": ["net.base_channels=32", "net.num_res_blocks=2", "data.batch_size=128"],
    "c48b1_bs128": ["net.base_channels=48", "net.num_res_blocks=1", "data.batch_size=128"],
    # second round, on the best of the first: the two levers left for an undertrained regime
    "c32b1_bs64_nodrop": ["net.base_channels=32", "net.num_res_blocks=1", "data.batch_size=64", "net.dropout=0.0"],
    "c32b1_bs64_nodrop_lr2e-3": [
        "net.base_channels=32", "net.num_res_blocks=1", "data.batch_size=64", "net.dropout=0.0", "optim.lr=2e-3",
    ],
}  # fmt: skip


def evaluate_run(ckpt: Path, name: str, extra: list[str]) -> list[dict]:
    """`python evaluate.py ckpt_path=<ckpt> fid.reference_split=test <extra>`; its results.csv rows."""
    import csv

    out = RUNS / "mnist" / "eval" / name
    if not (out / "results.csv").exists():
        cmd = [sys.executable, "evaluate.py", f"ckpt_path={ckpt}", "fid.reference_split=test", "bpd_num_images=0",
               f"hydra.run.dir={out}", *extra]
        subprocess.run(cmd, cwd=ROOT, check=True)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in r.items():
            try:
                r[k] = float(v)
            except (TypeError, ValueError):
                pass
    return rows


def final_loss(run: Path) -> float:
    """Mean train loss over the last 100 logged steps of a run's metrics.csv."""
    import csv

    with open(run / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss_step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    return sum(losses[-100:]) / len(losses[-100:])


def stage_ablation(minutes: int) -> dict:
    """Each candidate trained for `minutes` of wall clock (trainer.max_time), then FID (N=1,000 DDIM-50 vs the
    10,000 test images) and the classifier score of the EMA weights. Eps prediction, as the recipe was when the
    net was chosen (EPS_OBJECTIVE), so that a re-run reproduces the recorded table."""
    table = {}
    for name, overrides in CANDIDATES.items():
        limit = [f"+trainer.max_time='00:00:{minutes:02d}:00'", "trainer.max_steps=-1", "trainer.max_epochs=-1"]
        ckpt, seconds = train_run(f"ablation_{minutes}min_{name}", [*overrides, *limit, *EPS_OBJECTIVE])
        step = torch.load(ckpt, weights_only=True)["global_step"]
        r = evaluate_run(ckpt, f"ablation_{minutes}min_{name}", ["grid=null", "sampler=ddim", "sampler.steps=50"])[0]
        table[name] = {"overrides": overrides, "train_seconds": seconds, "steps": step, "fid": r["fid"],
                       "cls_score": r["cls_score"], "confident": r["confident"], "precision": r["precision"],
                       "recall": r["recall"], "final_loss": final_loss(ckpt.parents[1])}
        summary("mnist", f"ablation {name}: {step} steps in {minutes} min, FID {r['fid']:.2f}, "
                         f"classifier {r['cls_score']:.2f} ({r['confident']:.3f} confident)")
    from diffusion_lab.eval.classifier import EPOCHS

    save_stage("ablation", {"machine": machine(), "minutes": minutes, "table": table, "classifier_epochs": EPOCHS})
    return table


N_RECIPE, N_TABLE = 2000, 1000  # samples per scored row, as the issue asks (--num-samples overrides both)
PAPER_CIFAR10 = {0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16}, 1.0: {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78},
                 "ddpm": 3.17}  # DDIM Table 1 (CIFAR-10) and DDPM's own FID: shared/REFERENCE.md


def objective(module, steps: int) -> str:
    """What a recipe checkpoint was trained for, in words: 'v prediction, 2,400 steps' (', cosine lr decay' when its
    learning rate was annealed by lr_scheduler=warmup_cosine)."""
    sched = (module.run_config.get("lr_scheduler") or {}).get("_target_", "")
    decay = ", cosine lr decay" if sched.endswith(".OneCycleLR") else ""
    return f"{module.diffusion.mean_type} prediction, {steps:,} steps{decay}"


def grid_sampler(module) -> str:
    """The sampler that drew a run's sample grids (its config's `sampler`), in words: 'DDIM eta=1, 50 steps'."""
    from diffusion_lab.config import build

    s = build(module.run_config["sampler"], "sampler")
    return f"{s.label}, {s.steps} steps"


def stage_recipe(ds: Dataset, n: int = N_RECIPE) -> dict:
    """Train the dataset's preset; FID / precision / recall / classifier score of N DDIM-50 samples against the
    test set, beside the floor: the same scores of N real training images."""
    import shutil

    from harness.common import RESULTS, scored_rows

    from diffusion_lab.checkpoint import load_module
    from diffusion_lab.diffusion import Sampler
    from diffusion_lab.eval.classifier import score_images

    ckpt, seconds = train_run(ds.run, [], ds.experiment)
    module = load_module(ckpt)
    ev, ref, classifier, info, dm = mnist_setup(ds)
    rows = scored_rows(module, [Sampler("ddim", 50), Sampler("ddim", 50, eta=1.0)], n, ev, ref, ds.test_set,
                       RUNS / "rows" / f"mnist-{ds.run}.json", classifier=classifier)
    real = dm.load_images()[0][:n]
    floor = {**ev.score(real, ref), **score_images(classifier, real)}
    shutil.copyfile(ckpt.parents[1] / "samples" / "final.png", RESULTS / ds.samples_png)
    c = torch.load(ckpt, weights_only=True)
    data = {"machine": machine(), "n": n, "train_seconds": seconds, "steps": c["global_step"],
            "objective": objective(module, c["global_step"]), "grid_sampler": grid_sampler(module),
            "epochs": c["epoch"], "final_loss": final_loss(ckpt.parents[1]), "ddim50": rows[0], "ddim50_eta1": rows[1],
            "floor": floor,
            "classifier_test_accuracy": info["test_accuracy"], "classifier_epochs": info["epochs"], "ckpt": str(ckpt)}
    save_stage(f"{ds.stage}recipe", data)
    summary("mnist", f"{ds.title} recipe: {seconds / 60:.1f} min, floor FID {floor['fid']:.2f}; " + "; ".join(
        f"eta {e}: FID {r['fid']:.2f}, classifier {r['cls_score']:.2f}, {r['confident']:.3f} confident"
        for e, r in recipe_samples(data)))
    return data


# The EMA stage: averages of one recipe run's raw weights, tracked beside the preset's EMA in the same run. Each is
# d_n = min(decay, (1 + n) / (k + n)) after optimizer step n (k=None: decay alone): with decay 1 the average weights
# step i by about i^(k-2) (k=2: the plain mean of every step), so its horizon at step n is ~(k + n) / (k - 1) steps.
# The preset's callbacks.ema (decay 0.999, warmup) is k=10: 0.9972 at step 3,200 (~360 steps), below the cap.
EMA_VARIANTS = {  # id: (k, decay, label)
    "k3": (3, 1.0, "warmup k=3 (longer: weights ~ step i, ~1,600 steps at 3,200)"),
    "k40": (40, 1.0, "warmup k=40 (shorter: ~80 steps at 3,200)"),
    "c0999": (None, 0.999, "constant 0.999, no warmup (~1,000 steps; 4% of the initial weights left at 3,200)"),
}


class ShadowEMAs(L.Callback):
    """Lightning callback (bench only) that keeps the EMA_VARIANTS averages of the raw weights, updated after every
    optimizer step like diffusion_lab.lit.EMA but never swapped in or checkpointed; at train end it writes
    {variant: state_dict} to <dirpath>/shadow_emas.pt. Hydra instantiates it as mnist.ShadowEMAs (train.py run with
    bench/ on PYTHONPATH)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.avg: dict[str, dict[str, torch.Tensor]] = {}

    def on_fit_start(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()}
        self.avg = {name: {k: v.clone() for k, v in state.items()} for name in EMA_VARIANTS}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n, raw = trainer.global_step, pl_module.state_dict()
        for name, (k, decay, _) in EMA_VARIANTS.items():
            d = min(decay, (1 + n) / (k + n)) if k else decay
            for key, a in self.avg[name].items():
                a.lerp_(raw[key], 1.0 - d)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(self.avg, self.dirpath / "shadow_emas.pt")


def stage_ema(ds: Dataset, n: int = N_TABLE) -> dict:
    """The recipe trained once more with ShadowEMAs beside its own EMA (the same seed, so the same raw weights as
    the recipe run when the run is deterministic); DDIM-50 scores of each average and of the raw weights."""
    import os

    from harness.common import scored_rows

    from diffusion_lab.checkpoint import load_module
    from diffusion_lab.diffusion import Sampler

    overrides = ["+callbacks.shadow_emas._target_=mnist.ShadowEMAs",
                 "+callbacks.shadow_emas.dirpath=${paths.output_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    ckpt, seconds = train_run("recipe_ema", overrides, ds.experiment, env=env)
    ev, ref, classifier, info, _ = mnist_setup(ds)
    c = torch.load(ckpt, weights_only=True)
    recipe = torch.load(recipe_checkpoint(ds), weights_only=True)
    same = all(torch.equal(v, recipe["state_dict"][k]) for k, v in c["state_dict"].items())
    shadows = torch.load(ckpt.parents[1] / "shadow_emas.pt", weights_only=True)
    variants = {"preset: warmup k=10, decay 0.999 (~360 steps at 3,200)": load_module(ckpt),
                "raw weights (no average)": load_module(ckpt, ema=False)}
    for key, (_, _, label) in EMA_VARIANTS.items():
        module = load_module(ckpt)
        module.load_state_dict(shadows[key], strict=False)  # floating-point entries: every weight of the net
        variants[label] = module
    rows = {}
    for i, (name, module) in enumerate(variants.items()):
        cache = RUNS / "rows" / f"mnist-recipe_ema-{i}.json"
        rows[name] = scored_rows(module, [Sampler("ddim", 50)], n, ev, ref, ds.test_set, cache,
                                 classifier=classifier)[0]
    data = {"machine": machine(), "n": n, "train_seconds": seconds, "steps": c["global_step"], "rows": rows,
            "same_weights_as_recipe": same, "classifier_epochs": info["epochs"], "ckpt": str(ckpt)}
    save_stage("ema", data)
    best = min(rows, key=lambda k: rows[k]["fid"])
    summary("mnist", f"EMA stage: best FID {rows[best]['fid']:.2f} ({best})")
    return data


def ema_section(st: dict) -> str:
    e = st["ema"]
    lines = "\n".join(score_row(name, r) for name, r in e["rows"].items())
    same = ("bit for bit the recipe run's" if e["same_weights_as_recipe"]
            else "NOT the recipe run's (the run is not deterministic here)")
    return f"""### The EMA horizon (`python bench/mnist.py --stage ema{n_flag(e['n'], N_TABLE)}`)

Machine: {machine_line(e['machine'])}. The recipe trained once more ({e['train_seconds'] / 60:.1f} min,
{e['steps']} steps) with extra averages of the same raw weights kept beside the preset's EMA (bench/mnist.py's
ShadowEMAs; the preset's EMA weights of this run are {same}); d_n = min(decay, (1 + n) / (k + n)) after step n,
a horizon of ~(k + n) / (k - 1) steps at step n.
N={e['n']:,} DDIM-50 samples each, the same x_T, against the 10,000 MNIST test images.

| average of the raw weights | FID | precision | recall | classifier score | confident (>= 0.9) |
|---|---|---|---|---|---|
{lines}
"""


# The guidance stage: experiment=mnist_cpu_cfg, the recipe with class labels (net.num_classes) and 10% of them
# replaced by the null label while training (classifier-free guidance, Ho & Salimans 2022), sampled with uniform
# random labels at scales s (s = 1: the conditional model alone, one forward per step; s > 1: guided, a batch of
# 2B per step).
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)
# (s, eta) of the per-class grids in BENCHMARKS.md
GUIDANCE_GRIDS = ((1.0, 0.0), (1.5, 0.0), (2.0, 0.0), (1.0, 1.0), (1.5, 1.0))
# DDIM's eta = 1 (fresh noise each step, NFE unchanged) at the scales around the best eta = 0 FID: the MNIST Table 1
# found eta = 1 ahead at every S on this recipe, so the guided rows are scored on both.
GUIDANCE_ETA1_SCALES = (1.5, 1.0, 2.0)


def stage_guidance(ds: Dataset, n: int = N_RECIPE) -> dict:
    """The class-conditional recipe (GUIDANCE_EXPERIMENT); DDIM-50 scores at each of GUIDANCE_SCALES and a grid
    (a row per class, the same x_T) at each (scale, eta) of GUIDANCE_GRIDS."""
    from harness.common import RESULTS, scored_rows

    from diffusion_lab.checkpoint import load_module
    from diffusion_lab.diffusion import Sampler
    from diffusion_lab.images import save_grid

    ckpt, seconds = cond_run(ds)
    module = load_module(ckpt)
    ev, ref, classifier, info, _ = mnist_setup(ds)
    samplers = [Sampler("ddim", 50, eta=eta, guidance_scale=None if s == 1.0 else s)
                for eta, scales in ((0.0, GUIDANCE_SCALES), (1.0, GUIDANCE_ETA1_SCALES)) for s in scales]
    rows = scored_rows(module, samplers, n, ev, ref, ds.test_set, RUNS / "rows" / f"mnist-{ds.run}_cond.json",
                       classifier=classifier)
    y = torch.arange(module.net.num_classes).repeat_interleave(8)
    for s, eta in GUIDANCE_GRIDS:
        images = module.sample(len(y), Sampler("ddim", 50, eta=eta, guidance_scale=s), y=y, seed=0)
        save_grid(images, RESULTS / guidance_png(s, eta), nrow=8)
    c = torch.load(ckpt, weights_only=True)
    data = {"machine": machine(), "n": n, "train_seconds": seconds, "steps": c["global_step"],
            "final_loss": final_loss(ckpt.parents[1]),
            "rows": dict(zip(map(str, GUIDANCE_SCALES), rows[:len(GUIDANCE_SCALES)])),
            "rows_eta1": dict(zip(map(str, GUIDANCE_ETA1_SCALES), rows[len(GUIDANCE_SCALES):])),
            "classifier_epochs": info["epochs"], "ckpt": str(ckpt)}
    save_stage("guidance", data)
    summary("mnist", "guidance: " + "; ".join(
        f"s={s}: FID {r['fid']:.2f}, classifier {r['cls_score']:.2f}, {r['confident']:.3f} confident"
        for s, r in data["rows"].items()))
    return data


def guidance_png(s: float, eta: float) -> str:
    """File name of a per-class grid under bench/results (eta 0's keep their names from before eta 1 was drawn)."""
    return f"mnist_guidance_s{s:g}" + (f"_eta{eta:g}" if eta else "") + ".png"


def guidance_section(st: dict) -> str:
    g, r = st["guidance"], st["recipe"]
    floor = r["floor"]
    lines = [score_row(f"unconditional recipe (above), eta {eta}, N={r['n']:,}", d) for eta, d in recipe_samples(r)]
    targets = []
    scored = [(s, 0.0, row) for s, row in g["rows"].items()]
    scored += sorted(((s, 1.0, row) for s, row in g.get("rows_eta1", {}).items()), key=lambda x: float(x[0]))
    for s, eta, row in scored:
        what = "conditional, no guidance" if float(s) == 1.0 else "guided: the net on a batch of 2B"
        lines.append(score_row(f"eta {eta:g}, s = {float(s):g} ({what}), N={g['n']:,}", row))
        targets.append(f"eta {eta:g}, s = {float(s):g}: {targets_text(row, floor)}")
    cmd = f"python bench/mnist.py --stage guidance{n_flag(g['n'], N_RECIPE)}"
    grids = " ".join(f"![eta {eta:g}, s = {s:g}](bench/results/{guidance_png(s, eta)})" for s, eta in GUIDANCE_GRIDS)
    return f"""### Class-conditional, with classifier-free guidance (`{cmd}`)

Machine: {machine_line(g['machine'])}. `python train.py experiment={GUIDANCE_EXPERIMENT}`: the recipe
value for value, with class labels (`net.num_classes=10`) of which 10% are replaced by the null label in training
(`label_dropout=0.1`; Ho & Salimans 2022); {g['train_seconds'] / 60:.1f} min, {g['steps']} steps, final train loss
{g['final_loss']:.4f}. N={g['n']:,} DDIM-50 samples of the EMA weights, on DDIM's deterministic path (eta 0) and with
fresh noise at each of the 50 steps (eta 1, the same NFE), with uniform random labels (the test set's
classes hold 8.9-11.4% each) against the 10,000 MNIST test images; guided, the net's prediction is
u + s (c - u) of its unconditional (u) and conditional (c) outputs (v here; eq. 6 of the paper, which writes eps).
The unconditional recipe's row is the recipe section's (its own x_T and run, possibly another machine).

| | FID | precision | recall | classifier score | confident (>= 0.9) |
|---|---|---|---|---|---|
{chr(10).join(lines)}
{score_row("real training images (floor)", floor)}

A row per class, the same x_T; {', '.join(f'eta {eta:g} at s = {s:g}' for s, eta in GUIDANCE_GRIDS)}:

{grids}

The issue's targets per sampler: {'; '.join(targets)}.
"""

# DDIM's stride starts S=10 at t=900 and S=20 at t=950, where the recipe's cosine schedule keeps sqrt(alpha_bar) =
# 0.154 / 0.076 of the image (the paper's linear schedule: 0.016 / 0.010), so x_T ~ N(0, I) is off the marginal
# there; the same S on steps that start at T-1 ("trailing", Lin et al. 2024) separates that from the model's error.
TRAILING_STEPS = (10, 20)


def stage_table(ds: Dataset, n: int = N_TABLE, cond: bool = False) -> dict:
    """DDIM's Table 1 on the recipe model: eta {0, 1} x S {10, 20, 50, 100} and DDPM-1000, same x_T, N each.
    cond: on the class-conditional model of GUIDANCE_EXPERIMENT instead (s = 1), kept as the "table_cond" stage."""
    from harness.common import scored_rows

    from diffusion_lab.checkpoint import load_module
    from diffusion_lab.diffusion import Sampler

    ckpt = cond_run(ds)[0] if cond else recipe_checkpoint(ds)
    module = load_module(ckpt)
    ev, ref, classifier, info, _ = mnist_setup(ds)
    ddpm = Sampler("ddpm", module.diffusion.num_timesteps)
    samplers = [Sampler("ddim", s, eta=e) for e in (0.0, 1.0) for s in (10, 20, 50, 100)]
    samplers.append(ddpm)
    samplers += [Sampler("ddim", s, eta=e, spacing="trailing") for e in (0.0, 1.0) for s in TRAILING_STEPS]
    cache = RUNS / "rows" / f"mnist-{ckpt.parent.parent.name}.json"  # shared with bench/solvers.py --data mnist
    rows = scored_rows(module, samplers, n, ev, ref, ds.test_set, cache, classifier=classifier,
                       roles={ddpm.name: "reference"})
    step = torch.load(ckpt, weights_only=True)["global_step"]
    data = {"machine": machine(), "n": n, "rows": rows, "ckpt": str(ckpt), "objective": objective(module, step),
            "classifier_epochs": info["epochs"]}
    if cond:
        data["label"] = (f"The class-conditional model of experiment={GUIDANCE_EXPERIMENT} ({data['objective']}), "
                         f"without guidance (s = 1, uniform random labels); {machine_line(data['machine'])}; "
                         f"`python bench/mnist.py --stage table --cond{n_flag(n, N_TABLE)}`")
    save_stage("table_cond" if cond else f"{ds.stage}table", data)
    return data


def n_flag(n: int, default: int) -> str:
    """The --num-samples flag that reproduces a stage run at N=n (empty at the stage's default)."""
    return "" if n == default else f" --num-samples {n}"


def cells(rows: list[dict], spacing: str = "ddim") -> dict:
    """{(method, eta or None, S): row} of the DDIM rows on `spacing` and the DDPM row(s)."""
    return {(r["method"], r["eta"] if r["method"] == "ddim" else None, r["steps"]): r for r in rows
            if r["method"] != "ddim" or r.get("spacing", "ddim") == spacing}


def table_targets(rows: list[dict], spacing: str = "ddim") -> list[str]:
    fid = {k: r["fid"] for k, r in cells(rows, spacing).items()}
    out = []
    for s in (10, 20):
        e0, e1 = fid.get(("ddim", 0.0, s)), fid.get(("ddim", 1.0, s))
        if e0 is not None and e1 is not None:
            gain = 1 - e0 / e1
            how = f"{100 * gain:.0f}% lower" if gain >= 0 else f"{100 * (e0 / e1 - 1):.0f}% higher"
            out.append(f"S={s}: eta 0 {e0:.2f} vs eta 1 {e1:.2f}, {how} (target >= 20% lower: "
                       f"{'met' if gain >= 0.2 else 'NOT met'})")
    d50, ddpm = fid.get(("ddim", 0.0, 50)), next((r["fid"] for r in rows if r["method"] == "ddpm"), None)
    if d50 is not None and ddpm is not None:
        out.append(f"DDIM-50 / DDPM-1000 = {d50:.2f} / {ddpm:.2f} = {d50 / ddpm:.3f} (target <= 1.15: "
                   f"{'met' if d50 / ddpm <= 1.15 else 'NOT met'})")
    return out


def targets_met(row: dict, floor: dict) -> tuple[bool, bool]:
    """Issue 15's quality targets for a scored row: (classifier score >= 9.0 with >= 95% confident, FID within 2x
    the floor's)."""
    return row["cls_score"] >= 9.0 and row["confident"] >= 0.95, row["fid"] <= 2 * floor["fid"]


def targets_text(row: dict, floor: dict) -> str:
    """targets_met in words, with the numbers: 'classifier score >= 9.0 and >= 95% confident met (9.57, 95.8%), FID
    within 2x the floor met (7.70 vs 2 x 4.93)'."""
    ok_cls, ok_fid = targets_met(row, floor)
    return (f"classifier score >= 9.0 and >= 95% confident {'met' if ok_cls else 'NOT met'} ({row['cls_score']:.2f}, "
            f"{pct(row['confident'])}), FID within 2x the floor {'met' if ok_fid else 'NOT met'} ({row['fid']:.2f} vs "
            f"2 x {floor['fid']:.2f})")


def pct(share: float) -> str:
    """A share as the percentage of score_row's 3-decimal column (0.8065 -> "80.6%", as the table shows 0.806)."""
    return f"{100 * round(share, 3):.1f}%"


def score_row(name: str, r: dict) -> str:
    return (f"| {name} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['cls_score']:.2f} | "
            f"{r['confident']:.3f} |")


# hand-archived stages, newest first
ARCHIVED_RECIPES = ["recipe_xeon", "recipe_ab_lr2e3", "recipe_ab_cosine_lr", "recipe_d0_at2400", "recipe_v2400",
                    "recipe_eps"]
ARCHIVED_TABLES = ["table_cond", "table_v3200_n300", "table_v2400", "table_eps"]  # newest first


def previous_recipe_rows(st: dict) -> str:
    """Earlier recipes and checkpoints (the ARCHIVED_RECIPES stages, copied by hand from an older "recipe" stage
    when the preset changed), one more row each of the recipe table."""
    out = ""
    for key in (k for k in ARCHIVED_RECIPES if k in st):
        p = st[key]
        cpu = re.sub(r"\((R|TM)\)|Processor", "", p["machine"]["cpu"]).strip()
        name = p.get("label") or (
            f"previous recipe: {p['objective']}, {p['train_seconds'] / 60:.1f} min ({cpu}), N={p['n']:,}"
        )
        samples = recipe_samples(p)
        for eta, d in samples:
            out += "\n" + score_row(name + (f", eta {eta}" if len(samples) > 1 else "") + classifier_note(p), d)
    return out


def table_lines(rows: list[dict], spacing: str = "ddim") -> list[str]:
    """DDIM's Table 1 layout (eta rows x S columns, DDPM-1000 last) with the paper's CIFAR-10 numbers beside."""
    fid = cells(rows, spacing)
    steps = [10, 20, 50, 100] if spacing == "ddim" else sorted({s for m, _, s in fid if m == "ddim"})
    lines = ["| eta \\ S | " + " | ".join(map(str, steps)) + " | 1000 (DDPM) |", "|---" * (len(steps) + 2) + "|"]
    ddpm = next((r for r in rows if r["method"] == "ddpm"), None)
    for eta in (0.0, 1.0):
        row = [f"{fid[('ddim', eta, s)]['fid']:.2f} ({PAPER_CIFAR10[eta][s]:g})" if ("ddim", eta, s) in fid
               else "—" for s in steps]
        last = f"{ddpm['fid']:.2f} ({PAPER_CIFAR10['ddpm']:g})" if (ddpm and eta == 1.0) else ""
        lines.append(f"| {eta:g} | " + " | ".join(row) + f" | {last} |")
    return lines


def write_section() -> str:
    """The BENCHMARKS.md section from the stages recorded so far (bench/results/mnist_stages.json)."""
    from harness.common import write_result

    st = load_stages()
    parts = ["## MNIST on 2 CPU cores (`bench/mnist.py`)\n"]
    if "throughput" in st:
        t = st["throughput"]
        parts.append(f"### Candidate nets: training images/s (`python bench/mnist.py --stage throughput`)\n\n"
                     f"Machine: {machine_line(t['machine'])}. Our full training step (EMA, non-finite guard), "
                     f"28x28, each case in its own process; median of {t['repeats']} interleaved rounds (range).\n")
        rows = ["| net (base channels, res blocks) @ batch | params | images/s | peak RSS |", "|---|---|---|---|"]
        for k, v in t["table"].items():
            rows.append(f"| {k} | {v['params'] / 1e6:.2f}M | {v['images_per_s']:.0f} ({v['spread'][0]:.0f}-"
                        f"{v['spread'][1]:.0f}) | {v['peak_rss_mib']:.0f} MiB |")
        parts.append("\n".join(rows) + "\n")
    if "ablation" in st:
        a = st["ablation"]
        parts.append(f"### Ablation: the same {a['minutes']} minutes of training each "
                     f"(`python bench/mnist.py --stage ablation --minutes {a['minutes']}`)\n\n"
                     f"Machine: {machine_line(a['machine'])}. `experiment=mnist_cpu {' '.join(EPS_OBJECTIVE)}` (the "
                     "objective of the recipe when the net was chosen) with the net/batch below, "
                     "stopped by `trainer.max_time`; FID of N=1,000 DDIM-50 samples (EMA weights) against the "
                     f"10,000 test images, and the classifier score{classifier_note(a)}.\n")
        rows = ["| candidate | steps | final loss | FID | precision | recall | classifier score | confident |",
                "|---|---|---|---|---|---|---|---|"]
        for k, v in a["table"].items():
            rows.append(f"| {k} | {v['steps']} | {v['final_loss']:.4f} | {v['fid']:.2f} | {v['precision']:.3f} | "
                        f"{v['recall']:.3f} | {v['cls_score']:.2f} | {v['confident']:.3f} |")
        parts.append("\n".join(rows) + "\n")
    for ds in DATASETS.values():
        if f"{ds.stage}recipe" in st:
            parts.append(recipe_section(ds, st))
        if ds.history and "ema" in st:
            parts.append(ema_section(st))
        if ds.history and "guidance" in st:
            parts.append(guidance_section(st))
        if f"{ds.stage}table" in st:
            parts.append(table_section(ds, st))
    text = "\n".join(parts)
    write_result("mnist", st, text)
    return text


def recipe_samples(r: dict) -> list[tuple[int, dict]]:
    """[(eta, scored row)] of a recipe stage: DDIM-50 on its deterministic path (eta 0) and, in runs of the stage
    since 2026-11-30, with fresh noise at every step (eta 1)."""
    return [(eta, r[key]) for eta, key in ((0, "ddim50"), (1, "ddim50_eta1")) if key in r]


def recipe_section(ds: Dataset, st: dict) -> str:
    """The recipe's cost and quality beside the floor; MNIST's also against the issue's targets."""
    r = st[f"{ds.stage}recipe"]
    f = r["floor"]
    samples = recipe_samples(r)
    ok_time = r["train_seconds"] <= 40 * 60
    cmd = f"python bench/mnist.py{ds.flag} --stage recipe{n_flag(r['n'], N_RECIPE)}"
    title = "The recipe" if ds.history else f"{ds.title}: the recipe"
    previous = previous_recipe_rows(st) if ds.history else ""
    if ds.history:
        targets = (f"Targets: training <= 40 min ({'met' if ok_time else 'NOT met'}: {r['train_seconds'] / 60:.1f}); "
                   + "; ".join(f"eta {eta}: {targets_text(d, f)}" for eta, d in samples) + ".")
        if "guidance" in st:
            targets += " The same recipe with class labels and guidance: the class-conditional section below."
    else:
        targets = "The issue's targets are MNIST's; here, for reference: " + "; ".join(
            f"eta {eta}: FID {d['fid'] / f['fid']:.2f}x the floor, classifier score {d['cls_score']:.2f}"
            for eta, d in samples) + f" against the real images' {f['cls_score']:.2f}."
    rows = "\n".join(score_row(f"DDIM-50 eta {eta} samples ({r.get('objective', 'eps prediction')})", d)
                     for eta, d in samples)
    return f"""### {title}: `python train.py experiment={ds.experiment}` (`{cmd}`)

Machine: {machine_line(r['machine'])}. Training process wall time {r['train_seconds'] / 60:.1f} min (start-up,
validation and sample grids included), {r['steps']} steps ({r['epochs']} full epochs), final train loss
{r['final_loss']:.4f} (mean of the last 100 logged steps; the MSE on what the net predicts, so losses of different
objectives do not compare). N={r['n']:,} DDIM-50 samples of the EMA weights against
{ds.test_set}; the floor is the same scores of {r['n']:,} real training images. Classifier: the small
CNN of `diffusion_lab.eval.classifier` trained on {ds.title} (test accuracy {r['classifier_test_accuracy']:.4f}).

| | FID | precision | recall | classifier score | confident (>= 0.9) |
|---|---|---|---|---|---|
{rows}
{score_row("real training images (floor)", f)}{previous}

The run's final grid, drawn by its preset's sampler ({r.get('grid_sampler', 'DDIM eta=0, 50 steps')}):

![samples](bench/results/{ds.samples_png})

{targets}
"""


def table_section(ds: Dataset, st: dict) -> str:
    """DDIM's Table 1 on the dataset's recipe model (and, for MNIST, the archived tables of earlier recipes)."""
    t = st[f"{ds.stage}table"]
    rows = t["rows"]
    prev = ""
    for key in (k for k in ARCHIVED_TABLES if k in st and ds.history):
        p = st[key]
        intro = p.get("label") or f"An earlier recipe ({p['objective']}; {machine_line(p['machine'])})"
        prev += (f"\n{intro}, N={p['n']}, the same x_T:\n\n{chr(10).join(table_lines(p['rows']))}\n\n"
                 f"Its targets: {'; '.join(table_targets(p['rows']))}.\n")
        if any(r.get("spacing") == "trailing" for r in p["rows"]):
            prev += (f"\nIts S=10/20 cells on trailing steps:\n\n{chr(10).join(table_lines(p['rows'], 'trailing'))}"
                     f"\n\nOn these steps: {'; '.join(table_targets(p['rows'], 'trailing'))}.\n")
    cmd = f"python bench/mnist.py{ds.flag} --stage table{n_flag(t['n'], N_TABLE)}"
    return f"""### DDIM's Table 1 on {ds.title} (`{cmd}`)

Machine: {machine_line(t['machine'])}. The recipe's model at the time ({t.get('objective', 'eps prediction')},
`{t['ckpt'].split('outputs/')[-1]}`); N={t['n']} per cell, the same x_T, against {ds.test_set};
DDIM's own stride ("ddim" spacing); DDPM-1000 with the trained fixed-small variance. In
parentheses: the paper's CIFAR-10 numbers (DDIM Table 1; DDPM's 3.17 for the last column).

{chr(10).join(table_lines(rows))}

Targets: {'; '.join(table_targets(rows))}.
{trailing_lines(rows)}{prev}"""


def trailing_lines(rows: list[dict]) -> str:
    """The S=10/20 cells again on steps that start at T-1 (TRAILING_STEPS), when the table has them."""
    if not any(r.get("spacing") == "trailing" for r in rows):
        return ""
    return f"""
The same cells with the S steps starting at t = T-1 ("trailing" spacing, Lin et al. 2024), the same x_T. DDIM's
stride starts S=10 at t=900 and S=20 at t=950, where the recipe's cosine schedule still keeps sqrt(alpha_bar) =
0.154 and 0.076 of the image (the paper's linear schedule: 0.016 and 0.010), so starting there from x_T ~ N(0, I)
is itself an error, one the paper's setting did not have:

{chr(10).join(table_lines(rows, "trailing"))}

On these steps: {'; '.join(table_targets(rows, "trailing"))}.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="all",
                    choices=["throughput", "ablation", "recipe", "table", "ema", "guidance", "report", "all"])
    ap.add_argument("--worker", nargs="*")
    ap.add_argument("--minutes", type=int, default=10, help="ablation: training minutes per candidate")
    ap.add_argument("--num-samples", type=int, help="recipe / table: samples per row (default 2,000 / 1,000)")
    ap.add_argument("--data", choices=list(DATASETS), default="mnist",
                    help="recipe / table: the dataset and its CPU preset (the net stages are MNIST's)")
    ap.add_argument("--cond", action="store_true",
                    help="table: on the class-conditional model of --stage guidance (experiment=mnist_cpu_cfg)")
    args = ap.parse_args()
    ds = DATASETS[args.data]
    if ds.key != "mnist" and args.stage in ("throughput", "ablation"):
        ap.error(f"--stage {args.stage} is MNIST's net choice; --data {ds.key} has the recipe and table stages")
    torch.set_num_threads(2)
    if args.worker:
        kind, *rest = args.worker
        if kind == "throughput":
            # --worker throughput <net> <batch> [<trainer.precision>]
            precision = rest[2] if len(rest) > 2 else None
            print(json.dumps(worker_throughput(rest[0], int(rest[1]), warmup=5, steps=20, precision=precision)))
        return
    print(machine_line(machine()))
    if args.stage == "throughput" or (args.stage == "all" and ds.key == "mnist"):
        for k, v in stage_throughput().items():
            print(f"{k}: {v['images_per_s']:.1f} images/s ({v['spread'][0]:.1f}-{v['spread'][1]:.1f}), "
                  f"{v['params'] / 1e6:.2f}M params, {v['peak_rss_mib']:.0f} MiB")
    if args.stage == "ablation" or (args.stage == "all" and ds.key == "mnist"):
        stage_ablation(args.minutes)
    if args.stage in ("recipe", "all"):
        stage_recipe(ds, args.num_samples or N_RECIPE)
    if args.stage in ("table", "all"):
        if args.cond and ds.key != "mnist":
            ap.error("--cond: the class-conditional model is MNIST's (experiment=mnist_cpu_cfg)")
        data = stage_table(ds, args.num_samples or N_TABLE, cond=args.cond)
        summary("mnist", "; ".join(table_targets(data["rows"])))
    if args.stage == "ema":  # not in "all": a second recipe run, for the EMA choice
        if ds.key != "mnist":
            ap.error("--stage ema runs on MNIST's recipe")
        stage_ema(ds, args.num_samples or N_TABLE)
    if args.stage == "guidance":  # not in "all": a second recipe run, class-conditional
        if ds.key != "mnist":
            ap.error("--stage guidance runs on MNIST (experiment=mnist_cpu_cfg)")
        stage_guidance(ds, args.num_samples or N_RECIPE)
    write_section()


if __name__ == "__main__":
    sys.exit(main())
