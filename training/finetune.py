"""Fine-tune a trained pipeline on your own captioned images: LoRA adapters (Hu et al. 2022) on the attention
projections, or the full weights (with EMA), of the decoder and/or the prior — and of the CLIP text encoder only
when it is listed in `--components` (otherwise it stays frozen). `--method full` can also train the VAE decoder
(`vae_decoder`, reconstruction L1 from the frozen encoder's latents), for images whose colours or textures the
VAE cannot yet draw.

    accelerate launch -m training.finetune --pipeline assets/shapes-64 --train-data-dir my-images \\
        --method lora --components decoder,prior --rank 8 --max-steps 1000 --output-dir runs/my-lora

Data: an imagefolder with `metadata.jsonl` / `metadata.csv` (a `file_name` column and a caption column), or
`--dataset-name` (a local parquet / csv / json file or folder, a `save_to_disk` folder, or a Hub name when online).
Images of any size and mode become RGB, resized and centre-cropped to the pipeline's sample size; unreadable files
are skipped and counted. The losses are the training stages' own (decoder: text/image dropout, min-SNR-γ; prior:
x0 on normalised CLIP image embeddings), run through the shared loop (`training.loop.fit`): mixed precision,
accumulation, atomic checkpoints with exact resume, multi-GPU.

Under fp16/bf16 mixed precision a LoRA run stores the frozen weights in that dtype and keeps the adapter weights
(the only trained ones) in fp32, so gradient unscaling works and the adapters keep full precision.

Writes into `--output-dir`: with `--method lora`, a LoRA folder (`lora_index.json` and, per component,
`adapter_model.safetensors` + `adapter_config.json`; see `latent_diffusion.lora`); with `--method full`, a complete
pipeline folder (EMA weights). Both keep `config.yaml` and `_work/finetune/`: checkpoints (`--resume latest`),
`metrics.jsonl` and validation grids, `validation-0000000.png` being the base model.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from latent_diffusion.diffusion import NoiseSchedule, diffusion_loss
from latent_diffusion.io import config_from_dict, read_json
from latent_diffusion.lora import LORA_COMPONENTS, LORA_INDEX, add_lora, save_lora
from latent_diffusion.models import AutoencoderKLConfig
from latent_diffusion.models.clip import clip_image_preprocess, encode_text
from latent_diffusion.models.image_normalizer import noise_augment
from latent_diffusion.pipeline import TextToImagePipeline
from training.checkpoint import pipeline_fingerprint
from training.common import build_dataset, dataset_captions, decoder_loss
from training.config import (
    FinetuneConfig,
    LoraSettings,
    add_collective_timeout,
    apply_overrides,
    config_to_yaml,
    positive_int,
    run_from_command_line,
)
from training.loop import StepRandom, fit
from training.stage import changes_note, setup_stage

# Defaults that depend on the method, applied under the config file, flags and overrides.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {},
    "full": {"optim": {"lr": 5e-5, "ema_decay": 0.999}},
}
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The VAE decoder has no attention projections for LoRA: full fine-tuning only. Its encoder always stays frozen,
# so the latents the diffusion decoder learns from do not move.
COMPONENTS: tuple[str, ...] = (*LORA_COMPONENTS, "vae_decoder")


class FinetuneModules(nn.Module):
    """The components being trained as one module, so Accelerate prepares, DDP-wraps and checkpoints them together.

    forward(fn, *args) returns fn(self, *args): the whole loss (every component's) runs inside one forward of the
    (DDP-wrapped) module, which is what DDP needs to synchronise the gradients of one backward."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self, *args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="accelerate launch -m training.finetune", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other FinetuneConfig key can be set as '--section.key value', e.g. '--optim.grad_accum 4', "
               "'--lora.feed_forward true', '--data.random_flip true', '--optim.checkpoint_every 100'.")
    parser.add_argument("--config", default=None, help="YAML FinetuneConfig; the flags below override it")
    parser.add_argument("--pipeline", default=None, help="the trained pipeline folder to fine-tune")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--train-data-dir", default=None,
                      help="an imagefolder: images plus metadata.jsonl / metadata.csv with 'file_name' and captions")
    data.add_argument("--dataset-name", default=None,
                      help="a local parquet/csv/json file or folder, a save_to_disk folder, or a Hub dataset name")
    parser.add_argument("--image-column", default=None, help="image column (default: image)")
    parser.add_argument("--caption-column", default=None, help="caption column (default: text)")
    parser.add_argument("--method", choices=sorted(METHOD_DEFAULTS), default=None,
                        help="lora: train adapters (default); full: train every weight of the components, with EMA")
    parser.add_argument("--components", default=None,
                        help=f"comma-separated, from {','.join(COMPONENTS)} (default: decoder; vae_decoder only "
                             "with --method full)")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank r (default: 8)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha; updates scale by alpha/r (default: 8)")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: 1e-4 (lora), 5e-5 (full)")
    parser.add_argument("--batch-size", type=int, default=None, help="per process and micro-step (default: 8)")
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None,
                        help="default: the launcher's (accelerate launch --mixed_precision), else no")
    parser.add_argument("--validation-prompt", action="append", default=None,
                        help="repeat for several (default: the first 4 distinct training captions)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-steps", type=positive_int, default=None, help="optimiser steps (default: 1000)")
    parser.add_argument("--output-dir", required=True, help="where the LoRA folder or the new pipeline goes")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to continue from")
    add_collective_timeout(parser)
    parser.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)  # refused by name (setup_stage)
    return parser


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def resolve_config(args: argparse.Namespace, overrides: list[str]) -> FinetuneConfig:
    """Defaults < method defaults (and the pipeline's sample size) < the YAML file < flags < '--a.b value'."""
    raw: dict[str, Any] = {}
    if args.config is not None:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
    method = args.method or raw.get("method", "lora")
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHOD_DEFAULTS)}")
    data = _merge(dataclasses.asdict(FinetuneConfig()), copy.deepcopy(METHOD_DEFAULTS[method]))
    pipeline = args.pipeline or raw.get("pipeline")
    if pipeline and (Path(pipeline) / "model_index.json").is_file():
        data["data"]["image_size"] = read_json(Path(pipeline) / "model_index.json").get("config", {}).get(
            "sample_size", data["data"]["image_size"])
    _merge(data, raw)
    flags = {
        ("pipeline",): args.pipeline, ("method",): args.method, ("seed",): args.seed,
        ("data", "train_data_dir"): args.train_data_dir, ("data", "dataset_name"): args.dataset_name,
        ("data", "image_column"): args.image_column, ("data", "caption_column"): args.caption_column,
        ("data", "validation_prompts"): args.validation_prompt,
        ("components",): None if args.components is None else [c.strip() for c in args.components.split(",")],
        ("lora", "rank"): args.rank, ("lora", "alpha"): args.alpha,
        ("optim", "lr"): args.learning_rate, ("optim", "batch_size"): args.batch_size,
        ("optim", "mixed_precision"): args.mixed_precision, ("optim", "max_steps"): args.max_steps,
    }
    for (*parents, key), value in flags.items():
        if value is not None:
            node = data
            for p in parents:
                node = node[p]
            node[key] = value
    if args.train_data_dir or args.dataset_name:  # a flag picks the source: the other one must not linger
        data["data"]["source"] = "image_text"
        data["data"]["dataset_name" if args.train_data_dir else "train_data_dir"] = None
    data = apply_overrides(data, list(overrides), cls=FinetuneConfig)
    cfg = config_from_dict(FinetuneConfig, data, source=str(args.config or "finetune config"))
    _check(cfg)
    # one order whatever the typed one, so that checkpoints (the optimizer's state is by position) match; the base
    # recorded as an absolute path, so the record (config.yaml) names it from anywhere
    return dataclasses.replace(cfg, components=tuple(c for c in COMPONENTS if c in cfg.components),
                               pipeline=str(Path(cfg.pipeline).resolve()))


def _check(cfg: FinetuneConfig) -> None:
    if cfg.pipeline is None:
        raise ValueError("--pipeline is required: the trained pipeline folder to fine-tune")
    if not (Path(cfg.pipeline) / "model_index.json").is_file():
        lora = (Path(cfg.pipeline) / LORA_INDEX).is_file()
        raise FileNotFoundError(f"--pipeline {cfg.pipeline}: not a pipeline folder (no model_index.json)" + (
            "; it is a LoRA folder: fine-tune its base pipeline, or fuse the LoRA into it first (pipe.fuse_lora(), "
            "pipe.unload_lora(), pipe.save_pretrained(...))" if lora else ""))
    components = cfg.components
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components or len(set(components)) != len(components):
        raise ValueError(f"--components {','.join(cfg.components)}: give distinct names from {list(COMPONENTS)}")
    if "vae_decoder" in components and cfg.method != "full":
        raise ValueError(f"--components vae_decoder needs --method full (got {cfg.method}): the VAE decoder is "
                         "convolutional, with no attention projections for LoRA adapters")
    if "text_encoder" in components and not {"decoder", "prior"} & set(components):
        raise ValueError("--components text_encoder: the text encoder is trained through the decoder or prior "
                         "loss; add decoder and/or prior to --components")
    if cfg.data.source == "image_text" and (cfg.data.train_data_dir is None) == (cfg.data.dataset_name is None):
        raise ValueError("give the training images: --train-data-dir FOLDER or --dataset-name NAME (one of them)")
    lora = cfg.lora
    if cfg.method == "lora":
        if lora.rank < 1 or not 0 < lora.alpha < math.inf or not 0 <= lora.dropout < 1:
            raise ValueError(f"LoRA settings rank={lora.rank}, alpha={lora.alpha}, dropout={lora.dropout}: the rank "
                             "must be >= 1, alpha > 0 (the update is scaled by alpha / rank) and dropout in [0, 1)")
    elif lora != LoraSettings():
        warnings.warn(f"--method full trains every weight of the components: the LoRA settings ({lora}) are "
                      "ignored", stacklevel=2)
    if cfg.validation_images < 0:
        raise ValueError(f"validation_images must be >= 0 (0: no validation grids), got {cfg.validation_images}")
    vae_config = Path(cfg.pipeline) / "vae" / "config.json"
    if vae_config.is_file():
        factor = config_from_dict(AutoencoderKLConfig, read_json(vae_config), source=str(vae_config)).downsample_factor
        if cfg.data.image_size % factor:
            raise ValueError(f"--data.image_size {cfg.data.image_size}: the pipeline's VAE needs a multiple of "
                             f"{factor}")


def _typed_order_refused(checkpoint: Path) -> None:
    """A checkpoint from before components trained in one order holds its optimizer state in the order its run
    typed them (recorded in that run's config.yaml): refused unless that was the order used now."""
    recorded = yaml.safe_load((checkpoint.parents[2] / "config.yaml").read_text()) \
        if (checkpoint.parents[2] / "config.yaml").is_file() else None
    components = recorded.get("components") if isinstance(recorded, dict) else None
    if isinstance(components, list) and components != [c for c in COMPONENTS if c in components]:
        raise ValueError(f"--resume {checkpoint}: its run trained --components {','.join(components)} in that order, "
                         "which its optimizer state follows; runs now train them in the order "
                         f"{','.join(c for c in COMPONENTS if c in components)}: start a new --output-dir")


def _cast_frozen(modules: list[nn.Module], dtype: torch.dtype) -> None:
    """Store the frozen parameters in `dtype` (memory); trained ones stay fp32, buffers keep their precision."""
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    for flag in overrides:  # an option misspelt with underscores would otherwise read as an unknown config key
        spelled = flag.split("=", 1)[0].replace("_", "-")
        if flag.startswith("--") and spelled in parser._option_string_actions:
            raise ValueError(f"unknown option {flag.split('=', 1)[0]}; did you mean {spelled}?")
    cfg = resolve_config(args, overrides)
    if Path(args.output_dir).resolve() == Path(cfg.pipeline).resolve():
        raise ValueError(f"--output-dir {args.output_dir} is the --pipeline folder: fine-tuning writes a new folder "
                         "(its weights, config.yaml and checkpoints would replace the base's); pick another")
    # a fully trained text encoder has parts some steps do not reach (the pooled projection, when only the
    # decoder's token states read it)
    stage = setup_stage("finetune", args, overrides, lambda c: c.optim, config=cfg, shardable=False,
                        find_unused_parameters=cfg.method == "full" and "text_encoder" in cfg.components)
    acc, out, oc = stage.accelerator, stage.output_dir, cfg.optim
    # LoRA checkpoints hold the adapters: the frozen base is --pipeline's, which resuming checks
    stage.trained_only, stage.base = cfg.method == "lora", Path(cfg.pipeline).resolve()
    stage.base_fingerprint, stage.check_legacy = pipeline_fingerprint(stage.base), _typed_order_refused
    if (stage.work_dir / "DONE").is_file() and stage.resume is None:
        record = out / "config.yaml"
        old = (yaml.safe_load(record.read_text()) or {}) if record.is_file() else {}
        if old.get("pipeline") and Path(old["pipeline"]).resolve() == Path(cfg.pipeline).resolve():
            old["pipeline"] = cfg.pipeline  # the same base, typed another way
        shown = changes_note(old, yaml.safe_load(config_to_yaml(cfg))) if old else ""
        stage.print(f"finetune: finished output exists in {out}; skipping (to train it for longer pass --resume "
                    "latest and a larger --max-steps; for other settings use a new --output-dir)"
                    + (f". It was trained with other settings than these: {shown}" if shown else ""))
        return
    # a missing folder, file or column fails here, before any model loads (unreadable images once they are read)
    dataset = build_dataset(cfg.data, cfg.seed)
    pipe = TextToImagePipeline.from_pretrained(cfg.pipeline, device=acc.device)
    names = list(cfg.components)
    missing = [c for c in names if c != "vae_decoder" and getattr(pipe, c, None) is None]
    if missing:
        raise ValueError(f"--components {','.join(names)}: the pipeline {cfg.pipeline} has no {missing}")
    train_decoder, train_prior = "decoder" in names, "prior" in names
    train_text, train_vae = "text_encoder" in names, "vae_decoder" in names
    if train_text and not train_decoder and pipe.prior_text_encoder is not None:
        raise ValueError(f"--components {','.join(names)}: the prior of {cfg.pipeline} reads its own text encoder "
                         "(prior_text_encoder), so nothing trained would read text_encoder; add decoder")
    use_image = (train_decoder and pipe.decoder.config.uses_image_embeds) or train_prior
    if use_image and pipe.image_encoder is None:
        raise ValueError(f"{cfg.pipeline} has no image_encoder: fine-tuning an image-conditioned decoder or a "
                         "prior needs the CLIP image embeddings of the training images")

    modules = {name: pipe.vae.decoder if name == "vae_decoder" else getattr(pipe, name) for name in names}
    if cfg.method == "lora":
        for module in modules.values():
            add_lora(module, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.feed_forward)
        precision = stage.accelerator.mixed_precision  # the config's, else the launcher's
        if precision in HALF:
            every = (pipe.text_encoder, pipe.image_encoder, pipe.vae, pipe.decoder, pipe.prior)
            _cast_frozen([m for m in every if m is not None], HALF[precision])
    else:
        for module in modules.values():
            module.requires_grad_(True)
    if oc.gradient_checkpointing:
        if not train_decoder:
            raise ValueError(f"optim.gradient_checkpointing checkpoints the decoder, which is not among the fine-tuned "
                             f"components {names}; add decoder or set it false")
        pipe.decoder.enable_gradient_checkpointing()
    # The CPU switches on every component, the frozen ones that run each step included (`fit` sees the trained
    # ones only); they change neither parameters nor state dicts.
    pipe.apply_speed(onednn=oc.onednn_linear, upsample=oc.transposed_upsample)
    model = FinetuneModules(modules)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    setup = {"method": cfg.method, "components": names, "trainable_parameters": sum(p.numel() for p in trainable),
             "trainable_dtypes": sorted({str(p.dtype) for p in trainable}),
             "frozen_dtypes": sorted({str(p.dtype) for p in frozen}), "dataset_size": len(dataset)}
    if acc.is_main_process:
        with open(stage.work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"setup": setup}) + "\n")
    stage.print(f"finetune: {cfg.method} on {','.join(names)}: {setup['trainable_parameters']:,} trainable "
                f"parameters ({', '.join(setup['trainable_dtypes'])}), {len(dataset)} training images")

    tokenizer, vae, image_encoder = pipe.tokenizer, pipe.vae, pipe.image_encoder
    decoder_schedule = NoiseSchedule(pipe.config.decoder_schedule)
    min_snr_gamma = cfg.min_snr_gamma
    if pipe.config.decoder_schedule.rescale_zero_terminal_snr and min_snr_gamma is not None and train_decoder:
        stage.print("finetune: the decoder has a zero-terminal-SNR schedule; min-SNR-γ is off (it would give the "
                    "last timesteps no weight)")
        min_snr_gamma = None
    prior_schedule = NoiseSchedule(pipe.config.prior_schedule)

    def text_features(m: nn.Module, captions: list[str], for_prior: bool = False
                      ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """(states (B, L, D), pooled (B, P), mask (B, L)) of the captions, and of the empty caption (1, ...), as
        the pipeline encodes them for the decoder, or for the prior (its own text encoder when it has one)."""
        if for_prior and pipe.prior_text_encoder is not None:  # e.g. a converted Stable unCLIP (Karlo) prior
            tok, encoder, trained = pipe.prior_tokenizer, pipe.prior_text_encoder, False
        else:
            tok, encoder, trained = tokenizer, (m.text_encoder if train_text else pipe.text_encoder), train_text
        use_mask = pipe.config.prior_text_attention_mask if for_prior else pipe.config.text_attention_mask
        with nullcontext() if trained else torch.no_grad():
            states, pooled, mask = encode_text(tok, encoder, [*captions, ""], device=acc.device,
                                               use_attention_mask=use_mask,
                                               token_embeddings=pipe.config.decoder_token_embeddings and not for_prior)
        return (states[:-1], pooled[:-1], mask[:-1]), (states[-1:], pooled[-1:], mask[-1:])

    @torch.no_grad()
    def image_features(pixels: torch.Tensor, rnd: StepRandom) -> dict[str, torch.Tensor]:
        """Frozen encoders: a VAE posterior sample z (B, C, h, w) and the decoder's latents made from it, CLIP
        image embeddings (B, D)."""
        f: dict[str, torch.Tensor] = {}
        if train_decoder or train_vae:
            posterior = vae.encode(pixels)
            f["z"] = posterior.mean + posterior.std * rnd.randn(*posterior.mean.shape[1:])
            f["latents"] = vae.to_latents(f["z"])
        if use_image:
            clip_pixels = clip_image_preprocess(((pixels + 1) / 2).clamp(0, 1), image_encoder.config.image_size,
                                                pipe.config.image_mean, pipe.config.image_std)
            f["image_embeds"] = image_encoder(pixel_values=clip_pixels).image_embeds.float()
            f["decoder_image"] = f["image_embeds"]
            if train_decoder and pipe.config.image_noising_schedule is not None:  # Stable unCLIP conditioning
                noise = rnd.randn(f["image_embeds"].shape[1])
                f["decoder_image"] = noise_augment(f["image_embeds"], noise, pipe.config.noise_level,
                                                   NoiseSchedule(pipe.config.image_noising_schedule),
                                                   pipe.image_normalizer)
        return f

    def losses(m: nn.Module, batch: dict[str, Any], rnd: StepRandom) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss of every trained component on one micro-batch; all randomness from `rnd`."""
        f = image_features(batch["pixel_values"].to(acc.device), rnd)
        text, empty = text_features(m, list(batch["caption"]))
        B = text[0].shape[0]
        total, logs = torch.zeros((), device=acc.device), {}
        if train_decoder:  # as training.train_decoder
            image = f["decoder_image"] if pipe.decoder.config.uses_image_embeds else None
            loss = decoder_loss(m.decoder, f["latents"], text[:2], empty[:2], image, rnd, decoder_schedule,
                                cfg.text_dropout, cfg.image_dropout, cfg.noise_offset, min_snr_gamma)
            total, logs["decoder_loss"] = total + loss, loss.detach()
        if train_prior:  # as training.train_prior
            if not pipe._prior_reads_decoder_text:  # own text encoder, another mask, or decoder token embeddings
                text, empty = text_features(m, list(batch["caption"]), for_prior=True)
            drop = rnd.rand() < cfg.text_dropout
            states = torch.where(drop[:, None, None], empty[0].expand(B, -1, -1), text[0])
            pooled = torch.where(drop[:, None], empty[1].expand(B, -1), text[1])
            mask = torch.where(drop[:, None], empty[2].expand(B, -1), text[2])
            x0 = m.prior.normalize(f["image_embeds"])
            t = rnd.randint(prior_schedule.num_train_timesteps)
            noise = rnd.randn(x0.shape[1])
            loss = diffusion_loss(lambda x, tt: m.prior(x, tt, states, pooled, mask), x0, prior_schedule,
                                  timesteps=t, noise=noise)
            total, logs["prior_loss"] = total + loss, loss.detach()
        if train_vae:  # as training.train_vae, less the KL term (the encoder is frozen)
            z = vae.post_quant_conv(f["z"]) if vae.post_quant_conv is not None else f["z"]
            loss = (m.vae_decoder(z) - batch["pixel_values"].to(acc.device)).abs().mean()
            total, logs["vae_l1"] = total + loss, loss.detach()
        return total, logs

    def loss_fn(wrapped: nn.Module, batch: Any, rnd: StepRandom, step: int) -> tuple[torch.Tensor, dict]:
        return wrapped(losses, batch, rnd)

    prompts = list(cfg.data.validation_prompts) or list(dict.fromkeys(dataset_captions(dataset, 64)))[:4]

    def validate(m: nn.Module, step: int) -> dict[str, float]:
        """A grid of `validation_images` samples per prompt (rows) from the pipeline as it is now."""
        from latent_diffusion.cli import make_grid

        if not prompts or not cfg.validation_images:
            return {}
        with acc.autocast():
            images = pipe(prompts, num_images_per_prompt=cfg.validation_images, seed=0, progress=False,
                          num_inference_steps=cfg.validation_steps, prior_num_inference_steps=cfg.validation_steps,
                          guidance_scale=cfg.validation_guidance).images
        make_grid(images, columns=cfg.validation_images).save(stage.work_dir / f"validation-{step:07d}.png")
        return {}

    if stage.resume is None and acc.is_main_process:  # the base model's grid, to compare against
        with torch.no_grad():
            validate(model, 0)
    acc.wait_for_everyone()
    final = fit(stage, model, dataset, loss_fn, oc, validate=validate if cfg.validation_images else None,
                params=trainable)

    if acc.is_main_process:
        if cfg.method == "lora":
            save_lora(out, {name: final.get_submodule(name) for name in names}, base_pipeline=str(cfg.pipeline),
                      extra={"method": "lora", "steps": stage.max_steps, "validation_prompts": prompts})
        else:
            pipe.save_pretrained(out)
    stage.mark_done()
    acc.wait_for_everyone()
    what = "LoRA" if cfg.method == "lora" else "pipeline"
    stage.print(f"finetune: wrote the {what} to {out}")


if __name__ == "__main__":
    run_from_command_line(main)
