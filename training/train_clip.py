"""Stage 1: a CLIP-format tokenizer trained on the captions, then CLIP (text and vision towers) trained
contrastively from scratch (Radford et al. 2021, Fig. 3) — or a pretrained CLIP folder copied in.

    accelerate launch -m training.train_clip --config configs/shapes/tiny.yaml --output-dir runs/tiny

Writes `tokenizer/`, `text_encoder/` (CLIPTextModelWithProjection) and `image_encoder/`
(CLIPVisionModelWithProjection) into the output folder.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from latent_diffusion.models.clip import (
    clip_config,
    clip_image_preprocess,
    split_clip_model,
    train_clip_tokenizer,
)
from training.common import build_dataset, dataset_captions
from training.config import stage_parser
from training.loop import fit, setup_stage


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather rows from every process, keeping the autograd path to the local rows."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def contrastive_loss(text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (Radford et al. 2021, Fig. 3). text, image: (B, P), normalised."""
    logits = logit_scale.exp().clamp(max=100) * text @ image.t()  # (B, B)
    labels = torch.arange(len(text), device=text.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def main(argv: list[str] | None = None) -> None:
    args, overrides = stage_parser(__doc__.split("\n")[0]).parse_known_args(argv)
    stage = setup_stage("clip", args, overrides, lambda c: c.clip.optim, shardable=False)
    cfg, acc = stage.config, stage.accelerator
    if stage.done("image_encoder"):
        stage.print(f"clip: finished output exists in {stage.output_dir}; skipping")
        return
    sc = cfg.clip
    out = stage.output_dir

    if sc.pretrained:  # Use a trained CLIP as is.
        from transformers import CLIPModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(sc.pretrained)
        clip = CLIPModel.from_pretrained(sc.pretrained, use_safetensors=True)
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

        def loss_fn(model, batch, rnd, step):
            tokens = tokenizer(batch["caption"], padding="max_length", truncation=True, max_length=sc.max_length,
                               return_tensors="pt").to(acc.device)
            pixels = clip_image_preprocess((batch["pixel_values"].to(acc.device) + 1) / 2, image_size)
            output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
            text, image = gather_with_grad(output.text_embeds), gather_with_grad(output.image_embeds)
            loss = contrastive_loss(text, image, acc.unwrap_model(model).logit_scale)
            return loss, {"temperature": 1 / acc.unwrap_model(model).logit_scale.exp().item()}

        def validate(model, step):
            """Top-1 image→caption retrieval among 256 held-out pairs (chance: 1/256)."""
            n = min(256, len(heldout))
            items = [heldout[i] for i in range(n)]
            tokens = tokenizer([it["caption"] for it in items], padding="max_length", truncation=True,
                               max_length=sc.max_length, return_tensors="pt").to(acc.device)
            pixels = torch.stack([it["pixel_values"] for it in items]).to(acc.device)
            output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                           pixel_values=clip_image_preprocess((pixels + 1) / 2, image_size))
            sims = output.image_embeds @ output.text_embeds.t()
            captions = [it["caption"] for it in items]
            hits = [captions[j] == captions[i] for i, j in enumerate(sims.argmax(dim=1).tolist())]
            return {"retrieval_top1": sum(hits) / n}

        clip = fit(stage, clip, dataset, loss_fn, sc.optim, validate=validate)

    if acc.is_main_process:
        text_encoder, image_encoder = split_clip_model(clip)
        tokenizer.save_pretrained(out / "tokenizer")
        text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
        image_encoder.save_pretrained(out / "image_encoder", safe_serialization=True)
    stage.mark_done()
    acc.wait_for_everyone()
    stage.print(f"clip: wrote tokenizer/, text_encoder/, image_encoder/ to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
