"""What sample.py makes from a trained DiffusionModule: grids, inpainting rows, interpolation strips,
and the progression of x0_hat over the steps. Each returns images [N, C, H, W] in [-1, 1] and nrow."""

from __future__ import annotations

import torch

from .checks import check_choice
from .diffusion import ImageGenerators, Sampler, draw, paint, slerp

MODES = ("grid", "inpaint", "interpolate", "progression")
MASKS = ("left_half", "right_half", "top_half", "bottom_half", "center")


def make_mask(kind: str, size: int) -> torch.Tensor:
    """[1, 1, size, size] with 1 where the image is known (kept) and 0 where it is generated."""
    m = torch.ones(1, 1, size, size)
    h = size // 2
    region = {
        "left_half": (slice(None), slice(h, None)),
        "right_half": (slice(None), slice(None, h)),
        "top_half": (slice(h, None), slice(None)),
        "bottom_half": (slice(None, h), slice(None)),
        "center": (slice(size // 4, size - size // 4), slice(size // 4, size - size // 4)),
    }
    check_choice("mask", kind, MASKS)
    m[..., region[kind][0], region[kind][1]] = 0  # the generated part
    return m


def labels_for(module, n: int, class_label: int | None) -> torch.Tensor | None:
    """Labels for a conditional model: all `class_label`, or rows of classes 0..K-1; None if unconditional."""
    if not module.conditional:
        if class_label is not None:
            raise ValueError(f"class_label={class_label} needs a class-conditional model")
        return None
    k = module.net.num_classes
    if class_label is not None:
        return torch.full((n,), int(class_label))
    return torch.arange(k).repeat_interleave(max(1, n // k))


def grid(module, sampler: Sampler, n: int, seed: int, class_label=None):
    """Images 0 .. n-1 of the run seeded `seed` (a conditional net: one row per class, or all `class_label`)."""
    y = labels_for(module, n, class_label)
    n = y.shape[0] if y is not None else n
    nrow = n // module.net.num_classes if (module.conditional and class_label is None) else None
    return module.sample(n, sampler, y=y, seed=seed, progress=True), nrow


def inpaint(module, sampler: Sampler, originals: torch.Tensor, mask_kind: str, seed: int):
    """Rows: original | masked (unknown region grey) | result, one column per image. Any sampler (inpaint.paint
    replaces the known region after every step of every method); its grid, options and clipping apply, and image
    i's noise comes from its own generator (seed, i). Of the guidance rules it takes autoguidance (cfg and apg
    need class labels, which this mode does not take)."""
    g = sampler.guidance
    if g is not None and g.rule != "autoguidance":
        raise ValueError(f"mode=inpaint does not take sampler.guidance={g.rule} (it inpaints without class labels); "
                         "sampler.guidance=autoguidance needs none")  # fmt: skip
    guided = {"guidance": sampler.bound_guidance()} if g is not None else {}
    mask = make_mask(mask_kind, originals.shape[-1]).to(module.device)
    x0 = originals.to(module.device)
    out = paint(
        module.diffusion,
        module.net.eval(),
        x0,
        mask,
        sampler.timesteps(module.diffusion),
        method=sampler.method.name,
        clip_denoised=sampler.clip_denoised,
        generator=ImageGenerators.for_images(seed, range(x0.shape[0])),
        **sampler.options,
        **guided,
        progress=True,
    )
    masked = x0 * mask + (1 - mask) * 0.0
    return torch.cat([x0, masked, out]), x0.shape[0]


def interpolation(module, sampler: Sampler, a: torch.Tensor, b: torch.Tensor, points: int):
    """Invert two images with the sampler's deterministic inversion (registry.Method.invert: DDIM's with one
    fixed-point iteration, DPM-Solver++'s multistep one), slerp the latents (DDIM Sec. 5.3), decode `points`
    images with the same sampler: one strip."""
    from .diffusion import METHODS

    method = sampler.method
    if method.invert is None or not sampler.deterministic:
        able = ", ".join(m.name for m in METHODS.values() if m.invert is not None)
        raise ValueError(f"mode=interpolate needs a deterministic sampler with an inversion ({able}); got {sampler}")
    ts = sampler.timesteps(module.diffusion)
    net = module.net.eval()
    za, zb = (method.invert(module.diffusion, net, img[None].to(module.device), ts, **sampler.options)
              for img in (a, b))
    zs = torch.cat([slerp(za, zb, w) for w in torch.linspace(0, 1, points).tolist()])
    return sampler(module.diffusion, net, zs, progress=True), points


def progression(module, sampler: Sampler, n: int, seed: int, frames: int = 10):
    """Rows = samples (images 0 .. n-1 of the run seeded `seed`), columns = x0_hat at `frames` evenly spaced steps
    (last = the final sample)."""
    ts = sampler.timesteps(module.diffusion)
    keep = {round(i * (len(ts) - 1) / max(frames - 1, 1)) for i in range(frames)}
    seen = []

    def callback(i, x, pred_x0):
        if i in keep:
            seen.append(pred_x0.clone())

    y = labels_for(module, n, None)
    n = y.shape[0] if y is not None else n
    net = module.net.eval()
    draw(module.diffusion, net, sampler, (net.in_channels, net.image_size, net.image_size), seed=seed,
         indices=range(n), labels=y, null_label=module.null_label, device=module.device, callback=callback)
    imgs = torch.stack(seen, dim=1)  # [n, frames, C, H, W]; the callback runs noisy -> clean
    return imgs.reshape(-1, *imgs.shape[2:]), imgs.shape[1]
