"""The settings a trained pipeline carries (`PipelineConfig`, saved in `model_index.json`, with a `SamplingConfig`
per model) and what a call returns (`PipelineOutput`): the types `latent_diffusion.pipeline`, its image tasks and
its folder reader share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from latent_diffusion.diffusion import SAMPLERS, ScheduleConfig
from latent_diffusion.diffusion.schedule import FINAL_SIGMAS, SPACINGS, Spacing
from latent_diffusion.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

OutputType = Literal["pil", "np", "pt", "latent"]
OUTPUT_TYPES = get_args(OutputType)
Generators = torch.Generator | list[torch.Generator] | None


@dataclass(frozen=True)
class SamplingConfig:
    """A model's default sampler and the timesteps it walks — what a diffusers scheduler config fixes.

    Applies when a call uses `sampler` (the default when the call names none); a call that picks another sampler
    walks `PipelineConfig.timestep_spacing` instead. `final_sigma="min"` ends at sigma(t=0) rather than 0
    (diffusers' DDIM with `set_alpha_to_one=False`). `karras` walks Karras et al.'s (2022, Eq. 5) sigmas over the
    schedule's range instead of the spacing's timesteps, and `round_timesteps` conditions the network on round(t)
    (diffusers' DPM-Solver with `use_karras_sigmas`). `init_noise` is the start noise's std: "vp" sqrt(1 + σ_max²),
    the VP prior's, or "sigma_max" (diffusers' Euler schedulers with linspace or trailing spacing)."""

    sampler: str = "dpmpp_2m"
    timestep_spacing: Spacing = "leading"
    steps_offset: int = 0
    final_sigma: Literal["zero", "min"] = "zero"
    karras: bool = False
    round_timesteps: bool = False
    init_noise: Literal["vp", "sigma_max"] = "vp"

    def __post_init__(self) -> None:
        for name, value, valid in (("sampler", self.sampler, sorted(SAMPLERS)),
                                   ("timestep_spacing", self.timestep_spacing, list(SPACINGS)),
                                   ("final_sigma", self.final_sigma, list(FINAL_SIGMAS)),
                                   ("init_noise", self.init_noise, ["vp", "sigma_max"])):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; choose one of {valid}")


@dataclass(frozen=True)
class PipelineConfig:
    """Settings that belong to a trained pipeline, saved in `model_index.json`."""

    decoder_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prior_schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        beta_schedule="squaredcos_cap_v2", prediction_type="sample"))
    prior_clip_denoised: float | None = 5.0  # clamp of the prior's x0 in normalised space (Karlo uses ±5)
    sample_size: int = 64  # default image height and width in pixels
    # Timestep spacing for every sampler; "trailing" starts at the last training timestep (Lin et al. 2024,
    # §3.3). None: each sampler's diffusers-default spacing (`default_sampling`).
    timestep_spacing: str | None = "trailing"
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    # Default sampler + timesteps per model (converted diffusers schedulers); None: "dpmpp_2m" (the prior: the
    # decoder's sampler) on `timestep_spacing`.
    decoder_sampling: SamplingConfig | None = None
    prior_sampling: SamplingConfig | None = None
    decoder_clip_denoised: float | None = None  # clamp of the decoder's (guided) x0 prediction; None: off
    # Whether the text encoders see the padding mask. Stable Diffusion's UNet was trained on CLIP states computed
    # without it (the padding tokens' states differ), so converted pipelines turn these off.
    text_attention_mask: bool = True
    prior_text_attention_mask: bool = True
    # The decoder also attends to the text encoder's input token embeddings (`encode_text(token_embeddings=)`).
    decoder_token_embeddings: bool = False
    # Stable unCLIP noise augmentation of the decoder's image embeddings (`models.image_normalizer`): None: off;
    # else the VP schedule that noises them, at `noise_level` unless a call names another level.
    image_noising_schedule: ScheduleConfig | None = None
    noise_level: int = 0
    # Text-to-image calls guide the decoder towards the prior's image embedding with this scale, separately from
    # the text's (`batched_dual_cfg`); None: the text's scale (plain guidance on text and image together).
    image_guidance_scale: float | None = None


@dataclass
class PipelineOutput:
    """`images`: list of PIL images, an array (B, H, W, 3) in [0, 1], a tensor (B, 3, H, W) in [0, 1], or with
    output_type "latent" the decoder's latents (B, C, H/f, W/f), float32 on the pipeline's device, not decoded
    (`decode_latents` decodes them).
    `image_embeds`: the CLIP image embeddings (B, D) that conditioned the decoder (None without a prior)."""

    images: Any
    image_embeds: torch.Tensor | None = None


Encoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # token states (B, L, D), pooled (B, P), mask (B, L)
