"""Our AutoencoderKL / UNet against diffusers on tiny random models (fp32, CPU), plus model-level behaviour."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from latent_diffusion.layers import attention, set_attention_backend, sincos_2d
from latent_diffusion.models import (
    AUTOENCODER_PRESETS,
    PRIOR_PRESETS,
    UNET_PRESETS,
    AutoencoderKL,
    DiffusionPrior,
    UNet,
    UNetConfig,
)


@pytest.fixture()
def diffusers():
    """The reference implementation; only the tests that compare with it skip without it."""
    return pytest.importorskip("diffusers")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the output scale."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-8)).item()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter non-trivial values (diffusers zero-inits some output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if is_norm_scale else 0.2) + float(is_norm_scale))


VAE_CASES = [
    dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4),
    dict(block_out_channels=[8, 16, 16], layers_per_block=2, norm_num_groups=8, latent_channels=3,
         scaling_factor=0.5, shift_factor=0.1, force_upcast=False),
    dict(block_out_channels=[8, 8], layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False,
         use_quant_conv=False, use_post_quant_conv=False),
]


@pytest.mark.parametrize("cfg", VAE_CASES)
def test_autoencoder_matches_diffusers(tmp_path, cfg, diffusers):
    torch.manual_seed(0)
    n = len(cfg["block_out_channels"])
    ref = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n,
                                  up_block_types=["UpDecoderBlock2D"] * n, **cfg).eval()
    randomize(ref, 1)
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_diffusers(tmp_path)
    assert ours.config.channels == tuple(cfg["block_out_channels"])
    assert ours.config.scaling_factor == cfg.get("scaling_factor", 0.18215)
    assert ours.config.force_upcast == cfg.get("force_upcast", True)  # diffusers' default
    x = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post_ref, post = ref.encode(x).latent_dist, ours.encode(x)
        assert rel_err(post.mode(), post_ref.mode()) < 1e-4
        assert rel_err(post.std, post_ref.std) < 1e-4
        assert rel_err(post.kl(), post_ref.kl()) < 1e-4
        z = post_ref.mode()
        assert rel_err(ours.decode(z), ref.decode(z).sample) < 1e-4


def test_autoencoder_old_attention_keys_and_pickle_refused(tmp_path, diffusers):
    ref = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                                  norm_num_groups=4).eval()
    randomize(ref, 3)
    ref.save_pretrained(tmp_path / "new")
    # Rewrite with the pre-0.14 attention names (query/key/value/proj_attn) stored as 1×1 convs.
    state = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in ref.state_dict().items():
        for new, old in names.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        state[k] = v.contiguous()
    (tmp_path / "old").mkdir()
    save_file(state, str(tmp_path / "old" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    a, b = AutoencoderKL.from_diffusers(tmp_path / "new"), AutoencoderKL.from_diffusers(tmp_path / "old")
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(a.decode(z), b.decode(z))
    (tmp_path / "old" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, tmp_path / "old" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to load pickle"):
        AutoencoderKL.from_diffusers(tmp_path / "old")
    (tmp_path / "old" / "diffusion_pytorch_model.bin").unlink()
    save_file(state, str(tmp_path / "old" / "diffusion_pytorch_model.fp16.safetensors"))  # diffusers' variant
    with pytest.raises(FileNotFoundError, match=r"holds \['diffusion_pytorch_model.fp16.safetensors'\]"):
        AutoencoderKL.from_diffusers(tmp_path / "old")


UNET_CASES = {
    "sd15-like": dict(block_out_channels=[16, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                      cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8),
    "three-levels": dict(block_out_channels=[16, 32, 32], layers_per_block=2, cross_attention_dim=12,
                         down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                         attention_head_dim=4, norm_num_groups=8, transformer_layers_per_block=[1, 2, 1],
                         freq_shift=1, flip_sin_to_cos=False),
    "sd21-unclip-like": dict(block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                             up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], layers_per_block=1,
                             cross_attention_dim=24, attention_head_dim=[2, 4], norm_num_groups=8,
                             use_linear_projection=True, upcast_attention=True, class_embed_type="projection",
                             projection_class_embeddings_input_dim=20, in_channels=5, out_channels=3),
}


@pytest.mark.parametrize("name", list(UNET_CASES))
def test_unet_matches_diffusers(tmp_path, name, diffusers):
    cfg = UNET_CASES[name]
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**cfg).eval()
    randomize(ref, 4)
    ref.save_pretrained(tmp_path)
    ours = UNet.from_diffusers(tmp_path)
    g = torch.Generator().manual_seed(5)
    B, cin = 2, cfg.get("in_channels", 4)
    x = torch.randn(B, cin, 16, 16, generator=g)
    t = torch.tensor([3.0, 870.0])
    ctx = torch.randn(B, 7, cfg["cross_attention_dim"], generator=g)
    cls = torch.randn(B, 20, generator=g) if "class_embed_type" in cfg else None
    with torch.no_grad():
        expected = ref(x, t, ctx, class_labels=cls).sample
        got = ours(x, t, ctx, image_embeds=cls)
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4
    # Odd latent sizes take the explicit-size upsampling path (diffusers' forward_upsample_size).
    if name == "three-levels":
        x = torch.randn(1, cin, 10, 14, generator=g)
        with torch.no_grad():
            assert rel_err(ours(x, t[:1], ctx[:1]), ref(x, t[:1], ctx[:1]).sample) < 1e-4


def test_autoencoder_from_diffusers_refuses_per_channel_latent_statistics(tmp_path, diffusers):
    """A VAE whose latents are normalised per channel (latents_mean / latents_std) would load with the wrong
    latent scale: refused by name."""
    ref = diffusers.AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  latents_mean=(0.1, 0.2, 0.3, 0.4), latents_std=(1.0, 1.1, 1.2, 1.3))
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="latents_mean and latents_std"):
        AutoencoderKL.from_diffusers(tmp_path)


def test_unet_from_diffusers_refuses_unsupported(tmp_path, diffusers):
    cfg = dict(UNET_CASES["sd15-like"])
    ref = diffusers.UNet2DConditionModel(**cfg, resnet_time_scale_shift="scale_shift")
    ref.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNet.from_diffusers(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.update(resnet_time_scale_shift="default", down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
        UNet.from_diffusers(tmp_path)
    raw.update(down_block_types=ref.config.down_block_types, num_class_embeds=10)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="num_class_embeds=10"):  # named, not an unexpected-key error
        UNet.from_diffusers(tmp_path)
    plain = tmp_path / "plain"
    diffusers.UNet2DConditionModel(**cfg, mid_block_only_cross_attention=False).save_pretrained(plain)
    UNet.from_diffusers(plain)  # diffusers' "off", like None


def test_unet_unclip_conditioning_changes_output_and_zero_is_null():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["tiny-unclip"]).eval()
    randomize(unet, 6)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    img, txt = torch.randn(2, 32), torch.randn(2, 32)
    with torch.no_grad():
        base = unet(x, 10, ctx, img, txt)
        assert not torch.allclose(base, unet(x, 10, ctx, img * 2, txt))  # image embedding matters
        assert not torch.allclose(base, unet(x, 10, ctx, img, txt * 2))  # pooled text matters
        assert torch.equal(unet(x, 10, ctx, None, txt), unet(x, 10, ctx, torch.zeros(2, 32), txt))
    with pytest.raises(ValueError, match="image_embeds has width 7"):
        unet(x, 10, ctx, torch.randn(2, 7))


def test_position_embedding_starts_as_a_no_op_and_then_changes_the_output():
    """Zero-initialised position projections: a UNet gaining them computes what it did (warm start)."""
    torch.manual_seed(0)
    base = UNet(UNET_PRESETS["tiny"]).eval()
    randomize(base, 6)
    pos = UNet(dataclasses.replace(UNET_PRESETS["tiny"], position_embedding=True)).eval()
    missing = pos.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(".pos_proj." in k for k in missing)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(base(x, 10, ctx), pos(x, 10, ctx))
        for name, p in pos.named_parameters():
            if ".pos_proj." in name:
                p.normal_(std=0.2)
        assert not torch.allclose(base(x, 10, ctx), pos(x, 10, ctx), atol=1e-3)
    with pytest.raises(ValueError, match="divisible by 4"):
        UNetConfig(channels=(16, 30), attention_levels=(False, True), heads=(2, 2), transformer_depth=(1, 1),
                   norm_groups=2, position_embedding=True)


def test_text_refiner_starts_as_a_no_op_and_then_mixes_the_tokens():
    """Zero-initialised refiner outputs: a UNet gaining a text refiner computes what it did (warm start); trained,
    each refined token depends on the other tokens (what binds a colour word to its shape word)."""
    torch.manual_seed(0)
    base = UNet(UNET_PRESETS["tiny"]).eval()
    randomize(base, 7)
    refined = UNet(dataclasses.replace(UNET_PRESETS["tiny"], text_refiner_layers=2, text_refiner_heads=2)).eval()
    missing = refined.load_state_dict(base.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("text_refiner.") for k in missing)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(base(x, 10, ctx), refined(x, 10, ctx))
        for name, p in refined.text_refiner.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.normal_(std=0.3)
        assert not torch.allclose(base(x, 10, ctx), refined(x, 10, ctx), atol=1e-3)
        other = ctx.clone()
        other[:, 3] = torch.randn(2, 32)  # change one token: the others' refined states move too
        a, b = refined.text_refiner(ctx), refined.text_refiner(other)
        assert (a[:, :3] - b[:, :3]).abs().amax() > 1e-2
    with pytest.raises(ValueError, match="text_refiner_layers=-1"):
        dataclasses.replace(UNET_PRESETS["tiny"], text_refiner_layers=-1)
    with pytest.raises(ValueError, match="text_refiner_heads=3"):
        dataclasses.replace(UNET_PRESETS["tiny"], text_refiner_layers=1, text_refiner_heads=3)


def test_sincos_2d_codes_rows_and_columns():
    code = sincos_2d(3, 5, 8)  # (H·W, dim), row-major
    assert code.shape == (15, 8)
    grid = code.reshape(3, 5, 8)
    assert torch.equal(grid[:, 0, :4], grid[:, 4, :4])  # first half: the row only
    assert torch.equal(grid[0, :, 4:], grid[2, :, 4:])  # second half: the column only
    assert torch.cdist(code, code).add(torch.eye(15)).min() > 0.1  # every position has its own code
    row = torch.tensor([1.0, 0.01])  # row y = 1: sin, cos of 1 · 10000^(-i/2), i = 0, 1
    assert torch.allclose(code[7, :4], torch.cat([row.sin(), row.cos()]), atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(2, 2, 6)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["tiny-unclip"]).train()
    x, ctx, img = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.randn(2, 32)
    txt = torch.randn(2, 32)
    unet(x, 5, ctx, img, txt).square().mean().backward()
    ref = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad()
    unet.enable_gradient_checkpointing()
    unet(x, 5, ctx, img, txt).square().mean().backward()
    for a, p in zip(ref, unet.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-6)


def test_attention_backends_agree_in_outputs_and_gradients():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.where(torch.rand(2, 1, 9, 9, generator=g) > 0.3, 0.0, -10000.0)
    outs = {}
    for backend in ("sdpa", "math"):
        out = attention(q, k, v, mask, backend=backend)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, 8)).sum(), (q, k, v))
        outs[backend] = (out, *grads)
    for a, b in zip(outs["sdpa"], outs["math"]):
        assert (a - b).abs().max().item() < 1e-5
    allowed = mask == 0  # the same mask as booleans, True = attend (SDPA's convention), means it on every backend
    for backend in ("sdpa", "math"):
        assert (attention(q, k, v, allowed, backend=backend) - outs["sdpa"][0]).abs().max().item() < 1e-5
    allowed[0, 0, 3] = False  # a row with nothing to attend to gives 0, in half precision too
    for dtype in (torch.float32, torch.float16):
        out = attention(*(t.detach().to(dtype) for t in (q, k, v)), allowed, backend="math")
        assert torch.isfinite(out).all() and not out[0, :, 3].any()
    with pytest.raises(ValueError, match="choose one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="xformers"):
        attention(q, k, v, backend="xformers")  # not installed, or not CUDA: both are clear errors


def test_model_backend_switch_keeps_outputs():
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS["tiny"]).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        a = unet(x, 1, ctx)
        b = set_attention_backend(unet, "math")(x, 1, ctx)
    assert (a - b).abs().max().item() < 1e-5


def test_save_load_roundtrip_all_models(tmp_path):
    torch.manual_seed(0)
    prior = DiffusionPrior(PRIOR_PRESETS["tiny"])
    prior.set_embedding_stats(torch.randn(32), torch.rand(32) + 0.5)
    models = {"vae": AutoencoderKL(AUTOENCODER_PRESETS["tiny"]), "unet": UNet(UNET_PRESETS["tiny-unclip"]),
              "prior": prior}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        loaded = type(model).from_pretrained(tmp_path / name)
        assert loaded.config == model.config
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), k
    # A config with an unknown key is refused by name.
    raw = json.loads((tmp_path / "unet" / "config.json").read_text())
    raw["attention_dropout"] = 0.1
    (tmp_path / "unet" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="attention_dropout"):
        UNet.from_pretrained(tmp_path / "unet")
    (tmp_path / "vae" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        AutoencoderKL.from_pretrained(tmp_path / "vae")


def test_saved_files_get_the_umask_permissions_and_damaged_weights_are_named(tmp_path):
    """Atomic writes go through mkstemp (owner-only files): the result must be readable as a plain open() would
    make it. A truncated weight file is refused with its path."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        UNet(UNET_PRESETS["tiny"]).save_pretrained(tmp_path / "unet")
    finally:
        os.umask(old)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / "unet" / name).stat().st_mode) == 0o644, name
    weights = tmp_path / "unet" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read {weights}"):
        UNet.from_pretrained(tmp_path / "unet")


def test_prior_text_padding_is_masked_and_causal():
    torch.manual_seed(0)
    prior = DiffusionPrior(PRIOR_PRESETS["tiny"]).eval()
    x, states, pooled = torch.randn(2, 32), torch.randn(2, 77, 32), torch.randn(2, 32)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        a = prior(x, 7, states, pooled, mask)
        changed = states.clone()
        changed[:, 5:] += 3.0  # padding positions: must not matter
        assert torch.allclose(a, prior(x, 7, changed, pooled, mask), atol=1e-6)
        changed = states.clone()
        changed[:, 2] += 3.0  # a real token: must matter
        assert not torch.allclose(a, prior(x, 7, changed, pooled, mask), atol=1e-4)
        # the padding dropped altogether (padding="longest"): the same prompt, the same prediction
        torch.testing.assert_close(prior(x, 7, states[:, :5], pooled, mask[:, :5]), a, atol=1e-5, rtol=1e-5)
    emb = torch.randn(3, 32)
    prior.set_embedding_stats(torch.randn(32), torch.rand(32) + 0.5)
    assert torch.allclose(prior.denormalize(prior.normalize(emb)), emb, atol=1e-5)
