"""Shared fixtures: a tiny random pipeline (all components) built once per test session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread is faster than two, and much faster on a loaded 2-core machine.
torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port free on this machine now, for a test's process group (fixed ports collide across sessions)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

CAPTIONS = [
    f"a {size}{color} {shape} {where}"
    for size in ("", "small ", "large ")
    for color in ("red", "blue", "green", "yellow")
    for shape in ("circle", "square", "star")
    for where in ("on the left", "in the center", "above a black cross")
]


def build_tiny_pipeline(folder, with_prior: bool = True, with_image_encoder: bool = True):
    """A random pipeline of tiny components: 16×16 images, 8×8×4 latents, 32-wide CLIP."""
    from dataclasses import replace

    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from latent_diffusion.models import (
        AUTOENCODER_PRESETS,
        PRIOR_PRESETS,
        UNET_PRESETS,
        AutoencoderKL,
        DiffusionPrior,
        UNet,
    )
    from latent_diffusion.models.clip import clip_text_config, clip_vision_config, train_clip_tokenizer
    from latent_diffusion.pipeline import PipelineConfig, TextToImagePipeline

    torch.manual_seed(0)
    tokenizer = train_clip_tokenizer(CAPTIONS, folder / "_tokenizer", vocab_size=600, model_max_length=16)
    text_encoder = CLIPTextModelWithProjection(clip_text_config("tiny", tokenizer, max_position_embeddings=16))
    image_encoder = CLIPVisionModelWithProjection(clip_vision_config("tiny")) if with_image_encoder else None
    prior = None
    if with_prior:
        prior = DiffusionPrior(replace(PRIOR_PRESETS["tiny"], max_text_tokens=16))
        prior.set_embedding_stats(torch.randn(32) * 0.1, torch.rand(32) + 0.5)
    unet_config = UNET_PRESETS["tiny-unclip"] if with_prior or with_image_encoder else UNET_PRESETS["tiny"]
    decoder = UNet(unet_config)
    vae = AutoencoderKL(replace(AUTOENCODER_PRESETS["tiny"], scaling_factor=0.7))
    for module in (decoder, vae, prior):
        if module is not None:  # make zero-initialised layers non-trivial
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
    return TextToImagePipeline(tokenizer, text_encoder, decoder, vae, prior, image_encoder,
                               PipelineConfig(sample_size=16))


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    build_tiny_pipeline(folder).save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture()
def tiny_pipeline(tiny_pipeline_dir):
    from latent_diffusion.pipeline import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
