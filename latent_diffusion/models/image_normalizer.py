"""Noise augmentation of CLIP image embeddings, the way Stable unCLIP (Stability AI's unCLIP fine-tune of
Stable Diffusion 2.1) conditions its decoder — the conditioning augmentation of cascaded diffusion (Ho et al.
2022, §4.1) applied to the embedding:

    e (B, D) → normalise with per-dimension mean/std → q(e_t | e) at t = noise_level (a VP schedule)
             → un-normalise → concatenate the sinusoidal embedding of noise_level (D wide, cosines first)
             → (B, 2D), the decoder's `image_embeds`.

`ImageNormalizer` holds the mean/std (the statistics of the CLIP embeddings the decoder was trained on) and is
saved as a component of the pipeline; the schedule and the noise level are pipeline settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latent_diffusion.diffusion import NoiseSchedule
from latent_diffusion.io import (
    DIFFUSERS_WEIGHTS,
    build_with_weights,
    find_weights,
    load_model,
    load_safetensors,
    read_json,
    save_model,
)
from latent_diffusion.layers import timestep_embedding


@dataclass(frozen=True)
class ImageNormalizerConfig:
    """Width of the CLIP image embeddings an `ImageNormalizer` normalises."""

    embed_dim: int = 768


class ImageNormalizer(nn.Module):
    """Per-dimension statistics `mean`, `std` (D,) of CLIP image embeddings; `normalize` / `denormalize` (B, D)."""

    config_class = ImageNormalizerConfig

    def __init__(self, config: ImageNormalizerConfig):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.embed_dim))
        self.register_buffer("std", torch.ones(config.embed_dim))

    def normalize(self, embeds: torch.Tensor) -> torch.Tensor:
        return (embeds - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        save_model(self, folder, dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> ImageNormalizer:
        return load_model(cls, folder, device, dtype)

    @classmethod
    def from_diffusers(cls, folder: str | Path) -> ImageNormalizer:
        """Load a diffusers `StableUnCLIPImageNormalizer` folder (`mean`, `std` stored as (1, D))."""
        folder = Path(folder)
        raw = read_json(folder / "config.json")
        if raw.get("_class_name", "StableUnCLIPImageNormalizer") != "StableUnCLIPImageNormalizer":
            raise ValueError(f"{folder} holds a {raw['_class_name']}, not a StableUnCLIPImageNormalizer")
        state = load_safetensors(find_weights(folder, DIFFUSERS_WEIGHTS))
        return build_with_weights(cls, ImageNormalizerConfig(embed_dim=raw.get("embedding_dim", 768)),
                                  {k: v.reshape(-1) for k, v in state.items()}, source=str(folder))


def noise_augment(embeds: torch.Tensor, noise: torch.Tensor, noise_level: int, schedule: NoiseSchedule,
                  normalizer: ImageNormalizer | None = None) -> torch.Tensor:
    """Noise-augmented decoder conditioning: embeds (B, D), noise (B, D) ~ N(0, I) → (B, 2D).

    [denormalize(sqrt(ᾱ_l) normalize(e) + sqrt(1 - ᾱ_l) noise), sinusoidal(l)] with l = `noise_level` an
    integer timestep of `schedule`; without a normaliser the embeddings are noised as they are. Noise is
    applied even at level 0 (ᾱ_0 < 1), as diffusers' Stable unCLIP does.
    """
    T = schedule.num_train_timesteps
    if not 0 <= noise_level < T:
        raise ValueError(f"noise_level must be in [0, {T - 1}], got {noise_level}")
    B = embeds.shape[0]
    level = torch.full((B,), noise_level, dtype=torch.long, device=embeds.device)
    x = embeds if normalizer is None else normalizer.normalize(embeds)
    x = schedule.add_noise(x, noise.to(x), level)
    x = x if normalizer is None else normalizer.denormalize(x)
    level_embed = timestep_embedding(level, embeds.shape[-1], cos_first=True).to(x.dtype)  # (B, D)
    return torch.cat([x, level_embed], dim=-1)  # (B, 2D)
