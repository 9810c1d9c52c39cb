"""Pieces the stages share: building the training set from the config and loading finished components."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from latent_diffusion import speed
from latent_diffusion.diffusion import NoiseSchedule, diffusion_loss
from training.config import DataConfig


def excluded_pairs(cfg: DataConfig) -> set[tuple[str, str]] | None:
    """The (colour, shape) pairs `data.exclude_pairs` holds out of training, or None."""
    from latent_diffusion.data.shapes import parse_pairs

    return parse_pairs(", ".join(cfg.exclude_pairs)) if cfg.exclude_pairs else None


# Written by the prior stage beside the prior's weights: the noise schedule it was trained with.
SCHEDULE_FILE = "schedule.json"


def build_dataset(cfg: DataConfig, seed: int, heldout: bool = False) -> Dataset:
    """The training set described by `cfg`. `heldout` gives a disjoint evaluation set for shapes (scenes from
    another seed) and the same set for emoji and user data, whose held-out metrics are therefore training-set
    figures."""
    if cfg.source == "shapes":
        from latent_diffusion.data.shapes import ShapesDataset

        exclude = excluded_pairs(cfg)
        n = min(cfg.num_samples, 2048) if heldout else cfg.num_samples
        return ShapesDataset(n, seed=seed + (1_000_003 if heldout else 0), image_size=cfg.image_size, exclude=exclude)
    if cfg.exclude_pairs:  # a recipe's held-out pairs, kept while training on other data
        warnings.warn(f"data.exclude_pairs {list(cfg.exclude_pairs)} applies to shapes data only; source "
                      f"{cfg.source!r} is used whole", stacklevel=2)
    if cfg.source == "emoji":
        from latent_diffusion.data.emoji import EmojiDataset

        return EmojiDataset(image_size=cfg.image_size)
    if cfg.source == "image_text":
        from latent_diffusion.data.image_text import ImageTextDataset

        return ImageTextDataset(dataset_name=cfg.dataset_name, train_data_dir=cfg.train_data_dir,
                                image_column=cfg.image_column, caption_column=cfg.caption_column,
                                image_size=cfg.image_size, random_crop=cfg.random_crop and not heldout,
                                random_flip=cfg.random_flip and not heldout, seed=seed)
    raise ValueError(f"unknown data source {cfg.source!r}; choose one of ['shapes', 'emoji', 'image_text']")


def dataset_captions(dataset: Dataset, limit: int | None = None) -> list[str]:
    """All captions of a dataset (for tokenizer training), without decoding images where the dataset can."""
    if hasattr(dataset, "captions"):
        caps = list(dataset.captions())
        return caps[:limit] if limit else caps
    n = len(dataset) if limit is None else min(limit, len(dataset))
    return [dataset[i]["caption"] for i in range(n)]


def load_clip(output_dir: Path, device: torch.device, onednn: bool = False) -> tuple[Any, Any, Any]:
    """The frozen tokenizer, text encoder and image encoder written by `train_clip`; `onednn` runs the two
    towers' Linear layers through oneDNN (`speed.onednn_linear`, the stage's `optim.onednn_linear`)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    from latent_diffusion.io import find_weights

    hf_logging.disable_progress_bar()

    for name in ("text_encoder", "image_encoder"):
        if not (output_dir / name).is_dir():
            raise FileNotFoundError(f"{output_dir / name} not found: run training.train_clip first")
        find_weights(output_dir / name)
    tokenizer = CLIPTokenizer.from_pretrained(output_dir / "tokenizer")
    text = CLIPTextModelWithProjection.from_pretrained(output_dir / "text_encoder", use_safetensors=True)
    image = CLIPVisionModelWithProjection.from_pretrained(output_dir / "image_encoder", use_safetensors=True)
    for m in (text, image):
        m.to(device).eval().requires_grad_(False)
        if onednn:
            speed.onednn_linear(m)
    return tokenizer, text, image


_TRUNCATION_REPORTED: list[bool] = []


def tokenize_once(tokenizer: Any, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`latent_diffusion.models.clip.tokenize`, reporting a truncated caption once per process (not once per
    caption: a training set may hold thousands)."""
    from latent_diffusion.models.clip import tokenize

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = tokenize(tokenizer, list(captions))
    if caught and not _TRUNCATION_REPORTED:
        _TRUNCATION_REPORTED.append(True)
        warnings.warn(f"{caught[0].message} (reported once; raise clip.max_length to keep whole captions)",
                      stacklevel=3)
    return tokens


class TokenizingCollate:
    """A DataLoader collate that also tokenizes the batch's captions ("input_ids", "attention_mask": (B, L)),
    so the tokenizer runs in the worker processes, off the training step's path (on a GPU the step of a small
    decoder otherwise waits for it: `bench/decoder_step.py`)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        batch["input_ids"], batch["attention_mask"] = tokenize_once(self.tokenizer, batch["caption"])
        return batch


@torch.no_grad()
def encode_batch(tokenizer: Any, text_encoder: Any, image_encoder: Any | None, captions: list[str],
                 pixel_values: torch.Tensor | None, image_mean: tuple[float, ...],
                 image_std: tuple[float, ...], token_embeddings: bool = False,
                 layer: int | None = None, tokens: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Frozen CLIP features of a batch: token states (B, L, D), pooled (B, P), mask (B, L), image embeds (B, P).
    `token_embeddings`: the decoder's states with the input embeddings appended, (B, 2L, D); `layer`: the states
    after that encoder layer instead of the last (`encode_text`); `tokens`: the captions' (ids, mask), when
    tokenized already (`TokenizingCollate`)."""
    from latent_diffusion.models.clip import clip_image_preprocess, encode_text

    device = next(text_encoder.parameters()).device
    tokens = tokens if tokens is not None else tokenize_once(tokenizer, captions)
    states, pooled, mask = encode_text(tokenizer, text_encoder, list(captions), device=device,
                                       token_embeddings=token_embeddings, layer=layer, tokens=tokens)
    out = {"text_states": states, "text_embeds": pooled, "text_mask": mask}
    if image_encoder is not None and pixel_values is not None:
        pixels = ((pixel_values.to(device) + 1) / 2).clamp(0, 1)
        pixels = clip_image_preprocess(pixels, image_encoder.config.image_size, image_mean, image_std,
                                       check_range=False)
        out["image_embeds"] = image_encoder(pixel_values=pixels).image_embeds
    return out


def decoder_loss(decoder: Callable[..., torch.Tensor], latents: torch.Tensor,
                 text: tuple[torch.Tensor, torch.Tensor], empty: tuple[torch.Tensor, torch.Tensor],
                 image: torch.Tensor | None, rnd: Any, schedule: NoiseSchedule, text_dropout: float,
                 image_dropout: float, noise_offset: float = 0.0, min_snr_gamma: float | None = None,
                 timestep_logit_normal: tuple[float, float] | None = None) -> torch.Tensor:
    """The decoder's denoising loss on one micro-batch (Rombach et al. 2022, Eq. 2), shared by train_decoder and
    finetune. latents (B, C, h, w); text = (token states (B, T, D), pooled (B, D)) and `empty` the same for "" (1, ...);
    image: CLIP image embeddings (B, E) or None. Text and image conditioning are dropped independently (empty
    caption / zero embedding) so both can be guided; the noise may get a per-channel offset (Guttenberg 2023).
    Timesteps are uniform, or with `timestep_logit_normal` = (m, s) drawn as t/T = sigmoid(N(m, s)) (the
    logit-normal sampling of Esser et al. 2024, §3.1; m > 0 favours high noise, where the layout is decided).
    Every draw comes from `rnd` (a StepRandom), in a fixed order."""
    B = latents.shape[0]
    drop_text, drop_image = rnd.rand() < text_dropout, rnd.rand() < image_dropout
    states = torch.where(drop_text[:, None, None], empty[0].expand(B, -1, -1), text[0])
    pooled = torch.where(drop_text[:, None], empty[1].expand(B, -1), text[1])
    if image is not None:
        image = torch.where(drop_image[:, None], torch.zeros_like(image), image)
    T = schedule.num_train_timesteps
    if timestep_logit_normal is None:
        t = rnd.randint(T)
    else:
        m, s = timestep_logit_normal
        t = (torch.sigmoid(m + s * rnd.randn()) * T).long().clamp(max=T - 1)
    noise = rnd.randn(*latents.shape[1:])
    if noise_offset:
        noise = noise + noise_offset * rnd.randn(latents.shape[1], 1, 1)
    return diffusion_loss(lambda x, tt: decoder(x, tt, states, image, pooled), latents, schedule, timesteps=t,
                          noise=noise, min_snr_gamma=min_snr_gamma)
