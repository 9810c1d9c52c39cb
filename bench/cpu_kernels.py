"""The kernels behind the CPU speed switches, one shape at a time.

Why `speed.onednn_linear` and `speed.transposed_upsample` exist, and where their thresholds come from.

    python bench/cpu_kernels.py            # the published figures (BENCHMARKS.md)
    python bench/cpu_kernels.py --tiny     # a seconds-long smoke run of the same logic

1. GEMM rate: a large fp32 matmul through `F.linear` (MKL's sgemm) and through `speed.linear` (a 1×1
   convolution through oneDNN), and a 3×3 convolution (oneDNN), in GFLOP/s: what each library reaches here;
   then the decoder UNet's training step (batch 64 at 8×8×4): its FLOPs by kind and the rate it reaches with
   the switches off and on.
2. Linear layers at the shapes of the decoder UNet (rows = batch × tokens): `F.linear` against `speed.linear`
   with its size thresholds lifted, forward and forward + backward (gradients of input, weight and bias).
3. Upsampling (nearest ×2, then 3×3 convolution) against the equal stride-2 transposed convolution
   (`speed.phase_kernel`), forward and forward + backward, NCHW and channels_last, at the decoder's and the
   VAE's sizes.

Each pair is interleaved (A B A B ..., median); ratios below 1 mean the switch's path is faster.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from _common import (  # noqa: E402
    add_run_args,
    interleaved,
    machine_info,
    markdown_table,
    parse_run_args,
    rel_err,
    write_json,
)

from latent_diffusion import speed  # noqa: E402
from latent_diffusion.layers import Upsample  # noqa: E402

# (rows, in, out): the decoder UNet's GEMMs at batch 64 / 16 (1,024 and 256 tokens at the attention levels,
# 2,048 context rows), small ones below the switch's thresholds, and one large square GEMM.
LINEAR_SHAPES = [(1024, 128, 128), (1024, 128, 384), (1024, 128, 1024), (1024, 512, 128), (2048, 128, 256),
                 (256, 128, 128), (256, 128, 1024), (256, 512, 128), (128, 256, 256), (4096, 1024, 1024)]
# (batch, channels, input size): the decoder's upsamplings at batch 64 / 16 and the VAE decoder's at batch 16.
UPSAMPLE_SHAPES = [(64, 128, 2), (64, 128, 4), (16, 128, 4), (16, 128, 8), (8, 128, 8), (16, 64, 16), (16, 64, 32)]
TINY_LINEAR = [(64, 16, 32), (32, 8, 8)]
TINY_UPSAMPLE = [(2, 8, 4)]


def forward_backward(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor],
                     grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return step


def rate(fn: Callable[[], Any], flops: float, repeats: int, iters: int) -> float:
    return flops / interleaved({"x": fn}, repeats=repeats, iters=iters)["x"]["median_ms"] / 1e6


def gemm_rates(tiny: bool, repeats: int, iters: int) -> list[list[Any]]:
    n = 64 if tiny else 2048
    a, w = torch.randn(n, n), torch.randn(n, n)
    c, b, size = (8, 2, 8) if tiny else (128, 64, 16)
    x, k = torch.randn(b, c, size, size), torch.randn(c, c, 3, 3)
    conv_flops = 2 * (x.numel() // c) * k.numel()  # 2 · output pixels · (out · in · 3 · 3)
    with torch.no_grad(), lifted_thresholds():
        return [[f"matmul {n}³, F.linear (MKL)", rate(lambda: F.linear(a, w), 2 * n ** 3, repeats, iters)],
                [f"matmul {n}³, speed.linear (oneDNN)", rate(lambda: speed.linear(a, w), 2 * n ** 3, repeats, iters)],
                [f"conv 3×3 {tuple(x.shape)} → {k.shape[0]} (oneDNN)",
                 rate(lambda: F.conv2d(x, k, padding=1), conv_flops, repeats, iters)]]


@contextmanager
def lifted_thresholds() -> Iterator[None]:
    """Make `speed.linear` take its oneDNN path at every size (restored on exit)."""
    saved = speed.ONEDNN_MIN_ROWS, speed.ONEDNN_MIN_MACS
    speed.ONEDNN_MIN_ROWS = speed.ONEDNN_MIN_MACS = 1
    try:
        yield
    finally:
        speed.ONEDNN_MIN_ROWS, speed.ONEDNN_MIN_MACS = saved


def unet_step_rates(tiny: bool, repeats: int, iters: int) -> list[list[Any]]:
    """FLOPs of the decoder UNet's training step (forward + MSE backward, batch 64 at 8×8×4: the first shape of
    cpu_vs_diffusers.py), split by operator kind (torch.utils.flop_counter), and the rate the step reaches with
    the switches off and on."""
    from cpu_vs_diffusers import TINY_UNET, UNET_DIFFUSERS, build_pair
    from torch.utils.flop_counter import FlopCounterMode

    config = TINY_UNET if tiny else UNET_DIFFUSERS
    batch, size = (4, 8) if tiny else (64, 8)
    with tempfile.TemporaryDirectory() as tmp:
        _, ours = build_pair("unet", config, Path(tmp) / "unet")
    fast = speed.apply_speed(copy.deepcopy(ours), channels_last=True, fuse=True, onednn=True, upsample=True)
    g = torch.Generator().manual_seed(2)
    x, target = torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    ctx = torch.randn(batch, 32, config["cross_attention_dim"], generator=g)

    def step(model: torch.nn.Module) -> Callable[[], None]:
        def fn() -> None:
            model.zero_grad(set_to_none=True)
            F.mse_loss(model(x, t, ctx), target).backward()
        return fn

    with FlopCounterMode(display=False) as counter:
        step(ours)()
    total = counter.get_total_flops()
    kinds = {"convolution": 0, "matmul": 0}
    for op, flops in counter.get_flop_counts()["Global"].items():
        kinds["convolution" if "convolution" in str(op) else "matmul"] += flops
    timing = interleaved({"eager default": step(ours), "cl+fuse+onednn+up": step(fast)}, repeats=repeats,
                         iters=iters)
    rows = [[f"UNet fwd+bwd {batch}×4×{size}×{size}: GFLOP per step", total / 1e9]]
    rows += [[f"  of which {k}", v / total] for k, v in kinds.items()]
    rows += [[f"  GFLOP/s, {name} ({tm['median_ms']:.1f} ms)", total / tm["median_ms"] / 1e6]
             for name, tm in timing.items()]
    return rows


def linear_rows(shapes: list[tuple[int, int, int]], repeats: int, iters: int) -> list[dict[str, Any]]:
    out = []
    g = torch.Generator().manual_seed(0)
    for rows, k, n in shapes:
        x = torch.randn(rows, k, generator=g, requires_grad=True)
        w = torch.randn(n, k, generator=g, requires_grad=True)
        b = torch.randn(n, generator=g, requires_grad=True)
        grad = torch.randn(rows, n, generator=g)
        with lifted_thresholds():
            err = rel_err(speed.linear(x, w, b), F.linear(x, w, b))
            with torch.no_grad():
                fwd = interleaved({"mkl": partial(F.linear, x, w, b), "onednn": partial(speed.linear, x, w, b)},
                                  repeats=repeats, iters=iters)
            both = interleaved({"mkl": forward_backward(partial(F.linear, x, w, b), [x, w, b], grad),
                                "onednn": forward_backward(partial(speed.linear, x, w, b), [x, w, b], grad)},
                               repeats=repeats, iters=iters)
        taken = rows >= speed.ONEDNN_MIN_ROWS and rows * k * n >= speed.ONEDNN_MIN_MACS
        out.append({"shape": f"{rows}×{k} → {n}", "macs_m": rows * k * n / 1e6, "switch_takes_it": taken,
                    "fwd_mkl_ms": fwd["mkl"]["median_ms"], "fwd_onednn_ms": fwd["onednn"]["median_ms"],
                    "fwdbwd_mkl_ms": both["mkl"]["median_ms"], "fwdbwd_onednn_ms": both["onednn"]["median_ms"],
                    "max_rel_diff": err})
        print(f"  linear {out[-1]['shape']}: fwd {out[-1]['fwd_onednn_ms'] / out[-1]['fwd_mkl_ms']:.2f}, "
              f"fwd+bwd {out[-1]['fwdbwd_onednn_ms'] / out[-1]['fwdbwd_mkl_ms']:.2f}", flush=True)
    return out


def upsample_rows(shapes: list[tuple[int, int, int]], repeats: int, iters: int) -> list[dict[str, Any]]:
    out = []
    for batch, channels, size in shapes:
        torch.manual_seed(0)
        plain = Upsample(channels)
        fast = speed.transposed_upsample(copy.deepcopy(plain), min_pixels=1)
        for layout in (torch.contiguous_format, torch.channels_last):
            p, f = copy.deepcopy(plain).to(memory_format=layout), copy.deepcopy(fast).to(memory_format=layout)
            x = torch.randn(batch, channels, size, size).contiguous(memory_format=layout).requires_grad_()
            grad = torch.randn(batch, channels, 2 * size, 2 * size).contiguous(memory_format=layout)
            err = rel_err(f(x), p(x))
            with torch.no_grad():
                fwd = interleaved({"plain": partial(p, x), "transposed": partial(f, x)}, repeats=repeats, iters=iters)
            both = interleaved({"plain": forward_backward(partial(p, x), [x, *p.parameters()], grad),
                                "transposed": forward_backward(partial(f, x), [x, *f.parameters()], grad)},
                               repeats=repeats, iters=iters)
            name = "channels_last" if layout == torch.channels_last else "NCHW"
            out.append({"shape": f"{batch}×{channels}×{size}×{size}", "pixels": batch * size * size, "layout": name,
                        "switch_takes_it": batch * size * size >= 1024,
                        "fwd_plain_ms": fwd["plain"]["median_ms"], "fwd_transposed_ms": fwd["transposed"]["median_ms"],
                        "fwdbwd_plain_ms": both["plain"]["median_ms"],
                        "fwdbwd_transposed_ms": both["transposed"]["median_ms"], "max_rel_diff": err})
            r = out[-1]
            print(f"  upsample {r['shape']} {name}: fwd {r['fwd_transposed_ms'] / r['fwd_plain_ms']:.2f}, "
                  f"fwd+bwd {r['fwdbwd_transposed_ms'] / r['fwdbwd_plain_ms']:.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(parser, "cpu_kernels", repeats=15, iters=5)
    args = parse_run_args(parser, argv, "cpu_kernels")

    gemm = gemm_rates(args.tiny, args.repeats, args.iters) + unet_step_rates(args.tiny, args.repeats, args.iters)
    linear = linear_rows(TINY_LINEAR if args.tiny else LINEAR_SHAPES, args.repeats, args.iters)
    upsample = upsample_rows(TINY_UPSAMPLE if args.tiny else UPSAMPLE_SHAPES, args.repeats, args.iters)

    tables = {
        "gemm": markdown_table(["kernel", "GFLOP/s (or as named)"], gemm),
        "linear": markdown_table(
            ["rows × in → out", "M MACs", "switch takes it", "fwd MKL ms", "fwd oneDNN (ratio)", "fwd+bwd MKL ms",
             "fwd+bwd oneDNN (ratio)"],
            [[r["shape"], r["macs_m"], "yes" if r["switch_takes_it"] else "no", r["fwd_mkl_ms"],
              f"{r['fwd_onednn_ms']:.3f} (**{r['fwd_onednn_ms'] / r['fwd_mkl_ms']:.2f}**)", r["fwdbwd_mkl_ms"],
              f"{r['fwdbwd_onednn_ms']:.3f} (**{r['fwdbwd_onednn_ms'] / r['fwdbwd_mkl_ms']:.2f}**)"] for r in linear]),
        "upsample": markdown_table(
            ["input", "pixels", "layout", "fwd plain ms", "fwd transposed (ratio)", "fwd+bwd plain ms",
             "fwd+bwd transposed (ratio)"],
            [[r["shape"], r["pixels"], r["layout"], r["fwd_plain_ms"],
              f"{r['fwd_transposed_ms']:.2f} (**{r['fwd_transposed_ms'] / r['fwd_plain_ms']:.2f}**)",
              r["fwdbwd_plain_ms"],
              f"{r['fwdbwd_transposed_ms']:.2f} (**{r['fwdbwd_transposed_ms'] / r['fwdbwd_plain_ms']:.2f}**)"]
             for r in upsample]),
    }
    info = machine_info()
    print(f"\n{info['cpu']} ({info['cpu_capability']}), {info['torch_threads']} threads, torch {info['torch']}; "
          f"median of {args.repeats} interleaved repeats × {args.iters} calls\n")
    for table in tables.values():
        print(table + "\n")
    data = {"machine": info, "repeats": args.repeats, "iters": args.iters, "gemm": gemm, "linear": linear,
            "upsample": upsample, "tables": tables}
    write_json(args.out, data)
    return data


if __name__ == "__main__":
    main()
