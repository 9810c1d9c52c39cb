"""Experiment configs: one YAML file describes the data and every stage; `--section.key value` overrides it.

Unknown keys are refused by name; the resolved config is saved into the output folder as `config.yaml`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from latent_diffusion.diffusion import ScheduleConfig
from latent_diffusion.io import atomic_write_bytes, coerce_field, config_from_dict, dataclass_in


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation settings shared by every stage. `batch_size` is per process and micro-step; the global
    batch is batch_size × processes × grad_accum."""

    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 100
    max_steps: int = 1000
    max_minutes: float | None = None  # stop the loop after this long (at a step boundary) and save as if finished
    max_grad_norm: float | None = 1.0
    # None: the launcher's choice (`accelerate launch --mixed_precision` or its config file; "no" without one)
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    ema_decay: float | None = None  # None: no EMA weights
    checkpoint_every: int = 500
    checkpoint_limit: int = 2
    log_every: int = 25
    validate_every: int = 0  # 0: validate only at the end
    num_workers: int = 0
    gradient_checkpointing: bool = False
    compile: bool = False  # regional torch.compile of the model's blocks (speed.compile_blocks): for GPUs
    onednn_linear: bool = False  # fp32 CPU Linear GEMMs through oneDNN (speed.onednn_linear): for CPUs
    transposed_upsample: bool = False  # ×2 upsampling + conv as one transposed conv (speed.transposed_upsample)

    def __post_init__(self) -> None:
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"optim.max_minutes={self.max_minutes} must be > 0, or null for no time limit")
        for name in ("batch_size", "grad_accum", "log_every", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 1")
        for name in ("lr", "warmup_steps", "checkpoint_every", "checkpoint_limit", "validate_every", "num_workers",
                     "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"optim.{name}={getattr(self, name)} must be >= 0")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"optim.max_grad_norm={self.max_grad_norm} must be > 0, or null for no clipping")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay={self.ema_decay} must be in (0, 1), or null for no EMA")


@dataclass(frozen=True)
class DataConfig:
    """The training images and captions (`source`), shared by every stage."""
    source: Literal["shapes", "emoji", "image_text"] = "shapes"
    num_samples: int = 20000  # shapes: size of the (deterministic) training set (emoji and own data: all of it)
    image_size: int = 64
    exclude_pairs: tuple[str, ...] = ()  # shapes: "colour shape" pairs never shown in training
    dataset_name: str | None = None  # image_text: a hub name / parquet / csv / json path
    train_data_dir: str | None = None  # image_text: an imagefolder with metadata.jsonl / metadata.csv
    image_column: str = "image"
    caption_column: str = "text"
    random_crop: bool = False
    random_flip: bool = False
    validation_prompts: tuple[str, ...] = ("a red circle on the left", "a large blue square in the center",
                                           "a green star above a yellow triangle")

    def __post_init__(self) -> None:
        augment = [k for k in ("random_crop", "random_flip") if getattr(self, k)]
        if augment and self.source != "image_text":  # the synthetic sources render each sample at its size
            raise ValueError(f"data.{augment[0]} applies to image_text data only; source {self.source!r} ignores it: "
                             f"set it false")


@dataclass(frozen=True)
class ClipStageConfig:
    """Stage 1: tokenizer + CLIP trained contrastively (or `pretrained`, a CLIPModel folder, used as is)."""
    preset: str = "small"
    vocab_size: int = 1024
    max_length: int = 32  # tokens per caption (CLIP's context length)
    pretrained: str | None = None  # a folder holding a CLIPModel + tokenizer: skip training
    temperature_init: float = 0.07
    hard_negatives: bool = False  # shapes data: one caption per image with one attribute edited (NegCLIP)
    hard_negative_kinds: tuple[str, ...] = ()  # edits to draw from (shapes.EDIT_KINDS); empty: all of them
    hard_negative_weight: float = 0.0  # weight of a 2-way loss between each caption and its hard negative
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.1, batch_size=128))


@dataclass(frozen=True)
class VaeStageConfig:
    """Stage 2: the KL autoencoder (architecture, loss weights, random-crop training, optional PatchGAN)."""
    channels: tuple[int, ...] = (32, 64, 128)
    latent_channels: int = 4
    layers_per_block: int = 1
    norm_groups: int = 16
    mid_attention: bool = True
    # weight of KL(q(z|x) ‖ N(0, I)) summed over the latent, per image, against the L1 averaged over pixels. LDM sums
    # its reconstruction term over pixels too, so its kl_weight 1e-6 corresponds to 1e-6 / (3·H·W) here; and the
    # KL's share grows with the image (crop) area
    kl_weight: float = 1e-6
    l2_weight: float = 0.0
    crop_size: int | None = None  # train on random crops (autoencoders are convolutional)
    scale_samples: int = 1024  # training images used to measure the latent scaling factor
    gan_weight: float = 0.0  # > 0: add a PatchGAN hinge loss with this weight (0: no discriminator)
    gan_start: int = 0  # the step from which the adversarial losses count (reconstructions settle first)
    disc_channels: int = 64
    disc_layers: int = 3
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=4e-4, warmup_steps=50))


@dataclass(frozen=True)
class PriorStageConfig:
    """Stage 3: the diffusion prior (architecture, schedule, text dropout for guidance)."""
    width: int = 256
    layers: int = 6
    heads: int = 4
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        beta_schedule="squaredcos_cap_v2", prediction_type="sample"))
    text_dropout: float = 0.1
    stats_samples: int = 4096  # training images used for the image-embedding mean/std
    heldout_captions: int = 256
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.01, ema_decay=0.999))


@dataclass(frozen=True)
class DecoderStageConfig:
    """Stage 4: the decoder UNet (architecture, schedule, conditioning dropout, loss options, feature cache)."""
    channels: tuple[int, ...] = (64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, True, True)
    layers_per_block: int = 2
    heads: tuple[int, ...] = (4, 4, 4)
    transformer_depth: tuple[int, ...] = (1, 1, 1)
    norm_groups: int = 32
    image_context_tokens: int = 4
    use_pooled_text: bool = True
    position_embedding: bool = False  # 2-D position code in every attention (UNetConfig.position_embedding)
    token_embeddings: bool = False  # also attend to CLIP's input token embeddings (PipelineConfig)
    text_refiner_layers: int = 0  # self-attention blocks over the text tokens (UNetConfig.text_refiner_layers)
    init_from: str | None = None  # a decoder folder to start from (warm start; fresh optimizer and schedule)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    text_dropout: float = 0.1
    image_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    timestep_logit_normal: tuple[float, float] | None = None  # (m, s): t/T = sigmoid(N(m, s)); None: uniform
    cache: bool = False  # precompute latents and CLIP embeddings once
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-4, ema_decay=0.999))

    def __post_init__(self) -> None:
        tln = self.timestep_logit_normal
        if tln is not None and (len(tln) != 2 or not tln[1] > 0):
            raise ValueError(f"decoder.timestep_logit_normal={list(tln)} must be [mean, std] with std > 0")
        if self.schedule.rescale_zero_terminal_snr and self.min_snr_gamma is not None:
            # min-SNR-γ weighs the x0 error by min(SNR, γ): 0 at the zero-SNR end, where only the caption can say
            # where things go, so the decoder never learns layout from text there.
            raise ValueError(f"decoder.min_snr_gamma={self.min_snr_gamma} gives the last timesteps of a "
                             "zero-terminal-SNR schedule no weight; set decoder.min_snr_gamma null with "
                             "decoder.schedule.rescale_zero_terminal_snr true")
        if self.schedule.rescale_zero_terminal_snr and self.schedule.prediction_type == "epsilon":
            # At the zero-SNR end α ≈ 0: x0 = (x - σ ε) / α turns any ε error into a huge x0 error (Lin et al.
            # 2024, §3.2).
            raise ValueError("decoder.schedule.prediction_type='epsilon' cannot predict the clean image at the "
                             "zero-SNR end of decoder.schedule.rescale_zero_terminal_snr true; set "
                             "decoder.schedule.prediction_type v_prediction (or sample)")


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole recipe: data and every stage. `prior: null` trains a text-only decoder and no prior."""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipStageConfig = field(default_factory=ClipStageConfig)
    vae: VaeStageConfig = field(default_factory=VaeStageConfig)
    prior: PriorStageConfig | None = field(default_factory=PriorStageConfig)  # None: text-only decoder
    decoder: DecoderStageConfig = field(default_factory=DecoderStageConfig)

    def __post_init__(self) -> None:
        for name in ("vae", "prior"):
            stage = getattr(self, name)
            if stage is not None and stage.optim.gradient_checkpointing:
                raise ValueError(f"{name}.optim.gradient_checkpointing: the {name} stage has no gradient checkpointing "
                                 "(the clip and decoder stages have); set it false")
        augment = [k for k in ("random_crop", "random_flip") if getattr(self.data, k)]
        if self.decoder.cache and augment:  # (image_text data: DataConfig refuses them elsewhere)
            raise ValueError(f"decoder.cache computes each image's latent once, which would freeze data.{augment[0]} "
                             f"to a single draw; set decoder.cache false or data.{augment[0]} false")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the attention projections (q, k, v, out) of each fine-tuned component (Hu et al. 2022)."""

    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    feed_forward: bool = False  # also adapt the transformer feed-forward layers


@dataclass(frozen=True)
class FinetuneConfig:
    """`training.finetune`: fine-tune a trained pipeline on captioned images, with LoRA adapters or in full.

    `components` are among decoder, prior, text_encoder and (full only) vae_decoder; the text encoder and the VAE
    stay frozen unless listed. The losses follow the training stages: the decoder's (text/image dropout, min-SNR-γ,
    noise offset), the prior's, and the VAE's reconstruction L1. min-SNR-γ is not applied to a decoder with a
    zero-terminal-SNR schedule (it would give the last timesteps, where the layout is decided, no weight)."""

    seed: int = 0
    pipeline: str | None = None  # the base pipeline folder
    method: Literal["lora", "full"] = "lora"
    components: tuple[str, ...] = ("decoder",)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="image_text", validation_prompts=()))
    text_dropout: float = 0.1
    image_dropout: float = 0.1
    min_snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    validation_images: int = 4  # per validation prompt (no prompts given: the first 4 distinct captions); 0: none
    validation_steps: int = 25
    validation_guidance: float = 5.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        batch_size=8, lr=1e-4, lr_schedule="constant", warmup_steps=0, max_steps=1000, checkpoint_every=250,
        validate_every=250, log_every=10))


def _coerce(text: str, like: Any, hint: Any) -> Any:
    """Parse a command-line override with YAML, then check it fits the field's type loosely."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "3e-4" as a string
        except ValueError:
            pass
    if isinstance(like, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = ExperimentConfig) -> dict[str, Any]:
    """Apply `--a.b.c value` (or `--a.b.c=value`) pairs to a nested dict, refusing keys the config does not have
    (by name, with the closest key) and values of the wrong type (by flag)."""
    overrides = [part for item in overrides
                 for part in (item.split("=", 1) if item.startswith("--") and "=" in item else [item])]
    if len(overrides) % 2:
        raise ValueError(f"overrides come in '--key value' pairs, got {overrides}")
    for flag, text in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--"):
            raise ValueError(f"expected an override like --decoder.optim.lr, got {flag!r}")
        path = flag[2:].replace("-", "_").split(".")
        node, node_cls = data, cls
        for i, key in enumerate(path):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            if key not in fields:
                where = ".".join(path[:i]) or "the top level"
                close = difflib.get_close_matches(key, fields, n=1)
                guess = f"; did you mean --{'.'.join([*path[:i], close[0]])}?" if close else ""
                raise ValueError(f"unknown config key {flag!r}: {where} has keys {sorted(fields)}{guess}")
            hint = typing.get_type_hints(node_cls)[key]
            sub = dataclass_in(hint)
            if i == len(path) - 1:
                default = getattr(node_cls(), key) if _has_defaults(node_cls) else None
                value = _coerce(text, default, hint)
                if isinstance(value, dict) and sub is not None and isinstance(node.get(key), dict):
                    value = _merged(node[key], value)  # a section's keys on top of the recipe's, not instead
                elif isinstance(value, list):  # checked here, by flag (config_from_dict builds the tuples later)
                    coerce_field(tuple(tuple(v) if isinstance(v, list) else v for v in value), hint, flag)
                elif not isinstance(value, dict):  # (sections are built later)
                    value = coerce_field(value, hint, flag)
                node[key] = value
            else:
                if sub is None:
                    raise ValueError(f"config key {'.'.join(path[:i + 1])} is not a section")
                if node.get(key) is None:  # absent, or `null` in the YAML (`prior: null`)
                    node[key] = {}
                node, node_cls = node[key], sub
    return data


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update`'s keys set on it, recursively for nested mappings."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _has_defaults(cls: type) -> bool:
    try:
        cls()
        return True
    except TypeError:
        return False


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment config (None: all defaults), apply overrides, and validate every key."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    data = apply_overrides(data, list(overrides or []))
    return config_from_dict(ExperimentConfig, data, source=str(path or "config"))


def config_to_yaml(config: Any) -> str:
    def plain(x: Any) -> Any:
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return yaml.safe_dump(plain(dataclasses.asdict(config)), sort_keys=False)


def save_config(config: ExperimentConfig | FinetuneConfig, path: str | Path) -> None:
    atomic_write_bytes(path, config_to_yaml(config).encode())


def run_from_command_line(main: Callable[[list[str]], Any]) -> None:
    """Run a stage's `main` on `sys.argv`: a configuration, data or resume error (ValueError, or an OSError such as a
    missing file or an unreachable hub) prints `error: ...` without a traceback and exits with status 2
    (LATENT_DIFFUSION_TRACEBACK=1 shows it).
    After a run, every process meets the others and destroys the process group: left to interpreter shutdown,
    gloo's threads can abort a process after its run has finished."""
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as error:
        if os.environ.get("LATENT_DIFFUSION_TRACEBACK"):
            raise
        message = str(error)
        if "Original Traceback" in message:  # raised in a DataLoader worker: keep the error's own text
            lines = message.strip().splitlines()
            own = re.compile(rf"^(?:[\w.]+\.)?{type(error).__name__}: ")  # (qualified outside builtins)
            at = max((i for i, line in enumerate(lines) if own.match(line)), default=len(lines) - 1)
            message = own.sub("", "\n".join(lines[at:]), count=1)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    close_process_group()


def close_process_group() -> None:
    """Meet the other processes, then destroy the process group (a no-op outside a distributed run). Call it
    only where every process gets to it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def timeout_minutes(text: str) -> float:
    """argparse type: a number of minutes in (0, 10080] (a week)."""
    value = float(text)
    if not 0 < value <= 10080:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 10080 minutes (a week), got {text}")
    return value


COLLECTIVE_TIMEOUT_MINUTES = 60.0


def add_collective_timeout(parser: argparse.ArgumentParser) -> None:
    """--collective-timeout: how long a process waits for the others at a collective before the run fails."""
    parser.add_argument(
        "--collective-timeout", type=timeout_minutes, default=COLLECTIVE_TIMEOUT_MINUTES, metavar="MINUTES",
        help="with several processes: how long one waits for the others at a barrier or all-reduce before the run "
             f"fails (default: {COLLECTIVE_TIMEOUT_MINUTES:g}; torch's own is 10 with NCCL). The others wait while "
             "the main process alone trains the tokenizer, writes decoder.cache or runs validation")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that lines never break inside a flag (`--decoder.optim.lr` stays whole)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def stage_parser(doc: str, module: str, shardable: bool = True) -> argparse.ArgumentParser:
    """The command line every stage shares: --config, --output-dir, --resume, --max-steps, --fsdp,
    --collective-timeout, then overrides.
    `doc`: the stage module's docstring (its first paragraph becomes the description); `module`: its name
    (`training.train_vae`), for the usage line; `shardable` false: --fsdp is left out of --help (and refused by
    name when given, `setup_stage`)."""
    parser = argparse.ArgumentParser(
        prog=f"accelerate launch -m {module}", description=" ".join(doc.split("\n\n")[0].split()),
        formatter_class=HelpFormatter,
        epilog="Any config key can be overridden as '--section.key value', e.g. '--decoder.optim.lr 1e-4'.")
    parser.add_argument("--config", default=None, help="YAML experiment config (default: built-in defaults)")
    parser.add_argument("--output-dir", required=True, help="the pipeline folder the stages write into")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder to continue from")
    parser.add_argument("--max-steps", type=positive_int, default=None,
                        help="optimiser steps: sets optim.max_steps of every stage in the config (the LR schedule "
                             "spans them)")
    fsdp_help = ("fully sharded data parallel (FSDP2) for the VAE, prior and decoder stages: parameters, gradients "
                 "and optimizer state split across processes; in fp32 the same weights as data-parallel")
    parser.add_argument("--fsdp", action="store_true", help=fsdp_help if shardable else argparse.SUPPRESS)
    add_collective_timeout(parser)
    return parser
