"""Batched generation from a trained module, as uint8 images for metrics and files.

images = sample_uint8(module, Sampler("ddim", 50), n=1000, batch_size=250, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import torch

from .data import to_uint8


def random_labels(module, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """Uniform class labels [n] for a class-conditional module, None for an unconditional one."""
    return torch.randint(0, module.net.num_classes, (n,), generator=generator) if module.conditional else None


def sample_uint8(module, sampler, n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """n samples as uint8 [n, C, H, W] on the CPU, drawn in batches (random labels for a conditional net);
    x_T and labels come from `generator`, so equal seeds give equal starting noise for every sampler."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"num_samples={n} and batch_size={batch_size} must both be >= 1")
    batches = []
    for i in range(0, n, batch_size):
        b = min(batch_size, n - i)
        y = random_labels(module, b, generator)
        batches.append(to_uint8(module.sample(b, sampler, generator=generator, y=y)).cpu())
    return torch.cat(batches)
