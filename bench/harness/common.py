"""What the benchmarks share: machine facts, result files, timing, trained digits models, matched peers.

Each benchmark writes `bench/results/<name>.json` (numbers) and `<name>.md` (its BENCHMARKS.md
section) atomically; `bench/report.py` joins the sections into BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from diffusion_lab.io import atomic_write

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
RUNS = ROOT / "outputs" / "bench"
CACHE = ROOT / ".cache"


def machine() -> dict:
    """CPU model, cores, torch threads, memory and versions: the line every result carries."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    return (
        f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gib']} GiB, "
        f"torch {m['torch']}, Python {m['python']}, {m['date']}"
    )


def results_dir(quick: bool = False) -> Path:
    """bench/results (bench-full, what BENCHMARKS.md shows) or bench/results/quick (`make bench`)."""
    return RESULTS / "quick" if quick else RESULTS


def saved_result(parser, name: str, command: str, quick: bool = False) -> dict:
    """The results a benchmark saved (`--render`), or the parser's one-line error naming the command to run."""
    saved = results_dir(quick) / f"{name}.json"
    if not saved.exists():
        parser.error(f"--render: {saved} does not exist; run `{command}` first")
    return json.loads(saved.read_text())


def write_result(name: str, data: dict, section: str, quick: bool = False) -> None:
    """<results>/<name>.json and <name>.md (the section), each replaced atomically."""
    with atomic_write(results_dir(quick) / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=float))
    with atomic_write(results_dir(quick) / f"{name}.md") as tmp:
        tmp.write_text(section.rstrip() + "\n")


def save_figure(fig, name: str, quick: bool = False) -> str:
    """<results>/<name>.png, atomically; returns its path relative to the repository (for Markdown links)."""
    path = results_dir(quick) / f"{name}.png"
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    return str(path.relative_to(ROOT))


def finish_fid_plot(fig, ax, steps, xlabel: str, n: int, title: str, name: str, quick: bool) -> str:
    """Log-x FID-vs-steps axes (ticks at `steps`) against the 1,797 digits, saved as <results>/<name>.png;
    returns its link."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(sorted(set(steps)), [str(s) for s in sorted(set(steps))])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"FID (N={n} vs 1,797 digits)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    link = save_figure(fig, name, quick)
    plt.close(fig)
    return link


def summary(name: str, text: str) -> None:
    """The one summary line each benchmark prints."""
    print(f"[bench:{name}] {text}", flush=True)


def peak_rss_mib() -> float:
    """This process's peak resident memory: Linux's VmHWM (ru_maxrss would carry over the peak of the parent that
    forked a worker, across exec); ru_maxrss (KiB) elsewhere."""
    try:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return int(status["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(script: str, *args: str) -> dict:
    """Run `python bench/<script> --worker ...` in a fresh process (own peak memory, own warm-up);
    the worker prints one JSON line last."""
    cmd = [sys.executable, str(ROOT / "bench" / script), "--worker", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(fn, repeats: int = 3) -> float:
    """Median wall seconds of fn() over repeats (after the caller's warm-up)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """Measured fp32 matmul throughput (GFLOP/s) at these threads, best of `repeats` after a warm-up: the
    'peak' the training step is compared with (a measured peak, not the vendor's)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def train_digits(name: str, overrides: list[str]) -> Path:
    """Train `python train.py <overrides>` into outputs/bench/<name> once; the EMA checkpoint path.

    The budget is train.py's default (80 epochs of the 1,617 training digits, batch 128 = 960 steps).
    A finished run is reused (its last.ckpt exists); an interrupted one is resumed by train.py.
    """
    run_dir = RUNS / name
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    done = run_dir / "DONE"
    if done.exists() and ckpt.exists():
        return ckpt
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}", "auto_resume=true", "logger=csv"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    done.write_text(f"{time.perf_counter() - t0:.1f}\n")
    return ckpt


def train_seconds(name: str) -> float | None:
    done = RUNS / name / "DONE"
    return float(done.read_text()) if done.exists() else None


def all_digits_uint8() -> torch.Tensor:
    """All 1,797 scikit-learn digits as uint8 [1797, 1, 8, 8] (the FID reference of the digits tables)."""
    from diffusion_lab.data import DigitsDataModule

    return DigitsDataModule().load_images()[0]


def fid_evaluator():
    from diffusion_lab.eval.fid import FIDEvaluator
    from diffusion_lab.eval.inception import inception_weights

    return FIDEvaluator(inception_weights(None, CACHE, allow_download=False), CACHE)


def with_variance(module, var_type: str):
    """The module's process with another fixed variance (DDPM's sigma^2 = beta-tilde or beta), same betas."""
    from diffusion_lab.diffusion import GaussianDiffusion

    d = module.diffusion
    return GaussianDiffusion(d.betas, d.mean_type, var_type, d.loss_type, timestep_map=d.timestep_map)


def sample_and_score(
    module, sampler, n: int, evaluator, ref_features, seed: int = 0, batch: int = 500, classifier=None
) -> dict:
    """diffusion_lab.eval.scoring.sample_and_score (the path evaluate.py and the FID callback take) with the
    benchmarks' defaults: n images seeded per (seed, index), so every sampler starts image i from the same x_T,
    and glibc's malloc set as evaluate.py's process has it (diffusion_lab.cli.run). Returns the scores."""
    from diffusion_lab.allocator import keep_freed_memory
    from diffusion_lab.eval.scoring import sample_and_score as score

    keep_freed_memory()
    scores, _ = score(module, sampler, num_samples=n, seed=seed, batch_size=batch, evaluator=evaluator,
                      reference=ref_features, classifier=classifier)  # fmt: skip
    return scores


def weights_fingerprint(module) -> str:
    """sha256 of every tensor in module.state_dict() (names, shapes, dtypes and bytes): which weights a row scored."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not torch.is_tensor(t):  # extra state
            h.update(f"{name}{t!r}".encode())
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def classifier_note(res: dict) -> str:
    """'' when `res` was scored by today's MNIST classifier (its "classifier_epochs"), else a caveat naming the CNN
    that scored it. Results without the field predate 2026-11-30, when the CNN trained 2 epochs (it called 94% of
    real MNIST images confident; with 6, 98%), so their classifier scores run lower than today's."""
    from diffusion_lab.eval.classifier import EPOCHS

    e = res.get("classifier_epochs", 2)
    return "" if e == EPOCHS else f" (classifier scores by the {e}-epoch CNN of the time, not today's {EPOCHS}-epoch)"


def scored_rows(module, samplers, n: int, evaluator, ref_features, ref_name: str, cache: Path, seed: int = 0,
                classifier=None, roles: dict | None = None) -> list[dict]:
    """One results row (eval.report.row: FID, KID, precision/recall, classifier score, seconds per sample) per
    sampler, each from the same x_T (seed), cached in `cache` (JSON keyed by sampler name and N) so that a re-run
    or another benchmark on the same checkpoint reuses finished rows. The cache is bound to the weights it scored
    (a hash of the module's state_dict): after a retrain into the same run directory its rows are dropped, not
    reused. So is each row to the classifier that gave its classifier score (its weights' hash in the row's
    "classifier"; rows from before that tag, or from another classifier, are sampled and scored again)."""
    from diffusion_lab.eval.report import row

    weights = weights_fingerprint(module)
    cls_id = weights_fingerprint(classifier) if classifier is not None else None
    done = json.loads(cache.read_text()) if cache.exists() else {}
    if done and "_weights" not in done:  # written before caches were bound to weights: adopted as they are
        done["_weights"] = weights
    if done.get("_weights") != weights:
        if done:
            summary("rows", f"{cache.name}: scored other weights (a retrain?), its {len(done) - 1} rows dropped")
        done = {"_weights": weights}
    rows = []
    for s in samplers:
        key = f"{s.name}@{n}@seed{seed}@per-image"  # images seeded per (seed, index) since 2026-12-03
        if key not in done or done[key].get("classifier") != cls_id:
            r = sample_and_score(module, s, n, evaluator, ref_features, seed=seed, classifier=classifier)
            done[key] = row(s, r, ref_name, r["sample_seconds"], (roles or {}).get(s.name, "curve"))
            done[key]["classifier"] = cls_id
            with atomic_write(cache) as tmp:
                tmp.write_text(json.dumps(done, indent=1, default=float))
            summary("rows", f"{s.name}: NFE {s.nfe}, FID {r['fid']:.2f}, precision {r['precision']:.3f}, "
                            f"recall {r['recall']:.3f}, {r['sample_seconds'] / n * 1e3:.2f} ms/sample")
        # the role is the caller's view of a row (another benchmark may have cached it under another)
        rows.append({**done[key], "role": (roles or {}).get(s.name, "curve")})
    return rows
