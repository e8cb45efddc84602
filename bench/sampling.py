"""Sampling speed: our DDIM-50 / DDPM-1000 against (a) NFE x the bare network forward (framework overhead)
and (b) diffusers' DDIMPipeline / DDPMPipeline on the matched UNet2DModel; classifier-free guidance cost.

    python bench/sampling.py               # digits net (8x8, batch 256) and the small 32x32 net (batch 64)
    python bench/sampling.py --ablations   # + our sampling loop driving diffusers' network (~3 min more)
    python bench/sampling.py --quick       # digits net, DDIM-50 and guidance only

Weights are freshly initialised (speed does not depend on them; the zero-initialised output layers are
randomised so no kernel sees all-zero inputs). Everything runs in this process with the same threads,
one warm-up call each, then the median of `repeats` timed calls.
"""

from __future__ import annotations

import argparse
import time

import torch
from harness.common import machine, machine_line, summary, timed, write_result
from harness.unet_peers import DiffusersEps, diffusers_unet, ours_unet

from diffusion_lab.diffusion import GaussianDiffusion, Sampler
from diffusion_lab.lit import DiffusionModule

NETS = {  # conf/net/unet_digits.yaml at 8x8 and conf/net/unet_small.yaml at 32x32 (grey)
    "digits": {"image_size": 8, "channels": 1, "batch": 256, "base": 32, "mult": (1, 2, 2), "blocks": 2,
               "attn": (4,), "dropout": 0.1, "samplers": [("ddim", 50), ("ddpm", 1000)]},
    "small": {"image_size": 32, "channels": 1, "batch": 64, "base": 32, "mult": (1, 2, 2, 2), "blocks": 1,
              "attn": (16,), "dropout": 0.1, "samplers": [("ddim", 50)]},
}


def randomise(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for p in net.parameters():
        if p.dim() > 1 and not p.abs().sum():
            torch.nn.init.normal_(p, std=0.02)
    return net.eval()


def bare_forward(net, c: dict, batch: int, repeats: int) -> float:
    x = torch.randn(batch, c["channels"], c["image_size"], c["image_size"])
    t = torch.full((batch,), 500)
    with torch.no_grad():
        for _ in range(3):
            net(x, t)
        return timed(lambda: net(x, t), repeats)


def diffusers_pipeline(unet, method: str, steps: int, batch: int, repeats: int, warmup: bool = True) -> float:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

    if method == "ddim":
        pipe = DDIMPipeline(unet, DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
        call = lambda: pipe(batch_size=batch, num_inference_steps=steps, eta=0.0, output_type="np")  # noqa: E731
    else:
        pipe = DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear"))
        call = lambda: pipe(batch_size=batch, num_inference_steps=steps, output_type="np")  # noqa: E731
    pipe.set_progress_bar_config(disable=True)
    if warmup:
        call()
    return timed(call, repeats)


def run(nets: list[str], repeats: int, quick: bool = False, ablations: bool = False) -> dict:
    out = {"machine": machine(), "nets": {}}
    diffusion = GaussianDiffusion.from_schedule("linear", 1000)
    for name in nets:
        c = NETS[name]
        B = c["batch"]
        module = DiffusionModule(randomise(ours_unet(c)), diffusion).eval()
        theirs = randomise(diffusers_unet(c))
        # Our sampler driving diffusers' network: separates loop overhead from network speed.
        module_theirs = DiffusionModule(DiffusersEps(theirs), diffusion, channels_last=False).eval()
        module_theirs.net.in_channels, module_theirs.net.image_size = c["channels"], c["image_size"]
        # The bare forwards are timed after a few warm-up calls; they are timed again after the samplers
        # and the faster median is kept (the first calls in a fresh process can be 2x slower).
        r = {"batch": B, "forward_ours": bare_forward(module.net, c, B, 10),
             "forward_diffusers": bare_forward(DiffusersEps(theirs), c, B, 10), "methods": {}}
        for method, steps in c["samplers"][:1] if quick else c["samplers"]:  # quick: DDIM-50 only
            s = Sampler(method, steps, spacing="even" if method == "ddpm" else "ddim")
            long = steps >= 1000  # one timed call, no warm-up call: the per-step cost is steady by then
            if not long:
                module.sample(B, s, seed=0)
            reps = 1 if long else repeats
            ours = timed(lambda: module.sample(B, s, seed=0), reps)
            pipe = diffusers_pipeline(theirs, method, steps, B, reps, warmup=not long)
            r["methods"][f"{method}{steps}"] = {"ours": ours, "diffusers_pipeline": pipe}
            if ablations:
                r["methods"][f"{method}{steps}"]["ours_on_diffusers_net"] = timed(
                    lambda: module_theirs.sample(B, s, seed=0), reps)
        r["forward_ours"] = min(r["forward_ours"], bare_forward(module.net, c, B, 20))
        r["forward_diffusers"] = min(r["forward_diffusers"], bare_forward(DiffusersEps(theirs), c, B, 20))
        for m, v in r["methods"].items():
            steps = int(m[4:])
            v["overhead"] = v["ours"] / (steps * r["forward_ours"]) - 1
            if "ours_on_diffusers_net" in v:
                v["overhead_diffusers_net"] = v["ours_on_diffusers_net"] / (steps * r["forward_diffusers"]) - 1
            v["pipeline_overhead"] = v["diffusers_pipeline"] / (steps * r["forward_diffusers"]) - 1
            print(name, m, {k: round(x, 3) for k, x in v.items()}, flush=True)
        if name == "digits":  # classifier-free guidance: one 2B forward per step
            cond = DiffusionModule(randomise(ours_unet(c, num_classes=10)), diffusion).eval()
            y = torch.arange(B) % 10
            s = Sampler("ddim", 50, guidance_scale=3.0)
            cond.sample(B, s, y=y, seed=0)
            t_cfg = timed(lambda: cond.sample(B, s, y=y, seed=0), repeats)
            x = torch.randn(2 * B, 1, c["image_size"], c["image_size"])
            with torch.no_grad():
                f2 = timed(lambda: cond.net(x, torch.full((2 * B,), 500), y=torch.arange(2 * B) % 11), 10)
            r["cfg"] = {"seconds": t_cfg, "forward_2B": f2, "ratio": t_cfg / (50 * f2)}
        out["nets"][name] = r
    return out


def section(res: dict, cmd: str) -> tuple[str, str]:
    lines = ["| net (batch) | sampler | ours s | NFE x forward s | overhead | diffusers pipeline s | "
             "ours vs pipeline | our loop on diffusers' net s (overhead) | pipeline overhead |", "|---" * 9 + "|"]
    verdicts = []
    for name, r in res["nets"].items():
        for m, v in r["methods"].items():
            steps = int(m[4:])
            speed = v["diffusers_pipeline"] / v["ours"]
            loop = (f"{v['ours_on_diffusers_net']:.2f} ({100 * v['overhead_diffusers_net']:+.1f}%)"
                    if "ours_on_diffusers_net" in v else "— (`--ablations`)")
            lines.append(
                f"| {name} ({r['batch']}) | {m.upper()} | {v['ours']:.2f} | {steps * r['forward_ours']:.2f} | "
                f"{100 * v['overhead']:+.1f}% | {v['diffusers_pipeline']:.2f} | {speed:.2f}x | "
                f"{loop} | "
                f"{100 * v['pipeline_overhead']:+.1f}% |")
            verdicts.append(f"{name} {m}: overhead {100 * v['overhead']:+.1f}% "
                            f"({'met' if v['overhead'] <= 0.05 else 'NOT met'}), {speed:.2f}x diffusers "
                            f"({'met' if speed >= 1.1 else 'NOT met'})")
        if "cfg" in r:
            cf = r["cfg"]
            verdicts.append(f"CFG DDIM-50 = {cf['ratio']:.3f} x 50 forwards of 2B "
                            f"({'met' if cf['ratio'] <= 1.1 else 'NOT met'})")
    fwd = "; ".join(f"{n}: ours {1e3 * r['forward_ours']:.1f} ms, diffusers {1e3 * r['forward_diffusers']:.1f} ms"
                    for n, r in res["nets"].items())
    text = f"""## 2. Sampling (`bench/sampling.py`)

Command: `{cmd}` — machine: {machine_line(res['machine'])}.
Bare network forward per batch (no grad, eval): {fwd}. Overhead = sampling time / (NFE x bare forward) - 1;
it can be slightly negative because the bare forward is timed alone. diffusers' pipelines run on the
matched UNet2DModel with `output_type="np"` and the progress bar off; "our loop on diffusers' net"
separates the network's speed from the loop's.

{chr(10).join(lines)}

Targets: {'; '.join(verdicts)}.
"""
    return text, "; ".join(verdicts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--ablations", action="store_true", help="also time our sampling loop on diffusers' network")
    a = p.parse_args()
    t0 = time.perf_counter()
    res = run(["digits"] if a.quick else ["digits", "small"], 3, quick=a.quick, ablations=a.ablations)
    res["wall_seconds"] = time.perf_counter() - t0
    flags = (" --quick" if a.quick else "") + (" --ablations" if a.ablations else "")
    text, line = section(res, "python bench/sampling.py" + flags)
    write_result("sampling", res, text, a.quick)
    summary("sampling", line)


if __name__ == "__main__":
    main()
