"""The fast solvers against DDIM and DDPM: FID per network evaluation (issue 14), on one checkpoint each.

    python bench/solvers.py --data digits   # train.py's default digits model (trained once into outputs/bench)
    python bench/solvers.py --data mnist    # the experiment=mnist_cpu model (python bench/mnist.py --stage recipe)
    python bench/solvers.py --quick         # digits, N=200, NFE {5, 10}, four methods: a smoke run
    python bench/solvers.py --data mnist --num-samples 500 --also-spacing ddim   # + 2M and UniPC on DDIM's grid
    python bench/solvers.py --data mnist --methods ddim dpmpp_2m unipc --nfe 5 10 20   # a subset
    python bench/solvers.py --data mnist --no-reference   # without DDPM-1000 (~70 of the run's minutes)

Every method at NFE in {5, 10, 20, 50} plus DDPM-1000 (the reference), N=1,000 samples of the EMA weights, all
with image i seeded by (seed 0, i) for every sampler (the same x_T); FID/KID and improved precision/recall on the
same Inception features (and the classifier score on MNIST), seconds per sample; DDIM with eta 0 and 1. Each
method runs with its registry defaults (diffusion_lab/diffusion/registry.py), its default grid included.
Targets: at NFE 10 the best solver's FID excess over DDPM-1000 is at most 1/3 of DDIM-10's; at NFE 5 the best
solver beats DDIM-10. Rows are cached (outputs/bench/rows/), so a re-run only computes what is missing.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from harness.common import (  # noqa: E402
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
from diffusion_lab.diffusion.registry import METHODS as REGISTRY  # noqa: E402
from diffusion_lab.eval.report import plot_fid_vs_nfe  # noqa: E402

METHODS = ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "euler", "heun", "euler_ancestral"]
NFES = [5, 10, 20, 50]
ALSO_METHODS = ["dpmpp_2m", "unipc"]  # --also-spacing: these on another grid too


def model_and_reference(data: str):
    """(module, evaluator, reference features, reference name, classifier or None, its epochs, checkpoint)."""
    if data == "digits":
        ev, ckpt = fid_evaluator(), train_digits("ddpm_linear", [])
        return load_module(ckpt), ev, ev.reference_features("digits-all", all_digits_uint8()), "all 1,797 digits", \
            None, None, ckpt  # fmt: skip
    from harness.mnist import DATASETS, mnist_setup, recipe_checkpoint

    ds = DATASETS["mnist"]
    ckpt = recipe_checkpoint(ds)
    ev, ref, classifier, info, _ = mnist_setup(ds)
    return load_module(ckpt), ev, ref, ds.test_set, classifier, info["epochs"], ckpt


def run(data: str, n: int, methods: list[str], nfes: list[int], with_ddpm: bool, also: list[str] = ()) -> dict:
    t0 = time.perf_counter()
    module, ev, ref, ref_name, classifier, epochs, ckpt = model_and_reference(data)
    samplers = [Sampler(m, nfe=k) for m in methods for k in nfes]
    samplers += [Sampler("ddim", nfe=k, eta=1.0) for k in nfes if "ddim" in methods]  # DDIM's stochastic end
    samplers += [Sampler(m, nfe=k, spacing=sp) for sp in also for m in ALSO_METHODS for k in nfes]
    samplers = list({s.name: s for s in samplers}.values())  # Heun: NFE 9 and 10 are the same 5 steps
    roles = {}
    if with_ddpm:
        ddpm = Sampler("ddpm", module.diffusion.num_timesteps)
        samplers.append(ddpm)
        roles[ddpm.name] = "reference"
    cache = RUNS / "rows" / f"{data}-{ckpt.parent.parent.name}.json"
    rows = scored_rows(module, samplers, n, ev, ref, ref_name, cache, classifier=classifier, roles=roles)
    return {"machine": machine(), "data": data, "n": n, "ckpt": str(ckpt), "reference": ref_name, "rows": rows,
            "wall_seconds": time.perf_counter() - t0,
            **({"classifier_epochs": epochs} if classifier is not None else {})}


def targets(rows: list[dict]) -> list[str]:
    ref = next((r for r in rows if r["role"] == "reference"), None)
    out = []
    ddim10 = next((r for r in rows if r["sampler"] == "ddim10_eta0"), None)  # DDIM's deterministic row
    if ref and ddim10:
        best10 = min((r for r in rows if r["role"] != "reference" and r["nfe"] == 10), key=lambda r: r["fid"])
        ex_best, ex_ddim = best10["fid"] - ref["fid"], ddim10["fid"] - ref["fid"]
        ok = ex_best <= ex_ddim / 3
        out.append(
            f"NFE 10: best {best10['label']} FID {best10['fid']:.2f}, excess over DDPM-{ref['nfe']} {ex_best:.2f} vs "
            f"DDIM-10's {ex_ddim:.2f} (target <= 1/3 = {ex_ddim / 3:.2f}: {'met' if ok else 'NOT met'})"
        )
    five = [r for r in rows if r["role"] != "reference" and r["nfe"] == 5]
    if five and ddim10:
        best5 = min(five, key=lambda r: r["fid"])
        ok = best5["fid"] < ddim10["fid"]
        out.append(
            f"NFE 5: best {best5['label']} FID {best5['fid']:.2f} vs DDIM-10 {ddim10['fid']:.2f} "
            f"({'met' if ok else 'NOT met'})"
        )
    return out


def section(res: dict, cmd: str, link: str) -> str:
    rows = res["rows"]
    nfes = sorted({r["nfe"] for r in rows if r["role"] != "reference"})
    labels = list(dict.fromkeys(r["label"] for r in rows if r["role"] != "reference"))

    def cell(label, k):
        r = next((r for r in rows if r["label"] == label and r["nfe"] == k), None)
        return "—" if r is None else f"{r['fid']:.2f} ({r['precision']:.2f}/{r['recall']:.2f})"

    head = "| method (grid) \\ NFE | " + " | ".join(map(str, nfes)) + " | s/sample at the largest NFE |"
    lines = [head, "|---" * (len(nfes) + 2) + "|"]
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        spacing = mine[0]["spacing"]
        slow = max(mine, key=lambda r: r["nfe"])["seconds_per_sample"]
        grid = f" ({spacing})" if spacing == REGISTRY[mine[0]["method"]].spacing else ""  # else in the label
        lines.append(f"| {label}{grid} | " + " | ".join(cell(label, k) for k in nfes) + f" | {slow:.4f} |")
    ref = [r for r in rows if r["role"] == "reference"]
    for r in ref:
        lines.append(f"| {r['label']}, {r['nfe']} steps (reference): {r['fid']:.2f} ({r['precision']:.2f}/"
                     f"{r['recall']:.2f}) at NFE {r['nfe']} " + "| — " * len(nfes)
                     + f"| {r['seconds_per_sample']:.4f} |")
    cls = [r for r in rows if "cls_score" in r]
    cls_line = ""
    if cls:
        best = max(cls, key=lambda r: r["cls_score"])
        worst = min(r["cls_score"] for r in cls)
        cls_line = (f"Classifier score (10 = best): {worst:.2f} to {best['cls_score']:.2f} ({best['sampler']}); "
                    f"per row in `bench/results/solvers_{res['data']}.json`{classifier_note(res)}.\n")
    return f"""### Solvers on {res['data']} (`{cmd}`)

Machine: {machine_line(res['machine'])}. Checkpoint: `{res['ckpt']}`; N={res['n']} per cell against
{res['reference']}; cells are FID (precision/recall, k=3). Wall time: {res['wall_seconds'] / 60:.1f} min
(rows reused from the cache count as zero).

{chr(10).join(lines)}

![FID vs NFE]({link})

{cls_line}Targets: {'; '.join(targets(rows)) or 'not evaluated in this run'}.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["digits", "mnist"], default="digits")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--also-spacing", nargs="*", default=[], help=f"{ALSO_METHODS} on these grids as well")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="a subset of the methods")
    p.add_argument("--nfe", nargs="+", type=int, default=NFES, help="a subset of the NFE budgets")
    p.add_argument("--render", action="store_true", help="--data's section and plot again from its saved results")
    p.add_argument("--no-reference", action="store_true",
                   help="leave out DDPM with all T steps (on MNIST at N=1,000 about 70 min of the run on 2 CPU cores)")
    a = p.parse_args()
    if a.render:
        res = saved_result(p, f"solvers_{a.data}", f"python bench/solvers.py --data {a.data}", a.quick)
        cmd = res.get("command", f"python bench/solvers.py --data {a.data}")
    elif a.quick:
        res = run("digits", a.num_samples or 200, ["ddim", "dpmpp_2m", "unipc", "heun"], [5, 10], with_ddpm=False)
        cmd = "python bench/solvers.py --quick"
    else:
        res = run(a.data, a.num_samples or 1000, a.methods, a.nfe, with_ddpm=not a.no_reference, also=a.also_spacing)
        cmd = f"python bench/solvers.py --data {a.data}" + (f" --num-samples {a.num_samples}" if a.num_samples else "")
        cmd += f" --methods {' '.join(a.methods)}" if a.methods != METHODS else ""
        cmd += f" --nfe {' '.join(map(str, a.nfe))}" if a.nfe != NFES else ""
        cmd += f" --also-spacing {' '.join(a.also_spacing)}" if a.also_spacing else ""
        cmd += " --no-reference" if a.no_reference else ""
    res["command"] = cmd
    name = f"solvers_{res['data']}"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    plot_fid_vs_nfe(res["rows"], None, title=f"FID vs NFE, {res['data']} (N={res['n']})", ax=ax)
    ax.set_yscale("log")  # the cells span 10-350: on a linear axis the useful samplers overlap
    fig.tight_layout()
    link = save_figure(fig, name, a.quick)
    plt.close(fig)
    write_result(name, res, section(res, cmd, link), a.quick)
    summary("solvers", "; ".join(targets(res["rows"])) or "done")


if __name__ == "__main__":
    main()
