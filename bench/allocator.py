"""What diffusion_lab.allocator's glibc malloc settings are worth on the CPU: the same work in fresh processes
with glibc's defaults and with keep_freed_memory(), interleaved rounds, medians.

    python bench/allocator.py              # 5 rounds (about 3 minutes on 2 cores)
    python bench/allocator.py --rounds 2

Work (the MNIST recipe's net, conf/net/unet_mnist.yaml, freshly initialised: the speed does not depend on the
weights): (1) sampling, DDIM-10 of 500 images in one batch (what evaluate.py and the benchmarks draw), ms per
image; (2) training, 10 AdamW steps at batch 64 after 2 warm-up steps (the recipe's batch), images/s; each task
in its own fresh process. Each also counts the minor page faults per step (getrusage), the churn the settings
remove.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from harness.common import machine, machine_line, run_worker, summary, write_result

MODES = {
    "default": "glibc's default malloc settings",
    "kept": "allocator.keep_freed_memory() (what train.py runs with)",
}


def net():
    """The net `experiment=mnist_cpu` trains (composed from the preset, so it follows the recipe), fresh weights."""
    from harness.mnist import compose
    from hydra.utils import instantiate

    torch.manual_seed(0)
    return instantiate(compose(["experiment=mnist_cpu"]).net).to(memory_format=torch.channels_last)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def worker(mode: str, task: str) -> dict:
    """One task ("sample" or "train") in this fresh process, with or without the settings."""
    from diffusion_lab.allocator import keep_freed_memory
    from diffusion_lab.diffusion import GaussianDiffusion, Sampler, get_betas

    applied = keep_freed_memory() if mode == "kept" else False
    if task == "train":
        return {"applied": applied, **train_step_rate()}
    model, diffusion = net().eval(), GaussianDiffusion(get_betas("linear", 1000), mean_type="v")
    sampler, g = Sampler("ddim", 10), torch.Generator().manual_seed(0)
    with torch.no_grad():
        sampler(diffusion, model, torch.randn(500, 1, 28, 28, generator=g), generator=g)  # warm-up
        f0, t0 = faults(), time.perf_counter()
        sampler(diffusion, model, torch.randn(500, 1, 28, 28, generator=g), generator=g)
        sample_s, sample_faults = time.perf_counter() - t0, faults() - f0
    per_image, per_step = 1e3 * sample_s / 500, sample_faults / 10
    return {"applied": applied, "sample_ms_per_image": per_image, "sample_faults_per_step": per_step}


def train_step_rate() -> dict:
    model = net().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(64, 1, 28, 28), torch.randint(0, 1000, (64,))

    def step():
        opt.zero_grad(set_to_none=True)
        model(x, t).square().mean().backward()
        opt.step()

    for _ in range(2):
        step()
    f0, t0 = faults(), time.perf_counter()
    for _ in range(10):
        step()
    train_s, train_faults = time.perf_counter() - t0, faults() - f0
    return {"train_images_per_s": 640 / train_s, "train_faults_per_step": train_faults / 10}


def run(rounds: int) -> dict:
    runs = {m: [] for m in MODES}
    for _ in range(rounds):  # interleaved: the machine's drift hits both alike
        for m in MODES:  # each task in its own process: a heap grown by sampling does not serve the training
            runs[m].append(run_worker("allocator.py", m, "sample") | run_worker("allocator.py", m, "train"))
        if not runs["kept"][-1]["applied"]:
            raise SystemExit("error: glibc's mallopt is not available on this platform: nothing to compare")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "applied"} for m, rs in runs.items()}
    return {"machine": machine(), "rounds": rounds, "runs": runs, "median": med}


def section(res: dict, cmd: str) -> tuple[str, str]:
    d, k = res["median"]["default"], res["median"]["kept"]
    rng = {m: {key: (min(r[key] for r in rs), max(r[key] for r in rs)) for key in rs[0] if key != "applied"}
           for m, rs in res["runs"].items()}  # fmt: skip
    lines = ["| malloc | DDIM-10 sampling, batch 500: ms/image (range) | page faults/step | "
             "training, batch 64: images/s (range) | page faults/step |", "|---|---|---|---|---|"]  # fmt: skip
    for m, label in MODES.items():
        v, r = res["median"][m], rng[m]
        lines.append(f"| {label} | {v['sample_ms_per_image']:.1f} ({r['sample_ms_per_image'][0]:.1f}-"
                     f"{r['sample_ms_per_image'][1]:.1f}) | {v['sample_faults_per_step']:,.0f} | "
                     f"{v['train_images_per_s']:.1f} ({r['train_images_per_s'][0]:.1f}-"
                     f"{r['train_images_per_s'][1]:.1f}) | "
                     f"{v['train_faults_per_step']:,.0f} |")  # fmt: skip
    sample_x = d["sample_ms_per_image"] / k["sample_ms_per_image"]
    train_x = k["train_images_per_s"] / d["train_images_per_s"]
    noise = [name for name, key in (("sampling", "sample_ms_per_image"), ("training", "train_images_per_s"))
             if rng["kept"][key][0] <= rng["default"][key][1] and rng["default"][key][0] <= rng["kept"][key][1]]
    line = (f"kept memory: sampling {sample_x:.2f}x, training {train_x:.2f}x the default's speed"
            + (f" ({' and '.join(noise)} inside the rounds' ranges)" if noise else ""))  # fmt: skip
    text = f"""### 1d. CPU malloc settings (`bench/allocator.py`)

Command: `{cmd}` — machine: {machine_line(res["machine"])}. The MNIST recipe's net (unet_mnist, fresh weights),
each side in its own process, {res["rounds"]} interleaved rounds, medians (ranges in parentheses). Page faults:
minor faults per network step (sampling) or training step, from getrusage.

{chr(10).join(lines)}

{line}.
"""
    return text, line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--worker", nargs=2, metavar=("MODE", "TASK"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return
    res = run(a.rounds)
    res["command"] = cmd = "python bench/allocator.py" + (f" --rounds {a.rounds}" if a.rounds != 5 else "")
    text, line = section(res, cmd)
    write_result("allocator", res, text)
    summary("allocator", line)


if __name__ == "__main__":
    main()
