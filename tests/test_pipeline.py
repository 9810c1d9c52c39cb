"""The text-to-image pipeline end to end on a tiny random model: persistence, determinism, shapes, errors."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.diffusion import SAMPLERS
from latent_diffusion.pipeline import TextToImagePipeline, slerp

from .conftest import build_tiny_pipeline

FAST = dict(num_inference_steps=3, prior_num_inference_steps=3, progress=False)


def test_save_load_gives_identical_images(tiny_pipeline, tiny_pipeline_dir, tmp_path):
    a = tiny_pipeline("a red circle on the left", seed=3, output_type="np", **FAST)
    tiny_pipeline.save_pretrained(tmp_path / "again")
    b = TextToImagePipeline.from_pretrained(tmp_path / "again")("a red circle on the left", seed=3,
                                                                output_type="np", **FAST)
    assert a.images.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(a.images, b.images)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, rtol=0, atol=0)
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    assert set(index["components"]) == {"tokenizer", "text_encoder", "image_encoder", "prior", "decoder", "vae"}
    assert not list(tiny_pipeline_dir.rglob("*.bin")) and not list(tiny_pipeline_dir.rglob("*.pt"))


def test_half_precision_folder_loads_in_fp32(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "half", dtype=torch.float16)
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "half")
    assert pipe.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    a = tiny_pipeline("a blue star", seed=0, output_type="pt", **FAST).images
    b = pipe("a blue star", seed=0, output_type="pt", **FAST).images
    assert (a - b).abs().max() < 0.05  # fp16 rounding of the weights only


def test_batch_equals_single_and_seeds_differ(tiny_pipeline):
    batch = tiny_pipeline("a green square", num_images_per_prompt=3, seed=10, output_type="pt", **FAST)
    alone = tiny_pipeline("a green square", seed=12, output_type="pt", **FAST)
    torch.testing.assert_close(batch.images[2], alone.images[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.image_embeds[2], alone.image_embeds[0], atol=1e-5, rtol=0)
    assert (batch.images[0] - batch.images[1]).abs().max() > 1e-3
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    by_gen = tiny_pipeline("a green square", num_images_per_prompt=3, generator=gens, output_type="pt", **FAST)
    torch.testing.assert_close(by_gen.images, batch.images, atol=1e-6, rtol=0)


def test_prompt_lists_and_output_types(tiny_pipeline):
    out = tiny_pipeline(["a red circle", "a blue star"], num_images_per_prompt=2, height=16, width=32, seed=0,
                        **FAST)
    assert len(out.images) == 4 and all(isinstance(im, Image.Image) for im in out.images)
    assert out.images[0].size == (32, 16)
    assert out.image_embeds.shape == (4, 32)
    pt = tiny_pipeline("a red circle", seed=0, output_type="pt", **FAST).images
    assert pt.shape == (1, 3, 16, 16) and 0 <= pt.min() and pt.max() <= 1


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_runs_and_guidance_matters(tiny_pipeline, sampler):
    kw = dict(seed=0, output_type="pt", sampler=sampler, **FAST)
    a = tiny_pipeline("a yellow star", guidance_scale=1.0, **kw).images
    b = tiny_pipeline("a yellow star", guidance_scale=7.0, **kw).images
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_given_image_embeds_skip_the_prior(tiny_pipeline):
    embeds = torch.randn(2, 32)
    out = tiny_pipeline("a red circle", num_images_per_prompt=2, image_embeds=embeds, seed=0, output_type="pt",
                        **FAST)
    assert torch.equal(out.image_embeds, embeds)
    other = tiny_pipeline("a red circle", num_images_per_prompt=2, image_embeds=-embeds, seed=0,
                          output_type="pt", **FAST)
    assert (out.images - other.images).abs().max() > 1e-4


def test_image_guidance_apart_from_the_text(tiny_pipeline):
    """image_guidance_scale: 0 is the text alone, the text's own scale is plain guidance, values between use three
    decoder rows (InstructPix2Pix-style) whose order the limits check; a pipeline default applies to text-to-image
    only."""
    import dataclasses

    embeds = torch.randn(2, 32)
    kw = dict(num_images_per_prompt=2, seed=0, output_type="pt", guidance_scale=3.0, **FAST)
    plain = tiny_pipeline("a red circle", image_embeds=embeds, **kw).images
    text_alone = tiny_pipeline("a red circle", image_embeds=torch.zeros(2, 32), **kw).images
    torch.testing.assert_close(tiny_pipeline("a red circle", image_embeds=embeds, image_guidance_scale=0.0,
                                             **kw).images, text_alone, rtol=0, atol=0)
    torch.testing.assert_close(tiny_pipeline("a red circle", image_embeds=embeds, image_guidance_scale=3.0,
                                             **kw).images, plain, rtol=0, atol=0)
    # the three-row path, at its two limits
    near_zero = tiny_pipeline("a red circle", image_embeds=embeds, image_guidance_scale=1e-7, **kw).images
    near_plain = tiny_pipeline("a red circle", image_embeds=embeds, image_guidance_scale=3.0 + 1e-7, **kw).images
    torch.testing.assert_close(near_zero, text_alone, rtol=0, atol=1e-4)
    torch.testing.assert_close(near_plain, plain, rtol=0, atol=1e-4)
    between = tiny_pipeline("a red circle", image_embeds=embeds, image_guidance_scale=1.0, **kw).images
    assert (between - plain).abs().max() > 1e-4 and (between - text_alone).abs().max() > 1e-4
    with pytest.raises(ValueError, match="image_guidance_scale must be a finite number >= 0, got -1"):
        tiny_pipeline("a red circle", image_guidance_scale=-1.0, **FAST)

    config = tiny_pipeline.config
    try:
        tiny_pipeline.config = dataclasses.replace(config, image_guidance_scale=0.0)
        torch.testing.assert_close(tiny_pipeline("a red circle", image_embeds=embeds, **kw).images, text_alone,
                                   rtol=0, atol=0)
        image = Image.new("RGB", (16, 16), (200, 30, 30))
        a = tiny_pipeline.image_variations(image, seed=0, output_type="pt", num_inference_steps=3, progress=False)
        b = tiny_pipeline.image_variations(Image.new("RGB", (16, 16), (30, 30, 200)), seed=0, output_type="pt",
                                           num_inference_steps=3, progress=False)
        assert (a.images - b.images).abs().max() > 1e-4  # variations still read the image
        # img2img at strength 1 is the text-to-image call, the pipeline's default included
        t2i = tiny_pipeline("a red circle", seed=0, output_type="pt", **FAST).images
        i2i = tiny_pipeline.img2img(image, "a red circle", strength=1.0, seed=0, output_type="pt",
                                    num_inference_steps=3, prior_num_inference_steps=3, progress=False).images
        torch.testing.assert_close(i2i, t2i, rtol=0, atol=1e-6)
    finally:
        tiny_pipeline.config = config


def test_text_only_pipeline(tmp_path):
    pipe = build_tiny_pipeline(tmp_path, with_prior=False, with_image_encoder=False)
    out = pipe("a red circle", seed=0, output_type="pt", **FAST)
    assert out.images.shape == (1, 3, 16, 16) and out.image_embeds is None
    pipe.save_pretrained(tmp_path / "text-only")
    index = json.loads((tmp_path / "text-only" / "model_index.json").read_text())
    assert "prior" not in index["components"]
    again = TextToImagePipeline.from_pretrained(tmp_path / "text-only")("a red circle", seed=0, output_type="pt",
                                                                         **FAST)
    assert torch.equal(out.images, again.images)


def test_image_variations_interpolate_img2img(tiny_pipeline):
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    var = tiny_pipeline.image_variations(image, num_images_per_prompt=2, num_inference_steps=3, seed=0,
                                         progress=False)
    assert len(var.images) == 2 and var.image_embeds.shape == (2, 32)
    torch.testing.assert_close(var.image_embeds[0], var.image_embeds[1])

    frames = tiny_pipeline.interpolate("a red circle", image, num_steps=3, num_inference_steps=3, progress=False)
    assert len(frames.images) == 3
    ends = torch.cat([frames.image_embeds[:1], frames.image_embeds[-1:]])
    assert torch.allclose(ends[1], tiny_pipeline.encode_image(image)[0], atol=1e-4)
    # a prompt end is the prior's sample of a text-to-image call with the same seed and prior settings
    frames = tiny_pipeline.interpolate("a red circle", image, num_steps=2, num_inference_steps=3,
                                       prior_num_inference_steps=2, seed=5, output_type="pt", progress=False)
    call = tiny_pipeline("a red circle", seed=5, num_inference_steps=3, prior_num_inference_steps=2,
                         output_type="pt", progress=False)
    torch.testing.assert_close(frames.image_embeds[0], call.image_embeds[0])

    same = tiny_pipeline.img2img(image, "a blue star", strength=0.0, num_inference_steps=4, output_type="pt",
                                 progress=False).images
    recon = tiny_pipeline.decode_latents(tiny_pipeline.vae.to_latents(
        tiny_pipeline.vae.encode(torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1)[None].float() * 2 - 1)
        .mode()), "pt")
    torch.testing.assert_close(same, recon)
    edited = tiny_pipeline.img2img(image, "a blue star", strength=0.5, num_inference_steps=4, seed=0,
                                   output_type="pt", progress=False).images
    assert edited.shape == (1, 3, 16, 16) and (edited - same).abs().max() > 1e-4


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-5, rtol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-5, rtol=0)
    mid = slerp(a, b * (a.norm(dim=-1, keepdim=True) / b.norm(dim=-1, keepdim=True)), 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), a.norm(dim=-1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=15), "multiple of the VAE factor 2"),
    (dict(width=0), "width=0"),
    (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1, got 0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1, got 2.5"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0, got nan"),
    (dict(prior_guidance_scale=-0.5), "prior_guidance_scale must be a finite number >= 0"),
    (dict(image_guidance_scale=float("inf")), "image_guidance_scale must be a finite number >= 0, got inf"),
    (dict(guidance_rescale=-3.0), r"guidance_rescale must be a number in \[0, 1\], got -3.0"),
    (dict(sampler="plms"), "choose one of"),
    (dict(output_type="jpg"), "unknown output_type"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(negative_prompt=[("blue", "red")]), "negative_prompt must be a string or a list of strings"),
    (dict(seed=2**64), "seed must be an integer from -2\\*\\*63 to 2\\*\\*64 - 1 .*, got 18446744073709551616"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents have shape \(1, 4, 4, 4\); this call needs \(1, 4, 8, 8\)"),
])
def test_bad_arguments_are_named(tiny_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline("a red circle", **{**FAST, **kwargs})


@pytest.mark.parametrize("prompt", [5, None, [1, 2], b"a red circle"])
def test_a_prompt_that_is_not_text_is_named(tiny_pipeline, prompt):
    with pytest.raises(ValueError, match=re.escape(f"prompt must be a string or a list of strings, got {prompt!r}")):
        tiny_pipeline(prompt, **FAST)


def test_other_entry_points_check_their_arguments(tiny_pipeline, tiny_pipeline_dir):
    image = Image.new("RGB", (16, 16), "white")
    with pytest.raises(ValueError, match="num_images_per_prompt must be an integer >= 1, got 0"):
        tiny_pipeline.image_variations(image, num_images_per_prompt=0, progress=False)
    with pytest.raises(ValueError, match="the image is 17×16 pixels; img2img needs .* multiples of the VAE factor 2"):
        tiny_pipeline.img2img(Image.new("RGB", (17, 16)), "a red circle", progress=False)
    with pytest.raises(ValueError, match="dtype='half precision' is not one the models run in"):
        TextToImagePipeline.from_pretrained(tiny_pipeline_dir, dtype="half precision")
    assert TextToImagePipeline.from_pretrained(tiny_pipeline_dir, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype=torch.int8 is not one the models run in"):
        TextToImagePipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.int8)
    with pytest.raises(ValueError, match="prior_num_inference_steps must be an integer >= 1, got 0"):
        tiny_pipeline.interpolate("a red circle", "a blue star", prior_num_inference_steps=0, progress=False)
    frames = tiny_pipeline.interpolate("a red circle", "a blue star", num_steps=2, num_inference_steps=2, seed=None,
                                       progress=False)  # seed=None: a random seed, as elsewhere
    assert len(frames.images) == 2
    # what torch takes is taken: negative and 64-bit seeds, numpy integers, tensor scales and counts
    kw = dict(output_type="pt", **FAST)
    for seed in (-1, 2**64 - 1, np.int64(3)):
        assert tiny_pipeline("a red circle", seed=seed, **kw).images.shape == (1, 3, 16, 16)
    torch.testing.assert_close(
        tiny_pipeline("a red circle", seed=0, guidance_scale=torch.tensor(2.0), **kw).images,
        tiny_pipeline("a red circle", seed=0, guidance_scale=2.0, **kw).images, rtol=0, atol=0)
    assert len(tiny_pipeline("a red circle", seed=0, num_images_per_prompt=torch.tensor(2), **kw).images) == 2


def test_empty_prompt_list_and_long_prompt(tiny_pipeline):
    with pytest.raises(ValueError, match="empty list"):
        tiny_pipeline([], **FAST)
    with pytest.warns(UserWarning, match="truncated"):
        out = tiny_pipeline("a red circle " * 20, seed=0, output_type="pt", **FAST)
    assert out.images.shape == (1, 3, 16, 16)


def test_missing_or_pickled_components_are_named(tiny_pipeline_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    (broken / "decoder" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"decoder[/\\]model.safetensors"):
        TextToImagePipeline.from_pretrained(broken)
    torch.save({"w": torch.zeros(1)}, broken / "decoder" / "model.bin")
    with pytest.raises(ValueError, match="refusing to load pickle"):
        TextToImagePipeline.from_pretrained(broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        TextToImagePipeline.from_pretrained(broken)
    with pytest.raises(FileNotFoundError, match="pipeline folder not found"):
        TextToImagePipeline.from_pretrained(tmp_path / "nowhere")
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    index["config"]["guidance"] = 3
    shutil.copytree(tiny_pipeline_dir, tmp_path / "badkey")
    (tmp_path / "badkey" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="guidance"):
        TextToImagePipeline.from_pretrained(tmp_path / "badkey")


def test_img2img_full_strength_ignores_the_image(tiny_pipeline):
    """strength 1 is text-to-image from pure noise: two different images give the same result."""
    rng = np.random.default_rng(1)
    a, b = (Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)) for _ in range(2))
    kw = dict(strength=1.0, num_inference_steps=3, seed=0, output_type="pt", progress=False)
    torch.testing.assert_close(tiny_pipeline.img2img(a, "a red circle", **kw).images,
                               tiny_pipeline.img2img(b, "a red circle", **kw).images)


def test_img2img_strength_below_one_keeps_the_image(tiny_pipeline):
    """SDEdit's step count is floor(n · strength): at 0.99 of 25 steps the image still matters (24 steps)."""
    rng = np.random.default_rng(1)
    a, b = (Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)) for _ in range(2))
    kw = dict(strength=0.99, num_inference_steps=25, seed=0, output_type="pt", progress=False)
    out_a, out_b = (tiny_pipeline.img2img(image, "a red circle", **kw).images for image in (a, b))
    assert (out_a - out_b).abs().max() > 1e-3


def test_half_precision_models_sample_in_float32(tiny_pipeline):
    """The sampler's state x0 + σ ε (σ_max ≈ 2·10⁴ for the prior's cosine schedule) stays float32 when the models
    run in float16 or bfloat16: no row overflows, and the embeddings stay close to the float32 ones."""
    prompts = ["a red circle on the left"] * 128
    kw = dict(steps=10, guidance_scale=4.0, sampler="ddim")
    ref = tiny_pipeline.sample_prior(*(tiny_pipeline.encode_prior_prompt(p) for p in (prompts, [""] * 128)),
                                     [torch.Generator().manual_seed(i) for i in range(128)], **kw)
    for dtype in (torch.float16, torch.bfloat16):
        tiny_pipeline.to(dtype=dtype)
        text, uncond = (tiny_pipeline.encode_prior_prompt(p) for p in (prompts, [""] * 128))
        embeds = tiny_pipeline.sample_prior(text, uncond, [torch.Generator().manual_seed(i) for i in range(128)],
                                            **kw)
        assert embeds.dtype == dtype and torch.isfinite(embeds).all(), dtype
        assert (embeds.float() - ref).abs().max() < 0.1 * ref.abs().max(), dtype
        images = tiny_pipeline("a red circle", seed=0, output_type="pt", **FAST).images
        assert torch.isfinite(images).all(), dtype
    tiny_pipeline.to(dtype=torch.float32)


def test_final_sigma_min_returns_the_vp_sample(tiny_pipeline):
    """With `final_sigma="min"` (diffusers' DDIM, set_alpha_to_one=False) the walk ends at σ_min > 0; the latents
    returned are the VP sample x / sqrt(1 + σ_min²), as diffusers' scheduler returns, not the VE state."""
    from dataclasses import replace

    from latent_diffusion.diffusion import NoiseSchedule
    from latent_diffusion.pipeline import SamplingConfig

    pipe = tiny_pipeline
    text, uncond = pipe.encode_prompt(["a red circle"]), pipe.encode_prompt([""])
    embeds = torch.randn(1, pipe.decoder.config.image_embed_dim, generator=torch.Generator().manual_seed(0))
    calls = []

    def run(final_sigma: str) -> torch.Tensor:
        pipe.config = replace(pipe.config, decoder_sampling=SamplingConfig("ddim", "leading", 1, final_sigma))
        return pipe.sample_latents(text, uncond, embeds, [torch.Generator().manual_seed(0)], (8, 8), 10, 1.0, "ddim",
                                   callback=lambda d: calls.append(d["x"]))

    latents = run("min")
    sigma_min = NoiseSchedule(pipe.config.decoder_schedule).sigma_min
    assert sigma_min > 0
    torch.testing.assert_close(latents, calls[-1] / (1 + sigma_min**2) ** 0.5)
    calls.clear()
    zero = run("zero")
    torch.testing.assert_close(zero, calls[-1])  # σ = 0 at the end: the VE state is the sample


def test_decoder_token_embeddings_reach_the_decoder_only(tiny_pipeline, tmp_path):
    """`decoder_token_embeddings`: the decoder sees 2L context tokens (output states, then the layer-normalised
    input embeddings), the prior still its L states; the switch changes the images and survives save/load."""
    from dataclasses import replace

    import torch.nn.functional as F

    plain = tiny_pipeline.encode_prompt(["a red circle on the left"])
    tiny_pipeline.config = replace(tiny_pipeline.config, decoder_token_embeddings=True)
    states, pooled, mask = tiny_pipeline.encode_prompt(["a red circle on the left"])
    L = plain[0].shape[1]
    assert states.shape == (1, 2 * L, plain[0].shape[2]) and mask.shape == (1, 2 * L)
    torch.testing.assert_close(states[:, :L], plain[0])
    torch.testing.assert_close(pooled, plain[1])
    ids = tiny_pipeline.tokenizer(["a red circle on the left"], padding="max_length", return_tensors="pt").input_ids
    embedded = tiny_pipeline.text_encoder.text_model.embeddings(input_ids=ids)
    torch.testing.assert_close(states[:, L:], F.layer_norm(embedded, embedded.shape[-1:]))
    assert tiny_pipeline.encode_prior_prompt(["a red circle"])[0].shape[1] == L
    seen = []
    hook = tiny_pipeline.decoder.register_forward_pre_hook(  # the context: the only 3-D input
        lambda m, args, kwargs: seen.extend(a.shape[1] for a in [*args, *kwargs.values()]
                                            if torch.is_tensor(a) and a.ndim == 3), with_kwargs=True)
    with_embeddings = tiny_pipeline("a red circle on the left", seed=0, output_type="pt", **FAST).images
    hook.remove()
    assert set(seen) == {2 * L}
    tiny_pipeline.save_pretrained(tmp_path / "te")
    again = TextToImagePipeline.from_pretrained(tmp_path / "te")
    assert again.config.decoder_token_embeddings
    torch.testing.assert_close(again("a red circle on the left", seed=0, output_type="pt", **FAST).images,
                               with_embeddings)
    tiny_pipeline.config = replace(tiny_pipeline.config, decoder_token_embeddings=False)
    without = tiny_pipeline("a red circle on the left", seed=0, output_type="pt", **FAST).images
    assert (without - with_embeddings).abs().max() > 1e-4


def test_negative_prompts_as_a_tuple_or_a_list(tiny_pipeline):
    """One negative prompt per prompt, given as a list or a tuple, gives the same images."""
    prompts = ["a red circle", "a blue square"]
    a = tiny_pipeline(prompts, negative_prompt=["green", "yellow"], seed=0, output_type="pt", **FAST).images
    b = tiny_pipeline(prompts, negative_prompt=("green", "yellow"), seed=0, output_type="pt", **FAST).images
    c = tiny_pipeline(prompts, negative_prompt="green", seed=0, output_type="pt", **FAST).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_image_paths_are_images_and_seed_with_generator_is_refused(tiny_pipeline, tmp_path):
    image = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "in.png")
    kw = dict(num_inference_steps=2, seed=0, output_type="pt", progress=False)
    torch.testing.assert_close(tiny_pipeline.image_variations(str(tmp_path / "in.png"), **kw).images,
                               tiny_pipeline.image_variations(image, **kw).images)
    with pytest.raises(TypeError, match="got ndarray"):
        tiny_pipeline.image_variations(np.asarray(image), **kw)
    with pytest.raises(ValueError, match="seed or generator, not both"):
        tiny_pipeline("a red circle", seed=0, generator=torch.Generator().manual_seed(0), **FAST)


def test_float16_vae_with_force_upcast_runs_in_float32(tiny_pipeline):
    """A VAE whose config sets `force_upcast` (Stable Diffusion's, through `from_diffusers`) encodes and decodes in
    float32 when the pipeline runs in float16, and is float16 again afterwards; without the flag it runs in
    float16."""
    from dataclasses import replace

    seen: list[torch.dtype] = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
             for m in (tiny_pipeline.vae.encoder.conv_in, tiny_pipeline.vae.decoder.conv_out)]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    config = tiny_pipeline.vae.config
    try:
        tiny_pipeline.to(dtype=torch.float16)
        for upcast, expected in ((True, torch.float32), (False, torch.float16)):
            tiny_pipeline.vae.config = replace(config, force_upcast=upcast)
            seen.clear()
            encoded = tiny_pipeline.encode_latents(pixels)
            images = tiny_pipeline.decode_latents(latents, "pt")
            assert seen == [expected, expected], upcast
            assert encoded.dtype == torch.float16 and torch.isfinite(images).all()
            assert {p.dtype for p in tiny_pipeline.vae.parameters()} == {torch.float16}
        with torch.no_grad():  # an overflowing decoder warns rather than returning black images silently
            tiny_pipeline.vae.decoder.conv_out.bias.fill_(float("inf"))
        with pytest.warns(UserWarning, match="non-finite values in torch.float16"):
            tiny_pipeline.decode_latents(latents, "pt")
    finally:
        for hook in hooks:
            hook.remove()
        tiny_pipeline.vae.config = config
        tiny_pipeline.to(dtype=torch.float32)


def test_api_arguments_are_checked_by_name(tiny_pipeline, tiny_pipeline_dir, tmp_path):
    """Each bad argument gets a ValueError naming it, before any file is written or any sampling starts."""
    with pytest.raises(ValueError, match="dtype=torch.int8 is not one the models run in"):
        tiny_pipeline.save_pretrained(tmp_path / "int8", dtype=torch.int8)
    with pytest.raises(ValueError, match=r"no component named 'decoderr'; its components: \['decoder'"):
        tiny_pipeline.save_pretrained(tmp_path / "typo", components=["decoderr"])
    with pytest.raises(ValueError, match="no component named 'vae,prior'"):
        tiny_pipeline.save_pretrained(tmp_path / "str", components="vae,prior")  # one name, not a list
    assert not any((tmp_path / name).exists() for name in ("int8", "typo", "str"))
    tiny_pipeline.save_pretrained(tmp_path / "half", dtype="float16")  # by name, as from_pretrained takes it
    assert TextToImagePipeline.from_pretrained(tmp_path / "half", dtype=torch.float16).dtype == torch.float16
    assert TextToImagePipeline.from_pretrained(tiny_pipeline_dir, torch.bfloat16).dtype == torch.bfloat16
    assert TextToImagePipeline.from_pretrained(tiny_pipeline_dir).to(torch.float16).dtype == torch.float16
    assert TextToImagePipeline.from_pretrained(tiny_pipeline_dir, "float16").dtype == torch.float16
    with pytest.raises(ValueError, match="dtype=torch.float8_e4m3fn is not one the models run in"):
        TextToImagePipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="got two dtypes"):
        TextToImagePipeline.from_pretrained(tiny_pipeline_dir, torch.float16, dtype=torch.float32)
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        TextToImagePipeline.from_pretrained(tiny_pipeline_dir, "gpu")
    with pytest.raises(ValueError, match=r"unknown speed switch\(es\) \['channel_last'\]"):
        tiny_pipeline.apply_speed(channel_last=True)
    with pytest.raises(ValueError, match=r"\['mode'\]: options of the compilation .* with compile=True only"):
        tiny_pipeline.apply_speed(mode="max-autotune")

    image = Image.new("RGB", (16, 16), "white")
    bad_calls = {
        "generator must be a torch.Generator": dict(generator=3),
        "got 2 generators for 1 images": dict(generator=(torch.Generator(), torch.Generator())),  # a tuple: a list
        "callback must be callable": dict(callback=3),
        "guidance_rescale must be a number in \\[0, 1\\], got 'a'": dict(guidance_rescale="a"),
        "image_embeds must be a torch.Tensor of shape \\(images, embedding width\\), got ndarray":
            dict(image_embeds=np.zeros((1, 32))),
        "image_embeds must be .*, got shape \\(32,\\)": dict(image_embeds=torch.zeros(32)),
        "latents must be a torch.Tensor of shape \\(1, 4, 8, 8\\), got list": dict(latents=[[0.0]]),
        "unknown sampler ''": dict(sampler=""),
    }
    for message, kwargs in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            tiny_pipeline("a red circle", **FAST, **kwargs)
    with pytest.raises(ValueError, match="strength must be a number in \\[0, 1\\], got '0.5'"):
        tiny_pipeline.img2img(image, "a red circle", strength="0.5", progress=False)
    with pytest.raises(ValueError, match="an empty list of images"):
        tiny_pipeline.img2img([], "a red circle", progress=False)
    with pytest.raises(ValueError, match="floating point with values in \\[0, 1\\], got torch.uint8"):
        tiny_pipeline.img2img(torch.full((3, 16, 16), 255, dtype=torch.uint8), "a red circle", progress=False)
    with pytest.raises(ValueError, match="values in \\[0, 1\\], got \\[-1, 1\\]"):
        tiny_pipeline.encode_image(torch.linspace(-1, 1, 3 * 16 * 16).view(3, 16, 16))
    ringing = torch.linspace(-0.05, 1.05, 3 * 16 * 16).view(3, 16, 16)  # a bicubic resize's overshoot: clipped
    torch.testing.assert_close(tiny_pipeline.encode_image(ringing), tiny_pipeline.encode_image(ringing.clamp(0, 1)))
    with pytest.raises(ValueError, match="prompt must be one string"):
        tiny_pipeline.image_variations(image, prompt=["a", "b"], progress=False)


def test_interpolate_takes_image_files_as_paths(tiny_pipeline, tmp_path):
    from pathlib import Path

    image = Image.fromarray((np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "end.png")
    kw = dict(num_steps=2, num_inference_steps=2, prior_num_inference_steps=2, seed=0, output_type="pt",
              progress=False)
    by_path = tiny_pipeline.interpolate("a red circle", Path(tmp_path / "end.png"), **kw)
    by_image = tiny_pipeline.interpolate("a red circle", image, **kw)
    torch.testing.assert_close(by_path.images, by_image.images, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="takes the string .*end.png' as a prompt; pass pathlib.Path"):
        tiny_pipeline.interpolate("a red circle", str(tmp_path / "end.png"), **kw)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    by_tensor = tiny_pipeline.interpolate("a red circle", tensor, **kw)  # any image encode_image takes
    torch.testing.assert_close(by_tensor.images, by_image.images, rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="expected PIL images, image file paths or a .* tensor, got int"):
        tiny_pipeline.interpolate("a red circle", 3, **kw)
    with pytest.raises(ValueError, match="each end of an interpolation is one image, got 2"):
        tiny_pipeline.interpolate("a red circle", [image, image], **kw)


def test_latent_output_decodes_to_the_same_images(tiny_pipeline):
    latents = tiny_pipeline("a red circle", seed=3, output_type="latent", **FAST).images
    assert latents.shape == (1, 4, 8, 8)
    images = tiny_pipeline("a red circle", seed=3, output_type="pt", **FAST).images
    torch.testing.assert_close(tiny_pipeline.decode_latents(latents, "pt"), images, rtol=0, atol=0)
