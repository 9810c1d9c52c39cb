"""Stage 1: a CLIP-format tokenizer trained on the captions, then CLIP (text and vision towers) trained
contrastively from scratch (Radford et al. 2021, Fig. 3) — or a pretrained CLIP folder copied in.

    accelerate launch -m training.train_clip --config configs/shapes/tiny.yaml --output-dir runs/tiny

Writes `tokenizer/`, `text_encoder/` (CLIPTextModelWithProjection) and `image_encoder/`
(CLIPVisionModelWithProjection) into the output folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from latent_diffusion.data.shapes import EDIT_KINDS, SceneSpec, caption, edit_spec
from latent_diffusion.evaluate import clip_binding
from latent_diffusion.models.clip import (
    clip_config,
    clip_image_preprocess,
    split_clip_model,
    train_clip_tokenizer,
)
from training.common import build_dataset, dataset_captions, excluded_pairs
from training.config import run_from_command_line, stage_parser
from training.loop import fit
from training.stage import setup_stage


class _GatherRows(torch.autograd.Function):
    """(B, ...) on each of W processes → (W·B, ...) on every one. Backward: each process's loss reaches this
    process's rows through its own copy, so their gradient is the sum over processes (an all-reduce), sliced."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        # all_gather_single where torch has it (all_gather_into_tensor, its older name, warns there)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, x.contiguous())
        ctx.rows = x.shape[0]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()  # autograd may hand the same tensor to several nodes: reduce a copy
        torch.distributed.all_reduce(grad)
        start = torch.distributed.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather rows (B, ...) from every process into (W·B, ...), keeping the autograd path to the local rows."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return x
    return _GatherRows.apply(x)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor,
                     negatives: torch.Tensor | None = None, has_negative: torch.Tensor | None = None,
                     pair_weight: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (Radford et al. 2021, Fig. 3). text, image: (B, P), normalised.

    `negatives` (B, P): for each image, the embedding of a caption that is wrong in one attribute (NegCLIP,
    Yuksekgonul et al. 2023, §4); it joins that image's image→text softmax as one more candidate (rows where
    `has_negative` (B,) is False have none). In-batch negatives rarely differ from the positive in one word only,
    so without these a CLIP can ignore position and shape and still match random batches by colour.
    `pair_weight` adds that weight times a 2-way cross-entropy between each image's caption and its negative alone
    (mean over the images that have one): in the (B + 1)-way softmax the one-word difference is a small share of
    the loss early on, while the 2-way term is log 2 until the towers tell the captions apart."""
    scale = logit_scale.exp().clamp(max=100)
    logits = scale * text @ image.t()  # (B texts, B images)
    labels = torch.arange(len(text), device=text.device)
    per_image = logits.t()  # (B images, B texts)
    if negatives is not None:
        own = (scale * (image * negatives).sum(-1)).masked_fill(~has_negative, float("-inf"))  # (B,)
        per_image = torch.cat([per_image, own[:, None]], dim=1)  # (B, B + 1)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(per_image, labels))
    if negatives is not None and pair_weight:
        # (B, 2): own caption, its negative; a row without one has -inf there, so its term is exactly 0. A masked
        # mean rather than indexing keeps the step free of device syncs.
        pairs = torch.stack([logits.diagonal(), own], dim=1)
        per_pair = torch.logsumexp(pairs, dim=1) - pairs[:, 0]
        loss = loss + pair_weight * per_pair.sum() / has_negative.sum().clamp(min=1)
    return loss


def hard_negative(spec: SceneSpec, rng: np.random.Generator, kinds: Sequence[str] = EDIT_KINDS,
                  exclude: Iterable[tuple[str, str]] | None = None) -> str | None:
    """The caption of `spec` after one edit of a stated attribute (by default colour, shape, size, position,
    relation or count; `kinds` tried in random order), or None when no such edit exists. No edit shows a
    held-out (colour, shape) pair of `exclude`."""
    for kind in rng.permutation(list(kinds)):
        edited = edit_spec(spec, str(kind), rng, exclude)
        if edited is not None:
            return caption(edited)
    return None


def main(argv: list[str] | None = None) -> None:
    args, overrides = stage_parser(__doc__, "training.train_clip", shardable=False).parse_known_args(argv)
    stage = setup_stage("clip", args, overrides, lambda c: c.clip.optim, shardable=False)
    cfg, acc = stage.config, stage.accelerator
    if stage.skip_if_done("image_encoder"):
        return
    sc = cfg.clip
    out = stage.output_dir
    if sc.optim.compile:
        raise ValueError("clip.optim.compile: regional compilation covers this library's blocks; the CLIP towers are "
                         "transformers' CLIPModel, so nothing would be compiled: set it false")
    kinds = tuple(sc.hard_negative_kinds) or EDIT_KINDS
    bad = [k for k in kinds if k not in EDIT_KINDS]
    if bad or len(set(kinds)) != len(kinds):
        raise ValueError(f"clip.hard_negative_kinds {list(sc.hard_negative_kinds)}: give distinct names from "
                         f"{list(EDIT_KINDS)}")
    if sc.hard_negative_weight < 0 or (sc.hard_negative_weight and not sc.hard_negatives):
        raise ValueError(f"clip.hard_negative_weight={sc.hard_negative_weight}: expected >= 0, and > 0 only with "
                         "clip.hard_negatives true")
    if sc.hard_negatives and (sc.pretrained or cfg.data.source != "shapes"):
        raise ValueError(f"clip.hard_negatives needs scene specs to edit (data.source shapes, no clip.pretrained), "
                         f"not data.source {cfg.data.source!r}, clip.pretrained {sc.pretrained!r}")

    if sc.pretrained:  # Use a trained CLIP as is.
        from transformers import CLIPModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(sc.pretrained)
        clip = CLIPModel.from_pretrained(sc.pretrained, use_safetensors=True)
        stage.record_config()
    else:
        dataset = build_dataset(cfg.data, cfg.seed)
        if acc.is_main_process:
            train_clip_tokenizer(dataset_captions(dataset), out / "tokenizer", vocab_size=sc.vocab_size,
                                 model_max_length=sc.max_length)
        acc.wait_for_everyone()
        from transformers import CLIPModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
        torch.manual_seed(cfg.seed)
        config = clip_config(sc.preset, tokenizer, max_position_embeddings=sc.max_length,
                             image_size=cfg.data.image_size)
        config.logit_scale_init_value = float(torch.tensor(1 / sc.temperature_init).log())
        clip = CLIPModel(config)
        image_size = config.vision_config.image_size
        heldout = build_dataset(cfg.data, cfg.seed, heldout=True)
        heldout_pairs = excluded_pairs(cfg.data)  # hard negatives must not show them either

        def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
            return tokenizer(captions, padding="max_length", truncation=True, max_length=sc.max_length,
                             return_tensors="pt").to(acc.device)

        def loss_fn(model, batch, rnd, step):
            captions = list(batch["caption"])
            negatives = has_negative = None
            if sc.hard_negatives:  # one edited caption per image, drawn per global sample index
                seeds = rnd.randint(2**31).tolist()
                edited = [hard_negative(SceneSpec.from_dict(spec), np.random.default_rng(seed), kinds, heldout_pairs)
                          for spec, seed in zip(batch["spec"], seeds)]
                has_negative = torch.tensor([float(e is not None) for e in edited], device=acc.device)
                captions += [e or "" for e in edited]
            tokens = tokenize(captions)
            pixels = clip_image_preprocess((batch["pixel_values"].to(acc.device) + 1) / 2, image_size)
            output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
            text_embeds, n = output.text_embeds, len(batch["caption"])
            text, image = gather_with_grad(text_embeds[:n]), gather_with_grad(output.image_embeds)
            if sc.hard_negatives:
                negatives, has_negative = gather_with_grad(text_embeds[n:]), gather_with_grad(has_negative) > 0
            scale = acc.unwrap_model(model).logit_scale
            loss = contrastive_loss(text, image, scale, negatives, has_negative, sc.hard_negative_weight)
            return loss, {"temperature": 1 / scale.detach().exp()}

        def validate(model, step):
            """Top-1 image→caption retrieval among 256 held-out pairs (chance: 1/256); for shapes data also the
            binding accuracy per edit kind: how often an image is closer to its caption than to the caption
            with one stated attribute changed (chance: 0.5)."""
            n = min(256, len(heldout))
            items = [heldout[i] for i in range(n)]
            pixels = torch.stack([it["pixel_values"] for it in items]).to(acc.device)
            unwrapped = acc.unwrap_model(model)

            def embed(captions: list[str]) -> torch.Tensor:
                tokens = tokenize(captions)
                pooled = unwrapped.text_model(**tokens).pooler_output
                return F.normalize(unwrapped.text_projection(pooled), dim=-1)

            pooled = unwrapped.vision_model(pixel_values=clip_image_preprocess((pixels + 1) / 2, image_size))
            image = F.normalize(unwrapped.visual_projection(pooled.pooler_output), dim=-1)
            captions = [it["caption"] for it in items]
            text = embed(captions)
            hits = [captions[j] == captions[i] for i, j in enumerate((image @ text.t()).argmax(dim=1).tolist())]
            metrics = {"retrieval_top1": sum(hits) / n}
            if cfg.data.source == "shapes":
                specs = [SceneSpec.from_dict(it["spec"]) for it in items]
                metrics |= {f"binding_{k}": v for k, v in clip_binding(embed, image, specs, cfg.seed).items()}
            return metrics

        if sc.optim.gradient_checkpointing:  # transformers' own, in both towers
            clip.gradient_checkpointing_enable()
        clip = fit(stage, clip, dataset, loss_fn, sc.optim, validate=validate)

    if acc.is_main_process:
        text_encoder, image_encoder = split_clip_model(clip)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' per-file "Writing model shards" bars
        tokenizer.save_pretrained(out / "tokenizer")
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        image_encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    stage.mark_done()
    acc.wait_for_everyone()
    stage.print(f"clip: wrote tokenizer/, text_encoder/, image_encoder/ to {out}")


if __name__ == "__main__":
    run_from_command_line(main)
