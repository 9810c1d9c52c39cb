"""Primitives shared by the models: the attention function and its backends, timestep embeddings,
multi-head attention and feed-forward layers."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionBackend = Literal["sdpa", "xformers", "math"]
ATTENTION_BACKENDS: tuple[str, ...] = ("sdpa", "xformers", "math")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              backend: AttentionBackend = "sdpa", upcast: bool = False) -> torch.Tensor:
    """Scaled dot-product attention softmax(q kᵀ / √d + mask) v (Vaswani et al. 2017, Eq. 1).

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); mask: broadcastable to (B, H, Lq, Lk), or None: additive (float), or
    boolean with True where attention is allowed (SDPA's convention; made additive here for every backend).
    Returns (B, H, Lq, D). `upcast` computes the scores in fp32 (SD 2.x `upcast_attention`).
    Backends: `sdpa` (torch's fused kernels, the default), `xformers` (CUDA only) and `math`
    (the plain reference).
    """
    if mask is not None and mask.dtype == torch.bool:
        # finite (half precision and autocast keep it finite); a row with nothing allowed gives 0, as SDPA's does
        empty = ~mask.any(dim=-1, keepdim=True)
        additive = torch.zeros(mask.shape, dtype=q.dtype, device=mask.device).masked_fill(~mask, -1e4)
        return attention(q, k, v, additive, backend, upcast).masked_fill(empty, 0.0)
    if backend == "sdpa":
        if upcast and q.dtype in (torch.float16, torch.bfloat16):
            return attention(q, k, v, mask, "math", upcast=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        dtype = q.dtype
        if upcast:
            q, k = q.float(), k.float()
        scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (B, H, Lq, Lk)
        if mask is not None:
            scores = scores + mask
        return (scores.softmax(dim=-1).to(v.dtype) @ v).to(dtype)
    if backend == "xformers":
        return _xformers_attention(q, k, v, mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(ATTENTION_BACKENDS)}")


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None) -> torch.Tensor:
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise ValueError("attention backend 'xformers' needs the xformers package: "
                         "pip install xformers (CUDA only; in a checkout: pip install -e '.[xformers]')") from e
    if not q.is_cuda:
        raise ValueError(f"attention backend 'xformers' runs on CUDA only, got a tensor on {q.device}; "
                         "use 'sdpa' or 'math'")
    # xformers wants (B, L, H, D).
    bias = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).to(q.dtype)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


def set_attention_backend(model: nn.Module, backend: AttentionBackend) -> nn.Module:
    """Switch every `Attention` layer of `model` to `backend` (applied from outside the model code)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(ATTENTION_BACKENDS)}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
    return model


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections (self-attention when `context` is None).

    x: (B, L, dim), context: (B, S, context_dim) -> (B, L, dim).
    `latent_diffusion.speed.fuse_qkv` may replace the projections by one `to_qkv` (self-attention) or one
    `to_kv` (cross-attention) Linear; the forward pass below takes whichever is present.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False,
                 out_bias: bool = True, upcast: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.is_cross_attention = context_dim is not None
        context_dim = context_dim or dim
        self.heads, self.upcast, self.backend = heads, upcast, "sdpa"
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.Linear(dim, dim, bias=out_bias)
        self.to_qkv: nn.Linear | None = None  # set by speed.fuse_qkv (self-attention)
        self.to_kv: nn.Linear | None = None  # set by speed.fuse_qkv (cross-attention)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = x.shape
        if self.to_qkv is not None:
            if context is None:  # (B, L, 3·dim) -> 3 × (B, H, L, D)
                q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            else:  # a fused self-attention layer given a context: q rows from x, k/v rows from the context
                w, b = self.to_qkv.weight, self.to_qkv.bias
                dim = w.shape[0] // 3
                q = F.linear(x, w[:dim], None if b is None else b[:dim])
                q = q.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                kv = F.linear(context, w[dim:], None if b is None else b[dim:])
                k, v = kv.unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        else:
            context = x if context is None else context
            q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, L, D)
            if self.to_kv is not None:  # (B, S, 2·dim) -> 2 × (B, H, S, D)
                k, v = self.to_kv(context).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
            else:
                k = self.to_k(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                v = self.to_v(context).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        out = attention(q, k, v, mask, self.backend, self.upcast)  # (B, H, L, D)
        return self.to_out(out.transpose(1, 2).reshape(B, L, -1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, cos_first: bool = True,
                       freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, §3.5; DDPM App. B).

    t: (B,) -> (B, dim); frequencies exp(-ln(max_period) · i / (half - freq_shift)), i < dim/2.
    `cos_first` puts the cosines first (the Stable Diffusion convention, `flip_sin_to_cos`).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)], -1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_2d(height: int, width: int, dim: int, device: torch.device | None = None,
              max_period: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of an H×W grid (Vaswani et al. 2017, §3.5, one half of the
    channels per axis as in MAE, He et al. 2022). -> (H·W, dim), rows in row-major (y, x) order; dim % 4 == 0."""
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(-math.log(max_period) * torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    y = torch.arange(height, dtype=torch.float32, device=device)[:, None] * freqs  # (H, dim/4)
    x = torch.arange(width, dtype=torch.float32, device=device)[:, None] * freqs  # (W, dim/4)
    ey = torch.cat([y.sin(), y.cos()], -1)[:, None].expand(height, width, dim // 2)
    ex = torch.cat([x.sin(), x.cos()], -1)[None].expand(height, width, dim // 2)
    return torch.cat([ey, ex], -1).reshape(height * width, dim)


class TimestepMLP(nn.Module):
    """Linear → SiLU → Linear, used on timestep embeddings and on conditioning vectors."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class FeedForward(nn.Module):
    """Transformer MLP: GEGLU (Shazeer 2020, Eq. 6) when `gated`, else Linear → GELU → Linear."""

    def __init__(self, dim: int, mult: int = 4, gated: bool = True):
        super().__init__()
        inner = dim * mult
        self.gated = gated
        self.proj_in = nn.Linear(dim, inner * 2 if gated else inner)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h, gate = self.proj_in(x).chunk(2, dim=-1)
            return self.proj_out(h * F.gelu(gate))
        return self.proj_out(F.gelu(self.proj_in(x)))


class ResBlock(nn.Module):
    """Residual block GroupNorm → SiLU → Conv3×3 (+ time embedding) → GroupNorm → SiLU → Conv3×3
    (Ho et al. 2020, App. B; the Stable Diffusion ResnetBlock2D).

    x: (B, C_in, H, W), temb: (B, temb_dim) or None -> (B, C_out, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None = None, groups: int = 32,
                 eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # The in-place adds write into fresh convolution outputs, which autograd does not keep for backward.
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h += self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Downsample(nn.Conv2d):
    """Stride-2 3×3 convolution. `asymmetric` pads (0, 1, 0, 1) instead of 1 on every side (the SD VAE)."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)
        self.asymmetric = asymmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class Upsample(nn.Conv2d):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 convolution. `size` overrides the ×2 target.
    x: (B, C, H, W) -> (B, C, 2H, 2W). (`speed.transposed_upsample` computes the same with fewer operations.)"""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0,
                                                                                     mode="nearest")
        return super().forward(x)


def rename_keys(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply regex substitutions `rules` (in order) to every key of a state dict."""
    import re

    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out
