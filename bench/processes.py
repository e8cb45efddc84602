"""DDPM, EDM and flow matching on MNIST with the same net, data, seed and step budget (issue 34).

    python bench/processes.py                    # trains edm_mnist_cpu and flow_mnist_cpu once (~20 min each on 2
                                                 # cores; mnist_cpu's run is bench/mnist.py's recipe), then scores
    python bench/processes.py --num-samples 500 --screen-samples 200   # smaller, for a look
    python bench/processes.py --render           # the section and plot again from bench/results/processes.json

The three presets differ only in `diffusion=` (and each one's default sampler): experiment=mnist_cpu (DDPM,
v-prediction, cosine, T=1000), experiment=edm_mnist_cpu (Karras et al. 2022 Table 1) and
experiment=flow_mnist_cpu (rectified flow, t ~ U(0, 1)); same unet_mnist, Adam 1e-3, batch 64, EMA, 3,200 steps.

1. Screen: every candidate sampler that runs on the process (SAMPLERS; the ones a process refuses are listed) at
   NFE 10 and 20, N=--screen-samples; the best deterministic and the best stochastic one by mean FID over the two.
2. Score: those two per process at NFE 10, 20 and 50, N=--num-samples against the 10,000 MNIST test images: FID,
   precision/recall, the classifier score. Image i starts from the same seed (0, i) in every row.
Target: a new process beats the DDPM recipe at NFE <= 20 with a deterministic sampler (each process with its own
best deterministic one). Rows are cached per checkpoint (outputs/bench/rows/), so a re-run computes only what is
missing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from harness.common import (  # noqa: E402
    RUNS,
    classifier_note,
    machine,
    machine_line,
    save_figure,
    saved_result,
    scored_rows,
    summary,
    write_result,
)
from harness.mnist import DATASETS, mnist_setup, recipe_checkpoint, train_run  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from diffusion_lab.checkpoint import load_module  # noqa: E402
from diffusion_lab.diffusion import Sampler  # noqa: E402


@dataclass(frozen=True)
class Process:
    key: str  # its diffusion= choice
    title: str
    experiment: str  # its MNIST preset
    run: str  # its run directory under outputs/bench/mnist


PROCESSES = [
    Process("ddpm", "DDPM (v, cosine)", "mnist_cpu", DATASETS["mnist"].run),
    Process("edm", "EDM", "edm_mnist_cpu", "edm"),
    Process("flow", "Flow (rectified)", "flow_mnist_cpu", "flow"),
]
# Candidates, each as Sampler arguments (every one with its registry defaults unless named here). EDM's own are
# Heun on its rho = 7 grid (Algorithm 1) and with churn (Algorithm 2, the paper's ImageNet-64 S_churn/S_tmin/
# S_tmax/S_noise).
DETERMINISTIC = [
    {"method": "ddim"},
    {"method": "euler"},
    {"method": "heun"},
    {"method": "heun", "spacing": "karras"},
    {"method": "dpmpp_2m"},
    {"method": "unipc"},
]
STOCHASTIC = [
    {"method": "ddim", "eta": 1.0},
    {"method": "euler_ancestral"},
    {"method": "heun", "spacing": "karras", "s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003},
]
SCREEN_NFE = [10, 20]
NFES = [10, 20, 50]


def candidates(diffusion) -> tuple[list[dict], dict[str, str]]:
    """The candidate argument sets that run on `diffusion`, and {label: why not} for the ones it refuses."""
    ok, refused = [], {}
    for args in DETERMINISTIC + STOCHASTIC:
        s = Sampler(nfe=SCREEN_NFE[0], **args)
        try:
            s.bind(diffusion)
        except ValueError as e:
            refused[s.label] = str(e)
            continue
        ok.append(args)
    return ok, refused


def screen_rank(rows: list[dict]) -> dict[str, float]:
    """{label: mean FID over the screen's NFEs} (lower is better)."""
    labels = dict.fromkeys(r["label"] for r in rows)
    return {lab: sum(r["fid"] for r in rows if r["label"] == lab) / len(SCREEN_NFE) for lab in labels}


def run(n: int, n_screen: int, keys: list[str]) -> dict:
    t0 = time.perf_counter()
    ev, ref, classifier, info, _ = mnist_setup(DATASETS["mnist"])
    out = {"machine": machine(), "n": n, "n_screen": n_screen, "classifier_epochs": info["epochs"], "processes": []}
    for p in (p for p in PROCESSES if p.key in keys):
        if p.key == "ddpm":
            ckpt = recipe_checkpoint(DATASETS["mnist"])
            seconds = float((ckpt.parent.parent / "DONE").read_text())
        else:
            ckpt, seconds = train_run(p.run, [], p.experiment)
        module = load_module(ckpt)
        cache = RUNS / "rows" / f"mnist-{p.run}.json"
        ok, refused = candidates(module.diffusion)
        screen = scored_rows(module, [Sampler(nfe=k, **a) for a in ok for k in SCREEN_NFE], n_screen, ev, ref,
                             "the 10,000 MNIST test images", cache, classifier=classifier)  # fmt: skip
        for r, (a, k) in zip(screen, [(a, k) for a in ok for k in SCREEN_NFE], strict=True):
            r["budget"], r["args"] = k, a
        rank = screen_rank(screen)
        best = {}
        for kind, pool in (("deterministic", DETERMINISTIC), ("stochastic", STOCHASTIC)):
            mine = [a for a in ok if a in pool]
            if mine:
                best[kind] = min(mine, key=lambda a: rank[Sampler(nfe=SCREEN_NFE[0], **a).label])
        final = []
        for kind, a in best.items():
            rows = scored_rows(module, [Sampler(nfe=k, **a) for k in NFES], n, ev, ref,
                               "the 10,000 MNIST test images", cache, classifier=classifier)  # fmt: skip
            final += [{**r, "budget": k, "kind": kind} for r, k in zip(rows, NFES, strict=True)]
        out["processes"].append({"key": p.key, "title": p.title, "experiment": p.experiment, "ckpt": str(ckpt),
                                 "train_seconds": seconds, "refused": refused, "screen": screen, "rows": final})
        summary("processes", f"{p.key}: best {best}")
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def best_at(proc: dict, kind: str, budget: int) -> dict | None:
    return next((r for r in proc["rows"] if r["kind"] == kind and r["budget"] == budget), None)


def targets(res: dict) -> list[str]:
    """The issue's target: a new process's deterministic FID below DDPM's at NFE 10 or 20."""
    ddpm = next((p for p in res["processes"] if p["key"] == "ddpm"), None)
    if ddpm is None:
        return ["not evaluated (run without --processes to include DDPM)"]
    out = []
    for k in (10, 20):
        base = best_at(ddpm, "deterministic", k)
        for p in res["processes"]:
            r = best_at(p, "deterministic", k)
            if p["key"] == "ddpm" or r is None or base is None:
                continue
            verdict = "beats" if r["fid"] < base["fid"] else "does not beat"
            out.append(f"NFE {k}: {p['title']} {r['label']} {r['fid']:.2f} {verdict} DDPM {base['label']} "
                       f"{base['fid']:.2f}")
    met = any(" beats " in line for line in out)
    return out + [f"target (a new process beats DDPM at NFE <= 20, deterministic): {'met' if met else 'NOT met'}"]


def plot(res: dict, ax) -> None:
    """FID against NFE: one colour per process, its best deterministic sampler solid, its best stochastic dashed."""
    for color, p in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], res["processes"], strict=False):
        for kind, ls in (("deterministic", "-"), ("stochastic", "--")):
            pts = sorted((r["nfe"], r["fid"], r["label"]) for r in p["rows"] if r["kind"] == kind)
            if pts:
                ax.plot([x[0] for x in pts], [x[1] for x in pts], ls=ls, marker="o", color=color,
                        label=f"{p['title']}: {pts[0][2]}")
    ax.set_xscale("log")
    ax.set_xticks(NFES, [str(k) for k in NFES])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("network evaluations per sample (NFE; Heun uses 9/19/49)")
    ax.set_ylabel(f"FID (N={res['n']} vs MNIST test)")
    ax.set_title("DDPM, EDM and flow on the mnist_cpu budget (solid: ODE, dashed: stochastic)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def section(res: dict, cmd: str, link: str) -> str:
    def cell(r):
        if r is None:
            return "—"
        nfe = f" @{r['nfe']}" if r["nfe"] != r["budget"] else ""
        return f"{r['fid']:.2f}{nfe} ({r['precision']:.2f}/{r['recall']:.2f}, cls {r['cls_score']:.2f})"

    lines = ["| process | sampler (grid) | " + " | ".join(f"NFE {k}" for k in NFES) + " | train min |",
             "|---" * (len(NFES) + 3) + "|"]
    for p in res["processes"]:
        for kind in ("deterministic", "stochastic"):
            rows = [best_at(p, kind, k) for k in NFES]
            first = next(r for r in rows if r is not None)
            lines.append(f"| {p['title']} (`experiment={p['experiment']}`) | {kind}: {first['label']} "
                         f"({first['spacing']}) | " + " | ".join(cell(r) for r in rows)
                         + f" | {p['train_seconds'] / 60:.1f} |")
    screen = [f"| process | candidates: FID at NFE {' / '.join(map(str, SCREEN_NFE))}, best mean first |", "|---|---|"]
    for p in res["processes"]:
        rank = screen_rank(p["screen"])
        cells = []
        for lab in sorted(rank, key=rank.get):
            fids = " / ".join(f"{r['fid']:.1f}" for r in p["screen"] if r["label"] == lab)
            cells.append(f"{lab} {fids}")
        refused = "; refused: " + ", ".join(p["refused"]) if p["refused"] else ""
        screen.append(f"| {p['title']} | {'; '.join(cells)}{refused} |")
    return f"""### Processes on MNIST: DDPM, EDM, flow (`{cmd}`)

Machine: {machine_line(res['machine'])}. Each process trained by its preset (same net, data, seed, optimizer, EMA
and 3,200 steps); cells are FID at N={res['n']} against the 10,000 MNIST test images (precision/recall k=3,
classifier score, 10 = best{classifier_note(res)}); `@k` where the method's NFE differs from the column's budget
(Heun: 2 evaluations per step, one on the last). `train min` is each run's wall time on this noisy machine, with
other jobs sometimes sharing its cores: it is not the process's cost (all three train the same net for the same
steps). Wall time: {res['wall_seconds'] / 60:.1f} min (cached rows and reused trainings count as zero).

{chr(10).join(lines)}

![FID vs NFE per process]({link})

How each process's two samplers were chosen (N={res['n_screen']}, NFE {' and '.join(map(str, SCREEN_NFE))}, best
mean first; stochastic candidates: DDIM eta=1, Euler ancestral, Heun with EDM's churn):

{chr(10).join(screen)}

Targets: {'; '.join(targets(res))}.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=2000, help="samples per scored row (default 2,000)")
    p.add_argument("--screen-samples", type=int, default=500, help="samples per screening row (default 500)")
    p.add_argument("--processes", nargs="+", choices=[x.key for x in PROCESSES], default=[x.key for x in PROCESSES],
                   help="a subset (its section then shows only these)")
    p.add_argument("--render", action="store_true", help="the section and plot again from the saved results")
    a = p.parse_args()
    if a.render:
        res = saved_result(p, "processes", "python bench/processes.py")
    else:
        res = run(a.num_samples, a.screen_samples, a.processes)
        res["command"] = "python bench/processes.py" + (
            f" --num-samples {a.num_samples}" if a.num_samples != 2000 else "") + (
            f" --screen-samples {a.screen_samples}" if a.screen_samples != 500 else "") + (
            f" --processes {' '.join(a.processes)}" if len(a.processes) < len(PROCESSES) else "")
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    plot(res, ax)
    fig.tight_layout()
    link = save_figure(fig, "processes")
    plt.close(fig)
    write_result("processes", res, section(res, res["command"], link))
    summary("processes", "; ".join(targets(res)))


if __name__ == "__main__":
    main()
