"""Stable unCLIP from diffusers folders: tiny random components saved by diffusers' own pipelines; our converted
pipeline reproduces diffusers' prior embeddings and images for the same generator, and round-trips our layout."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from latent_diffusion.diffusion import NoiseSchedule
from latent_diffusion.models import DiffusionPrior
from latent_diffusion.pipeline import TextToImagePipeline

from .conftest import CAPTIONS

diffusers = pytest.importorskip("diffusers")

STEPS = dict(num_inference_steps=4, guidance_scale=5.0)
PROMPT = "a small red circle on the left"


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Make zero-initialised layers non-trivial (diffusers zero-inits some outputs and the prior's tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _decoder_parts(tok):
    """The components both Stable unCLIP pipelines share, in diffusers' classes: SD-2.x-style v-prediction UNet
    (linear projections, per-level head counts, upcast attention, image embeddings through class_embedding)."""
    from transformers import CLIPTextModel

    from latent_diffusion.models.clip import clip_text_config

    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True, upcast_attention=True,
        class_embed_type="projection", projection_class_embeddings_input_dim=64)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), norm_num_groups=4, latent_channels=4)
    normalizer = diffusers.pipelines.stable_diffusion.StableUnCLIPImageNormalizer(embedding_dim=32)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, 32) * 0.3)
        normalizer.std.copy_(torch.rand(1, 32) + 0.5)
    return dict(
        image_normalizer=normalizer,
        image_noising_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tok, text_encoder=CLIPTextModel(clip_text_config("tiny", tok, max_position_embeddings=16)).eval(),
        unet=_perturb(unet, 2), vae=_perturb(vae, 3),
        scheduler=diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                          prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1,
                                          clip_sample=False))


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    """(diffusers StableUnCLIPPipeline, its saved folder)."""
    from transformers import CLIPTextModelWithProjection

    from latent_diffusion.models.clip import clip_text_config, train_clip_tokenizer

    folder = tmp_path_factory.mktemp("unclip")
    tok = train_clip_tokenizer(CAPTIONS, folder / "_tok", vocab_size=600, model_max_length=16)
    torch.manual_seed(0)
    prior_text_encoder = CLIPTextModelWithProjection(clip_text_config("tiny", tok, max_position_embeddings=16))
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1,
                                       num_embeddings=16)
    with torch.no_grad():
        prior.clip_mean.copy_(torch.randn(1, 32) * 0.2)
        prior.clip_std.copy_(torch.rand(1, 32) + 0.5)
    ref = diffusers.StableUnCLIPPipeline(
        prior_tokenizer=tok, prior_text_encoder=prior_text_encoder.eval(), prior=_perturb(prior, 4, 0.2),
        prior_scheduler=diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                                                clip_sample=True, clip_sample_range=5.0),
        **_decoder_parts(tok))
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(folder / "pipe")
    return ref, folder / "pipe"


@pytest.fixture(scope="module")
def unclip_img2img(unclip, tmp_path_factory):
    """(diffusers StableUnCLIPImg2ImgPipeline, its saved folder)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from latent_diffusion.models.clip import clip_vision_config

    ref_t2i, _ = unclip
    torch.manual_seed(5)
    ref = diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(size=32, crop_size=32),
        image_encoder=CLIPVisionModelWithProjection(clip_vision_config("tiny")).eval(),
        **{k: getattr(ref_t2i, k) for k in ("image_normalizer", "image_noising_scheduler", "tokenizer",
                                            "text_encoder", "unet", "scheduler", "vae")})
    ref.set_progress_bar_config(disable=True)
    folder = tmp_path_factory.mktemp("unclip-img2img") / "pipe"
    ref.save_pretrained(folder)
    return ref, folder


def _run_diffusers(ref, generator_seed: int, **kw):
    """diffusers' images (np) and the image embeddings its prior sampled (None for image variations)."""
    seen = []
    noise = ref.noise_image_embeddings

    def spy(image_embeds, **kwargs):
        seen.append(image_embeds.clone())
        return noise(image_embeds=image_embeds, **kwargs)

    ref.noise_image_embeddings = spy
    try:
        images = ref(generator=torch.Generator().manual_seed(generator_seed), output_type="np", **kw).images
    finally:
        del ref.noise_image_embeddings
    return images, seen[0]


def test_text_to_image_matches_diffusers_and_round_trips(unclip, tmp_path):
    ref, folder = unclip
    kw = dict(prior_num_inference_steps=5, prior_guidance_scale=4.0, noise_level=100, **STEPS)
    expected, expected_embeds = _run_diffusers(ref, 7, prompt=PROMPT, **kw)

    pipe = TextToImagePipeline.from_diffusers(folder)
    c = pipe.config
    assert (c.decoder_sampling.sampler, c.decoder_sampling.steps_offset, c.decoder_sampling.final_sigma) == \
        ("ddim", 1, "min")
    assert (c.prior_sampling.sampler, c.prior_clip_denoised, c.text_attention_mask) == ("ddpm", 5.0, False)
    out = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", progress=False, **kw)
    assert out.images.shape == expected.shape == (1, 16, 16, 3)
    torch.testing.assert_close(out.image_embeds, expected_embeds, atol=1e-4, rtol=0)
    assert np.abs(out.images - expected).max() < 2e-5  # measured 2.8e-6
    # noise_level matters (and a different one breaks the match)
    other = pipe(PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", progress=False,
                 **{**kw, "noise_level": 600})
    assert np.abs(other.images - expected).max() > 1e-3
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 999\], got 1000"):
        pipe(PROMPT, **{**kw, "noise_level": 1000})

    pipe.save_pretrained(tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model_index.json").read_text())
    assert {"prior_tokenizer", "prior_text_encoder", "image_normalizer"} <= set(index["components"])
    assert index["components"]["text_encoder"] == "CLIPTextModel"
    again = TextToImagePipeline.from_pretrained(tmp_path / "ours")(
        PROMPT, generator=torch.Generator().manual_seed(7), output_type="np", progress=False, **kw)
    np.testing.assert_array_equal(again.images, out.images)


def test_image_variations_match_diffusers(unclip_img2img):
    ref, folder = unclip_img2img
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    expected, expected_embeds = _run_diffusers(ref, 3, image=image, noise_level=50, **STEPS)
    pipe = TextToImagePipeline.from_diffusers(folder)
    assert pipe.prior is None and pipe.image_encoder is not None
    torch.testing.assert_close(pipe.encode_image(image), expected_embeds, atol=1e-5, rtol=0)
    out = pipe.image_variations(image, generator=torch.Generator().manual_seed(3), noise_level=50,
                                output_type="np", progress=False, **STEPS)
    assert np.abs(out.images - expected).max() < 2e-5


@pytest.mark.parametrize("scheduler, options", [
    ("EulerDiscreteScheduler", {}),  # linspace: fractional timesteps (5 steps), start noise σ_max
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),  # rounded timesteps on Karras sigmas
    ("DDIMScheduler", {"timestep_spacing": "trailing", "steps_offset": 0}),  # 5 steps divide T = 1000
])
def test_decoder_schedulers_match_diffusers(unclip_img2img, scheduler, options):
    """The decoder's scheduler config, converted, walks diffusers' chain: same images from the same generator."""
    from dataclasses import replace

    from latent_diffusion.convert import sampling_from_diffusers

    ref, folder = unclip_img2img
    original = ref.scheduler
    ref.scheduler = new = getattr(diffusers, scheduler).from_config(original.config, **options)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    steps = {**STEPS, "num_inference_steps": 5}
    try:
        expected, _ = _run_diffusers(ref, 3, image=image, noise_level=50, **steps)
    finally:
        ref.scheduler = original
    raw = {"_class_name": scheduler, **new.config}  # what its scheduler_config.json holds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DDIM's trailing warning: exact only when the step count divides T
        sampling, _ = sampling_from_diffusers(raw, scheduler)
    assert sampling.sampler == {"DDIMScheduler": "ddim", "EulerDiscreteScheduler": "ddim",
                                "EulerAncestralDiscreteScheduler": "euler_ancestral"}.get(scheduler, "dpmpp_2m")
    pipe = TextToImagePipeline.from_diffusers(folder)
    pipe.config = replace(pipe.config, decoder_sampling=sampling)
    out = pipe.image_variations(image, generator=torch.Generator().manual_seed(3), noise_level=50,
                                output_type="np", progress=False, **steps)
    assert np.abs(out.images - expected).max() < 2e-5


def test_prior_transformer_forward_matches_and_unsupported_options_are_named(tmp_path):
    torch.manual_seed(0)
    ref = _perturb(diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=20,
                                              embedding_proj_dim=24, num_layers=2, num_embeddings=6,
                                              norm_in_type="layer"), 1, 0.2)
    ref.save_pretrained(tmp_path / "prior")
    ours = DiffusionPrior.from_diffusers(tmp_path / "prior")
    assert (ours.config.width, ours.config.text_embed_dim, ours.config.norm_in) == (24, 24, True)
    g = torch.Generator().manual_seed(2)
    x, proj = torch.randn(2, 20, generator=g), torch.randn(2, 24, generator=g)
    states = torch.randn(2, 6, 20, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    t = torch.tensor([5, 900])
    with torch.no_grad():
        expected = ref(x, t, proj, states, mask).predicted_image_embedding
        torch.testing.assert_close(ours(x, t.float(), states, proj, mask), expected, atol=1e-5, rtol=0)
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    (tmp_path / "prior" / "config.json").write_text(json.dumps({**config, "embedding_proj_norm_type": "layer"}))
    with pytest.raises(ValueError, match="embedding_proj_norm_type='layer'"):
        DiffusionPrior.from_diffusers(tmp_path / "prior")


def test_missing_or_unsupported_components_are_named(unclip, tmp_path):
    _, folder = unclip
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    index = json.loads((folder / "model_index.json").read_text())

    def write(**changes):
        (broken / "model_index.json").write_text(json.dumps({**index, **changes}))

    write(prior=[None, None])
    with pytest.raises(ValueError, match="needs a 'prior' component"):
        TextToImagePipeline.from_diffusers(broken)
    write(unet=["diffusers", "UNet2DModel"])
    with pytest.raises(ValueError, match="component 'unet' is a UNet2DModel"):
        TextToImagePipeline.from_diffusers(broken)
    write(_class_name="StableDiffusionXLPipeline")
    with pytest.raises(ValueError, match="unsupported pipeline 'StableDiffusionXLPipeline'"):
        TextToImagePipeline.from_diffusers(broken)
    write()
    shutil.rmtree(broken / "image_normalizer")
    with pytest.raises(FileNotFoundError, match="image_normalizer"):
        TextToImagePipeline.from_diffusers(broken)


def test_scheduler_mapping():
    from latent_diffusion.convert import sampling_from_diffusers, schedule_from_diffusers

    def raw(scheduler) -> dict:  # what scheduler_config.json holds
        return {"_class_name": type(scheduler).__name__, **scheduler.config}

    pndm = raw(diffusers.PNDMScheduler(beta_schedule="scaled_linear", steps_offset=1))
    with pytest.warns(UserWarning, match="replaced by our 'dpmpp_2m'"):
        sampling, clip = sampling_from_diffusers(pndm, "pndm")
    assert (sampling.sampler, sampling.timestep_spacing, sampling.steps_offset, clip) == ("dpmpp_2m", "leading", 1,
                                                                                          None)
    # a config without timestep_spacing takes the scheduler's own default ("linspace" for UniPC, Heun, ...)
    for cls, spacing in ((diffusers.UniPCMultistepScheduler, "linspace_dpm"), (diffusers.HeunDiscreteScheduler,
                                                                                "linspace_dpm"),
                         (diffusers.PNDMScheduler, "leading")):
        bare = {k: v for k, v in raw(cls()).items() if k != "timestep_spacing"}
        with pytest.warns(UserWarning, match="replaced by our 'dpmpp_2m'"):
            assert sampling_from_diffusers(bare, cls.__name__)[0].timestep_spacing == spacing
    # DPM-Solver's "leading" is its own rule (T // (n+1) apart), common in configs derived from a DDIM one
    dpm = raw(diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", timestep_spacing="leading",
                                                    steps_offset=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact conversion says nothing
        sampling, _ = sampling_from_diffusers(dpm, "dpm")
    reference = diffusers.DPMSolverMultistepScheduler.from_config(dpm)
    reference.set_timesteps(10)
    ours = NoiseSchedule(schedule_from_diffusers(dpm, "dpm")).timesteps(10, sampling.timestep_spacing,
                                                                         sampling.steps_offset)
    assert ours.tolist() == reference.timesteps.tolist()
    for option in ({"solver_type": "heun"}, {"use_lu_lambdas": True}, {"use_exponential_sigmas": True},
                   {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"}):
        with pytest.warns(UserWarning, match="replaced by our 'dpmpp_2m'"):
            sampling_from_diffusers({**dpm, **option}, "dpm")
    karlo = raw(diffusers.UnCLIPScheduler(clip_sample_range=5.0, prediction_type="sample"))
    sampling, clip = sampling_from_diffusers(karlo, "karlo")
    assert (sampling.sampler, sampling.timestep_spacing, clip) == ("ddpm", "linspace", 5.0)
    assert schedule_from_diffusers(karlo, "karlo").beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="variance_type='fixed_large'"):
        sampling_from_diffusers(raw(diffusers.DDPMScheduler(variance_type="fixed_large")), "ddpm")
    assert sampling_from_diffusers({**raw(diffusers.DDPMScheduler()), "variance_type": None}, "ddpm")[0].sampler \
        == "ddpm"  # diffusers reads null as fixed_small
    with pytest.warns(UserWarning, match="steps from t to t - T//n"):  # diffusers' DDIM is inconsistent there
        sampling_from_diffusers(raw(diffusers.DDIMScheduler(timestep_spacing="linspace")), "ddim")
    for option in ({"use_karras_sigmas": True}, {"interpolation_type": "log_linear"}):
        with pytest.warns(UserWarning, match="replaced by our 'dpmpp_2m'"):
            sampling_from_diffusers({**raw(diffusers.EulerDiscreteScheduler()), **option}, "euler")
    with pytest.raises(ValueError, match="unsupported scheduler 'FlowMatchEulerDiscreteScheduler'"):
        sampling_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "flow")


def test_lora_finetune_of_a_converted_img2img_pipeline(unclip_img2img, tmp_path):
    """The decoder trains on noise-augmented (2·D) image embeddings, as Stable unCLIP conditions it."""
    import json

    import numpy as np
    from accelerate.state import AcceleratorState
    from PIL import Image

    from training import finetune

    _, folder = unclip_img2img
    ours = tmp_path / "ours"
    TextToImagePipeline.from_diffusers(folder).save_pretrained(ours)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a red circle"})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    try:
        finetune.main(["--pipeline", str(ours), "--train-data-dir", str(images), "--method", "lora",
                       "--components", "decoder", "--rank", "4", "--max-steps", "2", "--batch-size", "2",
                       "--learning-rate", "1e-2", "--validation_steps", "2", "--output-dir", str(tmp_path / "lora")])
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
    pipe = TextToImagePipeline.from_pretrained(ours)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", progress=False)
    base = pipe.image_variations(image, **kw).images
    pipe.load_lora(tmp_path / "lora")
    kw["generator"] = torch.Generator().manual_seed(0)
    assert np.abs(pipe.image_variations(image, **kw).images - base).max() > 1e-4
