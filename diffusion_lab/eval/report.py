"""Result tables (CSV, Markdown) and the FID-vs-steps plot of an evaluation, written atomically."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..io import atomic_write  # noqa: E402

COLUMNS = ["sampler", "method", "steps", "eta", "fid", "kid", "kid_std", "n", "n_ref", "reference", "sample_seconds"]


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict], extra: str = "") -> str:
    """One row per sampler: FID, KID, N and the reference set, as DDIM Table 1 lays out its columns."""
    lines = [
        "| sampler | steps | eta | FID | KID x1e3 | N | reference | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['steps']} | {r['eta']:g} | {r['fid']:.2f} | {1e3 * r['kid']:.2f} ± "
            f"{1e3 * r['kid_std']:.2f} | {r['n']} | {r['reference']} (N={r['n_ref']}) | {r['sample_seconds']:.1f} |"
        )
    return "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"


def write_markdown(rows: list[dict], path: Path, extra: str = "") -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(markdown_table(rows, extra))


def plot_fid_vs_steps(rows: list[dict], path: Path, title: str = "") -> None:
    """FID against steps (log x), one line per (method, eta); single-step methods as points."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for key in sorted({(r["method"], r["eta"]) for r in rows}):
        pts = sorted((r["steps"], r["fid"]) for r in rows if (r["method"], r["eta"]) == key)
        label = f"DDIM eta={key[1]:g}" if key[0] == "ddim" else "DDPM"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(f"FID (N={rows[0]['n']})" if rows else "FID")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
