"""GPU benchmark of an SD-1.5-size UNet and SD VAE in bf16, ours beside diffusers, in one run of at most 6 minutes.

    python bench/gpu.py                 # on an H100/H200 (bench/README.md: running it without internet access)
    python bench/gpu.py --tiny          # the same logic on the CPU with tiny models, fp32, 1–2 iterations

Sections, in order of priority (each is skipped, and says so, once `--budget-s` would be exceeded):
1. peak: a bf16 8192³ matmul, the denominator of MFU, measured in the same run.
2. inference: UNet it/s at batch 1 and 8 with classifier-free guidance (the UNet sees 2 and 16 latents of
   64×64×4, 77 context tokens of 768), eager: ours, ours + switches (channels_last + fused q/k/v),
   ours + switches replayed as a CUDA graph (`speed.capture_cuda_graph`), diffusers (interleaved, median).
3. training: one step at batch 16 on 64×64×4 latents (bf16 autocast, fp32 weights, MSE loss, fused AdamW):
   samples/s, MFU (FLOPs of one step counted with torch.utils.flop_counter.FlopCounterMode), peak memory —
   with and without gradient checkpointing, for each of `--train-impls`: ours + switches (channels_last + fused
   q/k/v), ours + fuse (NCHW: CUDA's GroupNorm has no channels_last kernel in some torch versions and converts
   its input), diffusers; two probes of where the eager step loses time, on ours + fuse: `+lpnorm` runs
   GroupNorm/LayerNorm in the autocast dtype (autocast otherwise upcasts them, so every norm reads bf16 and writes
   fp32), `+flash` keeps SDPA off cuDNN's attention kernel (flash, then memory-efficient: recent torch prefers
   cuDNN on Hopper); with `--train-compile` also each under whole-model `torch.compile` (no checkpointing; the
   compile time is reported, the FLOPs are the eager model's); with `--train-profile` the operators that take the
   time of one eager step of each implementation (torch.profiler, top 40 by device time) and that time summed by
   kind (convolution, matmul, attention, norm, optimizer, copies, other) beside the step's wall time. Each row
   records its first step's loss: the implementations start from the same weights and data, so the losses agree
   to bf16 rounding.
4. vae: decode of one 64×64×4 latent to a 512² image, ours (plain, channels_last, and with
   `speed.transposed_upsample`: each ×2 upsampling + 3×3 convolution as one transposed convolution) and diffusers.
5. compiled inference: whole-model `torch.compile` on ours + fused q/k/v and on diffusers (like for like), then
   regional `speed.compile_blocks` on ours + switches, at batch 1 then 8 (`--compiled`, `--compiled-batches`),
   with the compile time (first call).

diffusers is optional: without it the comparison rows are skipped with a note that gives the import error. The
UNet has no image conditioning (`UNET_PRESETS["sd15"]`); both implementations get the same weights (diffusers'
state dict renamed in memory), and the max relative output difference is reported. The JSON is rewritten after
every row, and a row that fails is recorded in the notes with its error, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from _common import interleaved, machine_info, markdown_table, rel_err, sync, write_json  # noqa: E402

from latent_diffusion import speed  # noqa: E402
from latent_diffusion.layers import rename_keys  # noqa: E402
from latent_diffusion.models import AUTOENCODER_PRESETS, UNET_PRESETS, AutoencoderKL, UNet, UNetConfig  # noqa: E402
from latent_diffusion.models.autoencoder import DIFFUSERS_VAE_RULES  # noqa: E402
from latent_diffusion.models.unet import DIFFUSERS_UNET_RULES  # noqa: E402

try:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    DIFFUSERS_ERROR = None
except ImportError as e:  # diffusers itself, or one of its needs (Pillow, huggingface_hub, ...)
    diffusers, DIFFUSERS_ERROR = None, repr(e)

TINY_UNET = UNetConfig(channels=(32, 64), attention_levels=(True, True), layers_per_block=1, heads=(2, 2),
                       transformer_depth=(1, 1), context_dim=32, norm_groups=8)


class Budget:
    """Wall-clock budget: sections check `left()` before starting work they cannot finish."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)


class Record:
    """The run's results, rewritten to `path` after every row; `attempt` runs one row, noting a failure."""

    def __init__(self, path: Path, results: dict[str, Any]):
        self.path, self.results = path, results

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.results.setdefault(section, []).append(row)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        write_json(tmp, self.results, quiet=True)
        tmp.replace(self.path)

    def attempt(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), or None after noting `what` failed (the traceback goes to stderr); CUDA memory is freed."""
        try:
            return fn(*args)
        except Exception as e:  # a failing row must not lose the others
            traceback.print_exc()
            self.results["notes"].append(f"{what} failed: {e!r}"[:500])
            self.save()
            return None
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def diffusers_unet_config(c: UNetConfig) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` kwargs of one of our UNet configs (no image conditioning)."""
    n = len(c.channels)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.attention_levels)]
    return dict(in_channels=c.in_channels, out_channels=c.out_channels, block_out_channels=list(c.channels),
                down_block_types=down, up_block_types=up, layers_per_block=c.layers_per_block,
                attention_head_dim=list(c.heads) if n else 8, cross_attention_dim=c.context_dim,
                norm_num_groups=c.norm_groups, norm_eps=c.norm_eps, sample_size=64)


def diffusers_vae_config(c: Any) -> dict[str, Any]:
    n = len(c.channels)
    return dict(block_out_channels=list(c.channels), layers_per_block=c.layers_per_block,
                norm_num_groups=c.norm_groups, latent_channels=c.latent_channels,
                down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                mid_block_add_attention=c.mid_attention)


def build_unets(config: UNetConfig, device: torch.device, dtype: torch.dtype) -> tuple[UNet, Any]:
    """(ours, diffusers or None) with identical weights, built directly on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = UNet(config)
        ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(config)) if diffusers else None
    if ref is not None:
        ours.load_state_dict(rename_keys(ref.state_dict(), DIFFUSERS_UNET_RULES))
        ref.to(dtype).eval()
    return ours.to(dtype).eval(), ref


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """Measured matmul throughput (TFLOP/s) of an n×n×n product: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def inference_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, config: UNetConfig,
                      budget: Budget, notes: list[str], record: Record) -> None:
    ours, ref = build_unets(config, device, dtype)
    fast = speed.apply_speed(copy.deepcopy(ours), channels_last=True, fuse=True)
    for batch in args.batches:
        g = torch.Generator(device="cpu").manual_seed(batch)
        x = torch.randn(2 * batch, config.in_channels, args.latent, args.latent, generator=g).to(device, dtype)
        t = torch.full((2 * batch,), 500.0, device=device)
        ctx = torch.randn(2 * batch, args.tokens, config.context_dim, generator=g).to(device, dtype)
        a = (x, t, ctx)
        fns: dict[str, Callable[[], Any]] = {"ours": lambda m=ours, a=a: m(*a),
                                             "ours+switches": lambda m=fast, a=a: m(*a)}
        try:
            graphed = speed.capture_cuda_graph(fast, *a)
            fns["ours+switches+CUDA graph"] = lambda m=graphed, a=a: m(*a)
        except RuntimeError as e:
            if batch == args.batches[0]:
                notes.append(f"CUDA graph rows skipped: {e}")
        if ref is not None:
            fns["diffusers"] = lambda a=a: ref(*a).sample
        with torch.no_grad():
            err = {k: rel_err(fn(), ref(*a).sample) for k, fn in fns.items() if ref is not None and k != "diffusers"}
            timing = interleaved(fns, repeats=args.repeats, iters=args.iters, device=device)
        for name, tm in timing.items():
            record.add("inference", {"batch": batch, "unet_batch": 2 * batch, "impl": name, "ms": tm["median_ms"],
                                     "it_per_s": 1e3 / tm["median_ms"], "max_rel_diff": err.get(name)})
        print(f"  inference batch {batch}: " + ", ".join(f"{k} {1e3 / v['median_ms']:.1f} it/s"
                                                        for k, v in timing.items()), flush=True)
        if budget.left() < 60:
            notes.append(f"inference stopped after batch {batch}: budget")
            break


class LowPrecisionGroupNorm(torch.nn.GroupNorm):
    """GroupNorm in its input's dtype under autocast (statistics still accumulate in fp32 inside the kernel);
    autocast would run it, and so the SiLU after it, in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class LowPrecisionLayerNorm(torch.nn.LayerNorm):
    """LayerNorm in its input's dtype under autocast (see LowPrecisionGroupNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def low_precision_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the class of every affine GroupNorm/LayerNorm (weights untouched): the `+lpnorm` training probe."""
    for m in model.modules():
        if type(m) is torch.nn.GroupNorm and m.affine:
            m.__class__ = LowPrecisionGroupNorm
        elif type(m) is torch.nn.LayerNorm and m.elementwise_affine and m.bias is not None:
            m.__class__ = LowPrecisionLayerNorm
    return model


def attention_context(impl: str, device: torch.device) -> Callable[[], Any]:
    """A factory of the SDPA-backend context of each step: for the `+flash` probe flash, memory-efficient, then
    math, never cuDNN's kernel (which torch ≥ 2.9 tries first on Hopper with a recent cuDNN); otherwise torch's
    own choice."""
    if "+flash" not in impl:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return lambda: sdpa_kernel(order if device.type == "cuda" else [SDPBackend.MATH], set_priority=True)


def sdpa_backends() -> dict[str, Any]:
    """cuDNN's version and SDPA's backend priority order (after a first CUDA SDPA call), for the record."""
    info: dict[str, Any] = {"cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    order = getattr(torch._C, "_get_sdp_priority_order", None)
    if order is not None:
        from torch.nn.attention import SDPBackend

        names = {int(v): k for k, v in SDPBackend.__members__.items()}  # a pybind11 enum: not iterable
        info["sdpa_priority"] = [names.get(int(b), str(b)) for b in order()]
    return info


def train_step_fn(model: torch.nn.Module, is_ref: bool, device: torch.device, batch: int, latent: int,
                  tokens: int, context_dim: int,
                  attention: Callable[[], Any] = contextlib.nullcontext,
                  ) -> tuple[Callable[[], torch.Tensor], torch.optim.Optimizer]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    target = torch.randn(x.shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    ctx = torch.randn(batch, tokens, context_dim, generator=g).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    autocast = speed.bf16_autocast(device, enabled=device.type == "cuda")

    def step() -> torch.Tensor:
        with attention():  # the backward too: gradient checkpointing recomputes attention there
            with autocast:
                out = model(x, t, ctx)
                out = out.sample if is_ref else out
                loss = F.mse_loss(out.float(), target)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def training_section(args: argparse.Namespace, device: torch.device, config: UNetConfig, peak_tflops: float,
                     budget: Budget, notes: list[str], record: Record) -> None:
    """Training-step rows; with `--train-profile` the operator table of each eager implementation goes into
    the record's `train_profiles`."""
    impls = [i for i in args.train_impls if i != "diffusers" or diffusers]
    if args.train_compile:  # whole-model torch.compile on both, like for like; no checkpointing rows
        impls += [f"{impl}+compile" for impl in impls]
    flops: dict[str, float] = {}
    for impl in impls:
        base = impl.removesuffix("+compile")
        # checkpointing rows only for eager implementations, and not with --train-compile (budget for the compiles)
        for ckpt in (False, True) if impl == base and args.train_checkpointing and not args.train_compile else (False,):
            if budget.left() < (args.compile_gate_s if impl != base else 45):
                notes.append(f"training {impl} checkpointing={ckpt} skipped: budget")
                continue
            record.attempt(f"training {impl} checkpointing={ckpt}", training_row, args, device, config, peak_tflops,
                           impl, base, ckpt, flops, record)


def training_row(args: argparse.Namespace, device: torch.device, config: UNetConfig, peak_tflops: float, impl: str,
                 base: str, ckpt: bool, flops: dict[str, float], record: Record) -> None:
    """One training row (`impl` with or without gradient checkpointing), added to `record`."""
    from torch.utils.flop_counter import FlopCounterMode

    ours, ref = build_unets(config, device, torch.float32)
    model = ref if base == "diffusers" else speed.apply_speed(ours, channels_last=base == "ours+switches", fuse=True)
    if "+lpnorm" in base:
        low_precision_norms(model)
    del ours, ref
    model.train()
    if ckpt:
        model.enable_gradient_checkpointing()
    if impl != base:  # --tiny only traces with dynamo (backend="eager"): the logic without C++ builds
        model = torch.compile(model, **({"backend": "eager"} if args.tiny else {}))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step, opt = train_step_fn(model, base == "diffusers", device, args.train_batch, args.latent,
                              args.tokens, config.context_dim, attention_context(base, device))
    start = time.perf_counter()
    first_loss = step().item()  # compiles, for a compiled model
    compile_s = time.perf_counter() - start if impl != base else None
    if not ckpt and impl == base and impl not in flops:  # model FLOPs (no recomputation), on a real step
        with FlopCounterMode(display=False) as counter:
            step()
        flops[impl] = counter.get_total_flops()
    timing = interleaved({impl: step}, repeats=args.train_repeats, iters=args.train_iters, warmup=1,
                         device=device)[impl]
    step_s = timing["median_ms"] / 1e3
    if args.train_profile and not ckpt and impl == base:
        table, kinds = profile_step(step, device)
        record.results["train_profiles"][impl] = table
        record.results["train_profile_kinds"][impl] = {"step_ms": timing["median_ms"], **kinds}
        print(table, flush=True)
        print(f"  {impl}: device time by kind (ms) {kinds}, step {timing['median_ms']:.1f} ms", flush=True)
    useful = flops.get(base, next(iter(flops.values()), 0))  # compiled: the eager model's FLOPs
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    record.add("training", {"impl": impl, "gradient_checkpointing": ckpt, "ms_per_step": timing["median_ms"],
                            "samples_per_s": args.train_batch / step_s, "tflops_per_step": useful / 1e12,
                            "mfu": useful / step_s / (peak_tflops * 1e12), "peak_mem_gib": peak_mem,
                            "compile_s": compile_s, "first_loss": first_loss})
    print(f"  training {impl} ckpt={ckpt}: {timing['median_ms']:.1f} ms/step, "
          f"{args.train_batch / step_s:.1f} samples/s, MFU {record.results['training'][-1]['mfu']:.3f}, "
          f"peak {peak_mem if peak_mem is None else round(peak_mem, 1)} GiB, first loss {first_loss:.5f}",
          flush=True)


# operator name fragments → kind, first match wins (aten names, forward and backward)
OP_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "_attention")),
    ("convolution", ("conv",)),
    ("matmul", ("mm", "linear", "matmul")),
    ("norm", ("norm",)),
    ("optimizer", ("adam", "foreach")),
    ("copies", ("copy", "clone", "contiguous", "aten::cat", "aten::stack")),
)


def op_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, keys in OP_KINDS if any(k in name for k in keys)), "other")


def profile_step(step: Callable[[], Any], device: torch.device, top: int = 40) -> tuple[str, dict[str, float]]:
    """(the `top` operators of one call of `step` by self device time (CPU time on a CPU), as a table; that time
    in ms summed by `op_kind` over all operators, with the total)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    kinds: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU:  # operators; their kernels' time is their self time
            kinds[op_kind(e.key)] = kinds.get(op_kind(e.key), 0.0) + getattr(e, key) / 1e3
    kinds = {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
    kinds["total"] = round(sum(kinds.values()), 3)
    return events.table(sort_by=key, row_limit=top, max_name_column_width=100), kinds


def vae_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, record: Record) -> None:
    config = AUTOENCODER_PRESETS["tiny" if args.tiny else "sd"]
    torch.manual_seed(0)
    with torch.device(device):
        ours = AutoencoderKL(config)
        ref = diffusers.AutoencoderKL(**diffusers_vae_config(config)) if diffusers else None
    if ref is not None:
        ours.load_state_dict(rename_keys(ref.state_dict(), DIFFUSERS_VAE_RULES))
        ref.to(dtype).eval()
    ours = ours.to(dtype).eval()
    fast = speed.apply_channels_last(copy.deepcopy(ours))
    transposed = speed.transposed_upsample(copy.deepcopy(ours))
    f = config.downsample_factor
    z = torch.randn(1, config.latent_channels, args.vae_size // f, args.vae_size // f, device=device, dtype=dtype)
    fns = {"ours": lambda: ours.decode(z), "ours+channels_last": lambda: fast.decode(z),
           "ours+transposed_upsample": lambda: transposed.decode(z)}
    if ref is not None:
        fns["diffusers"] = lambda: ref.decode(z).sample
    with torch.no_grad():
        err = {k: rel_err(fn(), ref.decode(z).sample) for k, fn in fns.items() if ref is not None and k != "diffusers"}
        timing = interleaved(fns, repeats=args.repeats, iters=args.iters, device=device)
    print("  VAE decode: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in timing.items()), flush=True)
    for k, v in timing.items():
        record.add("vae", {"impl": k, "size": args.vae_size, "ms": v["median_ms"], "max_rel_diff": err.get(k)})


def compiled_section(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, config: UNetConfig,
                     budget: Budget, notes: list[str], record: Record) -> None:
    ours, ref = build_unets(config, device, dtype)
    # --tiny traces with dynamo only (backend="eager"): the logic without minutes of C++ compilation on CPU.
    kwargs = {"backend": "eager"} if args.tiny else {}
    # The whole-model compile is the like-for-like comparison (diffusers' documented way); the regional compile
    # (training's `optim.compile`) trades steady-state speed for compile time and comes last.
    models = {}
    if "full" in args.compiled:
        models["ours+fuse+torch.compile"] = torch.compile(speed.apply_speed(copy.deepcopy(ours), fuse=True), **kwargs)
        if ref is not None:
            models["diffusers+torch.compile"] = torch.compile(ref, **kwargs)
    if "blocks" in args.compiled:
        models["ours+switches+compile_blocks"] = speed.compile_blocks(
            speed.apply_speed(ours, channels_last=True, fuse=True), **kwargs)
    for batch in args.compiled_batches or args.batches:
        g = torch.Generator(device="cpu").manual_seed(batch)
        x = torch.randn(2 * batch, config.in_channels, args.latent, args.latent, generator=g).to(device, dtype)
        t = torch.full((2 * batch,), 500.0, device=device)
        ctx = torch.randn(2 * batch, args.tokens, config.context_dim, generator=g).to(device, dtype)
        fns, compile_s = {}, {}
        for name, m in models.items():
            if budget.left() < args.compile_gate_s:
                notes.append(f"compiled {name} at batch {batch} skipped: budget")
                continue
            a = (x, t, ctx)
            call = (lambda m=m, a=a: m(*a).sample) if name.startswith("diffusers") else (lambda m=m, a=a: m(*a))

            def first(call: Callable[[], Any] = call) -> float:
                t0 = time.perf_counter()
                with torch.no_grad():
                    call()
                sync(device)
                return time.perf_counter() - t0

            seconds = record.attempt(f"compiled {name} batch {batch}", first)
            if seconds is None:
                continue
            print(f"  compiled {name} batch {batch}: first call {seconds:.1f} s", flush=True)
            compile_s[name], fns[name] = seconds, call
            # timed alone at once, so that a later compile that overruns the call's limit does not lose it
            with torch.no_grad():
                alone = interleaved({name: call}, repeats=args.repeats, iters=args.iters, device=device)[name]
            record.add("compiled", {"batch": batch, "impl": name, "compile_s": seconds, "timed": "alone",
                                    "ms": alone["median_ms"], "it_per_s": 1e3 / alone["median_ms"]})
        if len(fns) > 1:  # then side by side, interleaved
            with torch.no_grad():
                timing = interleaved(fns, repeats=args.repeats, iters=args.iters, device=device)
            for name, tm in timing.items():
                record.add("compiled", {"batch": batch, "impl": name, "compile_s": compile_s[name],
                                        "timed": "interleaved", "ms": tm["median_ms"],
                                        "it_per_s": 1e3 / tm["median_ms"]})
            print(f"  compiled batch {batch}: " + ", ".join(f"{k} {1e3 / v['median_ms']:.1f} it/s"
                                                         for k, v in timing.items()), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny models, fp32, 1–2 iterations")
    parser.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget of the whole run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["inference", "training", "vae", "compiled"])
    parser.add_argument("--compiled", nargs="*", default=["full", "blocks"], choices=["full", "blocks"],
                        help="compiled section: whole-model torch.compile (as diffusers) and regional compile_blocks")
    parser.add_argument("--train-compile", action="store_true",
                        help="training section: also whole-model torch.compile on ours and diffusers (MFU); the "
                             "eager rows then skip gradient checkpointing")
    parser.add_argument("--train-impls", nargs="+", default=["ours+switches", "diffusers"],
                        choices=["ours+switches", "ours+fuse", "ours+fuse+lpnorm", "ours+fuse+flash", "diffusers"],
                        help="training section: the implementations timed (ours+fuse: NCHW, fused q/k/v; "
                             "+lpnorm: norms in bf16; +flash: SDPA without cuDNN's attention kernel)")
    parser.add_argument("--no-train-checkpointing", dest="train_checkpointing", action="store_false",
                        help="training section: no gradient-checkpointing rows")
    parser.add_argument("--compile-gate-s", type=float, default=100.0,
                        help="start a compile only with this many seconds of the budget left")
    parser.add_argument("--train-profile", action="store_true",
                        help="training section: print the top operators of one eager step of each implementation")
    parser.add_argument("--compiled-batches", nargs="*", type=int, default=None,
                        help="batches of the compiled section (default: those of the inference section)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu.json")
    args = parser.parse_args(argv)
    if args.tiny:
        device, dtype, config = torch.device("cpu"), torch.float32, TINY_UNET
        args.batches, args.latent, args.tokens, args.train_batch, args.vae_size = [1, 2], 8, 8, 2, 32
        args.repeats, args.iters, args.train_repeats, args.train_iters, peak_n = 1, 1, 1, 2, 256
        if args.out == parser.get_default("out"):
            args.out = Path("/tmp/gpu_tiny.json")
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --tiny on a CPU")
        device, dtype, config = torch.device("cuda"), torch.bfloat16, UNET_PRESETS["sd15"]
        args.batches, args.latent, args.tokens, args.train_batch, args.vae_size = [1, 8], 64, 77, 16, 512
        args.repeats, args.iters, args.train_repeats, args.train_iters, peak_n = 3, 10, 2, 5, 8192
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    budget = Budget(args.budget_s)
    notes: list[str] = [] if diffusers else [f"diffusers could not be imported ({DIFFUSERS_ERROR}): comparison "
                                             "rows skipped"]
    info = machine_info(device)
    print(f"{info.get('gpu', info['cpu'])}, torch {info['torch']}, diffusers {info['diffusers']}", flush=True)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in UNet(config).parameters())
    record = Record(args.out, {"machine": info, "unet_params": n_params, "dtype": str(dtype), "notes": notes,
                               "train_profiles": {}, "train_profile_kinds": {}})
    results = record.results

    peak = matmul_peak(device, dtype, peak_n, 50 if not args.tiny else 2)
    results["peak_tflops"] = peak
    if device.type == "cuda":  # after a first SDPA call, so that the priority order is the one in use
        with torch.no_grad():
            q = torch.randn(1, 8, 64, 40, device=device, dtype=dtype)
            F.scaled_dot_product_attention(q, q, q)
        results["sdpa"] = record.attempt("recording SDPA's backends", sdpa_backends)
    record.save()
    print(f"  peak {dtype} matmul {peak_n}³: {peak:.1f} TFLOP/s; {results.get('sdpa')}", flush=True)
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("inference", lambda: inference_section(args, device, dtype, config, budget, notes, record)),
        ("training", lambda: training_section(args, device, config, peak, budget, notes, record)),
        ("vae", lambda: vae_section(args, device, dtype, record)),
        ("compiled", lambda: compiled_section(args, device, dtype, config, budget, notes, record)),
    ]
    for name, run in sections:
        if name in args.skip:
            continue
        if budget.left() < 30:
            notes.append(f"section {name} skipped: budget")
            continue
        record.attempt(f"section {name}", run)
    results["elapsed_s"] = args.budget_s - budget.left()

    print()
    if results.get("inference"):
        print(markdown_table(["batch (CFG ×2)", "impl", "it/s", "max rel diff"],
                             [[r["batch"], r["impl"], r["it_per_s"], r["max_rel_diff"]] for r in results["inference"]]))
    if results.get("training"):
        print(markdown_table(["impl", "grad ckpt", "ms/step", "samples/s", "MFU", "peak GiB", "compile s",
                              "first loss"],
                             [[r["impl"], r["gradient_checkpointing"], r["ms_per_step"], r["samples_per_s"], r["mfu"],
                               r["peak_mem_gib"], r.get("compile_s"), r["first_loss"]] for r in results["training"]]))
    if results.get("vae"):
        print(markdown_table(["VAE decode", "ms", "max rel diff"],
                             [[r["impl"], r["ms"], r["max_rel_diff"]] for r in results["vae"]]))
    if results.get("compiled"):
        print(markdown_table(["batch (CFG ×2)", "impl", "timed", "compile s", "it/s"],
                             [[r["batch"], r["impl"], r["timed"], r["compile_s"], r["it_per_s"]]
                              for r in results["compiled"]]))
    for note in notes:
        print("note:", note)
    record.save()
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
