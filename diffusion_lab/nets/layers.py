"""U-Net building blocks (DDPM, Ho et al. 2020, App. B): time embedding, ResBlock, attention, resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Transformer, Vaswani et al. 2017 Sec. 3.5): t [B] -> [B, dim].

    [cos(t f_0), .., cos(t f_{d/2-1}), sin(t f_0), ..], f_k = max_period^(-k / (d/2)).
    """
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # float64 for a float64 net (exact tests)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (DDPM), but at least 4 channels per group for narrow layers.

    With one channel per group GroupNorm removes any per-channel constant, and so the time embedding
    that ResBlock adds just before it: narrow nets would lose their time conditioning.
    """
    groups = max(g for g in range(1, 33) if channels % g == 0 and g <= max(1, channels // 4))
    return nn.GroupNorm(groups, channels)


class Dropout(nn.Dropout):
    """nn.Dropout (Srivastava et al. 2014) with a cheaper mask on the CPU; the same law: each element kept with
    probability q = 1 - p and scaled by 1/q, so E[out] = x exactly. x [...] -> same shape and dtype.

    Why not nn.Dropout itself on the CPU: its bernoulli_ draws one random number per element, 13% of unet_small's
    training step in the profile (BENCHMARKS.md 1b). Here one 64-bit draw gives four uniform 16-bit lanes, and an
    element is kept when its lane u >= round(p * 2^16): p is rounded to a multiple of 1/65,536 (0.1 -> 0.1000061)
    and the scale is the exact 1/q of that rounded p. Other devices (CUDA's fused kernel), and p so close to 1
    that it rounds to 1 (p > 1 - 2^-17, where no lane would be kept), use nn.Dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        drop = round(self.p * 65536)  # lanes 0 .. drop-1 (of 65,536) are dropped
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or drop == 65536:
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # full 64-bit range
        lanes = bits.view(torch.int16)[:n].view(x.shape)  # int16 v uniform on [-32768, 32767], u = v + 32768
        return x * (lanes >= drop - 32768) * (65536 / (65536 - drop))


class ResBlock(nn.Module):
    """norm-SiLU-conv, + Linear(time emb), norm-SiLU-dropout-conv, + (1x1) skip.

    x [B, C_in, H, W], emb [B, emb_dim] -> [B, C_out, H, W]."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.dropout = norm(out_ch), Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (DDPM's zero init)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual. [B, C, H, W] -> same."""

    def __init__(self, channels: int, num_heads: int = 1):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"net.num_heads={num_heads} must divide the channel count {channels}")
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, C/heads]
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Downsample(nn.Module):
    """3x3 conv with stride 2: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
