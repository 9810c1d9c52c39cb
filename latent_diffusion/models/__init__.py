"""The trainable models: the KL autoencoder, the decoder UNet and the diffusion prior (and the PatchGAN
discriminator the autoencoder can train against).

CLIP (tokenizer, text and vision towers) is used through `transformers`; see `latent_diffusion.models.clip`.
"""

from latent_diffusion.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL, AutoencoderKLConfig
from latent_diffusion.models.discriminator import (
    DISCRIMINATOR_PRESETS,
    PatchDiscriminator,
    PatchDiscriminatorConfig,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from latent_diffusion.models.image_normalizer import ImageNormalizer, ImageNormalizerConfig, noise_augment
from latent_diffusion.models.prior import PRIOR_PRESETS, DiffusionPrior, DiffusionPriorConfig
from latent_diffusion.models.unet import UNET_PRESETS, UNet, UNetConfig

__all__ = [
    "AUTOENCODER_PRESETS", "AutoencoderKL", "AutoencoderKLConfig",
    "DISCRIMINATOR_PRESETS", "PatchDiscriminator", "PatchDiscriminatorConfig", "hinge_discriminator_loss",
    "hinge_generator_loss",
    "ImageNormalizer", "ImageNormalizerConfig", "noise_augment",
    "PRIOR_PRESETS", "DiffusionPrior", "DiffusionPriorConfig",
    "UNET_PRESETS", "UNet", "UNetConfig",
]
