"""Latency of the full text-to-image pipeline on the CPU, split into text encoder, prior, decoder and VAE.

    python bench/pipeline_latency.py                          # assets/shapes-64, or a random base-size pipeline
    python bench/pipeline_latency.py --pipeline runs/shapes-64 --images 4 --steps 25
    python bench/pipeline_latency.py --tiny                   # a seconds-long smoke run

One prompt, `--images` images, `--steps` decoder steps (and as many prior steps), classifier-free guidance
on both (the defaults of `TextToImagePipeline.__call__`). Time inside each component is measured with forward
hooks on the component modules (the text encoder, the prior, the decoder UNet, the VAE decoder), so the split
holds whatever the pipeline's internals look like; "other" is the rest of the wall time (tokenizer, sampler
arithmetic, image conversion). Three settings are interleaved: the eager default; "cl+fuse" (`speed.apply_speed`:
channels_last + fused q/k/v on the decoder and VAE, fused q/k/v on the prior); "--fast" (what `latent-diffusion
generate --fast` applies on a CPU: channels_last, `speed.onednn_linear` and `speed.transposed_upsample` on every
component, through `TextToImagePipeline.apply_speed`).

Without a pipeline folder a random one is built with the sizes of configs/shapes/base.yaml (timing does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_args, machine_info, markdown_table, parse_run_args, write_json  # noqa: E402

from latent_diffusion import speed  # noqa: E402
from latent_diffusion.cli import speed_up  # noqa: E402
from latent_diffusion.pipeline import TextToImagePipeline  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "a small red circle on the left and a large blue square in the center"


def random_pipeline(config_path: Path, folder: Path, tiny: bool = False) -> TextToImagePipeline:
    """A pipeline with random weights and the component sizes of a training config (`tiny`: much smaller)."""
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from latent_diffusion.data.shapes import ShapesDataset
    from latent_diffusion.models import (
        AutoencoderKL,
        AutoencoderKLConfig,
        DiffusionPrior,
        DiffusionPriorConfig,
        UNet,
        UNetConfig,
    )
    from latent_diffusion.models.clip import clip_text_config, clip_vision_config, train_clip_tokenizer
    from latent_diffusion.pipeline import PipelineConfig
    from training.config import load_config

    cfg = load_config(str(config_path), [])
    torch.manual_seed(0)
    captions = ShapesDataset(2000, seed=0).captions()
    tokenizer = train_clip_tokenizer(captions, folder / "tokenizer", vocab_size=cfg.clip.vocab_size,
                                     model_max_length=cfg.clip.max_length)
    preset = "tiny" if tiny else cfg.clip.preset
    text_encoder = CLIPTextModelWithProjection(clip_text_config(preset, tokenizer, cfg.clip.max_length))
    image_encoder = CLIPVisionModelWithProjection(clip_vision_config(preset, image_size=cfg.data.image_size))
    tc, vc, pc, dc = text_encoder.config, cfg.vae, cfg.prior, cfg.decoder
    vae = AutoencoderKL(AutoencoderKLConfig(channels=vc.channels, latent_channels=vc.latent_channels,
                                            layers_per_block=vc.layers_per_block, norm_groups=vc.norm_groups,
                                            mid_attention=vc.mid_attention, scaling_factor=1.0))
    prior = DiffusionPrior(DiffusionPriorConfig(
        embed_dim=image_encoder.config.projection_dim, text_embed_dim=tc.projection_dim,
        text_states_dim=tc.hidden_size, max_text_tokens=tokenizer.model_max_length, width=pc.width,
        layers=pc.layers, heads=pc.heads))
    decoder = UNet(UNetConfig(
        in_channels=vc.latent_channels, out_channels=vc.latent_channels, channels=dc.channels,
        attention_levels=dc.attention_levels, layers_per_block=dc.layers_per_block, heads=dc.heads,
        transformer_depth=dc.transformer_depth, context_dim=tc.hidden_size, norm_groups=dc.norm_groups,
        image_embed_dim=image_encoder.config.projection_dim, image_context_tokens=dc.image_context_tokens,
        pooled_text_dim=tc.projection_dim if dc.use_pooled_text else None))
    for module in (decoder, vae, prior):
        with torch.no_grad():  # make zero-initialised layers non-trivial
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    return TextToImagePipeline(tokenizer, text_encoder, decoder, vae, prior, image_encoder,
                               PipelineConfig(sample_size=cfg.data.image_size))


class ComponentTimer:
    """Accumulates wall time spent inside the forward of named modules (pre/post forward hooks)."""

    def __init__(self, modules: dict[str, list[torch.nn.Module]]):
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._start: dict[int, float] = {}
        self.handles = []
        for name, mods in modules.items():
            for i, m in enumerate(mods):
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post(name, count=i == 0)))

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        self._start[id(module)] = time.perf_counter()

    def _post(self, name: str, count: bool) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            self.totals[name] += time.perf_counter() - self._start.pop(id(module))
            self.calls[name] += int(count)  # a component's calls: those of its first module
        return hook

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def components(pipe: TextToImagePipeline) -> dict[str, list[torch.nn.Module]]:
    vae = [pipe.vae.decoder] + ([pipe.vae.post_quant_conv] if pipe.vae.post_quant_conv is not None else [])
    out = {"text encoder": [pipe.text_encoder], "prior": [pipe.prior] if pipe.prior is not None else [],
           "decoder": [pipe.decoder], "VAE decode": vae}
    return {k: v for k, v in out.items() if v}


def with_switches(pipe: TextToImagePipeline) -> TextToImagePipeline:
    """A copy of `pipe` with channels_last + fused q/k/v on the decoder and VAE and fused q/k/v on the prior."""
    fast = copy.copy(pipe)
    fast.decoder = speed.apply_speed(copy.deepcopy(pipe.decoder), channels_last=True, fuse=True)
    fast.vae = speed.apply_speed(copy.deepcopy(pipe.vae), channels_last=True, fuse=True)
    if pipe.prior is not None:
        fast.prior = speed.fuse_qkv(copy.deepcopy(pipe.prior))
    return fast


def with_fast(pipe: TextToImagePipeline) -> TextToImagePipeline:
    """A copy of `pipe` with the switches of `latent-diffusion generate --fast` for the CPU."""
    return speed_up(copy.deepcopy(pipe), torch.device("cpu"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", type=Path, default=REPO / "assets" / "shapes-64",
                        help="pipeline folder (a random base-size pipeline when it does not exist)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shapes" / "base.yaml",
                        help="sizes of the random pipeline")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="decoder and prior sampling steps")
    add_run_args(parser, "pipeline_latency", repeats=9, tiny_help="tiny CLIP, 2 steps, 1 repeat: a smoke test")
    args = parse_run_args(parser, argv, "pipeline_latency")
    if args.tiny:
        args.steps, args.images = 2, 2

    with tempfile.TemporaryDirectory() as tmp:
        if args.pipeline.is_dir() and not args.tiny:
            source = str(args.pipeline)
            pipe = TextToImagePipeline.from_pretrained(args.pipeline)
        else:
            source = f"random weights, sizes of {args.config.relative_to(REPO)}" + (" (tiny CLIP)" if args.tiny
                                                                                     else "")
            print(f"{args.pipeline} not found: building a pipeline with {source}")
            pipe = random_pipeline(args.config, Path(tmp), tiny=args.tiny)
    if args.tiny:
        pipe.config = replace(pipe.config, sample_size=32)
    settings = {"eager default": pipe, "cl+fuse": with_switches(pipe), "--fast": with_fast(pipe)}
    timers = {name: ComponentTimer(components(p)) for name, p in settings.items()}
    n_params = {k: sum(p.numel() for m in v for p in m.parameters()) / 1e6 for k, v in components(pipe).items()}

    def run(p: TextToImagePipeline) -> float:
        t0 = time.perf_counter()
        p(PROMPT, num_images_per_prompt=args.images, num_inference_steps=args.steps,
          prior_num_inference_steps=args.steps, seed=0, progress=False)
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up (the first runs on this machine are slower)
        for p in settings.values():
            run(p)
    samples: dict[str, list[dict[str, float]]] = {k: [] for k in settings}
    for r in range(args.repeats):
        for name in list(settings)[r % len(settings):] + list(settings)[:r % len(settings)]:
            timers[name].reset()
            wall = run(settings[name])
            split = {k: v * 1e3 for k, v in timers[name].totals.items()}
            split["other"] = wall * 1e3 - sum(split.values())
            split["total"] = wall * 1e3
            samples[name].append(split)

    parts = list(components(pipe)) + ["other", "total"]
    median = {s: {k: statistics.median(x[k] for x in samples[s]) for k in parts} for s in settings}
    calls = dict(timers["eager default"].calls)
    base = median["eager default"]
    rows = [[k, f"{n_params[k]:.2f}M" if k in n_params else "", calls.get(k, ""), base[k]]
            + [f"{median[s][k]:.1f} (**{median[s][k] / base[k]:.2f}**)" for s in list(settings)[1:]] for k in parts]
    table = markdown_table(["component", "params", "calls", "eager default ms"]
                           + [f"{s} ms (ratio)" for s in list(settings)[1:]], rows)
    info = machine_info()
    print(f"\n{source}; {args.images} images, {args.steps} decoder and prior steps, CFG; {info['cpu']}, "
          f"{info['torch_threads']} threads, torch {info['torch']}; median of {args.repeats} repeats\n")
    print(table)
    data = {"machine": info, "pipeline": source, "images": args.images, "steps": args.steps,
            "repeats": args.repeats, "median_ms": median, "runs_ms": samples, "calls": calls, "table": table}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
