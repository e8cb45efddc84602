"""IDDPM at few steps (Nichol & Dhariwal 2021, Fig. 8) on digits: cosine + learned-range + hybrid vs
linear + fixed + simple, same budget, DDPM ancestral sampling respaced to 25, 50 and 100 steps; bits/dim.

    python bench/iddpm_steps.py           # N=1,000 per cell, bits/dim on the 180 held-out digits
    python bench/iddpm_steps.py --quick   # N=200, 25 and 100 steps, bits/dim on 36 digits

Models: `python train.py` (= linear + fixed-small + L_simple, shared with ddim_table.py) and
`python train.py experiment=iddpm_cosine` (cosine + learned-range + L_hybrid + loss-aware t), both
80 epochs. Same x_T for every cell; FID against all 1,797 digits (the reference of ddim_table.py).
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
    write_result,
)

from diffusion_lab.checkpoint import load_module  # noqa: E402
from diffusion_lab.diffusion import Sampler  # noqa: E402
from diffusion_lab.eval.bpd import bits_per_dim  # noqa: E402

MODELS = {  # name -> (train.py overrides, description)
    "ddpm_linear": ([], "linear + fixed-small + L_simple (uniform t)"),
    "iddpm_cosine": (["experiment=iddpm_cosine"], "cosine + learned-range + L_hybrid (loss-aware t)"),
}


def run(n: int, steps: list[int], bpd_images: int) -> dict:
    t_start = time.perf_counter()
    ev = fid_evaluator()
    ref = ev.reference_features("digits-all", all_digits_uint8())
    from diffusion_lab.data import DigitsDataModule

    held_out = DigitsDataModule().real_images("val")[:bpd_images]
    out = {"machine": machine(), "n": n, "models": {}}
    for name, (overrides, desc) in MODELS.items():
        module = load_module(train_digits(name, overrides))
        cells = []
        for s in steps:
            r = sample_and_score(module, Sampler("ddpm", s, spacing="even"), n, ev, ref)
            cells.append({"steps": s, **r})
            print(f"{name} DDPM respaced to {s}: FID {r['fid']:.2f} ({r['sample_seconds']:.1f}s)", flush=True)
        t0 = time.perf_counter()
        bpd = (
            bits_per_dim(module.diffusion, module.net, held_out, batch_size=180, null_label=module.null_label)
            if bpd_images
            else None
        )
        out["models"][name] = {
            "description": desc,
            "train_seconds": train_seconds(name),
            "cells": cells,
            "bpd": bpd,
            "bpd_seconds": time.perf_counter() - t0,
        }
    out["wall_seconds"] = time.perf_counter() - t_start
    return out


def plot(res: dict, name: str, quick: bool) -> str:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for m in res["models"].values():
        ax.plot([c["steps"] for c in m["cells"]], [c["fid"] for c in m["cells"]], marker="o", label=m["description"])
    steps = [c["steps"] for m in res["models"].values() for c in m["cells"]]
    title = "IDDPM vs DDPM at few steps (digits)"
    return finish_fid_plot(fig, ax, steps, "respaced DDPM steps", res["n"], title, name, quick)


def section(res: dict, cmd: str, link: str) -> tuple[str, str]:
    ms = res["models"]
    a, b = ms["iddpm_cosine"], ms["ddpm_linear"]
    steps = [c["steps"] for c in a["cells"]]
    lines = ["| model | " + " | ".join(f"FID @ {s}" for s in steps) + " | bits/dim | train s |",
             "|---" * (len(steps) + 3) + "|"]
    for m in (b, a):
        bpd = f"{m['bpd']['bpd']:.3f} (L_0 {m['bpd']['decoder_bpd']:.3f})" if m["bpd"] else "—"
        train = f"{m['train_seconds']:.0f}" if m["train_seconds"] else "reused"
        lines.append(f"| {m['description']} | " + " | ".join(f"{c['fid']:.2f}" for c in m["cells"]) +
                     f" | {bpd} | {train} |")
    wins = [ca["fid"] < cb["fid"] for ca, cb in zip(a["cells"], b["cells"])]
    verdict = (f"IDDPM lower FID at {sum(wins)}/{len(wins)} step counts "
               f"({'met' if all(wins) else 'NOT met'}: the target is all)")
    if a["bpd"] and b["bpd"]:
        verdict += f"; bits/dim IDDPM {a['bpd']['bpd']:.3f} vs DDPM {b['bpd']['bpd']:.3f}"
    n_bpd = a["bpd"]["n"] if a["bpd"] else 0
    text = f"""## 5. IDDPM vs DDPM at few sampling steps (`bench/iddpm_steps.py`)

Command: `{cmd}` — machine: {machine_line(res['machine'])}.
Both models: digits 8x8, T=1000, the same 0.9M-parameter U-Net (the IDDPM one outputs 2 channels), 80 epochs
(`python train.py` and `python train.py experiment=iddpm_cosine`). Sampling: DDPM ancestral on the process
respaced to S evenly spaced steps (IDDPM Sec. 4), each model with its own variance (fixed-small /
learned-range). FID of N={res['n']} (same x_T) vs all 1,797 digits. Bits/dim: the full variational bound
(T terms + prior) on {n_bpd} held-out digits. Wall time: {res['wall_seconds'] / 60:.1f} min.

{chr(10).join(lines)}

![FID vs steps]({link})

Result: {verdict}.
"""
    return text, verdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--num-samples", type=int, default=None)
    a = p.parse_args()
    if a.quick:
        res, cmd = run(a.num_samples or 200, [25, 100], 36), "python bench/iddpm_steps.py --quick"
    else:
        res, cmd = run(a.num_samples or 1000, [25, 50, 100], 180), "python bench/iddpm_steps.py"
    text, line = section(res, cmd, plot(res, "iddpm_steps", a.quick))
    write_result("iddpm_steps", res, text, a.quick)
    summary("iddpm_steps", line)


if __name__ == "__main__":
    main()
