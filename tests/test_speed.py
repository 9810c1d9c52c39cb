"""The speed switches of `latent_diffusion.speed` keep outputs, gradients and state dicts equal."""

import copy

import pytest
import torch

from latent_diffusion import speed
from latent_diffusion.layers import Attention
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
        assert rel_err(fast_vae.encode(x).mean, z) < 1e-5
        decoded = fast_vae.decode(z)
        assert decoded.is_contiguous() and rel_err(decoded, vae.decode(z)) < 1e-5


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
