"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3 and App. G).

Encoder: conv → [ResBlocks (+ downsample)] per level → mid (ResBlock, self-attention, ResBlock)
→ GroupNorm/SiLU/conv to 2·latent_channels (mean and log-variance). The decoder mirrors it.
The weight layout follows the Stable Diffusion family so `from_diffusers` is a key rename.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latent_diffusion.io import (
    DIFFUSERS_WEIGHTS,
    build_with_weights,
    config_from_dict,
    find_weights,
    load_model,
    load_safetensors,
    read_json,
    save_model,
)
from latent_diffusion.layers import Attention, Downsample, ResBlock, Upsample, rename_keys


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture and latent statistics of an `AutoencoderKL`.

    `scaling_factor` (and `shift_factor`) map posterior samples z to unit-variance diffusion latents:
    latents = (z - shift_factor) · scaling_factor (Rombach et al. 2022, §4.3.2 / App. G).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    mid_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    # diffusers' `force_upcast` (on in converted configs): a pipeline in float16 runs such a VAE in float32, as
    # diffusers' SDXL pipelines do (SDXL's VAE overflows float16; its Stable unCLIP pipelines do not upcast).
    force_upcast: bool = False

    def __post_init__(self) -> None:
        bad = [c for c in self.channels if c % self.norm_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_groups={self.norm_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


AUTOENCODER_PRESETS: dict[str, AutoencoderKLConfig] = {
    "tiny": AutoencoderKLConfig(channels=(8, 16), layers_per_block=1, norm_groups=4, latent_channels=4),
    "sd": AutoencoderKLConfig(),
}


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar))). params: (B, 2·C, h, w), log-variance clamped to
    [-30, 20] as in the reference implementation."""

    def __init__(self, params: torch.Tensor):
        mean, logvar = params.chunk(2, dim=1)
        self.mean = mean.contiguous()  # ordinary (B, C, h, w) tensors, whatever params' layout (channels_last)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std · ε (the reparameterisation trick, Kingma & Welling 2014, Eq. 10)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        eps = eps.to(self.mean.device)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) ‖ N(0, I)) summed over latent dimensions: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all positions of a feature map, with a residual. (B, C, H, W)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.attn = Attention(channels, heads=1, qkv_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2).contiguous()  # (B, HW, C): one copy for q, k and v
        h = self.attn(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups=groups)
        self.attn = SpatialSelfAttention(channels, groups) if attention else None
        self.res2 = ResBlock(channels, channels, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.res2(x)


class Level(nn.Module):
    """One resolution of the encoder or decoder: ResBlocks, then an optional down/upsample."""

    def __init__(self, res: list[ResBlock], resample: nn.Module | None, upsample: bool):
        super().__init__()
        self.res = nn.ModuleList(res)
        # The attribute name only fixes the checkpoint key (`down.i.downsample` / `up.i.upsample`).
        self.resample_name = "upsample" if upsample else "downsample"
        setattr(self, self.resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            x = block(x)
        resample = getattr(self, self.resample_name)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.channels[0], 3, padding=1)
        levels, prev = [], c.channels[0]
        for i, ch in enumerate(c.channels):
            res = [ResBlock(prev if j == 0 else ch, ch, groups=c.norm_groups) for j in range(c.layers_per_block)]
            last = i == len(c.channels) - 1
            levels.append(Level(res, None if last else Downsample(ch, asymmetric=True), upsample=False))
            prev = ch
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(prev, c.norm_groups, c.mid_attention)
        self.norm_out = nn.GroupNorm(c.norm_groups, prev, eps=1e-6)
        self.conv_out = nn.Conv2d(prev, 2 * c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        rev = list(reversed(c.channels))
        self.conv_in = nn.Conv2d(c.latent_channels, rev[0], 3, padding=1)
        self.mid = MidBlock(rev[0], c.norm_groups, c.mid_attention)
        levels, prev = [], rev[0]
        for i, ch in enumerate(rev):
            res = [ResBlock(prev if j == 0 else ch, ch, groups=c.norm_groups) for j in range(c.layers_per_block + 1)]
            last = i == len(rev) - 1
            levels.append(Level(res, None if last else Upsample(ch), upsample=True))
            prev = ch
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(c.norm_groups, prev, eps=1e-6)
        self.conv_out = nn.Conv2d(prev, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL autoencoder. `encode(x)`: (B, 3, H, W) in [-1, 1] → posterior over (B, C, H/f, W/f);
    `decode(z)`: (B, C, h, w) → (B, 3, h·f, w·f), f = `config.downsample_factor`."""

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        lc = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * lc, 2 * lc, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(lc, lc, 1) if config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x: returns (reconstruction (B, 3, H, W), posterior). z is the posterior mode unless
        `sample`; then z = mean + std · noise, with `noise` (B, C, h, w) drawn from `generator` if not given."""
        posterior = self.encode(x)
        if not sample:
            z = posterior.mode()
        elif noise is not None:
            z = posterior.mean + posterior.std * noise
        else:
            z = posterior.sample(generator)
        return self.decode(z), posterior

    def to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior sample z → unit-variance diffusion latents (z - shift) · scale."""
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion latents → z for `decode` (the inverse of `to_latents`)."""
        return latents / self.config.scaling_factor + (self.config.shift_factor or 0.0)

    # --- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        save_model(self, folder, dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> AutoencoderKL:
        return load_model(cls, folder, device, dtype)

    @classmethod
    def from_diffusers(cls, folder: str | Path) -> AutoencoderKL:
        """Load a diffusers `AutoencoderKL` folder (`config.json` + `diffusion_pytorch_model.safetensors`)."""
        folder = Path(folder)
        raw = read_json(folder / "config.json")
        if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"{folder} holds a {raw['_class_name']}, not an AutoencoderKL")
        for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [b for b in raw.get(key, []) if b != allowed]
            if bad:
                raise ValueError(f"{folder}: unsupported {key} {bad}; only {allowed} is supported")
        if raw.get("act_fn", "silu") != "silu":
            raise ValueError(f"{folder}: unsupported act_fn {raw['act_fn']!r}; only 'silu' is supported")
        per_channel = [k for k in ("latents_mean", "latents_std") if raw.get(k) is not None]
        if per_channel:  # a per-channel latent normalisation, which scaling_factor / shift_factor cannot express
            raise ValueError(f"{folder}: unsupported {' and '.join(per_channel)} (per-channel latent statistics); "
                             "only a scalar scaling_factor and shift_factor are supported")
        config = config_from_dict(AutoencoderKLConfig, {
            "in_channels": raw.get("in_channels", 3),
            "out_channels": raw.get("out_channels", 3),
            "latent_channels": raw.get("latent_channels", 4),
            "channels": raw.get("block_out_channels", [64]),
            "layers_per_block": raw.get("layers_per_block", 1),
            "norm_groups": raw.get("norm_num_groups", 32),
            "mid_attention": raw.get("mid_block_add_attention", True),
            "use_quant_conv": raw.get("use_quant_conv", True),
            "use_post_quant_conv": raw.get("use_post_quant_conv", True),
            "scaling_factor": raw.get("scaling_factor", 0.18215),
            "shift_factor": raw.get("shift_factor"),
            "force_upcast": raw.get("force_upcast", True),  # diffusers' default
        }, source=str(folder / "config.json"))
        state = load_safetensors(find_weights(folder, DIFFUSERS_WEIGHTS))
        state = rename_keys(state, DIFFUSERS_VAE_RULES)
        # Old-format checkpoints store the mid attention projections as 1×1 convolutions.
        state = {k: v[:, :, 0, 0] if ".attn.attn." in k and v.ndim == 4 else v for k, v in state.items()}
        return build_with_weights(cls, config, state, source=str(folder))


# diffusers key → ours, applied in order.
DIFFUSERS_VAE_RULES: list[tuple[str, str]] = [
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.res."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r".down.\1.downsample."),
    (r"\.up_blocks\.(\d+)\.resnets\.", r".up.\1.res."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", r".up.\1.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.res1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.res2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn.norm."),
    (r"\.mid_block\.attentions\.0\.(query|to_q)\.", ".mid.attn.attn.to_q."),
    (r"\.mid_block\.attentions\.0\.(key|to_k)\.", ".mid.attn.attn.to_k."),
    (r"\.mid_block\.attentions\.0\.(value|to_v)\.", ".mid.attn.attn.to_v."),
    (r"\.mid_block\.attentions\.0\.(proj_attn|to_out\.0)\.", ".mid.attn.attn.to_out."),
    (r"\.conv_norm_out\.", ".norm_out."),
]
