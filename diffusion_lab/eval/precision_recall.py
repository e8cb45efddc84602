"""Improved precision and recall (Kynkäänniemi et al. 2019) on the Inception pool features FID uses.

    pr = precision_recall(real_features, fake_features, k=3)    # {"precision": .., "recall": ..}

Each set's manifold is the union of balls around its points, each with the radius of that point's k-th nearest
neighbour in the same set (Sec. 3, eq. 1-2 of the paper). Precision is the share of generated points inside
the real manifold (fidelity); recall the share of real points inside the generated manifold (diversity).
A sampler can trade one for the other at equal FID, which is why every results row carries both. Both sets
are taken at the same size (the paper's setting), at most 10,000 rows each.
"""

from __future__ import annotations

import torch


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] by one matmul (float64 on the CPU, float32 on a GPU)."""
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp(min=0)


def _prepare(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device)
    return x.double() if x.device.type == "cpu" else x.float()


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 2048) -> torch.Tensor:
    """Distance of each row [N, D] to its k-th nearest other row: [N]."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples, got {features.shape[0]}")
    out = [_sq_dist(block, features).kthvalue(k + 1, dim=1).values for block in features.split(chunk)]
    return torch.cat(out).sqrt()  # the 1st smallest is the point itself (distance 0)


def coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> float:
    """Share of query rows within radii[j] of some support row j (the support set's k-NN manifold)."""
    r2 = (radii**2)[None, :]
    inside = [(_sq_dist(block, support) <= r2).any(dim=1) for block in query.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: torch.Tensor,
    fake: torch.Tensor,
    k: int = 3,
    max_samples: int = 10_000,
    same_size: bool = True,
    device=None,
    seed: int = 0,
) -> dict[str, float]:
    """real [N, D], fake [M, D] features -> {"precision", "recall"} in [0, 1] (NaN when either set has <= k rows).

    same_size (the paper's setting): both sets are subsampled (seeded) to min(N, M) rows; either way each is
    capped at max_samples rows, which bounds the cost (quadratic in the size).
    """
    sizes = [min(real.shape[0], fake.shape[0])] * 2 if same_size else [real.shape[0], fake.shape[0]]
    n_real, n_fake = (min(s, max_samples) for s in sizes)
    if min(n_real, n_fake) <= k:
        return {"precision": float("nan"), "recall": float("nan")}
    g = torch.Generator().manual_seed(seed)
    real = real[torch.randperm(real.shape[0], generator=g)[:n_real]] if real.shape[0] > n_real else real
    fake = fake[torch.randperm(fake.shape[0], generator=g)[:n_fake]] if fake.shape[0] > n_fake else fake
    device = device or real.device
    real, fake = _prepare(real, device), _prepare(fake, device)
    return {
        "precision": coverage(fake, real, knn_radii(real, k)),
        "recall": coverage(real, fake, knn_radii(fake, k)),
    }
