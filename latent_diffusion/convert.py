"""Convert diffusers pipeline folders into a `TextToImagePipeline` (weights renamed, nothing unpickled).

Supported: `StableUnCLIPPipeline` (text to image: a Karlo-style `PriorTransformer` reading the prompt through its
own CLIP `prior_text_encoder`, then the Stable Diffusion 2.x UNet conditioned on the noise-augmented image
embedding) and `StableUnCLIPImg2ImgPipeline` (image variations: a CLIP image encoder instead of the prior).

| diffusers component                      | ours                                                          |
|------------------------------------------|---------------------------------------------------------------|
| tokenizer, text_encoder                  | tokenizer, text_encoder (the decoder's text)                  |
| prior_tokenizer, prior_text_encoder      | prior_tokenizer, prior_text_encoder                           |
| prior (PriorTransformer)                 | prior (`DiffusionPrior.from_diffusers`)                       |
| unet (UNet2DConditionModel)              | decoder (`UNet.from_diffusers`)                               |
| vae (AutoencoderKL)                      | vae (`AutoencoderKL.from_diffusers`)                          |
| image_normalizer                         | image_normalizer (`ImageNormalizer.from_diffusers`)           |
| image_encoder, feature_extractor         | image_encoder; the processor's mean/std → `PipelineConfig`    |
| scheduler, prior_scheduler               | `PipelineConfig` schedules + `SamplingConfig`s (see below)    |
| image_noising_scheduler                  | `PipelineConfig.image_noising_schedule`                       |

Schedulers become a `ScheduleConfig` (the training schedule) and a `SamplingConfig` (our sampler and its
timesteps). DDIM, DDPM (fixed_small variances), Euler and Euler-ancestral map onto "ddim", "ddpm", "ddim" (the
probability-flow Euler step in VE space is DDIM's, Karras et al. 2022, §4) and "euler_ancestral", and walk the
same chain from the same start (Euler's start noise is σ_max with linspace/trailing spacing, as diffusers'), with
one known departure from diffusers, warned about at conversion: DDIM with linspace or trailing spacing, where
diffusers steps from t to t − T//n rather than to the next listed timestep (a known inconsistency of its DDIM;
trailing equals it when the step count divides T, linspace almost never).
DPMSolverMultistep (dpmsolver++, order 2, midpoint, optionally Karras sigmas) maps onto "dpmpp_2m". UnCLIPScheduler
(Karlo) becomes "ddpm" on its linspace timesteps — the chain Karlo's own pipeline walks. Other schedulers
(PNDM/PLMS, LMS, Heun, UniPC, ...) and the options of these that we do not implement are replaced by "dpmpp_2m",
a deterministic multistep solver of the same order of quality, with a warning that names the replacement.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from latent_diffusion.diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES, ScheduleConfig
from latent_diffusion.io import read_json
from latent_diffusion.models import AutoencoderKL, DiffusionPrior, ImageNormalizer, UNet
from latent_diffusion.pipeline import PipelineConfig, SamplingConfig, TextToImagePipeline
from latent_diffusion.pipeline_folder import MODEL_INDEX, load_text_encoder, load_transformers

# pipeline class → the components it must have
PIPELINES: dict[str, tuple[str, ...]] = {
    "StableUnCLIPPipeline": ("prior_tokenizer", "prior_text_encoder", "prior", "prior_scheduler",
                             "image_normalizer", "image_noising_scheduler", "tokenizer", "text_encoder", "unet",
                             "scheduler", "vae"),
    "StableUnCLIPImg2ImgPipeline": ("feature_extractor", "image_encoder", "image_normalizer",
                                    "image_noising_scheduler", "tokenizer", "text_encoder", "unet", "scheduler",
                                    "vae"),
}
# schedulers we sample exactly as diffusers does, and those replaced by "dpmpp_2m"
EXACT_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "UnCLIPScheduler", "EulerDiscreteScheduler",
                    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")
REPLACED_SCHEDULERS = ("PNDMScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler",
                       "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler",
                       "DEISMultistepScheduler", "DPMSolverSinglestepScheduler")
_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_SCHEDULERS = EXACT_SCHEDULERS + REPLACED_SCHEDULERS
COMPONENT_CLASSES: dict[str, tuple[str, ...]] = {
    "tokenizer": _TOKENIZERS, "prior_tokenizer": _TOKENIZERS,
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "prior_text_encoder": ("CLIPTextModelWithProjection",),
    "prior": ("PriorTransformer",), "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",),
    "image_normalizer": ("StableUnCLIPImageNormalizer",),
    "image_encoder": ("CLIPVisionModelWithProjection",),
    "feature_extractor": ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil",
                          "CLIPFeatureExtractor"),
    "scheduler": _SCHEDULERS, "prior_scheduler": _SCHEDULERS, "image_noising_scheduler": _SCHEDULERS,
}
# diffusers' DDPM / DDIM spacing names → ours, per sampler (diffusers' "linspace" differs between schedulers)
_LINSPACE = {"DDIMScheduler": "linspace", "DDPMScheduler": "linspace", "EulerDiscreteScheduler": "linspace_float",
             "EulerAncestralDiscreteScheduler": "linspace_float", "DPMSolverMultistepScheduler": "linspace_dpm"}
_SIGMA_OPTIONS = ("karras_sigmas", "lu_lambdas", "exponential_sigmas", "beta_sigmas", "flow_sigmas")


def schedule_from_diffusers(raw: dict[str, Any], source: str) -> ScheduleConfig:
    """The training noise schedule of a diffusers scheduler config (diffusers' defaults for absent keys)."""
    name = raw.get("_class_name", "DDPMScheduler")
    if raw.get("trained_betas") is not None:
        raise ValueError(f"{source}: explicit trained_betas are not supported; use a named beta_schedule")
    beta_schedule = raw.get("beta_schedule", "squaredcos_cap_v2" if name == "UnCLIPScheduler" else "linear")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"{source}: unsupported beta_schedule={beta_schedule!r}; supported: {list(BETA_SCHEDULES)}")
    prediction_type = raw.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{source}: unsupported prediction_type={prediction_type!r}; "
                         f"supported: {list(PREDICTION_TYPES)}")
    return ScheduleConfig(num_train_timesteps=raw.get("num_train_timesteps", 1000), beta_schedule=beta_schedule,
                          beta_start=raw.get("beta_start", 0.0001), beta_end=raw.get("beta_end", 0.02),
                          rescale_zero_terminal_snr=raw.get("rescale_betas_zero_snr", False),
                          prediction_type=prediction_type)


def sampling_from_diffusers(raw: dict[str, Any], source: str) -> tuple[SamplingConfig, float | None]:
    """(our sampler with the timesteps the diffusers scheduler walks, the x0 clamp of its `clip_sample` or
    None), warning where the result cannot equal diffusers'."""
    name = raw.get("_class_name", "DDPMScheduler")
    if name not in _SCHEDULERS:
        raise ValueError(f"{source}: unsupported scheduler {name!r}; supported: {list(EXACT_SCHEDULERS)}, "
                         f"replaced by 'dpmpp_2m': {list(REPLACED_SCHEDULERS)}")
    if raw.get("thresholding", False):
        raise ValueError(f"{source}: dynamic thresholding (thresholding=true) is not supported")
    clip_default = name in ("DDIMScheduler", "DDPMScheduler", "UnCLIPScheduler")  # diffusers' defaults
    clip = raw.get("clip_sample_range", 1.0) if raw.get("clip_sample", clip_default) else None
    offset = raw.get("steps_offset", 0)
    if name == "UnCLIPScheduler":  # timesteps round(i (T-1)/(n-1)), stepping to the next one (Karlo)
        if raw.get("variance_type", "fixed_small_log") != "fixed_small_log":
            raise ValueError(f"{source}: unsupported variance_type={raw['variance_type']!r}; "
                             "supported: ['fixed_small_log']")
        return SamplingConfig("ddpm", "linspace", 0), clip
    # diffusers' default timestep_spacing: "leading" for DDPM, DDIM and PNDM, "linspace" for the others
    default_spacing = "leading" if name in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler") else "linspace"
    given_spacing = raw.get("timestep_spacing", default_spacing)
    spacing = _LINSPACE.get(name, "linspace") if given_spacing == "linspace" else given_spacing
    options: dict[str, Any] = {}
    exact = True
    if name == "DDPMScheduler":
        # diffusers reads a null variance_type as fixed_small
        if raw.get("variance_type") not in (None, "fixed_small", "fixed_small_log"):
            raise ValueError(f"{source}: unsupported variance_type={raw['variance_type']!r}; "
                             "supported: ['fixed_small', 'fixed_small_log']")
        sampler = "ddpm"
    elif name == "DDIMScheduler":
        sampler = "ddim"
        if clip is not None:
            warnings.warn(f"{source}: DDIM with clip_sample keeps the unclipped noise estimate; our DDIM derives it "
                          "from the clipped x0, so samples differ slightly from diffusers'", stacklevel=3)
        if given_spacing != "leading":
            warnings.warn(f"{source}: diffusers' DDIM with timestep_spacing={given_spacing!r} steps from t to "
                          "t - T//n rather than to the next listed timestep; ours walks the listed timesteps, so "
                          "samples differ from diffusers'" + (" unless the step count divides T"
                                                              if given_spacing == "trailing" else ""), stacklevel=3)
        if not raw.get("set_alpha_to_one", True):
            options["final_sigma"] = "min"
    elif name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        sampler = "ddim" if name == "EulerDiscreteScheduler" else "euler_ancestral"
        if given_spacing in ("linspace", "trailing"):
            options["init_noise"] = "sigma_max"
        exact = raw.get("interpolation_type", "linear") == "linear" \
            and raw.get("timestep_type", "discrete") == "discrete" \
            and raw.get("final_sigmas_type", "zero") == "zero" \
            and not any(raw.get(f"use_{kind}", False) for kind in _SIGMA_OPTIONS)
    else:
        # DPM-Solver++(2M) with the midpoint update on the scheduler's own or Karras sigmas is what `dpmpp_2m`
        # computes; with Karras sigmas diffusers feeds the network rounded timesteps
        sampler = "dpmpp_2m"
        exact = name == "DPMSolverMultistepScheduler" and raw.get("algorithm_type", "dpmsolver++") == "dpmsolver++" \
            and raw.get("solver_order", 2) == 2 and raw.get("solver_type", "midpoint") == "midpoint" \
            and raw.get("final_sigmas_type", "zero") == "zero" and raw.get("variance_type") is None \
            and raw.get("lambda_min_clipped", -math.inf) == -math.inf and not raw.get("euler_at_final", False) \
            and not any(raw.get(f"use_{kind}", False) for kind in _SIGMA_OPTIONS if kind != "karras_sigmas")
        if raw.get("use_karras_sigmas", False):
            # with squaredcos_cap_v2 diffusers truncates the unrounded timesteps into repeats (and can fail on them)
            exact = exact and raw.get("beta_schedule", "linear") != "squaredcos_cap_v2"
            options.update(karras=True, round_timesteps=True)
        if spacing == "leading" and name == "DPMSolverMultistepScheduler":  # its own "leading" rule
            spacing = "leading_dpm"
    if not exact:
        warnings.warn(f"{source}: {name} with this config is not implemented; it is replaced by our 'dpmpp_2m' "
                      "(DPM-Solver++(2M), deterministic, multistep); samples differ from diffusers'", stacklevel=3)
        sampler, options = "dpmpp_2m", {}
        spacing = "linspace_dpm" if given_spacing == "linspace" else spacing
    return SamplingConfig(sampler, spacing, offset, **options), clip


def _component_classes(folder: Path) -> tuple[str, dict[str, str]]:
    """(pipeline class, {component: class}) from a diffusers `model_index.json`, checking what is required."""
    index = read_json(folder / MODEL_INDEX)
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ValueError(f"{folder / MODEL_INDEX}: unsupported pipeline {kind!r}; supported: {list(PIPELINES)}")
    classes = {}
    for name in PIPELINES[kind]:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ValueError(f"{folder / MODEL_INDEX}: a {kind} needs a {name!r} component, but none is listed")
        if entry[1] not in COMPONENT_CLASSES[name]:
            raise ValueError(f"component {name!r} is a {entry[1]}, which is not supported; "
                             f"supported: {list(COMPONENT_CLASSES[name])}")
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"missing component folder {folder / name}")
        classes[name] = entry[1]
    return kind, classes


def pipeline_from_diffusers(folder: str | Path) -> TextToImagePipeline:
    """Load a diffusers `StableUnCLIPPipeline` or `StableUnCLIPImg2ImgPipeline` folder as a fp32
    `TextToImagePipeline` whose samples reproduce diffusers' for the same seed (one image, one
    `torch.Generator`; see `sampling_from_diffusers` for the schedulers that match)."""
    from transformers import CLIPTokenizer, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {folder}")
    kind, classes = _component_classes(folder)

    def scheduler(name: str) -> tuple[ScheduleConfig, SamplingConfig, float | None]:
        path = folder / name / "scheduler_config.json"
        raw = read_json(path)
        return (schedule_from_diffusers(raw, str(path)), *sampling_from_diffusers(raw, str(path)))

    decoder_schedule, decoder_sampling, decoder_clip = scheduler("scheduler")
    noising = schedule_from_diffusers(read_json(folder / "image_noising_scheduler" / "scheduler_config.json"),
                                      str(folder / "image_noising_scheduler"))
    unet_raw = read_json(folder / "unet" / "config.json")
    vae = AutoencoderKL.from_diffusers(folder / "vae")
    sample_size = unet_raw.get("sample_size") or 64
    if not isinstance(sample_size, int):
        sample_size = sample_size[0]
    text_encoder_raw = read_json(folder / "text_encoder" / "config.json")
    settings: dict[str, Any] = dict(
        decoder_schedule=decoder_schedule, decoder_sampling=decoder_sampling, decoder_clip_denoised=decoder_clip,
        sample_size=sample_size * vae.config.downsample_factor, timestep_spacing=None,
        # diffusers passes the padding mask to SD's text encoder only when its config asks for it
        text_attention_mask=bool(text_encoder_raw.get("use_attention_mask", False)),
        image_noising_schedule=noising, noise_level=0)
    components: dict[str, Any] = dict(
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=load_text_encoder(folder / "text_encoder", classes["text_encoder"], torch.float32),
        decoder=UNet.from_diffusers(folder / "unet"), vae=vae,
        image_normalizer=ImageNormalizer.from_diffusers(folder / "image_normalizer"))
    if kind == "StableUnCLIPPipeline":
        prior_schedule, prior_sampling, prior_clip = scheduler("prior_scheduler")
        settings.update(prior_schedule=prior_schedule, prior_sampling=prior_sampling, prior_clip_denoised=prior_clip,
                        prior_text_attention_mask=False)  # diffusers never masks the prior's text encoder
        components.update(
            prior=DiffusionPrior.from_diffusers(folder / "prior"),
            prior_tokenizer=CLIPTokenizer.from_pretrained(folder / "prior_tokenizer"),
            prior_text_encoder=load_text_encoder(folder / "prior_text_encoder", classes["prior_text_encoder"],
                                                  torch.float32))
    else:
        processor = read_json(folder / "feature_extractor" / "preprocessor_config.json")
        settings.update(image_mean=tuple(processor.get("image_mean", PipelineConfig.image_mean)),
                        image_std=tuple(processor.get("image_std", PipelineConfig.image_std)))
        components["image_encoder"] = load_transformers(CLIPVisionModelWithProjection, folder / "image_encoder",
                                                         dtype=torch.float32)
    c = components
    return TextToImagePipeline(c["tokenizer"], c["text_encoder"], c["decoder"], c["vae"], c.get("prior"),
                               c.get("image_encoder"), PipelineConfig(**settings),
                               prior_tokenizer=c.get("prior_tokenizer"),
                               prior_text_encoder=c.get("prior_text_encoder"),
                               image_normalizer=c["image_normalizer"])


__all__ = ["pipeline_from_diffusers", "sampling_from_diffusers", "schedule_from_diffusers"]
