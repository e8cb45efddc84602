"""Join the benchmark sections into one Markdown file.

    python bench/report.py            # bench/results/*.md + bench/ANALYSIS.md -> BENCHMARKS.md
    python bench/report.py --quick    # bench/results/quick/*.md -> bench/results/quick/BENCHMARKS.md

A benchmark that has not been run is listed as missing, with the command that produces it.
"""

from __future__ import annotations

import argparse

from harness.common import ROOT, atomic_write, results_dir

ORDER = [
    ("train_throughput", "python bench/train_throughput.py"),
    ("train_levers", "python bench/train_throughput.py --levers"),
    ("train_gap", "python bench/train_throughput.py --gap cifar10"),
    ("allocator", "python bench/allocator.py"),
    ("sampling", "python bench/sampling.py"),
    ("fid", "python bench/fid.py"),
    ("ddim_table", "python bench/ddim_table.py"),
    ("iddpm_steps", "python bench/iddpm_steps.py"),
    ("loss_aware", "python bench/loss_aware.py"),
    ("solver_orders", "python bench/solver_orders.py"),
    ("solver_peers", "python bench/solver_peers.py"),
    ("solvers_digits", "python bench/solvers.py --data digits"),
    ("mnist", "python bench/mnist.py"),
    ("solver_defaults", "python bench/solver_defaults.py"),
    ("solvers_mnist", "python bench/solvers.py --data mnist"),
    ("convergence", "python bench/convergence.py"),
    ("processes", "python bench/processes.py"),
    ("posthoc_ema", "python bench/posthoc_ema.py"),
    ("stream", "python bench/stream.py"),
    ("few_step", "python bench/few_step.py"),
    ("schedules", "python bench/schedules.py"),
    ("guidance", "python bench/guidance.py"),
]
QUICK = {"train_throughput", "sampling", "fid", "loss_aware", "solvers_digits"}  # what `make bench` runs

HEADER = """# Benchmarks

Written by `bench/report.py` from the sections each benchmark writes (`bench/results/<name>.md`, numbers in
`<name>.json`). Re-run: `make bench-full` (every section at full size: several hours on 2 cores, each
section states its own wall time) or `make bench` (the quick subset: throughput, sampling, FID at N=300,
loss-aware cost, a solver smoke run; it writes `bench/results/quick/BENCHMARKS.md` and leaves this file
alone). Peer packages come from the `dev` and `bench` extras
(`pip install -e '.[dev,bench]'`, which `make bench` does). Each section names its machine, date and command;
ratios compare runs on the same machine, in the same session, with the same threads. None of this is a
timed test.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    d = results_dir(a.quick)
    parts = [HEADER]
    for name, cmd in ORDER:
        if a.quick and name not in QUICK:
            continue
        f = d / f"{name}.md"
        quick_cmd = "python bench/solvers.py --quick" if name == "solvers_digits" else f"{cmd} --quick"
        missing = f"## {name}\n\nNot run yet: `{quick_cmd if a.quick else cmd}`.\n"
        parts.append(f.read_text() if f.exists() else missing)
    analysis = ROOT / "bench" / "ANALYSIS.md"
    if not a.quick and analysis.exists():
        parts.append(analysis.read_text())
    out = d / "BENCHMARKS.md" if a.quick else ROOT / "BENCHMARKS.md"
    with atomic_write(out) as tmp:
        tmp.write_text("\n".join(parts))
    print(f"[bench:report] wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
