"""Time to FID (issue 16): the MNIST CPU recipe's net and data trained with four objectives for the same wall clock.

    python bench/convergence.py               # baseline, min-SNR-5, P2 (k=1, gamma=1), v-prediction: 20 min each
    python bench/convergence.py --minutes 8 --checkpoints 4 --num-samples 300   # a shorter, cheaper run

Each run is `python train.py experiment=mnist_cpu <objective>` with the same seed, stopped by trainer.max_time,
with a checkpoint every budget/K minutes of training (K = --checkpoints, 5 by default; Lightning's
ModelCheckpoint(train_time_interval=...), measured from the start of training). Every checkpoint is scored
with FID (N=1,000 DDIM-50 samples of the EMA weights, the same x_T) against the 10,000 MNIST test images,
and the classifier score. Target: the best objective reaches the baseline's final FID in at most 0.7x the
baseline's training time (the min-SNR paper reports 3.4x faster convergence on ImageNet 256).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from harness.common import RESULTS, ROOT, RUNS, machine, machine_line, save_figure, scored_rows, summary, write_result  # noqa: E402
from harness.mnist import DATASETS, EPS_OBJECTIVE, check_same_recipe, mnist_setup  # noqa: E402

from diffusion_lab.checkpoint import load_module  # noqa: E402
from diffusion_lab.diffusion import Sampler  # noqa: E402

MNIST = DATASETS["mnist"]

OBJECTIVES = {
    "baseline": EPS_OBJECTIVE,  # eps prediction, L_simple (the recipe before it moved to v-prediction)
    "min_snr5": [*EPS_OBJECTIVE, "diffusion.loss_weighting=min_snr", "diffusion.snr_gamma=5.0"],
    "p2": [*EPS_OBJECTIVE, "diffusion.loss_weighting=p2", "diffusion.p2_k=1.0", "diffusion.p2_gamma=1.0"],
    "v_pred": ["diffusion.mean_type=v"],
}


def run_dir(name: str, minutes: int, k: int):
    """Where one objective's run of `minutes` with k timed checkpoints lives (reused when it trained today's recipe)."""
    return RUNS / "convergence" / f"{name}_{minutes}min_{k}ckpts"


def train(name: str, overrides: list[str], minutes: int, k: int) -> list[tuple[float, object]]:
    """(training minutes, checkpoint path) of one objective's k timed checkpoints."""
    run = run_dir(name, minutes, k)
    every = minutes / k
    overrides = [*overrides, "trainer.max_steps=-1", "trainer.max_epochs=-1"]
    if (run / "DONE").exists():
        # a run of an older preset is not today's recipe: stop, do not mix
        check_same_recipe(run, overrides, MNIST.experiment)
    else:
        cmd = [
            sys.executable, "train.py", f"experiment={MNIST.experiment}", *overrides, f"hydra.run.dir={run}",
            "logger=csv", "trainer.enable_progress_bar=false",
            f"+trainer.max_time='00:{minutes // 60:02d}:{minutes % 60:02d}:00'",
            "callbacks.sample_grid.every_n_epochs=1000",
            "+callbacks.timed._target_=lightning.pytorch.callbacks.ModelCheckpoint",
            f"+callbacks.timed.dirpath={run}/timed", "+callbacks.timed.save_top_k=-1",
            "+callbacks.timed.filename='step{step:07d}'", "+callbacks.timed.auto_insert_metric_name=false",
            f"+callbacks.timed.train_time_interval={{_target_: datetime.timedelta, minutes: {every}}}",
        ]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, check=True)
        (run / "DONE").write_text("done\n")
    # the timed callback saves at every, 2 every, ...; the budget's end is the run's own last.ckpt (the time limit
    # stops training before the timed callback sees its last interval)
    timed = sorted((run / "timed").glob("step*.ckpt"))[: k - 1]
    return [(every * (i + 1), p) for i, p in enumerate(timed)] + [(float(minutes), run / "checkpoints" / "last.ckpt")]


def run(minutes: int, n: int, k: int) -> dict:
    t0 = time.perf_counter()
    ev, ref, classifier, _, _ = mnist_setup(MNIST)
    curves = {}
    for name, overrides in OBJECTIVES.items():
        points = []
        for m, ckpt in train(name, overrides, minutes, k):
            module = load_module(ckpt)
            step = torch.load(ckpt, weights_only=True)["global_step"]
            cache = RUNS / "rows" / f"convergence-{name}-{minutes}min-{k}ckpts-{ckpt.stem}-step{step}.json"
            r = scored_rows(module, [Sampler("ddim", 50)], n, ev, ref, MNIST.test_set, cache, classifier=classifier)[0]
            points.append({"minutes": m, "step": step, **{k: r[k] for k in ("fid", "precision", "recall")},
                           "cls_score": r.get("cls_score"), "confident": r.get("confident")})
        curves[name] = points
        summary("convergence", f"{name}: " + ", ".join(f"{p['minutes']:g} min FID {p['fid']:.2f}" for p in points))
    return {"machine": machine(), "minutes": minutes, "n": n, "curves": curves,
            "wall_seconds": time.perf_counter() - t0,
            "trained_with": "; ".join(sorted({trained_with(run_dir(name, minutes, k)) for name in OBJECTIVES}))}


TRAINED_WITH = ["net.dropout", "optim.fused", "data.batch_size", "optim.lr", "callbacks.ema.decay"]


def trained_with(run) -> str:
    """The recipe settings the objectives share, as the run's saved config has them (a later preset may differ)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    return ", ".join(f"{key}={OmegaConf.select(cfg, key)}" for key in TRAINED_WITH)


def time_to(points: list[dict], fid: float, x: str = "minutes") -> float | None:
    """First training time (x="minutes") or optimizer step (x="step") at which FID <= fid, linearly interpolated
    in log FID between checkpoints."""
    prev = None
    for p in points:
        if p["fid"] <= fid:
            if prev is None:
                return p[x]
            a, b = math.log(prev["fid"]), math.log(p["fid"])
            w = (a - math.log(fid)) / (a - b) if a != b else 1.0
            return prev[x] + w * (p[x] - prev[x])
        prev = p
    return None


def targets(res: dict) -> list[str]:
    base = res["curves"]["baseline"]
    final, budget = base[-1]["fid"], base[-1]["minutes"]
    out = []
    best = None
    for name, pts in res["curves"].items():
        if name == "baseline":
            continue
        t = time_to(pts, final)
        out.append(f"{name}: " + (f"{t:.1f} min ({t / budget:.2f}x)" if t is not None else "not within the budget"))
        if t is not None and (best is None or t < best[1]):
            best = (name, t)
    verdict = (f"best {best[0]} at {best[1] / budget:.2f}x the baseline's {budget:g} min "
               f"(target <= 0.7x: {'met' if best[1] / budget <= 0.7 else 'NOT met'})") if best else \
        "no objective reached the baseline's final FID within the budget (target NOT met)"  # fmt: skip
    steps = base[-1]["step"]  # the same minutes buy different step counts when the machine's speed drifts
    at = {name: time_to(pts, final, "step") for name, pts in res["curves"].items() if name != "baseline"}
    per_step = [f"{name} " + (f"{n:.0f} ({n / steps:.2f}x)" if n is not None else "not reached")
                for name, n in at.items()]  # fmt: skip
    return [f"baseline final FID {final:.2f} at {budget:g} min", *out, verdict,
            f"per optimizer step (the baseline's final FID at its step {steps}): " + ", ".join(per_step)]


def section(res: dict, cmd: str, link: str) -> str:
    names = list(res["curves"])
    mins = [p["minutes"] for p in res["curves"]["baseline"]]
    lines = ["| objective \\ training minutes | " + " | ".join(f"{m:g}" for m in mins) + " |",
             "|---" * (len(mins) + 1) + "|"]
    for name in names:
        pts = {p["minutes"]: p for p in res["curves"][name]}
        cells = [f"{pts[m]['fid']:.2f} ({pts[m]['step']})" if m in pts else "—" for m in mins]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    trained = f" (the preset as the runs saved it: {res['trained_with']})" if "trained_with" in res else ""
    return f"""### Time to FID (`{cmd}`)

Machine: {machine_line(res['machine'])}. Each objective: `experiment=mnist_cpu` + its override, the same seed,
{res['minutes']} minutes of training{trained}; FID of N={res['n']} DDIM-50 samples (EMA weights, same x_T) against
{MNIST.test_set} at each timed checkpoint, the optimizer steps done by then in parentheses (the same wall clock
buys different step counts on a noisy machine: the right panel of the plot is per step). Wall time of this
benchmark: {res['wall_seconds'] / 60:.1f} min.

{chr(10).join(lines)}

![FID vs training minutes]({link})

{'; '.join(targets(res))}.
"""


def plot(res: dict, quick: bool) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), dpi=120, sharey=True)
    for name, pts in res["curves"].items():
        for ax, x in zip(axes, ("minutes", "step")):
            ax.plot([p[x] for p in pts], [p["fid"] for p in pts], marker="o", label=name)
    axes[0].set_xlabel("training minutes (2 CPU cores)")
    axes[1].set_xlabel("optimizer steps (batch 64)")
    axes[0].set_ylabel(f"FID (N={res['n']}, DDIM-50, vs MNIST test)")
    for ax in axes:
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Time to FID on MNIST: objectives at equal wall clock")
    fig.tight_layout()
    link = save_figure(fig, "convergence", quick)
    plt.close(fig)
    return link


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=int, default=20)
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--checkpoints", type=int, default=5, help="timed checkpoints per run (FID at each)")
    p.add_argument("--render", action="store_true", help="rewrite the section and plot from the saved results")
    a = p.parse_args()
    if a.render:
        res = json.loads((RESULTS / "convergence.json").read_text())
        cmd = res["command"]
    else:
        res = run(a.minutes, a.num_samples, a.checkpoints)
        res["command"] = cmd = "python bench/convergence.py" + "".join(
            f" --{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v != p.get_default(k)
        )
    write_result("convergence", res, section(res, cmd, plot(res, False)))
    summary("convergence", "; ".join(targets(res)))


if __name__ == "__main__":
    main()
