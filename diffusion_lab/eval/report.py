"""Result tables (CSV, Markdown) and the FID-vs-NFE plot of an evaluation, written atomically.

A row is one sampler's scores: `row(sampler, scores, ...)`; rows with role "reference" (DDPM at the full T by
default) are drawn as dashed horizontal lines, every other (method, options, spacing) label is one curve.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from ..io import atomic_write  # noqa: E402

COLUMNS = [
    "sampler", "label", "role", "method", "steps", "nfe", "spacing", "eta", "fid", "kid", "kid_std", "precision",
    "recall", "cls_score", "confident", "n", "n_ref", "reference", "sample_seconds", "seconds_per_sample", "ema",
]  # fmt: skip


def row(sampler, scores: dict, reference: str, seconds: float, role: str = "curve") -> dict:
    """A results row: the sampler's identity (from the registry), its scores, the reference set, the time."""
    return {
        "sampler": sampler.name,
        "label": sampler.label,
        "role": role,
        "method": sampler.method.name,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "spacing": sampler.spacing,
        "eta": sampler.options.get("eta", ""),
        **scores,
        "reference": reference,
        "sample_seconds": seconds,
        "seconds_per_sample": scores.get("seconds_per_sample", seconds / max(1, scores.get("n", 1))),
    }


def write_csv(rows: list[dict], path: Path) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _num(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, int | float) else "-"


def markdown_table(rows: list[dict], extra: str = "") -> str:
    """One row per sampler: NFE, FID, KID, precision/recall (and the classifier score where there is one)."""
    cls = any("cls_score" in r for r in rows)
    ema = any("ema" in r for r in rows)
    head = "| sampler | label |" + (" EMA |" if ema else "") + " NFE | FID | KID x1e3 | precision | recall |"
    head += (" cls score | confident |" if cls else "") + " N | reference | s/sample |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['sampler']} | {r['label']} |" + (f" {r.get('ema', '')} |" if ema else "")
            + f" {r['nfe']} | {r['fid']:.2f} | {1e3 * r['kid']:.2f} ± "
            f"{1e3 * r['kid_std']:.2f} | {_num(r.get('precision'), '.3f')} | {_num(r.get('recall'), '.3f')} |"
        )
        if cls:
            line += f" {_num(r.get('cls_score'), '.2f')} | {_num(r.get('confident'), '.3f')} |"
        line += f" {r['n']} | {r['reference']} (N={r['n_ref']}) | {r['seconds_per_sample']:.4f} |"
        lines.append(line)
    return "\n".join(lines) + ("\n\n" + extra if extra else "") + "\n"


def write_markdown(rows: list[dict], path: Path, extra: str = "") -> None:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(markdown_table(rows, extra))


def tick_labels(nfes: list[int], min_decades: float = 0.08) -> list[str]:
    """Labels for ascending NFE ticks on a log axis; a tick closer than `min_decades` to a larger labelled one stays
    unlabelled (Heun's odd budgets, 9 and 19, beside 10 and 20, would print on top of each other)."""
    labels, kept = [], None
    for n in reversed(nfes):
        crowded = kept is not None and math.log10(kept / n) < min_decades
        labels.append("" if crowded else str(n))
        kept = kept if crowded else n
    return labels[::-1]


def plot_fid_vs_nfe(rows: list[dict], path: Path, title: str = "", ax=None) -> None:
    """FID against network evaluations (log x): one line per label, reference rows as dashed horizontal lines."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    curves = [r for r in rows if r.get("role") != "reference"]
    for label in dict.fromkeys(r["label"] for r in curves):
        pts = sorted((r["nfe"], r["fid"]) for r in curves if r["label"] == label)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    for i, r in enumerate(r for r in rows if r.get("role") == "reference"):
        alpha = max(0.15, 0.7 - 0.2 * i)
        ax.axhline(r["fid"], color="black", ls="--", lw=1, alpha=alpha, label=f"{r['label']}, {r['nfe']} NFE")
    nfes = sorted({r["nfe"] for r in curves})
    _finish_fid_axes(ax, rows, nfes, tick_labels(nfes), "network evaluations per sample (NFE)", title)
    if own:
        _save(fig, path)


def _finish_fid_axes(ax, rows: list[dict], ticks: list, labels: list[str], xlabel: str, title: str) -> None:
    """Log x with `ticks` labelled, FID (N) on y, title, grid, legend: what every FID plot here shares."""
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(ticks, labels)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"FID (N={rows[0]['n']})" if rows else "FID")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def plot_fid_vs_ema(rows: list[dict], path: Path, title: str = "") -> None:
    """FID against the post-hoc EMA's sigma_rel (log x), one line per sampler; the run's own EMA (dashed) and the
    raw weights (dotted) as horizontal lines in the sampler's colour."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, name in zip(colors * 4, dict.fromkeys(r["sampler"] for r in rows)):
        mine = [r for r in rows if r["sampler"] == name]
        pts = sorted((float(r["ema"]), r["fid"]) for r in mine if r.get("ema") not in (None, "run", "raw"))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=f"{name}: post-hoc EMA")
        for tag, ls in (("run", "--"), ("raw", ":")):
            for r in (r for r in mine if r.get("ema") == tag):
                ax.axhline(r["fid"], color=color, ls=ls, lw=1, label=f"{name}: {'run EMA' if tag == 'run' else 'raw'}")
    rels = sorted({float(r["ema"]) for r in rows if r.get("ema") not in (None, "run", "raw")})
    _finish_fid_axes(ax, rows, rels, [f"{x:g}" for x in rels], "sigma_rel (EMA length relative to training time)",
                     title)  # fmt: skip
    _save(fig, path)
