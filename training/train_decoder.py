"""Stage 4: the latent decoder UNet (Rombach et al. 2022, Eq. 2), conditioned on CLIP text token states and
on the CLIP image embedding of the training image (unCLIP, Ramesh et al. 2022, §2.1). Text and image
conditioning are dropped independently (`text_dropout`: empty caption; `image_dropout`: zero embedding) so both
can be guided. Epsilon or v prediction (from the schedule), min-SNR-γ weighting (Hang et al. 2023) and noise
offset are options; `cache: true` precomputes the VAE posteriors and CLIP features once and keeps them in
`_work/decoder/features-<fingerprint>.safetensors`, so a resumed or continued run skips that work.

    accelerate launch -m training.train_decoder --config configs/shapes/tiny.yaml --output-dir runs/tiny

Writes `decoder/` and the pipeline's `model_index.json` (needs `train_clip`, `train_vae` and, when the config
has a prior, `train_prior` first).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from latent_diffusion import speed
from latent_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from latent_diffusion.io import config_from_dict, config_to_dict, load_safetensors, read_json, save_safetensors
from latent_diffusion.models import AutoencoderKL, DiffusionPrior, UNet, UNetConfig
from latent_diffusion.pipeline import PipelineConfig, TextToImagePipeline
from training.common import SCHEDULE_FILE, TokenizingCollate, build_dataset, decoder_loss, encode_batch, load_clip
from training.config import ExperimentConfig, run_from_command_line, stage_parser
from training.loop import fit, ignore_stop_signals
from training.stage import setup_stage


class CachedFeatures(Dataset):
    """Precomputed per-sample tensors (VAE posterior mean/std, CLIP features), built once in fixed order."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def shard_indices(n: int, rank: int, world: int, batch_size: int) -> list[int]:
    """The dataset indices process `rank` of `world` encodes, `batch_size` at a time: global batch g covers
    [g·B·W, (g+1)·B·W) and process r takes its r-th slice of B. With several processes a short or empty slice is
    padded with index n - 1, so that every process has the same number of equal batches to gather; gathered in
    rank order, each global batch then holds its real samples first and the padding after them."""
    if world == 1:
        return list(range(n))
    indices = []
    for start in range(0, n, batch_size * world):
        lo = min(start + rank * batch_size, n)
        part = list(range(lo, min(lo + batch_size, n)))
        indices += part + [n - 1] * (batch_size - len(part))
    return indices


def encode_all(dataset: Dataset, features: Callable[[dict], dict[str, torch.Tensor]], acc: Any, batch_size: int,
               num_workers: int = 0, collate: Callable | None = None) -> dict[str, torch.Tensor]:
    """`features` of every sample of `dataset`, in dataset order, on the CPU: each process encodes its share
    (`shard_indices`) and all gather every global batch, so every process ends with the whole set. `acc`: the
    Accelerator (num_processes, process_index, gather). Each value: (len(dataset), ...)."""
    n, world = len(dataset), acc.num_processes
    mine = Subset(dataset, shard_indices(n, acc.process_index, world, batch_size))
    loader = DataLoader(mine, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate,
                        worker_init_fn=ignore_stop_signals)  # Ctrl-C: one KeyboardInterrupt, in this process
    parts, done = [], 0
    for batch in tqdm(loader, desc="decoder: caching", unit="batch", disable=not acc.is_main_process):
        f = features(batch)
        if world > 1:  # (W·B, ...): the processes' slices in rank order, the padding last
            f = {k: acc.gather(v.contiguous()) for k, v in f.items()}
        keep = min(batch_size * world, n - done)
        parts.append({k: v[:keep].cpu() for k, v in f.items()})
        done += keep
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def agreed(acc: Any, flag: bool) -> bool:
    """`flag` if every process holds it (one that alone missed a shared file would otherwise wait at a collective
    the others never reach)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), reduction="sum").item() == acc.num_processes)


def features_key(cfg: ExperimentConfig, out: Path) -> str:
    """A fingerprint of what the cached features depend on: the data config, the seed, whether image embeddings
    are cached (a text-only run's cache has none), and the VAE and CLIP files (a retrained VAE or CLIP makes a new
    cache)."""
    key = [config_to_dict(cfg.data), cfg.seed] + ([True] if cfg.decoder.token_embeddings else []) \
        + (["text only"] if cfg.prior is None else [])  # (keys of earlier caches kept where they were right)
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for part in ("tokenizer", "text_encoder", "image_encoder", "vae"):
        for f in sorted((out / part).glob("*")) if (out / part).is_dir() else []:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def warm_start(unet: UNet, folder: Path) -> None:
    """Load another decoder's weights into `unet` (`decoder.init_from`). The architectures must match, except
    that `unet` may add position embeddings or a text refiner, which start at zero (the loaded model's function
    is unchanged)."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"decoder.init_from={str(folder)!r} is not a decoder folder (no config.json); expected "
                         "e.g. OUTPUT_DIR/decoder of a finished run")
    source = UNet.from_pretrained(folder)
    mine, theirs = config_to_dict(unet.config), config_to_dict(source.config)
    addable = {"position_embedding": False, "text_refiner_layers": 0}  # may be added (from these), not changed
    differ = sorted(k for k in mine if mine[k] != theirs.get(k)
                    and not (k in addable and theirs.get(k, addable[k]) == addable[k]))
    if differ:
        raise ValueError(f"decoder.init_from={str(folder)!r} has another architecture: "
                         + ", ".join(f"{k} {theirs.get(k)} vs {mine[k]}" for k in differ))
    state, own = source.state_dict(), unet.state_dict()
    added = sorted(set(own) - set(state))
    assert all(".pos_proj." in k or k.startswith("text_refiner.") for k in added), added
    assert not set(state) - set(own), sorted(set(state) - set(own))
    unet.load_state_dict(state, strict=False)


def pipeline_config(cfg: ExperimentConfig, out: Path, say: Callable[[str], None] = print) -> PipelineConfig:
    """The pipeline's settings: the decoder's from this config; the prior's schedule from the file the prior stage
    wrote beside its weights (the run that trained it), else from this config."""
    prior_schedule = cfg.prior.schedule if cfg.prior else PipelineConfig().prior_schedule
    trained = out / "prior" / SCHEDULE_FILE
    if cfg.prior is not None and trained.is_file():
        recorded = config_from_dict(ScheduleConfig, read_json(trained), source=str(trained))
        if recorded != prior_schedule:
            say(f"decoder: the prior was trained with another schedule than this config's prior.schedule; the "
                f"pipeline records the one it was trained with ({trained})")
        prior_schedule = recorded
    return PipelineConfig(decoder_schedule=cfg.decoder.schedule, prior_schedule=prior_schedule,
                          sample_size=cfg.data.image_size, decoder_token_embeddings=cfg.decoder.token_embeddings)


def main(argv: list[str] | None = None) -> None:
    args, overrides = stage_parser(__doc__, "training.train_decoder").parse_known_args(argv)
    stage = setup_stage("decoder", args, overrides, lambda c: c.decoder.optim)
    cfg, acc = stage.config, stage.accelerator
    if stage.skip_if_done("decoder"):
        return
    dc, out = cfg.decoder, stage.output_dir
    pipe_cfg = pipeline_config(cfg, out, stage.print)
    # The frozen encoders run in every step (unless `cache`): the stage's oneDNN switch speeds them up too.
    tokenizer, text_encoder, image_encoder = load_clip(out, acc.device, onednn=dc.optim.onednn_linear)
    vae = AutoencoderKL.from_pretrained(out / "vae", device=acc.device).requires_grad_(False)
    speed.apply_speed(vae, onednn=dc.optim.onednn_linear)
    use_image = cfg.prior is not None
    dataset = build_dataset(cfg.data, cfg.seed)
    if dc.cache and getattr(dataset, "several_captions", False):
        raise ValueError("decoder.cache encodes each image with one caption, but this data gives several captions "
                         "per image (drawn afresh each epoch); set decoder.cache false to train on all of them")
    empty = encode_batch(tokenizer, text_encoder, None, [""], None, pipe_cfg.image_mean, pipe_cfg.image_std,
                         dc.token_embeddings)

    @torch.no_grad()
    def features(batch: dict) -> dict[str, torch.Tensor]:
        """VAE posterior (mean, std) and CLIP features of a batch of dataset items."""
        tokens = (batch["input_ids"], batch["attention_mask"]) if "input_ids" in batch else None
        f = encode_batch(tokenizer, text_encoder, image_encoder if use_image else None, list(batch["caption"]),
                         batch["pixel_values"], pipe_cfg.image_mean, pipe_cfg.image_std, dc.token_embeddings,
                         tokens=tokens)
        posterior = vae.encode(batch["pixel_values"].to(acc.device))
        return {"mean": posterior.mean, "std": posterior.std, **f}

    if dc.cache:
        path = stage.work_dir / f"features-{features_key(cfg, out)}.safetensors"
        if agreed(acc, path.is_file()):  # every process reads it, or every one takes its share of the encoding
            stage.print(f"decoder: cached latents and CLIP features from {path}")
            dataset = CachedFeatures(load_safetensors(path))
        else:
            if len(dataset) == 0:
                raise ValueError("the training dataset is empty")
            stage.print(f"decoder: caching latents and CLIP features of {len(dataset)} samples"
                        + (f" ({acc.num_processes} processes share the work)" if acc.num_processes > 1 else ""))
            # per process and batch: every process holds the gathered batch of all (2,048 rows at most)
            share = min(256, max(1, 2048 // acc.num_processes), -(-len(dataset) // acc.num_processes))
            dataset = CachedFeatures(encode_all(dataset, features, acc, share, dc.optim.num_workers,
                                                TokenizingCollate(tokenizer)))
            if acc.is_main_process:  # kept for resumed or continued runs; stale ones go
                for old in stage.work_dir.glob("features-*.safetensors"):
                    old.unlink()
                save_safetensors(path, dataset.tensors)

    tc = text_encoder.config
    torch.manual_seed(cfg.seed)
    unet = UNet(UNetConfig(
        in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels, channels=dc.channels,
        attention_levels=dc.attention_levels, layers_per_block=dc.layers_per_block, heads=dc.heads,
        transformer_depth=dc.transformer_depth, context_dim=tc.hidden_size, norm_groups=dc.norm_groups,
        image_embed_dim=image_encoder.config.projection_dim if use_image else None,
        image_context_tokens=dc.image_context_tokens if use_image else 0,
        pooled_text_dim=tc.projection_dim if dc.use_pooled_text else None, position_embedding=dc.position_embedding,
        text_refiner_layers=dc.text_refiner_layers))
    if dc.init_from:
        warm_start(unet, Path(dc.init_from))
        stage.print(f"decoder: starting from the weights in {dc.init_from}")
    if dc.optim.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    schedule = NoiseSchedule(dc.schedule)

    def loss_fn(model, batch, rnd, step):
        f = batch if dc.cache else features(batch)
        f = {k: v.to(acc.device) for k, v in f.items()}
        latents = vae.to_latents(f["mean"] + f["std"] * rnd.randn(*f["mean"].shape[1:]))
        loss = decoder_loss(model, latents, (f["text_states"], f["text_embeds"]),
                            (empty["text_states"], empty["text_embeds"]), f["image_embeds"] if use_image else None,
                            rnd, schedule, dc.text_dropout, dc.image_dropout, dc.noise_offset, dc.min_snr_gamma,
                            dc.timestep_logit_normal)
        return loss, {}

    prior = DiffusionPrior.from_pretrained(out / "prior", device=acc.device) if use_image else None

    def assemble(model: UNet) -> TextToImagePipeline:
        # the image encoder also serves a text-only decoder's pipeline: `evaluate` scores with it
        return TextToImagePipeline(tokenizer, text_encoder, model, vae, prior, image_encoder, pipe_cfg)

    def validate(model, step):
        from latent_diffusion.cli import make_grid

        pipe = assemble(model)
        images = pipe(list(cfg.data.validation_prompts), num_images_per_prompt=4, num_inference_steps=25,
                      seed=0, progress=False).images
        make_grid(images, columns=4).save(stage.work_dir / f"validation-{step:07d}.png")
        model.requires_grad_(True)  # the pipeline freezes its components; this one is still training
        return {}

    unet = fit(stage, unet, dataset, loss_fn, dc.optim, validate=validate,
               collate=None if dc.cache else TokenizingCollate(tokenizer))
    if acc.is_main_process:
        # Only the decoder and the index are new: the other stages' outputs stay as they wrote them.
        assemble(unet).save_pretrained(out, components=["decoder"])
    stage.mark_done()
    acc.wait_for_everyone()
    stage.print(f"decoder: wrote the pipeline to {out}")


if __name__ == "__main__":
    run_from_command_line(main)
