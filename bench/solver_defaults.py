"""Which solver defaults? FID on the MNIST recipe for each contested choice, two seeds each (issue 33).

    python bench/solver_defaults.py                  # every cell, seed 0 then seed 1 (cached: re-runs resume)
    python bench/solver_defaults.py --seeds 0        # one seed
    python bench/solver_defaults.py --render         # the BENCHMARKS.md section from the saved cells

The experiment=mnist_cpu checkpoint (bench/mnist.py --stage recipe trains it), N=300 samples per cell against the
10,000 MNIST test images, images seeded per (seed, index) (diffusion_lab.diffusion.seeding), so the two seeds are
two independent draws of 300 and their difference is the spread a choice must beat. The choices: each multistep
method's default grid (logsnr or trailing), the order lowering at the end (lower_order_final true / "early" /
false), DPM-Solver++(3M)'s D2 weight (published / taylor / auto), UniPC's order, iPNDM's weights and grid, the
Karras-style methods' grid, DDIM's grid.
"""

from __future__ import annotations

import argparse
import json
import time

from harness.common import RUNS, machine, machine_line, summary, write_result
from harness.mnist import DATASETS, mnist_setup, recipe_checkpoint
from harness.solver_peers import cell_key

N = 300
# (group, method, options, spacing, NFE list): the cells, in the order they are run.
CELLS = [
    ("grid", "dpmpp_2m", {}, "logsnr", [5, 10, 20, 50]),
    ("grid", "dpmpp_2m", {}, "trailing", [5, 10, 20, 50]),
    ("grid", "unipc", {"order": 3}, "logsnr", [5, 10, 20, 50]),
    ("grid", "unipc", {"order": 3}, "trailing", [5, 10, 20, 50]),
    ("grid", "dpmpp_3m", {}, "logsnr", [5, 10, 20, 50]),
    ("grid", "dpmpp_3m", {}, "trailing", [5, 10, 20, 50]),
    ("order", "unipc", {"order": 2}, "logsnr", [5, 10, 20, 50]),
    ("order", "unipc", {"order": 2}, "trailing", [5, 10, 20, 50]),
    ("lowering", "unipc", {"order": 3, "lower_order_final": "early"}, "logsnr", [10, 20]),
    ("lowering", "unipc", {"order": 3, "lower_order_final": False}, "logsnr", [10, 20]),
    ("lowering", "unipc", {"order": 3, "lower_order_final": "early"}, "trailing", [10, 20]),
    ("lowering", "unipc", {"order": 3, "lower_order_final": False}, "trailing", [10, 20]),
    ("lowering", "dpmpp_2m", {"lower_order_final": "early"}, "logsnr", [10]),
    ("lowering", "dpmpp_2m", {"lower_order_final": "early"}, "trailing", [10]),
    ("d2_weight", "dpmpp_3m", {"d2_weight": "taylor"}, "logsnr", [10, 20, 50]),
    ("d2_weight", "dpmpp_3m", {"d2_weight": "taylor"}, "trailing", [10, 20, 50]),
    ("ddim", "ddim", {}, "ddim", [10, 20, 50]),
    ("ddim", "ddim", {}, "trailing", [10, 20, 50]),
    ("ddim", "ddim", {}, "logsnr", [10, 20, 50]),
    ("ipndm", "ipndm", {"variable_step": True}, "karras", [10, 20]),
    ("ipndm", "ipndm", {"variable_step": True}, "trailing", [10, 20]),
    ("ipndm", "ipndm", {"variable_step": False}, "karras", [10, 20]),
    ("ipndm", "ipndm", {"variable_step": False}, "trailing", [10, 20]),
    ("karras_methods", "euler", {}, "karras", [10, 20]),
    ("karras_methods", "euler", {}, "trailing", [10, 20]),
    ("karras_methods", "heun", {}, "karras", [9, 19]),
    ("karras_methods", "heun", {}, "trailing", [9, 19]),
    ("karras_methods", "heun", {}, "logsnr", [9, 19, 39]),
    ("karras_methods", "heun", {}, "karras", [39]),
    ("karras_methods", "euler", {}, "logsnr", [10, 20]),
    ("karras_methods", "euler_ancestral", {}, "karras", [10, 20]),
    ("karras_methods", "euler_ancestral", {}, "trailing", [10, 20]),
    ("karras_methods", "euler_ancestral", {}, "logsnr", [10, 20]),
    ("crossover", "dpmpp_2m", {}, "logsnr", [15]),
    ("crossover", "dpmpp_2m", {}, "trailing", [15]),
    ("crossover", "unipc", {"order": 2}, "logsnr", [15]),
    ("crossover", "unipc", {"order": 2}, "trailing", [15]),
    ("crossover", "dpmpp_3m", {}, "logsnr", [15]),
    ("crossover", "dpmpp_3m", {}, "trailing", [15]),
    ("ipndm", "ipndm", {"variable_step": True}, "logsnr", [20, 50]),
    ("ipndm", "ipndm", {"variable_step": False}, "logsnr", [20, 50]),
    ("ddim", "ddim", {"eta": 1.0}, "ddim", [10, 20, 50]),
    ("ddim", "ddim", {"eta": 1.0}, "trailing", [10, 20, 50]),
    ("ddim", "ddim", {"eta": 1.0}, "logsnr", [10, 20, 50]),
]


key = cell_key


def run(seeds: list[int]) -> dict:
    from diffusion_lab.checkpoint import load_module
    from diffusion_lab.diffusion import Sampler
    from diffusion_lab.eval.scoring import sample_and_score
    from diffusion_lab.io import atomic_write

    ds = DATASETS["mnist"]
    ckpt = recipe_checkpoint(ds)
    module = load_module(ckpt)
    ev, ref, classifier, info, _ = mnist_setup(ds)
    cache = RUNS / "rows" / f"solver_defaults-{ckpt.parent.parent.name}.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    for seed in seeds:
        for group, method, options, spacing, nfes in CELLS:
            for nfe in nfes:
                k = key(method, options, spacing, nfe, seed)
                if k in done:
                    continue
                s = Sampler(method, nfe=nfe, spacing=spacing, **options)
                t0 = time.perf_counter()
                scores, _ = sample_and_score(module, s, num_samples=N, seed=seed, batch_size=N, evaluator=ev,
                                          reference=ref, classifier=classifier)
                done[k] = {"group": group, "method": method, "options": options, "resolved": s.options,
                           "spacing": spacing, "nfe": s.nfe,
                           "seed": seed, "label": s.label, **{m: scores[m] for m in
                           ("fid", "kid", "precision", "recall", "cls_score", "confident")},
                           "seconds": time.perf_counter() - t0}
                cache.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(cache) as tmp:
                    tmp.write_text(json.dumps(done, indent=1))
                summary("solver_defaults", f"{k}: FID {scores['fid']:.2f}")
    return {"machine": machine(), "ckpt": str(ckpt), "n": N, "cells": done, "classifier_epochs": info["epochs"]}


def fid(cells: dict, method, options, spacing, nfe, seed):
    r = cells.get(key(method, options, spacing, nfe, seed))
    return None if r is None else r["fid"]


def section(res: dict) -> str:
    cells = res["cells"]
    seeds = sorted({r["seed"] for r in cells.values()})
    cols = sorted({n for *_, ns in CELLS for n in ns})
    lines = ["| choice | grid | " + " | ".join(f"NFE {n}" for n in cols) + " |", "|---" * (len(cols) + 2) + "|"]
    spreads = []
    rows = [("default", m, {}, sp, n) for _, m, o, sp, n in CELLS if not o] + [
        (g, m, o, sp, n) for g, m, o, sp, n in CELLS if o]
    seen = set()
    for _, method, options, spacing, _ in rows:
        name = f"{method} " + " ".join(f"{k}={v}" for k, v in options.items())
        if (name, spacing) in seen:
            continue
        seen.add((name, spacing))
        out = []
        for n in cols:
            vals = [fid(cells, method, options, spacing, n, s) for s in seeds]
            vals = [v for v in vals if v is not None]
            if not vals:
                out.append("")
                continue
            if len(vals) > 1:
                spreads.append(abs(vals[0] - vals[1]))
            out.append(" / ".join(f"{v:.1f}" for v in vals))
        lines.append(f"| {name.strip()} | {spacing} | " + " | ".join(out) + " |")
    spread = (f"Median |seed 0 - seed 1| over the {len(spreads)} cells with both: "
              f"{sorted(spreads)[len(spreads) // 2]:.2f} FID (largest {max(spreads):.2f}).") if spreads else ""
    return f"""### Solver defaults on the MNIST recipe (`python bench/solver_defaults.py`)

Machine: {machine_line(res['machine'])}. Checkpoint `{res['ckpt']}` (experiment=mnist_cpu); N={res['n']} per cell
against the 10,000 MNIST test images; cells are FID for seed {' / seed '.join(map(str, seeds))} (two independent
draws of {res['n']} images). {spread}

{chr(10).join(lines)}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--render", action="store_true")
    a = p.parse_args()
    if a.render:
        from harness.common import results_dir

        res = json.loads((results_dir() / "solver_defaults.json").read_text())
    else:
        res = run(a.seeds)
    write_result("solver_defaults", res, section(res))


if __name__ == "__main__":
    main()
