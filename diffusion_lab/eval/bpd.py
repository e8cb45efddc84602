"""Negative log-likelihood in bits/dim: the full variational bound (DDPM eq. 5, IDDPM Sec. 2)."""

from __future__ import annotations

import torch

from ..data import to_model_range


@torch.no_grad()
def bits_per_dim(
    module, images_uint8: torch.Tensor, batch_size: int = 256, seed: int = 0, progress: bool = False
) -> dict[str, float]:
    """Mean of sum_t L_t + L_T over images (uint8 [N, C, H, W]), one x_t draw per t and image.

    Returns {"bpd": total, "prior_bpd": L_T part, "decoder_bpd": L_0 part, "n": N}. Costs T network
    calls per batch. Without a learned variance the bound uses the fixed variance (as in DDPM's 3.75).
    """
    g = torch.Generator(device=module.device).manual_seed(seed)
    totals, priors, decoders = [], [], []
    module.net.eval()
    for batch in images_uint8.split(batch_size):
        x0 = to_model_range(batch).to(module.device)
        kwargs = (
            {"y": torch.full((x0.shape[0],), module.null_label, device=module.device)} if module.conditional else None
        )
        out = module.diffusion.calc_bpd_loop(module.net, x0, clip_denoised=True, model_kwargs=kwargs, generator=g)
        totals.append(out["total_bpd"].cpu())
        priors.append(out["prior_bpd"].cpu())
        decoders.append(out["vb"][:, 0].cpu())
    return {
        "bpd": float(torch.cat(totals).mean()),
        "prior_bpd": float(torch.cat(priors).mean()),
        "decoder_bpd": float(torch.cat(decoders).mean()),
        "n": int(images_uint8.shape[0]),
    }
