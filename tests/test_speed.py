"""The speed switches of `latent_diffusion.speed` keep outputs, gradients and state dicts equal."""

import copy

import pytest
import torch

from latent_diffusion import speed
from latent_diffusion.layers import Attention, Upsample
from latent_diffusion.models import (
    AUTOENCODER_PRESETS,
    PRIOR_PRESETS,
    UNET_PRESETS,
    AutoencoderKL,
    DiffusionPrior,
    UNet,
)


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture()
def unet():
    torch.manual_seed(0)
    return randomize(UNet(UNET_PRESETS["tiny-unclip"]), 1).eval()


def unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([3.0, 700.0])[:batch],
            torch.randn(batch, 5, 32, generator=g), torch.randn(batch, 32, generator=g),
            torch.randn(batch, 32, generator=g))


def test_fuse_qkv_keeps_outputs_and_gradients(unet):
    fused = speed.fuse_qkv(copy.deepcopy(unet))
    attn = [m for m in fused.modules() if isinstance(m, Attention)]
    assert all(m.to_qkv is not None for m in attn if not m.is_cross_attention)
    assert all(m.to_kv is not None and m.to_q is not None for m in attn if m.is_cross_attention)
    assert not any(hasattr(m, "to_k") for m in attn)
    inputs = unet_inputs()
    out_ref, out = unet(*inputs), fused(*inputs)
    assert rel_err(out, out_ref) < 1e-5
    out_ref.square().mean().backward()
    out.square().mean().backward()
    block_ref, block = unet.down[1].attn[0].blocks[0], fused.down[1].attn[0].blocks[0]
    grads_ref = torch.cat([getattr(block_ref.attn1, n).weight.grad for n in ("to_q", "to_k", "to_v")])
    assert rel_err(block.attn1.to_qkv.weight.grad, grads_ref) < 1e-4
    grads_ref = torch.cat([getattr(block_ref.attn2, n).weight.grad for n in ("to_k", "to_v")])
    assert rel_err(block.attn2.to_kv.weight.grad, grads_ref) < 1e-4


def test_fuse_qkv_refuses_lora_adapters(unet):
    """LoRA wraps to_q/to_k/to_v by name: fusing would silently drop the adapters, so it is refused and the model
    is left as it was."""
    pytest.importorskip("peft")
    from latent_diffusion.lora import add_lora, lora_layers

    add_lora(unet, rank=2)
    for layer in lora_layers(unet):  # a non-zero update, so that dropping it would show
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    with torch.no_grad():
        before = unet(*unet_inputs())
    with pytest.raises(ValueError, match="LoRA"):
        speed.fuse_qkv(unet)
    with pytest.raises(ValueError, match="LoRA"):
        speed.apply_speed(unet, fuse=True)
    assert not speed.is_fused(unet)
    with torch.no_grad():
        assert torch.equal(unet(*unet_inputs()), before)


def test_lora_on_fused_projections_is_refused_with_the_order_to_use(unet, tmp_path):
    """The other order: adding or loading a LoRA into a fused model names the fusion, not a missing layer."""
    pytest.importorskip("peft")
    from latent_diffusion.lora import add_lora, load_lora_into, save_lora

    trained = copy.deepcopy(unet)
    add_lora(trained, rank=2)
    save_lora(tmp_path / "lora", {"decoder": trained})
    speed.fuse_qkv(unet)
    with pytest.raises(ValueError, match="fused q/k/v projections.*before fusing"):
        add_lora(unet, rank=2)
    with pytest.raises(ValueError, match="the decoder has fused q/k/v projections"):
        load_lora_into(unet, tmp_path / "lora" / "decoder", component="decoder")


def test_fused_state_dict_round_trips(unet, tmp_path):
    fused = speed.fuse_qkv(copy.deepcopy(unet))
    state, state_ref = fused.state_dict(), unet.state_dict()
    assert list(state) == list(state_ref)  # the canonical unfused keys, in the same order
    assert all(torch.equal(state[k], state_ref[k]) for k in state_ref)
    assert all(v.untyped_storage().data_ptr() != fused.down[1].attn[0].blocks[0].attn1.to_qkv.weight.data_ptr()
               for v in state.values())  # split copies: safetensors never sees shared storage
    # save_pretrained writes the unfused layout: a plain model loads it.
    fused.save_pretrained(tmp_path / "unet")
    plain = UNet.from_pretrained(tmp_path / "unet")
    inputs = unet_inputs()
    with torch.no_grad():
        assert torch.equal(plain(*inputs), unet(*inputs))
    # An unfused state dict loads strictly into a fused model (other weights, to see them arrive).
    other = randomize(UNet(UNET_PRESETS["tiny-unclip"]), 7).eval()
    fused.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_err(fused(*inputs), other(*inputs)) < 1e-5
    # A partial state dict still fails strictly, naming the unfused keys.
    broken = {k: v for k, v in other.state_dict().items() if not k.endswith("attn1.to_k.weight")}
    with pytest.raises(RuntimeError, match="to_k.weight|to_qkv.weight"):
        fused.load_state_dict(broken)
    # unfuse_qkv restores separate projections, equal weights and no hooks.
    speed.unfuse_qkv(fused)
    assert not speed.is_fused(fused)
    assert fused.down[1].attn[0].blocks[0].attn1.to_qkv is None
    with torch.no_grad():
        assert rel_err(fused(*inputs), other(*inputs)) < 1e-5
    assert list(fused.state_dict()) == list(other.state_dict())


def test_fused_self_attention_given_a_context_matches():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, qkv_bias=True)
    fused = speed.fuse_qkv(copy.deepcopy(attn))
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    assert rel_err(fused(x, ctx), attn(x, ctx)) < 1e-5
    assert rel_err(fused(x), attn(x)) < 1e-5


def test_fuse_qkv_autoencoder_and_prior():
    torch.manual_seed(0)
    vae = randomize(AutoencoderKL(AUTOENCODER_PRESETS["tiny"]), 3).eval()
    fused = speed.fuse_qkv(copy.deepcopy(vae))
    assert fused.encoder.mid.attn.attn.to_qkv is not None
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert rel_err(fused.encode(x).mean, vae.encode(x).mean) < 1e-5
    prior = randomize(DiffusionPrior(PRIOR_PRESETS["tiny"]), 4).eval()
    fused_prior = speed.fuse_qkv(copy.deepcopy(prior))
    assert speed.is_fused(fused_prior)
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(2, 32, generator=g), torch.tensor([10.0, 900.0]), torch.randn(2, 6, 32, generator=g),
            torch.randn(2, 32, generator=g), torch.tensor([[True] * 6, [True] * 3 + [False] * 3]))
    with torch.no_grad():
        assert rel_err(fused_prior(*args), prior(*args)) < 1e-5


def test_channels_last_keeps_outputs(unet):
    fast = speed.apply_channels_last(copy.deepcopy(unet))
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    inputs = unet_inputs()
    with torch.no_grad():
        out = fast(*inputs)
        assert out.is_contiguous()  # the hook hands back an ordinary NCHW tensor
        assert rel_err(out, unet(*inputs)) < 1e-5
    assert sorted(fast.state_dict()) == sorted(unet.state_dict())
    torch.manual_seed(0)
    vae = randomize(AutoencoderKL(AUTOENCODER_PRESETS["tiny"]), 3).eval()
    fast_vae = speed.apply_speed(copy.deepcopy(vae), channels_last=True, fuse=True)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).mean
        posterior = fast_vae.encode(x)
        assert rel_err(posterior.mean, z) < 1e-5
        assert posterior.mean.is_contiguous() and posterior.sample().is_contiguous()  # ordinary NCHW tensors
        decoded = fast_vae.decode(z)
        assert decoded.is_contiguous() and rel_err(decoded, vae.decode(z)) < 1e-5


def test_onednn_linear_equals_f_linear_forward_and_backward(monkeypatch):
    calls = []
    conv2d = speed.F.conv2d
    monkeypatch.setattr(speed.F, "conv2d", lambda *a, **k: calls.append(a[0].shape) or conv2d(*a, **k))
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 48, generator=g, requires_grad=True)
    bias = torch.randn(96, generator=g, requires_grad=True)
    # rows = 4·80 = 320 ≥ ONEDNN_MIN_ROWS and 320·48·96 MACs ≥ ONEDNN_MIN_MACS once lowered to this size
    monkeypatch.setattr(speed, "ONEDNN_MIN_MACS", 320 * 48 * 96)
    base = torch.randn(4, 48, 80, generator=g)
    for x, b in [(base.transpose(1, 2).contiguous(), bias), (base.transpose(1, 2), bias),  # and a strided view
                 (base.transpose(1, 2).contiguous(), None)]:
        x = x.detach().requires_grad_()
        out = speed.linear(x, weight, b)
        ref_x = x.detach().clone().requires_grad_()
        ref = torch.nn.functional.linear(ref_x, weight, b)
        assert out.shape == ref.shape == (4, 80, 96) and out.is_contiguous()
        assert rel_err(out, ref) < 1e-5
        grad = torch.randn(out.shape, generator=g)
        grads = torch.autograd.grad(out, [x, weight] + ([b] if b is not None else []), grad)
        grads_ref = torch.autograd.grad(ref, [ref_x, weight] + ([b] if b is not None else []), grad)
        assert all(rel_err(a, r) < 1e-5 for a, r in zip(grads, grads_ref))
    assert calls == [(1, 48, 320, 1)] * 3  # every call above went through the convolution
    speed.linear(torch.randn(2, 80, 48), weight)  # 160 rows: below ONEDNN_MIN_ROWS, plain F.linear
    speed.linear(torch.randn(320, 47), weight[:, :47])  # below ONEDNN_MIN_MACS
    speed.linear(torch.randn(320, 48, dtype=torch.float64), weight.double())  # not fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        speed.linear(torch.randn(320, 48), weight)  # autocast decides the dtype: plain F.linear
    with torch.backends.mkldnn.flags(enabled=False):
        speed.linear(torch.randn(320, 48), weight)  # oneDNN switched off by the user
    assert len(calls) == 3


def test_onednn_linear_keeps_outputs_gradients_and_state(unet, monkeypatch):
    monkeypatch.setattr(speed, "ONEDNN_MIN_ROWS", 1)  # the tiny model's GEMMs are all small: take every one
    monkeypatch.setattr(speed, "ONEDNN_MIN_MACS", 1)
    fast = speed.fuse_qkv(speed.onednn_linear(copy.deepcopy(unet)))  # fusing keeps the oneDNN class
    linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is speed.OneDNNLinear for m in linears)
    assert type(copy.deepcopy(fast).time_embed.linear_1) is speed.OneDNNLinear
    assert list(fast.state_dict()) == list(unet.state_dict())
    inputs = unet_inputs()
    out_ref, out = unet(*inputs), fast(*inputs)
    assert rel_err(out, out_ref) < 1e-5
    out_ref.square().mean().backward()
    out.square().mean().backward()
    assert rel_err(fast.time_embed.linear_1.weight.grad, unet.time_embed.linear_1.weight.grad) < 1e-4
    ff_ref, ff = unet.down[1].attn[0].blocks[0].ff, fast.down[1].attn[0].blocks[0].ff
    assert rel_err(ff.proj_in.weight.grad, ff_ref.proj_in.weight.grad) < 1e-4
    speed.unfuse_qkv(fast)  # and so does splitting them again
    assert all(type(m) is speed.OneDNNLinear for m in fast.modules() if isinstance(m, torch.nn.Linear))
    speed.default_linear(fast)
    assert all(type(m) is torch.nn.Linear for m in fast.modules() if isinstance(m, torch.nn.Linear))


def test_transposed_upsample_equals_upsample_then_conv(monkeypatch):
    torch.manual_seed(0)
    layer = Upsample(6)
    fast = speed.transposed_upsample(copy.deepcopy(layer), min_pixels=25)
    transposed = []
    conv_transpose2d = torch.nn.functional.conv_transpose2d
    monkeypatch.setattr(torch.nn.functional, "conv_transpose2d",
                        lambda *a, **k: transposed.append(a[0].shape) or conv_transpose2d(*a, **k))
    for shape in [(2, 6, 4, 5), (1, 6, 7, 4)]:  # 40 and 28 pixels, odd sizes too
        x = torch.randn(shape, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        out, ref = fast(x), layer(x_ref)
        assert out.shape == ref.shape == (shape[0], 6, 2 * shape[2], 2 * shape[3])
        assert rel_err(out, ref) < 1e-5
        grad = torch.randn(out.shape)
        grads = torch.autograd.grad(out, [x, fast.weight, fast.bias], grad)
        grads_ref = torch.autograd.grad(ref, [x_ref, layer.weight, layer.bias], grad)
        assert all(rel_err(a, r) < 1e-5 for a, r in zip(grads, grads_ref))
    assert len(transposed) == 2
    x = torch.randn(1, 6, 3, 8)
    assert rel_err(fast(x), layer(x)) < 1e-6 and len(transposed) == 2  # 24 pixels: the plain path
    x = torch.randn(2, 6, 4, 4)
    assert fast(x, size=(9, 9)).shape[-2:] == (9, 9) and len(transposed) == 2  # a size that is not ×2
    assert rel_err(fast(x, size=8), layer(x, size=8)) < 1e-5 and len(transposed) == 3  # ×2 given as an int
    assert list(fast.state_dict()) == list(layer.state_dict())
    assert type(copy.deepcopy(fast)) is speed.TransposedUpsample
    with pytest.raises(ValueError, match="min_pixels=0"):
        speed.transposed_upsample(fast, min_pixels=0)
    assert type(speed.transposed_upsample(copy.deepcopy(fast), min_pixels=None)) is Upsample
    vae = randomize(AutoencoderKL(AUTOENCODER_PRESETS["tiny"]), 3).eval()
    fast_vae = speed.apply_speed(copy.deepcopy(vae), upsample=True, channels_last=True)
    speed.transposed_upsample(fast_vae, min_pixels=1)
    z = torch.randn(2, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        assert rel_err(fast_vae.decode(z), vae.decode(z)) < 1e-5
    assert len(transposed) > 2


def test_compile_blocks_keeps_outputs_and_keys(unet):
    compiled = speed.compile_blocks(copy.deepcopy(unet), backend="eager")  # dynamo only: fast on CPU
    assert list(compiled.state_dict()) == list(unet.state_dict())  # no `_orig_mod.` prefixes
    inputs = unet_inputs()
    with torch.no_grad():
        assert rel_err(compiled(*inputs), unet(*inputs)) < 1e-5


def test_cuda_graph_refuses_cpu_tensors(unet):
    with pytest.raises(RuntimeError, match="CUDA graphs need CUDA tensors"):
        speed.capture_cuda_graph(unet, *unet_inputs())


def test_attention_backend_and_autocast():
    assert speed.best_attention_backend("cpu") == "sdpa"
    layer = torch.nn.Linear(4, 4)
    with speed.bf16_autocast("cpu"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with speed.bf16_autocast("cpu", enabled=False):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
