"""DDIM Table 1 (Song et al. 2021) reproduced on digits: FID of DDIM eta x S and DDPM-1000 (fixed-small/large).

    python bench/ddim_table.py            # N=1,000 per cell (bench-full, ~50 min on 2 cores)
    python bench/ddim_table.py --quick    # N=200, S in {10, 50}, eta in {0, 1}: a smoke run

The model is train.py's default (digits 8x8, DDPM linear T=1000, eps, L_simple, 80 epochs), trained
once into outputs/bench/ddpm_linear. Every cell starts from the same x_T (seed 0) and is scored against
the same reference: Inception features of all 1,797 digits. Trajectory: DDIM's linear tau_i = floor(c i).
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from harness.common import (  # noqa: E402
    all_digits_uint8,
    fid_evaluator,
    finish_fid_plot,
    machine,
    machine_line,
    sample_and_score,
    summary,
    train_digits,
    train_seconds,
    with_variance,
    write_result,
)

from diffusion_lab.checkpoint import load_module  # noqa: E402
from diffusion_lab.diffusion import Sampler  # noqa: E402

PAPER_CIFAR10 = {  # DDIM Table 1, CIFAR-10 (shared/REFERENCE.md)
    0.0: {10: 13.36, 20: 6.84, 50: 4.67, 100: 4.16, 1000: 4.04},
    0.5: {10: 16.66, 20: 8.35, 50: 5.25, 100: 4.46, 1000: 4.29},
    1.0: {10: 41.07, 20: 18.36, 50: 8.01, 100: 5.78, 1000: 4.73},
    "sigma-hat": {10: 367.43, 20: 133.37, 50: 32.72, 100: 9.99, 1000: 3.17},
}


def run(n: int, steps: list[int], etas: list[float], with_ddpm: bool) -> dict:
    t_start = time.perf_counter()
    ckpt = train_digits("ddpm_linear", [])
    module = load_module(ckpt)
    ev = fid_evaluator()
    t0 = time.perf_counter()
    ref = ev.reference_features("digits-all", all_digits_uint8())
    ref_seconds = time.perf_counter() - t0
    cells = []
    for eta in etas:
        for s in steps:
            r = sample_and_score(module, Sampler("ddim", s, eta=eta), n, ev, ref)
            cells.append({"row": eta, "steps": s, **r})
            print(f"DDIM eta={eta:g} S={s}: FID {r['fid']:.2f} ({r['sample_seconds']:.1f}s sampling)", flush=True)
    if with_ddpm:
        fixed = module.diffusion
        for row, var in ((1.0, "fixed_small"), ("sigma-hat", "fixed_large")):
            module.diffusion = with_variance(module, var)
            r = sample_and_score(module, Sampler("ddpm", fixed.num_timesteps), n, ev, ref)
            cells.append({"row": row, "steps": fixed.num_timesteps, "variance": var, **r})
            print(f"DDPM-1000 {var}: FID {r['fid']:.2f} ({r['sample_seconds']:.1f}s sampling)", flush=True)
        module.diffusion = fixed
    return {
        "machine": machine(),
        "n": n,
        "ckpt": str(ckpt),
        "train_seconds": train_seconds("ddpm_linear"),
        "reference_seconds": ref_seconds,
        "cells": cells,
        "wall_seconds": time.perf_counter() - t_start,
    }


def fid(res: dict, row, steps: int) -> float | None:
    return next((c["fid"] for c in res["cells"] if c["row"] == row and c["steps"] == steps), None)


def plot(res: dict, name: str, quick: bool) -> str:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for eta in sorted({c["row"] for c in res["cells"] if c.get("variance") is None}):
        pts = sorted((c["steps"], c["fid"]) for c in res["cells"] if c["row"] == eta and c.get("variance") is None)
        ax.plot(*zip(*pts), marker="o", label=f"DDIM eta={eta:g}")
    for c in res["cells"]:
        if c.get("variance"):
            ls = "--" if c["variance"] == "fixed_small" else ":"
            ax.axhline(c["fid"], color="k", ls=ls, label=f"DDPM-1000 {c['variance']}")
    steps = [c["steps"] for c in res["cells"] if c.get("variance") is None]
    title = "DDIM Table 1 on digits (default model)"
    return finish_fid_plot(fig, ax, steps, "sampling steps S", res["n"], title, name, quick)


def section(res: dict, cmd: str, link: str) -> tuple[str, str]:
    steps = sorted({c["steps"] for c in res["cells"]})
    rows = [r for r in (0.0, 0.5, 1.0, "sigma-hat") if any(c["row"] == r for c in res["cells"])]

    def cell(row, s):
        ours, paper = fid(res, row, s), PAPER_CIFAR10[row].get(s)
        return ("—" if ours is None else f"{ours:.2f}") + (f" ({paper:g})" if paper is not None else "")

    name = {0.0: "0.0 (DDIM)", 0.5: "0.5", 1.0: "1.0 (S=1000: DDPM fixed-small)", "sigma-hat": "sigma-hat (DDPM)"}
    lines = ["| eta \\ S | " + " | ".join(map(str, steps)) + " |", "|---" * (len(steps) + 1) + "|"]
    lines += [f"| {name[r]} | " + " | ".join(cell(r, s) for s in steps) + " |" for r in rows]
    d50, d1000 = fid(res, 0.0, 50), fid(res, 1.0, 1000)
    e0, e1 = fid(res, 0.0, 10), fid(res, 1.0, 10)
    targets = []
    if d50 is not None and d1000 is not None:
        ratio = d50 / d1000
        targets.append(f"DDIM-50 (eta 0) / DDPM-1000 = {d50:.2f} / {d1000:.2f} = {ratio:.3f} "
                       f"(target <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")
    if e0 is not None and e1 is not None:
        ok = "met" if e0 < e1 else "NOT met"
        targets.append(f"S=10: eta 0 {e0:.2f} vs eta 1 {e1:.2f} ({ok}: eta 0 must be lower)")
    slowest = max(c["sample_seconds"] for c in res["cells"])
    train = f"{res['train_seconds']:.0f} s" if res["train_seconds"] else "reused"
    text = f"""## 4. DDIM Table 1 on digits (`bench/ddim_table.py`)

Command: `{cmd}` — machine: {machine_line(res['machine'])}.
Model: `python train.py` defaults (digits 8x8, DDPM linear T=1000, eps, L_simple, 0.9M-parameter U-Net,
80 epochs = 960 steps of batch 128, EMA 0.995; training {train}). FID of N={res['n']} samples (EMA weights,
the same x_T for every cell) against Inception features of all 1,797 digits (computed once,
{res['reference_seconds']:.0f} s, then cached). DDIM trajectory: linear (tau_i = floor(c i)); the paper's
CIFAR-10 row used the quadratic one. In parentheses: the paper's CIFAR-10 FID (DDIM Table 1).
Wall time of this benchmark: {res['wall_seconds'] / 60:.1f} min (slowest cell {slowest:.0f} s of sampling).

{chr(10).join(lines)}

![FID vs S]({link})

Targets: {'; '.join(targets) or 'not evaluated in this run'}.
"""
    line = "; ".join(targets)
    return text, line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N=200, S in {10, 50}, eta in {0, 1}, no DDPM-1000")
    p.add_argument("--num-samples", type=int, default=None)
    a = p.parse_args()
    if a.quick:
        res = run(a.num_samples or 200, [10, 50], [0.0, 1.0], with_ddpm=False)
        cmd = "python bench/ddim_table.py --quick"
    else:
        res = run(a.num_samples or 1000, [10, 20, 50, 100], [0.0, 0.5, 1.0], with_ddpm=True)
        cmd = "python bench/ddim_table.py"
    text, line = section(res, cmd, plot(res, "ddim_table", a.quick))
    write_result("ddim_table", res, text, a.quick)
    summary("ddim_table", line)


if __name__ == "__main__":
    main()
