"""The DDPM U-Net (Ho et al. 2020, App. B; Nichol & Dhariwal 2021 for learned sigma and classes).

net = UNet(image_size=32, in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
           num_res_blocks=2, attention_resolutions=(16,), dropout=0.1)   # 35.7M params, DDPM CIFAR-10
out = net(x_t, t)          # x_t [B, C, H, W], t int64 [B] -> [B, C (2C if learn_sigma), H, W]
out = net(x_t, t, y=y)     # class-conditional: y int64 [B] in 0..num_classes (num_classes = null label)
out = net(x_t, t, h=h)     # time_inputs=2: a second time h [B] (MeanFlow's t - r), its embedding added to t's
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checks import check_count
from .layers import Downsample, ResBlock, SelfAttention, Upsample, norm, timestep_embedding


class UNet(nn.Module):
    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        base_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_heads: int = 1,
        learn_sigma: bool = False,
        num_classes: int | None = None,
        time_inputs: int = 1,
    ):
        super().__init__()
        for key, value in (
            ("base_channels", base_channels),
            ("num_res_blocks", num_res_blocks),
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("num_heads", num_heads),
        ):
            check_count(f"net.{key}", value, 0 if key == "num_res_blocks" else 1)
        if time_inputs not in (1, 2) or isinstance(time_inputs, bool):
            raise ValueError(f"net.time_inputs={time_inputs!r} must be 1 or 2 (a second time: objective=meanflow)")
        if not channel_mult or any(not isinstance(m, int) or m < 1 for m in channel_mult):
            raise ValueError(f"net.channel_mult={list(channel_mult)} must be a non-empty list of positive integers")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"net.dropout={dropout} must be in [0, 1)")
        levels = len(channel_mult)
        if image_size % (2 ** (levels - 1)):
            raise ValueError(
                f"data.image_size={image_size} cannot be halved {levels - 1} times "
                f"for net.channel_mult={list(channel_mult)}"
            )
        reached = {image_size // 2**i for i in range(levels)}
        if bad := sorted(set(attention_resolutions) - reached):
            raise ValueError(
                f"net.attention_resolutions={list(attention_resolutions)}: {bad} never reached; "
                f"the network's resolutions are {sorted(reached, reverse=True)}"
            )
        self.image_size, self.in_channels, self.learn_sigma = image_size, in_channels, learn_sigma
        self.num_classes, self.base_channels = num_classes, base_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.time_inputs = time_inputs
        if time_inputs == 2:  # the second time's embedding, summed with the first's; zero at start, so a one-time
            # checkpoint loaded into it (its other weights) computes what it computed before, for any h
            self.time_embed2 = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.time_embed2[-1].weight)
            nn.init.zeros_(self.time_embed2[-1].bias)
        # num_classes + 1 embeddings: index num_classes is the null label of classifier-free guidance.
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

        self.stem = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels, ch, res = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                block = nn.ModuleList([ResBlock(ch, base_channels * mult, emb_dim, dropout)])
                ch = base_channels * mult
                if res in attention_resolutions:
                    block.append(SelfAttention(ch, num_heads))
                self.down.append(block)
                skip_channels.append(ch)
            if level != levels - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, emb_dim, dropout), SelfAttention(ch, num_heads), ResBlock(ch, ch, emb_dim, dropout)]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(ch + skip_channels.pop(), base_channels * mult, emb_dim, dropout)])
                ch = base_channels * mult
                if res in attention_resolutions:
                    block.append(SelfAttention(ch, num_heads))
                if level and i == num_res_blocks:
                    block.append(Upsample(ch))
                    res *= 2
                self.up.append(block)
        self.head = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(ch, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    @staticmethod
    def _run(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, h: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, C, H, W], t [B] (the process's network time), y int64 [B] or None, h [B] the second time of a
        time_inputs=2 net (None: 0) -> [B, out_channels, H, W]."""
        time_dtype = self.time_embed[0].weight.dtype  # times embedded in the net's precision
        emb = self.time_embed(timestep_embedding(t.to(time_dtype), self.base_channels))
        if self.time_inputs == 2:
            h = torch.zeros_like(t, dtype=time_dtype) if h is None else h.to(time_dtype)
            emb = emb + self.time_embed2(timestep_embedding(h, self.base_channels))
        elif h is not None:
            raise ValueError("a second time h was given but the network takes one (set net.time_inputs=2)")
        if self.class_embed is not None:
            if y is None:  # unconditional call of a conditional net: the null label
                y = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            emb = emb + self.class_embed(y)
        elif y is not None:
            raise ValueError("labels y were given but the network has no class embedding (set net.num_classes)")
        h = self.stem(x)
        skips = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for block in self.up:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["UNet", "count_parameters"]
