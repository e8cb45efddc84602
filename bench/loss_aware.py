"""Cost of IDDPM's loss-aware timestep sampler: its overhead on the training step (target <= 3%).

    python bench/loss_aware.py            # digits IDDPM step (batch 128), 3 interleaved repeats
    python bench/loss_aware.py --quick    # 1 repeat

Two measurements: (1) direct: the sampler's own work per step, `sample(B)` + `update(t, losses)` of a
warmed-up LossAwareTimestepSampler against the UniformTimestepSampler's, for B = 128 (one process) and
B = 1,024 (what `update` receives from 8 DDP ranks of 128), divided by the step time; (2) end to end:
`python train.py experiment=iddpm_cosine` steps with timesteps=loss_aware vs timesteps=uniform.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from harness.common import machine, machine_line, run_worker, summary, timed, write_result
from harness.unet_peers import CONFIGS

from diffusion_lab.diffusion.timesteps import LossAwareTimestepSampler, UniformTimestepSampler


def sampler_seconds(sampler, batch: int, repeats: int = 20) -> float:
    """Median seconds of one step's sampler work: draw t for the batch, then record its losses."""
    losses = torch.rand(batch)

    def step():
        t, _ = sampler.sample(batch)
        sampler.update(t, losses)

    step()
    return timed(step, repeats)


def warmed_up(T: int = 1000) -> LossAwareTimestepSampler:
    s = LossAwareTimestepSampler(T)
    for _ in range(10):
        s.update(torch.arange(T), torch.rand(T))
    assert s.warmed_up()
    return s


def run(repeats: int, steps: int) -> dict:
    direct = {}
    for B in (128, 1024):
        la, un = sampler_seconds(warmed_up(), B), sampler_seconds(UniformTimestepSampler(1000), B)
        direct[B] = {"loss_aware": la, "uniform": un, "extra": la - un}
    runs = {"uniform": [], "loss_aware": []}
    for _ in range(repeats):
        for side in runs:
            runs[side].append(run_worker("loss_aware.py", side, str(steps))["step_seconds"])
    step = {k: statistics.median(v) for k, v in runs.items()}
    return {"machine": machine(), "direct": direct, "steps": step, "runs": runs,
            "direct_fraction": direct[128]["extra"] / step["uniform"],
            "end_to_end_fraction": step["loss_aware"] / step["uniform"] - 1}


def section(res: dict, cmd: str) -> tuple[str, str]:
    d, s = res["direct"], res["steps"]
    f, e = res["direct_fraction"], res["end_to_end_fraction"]
    verdict = (f"sampler work {1e3 * d[128]['extra']:.2f} ms per step = {100 * f:.2f}% of the {s['uniform']:.3f} s "
               f"step ({'met' if f <= 0.03 else 'NOT met'}: <= 3%); end to end {100 * e:+.1f}% (run-to-run noise "
               f"of this machine is a few %)")
    text = f"""## 6. Loss-aware timestep sampler cost (`bench/loss_aware.py`)

Command: `{cmd}` — machine: {machine_line(res['machine'])}.

| measurement | uniform | loss-aware | extra per step |
|---|---|---|---|
| sampler work, B=128 (ms) | {1e3 * d[128]['uniform']:.2f} | {1e3 * d[128]['loss_aware']:.2f} | \
{1e3 * d[128]['extra']:.2f} |
| sampler work, B=1,024 = 8 ranks x 128 (ms) | {1e3 * d[1024]['uniform']:.2f} | {1e3 * d[1024]['loss_aware']:.2f} | \
{1e3 * d[1024]['extra']:.2f} |
| IDDPM digits training step, batch 128 (s, median) | {s['uniform']:.3f} | {s['loss_aware']:.3f} | \
{100 * e:+.1f}% |

Result: {verdict}.
"""
    return text, verdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("SIDE", "STEPS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        from train_throughput import worker_ours

        side, steps = a.worker
        res = worker_ours(CONFIGS["digits"], 3, int(steps), ["experiment=iddpm_cosine", f"timesteps={side}"])
        print(json.dumps(res))
        return
    res = run(1 if a.quick else 3, 20)
    text, line = section(res, "python bench/loss_aware.py" + (" --quick" if a.quick else ""))
    write_result("loss_aware", res, text, a.quick)
    summary("loss_aware", line)


if __name__ == "__main__":
    main()
