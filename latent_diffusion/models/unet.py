"""The decoder: a cross-attention UNet over latents (Rombach et al. 2022, §3.3), optionally conditioned on a
CLIP image embedding as in unCLIP (Ramesh et al. 2022, §2.1).

Layout (the Stable Diffusion family): conv_in → per level [ResBlock (+ SpatialTransformer)] × layers_per_block
(+ downsample) → mid (ResBlock, SpatialTransformer, ResBlock) → per level, mirrored, ResBlocks over
[h, skip] concatenations (+ upsample) → GroupNorm/SiLU/conv_out.

Conditioning:
- timestep t → sinusoidal embedding → MLP → `temb`, added inside every ResBlock;
- text token states (B, L, context_dim) → cross-attention context;
- image embedding (B, D), when configured: (a) `image_time_proj` MLP added to `temb`, and (b)
  `image_context_proj` into N extra context tokens appended to the text tokens (GLIDE/unCLIP);
- pooled text embedding (B, P), when configured: `text_time_proj` added to `temb`.

`text_refiner_layers` (off in the Stable Diffusion family) runs a few self-attention blocks over the text tokens
before any cross-attention, trained with the decoder: a frozen text encoder's tokens may not say which colour
goes with which shape (its input token embeddings carry no context at all), and self-attention among the tokens
can bind them (cf. the trainable text transformer of GLIDE, Nichol et al. 2022, §2.1).

`position_embedding` (off in the Stable Diffusion family) gives every SpatialTransformer the absolute position
of its tokens: convolutions with zero padding only hint at it, and prompts that say where ("on the left") need
it in the attention queries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from latent_diffusion.io import (
    DIFFUSERS_WEIGHTS,
    build_with_weights,
    find_weights,
    load_model,
    load_safetensors,
    read_json,
    save_model,
)
from latent_diffusion.layers import (
    Attention,
    Downsample,
    FeedForward,
    ResBlock,
    TimestepMLP,
    Upsample,
    rename_keys,
    sincos_2d,
    timestep_embedding,
)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet`. Per-level tuples run from the highest resolution down."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)
    context_dim: int = 768
    norm_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    image_embed_dim: int | None = None  # D of `image_embeds`; None: no image conditioning
    image_embed_to_time: bool = True  # (a) add an MLP of the image embedding to the time embedding
    image_context_tokens: int = 0  # (b) number of extra context tokens projected from the image embedding
    pooled_text_dim: int | None = None  # P of `text_embeds` added to the time embedding; None: off
    position_embedding: bool = False  # add a projected 2-D sin-cos position code to every attention's tokens
    text_refiner_layers: int = 0  # self-attention blocks over the text tokens before the UNet reads them
    text_refiner_heads: int = 4

    def __post_init__(self) -> None:
        n = len(self.channels)
        for name in ("attention_levels", "heads", "transformer_depth"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name}={getattr(self, name)} must have one entry per level "
                                 f"(channels has {n})")
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_groups={self.norm_groups}")
        bad = [(c, h) for c, h, a in zip(self.channels, self.heads, self.attention_levels) if a and c % h]
        if bad:
            raise ValueError(f"(channels, heads) {bad}: channels must be divisible by heads")
        bad = [c for i, (c, a) in enumerate(zip(self.channels, self.attention_levels))
               if (a or i == n - 1) and c % 4]  # the mid block always has attention
        if self.position_embedding and bad:
            raise ValueError(f"position_embedding needs attention channels divisible by 4, got {bad}")
        if self.text_refiner_layers < 0:
            raise ValueError(f"text_refiner_layers={self.text_refiner_layers} must be >= 0")
        if self.text_refiner_layers and self.context_dim % self.text_refiner_heads:
            raise ValueError(f"context_dim={self.context_dim} is not divisible by "
                             f"text_refiner_heads={self.text_refiner_heads}")
        if self.image_context_tokens and not self.image_embed_dim:
            raise ValueError("image_context_tokens > 0 needs image_embed_dim")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.channels[0]

    @property
    def uses_image_embeds(self) -> bool:
        return self.image_embed_dim is not None


UNET_PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(channels=(16, 32), attention_levels=(False, True), layers_per_block=1, heads=(2, 2),
                       transformer_depth=(1, 1), context_dim=32, norm_groups=8),
    "tiny-unclip": UNetConfig(channels=(16, 32), attention_levels=(False, True), layers_per_block=1,
                              heads=(2, 2), transformer_depth=(1, 1), context_dim=32, norm_groups=8,
                              image_embed_dim=32, image_context_tokens=2, pooled_text_dim=32),
    "sd15": UNetConfig(),
}


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the context (none when `context_dim` is None), GEGLU
    feed-forward. (B, L, dim)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, context_dim=context_dim, upcast=upcast)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, gated=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # Residual adds in place into the fresh output projections (not kept by autograd): no extra buffers.
        x = self.attn1(self.norm1(x)).add_(x)
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class TextRefiner(nn.Module):
    """Self-attention-only `TransformerBlock`s over the text tokens. (B, L, dim) -> (B, L, dim).

    Each block's output projections start at zero: a decoder gaining a refiner computes exactly what it did
    before (a warm start), and learns how much to change the tokens."""

    def __init__(self, dim: int, heads: int, layers: int, upcast: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, None, upcast) for _ in range(layers))
        for block in self.blocks:
            for out in (block.attn1.to_out, block.ff.proj_out):
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm → project in → transformer blocks over the H·W tokens → project out, plus a residual.
    x: (B, C, H, W), context: (B, S, context_dim) -> (B, C, H, W)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 linear_projection: bool, upcast: bool, position_embedding: bool = False):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: nn.Linear(channels, channels)) if linear_projection else \
            (lambda: nn.Conv2d(channels, channels, 1))
        self.proj_in = proj()
        # Zero-initialised: a model gaining position embeddings computes exactly what it did before (a warm
        # start from weights trained without them), and learns how much position to use.
        self.pos_proj = nn.Linear(channels, channels) if position_embedding else None
        if self.pos_proj is not None:
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)
        self.blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, upcast) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C); a free view under channels_last
        h = _project(self.proj_in, h)
        if self.pos_proj is not None:  # (H·W, C) code, broadcast over the batch
            h = h + self.pos_proj(sincos_2d(H, W, C, h.device).to(h.dtype))
        for block in self.blocks:
            h = block(h, context)
        h = _project(self.proj_out, h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


def _project(layer: nn.Linear | nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """Apply a Linear, or a 1×1 Conv2d as the same Linear, to tokens (B, L, C_in) -> (B, L, C_out).

    A 1×1 convolution over (B, C, H, W) equals a Linear over the H·W tokens; one GEMM on tokens avoids the
    convolution's layout reorders and (in training) its much slower backward on CPU."""
    if isinstance(layer, nn.Conv2d):
        return F.linear(tokens, layer.weight.flatten(1), layer.bias)
    return layer(tokens)


class Level(nn.Module):
    """One UNet resolution: `res[i]` (+ `attn[i]`) pairs, then an optional `downsample`/`upsample`."""

    def __init__(self, res: list[ResBlock], attn: list[SpatialTransformer], resample: nn.Module | None,
                 resample_name: str):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample_name = resample_name  # fixes the checkpoint key: `downsample` or `upsample`
        setattr(self, resample_name, resample)


class MidBlock(nn.Module):
    def __init__(self, c: UNetConfig):
        super().__init__()
        ch = c.channels[-1]
        self.res1 = ResBlock(ch, ch, c.time_embed_dim, c.norm_groups, c.norm_eps, c.dropout)
        self.attn = SpatialTransformer(ch, c.heads[-1], c.transformer_depth[-1], c.context_dim, c.norm_groups,
                                       c.use_linear_projection, c.upcast_attention, c.position_embedding)
        self.res2 = ResBlock(ch, ch, c.time_embed_dim, c.norm_groups, c.norm_eps, c.dropout)


class UNet(nn.Module):
    """Cross-attention UNet denoiser. forward(x (B, C, h, w), t (B,) or scalar, text_states (B, L, context_dim),
    image_embeds (B, D) | None, text_embeds (B, P) | None) -> (B, out_channels, h, w).

    The network only sees timesteps: what its output means (ε, v or x0) is fixed by the noise schedule it was
    trained with (`latent_diffusion.diffusion`)."""

    config_class = UNetConfig

    def __init__(self, config: UNetConfig):
        super().__init__()
        c = self.config = config
        self.gradient_checkpointing = False
        temb = c.time_embed_dim
        self.conv_in = nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1)
        self.time_embed = TimestepMLP(c.channels[0], temb)
        self.image_time_proj = TimestepMLP(c.image_embed_dim, temb) if c.image_embed_dim and c.image_embed_to_time \
            else None
        if c.image_context_tokens:
            self.image_context_proj = nn.Linear(c.image_embed_dim, c.image_context_tokens * c.context_dim)
            self.image_context_norm = nn.LayerNorm(c.context_dim)
        else:
            self.image_context_proj = self.image_context_norm = None
        self.text_time_proj = nn.Linear(c.pooled_text_dim, temb) if c.pooled_text_dim else None
        self.text_refiner = TextRefiner(c.context_dim, c.text_refiner_heads, c.text_refiner_layers,
                                        c.upcast_attention) if c.text_refiner_layers else None

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, temb, c.norm_groups, c.norm_eps, c.dropout)

        def attn(ch: int, level: int) -> SpatialTransformer:
            return SpatialTransformer(ch, c.heads[level], c.transformer_depth[level], c.context_dim, c.norm_groups,
                                      c.use_linear_projection, c.upcast_attention, c.position_embedding)

        n = len(c.channels)
        down, skip_channels, prev = [], [c.channels[0]], c.channels[0]
        for i, ch in enumerate(c.channels):
            blocks = [res(prev if j == 0 else ch, ch) for j in range(c.layers_per_block)]
            attns = [attn(ch, i) for _ in range(c.layers_per_block)] if c.attention_levels[i] else []
            skip_channels += [ch] * c.layers_per_block
            last = i == n - 1
            if not last:
                skip_channels.append(ch)
            down.append(Level(blocks, attns, None if last else Downsample(ch), "downsample"))
            prev = ch
        self.down = nn.ModuleList(down)
        self.mid = MidBlock(c)
        up = []
        for i in reversed(range(n)):
            ch = c.channels[i]
            blocks = []
            for _ in range(c.layers_per_block + 1):
                blocks.append(res(prev + skip_channels.pop(), ch))
                prev = ch
            attns = [attn(ch, i) for _ in range(c.layers_per_block + 1)] if c.attention_levels[i] else []
            up.append(Level(blocks, attns, Upsample(ch) if i > 0 else None, "upsample"))
        self.up = nn.ModuleList(up)
        self.norm_out = nn.GroupNorm(c.norm_groups, c.channels[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(c.channels[0], c.out_channels, 3, padding=1)

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> UNet:
        """Recompute each ResBlock and transformer in the backward pass instead of storing activations."""
        self.gradient_checkpointing = enabled
        return self

    def condition(self, t: torch.Tensor, text_states: torch.Tensor, image_embeds: torch.Tensor | None,
                  text_embeds: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Build (temb (B, time_embed_dim), context (B, L + N, context_dim)) from the conditioning inputs.

        A missing `image_embeds` on an image-conditioned model means the null (all-zero) embedding, the one
        used for conditioning dropout in training."""
        c = self.config
        dtype = self.conv_in.weight.dtype
        t = torch.as_tensor(t, device=text_states.device)
        t = t.expand(batch) if t.ndim == 0 else t
        temb = self.time_embed(timestep_embedding(t, c.channels[0], cos_first=c.flip_sin_to_cos,
                                                  freq_shift=c.freq_shift).to(dtype))
        context = text_states if self.text_refiner is None else self.text_refiner(text_states)
        if c.uses_image_embeds:
            if image_embeds is None:
                image_embeds = torch.zeros(batch, c.image_embed_dim, device=temb.device, dtype=dtype)
            if image_embeds.shape[-1] != c.image_embed_dim:
                raise ValueError(f"image_embeds has width {image_embeds.shape[-1]}, the UNet expects "
                                 f"{c.image_embed_dim}")
            if self.image_time_proj is not None:
                temb = temb + self.image_time_proj(image_embeds)
            if self.image_context_proj is not None:
                tokens = self.image_context_proj(image_embeds).unflatten(-1, (c.image_context_tokens, -1))
                context = torch.cat([context, self.image_context_norm(tokens)], dim=1)  # (B, L + N, ctx)
        if self.text_time_proj is not None and text_embeds is not None:
            temb = temb + self.text_time_proj(text_embeds)
        return temb, context

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, text_states: torch.Tensor,
                image_embeds: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        temb, context = self.condition(t, text_states, image_embeds, text_embeds, x.shape[0])
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = self._run(block, h, temb)
                if level.attn:
                    h = self._run(level.attn[i], h, context)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)
        h = self._run(self.mid.res1, h, temb)
        h = self._run(self.mid.attn, h, context)
        h = self._run(self.mid.res2, h, temb)
        for level in self.up:
            for i, block in enumerate(level.res):
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), temb)
                if level.attn:
                    h = self._run(level.attn[i], h, context)
            if level.upsample is not None:
                h = level.upsample(h, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))

    # --- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        save_model(self, folder, dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> UNet:
        return load_model(cls, folder, device, dtype)

    @classmethod
    def from_diffusers(cls, folder: str | Path) -> UNet:
        """Load a diffusers `UNet2DConditionModel` folder of the Stable Diffusion family.

        Supported: CrossAttnDownBlock2D/DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D/CrossAttnUpBlock2D,
        any channels, heads, layers per block and transformer depth, `use_linear_projection`,
        `upcast_attention`, and `class_embed_type="projection"` (Stable unCLIP's image-embedding input,
        loaded as `image_time_proj`). Anything else is refused by name."""
        folder = Path(folder)
        config = unet_config_from_diffusers(read_json(folder / "config.json"), source=str(folder / "config.json"))
        state = load_safetensors(find_weights(folder, DIFFUSERS_WEIGHTS))
        state = rename_keys(state, DIFFUSERS_UNET_RULES)
        return build_with_weights(cls, config, state, source=str(folder))


def unet_config_from_diffusers(raw: dict, source: str = "config.json") -> UNetConfig:
    """Translate a diffusers `UNet2DConditionModel` config into a `UNetConfig`, refusing unsupported options."""
    if raw.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{source} describes a {raw['_class_name']}, not a UNet2DConditionModel")
    down = raw.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = raw.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    down_ok = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    up_ok = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
    bad = [b for b in down if b not in down_ok] + [b for b in up if b not in up_ok]
    if bad:
        raise ValueError(f"{source}: unsupported block types {bad}; supported: {sorted(down_ok) + sorted(up_ok)}")
    attention = tuple(down_ok[b] for b in down)
    if tuple(up_ok[b] for b in reversed(up)) != attention:
        raise ValueError(f"{source}: up_block_types {up} do not mirror down_block_types {down}")
    if raw.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"{source}: unsupported mid_block_type {raw['mid_block_type']!r}; "
                         "only UNetMidBlock2DCrossAttn is supported")
    defaults = {"addition_embed_type": None, "time_embedding_type": "positional", "encoder_hid_dim": None,
                "dual_cross_attention": False, "only_cross_attention": False, "resnet_time_scale_shift": "default",
                "conv_in_kernel": 3, "conv_out_kernel": 3, "time_cond_proj_dim": None,
                "class_embeddings_concat": False, "center_input_sample": False, "downsample_padding": 1,
                "mid_block_scale_factor": 1, "act_fn": "silu", "time_embedding_dim": None,
                "timestep_post_act": None, "time_embedding_act_fn": None, "attention_type": "default",
                "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
                "mid_block_only_cross_attention": None, "num_class_embeds": None}
    for key, default in defaults.items():
        value = raw.get(key, default)
        if not default and (value is False or (isinstance(value, list) and not any(value))):
            continue  # e.g. only_cross_attention: [false, false, ...]; mid_block_only_cross_attention: false
        if value != default:
            raise ValueError(f"{source}: unsupported {key}={value!r} (only {default!r} is supported)")
    class_embed = raw.get("class_embed_type")
    if class_embed not in (None, "projection"):
        raise ValueError(f"{source}: unsupported class_embed_type={class_embed!r}; supported: None, 'projection'")
    n = len(down)

    def per_level(value: int | list[int], name: str) -> tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * n
        if len(value) != n:
            raise ValueError(f"{source}: {name}={value} must have {n} entries")
        return tuple(value)

    layers = raw.get("layers_per_block", 2)
    if not isinstance(layers, int):
        raise ValueError(f"{source}: per-level layers_per_block={layers} is not supported; use one integer")
    heads = raw.get("num_attention_heads") or raw.get("attention_head_dim", 8)  # SD names head counts "head_dim"
    cross = raw.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        raise ValueError(f"{source}: per-level cross_attention_dim={cross} is not supported")
    return UNetConfig(
        in_channels=raw.get("in_channels", 4), out_channels=raw.get("out_channels", 4),
        channels=tuple(raw.get("block_out_channels", (320, 640, 1280, 1280))), attention_levels=attention,
        layers_per_block=layers, heads=per_level(heads, "attention_head_dim"),
        transformer_depth=per_level(raw.get("transformer_layers_per_block", 1), "transformer_layers_per_block"),
        context_dim=cross, norm_groups=raw.get("norm_num_groups", 32), norm_eps=raw.get("norm_eps", 1e-5),
        dropout=raw.get("dropout", 0.0), use_linear_projection=raw.get("use_linear_projection", False),
        upcast_attention=raw.get("upcast_attention", False), flip_sin_to_cos=raw.get("flip_sin_to_cos", True),
        freq_shift=float(raw.get("freq_shift", 0)),
        image_embed_dim=raw.get("projection_class_embeddings_input_dim") if class_embed else None,
    )


# diffusers key → ours, applied in order.
DIFFUSERS_UNET_RULES: list[tuple[str, str]] = [
    (r"^time_embedding\.", "time_embed."),
    (r"^class_embedding\.", "image_time_proj."),
    (r"^(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res."),
    (r"^(down|up)_blocks\.(\d+)\.attentions\.", r"\1.\2.attn."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"down.\1.downsample."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r"up.\1.upsample."),
    (r"^mid_block\.resnets\.0\.", "mid.res1."),
    (r"^mid_block\.resnets\.1\.", "mid.res2."),
    (r"^mid_block\.attentions\.0\.", "mid.attn."),
    (r"\.transformer_blocks\.", ".blocks."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"^conv_norm_out\.", "norm_out."),
]
