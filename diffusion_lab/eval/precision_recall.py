"""Improved precision and recall (Kynkäänniemi et al. 2019) on the Inception pool features FID uses.

    pr = precision_recall(real_features, fake_features, k=3)    # {"precision": .., "recall": ..}

Each set's manifold is the union of balls around its points, each with the radius of that point's k-th nearest
neighbour in the same set (Sec. 3, eq. 1-2 of the paper). Precision is the share of generated points inside
the real manifold (fidelity); recall the share of real points inside the generated manifold (diversity).
A sampler can trade one for the other at equal FID, which is why every results row carries both.
"""

from __future__ import annotations

import torch


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row [N, D] to its k-th nearest other row: float64 [N]."""
    if features.shape[0] <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples, got {features.shape[0]}")
    f = features.double()
    out = []
    for block in f.split(chunk):
        d = torch.cdist(block, f)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (distance 0)
    return torch.cat(out)


def coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Share of query rows within radii[j] of some support row j (the support set's k-NN manifold)."""
    s = support.double()
    inside = [(torch.cdist(block.double(), s) <= radii[None, :]).any(dim=1) for block in query.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """real [N, D], fake [M, D] features -> {"precision", "recall"} in [0, 1]."""
    return {
        "precision": coverage(fake, real, knn_radii(real, k)),
        "recall": coverage(real, fake, knn_radii(fake, k)),
    }
