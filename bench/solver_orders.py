"""Convergence order of every deterministic sampler against the exact probability-flow ODE (issue 14).

    python bench/solver_orders.py     # ~2 min on 2 cores: 4 (schedule, grid) pairs x 9 solvers x 6 NFE

Data N(0.1, 0.5^2 I) (diffusion_lab.diffusion.analytic.GaussianData), whose exact eps model and closed-form ODE
solution are known, T=1000, float64, 64 samples of 1x4x4. Error: RMS distance of each sampler's x_0 from the exact
ODE solution over the same time interval, at NFE 10 ... 320; the slope is the least-squares log-log slope over
NFE 40-320 (the asymptotic order). The tests (tests/test_solvers.py) assert bands around these slopes; this
script prints the numbers behind them, with DPM-Solver++(3M)'s two D2 weights (published, the default, and taylor).
"""

from __future__ import annotations

import math

import torch
from harness.common import machine, machine_line, summary, write_result

from diffusion_lab.diffusion import GaussianData, GaussianDiffusion, Sampler

METHODS = [
    ("ddim", {}),
    ("heun", {}),
    ("dpmpp_2m", {}),
    ("dpmpp_3m", {"d2_weight": "taylor"}),
    ("dpmpp_3m", {}),
    ("unipc", {"order": 2, "lower_order_final": False}),  # the method's own order (UniPC lowers its final steps
    ("unipc", {"order": 3, "lower_order_final": False}),  # at every N by default, as the official `sample` does)
    ("ipndm", {}),  # the default: the published fixed-step weights
    ("ipndm", {"variable_step": True}),
]
NFES = (10, 20, 40, 80, 160, 320)


def slope(nfes: list[int], errs: list[float]) -> float:
    lx, ly = [math.log(n) for n in nfes], [math.log(e) for e in errs]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return -sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run() -> dict:
    data = GaussianData(0.1, 0.5)
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = []
    for schedule in ("linear", "cosine"):
        diffusion = GaussianDiffusion.from_schedule(schedule, 1000)
        model = data.model(diffusion)
        for grid in ("karras", "logsnr"):
            for name, opts in METHODS:
                errs, nfes = [], []
                for nfe in NFES:
                    s = Sampler(name, nfe=nfe, spacing=grid, clip_denoised=False, **opts)
                    ts = s.timesteps(diffusion)
                    a_hi, a_lo = diffusion.alpha_bar_at(ts[-1]).item(), diffusion.alpha_bar_at(ts[0]).item()
                    exact = data.denoise(data.ode_flow(x_T, a_hi, a_lo), a_lo)
                    errs.append((s(diffusion, model, x_T) - exact).pow(2).mean().sqrt().item())
                    nfes.append(s.nfe)
                label = s.method.label(s.options)  # Sampler.label without the grid: one table row per solver
                label += " (published D2 weight)" if name == "dpmpp_3m" and not opts else ""
                rows.append(
                    {
                        "schedule": schedule,
                        "grid": grid,
                        "label": label,
                        "nfe": nfes,
                        "rms": errs,
                        "slope": slope(nfes[2:], errs[2:]),
                    }
                )
                print(f"{schedule}/{grid} {label}: slope {rows[-1]['slope']:.2f}", flush=True)
    return {"machine": machine(), "rows": rows}


def section(res: dict) -> str:
    pairs = list(dict.fromkeys((r["schedule"], r["grid"]) for r in res["rows"]))
    labels = list(dict.fromkeys(r["label"] for r in res["rows"]))
    at = {(r["schedule"], r["grid"], r["label"]): r for r in res["rows"]}
    lines = [
        "| solver | " + " | ".join(f"{s} / {g}: slope (RMS at NFE~10)" for s, g in pairs) + " |",
        "|---" * (len(pairs) + 1) + "|",
    ]
    for label in labels:
        cells = [f"{at[(s, g, label)]['slope']:.2f} ({at[(s, g, label)]['rms'][0]:.1e})" for s, g in pairs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return f"""## Solver convergence orders on exact Gaussian data (`bench/solver_orders.py`)

Command: `python bench/solver_orders.py` — machine: {machine_line(res["machine"])}. Least-squares log-log slope
of the RMS error against the exact probability-flow ODE solution over NFE 40-320 (the order the method
reaches), and the error at NFE ~10 in parentheses; T=1000, float64.

{chr(10).join(lines)}
"""


def main() -> None:
    torch.set_num_threads(1)
    res = run()
    write_result("solver_orders", res, section(res))
    summary("solver_orders", ", ".join(f"{r['label']} {r['slope']:.2f}" for r in res["rows"][:9]))


if __name__ == "__main__":
    main()
