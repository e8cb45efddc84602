"""Keep freed CPU tensor memory inside the process (glibc's malloc), instead of handing it back to the kernel.

    from diffusion_lab.allocator import keep_freed_memory
    keep_freed_memory()   # once, early; train.py / evaluate.py / sample.py do it (diffusion_lab.cli.run)

PyTorch allocates CPU tensors with malloc and has no caching allocator on the CPU. With glibc's defaults every
step frees activations of a few MiB to tens of MiB back to the kernel (trimming the heap top, unmapping mmap'd
chunks) and the next step faults the same pages in again, zeroed by the kernel: sampling the MNIST net at batch
500 took ~220,000 minor page faults per second and a third of the CPU time in the kernel. Three mallopt settings
stop the churn: chunks up to 32 MiB (glibc's largest allowed mmap threshold on 64-bit) come from the heap, and
up to 1 GiB freed at its top is kept (M_TRIM_THRESHOLD) and grown in 1 GiB strides (M_TOP_PAD: address space;
pages are only resident once touched). Measured (BENCHMARKS.md section 1d, `python bench/allocator.py`): DDIM-10
of the MNIST net at batch 500 1.65x faster, its training step at batch 64 1.03x (inside the noise); section 1's
side ours_default_malloc is the lever undone in the full training step (1.06x small, 1.04x CIFAR-10: noise).
The price: the process keeps its peak heap until it exits, and each heap growth reserves 1 GiB more address space
(under `ulimit -v` or strict overcommit, vm.overcommit_memory=2, that can fail an allocation early).
`DIFFUSION_LAB_MALLOC=default` leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 1 << 30, M_TOP_PAD: 1 << 30}
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply SETTINGS through glibc's mallopt (idempotent). True when applied; False off glibc (macOS, Windows,
    musl), where there is nothing to set. The tuning guide's alternative, LD_PRELOAD of jemalloc or tcmalloc,
    has to be set before the process starts; mallopt is glibc's run-time API for the same effect."""
    global _applied
    if _applied is None:
        _applied = False
        if sys.platform.startswith("linux") and os.environ.get("DIFFUSION_LAB_MALLOC") != "default":
            try:
                mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
            except (OSError, AttributeError):  # a libc without mallopt (musl)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            results = [mallopt(k, v) for k, v in SETTINGS.items()]  # all three, then the verdict
            _applied = all(r == 1 for r in results)
    return _applied
