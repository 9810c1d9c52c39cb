"""Noise schedules, the parameterization boundary, the training loss and k-diffusion-style samplers."""

from .samplers import (
    SAMPLERS,
    Denoiser,
    batched_cfg,
    batched_dual_cfg,
    cfg,
    clamped,
    default_sampling,
    get_sampler,
    initial_noise_scale,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler_ancestral,
)
from .schedule import (
    NoiseSchedule,
    ScheduleConfig,
    diffusion_loss,
    min_snr_weight,
    prediction_target,
    prediction_to_x0,
)

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "NoiseSchedule",
    "ScheduleConfig",
    "batched_cfg",
    "batched_dual_cfg",
    "cfg",
    "clamped",
    "default_sampling",
    "diffusion_loss",
    "get_sampler",
    "initial_noise_scale",
    "min_snr_weight",
    "prediction_target",
    "prediction_to_x0",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler_ancestral",
]
