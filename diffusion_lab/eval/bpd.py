"""Negative log-likelihood in bits/dim: the full variational bound (DDPM eq. 5, IDDPM Sec. 2)."""

from __future__ import annotations

import torch

from ..data import to_model_range


@torch.no_grad()
def bits_per_dim(
    diffusion,
    model,
    images_uint8: torch.Tensor,
    batch_size: int = 256,
    seed: int = 0,
    null_label: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Mean of sum_t L_t + L_T over images (uint8 [N, C, H, W]), one x_t draw per t and image.

    diffusion: the GaussianDiffusion; model: `model(x_t, t, **kw)` (in eval mode); null_label: for a
    class-conditional model, the label that means "no class" (the bound is then the unconditional one).
    Returns {"bpd": total, "prior_bpd": L_T part, "decoder_bpd": L_0 part, "n": N}. Costs T network
    calls per batch. Without a learned variance the bound uses the fixed variance (as in DDPM's 3.75).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    totals, priors, decoders = [], [], []
    for batch in images_uint8.split(batch_size):
        x0 = to_model_range(batch).to(device)
        kwargs = {"y": torch.full((x0.shape[0],), null_label, device=device)} if null_label is not None else None
        out = diffusion.calc_bpd_loop(model, x0, clip_denoised=True, model_kwargs=kwargs, generator=g)
        totals.append(out["total_bpd"].cpu())
        priors.append(out["prior_bpd"].cpu())
        decoders.append(out["vb"][:, 0].cpu())
    return {
        "bpd": float(torch.cat(totals).mean()),
        "prior_bpd": float(torch.cat(priors).mean()),
        "decoder_bpd": float(torch.cat(decoders).mean()),
        "n": int(images_uint8.shape[0]),
    }
