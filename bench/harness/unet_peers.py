"""The configurations the speed benchmarks compare, and their matched diffusers U-Nets.

CONFIGS name our U-Net settings (conf/net/unet_small.yaml, conf/net/unet_cifar10.yaml) with the batch
sizes of the issue; `diffusers_unet` builds diffusers' UNet2DModel with the same levels, channels, blocks
per level, attention resolutions (one head), dropout and time-embedding width, which gives equal
parameter counts (checked by bench/train_throughput.py).
"""

from __future__ import annotations

import torch

CONFIGS = {
    "small": {"net": "unet_small", "image_size": 32, "channels": 1, "batch": 64, "base": 32,
              "mult": (1, 2, 2, 2), "blocks": 1, "attn": (16,), "dropout": 0.1},
    "digits": {"net": "unet_digits", "image_size": 8, "channels": 1, "batch": 128, "base": 32,
               "mult": (1, 2, 2), "blocks": 2, "attn": (4,), "dropout": 0.1},
    "cifar10": {"net": "unet_cifar10", "image_size": 32, "channels": 3, "batch": 8, "base": 128,
                "mult": (1, 2, 2, 2), "blocks": 2, "attn": (16,), "dropout": 0.1},
}


def ours_unet(c: dict, num_classes: int | None = None):
    from diffusion_lab.nets import UNet

    return UNet(image_size=c["image_size"], in_channels=c["channels"], base_channels=c["base"],
                channel_mult=c["mult"], num_res_blocks=c["blocks"], attention_resolutions=c["attn"],
                dropout=c["dropout"], num_classes=num_classes)


def diffusers_unet(c: dict):
    """UNet2DModel matched to `c`: Attn*Block2D at the attention resolutions, one attention head."""
    from diffusers import UNet2DModel

    res = [c["image_size"] // 2**i for i in range(len(c["mult"]))]
    down = tuple("AttnDownBlock2D" if r in c["attn"] else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in c["attn"] else "UpBlock2D" for r in reversed(res))
    chans = tuple(c["base"] * m for m in c["mult"])
    # Our GroupNorm has 32 groups but >= 4 channels per group (nets/layers.py): 8 groups at 32 channels.
    return UNet2DModel(sample_size=c["image_size"], in_channels=c["channels"], out_channels=c["channels"],
                       block_out_channels=chans, layers_per_block=c["blocks"], down_block_types=down,
                       up_block_types=up, norm_num_groups=min(32, c["base"] // 4),
                       attention_head_dim=max(chans), dropout=c["dropout"])


class DiffusersEps(torch.nn.Module):
    """diffusers' UNet2DModel behind our `net(x, t) -> eps` call (its output is `.sample`)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, **_):
        return self.unet(x, t).sample


def random_images(c: dict, n: int, seed: int = 0) -> torch.Tensor:
    """uint8 [n, C, S, S]: the benchmark's stand-in data (the cost of a step does not depend on the pixels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c["channels"], c["image_size"], c["image_size"]), generator=g,
                         dtype=torch.uint8)
