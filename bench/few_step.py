"""One or two steps on MNIST (issue 42): ECT and MeanFlow against their teachers' training-free samplers.

    python bench/few_step.py                     # trains what is missing, then scores at N=10,000 (hours on 2 cores)
    python bench/few_step.py --num-samples 2000  # smaller, for a look
    python bench/few_step.py --render            # the section and plot again from bench/results/few_step.json

1. Teachers: experiment=edm_mnist_cpu and flow_mnist_cpu (bench/processes.py's runs, reused), 3,200 steps each.
2. Students: ECT tuned from the EDM teacher (experiment=ect_mnist_cpu), MeanFlow tuned from the flow teacher and
   MeanFlow from scratch (experiment=meanflow_mnist_cpu), each at less than its teacher's training time.
3. Screen: each teacher's training-free samplers at NFE 5 and 10, N=--screen-samples; the best by mean FID.
4. Score at N=--num-samples against the 10,000 MNIST test images (FID, KID, precision/recall, classifier score):
   each teacher's best sampler at NFE 2, 5 and 10 and DDIM eta=1 at NFE 50; each student's own sampler at NFE 1, 2
   and 4. Image i starts from the same seed (0, i) in every row. Rows are cached per checkpoint (outputs/bench/rows/).
Targets: a 2-step FID at most 1.25x the teacher's best at any NFE <= 50; a 1-step FID below the teacher's best
training-free sampler at NFE 10; tuning cheaper in wall-clock time than the teacher's training.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

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
from harness.mnist import DATASETS, TEST_SET, mnist_setup, train_run  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from diffusion_lab.checkpoint import load_module  # noqa: E402
from diffusion_lab.diffusion import Sampler  # noqa: E402


@dataclass(frozen=True)
class Run:
    key: str  # its run directory under outputs/bench/mnist (teachers: bench/processes.py's)
    title: str
    experiment: str
    teacher: str | None = None  # the teacher run it starts from (init_from) and is compared with
    overrides: tuple[str, ...] = field(default_factory=tuple)
    costs_as: str | None = None  # the run whose step it times (step_seconds), when not its own

    @property
    def step_key(self) -> str:
        return self.costs_as or self.key


TEACHERS = [Run("edm", "EDM teacher", "edm_mnist_cpu"), Run("flow", "Flow teacher", "flow_mnist_cpu")]
STUDENTS = [
    Run("ect_edm", "ECT (from EDM)", "ect_mnist_cpu", "edm"),
    Run("meanflow_flow", "MeanFlow (from flow)", "meanflow_mnist_cpu", "flow"),
    Run("meanflow_scratch", "MeanFlow (from scratch)", "meanflow_mnist_cpu", None, costs_as="meanflow_flow"),
]
# Training-free candidates of the teachers (registry defaults unless named): the ODE solvers and the stochastic ones.
CANDIDATES = [{"method": "ddim"}, {"method": "dpmpp_2m"}, {"method": "unipc"}, {"method": "euler"},
              {"method": "ddim", "eta": 1.0}, {"method": "euler_ancestral"}]  # fmt: skip
SCREEN_NFE, TEACHER_NFE, STUDENT_NFE, REFERENCE = [5, 10], [2, 5, 10], [1, 2, 4], {"method": "ddim", "eta": 1.0}
# The intermediate point of a student's 2-step sample, screened like the teachers' samplers: the registry's trailing
# grid (EDM sigma 0.4, flow t 0.5) against ECT's CIFAR-10 value and one on each side.
MIDS = {"consistency": [{}, {"mid_sigmas": [0.821]}, {"mid_sigmas": [2.0]}],
        "meanflow": [{}, {"mid_times": [0.3]}, {"mid_times": [0.7]}]}  # fmt: skip


def _candidates(diffusion) -> list[dict]:
    ok = []
    for args in CANDIDATES:
        try:
            Sampler(nfe=SCREEN_NFE[0], **args).bind(diffusion)
            ok.append(args)
        except ValueError:
            continue
    return ok


def step_seconds(rounds: int = 5, steps: int = 5) -> dict[str, float]:
    """Median seconds of one optimizer step (the objective's loss, backward, Adam) of each preset's module on the
    same MNIST-shaped batch of 64, the presets interleaved round by round: what the trainings cost per step, free of
    what else shared the machine while they ran."""
    import torch
    from harness.mnist import compose

    from diffusion_lab.checkpoint import build_module

    modules = {r.key: build_module(compose([f"experiment={r.experiment}"])) for r in [*TEACHERS, *STUDENTS]
               if r.costs_as is None}
    x0 = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    opts = {k: torch.optim.Adam(m.net.parameters(), lr=1e-4) for k, m in modules.items()}

    def step(key):
        m = modules[key]
        out = m.objective(m.net.train(), x0, {}, step=0)
        (out.terms["loss"] * out.weights).mean().backward()
        opts[key].step()
        opts[key].zero_grad()

    times = {k: [] for k in modules}
    for key in modules:  # warm-up
        step(key)
    for _ in range(rounds):
        for key in modules:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(key)
            times[key].append((time.perf_counter() - t0) / steps)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _score(module, samplers, n, ev, ref, cache, classifier) -> list[dict]:
    return scored_rows(module, samplers, n, ev, ref, TEST_SET, cache, classifier=classifier)


def run(n: int, n_screen: int) -> dict:
    t0 = time.perf_counter()
    ev, ref, classifier, info, _ = mnist_setup(DATASETS["mnist"])
    out = {"machine": machine(), "n": n, "n_screen": n_screen, "classifier_epochs": info["epochs"], "runs": [],
           "step_seconds": step_seconds()}
    summary("few_step", f"seconds per step: {out['step_seconds']}")
    ckpts = {}
    for t in TEACHERS:
        ckpt, seconds = train_run(t.key, list(t.overrides), t.experiment)
        ckpts[t.key] = ckpt
        module = load_module(ckpt)
        cache = RUNS / "rows" / f"mnist-{t.key}.json"
        ok = _candidates(module.diffusion)
        screen = _score(module, [Sampler(nfe=k, **a) for a in ok for k in SCREEN_NFE], n_screen, ev, ref, cache,
                        classifier)  # fmt: skip
        k = len(SCREEN_NFE)
        best = ok[min(range(len(ok)), key=lambda i: sum(r["fid"] for r in screen[i * k : (i + 1) * k]))]
        rows = _score(module, [Sampler(nfe=k, **best) for k in TEACHER_NFE] + [Sampler(nfe=50, **REFERENCE)], n, ev,
                      ref, cache, classifier)  # fmt: skip
        for r, k in zip(rows, [*TEACHER_NFE, 50], strict=True):
            r["budget"], r["kind"] = k, "reference" if k == 50 else "best"
        out["runs"].append({"key": t.key, "title": t.title, "experiment": t.experiment, "ckpt": str(ckpt),
                            "train_seconds": seconds, "steps": module.run_config["trainer"]["max_steps"],
                            "step_key": t.step_key, "best": best, "screen": screen, "rows": rows})  # fmt: skip
        summary("few_step", f"{t.key}: best training-free {best}")
    for s in STUDENTS:
        init = [f"init_from={ckpts[s.teacher]}"] if s.teacher else []
        ckpt, seconds = train_run(s.key, [*init, *s.overrides], s.experiment)
        module = load_module(ckpt)
        own, cache = module.objective.sampler, RUNS / "rows" / f"mnist-{s.key}.json"
        screen = _score(module, [Sampler(own, steps=2, **m) for m in MIDS[own]], n_screen, ev, ref, cache, classifier)
        mid = MIDS[own][min(range(len(screen)), key=lambda i: screen[i]["fid"])]
        rows = _score(module, [Sampler(own, steps=k, **(mid if k == 2 else {})) for k in STUDENT_NFE], n, ev, ref,
                      cache, classifier)  # fmt: skip
        for r, k in zip(rows, STUDENT_NFE, strict=True):
            r["budget"], r["kind"] = k, "student"
        out["runs"].append({"key": s.key, "title": s.title, "experiment": s.experiment, "teacher": s.teacher,
                            "ckpt": str(ckpt), "train_seconds": seconds, "rows": rows, "screen": screen, "mid": mid,
                            "steps": module.run_config["trainer"]["max_steps"],
                            "step_key": s.step_key})
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def _run(res: dict, key: str) -> dict:
    return next(r for r in res["runs"] if r["key"] == key)


def _at(run: dict, budget: int, kind: str | None = None) -> dict | None:
    return next((r for r in run["rows"] if r["budget"] == budget and (kind is None or r["kind"] == kind)), None)


def cost(res: dict, run: dict) -> float:
    """A training's seconds as its steps x the median seconds per step of its objective (step_seconds)."""
    return run["steps"] * res["step_seconds"][run["step_key"]]


def targets(res: dict) -> list[str]:
    out = []
    for s in (r for r in res["runs"] if "teacher" in r):
        if s["teacher"] is None:
            teachers = [r for r in res["runs"] if r["key"] == "flow"]  # from scratch: compared with the flow model
        else:
            teachers = [_run(res, s["teacher"])]
        t = teachers[0]
        best_any = min(r["fid"] for r in t["rows"])
        two, one, ten = _at(s, 2), _at(s, 1), _at(t, 10, "best")
        verdict = lambda ok: "met" if ok else "NOT met"
        cost_s, cost_t = (cost(res, r) for r in (s, t))
        out.append(f"{s['title']}: 2-step {two['fid']:.2f} vs 1.25 x {t['title']}'s best {best_any:.2f} = "
                   f"{1.25 * best_any:.2f}: {verdict(two['fid'] <= 1.25 * best_any)}; 1-step {one['fid']:.2f} vs its "
                   f"best training-free at NFE 10 {ten['fid']:.2f}: {verdict(one['fid'] < ten['fid'])}; training "
                   f"{cost_s / 60:.1f} vs {cost_t / 60:.1f} min (steps x median s/step): {verdict(cost_s < cost_t)}")
    return out


def plot(res: dict, ax) -> None:
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, r in zip(colors, res["runs"], strict=False):
        for kind, ls, marker in (("best", "-", "o"), ("reference", "", "s"), ("student", "--", "D")):
            pts = sorted((x["nfe"], x["fid"], x["label"]) for x in r["rows"] if x["kind"] == kind)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker=marker, color=color,
                        label=f"{r['title']}: {pts[0][2]}")  # fmt: skip
    ticks = sorted({*STUDENT_NFE, *TEACHER_NFE, 50})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample (NFE)")
    ax.set_ylabel(f"FID (N={res['n']:,} vs MNIST test)")
    ax.set_title("One or two steps on MNIST: students (dashed) vs their teachers' samplers")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def section(res: dict, cmd: str, link: str) -> str:
    def cell(r):
        if r is None:
            return "—"
        pr = f"{r['precision']:.2f}/{r['recall']:.2f}"
        return f"{r['fid']:.2f} / {r['kid'] * 1e3:.2f} ({pr}, cls {r['cls_score']:.2f})"

    budgets = sorted({*STUDENT_NFE, *TEACHER_NFE, 50})
    lines = ["| model (`experiment=`) | sampler | " + " | ".join(f"NFE {k}" for k in budgets)
             + " | steps x s/step = min (wall min) |",
             "|---" * (len(budgets) + 3) + "|"]  # fmt: skip
    for r in res["runs"]:
        kinds = ("best", "reference") if "teacher" not in r else ("student",)
        for kind in kinds:
            rows = {k: _at(r, k, kind) for k in budgets}
            first = next(x for x in rows.values() if x is not None)
            lines.append(f"| {r['title']} (`{r['experiment']}`) | {first['label']} | "
                         + " | ".join(cell(rows[k]) for k in budgets) + f" | {r['steps']} x "
                         f"{res['step_seconds'][r['step_key']]:.3f} = {cost(res, r) / 60:.1f} "
                         f"({r['train_seconds'] / 60:.1f}) |")
    mids = "; ".join(f"{r['title']}: " + ", ".join(f"{x['label']} {x['fid']:.1f}" for x in r["screen"])
                     for r in res["runs"] if "teacher" in r)  # fmt: skip
    return f"""### One or two steps on MNIST: ECT and MeanFlow (`{cmd}`)

Machine: {machine_line(res['machine'])}. Cells: FID / KID x 1e3 at N={res['n']:,} against {TEST_SET} (precision/recall
k=3, classifier score, 10 = best{classifier_note(res)}). Teachers: their best training-free sampler (screened at NFE
{' and '.join(map(str, SCREEN_NFE))}, N={res['n_screen']:,}) and DDIM eta=1 at NFE 50; students: their own few-step
sampler (consistency or MeanFlow: 1 and 4 steps on the registry's trailing grid, 2 steps at the intermediate point
that screened best: {mids}). The last column is each training's cost: its steps times
the median seconds of one step of its objective (measured interleaved, batch 64), and in brackets its wall time, which
other work on this machine may have stretched (students: the tuning alone). Wall time of this benchmark:
{res['wall_seconds'] / 60:.1f} min (cached rows and reused trainings count as zero).

{chr(10).join(lines)}

![FID vs NFE, students and teachers]({link})

Targets: {'; '.join(targets(res))}.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=10_000, help="samples per scored row (default 10,000)")
    p.add_argument("--screen-samples", type=int, default=1000, help="samples per screening row (default 1,000)")
    p.add_argument("--render", action="store_true", help="the section and plot again from the saved results")
    a = p.parse_args()
    if a.render:
        res = saved_result(p, "few_step", "python bench/few_step.py")
    else:
        res = run(a.num_samples, a.screen_samples)
        res["command"] = "python bench/few_step.py" + (
            f" --num-samples {a.num_samples}" if a.num_samples != 10_000 else "") + (
            f" --screen-samples {a.screen_samples}" if a.screen_samples != 1000 else "")  # fmt: skip
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    plot(res, ax)
    fig.tight_layout()
    link = save_figure(fig, "few_step")
    plt.close(fig)
    write_result("few_step", res, section(res, res["command"], link))
    summary("few_step", "; ".join(targets(res)))


if __name__ == "__main__":
    main()
