"""Our UNet and AutoencoderKL against diffusers on the CPU: same config, same weights, one process.

    python bench/cpu_vs_diffusers.py                       # the published figures (BENCHMARKS.md)
    python bench/cpu_vs_diffusers.py --compile             # also time regional torch.compile (slow to compile)
    python bench/cpu_vs_diffusers.py --tiny                # a seconds-long smoke run of the same logic

The diffusers models are built from a config, randomised, saved, and loaded into ours with `from_diffusers`,
so both compute the same function (the max relative output difference is printed). Each case times
diffusers, "ours" (eager default: fp32, NCHW, separate q/k/v), "ours+fuse" (`speed.fuse_qkv`),
"ours+cl+fuse" (`speed.apply_speed`: channels_last + fused q/k/v), "ours+onednn" (`speed.onednn_linear`: the
Linear GEMMs through oneDNN) and "ours+cl+fuse+onednn+up" (those and `speed.transposed_upsample`) — with
`--compile` also "ours+fuse" and "ours+cl+fuse" with `speed.compile_blocks` — interleaved (A B C A B C ...,
several repeats, median) and reports the ratio ours / diffusers in parentheses (below 1: ours is faster).

Cases: the SD-like decoder UNet of configs/shapes/base.yaml without image conditioning (6.7M parameters:
channels (64, 128, 128), attention on the two lower levels, 4 heads, 32 context tokens of width 128) —
forward (no_grad) and forward+backward (MSE loss; no dropout, so train and eval mode compute the same) at
batch 64 on 8×8×4 and batch 16 on 16×16×4 latents; the VAE of base.yaml — encode and decode of a batch of 16
64×64 images.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_run_args,
    interleaved,
    machine_info,
    markdown_table,
    parse_run_args,
    randomize_,
    rel_err,
    write_json,
)

from latent_diffusion import speed  # noqa: E402
from latent_diffusion.models import AutoencoderKL, UNet  # noqa: E402

UNET_DIFFUSERS = dict(block_out_channels=[64, 128, 128], layers_per_block=1, cross_attention_dim=128,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                      attention_head_dim=4, norm_num_groups=32, in_channels=4, out_channels=4)
VAE_DIFFUSERS = dict(block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=16, latent_channels=4,
                     down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                     mid_block_add_attention=False)
TINY_UNET = dict(UNET_DIFFUSERS, block_out_channels=[16, 32, 32], cross_attention_dim=32, norm_num_groups=8)
TINY_VAE = dict(VAE_DIFFUSERS, block_out_channels=[8, 16, 16], norm_num_groups=4)
CONTEXT_TOKENS = 32


def build_pair(kind: str, config: dict[str, Any], folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers model, our model loaded from its saved folder), same weights."""
    import diffusers

    torch.manual_seed(0)
    cls = diffusers.UNet2DConditionModel if kind == "unet" else diffusers.AutoencoderKL
    ref = cls(**config)
    randomize_(ref, 1)
    ref.save_pretrained(folder)
    ours = (UNet if kind == "unet" else AutoencoderKL).from_diffusers(folder)
    return ref, ours


def unet_cases(ref: torch.nn.Module, variants: dict[str, torch.nn.Module], batch: int, size: int,
               context_dim: int) -> list[tuple[str, dict[str, Callable[[], Any]], Callable[[], float]]]:
    """(name, {variant: step fn}, check fn) for forward and forward+backward at one latent shape."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    ctx = torch.randn(batch, CONTEXT_TOKENS, context_dim, generator=g)
    target = torch.randn(batch, 4, size, size, generator=g)
    models = {"diffusers": ref, **variants}

    def call(name: str) -> torch.Tensor:
        out = models[name](x, t, ctx)
        return out.sample if name == "diffusers" else out

    def forward(name: str) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.no_grad():
                return call(name)
        return fn

    def train_step(name: str) -> Callable[[], Any]:
        model = models[name]

        def fn() -> None:
            model.zero_grad(set_to_none=True)
            F.mse_loss(call(name), target).backward()
        return fn

    def check() -> float:
        with torch.no_grad():
            ref_out = call("diffusers")
            return max(rel_err(call(n), ref_out) for n in variants)

    shape = f"{batch}×4×{size}×{size}"
    return [(f"UNet forward {shape}", {n: forward(n) for n in models}, check),
            (f"UNet fwd+bwd {shape}", {n: train_step(n) for n in models}, check)]


def vae_cases(ref: torch.nn.Module, variants: dict[str, torch.nn.Module], batch: int,
              size: int) -> list[tuple[str, dict[str, Callable[[], Any]], Callable[[], float]]]:
    g = torch.Generator().manual_seed(3)
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    f = 2 ** (len(ref.config.block_out_channels) - 1)
    z = torch.randn(batch, ref.config.latent_channels, size // f, size // f, generator=g)
    models = {"diffusers": ref, **variants}

    def encode(name: str) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.no_grad():
                post = models[name].encode(images)
                return post.latent_dist.mean if name == "diffusers" else post.mean
        return fn

    def decode(name: str) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with torch.no_grad():
                out = models[name].decode(z)
                return out.sample if name == "diffusers" else out
        return fn

    def check(step: Callable[[str], Callable[[], torch.Tensor]]) -> Callable[[], float]:
        return lambda: max(rel_err(step(n)(), step("diffusers")()) for n in variants)

    return [(f"VAE encode {batch}×3×{size}×{size}", {n: encode(n) for n in models}, check(encode)),
            (f"VAE decode {batch}×4×{size // f}×{size // f}", {n: decode(n) for n in models}, check(decode))]


def variants_of(ours: torch.nn.Module, compile: bool, tiny: bool) -> dict[str, torch.nn.Module]:
    """ours (eager default), + fused q/k/v, + channels_last and fused q/k/v, + oneDNN linears, + all four CPU
    switches, and, if asked, + regional compile."""
    out = {"ours": ours, "ours+fuse": speed.fuse_qkv(copy.deepcopy(ours)),
           "ours+cl+fuse": speed.apply_speed(copy.deepcopy(ours), channels_last=True, fuse=True),
           "ours+onednn": speed.onednn_linear(copy.deepcopy(ours)),
           "ours+cl+fuse+onednn+up": speed.apply_speed(copy.deepcopy(ours), channels_last=True, fuse=True,
                                                       onednn=True, upsample=True)}
    if compile:
        # --tiny only traces with dynamo (backend="eager"): it checks the logic without minutes of C++ builds.
        kwargs = {"backend": "eager"} if tiny else {}
        out["ours+fuse+compile"] = speed.compile_blocks(speed.fuse_qkv(copy.deepcopy(ours)), **kwargs)
        out["ours+cl+fuse+compile"] = speed.compile_blocks(
            speed.apply_speed(copy.deepcopy(ours), channels_last=True, fuse=True), **kwargs)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(parser, "cpu_vs_diffusers", repeats=9, iters=3)
    parser.add_argument("--compile", action="store_true", help="also time speed.compile_blocks")
    parser.add_argument("--only", choices=["unet", "vae"], default=None, help="run one model family")
    args = parse_run_args(parser, argv, "cpu_vs_diffusers")
    unet_cfg, vae_cfg = (TINY_UNET, TINY_VAE) if args.tiny else (UNET_DIFFUSERS, VAE_DIFFUSERS)
    shapes = [(4, 8), (2, 16)] if args.tiny else [(64, 8), (16, 16)]
    vae_batch, vae_size = (2, 32) if args.tiny else (16, 64)

    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "unet"):
            ref, ours = build_pair("unet", unet_cfg, Path(tmp) / "unet")
            variants = variants_of(ours, args.compile, args.tiny)
            print(f"UNet: {sum(p.numel() for p in ours.parameters()) / 1e6:.2f}M parameters")
            for batch, size in shapes:
                cases += unet_cases(ref, variants, batch, size, unet_cfg["cross_attention_dim"])
        if args.only in (None, "vae"):
            ref, ours = build_pair("vae", vae_cfg, Path(tmp) / "vae")
            ref.eval()
            cases += vae_cases(ref, variants_of(ours, args.compile, args.tiny), vae_batch, vae_size)

    rows, results = [], []
    for name, fns, check in cases:
        err = check()
        timing = interleaved(fns, repeats=args.repeats, iters=args.iters)
        base = timing["diffusers"]["median_ms"]
        row = [name, base]
        for variant in fns:
            if variant != "diffusers":
                ms = timing[variant]["median_ms"]
                row.append(f"{ms:.1f} (**{ms / base:.2f}**)")
        rows.append(row + [f"{err:.1e}"])
        results.append({"case": name, "max_rel_diff": err, "timing": timing,
                        "ratio": {v: timing[v]["median_ms"] / base for v in fns if v != "diffusers"}})
        print(f"  {name}: " + ", ".join(f"{v} {t['median_ms']:.1f} ms" for v, t in timing.items()), flush=True)
    variant_names = [v for v in cases[0][1] if v != "diffusers"]
    headers = ["case", "diffusers ms"] + [f"{v} ms (ratio)" for v in variant_names]
    table = markdown_table(headers + ["max rel diff"], rows)
    info = machine_info()
    print(f"\n{info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, diffusers {info['diffusers']}, "
          f"median of {args.repeats} interleaved repeats × {args.iters} calls\n")
    print(table)
    data = {"machine": info, "repeats": args.repeats, "iters": args.iters, "unet_config": unet_cfg,
            "vae_config": vae_cfg, "results": results, "table": table}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
