"""Training throughput: our Lightning training step (as train.py runs it) against the step of diffusers' own
unconditional training example (examples/unconditional_image_generation/train_unconditional.py), at matched
architecture; peak memory, FLOPs per image, the fraction of the fp32 matmul peak, and the levers on our side.

    python bench/train_throughput.py               # small 32x32 grey (batch 64) and DDPM CIFAR-10 (batch 8)
    python bench/train_throughput.py --ablations   # + ours with NCHW weights, diffusers with channels-last
    python bench/train_throughput.py --quick       # small config only, fewer steps, one round
    python bench/train_throughput.py --sides ours ours_bf16 diffusers   # any subset of sides (and ablations)
    python bench/train_throughput.py --levers      # compile and CPU bf16 against the default step, 3 rounds,
                                                   # its own section (train_levers), section 1 left alone
    python bench/train_throughput.py --gap cifar10 # both steps under torch.profiler, op by op (train_gap)

Ours: train.yaml composed by Hydra with the example's optimizer (AdamW lr 1e-4, betas 0.95/0.999, weight decay
1e-6, eps 1e-8), gradient clipping 1.0, our EMA, the non-finite guard, the uniform timestep sampler, DDPM linear
L_simple, run by Lightning's Trainer for warm-up + K steps; images/s over the K steps (on_train_batch_end to
on_train_batch_end, data loading included). Levers, one at a time: `optim.fused=true` (one fused AdamW kernel
instead of torch's default foreach), our packed CPU dropout mask against torch's nn.Dropout (side
ours_nn_dropout: the lever undone), glibc malloc settings that keep freed memory in the process
(diffusion_lab.allocator, which train.py applies; side ours_default_malloc: the lever undone), `compile=true`
(torch.compile of the training forward; its compile seconds are the first step's extra time) and
`trainer.precision=bf16-mixed` (CPU autocast).
diffusers' example: UNet2DModel + DDPMScheduler.add_noise + MSE + the same AdamW + its cosine warm-up scheduler +
diffusers.training_utils.EMAModel (decay 0.9999, warm-up) + clip_grad_norm_(1.0), without accelerate (one CPU
process). The bare loop (UNet2DModel, add_noise, MSE, Adam; nothing else) is kept as a second peer row. Each side
runs in its own process (own peak RSS, same threads); rounds are interleaved and medians kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from harness.common import (
    CACHE,
    ROOT,
    machine,
    machine_line,
    matmul_peak_gflops,
    peak_rss_mib,
    results_dir,
    run_worker,
    summary,
    write_result,
)
from harness.unet_peers import CONFIGS, diffusers_unet, ours_unet, random_images

ADAMW = ["optim=adamw", "optim.lr=1e-4", "+optim.betas=[0.95,0.999]", "optim.weight_decay=1e-6", "+optim.eps=1e-8"]
SIDES = {
    "ours": "diffusion_lab (Lightning step, the example's AdamW, foreach; the default)",
    "ours_fused": "diffusion_lab + optim.fused=true",
    "ours_nn_dropout": "diffusion_lab with torch's nn.Dropout mask (the default before the packed CPU mask)",
    "ours_default_malloc": "diffusion_lab with glibc's default malloc settings (before allocator.keep_freed_memory)",
    "diffusers": "diffusers train_unconditional.py step (AdamW, EMAModel, clipping, cosine warm-up)",
    "diffusers_bare": "diffusers UNet2DModel bare loop (Adam only)",
}
SIDE_OVERRIDES = {"ours": [], "ours_fused": ["optim.fused=true"], "ours_compile": ["compile=true"],
                  "ours_nchw": ["channels_last=false"], "ours_bf16": ["+trainer.precision=bf16-mixed"],
                  "ours_nn_dropout": [], "ours_default_malloc": []}  # fmt: skip
ABLATIONS = {  # what the layout alone is worth (not in `make bench-full`)
    "ours_nchw": "diffusion_lab with channels_last=false",
    "diffusers_cl": "diffusers example step, channels-last weights",
}
LEVERS = {  # --levers: their own section, 3 rounds (each compile process spends minutes in inductor on 2 cores)
    "ours_compile": "diffusion_lab + compile=true (steady state)",
    "ours_bf16": "diffusion_lab + trainer.precision=bf16-mixed (CPU autocast)",
}
ALL_SIDES = SIDES | ABLATIONS | LEVERS


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def worker_ours(c: dict, warmup: int, steps: int, overrides: list[str], profile: bool = False) -> dict:
    """Our training step on random images for warm-up + `steps` steps, train.yaml composed with `overrides`;
    with `profile`, torch.profiler over the `steps` steps (ms per step of each op, see op_split)."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from diffusion_lab.checkpoint import build_module
    from diffusion_lab.data import ImageDataModule

    data = "digits" if c["channels"] == 1 else "cifar10"
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[f"net={c['net']}", f"data={data}", "logger=none", *ADAMW, *overrides])
    with open_dict(cfg):
        cfg.paths = {
            "output_dir": str(ROOT / "outputs" / "bench" / "throughput"),
            "cache_dir": str(CACHE),
            "data_dir": str(ROOT / "data"),
            "root_dir": str(ROOT),
        }
        cfg.data.image_size = c["image_size"]
    images = random_images(c, c["batch"] * (warmup + steps))

    class RandomImages(ImageDataModule):
        def load_images(self):
            return images, torch.full((images.shape[0],), -1)

    dm = RandomImages(image_size=c["image_size"], channels=c["channels"], val_fraction=0.0, batch_size=c["batch"])
    L.seed_everything(0)
    module = build_module(cfg)
    stamps = []

    prof = step_profiler() if profile else None

    class Timer(L.Callback):
        def on_train_batch_end(self, *args):
            stamps.append(time.perf_counter())
            if prof is not None and len(stamps) == warmup:
                prof.start()
            elif prof is not None and len(stamps) == warmup + steps:
                prof.stop()

    callbacks = [instantiate(cfg.callbacks.nonfinite_guard), instantiate(cfg.callbacks.ema), Timer()]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=False,
        max_steps=warmup + steps,
        max_epochs=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    base = current_rss_mib()
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    sec = (stamps[-1] - stamps[warmup - 1]) / steps
    n_params = sum(p.numel() for p in module.net.parameters())
    return {
        "step_seconds": sec,
        "images_per_s": c["batch"] / sec,
        "peak_rss_mib": peak_rss_mib(),
        "base_rss_mib": base,
        "params": n_params,
        "first_step_extra_s": stamps[0] - t0 - sec,
        **({"ops": op_split(prof, steps)} if profile else {}),
    }


def step_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU])


def op_split(prof, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per training step of every op the profiler saw (the calling thread's time inside
    the op; intra-op threads work inside it)."""
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.self_cpu_time_total > 0}


def worker_diffusers(
    c: dict, warmup: int, steps: int, channels_last: bool, example: bool = True, profile: bool = False
) -> dict:
    """diffusers' training step: the example's (example=True) or the bare loop; `profile` as in worker_ours."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler  # imported before the memory baseline, as ours are
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    unet = diffusers_unet(c)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    data = random_images(c, c["batch"] * (warmup + steps)).float() / 127.5 - 1
    # the baseline as on our side (net and images built, nothing else): the EMA copy and the optimizer's state
    # count as training memory on both sides (our EMA is made inside trainer.fit)
    base = current_rss_mib()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    if example:
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        lr_sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=10_000)
        ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    else:
        opt = torch.optim.Adam(unet.parameters(), lr=1e-3)
    unet.train()
    stamps = []
    prof = step_profiler() if profile else None
    t0 = time.perf_counter()
    for x0 in data.split(c["batch"]):
        if prof is not None and len(stamps) == warmup:
            prof.start()
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],))
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample.float(), noise.float())
        loss.backward()
        if example:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        if example:
            lr_sched.step()
        opt.zero_grad(set_to_none=True)
        if example:
            ema.step(unet.parameters())
        stamps.append(time.perf_counter())
    if prof is not None:
        prof.stop()
    sec = (stamps[-1] - stamps[warmup - 1]) / steps
    n_params = sum(p.numel() for p in unet.parameters())
    return {
        "step_seconds": sec,
        "images_per_s": c["batch"] / sec,
        "peak_rss_mib": peak_rss_mib(),
        "base_rss_mib": base,
        "params": n_params,
        "first_step_extra_s": stamps[0] - t0 - sec,
        **({"ops": op_split(prof, steps)} if profile else {}),
    }


def flops_per_image(c: dict) -> float:
    """Forward + backward FLOPs of our U-Net per image (torch.utils.flop_counter: convolutions, matmuls, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = ours_unet(c)
    x = torch.randn(2, c["channels"], c["image_size"], c["image_size"])
    t = torch.tensor([1, 500])
    with FlopCounterMode(display=False) as fc:
        net(x, t).square().mean().backward()
    return fc.get_total_flops() / 2


def profile_ops(c: dict, steps: int = 3, top: int = 8) -> list[dict]:
    """Where our step's time goes: torch.profiler's top ops (self CPU time) over `steps` forward+backward+Adam
    steps of the channels-last network on one batch."""
    net = ours_unet(c).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters())
    x = torch.randn(c["batch"], c["channels"], c["image_size"], c["image_size"])
    t = torch.randint(0, 1000, (c["batch"],))

    def step():
        opt.zero_grad()
        net(x, t).square().mean().backward()
        opt.step()

    step()
    with step_profiler() as prof:
        for _ in range(steps):
            step()
    ops = op_split(prof, steps)
    total = sum(ops.values())
    return [{"op": op, "share": ms / total} for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top]]


def run(configs: list[str], repeats: int, steps: dict[str, int], sides: list[str]) -> dict:
    peak = matmul_peak_gflops()
    out = {"machine": machine(), "matmul_peak_gflops": peak, "configs": {},
           "labels": {s: ALL_SIDES[s] for s in sides}}  # as measured: a default may change later
    for name in configs:
        c = CONFIGS[name]
        runs = {s: [] for s in sides}
        for _ in range(repeats):  # interleaved, so drift in the machine's speed hits every side alike
            for s in sides:
                runs[s].append(run_worker("train_throughput.py", s, name, str(steps[name])))
        med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
        for s, rs in runs.items():
            med[s]["spread"] = (min(r["images_per_s"] for r in rs), max(r["images_per_s"] for r in rs))
        fl = flops_per_image(c)
        for s in med:
            med[s]["gflops_per_s"] = fl * med[s]["images_per_s"] / 1e9
            med[s]["fraction_of_peak"] = med[s]["gflops_per_s"] / peak
        out["configs"][name] = {
            "batch": c["batch"],
            "flops_per_image": fl,
            "sides": med,
            "runs": runs,
            "profile": profile_ops(c),
        }
        print(name, json.dumps({s: round(m["images_per_s"], 1) for s, m in med.items()}), flush=True)
    return out


TITLE = "## 1. Training throughput (`bench/train_throughput.py`)"


def section(res: dict, cmd: str, title: str = TITLE) -> tuple[str, str]:
    lines = [
        "| config | side | params | images/s (range) | vs diffusers example | peak RSS MiB (above start) | "
        "GFLOP/s | of fp32 peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts, levers = [], []
    for name, r in res["configs"].items():
        d = r["sides"]["diffusers"]
        for s, m in r["sides"].items():
            lo, hi = m.get("spread", (m["images_per_s"],) * 2)
            label = res.get("labels", {}).get(s) or ALL_SIDES[s]  # as measured; older results: as now
            lines.append(
                f"| {name} (batch {r['batch']}) | {label} | {m['params']:,.0f} | "
                f"{m['images_per_s']:.1f} ({lo:.1f}-{hi:.1f}) | {m['images_per_s'] / d['images_per_s']:.2f}x | "
                f"{m['peak_rss_mib']:.0f} ({m['peak_rss_mib'] - m['base_rss_mib']:.0f}) | {m['gflops_per_s']:.1f} | "
                f"{100 * m['fraction_of_peak']:.1f}% |"
            )
        o = r["sides"].get("ours")
        for s in ("ours_fused", "ours_nn_dropout", "ours_default_malloc", "ours_compile", "ours_bf16", "ours_nchw"):
            if o is None:
                break
            if s in r["sides"]:
                m = r["sides"][s]
                extra = f", compile {m['first_step_extra_s']:.0f} s once" if s == "ours_compile" else ""
                levers.append(f"{name}: {s} {m['images_per_s'] / o['images_per_s']:.2f}x ours{extra}")
        best = max((s for s in r["sides"] if s.startswith("ours")), key=lambda s: r["sides"][s]["images_per_s"])
        for s in dict.fromkeys(x for x in ("ours", best) if x in r["sides"]):
            m = r["sides"][s]
            speed = m["images_per_s"] / d["images_per_s"]
            lo, hi = m["spread"][0] / d["spread"][1], m["spread"][1] / d["spread"][0]
            mem_o, mem_d = m["peak_rss_mib"] - m["base_rss_mib"], d["peak_rss_mib"] - d["base_rss_mib"]
            noise = " (inside the run-to-run range)" if lo <= 1.0 <= hi or lo < 1.1 <= hi else ""
            verdicts.append(
                f"{name} {s}: {speed:.2f}x the example{noise} ({'met' if speed >= 1.1 else 'NOT met'}), "
                f"training memory {mem_o:.0f} vs {mem_d:.0f} MiB ({'met' if mem_o <= mem_d else 'NOT met'})"
            )
    prof = "\n".join(
        f"- {n}: " + ", ".join(f"{p['op']} {100 * p['share']:.0f}%" for p in r["profile"])
        for n, r in res["configs"].items()
    )
    flops = "; ".join(f"{n}: {r['flops_per_image'] / 1e9:.2f} GFLOP" for n, r in res["configs"].items())
    text = f"""{title}

Command: `{cmd}` — machine: {machine_line(res["machine"])}. Measured fp32 matmul peak (4096^3, best of 5):
{res["matmul_peak_gflops"]:.0f} GFLOP/s. Forward+backward FLOPs per image: {flops}.
Matched architecture: same levels, channels, blocks, attention resolutions, dropout (parameter counts in
the table); same optimizer (AdamW as the example sets it) and gradient clipping. Peak RSS is the process's; in
parentheses the growth during training (what the step needs; both sides keep an EMA copy), the basis of the
memory target. Medians of {len(next(iter(res["configs"].values()))["runs"]["ours"])} interleaved rounds, the
range in parentheses (this machine's single runs spread up to 30%).

{chr(10).join(lines)}

Levers, against our default step: {"; ".join(levers) or "not measured in this run"}.

Where our step's time goes (torch.profiler, self CPU time, top ops):
{prof}

Targets (>= 1.1x the example's images/s, training memory no higher): {"; ".join(verdicts)}.
"""
    return text, "; ".join(verdicts)


GAP_TITLE = "### 1c. Where the time differs: our step against the example's, op by op"


def gap(name: str, rounds: int, steps: int) -> dict:
    """Both full training steps (ours as train.py runs it, the diffusers example's) under torch.profiler, each
    in its own process, `rounds` interleaved rounds; per op the median self-CPU ms per step."""
    runs = {"ours": [], "diffusers": []}
    for _ in range(rounds):
        for side in runs:
            runs[side].append(run_worker("train_throughput.py", side, name, str(steps), "profile"))
    sides = {}
    for side, rs in runs.items():
        ops = {op for r in rs for op in r["ops"]}
        sides[side] = {
            "step_ms": statistics.median(1e3 * r["step_seconds"] for r in rs),
            "ops": {op: statistics.median(r["ops"].get(op, 0.0) for r in rs) for op in ops},
        }
    return {"machine": machine(), "config": name, "batch": CONFIGS[name]["batch"], "rounds": rounds,
            "steps": steps, "sides": sides}


def gap_section(res: dict, cmd: str, top: int = 12) -> tuple[str, str]:
    o, d = res["sides"]["ours"], res["sides"]["diffusers"]
    ops = set(o["ops"]) | set(d["ops"])
    diff = {op: o["ops"].get(op, 0.0) - d["ops"].get(op, 0.0) for op in ops}
    rows = sorted(ops, key=lambda op: -abs(diff[op]))[:top]
    lines = ["| op | ours ms/step | example ms/step | ours - example |", "|---|---|---|---|"]
    lines += [f"| {op} | {o['ops'].get(op, 0.0):.1f} | {d['ops'].get(op, 0.0):.1f} | {diff[op]:+.1f} |" for op in rows]
    in_ops = {k: sum(v["ops"].values()) for k, v in res["sides"].items()}
    outside = {k: v["step_ms"] - in_ops[k] for k, v in res["sides"].items()}
    lines.append(f"| (all ops) | {in_ops['ours']:.1f} | {in_ops['diffusers']:.1f} | "
                 f"{in_ops['ours'] - in_ops['diffusers']:+.1f} |")
    lines.append(f"| (outside ops: Python, framework, data) | {outside['ours']:.1f} | {outside['diffusers']:.1f} | "
                 f"{outside['ours'] - outside['diffusers']:+.1f} |")
    lines.append(f"| **step (wall, profiled)** | {o['step_ms']:.1f} | {d['step_ms']:.1f} | "
                 f"{o['step_ms'] - d['step_ms']:+.1f} |")
    line = (f"{res['config']}: ours {o['step_ms']:.0f} vs example {d['step_ms']:.0f} ms/step under the profiler; "
            f"largest op differences: " + ", ".join(f"{op} {diff[op]:+.1f} ms" for op in rows[:4]))
    text = f"""{GAP_TITLE}

Command: `{cmd}` — machine: {machine_line(res["machine"])}. The {res["config"]} config (batch {res["batch"]}): both
full training steps as section 1 times them, under torch.profiler (CPU) for {res["steps"]} steps after 2 warm-up
steps, each side in its own process, {res["rounds"]} interleaved rounds, medians. Self CPU ms per step by op (the
time the calling thread spent inside the op, its own intra-op threads included), the {top} ops whose time differs
most; then all ops together and what remains of the wall step outside them (Python and framework code, roughly:
`Optimizer.step` annotations count as ops). Ours runs with train.py's malloc settings (diffusion_lab.allocator),
the example with glibc's defaults, so page faults inside the ops are part of the differences; the profiler's own
cost grows with the number of ops each side launches.

{chr(10).join(lines)}
"""
    return text, line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ablations", action="store_true", help="also time ours with NCHW weights, diffusers channels-last")
    p.add_argument(
        "--recompute-peak",
        action="store_true",
        help="re-measure only the matmul peak and rewrite the section from the saved results",
    )
    p.add_argument("--render", action="store_true", help="rewrite the section from the saved results, no timing")
    p.add_argument("--levers", action="store_true", help="time compile and bf16 against ours (own section)")
    p.add_argument("--rounds", type=int, default=3, help="--levers: interleaved rounds")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["small", "cifar10"], help="--levers only")
    p.add_argument("--sides", nargs="+", choices=list(ALL_SIDES), help="sides to time (diffusers always)")
    p.add_argument("--gap", choices=list(CONFIGS), help="profile ours and the example's step op by op (own section)")
    p.add_argument("--worker", nargs="+", metavar="SIDE CONFIG STEPS [profile]", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.levers and (a.quick or a.sides or a.ablations):
        p.error("--levers times its own fixed sides (ours, ours_compile, ours_bf16, diffusers): drop --quick/--sides/"
                "--ablations")
    if not a.levers and a.configs != ["small", "cifar10"] or not (a.levers or a.gap) and a.rounds != 3:
        p.error("--rounds applies to --levers and --gap, --configs to --levers only (section 1 always times both "
                "configs, 5 rounds)")
    if a.gap and (a.levers or a.quick or a.sides or a.ablations or a.recompute_peak):
        p.error("--gap profiles its own two sides (ours, diffusers): drop --levers/--quick/--sides/--ablations/"
                "--recompute-peak")
    if a.worker:
        side, name, steps, *flag = a.worker
        c, steps, prof = CONFIGS[name], int(steps), flag == ["profile"]
        if side == "ours_nn_dropout":  # the lever undone: torch's bernoulli_ mask in every ResBlock
            from torch import nn

            from diffusion_lab.nets import layers

            layers.Dropout.forward = nn.Dropout.forward
        if side.startswith("ours") and side != "ours_default_malloc":  # train.py runs with these malloc settings
            from diffusion_lab.allocator import keep_freed_memory

            keep_freed_memory()
        if side.startswith("ours"):
            res = worker_ours(c, warmup=2, steps=steps, overrides=SIDE_OVERRIDES[side], profile=prof)
        else:
            example = side != "diffusers_bare"
            res = worker_diffusers(c, 2, steps, channels_last=side == "diffusers_cl", example=example, profile=prof)
        print(json.dumps(res))
        return
    if a.gap:
        if a.render:
            res = json.loads((results_dir(False) / "train_gap.json").read_text())
        else:
            res = gap(a.gap, a.rounds, 4)
            res["command"] = f"python bench/train_throughput.py --gap {a.gap}" + (
                f" --rounds {a.rounds}" if a.rounds != 3 else "")
        text, line = gap_section(res, res["command"])
        write_result("train_gap", res, text)
        summary("train_gap", line)
        return
    out, title = "train_throughput", TITLE
    if a.levers:
        out, title = "train_levers", "### 1b. Training levers: torch.compile and CPU bf16 autocast"
    if a.render or a.recompute_peak:
        res = json.loads((results_dir(a.quick) / f"{out}.json").read_text())
        cmd = res.get("command", "python bench/train_throughput.py")
        if a.recompute_peak:
            res["matmul_peak_gflops"] = peak = matmul_peak_gflops()
            for r in res["configs"].values():
                for m in r["sides"].values():
                    m["fraction_of_peak"] = m["gflops_per_s"] / peak
            cmd += " (peak: --recompute-peak)"
    elif a.levers:
        sides = ["ours", *LEVERS, "diffusers"]
        res = run(a.configs, a.rounds, {"small": 12, "cifar10": 6}, sides)
        cmd = "python bench/train_throughput.py --levers"
        cmd += f" --rounds {a.rounds}" if a.rounds != 3 else ""
        cmd += f" --configs {' '.join(a.configs)}" if a.configs != ["small", "cifar10"] else ""
    elif a.quick:
        res = run(["small"], 1, {"small": 8}, ["ours", "ours_fused", "diffusers", "diffusers_bare"])
        cmd = "python bench/train_throughput.py --quick"
    else:
        sides = list(SIDES | ABLATIONS if a.ablations else SIDES)
        if a.sides:
            sides = list(dict.fromkeys(["diffusers", *a.sides]))
        res = run(["small", "cifar10"], 5, {"small": 12, "cifar10": 6}, sides)
        cmd = "python bench/train_throughput.py" + (" --ablations" if a.ablations else "")
        cmd += f" --sides {' '.join(a.sides)}" if a.sides else ""
    res["command"] = cmd
    text, line = section(res, cmd, title)
    write_result(out, res, text, a.quick)
    summary(out, line)


if __name__ == "__main__":
    main()
