"""Speed switches, applied from outside the model code (the torchtitan way): the models stay fp32, eager and
plain; each function here changes how an existing model runs, never what it computes beyond float rounding.

    from latent_diffusion import speed
    unet = speed.apply_speed(unet, channels_last=True, fuse=True)            # CPU and GPU
    unet = speed.onednn_linear(unet)                                           # CPU: GEMMs through oneDNN
    unet = speed.compile_blocks(unet)                                          # regional torch.compile
    with speed.bf16_autocast("cuda"):                                          # GPU mixed precision
        ...
    step = speed.capture_cuda_graph(fn, x, sigma)                              # CUDA only, fixed shapes

Already elsewhere: `layers.set_attention_backend` (sdpa / xformers / math), `UNet.enable_gradient_checkpointing`,
the fused AdamW of `training.loop.make_optimizer` (CUDA) and `decoder.cache` (precomputed latents and CLIP
features) in training. Measured effects are in BENCHMARKS.md.

State dicts never change: a model with fused projections still saves and loads the canonical `to_q` / `to_k`
/ `to_v` keys (see `fuse_qkv`), so `save_pretrained` writes folders any unfused model (or `from_diffusers`
key map) reads, and `compile_blocks` uses `nn.Module.compile`, which adds no `_orig_mod.` prefixes.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from latent_diffusion.layers import Attention, AttentionBackend, ResBlock, Upsample, set_attention_backend

# --- channels_last -----------------------------------------------------------------------------------------


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D weight in channels_last (NHWC) order, so convolutions (oneDNN on CPU, cuDNN on GPUs)
    run without layout reorders and the UNet's (B, C, H, W) -> (B, H·W, C) token views cost no copy.

    Inputs may stay NCHW: a convolution with channels_last weights returns channels_last activations. The
    outputs of the model (and of an autoencoder's encoder and decoder) are made contiguous again by a
    forward hook, so callers see ordinary tensors. Returns `model` (changed in place)."""
    model.to(memory_format=torch.channels_last)
    targets = [model] + [getattr(model, name) for name in ("encoder", "decoder")
                         if isinstance(getattr(model, name, None), nn.Module)]
    for m in targets:
        if not getattr(m, "_channels_last_hook", None):
            m._channels_last_hook = m.register_forward_hook(_contiguous_output)
    return model


def _contiguous_output(module: nn.Module, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.ndim == 4:
        return output.contiguous()
    return output


# --- fused QKV projections ---------------------------------------------------------------------------------
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}


def fuse_qkv(model: nn.Module, cross_attention: bool = True) -> nn.Module:
    """Replace the q/k/v projections of every self-attention layer by one Linear `to_qkv` (one GEMM instead of
    three, forward and backward), and, when `cross_attention`, the k/v projections of every cross-attention
    layer by one `to_kv`.

    The state dict keeps the unfused layout: `state_dict()` splits `to_qkv` back into `to_q`/`to_k`/`to_v`
    (copies, so safetensors never sees shared storage), and `load_state_dict` accepts those keys and
    concatenates them. Hence `save_pretrained`, `from_pretrained`, EMA and Accelerate checkpoints work
    unchanged and stay interchangeable with unfused models. Fuse before building the optimizer (the
    parameters are new objects) and before FSDP wrapping (the state-dict hooks are untested on sharded
    DTensors). Fusion and LoRA adapters do not combine: the adapters wrap `to_q`/`to_k`/`to_v` by name, so a
    model carrying them is refused (ValueError). Returns `model` (changed in place); `unfuse_qkv` undoes it."""
    wrapped = [name for name, m in model.named_modules() if isinstance(m, Attention)
               and any(not isinstance(getattr(m, n, None), nn.Linear) for n in ("to_q", "to_k", "to_v")
                       if getattr(m, n, None) is not None)]
    if wrapped:
        more = f" and {len(wrapped) - 1} more attention layers" if len(wrapped) > 1 else ""
        raise ValueError(f"fuse_qkv: the q/k/v projections of {wrapped[0]!r}{more} are wrapped, by LoRA adapters "
                         "say; fused projections would drop them. Leave fusion off for a model with LoRA, or bake "
                         "the LoRA in first (pipe.fuse_lora(), then pipe.unload_lora())")
    for m in list(model.modules()):
        if not isinstance(m, Attention) or m.to_qkv is not None or m.to_kv is not None:
            continue
        if not m.is_cross_attention:
            _fuse(m, "to_qkv")
        elif cross_attention:
            _fuse(m, "to_kv")
    return model


def unfuse_qkv(model: nn.Module) -> nn.Module:
    """Undo `fuse_qkv`: split every `to_qkv` / `to_kv` back into separate Linears. Returns `model`."""
    for m in list(model.modules()):
        if isinstance(m, Attention):
            for target in _FUSED:
                if getattr(m, target) is not None:
                    _unfuse(m, target)
    return model


def is_fused(model: nn.Module) -> bool:
    """True when some attention layer of `model` has fused projections."""
    return any(isinstance(m, Attention) and (m.to_qkv is not None or m.to_kv is not None)
               for m in model.modules())


def _fuse(m: Attention, target: str) -> None:
    names = _FUSED[target]
    parts: list[nn.Linear] = [getattr(m, n) for n in names]
    first = parts[0]
    fused = _linear_class(first)(first.in_features, sum(p.out_features for p in parts),
                                 bias=first.bias is not None, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    fused.requires_grad_(first.weight.requires_grad)
    for n in names:
        delattr(m, n)
    setattr(m, target, fused)
    m._fused_hooks = (m.register_state_dict_post_hook(_split_state(target)),
                      m.register_load_state_dict_pre_hook(_join_state(target)))


def _unfuse(m: Attention, target: str) -> None:
    fused: nn.Linear = getattr(m, target)
    names = _FUSED[target]
    weights = fused.weight.detach().chunk(len(names))
    biases = fused.bias.detach().chunk(len(names)) if fused.bias is not None else [None] * len(names)
    for n, w, b in zip(names, weights, biases):
        layer = _linear_class(fused)(fused.in_features, w.shape[0], bias=b is not None, device=w.device,
                                     dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)
        layer.requires_grad_(fused.weight.requires_grad)
        setattr(m, n, layer)
    setattr(m, target, None)
    for handle in m.__dict__.pop("_fused_hooks", ()):
        handle.remove()
    # Registration order fixes state-dict order: put the projections back where they were.
    m._modules = {k: m._modules[k] for k in sorted(m._modules, key=_canonical_position)}


def _linear_class(layer: nn.Module) -> type[nn.Linear]:
    """The class a fused or split projection gets: `OneDNNLinear` stays `OneDNNLinear` (see `onednn_linear`)."""
    return OneDNNLinear if type(layer) is OneDNNLinear else nn.Linear


_CANONICAL = ("to_q", "to_k", "to_v", "to_out")


def _canonical_position(name: str) -> int:
    return _CANONICAL.index(name) if name in _CANONICAL else len(_CANONICAL)


def _split_state(target: str) -> Callable[..., None]:
    names = _FUSED[target]

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        # This module's keys are the last ones added so far: take them out and put them back split, in the
        # unfused model's order, so the whole state dict matches an unfused model's key for key.
        own = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        for kind in ("weight", "bias"):
            fused = own.pop(f"{prefix}{target}.{kind}", None)
            if fused is not None:
                for n, part in zip(names, fused.detach().chunk(len(names))):
                    own[f"{prefix}{n}.{kind}"] = part.clone()
        rank = {f"{prefix}{n}.{kind}": 2 * i + j for i, n in enumerate(_CANONICAL)
                for j, kind in enumerate(("weight", "bias"))}
        state.update(sorted(own.items(), key=lambda kv: rank.get(kv[0], len(rank))))

    return hook


def _join_state(target: str) -> Callable[..., None]:
    names = _FUSED[target]

    def hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{n}.{kind}" for n in names]
            if all(k in state for k in keys):  # otherwise strict loading names what is missing
                state[f"{prefix}{target}.{kind}"] = torch.cat([state.pop(k) for k in keys])

    return hook


# --- oneDNN linear layers (CPU) -----------------------------------------------------------------------------
# Below these sizes MKL's own GEMM is as fast or faster (measured on the development CPU, BENCHMARKS.md).
ONEDNN_MIN_ROWS = 256
ONEDNN_MIN_MACS = 1 << 23


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` that runs fp32 CPU GEMMs as a 1×1 convolution through oneDNN.

    x: (..., K), weight: (N, K), bias: (N,) or None -> (..., N). The M = x.numel() / K rows of x, viewed as
    a (1, K, M, 1) image in channels_last order, are the same buffer (no copy), and so is the (1, N, M, 1)
    channels_last output: oneDNN computes exactly the GEMM x @ weight.T + bias, forward and backward. Why: on
    CPUs where MKL's sgemm takes its AVX2 path (e.g. AMD EPYC, even with AVX-512), oneDNN's AVX-512 kernels
    are up to 2× faster. Anything else (other devices or dtypes, small GEMMs, CPU autocast, oneDNN switched
    off, torch.compile tracing) goes to `F.linear`."""
    K = x.shape[-1]
    rows = x.numel() // K if K else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or rows < ONEDNN_MIN_ROWS or rows * K * weight.shape[0] < ONEDNN_MIN_MACS
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)):
        return F.linear(x, weight, bias)
    image = x.reshape(1, rows, 1, K).permute(0, 3, 1, 2)  # (1, K, M, 1), channels_last strides
    out = F.conv2d(image, weight[:, :, None, None], bias)  # (1, N, M, 1), channels_last
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` whose forward is `speed.linear` (same parameters and state dict); see `onednn_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def onednn_linear(model: nn.Module) -> nn.Module:
    """Run the fp32 CPU GEMMs of every `nn.Linear` of `model` (ours, and transformers' CLIP) through oneDNN
    (`speed.linear`): each plain `nn.Linear` becomes an `OneDNNLinear`, in place. Parameters, state-dict keys
    and results (to float rounding) are unchanged, so optimizers, EMA, checkpoints, LoRA and fused q/k/v
    (`fuse_qkv` keeps the class of the layers it fuses) work as before; on GPUs, in other dtypes and under
    autocast it changes nothing. torch.fx cannot trace the swapped layers (their forward branches on the input);
    trace before switching. Returns `model`; `default_linear` undoes it."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
    return model


def default_linear(model: nn.Module) -> nn.Module:
    """Undo `onednn_linear`: every `OneDNNLinear` of `model` becomes a plain `nn.Linear` again. Returns `model`."""
    for m in model.modules():
        if type(m) is OneDNNLinear:
            m.__class__ = nn.Linear
    return model


# --- upsampling as a transposed convolution ---------------------------------------------------------------


def phase_kernel(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) kernel w of "nearest ×2 upsampling, then 3×3 convolution (padding 1)" -> the (O, I, 4, 4)
    kernel K of the equal stride-2, padding-1 transposed convolution: K = P w Pᵀ along both spatial axes.

    Along one axis the output row 2i reads input rows i-1, i, i (taps w0 | w1 + w2) and row 2i+1 reads rows
    i, i, i+1 (taps w0 + w1 | w2); the transposed convolution writes input row i to output row 2i + k - 1 with
    tap k, hence K = [w2, w1 + w2, w0 + w1, w0] (the resize-convolution / sub-pixel convolution identity:
    Odena et al. 2016; Shi et al. 2016)."""
    def along(w: torch.Tensor, dim: int) -> torch.Tensor:  # built from the weights: no host-to-device copy
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim)

    return along(along(weight, -2), -1)


class TransposedUpsample(Upsample):
    """An `Upsample` computed, for inputs of at least `min_pixels` pixels B·H·W, as one stride-2 transposed
    convolution with the kernel `phase_kernel(weight)`: each output pixel of a given (row, column) parity sees
    only 2×2 distinct input pixels, so it costs 16 instead of 36 multiply-adds per input pixel and channel pair,
    and the upsampled tensor is never built. Same parameters and state dict; see `transposed_upsample`."""

    min_pixels: int = 1024

    def forward(self, x: torch.Tensor, size: tuple[int, int] | int | None = None) -> torch.Tensor:
        B, _, H, W = x.shape
        if B * H * W >= self.min_pixels and (size is None or _pair(size) == (2 * H, 2 * W)):
            return F.conv_transpose2d(x, phase_kernel(self.weight).transpose(0, 1), self.bias, stride=2, padding=1)
        return super().forward(x, size)


def transposed_upsample(model: nn.Module, min_pixels: int | None = 1024) -> nn.Module:
    """Compute every `layers.Upsample` (nearest ×2, then 3×3 convolution) of `model` whose input holds at least
    `min_pixels` pixels (batch × height × width) as one stride-2 transposed convolution: each becomes a
    `TransposedUpsample`, in place — the same function with 16/36 of the multiply-adds, forward and backward.
    On the development CPU oneDNN's transposed convolution pays from about 512 input pixels on in NCHW and
    1,024 under channels_last (below, it is slower than the plain path; BENCHMARKS.md), hence the default.
    `min_pixels=None` turns them back into plain `Upsample`s. Parameters and state dicts are unchanged. Returns
    `model`."""
    if min_pixels is not None and min_pixels < 1:
        raise ValueError(f"min_pixels={min_pixels} must be a positive number of pixels, or None to switch off")
    for m in model.modules():
        if isinstance(m, Upsample):
            if min_pixels is None:
                m.__class__ = Upsample
                m.__dict__.pop("min_pixels", None)
            else:
                m.__class__ = TransposedUpsample
                m.min_pixels = min_pixels
    return model


# --- regional torch.compile --------------------------------------------------------------------------------


def block_types() -> tuple[type[nn.Module], ...]:
    """The repeated blocks `compile_blocks` compiles: ResBlocks, the UNet's spatial transformers, the
    autoencoder's mid attention and the prior's transformer blocks."""
    from latent_diffusion.models import autoencoder, prior, unet

    found = [ResBlock, unet.SpatialTransformer, autoencoder.SpatialSelfAttention,
             getattr(prior, "PriorBlock", None)]
    return tuple(t for t in found if t is not None)


def compile_blocks(model: nn.Module, types: Iterable[type[nn.Module]] | None = None,
                   **compile_kwargs: Any) -> nn.Module:
    """Regional compilation: `torch.compile` each repeated block (`block_types()` unless `types`) in place
    with `nn.Module.compile`, rather than the whole model. Blocks of equal shapes share compiled code, compile
    time stays a fraction of a whole-model compile, gradient checkpointing still wraps the compiled blocks,
    and state-dict keys are unchanged. `compile_kwargs` go to `torch.compile` (e.g. mode="max-autotune").
    Compilation happens at the first call of each block; dynamo's per-function recompile limit is raised to
    fit one graph per block (a process-wide setting). Returns `model`."""
    types = tuple(types) if types is not None else block_types()
    blocks = [m for m in model.modules() if isinstance(m, types)]
    # Blocks of one class but different widths or resolutions each need their own graph; dynamo's default of
    # 8 graphs per code object would silently leave the rest eager.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 2 * len(blocks) + 8)
    for m in blocks:
        m.compile(**compile_kwargs)
    return model


# --- attention backend, mixed precision --------------------------------------------------------------------


def best_attention_backend(device: torch.device | str) -> AttentionBackend:
    """`xformers` on CUDA when the package is installed, else `sdpa` (which picks flash / memory-efficient
    kernels itself on GPUs)."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("xformers") is not None:
        return "xformers"
    return "sdpa"


def bf16_autocast(device_type: str | torch.device, enabled: bool = True) -> torch.autocast:
    """Mixed precision for inference or training: matmuls and convolutions in bf16, reductions in fp32
    (`torch.autocast`). On GPUs, and on CPUs with native bf16 arithmetic (AVX512_BF16 or AMX), it is faster
    than fp32: the development CPU (AVX512_BF16) trains the base decoder UNet 1.33× and the VAE 1.70× faster
    (BENCHMARKS.md, "Training throughput"); on CPUs without bf16 instructions it is slower."""
    device_type = torch.device(device_type).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=enabled)


def apply_speed(model: nn.Module, *, channels_last: bool = False, fuse: bool = False, onednn: bool = False,
                upsample: bool = False, compile: bool = False, attention_backend: AttentionBackend | None = None,
                **compile_kwargs: Any) -> nn.Module:
    """Apply the chosen switches in the right order (fusion, then oneDNN linears, then compilation); `upsample`
    is `transposed_upsample` with its default size. `compile_kwargs` (`compile=True` only) go to `compile_blocks`
    (`types`) and `torch.compile` (mode, backend, ...); any other keyword is refused by name. Returns `model`."""
    if compile_kwargs:
        import inspect

        known = {"types"} | set(inspect.signature(torch.compile).parameters) - {"model"}
        unknown = sorted(set(compile_kwargs) - known)
        if unknown:
            switches = ["channels_last", "fuse", "onednn", "upsample", "compile", "attention_backend"]
            raise ValueError(f"unknown speed switch(es) {unknown}; the switches are {switches}, and with "
                             f"compile=True torch.compile's options {sorted(known)}")
        if not compile:
            raise ValueError(f"{sorted(compile_kwargs)}: options of the compilation (compile_blocks' types, "
                             "torch.compile's others), which apply with compile=True only")
    if attention_backend is not None:
        set_attention_backend(model, attention_backend)
    if fuse:
        fuse_qkv(model)
    if onednn:
        onednn_linear(model)
    if upsample:
        transposed_upsample(model)
    if channels_last:
        apply_channels_last(model)
    if compile:
        compile_blocks(model, **compile_kwargs)
    return model


# --- CUDA graphs -------------------------------------------------------------------------------------------


class CUDAGraphed:
    """`fn(*args)` captured once as a CUDA graph for fixed shapes; calling it copies the new tensor arguments
    into the captured input buffers and replays the graph (no Python or kernel-launch overhead per step).

    The result is the captured output buffer, overwritten by the next call: clone it to keep it. Only tensor
    arguments may change between calls, and only in value (same shape, dtype and device)."""

    def __init__(self, fn: Callable[..., torch.Tensor], *example_args: Any, warmup: int = 3):
        tensors = [a for a in example_args if isinstance(a, torch.Tensor)]
        if not torch.cuda.is_available() or not tensors or not all(t.is_cuda for t in tensors):
            where = sorted({str(t.device) for t in tensors}) or ["no tensor arguments"]
            raise RuntimeError(f"CUDA graphs need CUDA tensors on a CUDA machine; got {where} "
                               f"(torch.cuda.is_available()={torch.cuda.is_available()}). On CPU call the "
                               "function directly.")
        self.fn = fn
        self.static_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in example_args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # lets cuDNN/cuBLAS pick algorithms and allocate workspaces
                fn(*self.static_args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = fn(*self.static_args)

    def __call__(self, *args: Any) -> torch.Tensor:
        if len(args) != len(self.static_args):
            raise ValueError(f"captured with {len(self.static_args)} arguments, called with {len(args)}")
        for i, (new, static) in enumerate(zip(args, self.static_args)):
            if isinstance(static, torch.Tensor):
                if not isinstance(new, torch.Tensor) or new.shape != static.shape:
                    got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                    raise ValueError(f"argument {i}: captured shape {tuple(static.shape)}, got {got}")
                static.copy_(new)
            elif new != static:
                raise ValueError(f"argument {i}: non-tensor arguments are baked into the graph "
                                 f"(captured {static!r}, got {new!r})")
        self.graph.replay()
        return self.static_out


def capture_cuda_graph(fn: Callable[..., torch.Tensor], *example_args: Any, warmup: int = 3) -> CUDAGraphed:
    """Capture `fn(*example_args)` (e.g. a guided denoiser step or a UNet forward at a fixed batch and latent
    size) as a CUDA graph for fixed-shape sampling; see `CUDAGraphed`. Raises RuntimeError off CUDA."""
    return CUDAGraphed(fn, *example_args, warmup=warmup)
