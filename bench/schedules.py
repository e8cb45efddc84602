"""Time grids learned per checkpoint against the fixed grids (issue 43).

    python bench/schedules.py                      # MNIST recipe + flow preset (each trained once, ~35 min on 2
                                                   # cores), every row at N=10,000 against the MNIST test set
    python bench/schedules.py --models flow --num-samples 1000 --nfe 5 10   # one model, fewer rows (~1 h)
    python bench/schedules.py --data digits --num-samples 1797   # train.py's default digits model: a first look
    python bench/schedules.py --render             # the section and plot again from bench/results/schedules.json
    python bench/schedules.py --headline 10000     # after a smaller run: its NFE-5 target cell (the learned grid with
                                                   # the largest cut, the best fixed grid) again at N=10,000

For each model, method (UniPC-2, DPM-Solver++(2M), Euler) and NFE (4, 5, 6, 8, 10): the fixed grids (trailing,
logsnr, karras) and the grid `learn_schedule.py` learns for that checkpoint (LD3's objective against DPM-Solver++(2M)
at NFE 100; --trajectories, --max-evals), each scored by FID/KID, precision/recall (and, on MNIST, the classifier
score) on the same images i seeded (0, i); DDIM eta 1 at the same NFE is the stochastic reference. Schedules and
rows are cached (outputs/bench/), so a re-run computes only what is missing.
Targets: at NFE 10 a deterministic solver on a learned grid scores at or below DDIM eta 1 at NFE 10 (same model, same
N); at NFE 5 the best learned grid cuts the best fixed grid's FID by at least 25%.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from harness.common import (  # noqa: E402
    ROOT,
    RUNS,
    all_digits_uint8,
    classifier_note,
    fid_evaluator,
    machine,
    machine_line,
    save_figure,
    saved_result,
    scored_rows,
    summary,
    train_digits,
    write_result,
)

from diffusion_lab.checkpoint import load_module  # noqa: E402
from diffusion_lab.diffusion import Sampler  # noqa: E402
from diffusion_lab.io import file_sha256  # noqa: E402

METHODS = [{"method": "unipc", "order": 2}, {"method": "dpmpp_2m"}, {"method": "euler"}]
FIXED = ["trailing", "logsnr", "karras"]
NFES = [4, 5, 6, 8, 10]
TEACHER = {"method": "dpmpp_2m", "nfe": 100}  # learn_schedule's teacher (conf/learn_schedule.yaml): each grid's ceiling
LOWEST = {"pinned": "learned", "free": "learned, lowest free"}  # learn_schedule's `lowest` -> its rows' grid label
LEARN_SEED = 1  # the trajectories a grid is learned on are seeded (1, i): none is an image the rows score, (0, i)


def models(data: str, keys: list[str]) -> list[dict]:
    """[{key, title, ckpt, evaluator, reference, ref_name, classifier}] of the benchmark's checkpoints."""
    if data == "digits":
        ev = fid_evaluator()
        ckpt = train_digits("digits_default", [])
        ref = ev.reference_features("digits-all", all_digits_uint8())
        return [dict(key="digits", title="digits (train.py's DDPM)", ckpt=ckpt, evaluator=ev, reference=ref,
                     ref_name="the 1,797 digits", classifier=None, info=None)]  # fmt: skip
    from harness.mnist import DATASETS, mnist_setup, recipe_checkpoint, train_run

    ev, ref, classifier, info, _ = mnist_setup(DATASETS["mnist"])
    common = dict(evaluator=ev, reference=ref, ref_name="the 10,000 MNIST test images", classifier=classifier,
                  info=info)  # fmt: skip
    out = []
    if "mnist" in keys:
        out.append(dict(key="mnist", title="MNIST recipe (DDPM v, cosine)", ckpt=recipe_checkpoint(DATASETS["mnist"]),
                        **common))  # fmt: skip
    if "flow" in keys:
        out.append(dict(key="flow", title="Flow preset", ckpt=train_run("flow", [], "flow_mnist_cpu")[0], **common))
    return out


def learned(m: dict, method: dict, nfe: int, a, lowest: str) -> tuple[str, float]:
    """(schedule file, minutes it took) for one (model, method, NFE, lowest): learned once per checkpoint and
    settings."""
    name = Sampler(**method, nfe=nfe).name
    path = RUNS / "schedules" / m["key"] / f"{name}_n{a.trajectories}_e{a.max_evals}_s{LEARN_SEED}_{lowest}.json"
    sha = file_sha256(m["ckpt"])
    if path.exists() and json.loads(path.read_text())["checkpoint"]["sha256"] == sha:
        return str(path), json.loads(path.read_text())["seconds"]["total"] / 60
    opts = [f"sampler.{k}={v}" for k, v in method.items() if k != "method"]
    cmd = [sys.executable, "learn_schedule.py", f"ckpt_path={m['ckpt']}", f"sampler={method['method']}", *opts,
           f"sampler.nfe={nfe}", f"seed={LEARN_SEED}", f"trajectories={a.trajectories}", f"validation={a.trajectories}",
           f"max_evals={a.max_evals}", f"lowest={lowest}", f"out={path}",
           f"hydra.run.dir={path.parent / 'logs' / path.stem}"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    summary("schedules", f"{m['key']} {name}: learned in {(time.perf_counter() - t0) / 60:.1f} min")
    return str(path), json.loads(path.read_text())["seconds"]["total"] / 60


def run(a) -> dict:
    t0 = time.perf_counter()
    res = {"machine": machine(), "n": a.num_samples, "data": a.data, "trajectories": a.trajectories,
           "max_evals": a.max_evals, "learn_seed": LEARN_SEED, "models": []}  # fmt: skip
    for m in models(a.data, a.models):
        module = load_module(m["ckpt"])
        methods = [meth for meth in METHODS if meth["method"] in a.methods]
        fixed = [Sampler(**meth, nfe=k, spacing=sp) for meth in methods for k in a.nfe for sp in a.fixed]
        ddim = [Sampler("ddim", nfe=k, eta=1.0) for k in a.nfe]
        rows_dir = RUNS / "rows"
        rows_dir.mkdir(parents=True, exist_ok=True)
        score = dict(n=a.num_samples, evaluator=m["evaluator"], ref_features=m["reference"], ref_name=m["ref_name"],
                     classifier=m["classifier"])  # fmt: skip
        refs = [*ddim, Sampler(**TEACHER)]
        rows = scored_rows(module, fixed + refs, cache=rows_dir / f"schedules_{m['key']}.json", **score)
        cells = [(meth, k) for meth in methods for k in a.nfe]
        minutes, times = {}, {}
        for lowest in a.lowest:
            schedules = [learned(m, meth, k, a, lowest) for meth, k in cells]
            ours = [Sampler(**meth, nfe=k, schedule=p) for (meth, k), (p, _) in zip(cells, schedules, strict=True)]
            tag = hashlib.sha256("".join(open(p).read() for p, _ in schedules).encode()).hexdigest()[:8]
            got = scored_rows(module, ours, cache=rows_dir / f"schedules_{m['key']}_learned_{tag}.json", **score)
            rows += [{**x, "sampler": _name(meth, k, LOWEST[lowest])} for x, (meth, k) in zip(got, cells, strict=True)]
            for (meth, k), (path, mins) in zip(cells, schedules, strict=True):
                minutes[f"{meth['method']}@{k} {lowest}"] = mins
                times[f"{meth['method']}@{k} {lowest}"] = json.loads(open(path).read())["times"]
        res["models"].append({"key": m["key"], "title": m["title"], "ckpt": str(m["ckpt"]), "rows": rows,
                              "learn_minutes": minutes, "times": times})  # fmt: skip
        res["ref_name"] = m["ref_name"]
        if m["info"] is not None:
            res["classifier_epochs"] = m["info"].get("epochs")
    res["wall_seconds"] = time.perf_counter() - t0
    return res


def target_cell(res: dict) -> tuple[dict, dict, dict, Sampler, Sampler]:
    """(model result, its best learned NFE-5 row, its best fixed NFE-5 row, the fixed row's Sampler, the learned
    grid's Sampler on its saved times) of the model where a learned grid cuts the best fixed grid's FID the most."""
    best = None
    for r in res["models"]:
        fives = [x for x in r["rows"] if x["nfe"] == 5 and x["method"] in {m["method"] for m in METHODS}]
        ours = [x for x in fives if x["spacing"] == "learned"]
        fixed = [x for x in fives if x["spacing"] in FIXED]
        if ours and fixed:
            cell = (r, min(ours, key=lambda x: x["fid"]), min(fixed, key=lambda x: x["fid"]))
            if best is None or cell[1]["fid"] / cell[2]["fid"] < best[1]["fid"] / best[2]["fid"]:
                best = cell
    if best is None:
        raise SystemExit("--headline: the saved run has no NFE-5 learned and fixed rows")
    r, ours, theirs = best
    meth = {x["method"]: x for x in METHODS}
    lowest = next(low for low, label in LOWEST.items() if _name(meth[ours["method"]], 5, label) == ours["sampler"])
    times = r["times"][f"{ours['method']}@5 {lowest}"]
    return (r, ours, theirs, Sampler(**meth[theirs["method"]], nfe=5, spacing=theirs["spacing"]),
            Sampler(**meth[ours["method"]], nfe=5).with_times(times))  # fmt: skip


def headline(res: dict, n: int) -> dict:
    """The NFE-5 target of a saved run (target_cell) scored again at N=n, from the same seeds (0, i)."""
    t0 = time.perf_counter()
    r, ours, _, fixed, learned_grid = target_cell(res)
    m = models(res["data"], [r["key"]])[0]
    module = load_module(m["ckpt"])
    score = dict(n=n, evaluator=m["evaluator"], ref_features=m["reference"], ref_name=m["ref_name"],
                 classifier=m["classifier"])  # fmt: skip
    tag = hashlib.sha256(json.dumps(learned_grid.timesteps(module.diffusion)).encode()).hexdigest()[:8]
    rows = scored_rows(module, [fixed], cache=RUNS / "rows" / f"schedules_{m['key']}.json", **score)
    cache = RUNS / "rows" / f"schedules_{m['key']}_learned_{tag}.json"
    rows += [{**x, "sampler": ours["sampler"]} for x in scored_rows(module, [learned_grid], cache=cache, **score)]
    return {"n": n, "model": r["title"], "rows": rows, "wall_seconds": time.perf_counter() - t0}


def _name(meth: dict, nfe: int, spacing: str) -> str:
    """The row name of a (method, NFE) on a fixed spacing or a learned grid (LOWEST's labels)."""
    if spacing in LOWEST.values():
        return f"{Sampler(**meth, nfe=nfe).name}_" + spacing.replace(", ", "_").replace(" ", "_")
    return Sampler(**meth, nfe=nfe, spacing=spacing).name


def table(res: dict) -> tuple[list[str], list[str]]:
    """(Markdown lines, target lines)."""
    lines, targets = [], []
    for r in res["models"]:
        by = {x["sampler"]: x for x in r["rows"]}
        teacher = by.pop(Sampler(**TEACHER).name, None)
        nfes = sorted({x["nfe"] for x in by.values()})
        lines += [f"**{r['title']}** (FID / KID x 1e3; learning minutes in brackets)", "",
                  "| method | grid | " + " | ".join(f"NFE {k}" for k in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
        best_fixed, best_learned = {}, {}
        for meth in METHODS:
            for sp in [*FIXED, *LOWEST.values()]:
                cells = []
                for k in nfes:
                    x = by.get(_name(meth, k, sp))
                    if x is None:
                        cells.append("—")
                        continue
                    lowest = next((low for low, label in LOWEST.items() if label == sp), None)
                    minutes = r["learn_minutes"].get(f"{meth['method']}@{k} {lowest}")
                    extra = f" ({minutes:.1f})" if minutes is not None else ""
                    cells.append(f"{x['fid']:.2f} / {x['kid'] * 1e3:.2f}{extra}")
                    pool = best_learned if lowest else best_fixed
                    pool[k] = min(pool.get(k, float("inf")), x["fid"])
                label = Sampler(**meth).label
                if any(c != "—" for c in cells):  # a method or grid this run did not score has no line
                    lines.append(f"| {label} | {sp} | " + " | ".join(cells) + " |")
        ddim = [by.get(Sampler("ddim", nfe=k, eta=1.0).name) for k in nfes]
        lines += ["| DDIM eta=1 | trailing | " + " | ".join(f"{x['fid']:.2f} / {x['kid'] * 1e3:.2f}" if x else "—"
                                                         for x in ddim) + " |", ""]  # fmt: skip
        if teacher:
            lines += [f"The teacher every grid is fitted to, {Sampler(**TEACHER).label} at NFE {TEACHER['nfe']}, "
                      f"scores {teacher['fid']:.2f} / {teacher['kid'] * 1e3:.2f}: a grid that matched it exactly "
                      "would score that.", ""]  # fmt: skip
        d10 = by.get(Sampler("ddim", nfe=10, eta=1.0).name)
        if 10 in best_learned and d10:
            ok = best_learned[10] <= d10["fid"]
            targets.append(f"{r['title']}: NFE 10 learned {best_learned[10]:.2f} vs DDIM eta 1 {d10['fid']:.2f}"
                           + (f" (teacher {teacher['fid']:.2f})" if teacher else "") + ": "
                           + ("met" if ok else "NOT met"))  # fmt: skip
        if 5 in best_learned and 5 in best_fixed:
            cut = 1 - best_learned[5] / best_fixed[5]
            targets.append(f"{r['title']}: NFE 5 learned {best_learned[5]:.2f} vs best fixed {best_fixed[5]:.2f} "
                           f"({cut:+.0%} cut; 25% asked, i.e. {0.75 * best_fixed[5]:.2f}"
                           + (f"; teacher {teacher['fid']:.2f}" if teacher else "") + "): "
                           + ("met" if cut >= 0.25 else "NOT met"))  # fmt: skip
    return lines, targets


def plot(res: dict):
    fig, axes = plt.subplots(1, len(res["models"]), figsize=(6.5 * len(res["models"]), 4.6), dpi=110, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, r in zip(axes[0], res["models"], strict=True):
        by = {x["sampler"]: x for x in r["rows"]}
        teacher = by.pop(Sampler(**TEACHER).name, None)
        nfes = sorted({x["nfe"] for x in by.values()})
        for c, meth in zip(colors, METHODS, strict=False):
            fixed = [min((by[n]["fid"] for sp in FIXED if (n := _name(meth, k, sp)) in by), default=None) for k in nfes]
            ours = [by.get(_name(meth, k, LOWEST["pinned"]), {}).get("fid") for k in nfes]
            free = [by.get(_name(meth, k, LOWEST["free"]), {}).get("fid") for k in nfes]
            label = Sampler(**meth).label
            if all(v is None for v in fixed + ours + free):
                continue
            ax.plot(nfes, fixed, ls="--", marker="o", color=c, label=f"{label}, best fixed grid")
            ax.plot(nfes, ours, ls="-", marker="D", color=c, label=f"{label}, learned grid")
            if any(v is not None for v in free):
                ax.plot(nfes, free, ls=":", marker="x", color=c, label=f"{label}, learned, lowest time free")
        ax.plot(nfes, [by.get(Sampler("ddim", nfe=k, eta=1.0).name, {}).get("fid") for k in nfes], color="gray",
                marker="s", label="DDIM eta=1")  # fmt: skip
        if teacher:
            ax.axhline(teacher["fid"], color="black", ls=":", lw=1,
                       label=f"teacher: {Sampler(**TEACHER).label}, NFE {TEACHER['nfe']}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(k) for k in nfes])
        ax.set_xlabel("network evaluations per sample (NFE)")
        ax.set_ylabel(f"FID (N={res['n']:,})")
        ax.set_title(r["title"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def section(res: dict, link: str) -> str:
    lines, targets = table(res)
    note = classifier_note(res) if res.get("classifier_epochs") else ""
    if "headline" in res:
        h = res["headline"]
        fixed, ours = h["rows"]
        cut = 1 - ours["fid"] / fixed["fid"]
        lines += [f"The NFE-5 target cell again at N={h['n']:,} ({h['model']}; `python bench/schedules.py --headline "
                  f"{h['n']}`, {h['wall_seconds'] / 60:.1f} min):", "",
                  "| grid | FID | KID x 1e3 | precision | recall |", "|---|---|---|---|---|"]
        lines += [f"| {x['sampler']} | {x['fid']:.2f} | {x['kid'] * 1e3:.2f} | {x['precision']:.3f} | "
                  f"{x['recall']:.3f} |" for x in h["rows"]] + [""]  # fmt: skip
        targets.append(f"at N={h['n']:,}, {h['model']}: NFE 5 learned {ours['fid']:.2f} vs best fixed "
                       f"{fixed['fid']:.2f} ({cut:+.0%} cut): " + ("met" if cut >= 0.25 else "NOT met"))  # fmt: skip
    return f"""### Learned time grids (`{res['command']}`)

Machine: {machine_line(res['machine'])}. FID / KID x 1e3 at N={res['n']:,} against {res['ref_name']}{note};
every row draws image i from the seed (0, i). Learned: `learn_schedule.py`
(LD3's objective against DPM-Solver++(2M) at NFE 100 on {res['trajectories']} trajectories seeded
({res.get('learn_seed', 0)}, i), at most
{res['max_evals']} loss evaluations of Nelder-Mead from the best fixed grid, its lowest time kept; "lowest free":
searched too); the minutes each took are in brackets.
Wall time of this benchmark: {res['wall_seconds'] / 60:.1f} min (cached schedules and rows count as zero).

{chr(10).join(lines)}
![FID vs NFE, learned and fixed grids]({link})

Targets: {'; '.join(targets) or 'not scored'}.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["mnist", "digits"], default="mnist")
    p.add_argument("--models", nargs="+", choices=["mnist", "flow"], default=["mnist", "flow"], help="MNIST models")
    p.add_argument("--num-samples", type=int, default=10_000)
    p.add_argument("--nfe", type=int, nargs="+", default=NFES)
    p.add_argument("--methods", nargs="+", default=[m["method"] for m in METHODS], help="a subset of the methods")
    p.add_argument("--fixed", nargs="+", default=FIXED, help="the fixed grids scored (a subset, to save time)")
    p.add_argument("--trajectories", type=int, default=64)
    p.add_argument("--max-evals", type=int, default=200)
    p.add_argument("--lowest", nargs="+", choices=list(LOWEST), default=list(LOWEST),
                   help="learn_schedule's rule for the lowest time: each scored as its own grid")  # fmt: skip
    p.add_argument("--render", action="store_true")
    p.add_argument("--headline", type=int, metavar="N", help="score the saved run's NFE-5 target cell again at N")
    a = p.parse_args()
    if a.headline is not None:
        res = saved_result(p, "schedules", "python bench/schedules.py")
        res["headline"] = headline(res, a.headline)
    elif a.render:
        res = saved_result(p, "schedules", "python bench/schedules.py")
    else:
        res = run(a)
        res["command"] = " ".join(["python bench/schedules.py", *sys.argv[1:]])
    fig = plot(res)
    link = save_figure(fig, "schedules")
    plt.close(fig)
    write_result("schedules", res, section(res, link))
    summary("schedules", "; ".join(table(res)[1]))


if __name__ == "__main__":
    main()
