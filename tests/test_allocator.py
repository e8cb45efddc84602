"""diffusion_lab.allocator: with its malloc settings a repeated step stops faulting its memory back in."""

import json
import os
import subprocess
import sys

import pytest

from diffusion_lab.allocator import keep_freed_memory

WORKLOAD = """
import json, resource, torch
from diffusion_lab.allocator import keep_freed_memory
applied = keep_freed_memory()  # the "default" process has DIFFUSION_LAB_MALLOC=default: a no-op
torch.set_num_threads(1)
from diffusion_lab.nets import UNet
net = UNet(image_size=28, in_channels=1, base_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(7,))
x, t = torch.randn(64, 1, 28, 28), torch.randint(0, 1000, (64,))
with torch.no_grad():
    for _ in range(2):
        net(x, t)  # warm-up: the heap grows to the step's peak
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        net(x, t)
print(json.dumps({"applied": applied, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 2}))
"""


def faults(mode: str) -> dict:
    env = {**os.environ, "DIFFUSION_LAB_MALLOC": "default" if mode == "default" else "keep_freed"}
    r = subprocess.run([sys.executable, "-c", WORKLOAD], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not keep_freed_memory(), reason="no glibc mallopt here, or DIFFUSION_LAB_MALLOC=default is set")
def test_kept_memory_stops_page_faults_of_a_repeated_forward():
    """A forward of a 28x28 net (the MNIST recipe's widths, two ResBlocks per level) at batch 64 frees tens of MiB
    each call: with glibc's defaults the next call faults those pages in again (~40,000 per call); with the
    settings, the heap keeps them."""
    default, tuned = faults("default"), faults("tuned")
    assert tuned["applied"] is True and default["applied"] is False  # DIFFUSION_LAB_MALLOC=default opts out
    if default["faults"] < 1000:  # 64 KiB pages or transparent huge pages "always": little churn to remove
        pytest.skip(f"glibc's defaults fault only {default['faults']:.0f} pages per call on this kernel")
    assert tuned["faults"] < default["faults"] / 4, (tuned, default)  # measured 15-25x fewer


def test_keep_freed_memory_sets_glibc_once_and_reports_a_refusal(monkeypatch):
    """The settings go to mallopt once per process (later calls return the verdict without calling it again); a
    setting glibc refuses makes the verdict False. A stand-in libc records the calls."""
    import ctypes

    from diffusion_lab import allocator

    calls, answer = [], {"value": 1}

    def mallopt(key, value):
        calls.append((key, value))
        return answer["value"]

    class Libc:
        pass

    libc = Libc()
    libc.mallopt = mallopt
    monkeypatch.setattr(ctypes, "CDLL", lambda _: libc)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    monkeypatch.delenv("DIFFUSION_LAB_MALLOC", raising=False)
    monkeypatch.setattr(allocator, "_applied", None)
    assert allocator.keep_freed_memory() is True and allocator.keep_freed_memory() is True
    assert calls == list(allocator.SETTINGS.items())  # each setting once, not again on the second call
    monkeypatch.setattr(allocator, "_applied", None)
    calls.clear()
    answer["value"] = 0  # glibc refuses
    assert allocator.keep_freed_memory() is False and len(calls) == len(allocator.SETTINGS)
