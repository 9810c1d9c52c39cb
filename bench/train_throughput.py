"""Training throughput (samples/s: forward + backward + AdamW step) of the decoder UNet and the VAE of a training
config on this machine's CPU, with the speed switches off and on.

    python bench/train_throughput.py                                  # configs/shapes/base.yaml
    python bench/train_throughput.py --compile                        # also regional torch.compile
    python bench/train_throughput.py --tiny                           # a seconds-long smoke run

Models are built exactly as training/train_decoder.py and training/train_vae.py build them (CLIP widths from
the config's CLIP preset); inputs are random tensors of the training shapes: the decoder sees latents
(B, 4, S/f, S/f), 32-token text states, pooled text and image embeddings; the VAE sees `crop_size` crops (or
full images) and is trained on MSE + KL. The settings are interleaved (A B C A B C ..., median of the repeats):
"eager default" (fp32, NCHW, separate q/k/v), "fuse" (`speed.fuse_qkv`), "cl+fuse" (`speed.apply_speed`:
channels_last + fused q/k/v), "onednn+up" (`speed.onednn_linear` + `speed.transposed_upsample`), "cl+fuse+onednn+up"
(all four), "bf16 autocast" (no switches; the forward pass under `speed.bf16_autocast`, fp32 weights and
optimizer, as `optim.mixed_precision bf16` trains) and, with `--compile`, "fuse+compile" (+ `speed.compile_blocks`).
AdamW is torch's default (foreach) implementation on the CPU, as in training/loop.py.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from _common import add_run_args, interleaved, machine_info, markdown_table, parse_run_args, write_json  # noqa: E402

from latent_diffusion import speed  # noqa: E402
from latent_diffusion.models import AutoencoderKL, AutoencoderKLConfig, UNet, UNetConfig  # noqa: E402
from latent_diffusion.models.clip import CLIP_PRESETS  # noqa: E402
from training.config import load_config  # noqa: E402


def build_models(config_path: Path) -> tuple[UNet, AutoencoderKL, dict[str, Any]]:
    """The decoder UNet and the VAE of a training config, and the shapes they train on."""
    cfg = load_config(str(config_path), [])
    clip = CLIP_PRESETS[cfg.clip.preset]
    width, proj = clip["text"]["hidden_size"], clip["projection_dim"]
    vc, dc = cfg.vae, cfg.decoder
    torch.manual_seed(0)
    vae = AutoencoderKL(AutoencoderKLConfig(channels=vc.channels, latent_channels=vc.latent_channels,
                                            layers_per_block=vc.layers_per_block, norm_groups=vc.norm_groups,
                                            mid_attention=vc.mid_attention, scaling_factor=1.0))
    use_image = cfg.prior is not None
    unet = UNet(UNetConfig(
        in_channels=vc.latent_channels, out_channels=vc.latent_channels, channels=dc.channels,
        attention_levels=dc.attention_levels, layers_per_block=dc.layers_per_block, heads=dc.heads,
        transformer_depth=dc.transformer_depth, context_dim=width, norm_groups=dc.norm_groups,
        image_embed_dim=proj if use_image else None, image_context_tokens=dc.image_context_tokens if use_image else 0,
        pooled_text_dim=proj if dc.use_pooled_text else None))
    shapes = {"decoder_batch": dc.optim.batch_size, "latent": cfg.data.image_size // vae.config.downsample_factor,
              "latent_channels": vc.latent_channels, "tokens": cfg.clip.max_length, "width": width, "proj": proj,
              "vae_batch": vc.optim.batch_size, "vae_size": vc.crop_size or cfg.data.image_size,
              "use_image": use_image, "use_pooled": dc.use_pooled_text}
    return unet, vae, shapes


def decoder_step(model: UNet, s: dict[str, Any], bf16: bool = False) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    B = s["decoder_batch"]
    x = torch.randn(B, s["latent_channels"], s["latent"], s["latent"], generator=g)
    target = torch.randn(x.shape, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    states = torch.randn(B, s["tokens"], s["width"], generator=g)
    image = torch.randn(B, s["proj"], generator=g) if s["use_image"] else None
    pooled = torch.randn(B, s["proj"], generator=g) if s["use_pooled"] else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        with speed.bf16_autocast("cpu", enabled=bf16):
            out = model(x, t, states, image, pooled)
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def vae_step(model: AutoencoderKL, s: dict[str, Any], bf16: bool = False) -> Callable[[], None]:
    g = torch.Generator().manual_seed(1)
    B, S = s["vae_batch"], s["vae_size"]
    x = torch.rand(B, 3, S, S, generator=g) * 2 - 1
    f = model.config.downsample_factor
    noise = torch.randn(B, model.config.latent_channels, S // f, S // f, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step() -> None:
        with speed.bf16_autocast("cpu", enabled=bf16):
            recon, posterior = model(x, noise=noise)
        (F.mse_loss(recon.float(), x) + 1e-6 * posterior.kl().float().mean()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "shapes" / "base.yaml")
    add_run_args(parser, "train_throughput", repeats=7, iters=3,
                 tiny_help="configs/shapes/tiny.yaml sizes, batch 4, 1 repeat")
    parser.add_argument("--compile", action="store_true", help="also time speed.compile_blocks")
    args = parse_run_args(parser, argv, "train_throughput")
    if args.tiny and args.config == parser.get_default("config"):
        args.config = REPO / "configs" / "shapes" / "tiny.yaml"

    unet, vae, shapes = build_models(args.config)
    if args.tiny:
        shapes.update(decoder_batch=4, vae_batch=4)
    rows, results = [], []
    for name, model, make_step, batch in (("decoder UNet", unet, decoder_step, shapes["decoder_batch"]),
                                          ("VAE", vae, vae_step, shapes["vae_batch"])):
        settings = {"eager default": model, "fuse": speed.fuse_qkv(copy.deepcopy(model)),
                    "cl+fuse": speed.apply_speed(copy.deepcopy(model), channels_last=True, fuse=True),
                    "onednn+up": speed.apply_speed(copy.deepcopy(model), onednn=True, upsample=True),
                    "cl+fuse+onednn+up": speed.apply_speed(copy.deepcopy(model), channels_last=True, fuse=True,
                                                           onednn=True, upsample=True)}
        if args.compile:
            kwargs = {"backend": "eager"} if args.tiny else {}
            settings["fuse+compile"] = speed.compile_blocks(speed.fuse_qkv(copy.deepcopy(model)), **kwargs)
        steps = {k: make_step(m, shapes) for k, m in settings.items()}
        # bf16 autocast (fp32 weights; training's `optim.mixed_precision bf16`), switches off
        steps["bf16 autocast"] = make_step(copy.deepcopy(model), shapes, bf16=True)
        timing = interleaved(steps, repeats=args.repeats, iters=args.iters)
        base = timing["eager default"]["median_ms"]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        if name == "VAE":
            shape = f"{batch}×3×{shapes['vae_size']}×{shapes['vae_size']}"
        else:
            shape = f"{batch}×{shapes['latent_channels']}×{shapes['latent']}×{shapes['latent']}"
        for k, tm in timing.items():
            rows.append([name, f"{params:.2f}M", shape, k, tm["median_ms"], batch / tm["median_ms"] * 1e3,
                         base / tm["median_ms"]])
            results.append({"model": name, "params_m": params, "shape": shape, "setting": k,
                            "ms_per_step": tm["median_ms"], "samples_per_s": batch / tm["median_ms"] * 1e3,
                            "speedup": base / tm["median_ms"], "runs_ms": tm["runs_ms"]})
        print(f"  {name}: " + ", ".join(f"{k} {batch / v['median_ms'] * 1e3:.1f} samples/s"
                                        for k, v in timing.items()), flush=True)
    table = markdown_table(["model", "params", "batch", "setting", "ms/step", "samples/s", "speed-up"], rows)
    info = machine_info()
    print(f"\n{args.config.name}; {info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}; "
          f"median of {args.repeats} interleaved repeats × {args.iters} steps\n")
    print(table)
    data = {"machine": info, "config": str(args.config.relative_to(REPO)), "repeats": args.repeats,
            "iters": args.iters, "results": results, "table": table}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
