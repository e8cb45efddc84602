"""Per-image randomness: every image draws its label, x_T and each stochastic step's noise from its own generator,
seeded by (seed, its index), so an image never depends on the batch it was drawn in, the number of ranks sharing
the work or the order of a grid (NVlabs/edm's generate.py does the same with a seed per image).

    images, labels = draw(diffusion, model, Sampler("ddim", 50, eta=1.0), (1, 28, 28), seed=0, indices=range(1000),
                          batch_size=250, num_classes=10, null_label=10)   # the same images for any batch_size
    gens = ImageGenerators.for_images(seed=0, indices=[8, 9, 10])
    x_T = gens.randn((1, 28, 28))               # [3, 1, 28, 28]: row k from image indices[k]'s generator
    z = noise_like(x_T, gens)                   # what the samplers draw per step (a torch.Generator works too)

Generators live on the CPU (numbers move to the model's device afterwards), so an image is also the same on
any device up to the network's own float rounding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..checks import check_count


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a run seeded `seed`: a hash of the two, so nearby values give unrelated
    streams (seed 0 image 1 and seed 1 image 0 differ)."""
    digest = hashlib.blake2b(f"image/{int(seed)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageGenerators:
    """One CPU torch.Generator per image of a batch; draws [B, ...] with row k from generator k."""

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def for_images(cls, seed: int, indices: Sequence[int]) -> ImageGenerators:
        return cls([torch.Generator().manual_seed(image_seed(seed, i)) for i in indices])

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """Standard normals [B, *shape], row k drawn from generator k (on the CPU, then moved to `device`)."""
        draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        rows = [torch.randn(tuple(shape), generator=g, dtype=draw_dtype) for g in self.generators]
        out = torch.stack(rows) if rows else torch.zeros(0, *shape, dtype=draw_dtype)
        return out.to(device=device, dtype=dtype)

    def randint(self, high: int) -> torch.Tensor:
        """One uniform integer in [0, high) per image: int64 [B]."""
        return torch.cat([torch.randint(0, int(high), (1,), generator=g) for g in self.generators])


MIN_ROWS = 32


class PaddedModel:
    """model(x, t, **kw) evaluated on at least `rows` rows: a smaller batch is padded with copies of its first row
    and the extra outputs dropped. On the CPU, oneDNN's convolutions and MKL's GEMM take another code path for a
    few rows (measured: fewer than 7 rows for the digits U-Net, fewer than 16 for a 256 -> 512 Linear), which
    changes the last float bits of every row; from there on each row's result does not depend on the batch. So a
    batch of 1 (or the last, short batch of a run) gives the same images as a batch of 64. On GPUs the kernels may
    still round differently at other batch sizes."""

    def __init__(self, model, rows: int = MIN_ROWS):
        self.model, self.rows = model, int(rows)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        b = x.shape[0]
        if b >= self.rows:
            return self.model(x, t, **kwargs)

        def pad(v):
            if torch.is_tensor(v) and v.ndim and v.shape[0] == b:
                return torch.cat([v, v[:1].expand(self.rows - b, *v.shape[1:])])
            return v

        return self.model(pad(x), pad(t), **{k: pad(v) for k, v in kwargs.items()})[:b]


def noise_like(x: torch.Tensor, generator: torch.Generator | ImageGenerators | None) -> torch.Tensor:
    """Standard normal noise shaped like x [B, ...], in x's dtype and device: per image from ImageGenerators, else
    from one torch.Generator (or the global RNG)."""
    if isinstance(generator, ImageGenerators):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} image generators for a batch of {x.shape[0]}")
        return generator.randn(x.shape[1:], x.dtype, x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def draw(
    diffusion,
    model,
    sampler: Callable,
    shape: Sequence[int],
    *,
    seed: int,
    indices: Sequence[int],
    batch_size: int | None = None,
    labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    null_label: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images `indices` of the run seeded `seed`: (x_0 [n, *shape] on the CPU, labels [n] or None).

    Image i's generator gives, in this order, its label (uniform over num_classes, when the model is conditional
    and `labels` [n] are not given), its x_T [*shape] (N(0, I) times the process's noise_std at the sampler's
    first time: 1 on DDPM, sigma there on EDM and flow) and every stochastic step's noise. `sampler` is a Sampler
    (called as sampler(diffusion, model, x_T, model_kwargs=..., generator=..., null_label=...)); batches of
    `batch_size` (None: all at once) change nothing but speed and memory: the model sees at least MIN_ROWS rows
    per call (PaddedModel). progress: a bar over the images (several batches) or over the sampler's steps (one).
    """
    indices = [int(i) for i in indices]
    if batch_size is not None:
        batch_size = check_count("batch_size", batch_size)
    if labels is not None and len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} images")
    step = int(batch_size or max(len(indices), 1))
    starts = range(0, len(indices), step)
    # progress: over several batches one bar counting images, with an ETA (on a terminal only); in one batch the
    # sampler's own bar over its steps
    several = progress and len(starts) > 1
    bar = tqdm(total=len(indices), unit="img", desc="sampling", leave=False, disable=None) if several else None
    # x_T's noise level: the process's at the sampler's first time (a plain callable starts at the last one)
    times = sampler.timesteps(diffusion) if hasattr(sampler, "timesteps") else [diffusion.num_timesteps - 1]
    scale = diffusion.noise_std(times[-1])
    images, drawn = [], []
    for lo in starts:
        gens = ImageGenerators.for_images(seed, indices[lo : lo + step])
        y = None
        if labels is not None:
            y = labels[lo : lo + step].long()
        elif num_classes is not None:
            y = gens.randint(num_classes)
        x_T = gens.randn(shape, dtype, device)
        if scale != 1.0:  # EDM / flow: the noise level at the sampler's first time (Process.noise_std)
            x_T = x_T * scale
        kwargs = {"y": y.to(device)} if y is not None else None
        out = sampler(
            diffusion, PaddedModel(model), x_T, model_kwargs=kwargs, generator=gens, null_label=null_label,
            progress=progress and bar is None,
            callback=callback,
        )  # fmt: skip
        images.append(out.cpu())
        if bar is not None:
            bar.update(out.shape[0])
        if y is not None:
            drawn.append(y)
    if bar is not None:
        bar.close()
    x = torch.cat(images) if images else torch.zeros(0, *shape, dtype=dtype)
    return x, (torch.cat(drawn) if drawn else None)
