"""Text-to-image with a CLIP prior and a latent decoder (unCLIP, Ramesh et al. 2022; latent decoding as in
Rombach et al. 2022):

    prompt → CLIP tokenizer → CLIP text encoder → (token states, pooled embedding)
           → diffusion prior → CLIP image embedding
           → decoder UNet denoising latents (classifier-free guidance) → VAE decoder → image

A pipeline folder has `model_index.json` (which components exist, the noise schedules and sampling settings)
and one subfolder per component: `tokenizer/`, `text_encoder/`, `image_encoder/` (optional), `prior/`
(optional), `decoder/`, `vae/`, each holding `config.json` + `model.safetensors` (the tokenizer its vocabulary).
Optional as well: `prior_tokenizer/` + `prior_text_encoder/` when the prior reads the prompt with its own CLIP
(Stable unCLIP with the Karlo prior), and `image_normalizer/` when the decoder takes noise-augmented image
embeddings (`PipelineConfig.image_noising_schedule`, see `latent_diffusion.models.image_normalizer`).
`latent_diffusion.pipeline_config` holds the settings `model_index.json` records; `latent_diffusion.pipeline_folder`
reads and writes these folders; `TextToImagePipeline.from_diffusers` converts
diffusers' Stable unCLIP folders (`latent_diffusion.convert`). The image-conditioned calls (variations,
interpolation, img2img) are in `latent_diffusion.image_tasks`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from latent_diffusion.checks import (
    check_count,
    check_fraction,
    check_scale,
    device_and_dtype,
    is_int,
    prompt_list,
)
from latent_diffusion.diffusion import (
    SAMPLERS,
    Denoiser,
    NoiseSchedule,
    ScheduleConfig,
    batched_cfg,
    batched_dual_cfg,
    clamped,
    default_sampling,
    get_sampler,
    initial_noise_scale,
)
from latent_diffusion.image_tasks import ImageTasks, images_to_tensor, slerp
from latent_diffusion.models import AutoencoderKL, DiffusionPrior, ImageNormalizer, UNet, noise_augment
from latent_diffusion.models.clip import clip_image_preprocess, encode_text
from latent_diffusion.pipeline_config import (
    OUTPUT_TYPES,
    Encoded,
    Generators,
    OutputType,
    PipelineConfig,
    PipelineOutput,
    SamplingConfig,
)


class TextToImagePipeline(ImageTasks):
    """Generate images from prompts. Components: a `transformers` CLIP tokenizer and text encoder
    (`CLIPTextModelWithProjection`, or a plain `CLIPTextModel` for a decoder that reads only the token states),
    an optional `DiffusionPrior` (with, optionally, its own `prior_tokenizer` / `prior_text_encoder`; by default
    it reads the decoder's), an optional CLIP image encoder (`CLIPVisionModelWithProjection`, for image
    variations), an optional `ImageNormalizer` (noise augmentation), the decoder `UNet` and the `AutoencoderKL`."""

    def __init__(self, tokenizer: Any, text_encoder: Any, decoder: UNet, vae: AutoencoderKL,
                 prior: DiffusionPrior | None = None, image_encoder: Any = None,
                 config: PipelineConfig | None = None, *, prior_tokenizer: Any = None, prior_text_encoder: Any = None,
                 image_normalizer: ImageNormalizer | None = None):
        self.tokenizer, self.text_encoder, self.decoder, self.vae = tokenizer, text_encoder, decoder, vae
        self.prior, self.image_encoder = prior, image_encoder
        self.prior_tokenizer, self.prior_text_encoder = prior_tokenizer, prior_text_encoder
        self.image_normalizer = image_normalizer
        self.config = config = config or PipelineConfig()
        # LoRAs baked into the weights (`latent_diffusion.lora.fuse_lora`): {"path", "components", "digests",
        # "scale"} each, saved in model_index.json so that loading the same LoRA again is refused
        self.fused_loras: list[dict[str, Any]] = []
        self._lora_record: dict[str, Any] | None = None  # the LoRA loaded now (`load_lora`)
        if prior is not None and not decoder.config.uses_image_embeds:
            raise ValueError("a prior needs a decoder conditioned on image embeddings (UNetConfig.image_embed_dim)")
        if (prior_tokenizer is None) != (prior_text_encoder is None):
            raise ValueError("pass prior_tokenizer and prior_text_encoder together (or neither: the prior then "
                             "reads the decoder's tokenizer and text encoder)")
        if image_normalizer is not None and config.image_noising_schedule is None:
            raise ValueError("an image_normalizer needs PipelineConfig.image_noising_schedule")
        if config.image_noising_schedule is not None:  # the decoder takes [noised embedding, level embedding]
            width = decoder.config.image_embed_dim
            embed = (image_normalizer.config.embed_dim if image_normalizer is not None
                     else prior.config.embed_dim if prior is not None else None)
            if width is None or (embed is not None and width != 2 * embed):
                raise ValueError(f"noise-augmented image embeddings need a decoder with image_embed_dim = 2 × the "
                                 f"embedding width ({embed}), got image_embed_dim={width}")
        for m in self._modules().values():
            m.eval().requires_grad_(False)

    # --- components and persistence -----------------------------------------------------------------
    def _modules(self) -> dict[str, torch.nn.Module]:
        mods = {"text_encoder": self.text_encoder, "prior_text_encoder": self.prior_text_encoder,
                "decoder": self.decoder, "vae": self.vae, "prior": self.prior, "image_encoder": self.image_encoder,
                "image_normalizer": self.image_normalizer}
        return {k: v for k, v in mods.items() if v is not None}

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | str | None = None) -> TextToImagePipeline:
        """Move and/or cast every model component in place; `pipe.to(torch.float16)` casts, as in diffusers.
        Returns the pipeline."""
        device, dtype = device_and_dtype(device, dtype)
        for m in self._modules().values():
            m.to(device=device, dtype=dtype)
        return self

    def apply_speed(self, **switches: Any) -> TextToImagePipeline:
        """`speed.apply_speed(component, **switches)` on every model component, in place; a switch that does not
        concern a component (upsampling in the prior, say) leaves it as is. Results change by float rounding
        only. On a CPU, `pipe.apply_speed(channels_last=True, onednn=True, upsample=True)` is what
        `latent-diffusion generate --fast` does (BENCHMARKS.md, "Pipeline latency"). Apply after `load_lora`,
        and without `fuse=True` when a LoRA is loaded: the adapters wrap the q/k/v projections that fusion
        replaces, so `speed.fuse_qkv` refuses them. Returns the pipeline."""
        from latent_diffusion import speed

        for m in self._modules().values():
            speed.apply_speed(m, **switches)
        return self

    # --- LoRA adapters (implemented in latent_diffusion.lora) ----------------------------------------
    def load_lora(self, path: str | Path, scale: float = 1.0, components: str | list[str] | None = None) -> list[str]:
        """Load a LoRA adapter folder written by `training.finetune`; returns the components it adapts."""
        from latent_diffusion.lora import load_lora

        return load_lora(self, path, scale, components)

    def set_lora_scale(self, scale: float) -> None:
        """Scale the loaded LoRA's update (0 gives the base model's outputs)."""
        from latent_diffusion.lora import set_lora_scale

        set_lora_scale(self, scale)

    def fuse_lora(self) -> None:
        """Merge the LoRA update into the base weights (faster sampling; `unfuse_lora` undoes it)."""
        from latent_diffusion.lora import fuse_lora

        fuse_lora(self)

    def unfuse_lora(self) -> None:
        from latent_diffusion.lora import unfuse_lora

        unfuse_lora(self)

    def unload_lora(self) -> None:
        """Remove the LoRA layers (a fused update stays in the weights)."""
        from latent_diffusion.lora import unload_lora

        unload_lora(self)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | str | None = None,
                        components: str | list[str] | None = None) -> None:
        """Write the pipeline folder (see the module docstring and `latent_diffusion.pipeline_folder`). `dtype`
        (torch.float16 or "float16", say) shrinks weights. `components` writes only those (plus
        `model_index.json`), leaving the others' files untouched."""
        from latent_diffusion.pipeline_folder import save_pipeline

        save_pipeline(self, folder, dtype, components)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> TextToImagePipeline:
        """Load a pipeline folder written by `save_pretrained`. Weights stored in half precision are upcast
        to `dtype` (fp32 by default; also by name, "float16"; a dtype in `device`'s place is taken as `dtype`)."""
        from latent_diffusion.pipeline_folder import load_pipeline

        device, dtype = device_and_dtype(device, dtype)  # before loading; from_pretrained(path, torch.float16)
        pipe = load_pipeline(cls, folder, dtype)
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def from_diffusers(cls, folder: str | Path, device: str | torch.device | None = None) -> TextToImagePipeline:
        """Convert a diffusers `StableUnCLIPPipeline` (text-to-image with a Karlo-style prior) or
        `StableUnCLIPImg2ImgPipeline` (image variations) folder; see `latent_diffusion.convert`."""
        from latent_diffusion.convert import pipeline_from_diffusers

        pipe = pipeline_from_diffusers(folder)
        return pipe.to(device) if device is not None else pipe

    # --- conditioning -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Encoded:
        """prompts → the decoder's text conditioning: (token states (B, L, D_text), pooled embeddings (B, P),
        attention mask (B, L))."""
        states, pooled, mask = encode_text(self.tokenizer, self.text_encoder, prompts, device=self.device,
                                           use_attention_mask=self.config.text_attention_mask,
                                           token_embeddings=self.config.decoder_token_embeddings)
        return states.to(self.dtype), pooled.to(self.dtype), mask

    @property
    def _prior_reads_decoder_text(self) -> bool:
        return self.prior_text_encoder is None and not self.config.decoder_token_embeddings and \
            self.config.prior_text_attention_mask == self.config.text_attention_mask

    @torch.no_grad()
    def encode_prior_prompt(self, prompts: list[str]) -> Encoded:
        """prompts → the prior's text conditioning (as `encode_prompt`, through the prior's own tokenizer and
        text encoder when it has them)."""
        own = self.prior_text_encoder is not None
        tokenizer = self.prior_tokenizer if own else self.tokenizer
        encoder = self.prior_text_encoder if own else self.text_encoder
        states, pooled, mask = encode_text(tokenizer, encoder, prompts, device=self.device,
                                           use_attention_mask=self.config.prior_text_attention_mask)
        return states.to(self.dtype), pooled.to(self.dtype), mask

    @torch.no_grad()
    def encode_image(self, images: Any) -> torch.Tensor:
        """PIL image(s), image file path(s) or a tensor (B, 3, H, W) in [0, 1] → CLIP image embeddings (B, D)."""
        if self.image_encoder is None:
            raise ValueError("this pipeline has no image_encoder; image variations need one")
        pixels = images_to_tensor(images, self.device, torch.float32)  # resampling kernels want fp32 on CPU
        size = self.image_encoder.config.image_size
        pixels = clip_image_preprocess(pixels, size, self.config.image_mean, self.config.image_std)
        return self.image_encoder(pixel_values=pixels.to(self.dtype)).image_embeds

    @torch.no_grad()
    def augment_image_embeds(self, embeds: torch.Tensor, generators: list[torch.Generator],
                             noise_level: int | None = None) -> torch.Tensor:
        """CLIP image embeddings (B, D) → the decoder's image input: unchanged, or with an image-noising
        schedule the noise-augmented (B, 2D) (`noise_augment`; one draw of noise per image, even at level 0)."""
        schedule = self.config.image_noising_schedule
        if schedule is None:
            return embeds
        noise = _randn(tuple(embeds.shape), generators, self.device, self.dtype)
        return noise_augment(embeds, noise, self._noise_level(noise_level), NoiseSchedule(schedule),
                             self.image_normalizer)

    def _noise_level(self, noise_level: int | None) -> int:
        """The call's noise level, else the configured one, checked against the image-noising schedule."""
        level = self.config.noise_level if noise_level is None else noise_level
        schedule = self.config.image_noising_schedule
        T = schedule.num_train_timesteps if schedule is not None else None
        if T is None and noise_level is not None:
            raise ValueError("noise_level applies to noise-augmented decoders only "
                             "(PipelineConfig.image_noising_schedule is None)")
        if T is not None and not 0 <= level < T:
            raise ValueError(f"noise_level must be in [0, {T - 1}], got {level}")
        return level

    # --- sampling -----------------------------------------------------------------------------------
    def _walk(self, model: torch.nn.Module, schedule: ScheduleConfig, sampling: SamplingConfig | None, sampler: str,
              steps: int) -> tuple[Denoiser, torch.Tensor, float]:
        """(`model` as a denoiser over `schedule`, the (steps+1,) sigmas the call walks, the start noise's std):
        the model's own `SamplingConfig` when the call uses its sampler, else `PipelineConfig.timestep_spacing` or
        the sampler's default spacing."""
        noise = NoiseSchedule(schedule)
        if sampling is not None and sampling.sampler == sampler:
            sigmas = noise.sampling_sigmas(steps, spacing=sampling.timestep_spacing, steps_offset=sampling.steps_offset,
                                           karras=sampling.karras, final_sigma=sampling.final_sigma)
            quantize, scale = sampling.round_timesteps, sampling.init_noise
            # diffusers' Euler schedulers condition on the fractional timesteps themselves
            linear = sampling.timestep_spacing == "linspace_float" and not sampling.karras
        else:
            spacing = self.config.timestep_spacing or default_sampling(sampler)["spacing"]
            sigmas, quantize, scale, linear = noise.sampling_sigmas(steps, spacing=spacing), False, "vp", False
        denoise = Denoiser(model, noise, quantize=quantize, dtype=self.dtype, linear_t=linear)
        init = sigmas[0].item() if scale == "sigma_max" else initial_noise_scale(sigmas[0].item())
        return denoise, sigmas.to(self.device), init

    def _samplers(self, sampler: str | None, prior_sampler: str | None) -> tuple[str, str]:
        """The (decoder, prior) samplers of a call: the named ones, else the configured defaults."""
        c = self.config
        if sampler is None:
            sampler = c.decoder_sampling.sampler if c.decoder_sampling else "dpmpp_2m"
        if prior_sampler is None:
            prior_sampler = c.prior_sampling.sampler if c.prior_sampling else sampler
        for name, value in (("sampler", sampler), ("prior_sampler", prior_sampler)):
            if value not in SAMPLERS:
                raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(SAMPLERS)}")
        return sampler, prior_sampler

    @torch.no_grad()
    def sample_prior(self, text: Encoded, uncond: Encoded, generators: list[torch.Generator], steps: int,
                     guidance_scale: float, sampler: str, progress: bool = False) -> torch.Tensor:
        """Sample CLIP image embeddings (B, D) from the prior given the prompts and the negative ones, both
        encoded by `encode_prior_prompt`. Draws the start noise, then the sampler's noise, from `generators`."""
        prior = self.prior
        assert prior is not None
        denoise, sigmas, init = self._walk(prior, self.config.prior_schedule, self.config.prior_sampling, sampler,
                                           steps)
        clip = self.config.prior_clip_denoised
        states, pooled, mask = (torch.cat([u, c]) for u, c in zip(uncond, text))

        def single(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return denoise(x, sigma, text_states=text[0], text_embeds=text[1], text_mask=text[2])

        def doubled(x2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:  # [uncond; cond] (2B, D)
            return denoise(x2, sigma2, text_states=states, text_embeds=pooled, text_mask=mask)

        # Karlo clips the guided x0 (diffusers' clip_sample), not each branch
        guided = clamped(single if guidance_scale == 1.0 else batched_cfg(doubled, guidance_scale), clip)

        # the sampler's state stays float32 whatever the model's dtype (see `Denoiser`)
        x = _randn((len(generators), prior.config.embed_dim), generators, self.device, torch.float32) * init
        x = _run_sampler(sampler, guided, x, sigmas, generators, "prior", progress, schedule=denoise.schedule)
        return prior.denormalize(_vp_sample(x, sigmas)).to(self.dtype)

    @torch.no_grad()
    def sample_latents(self, text: Encoded, uncond: Encoded, image_embeds: torch.Tensor | None,
                       generators: list[torch.Generator], shape: tuple[int, int], steps: int,
                       guidance_scale: float, sampler: str, guidance_rescale: float = 0.0,
                       latents: torch.Tensor | None = None, start: int = 0, progress: bool = False,
                       callback: Any = None, noise_level: int | None = None,
                       image_guidance_scale: float | None = None) -> torch.Tensor:
        """Denoise decoder latents (B, C, h, w). `image_embeds` are CLIP image embeddings (B, D), noise-augmented
        here first when the pipeline has an image-noising schedule (their noise is drawn before the latents').
        The unconditional branch gets the negative prompt and the null (all-zero) decoder image input — what
        conditioning dropout trained. `image_guidance_scale` (None: `guidance_scale`) guides towards the image
        embedding separately from the text (`batched_dual_cfg`: three decoder rows per image; 0 conditions on the
        text alone). `start` skips the first sampling steps (img2img): then `latents` are clean latents noised to
        that step here."""
        denoise, sigmas, init = self._walk(self.decoder, self.config.decoder_schedule, self.config.decoder_sampling,
                                           sampler, steps)
        sigmas = sigmas[start:]
        clip = self.config.decoder_clip_denoised
        B = len(generators)
        img_c = None if image_embeds is None else self.augment_image_embeds(image_embeds, generators, noise_level)
        img_u = None if img_c is None else torch.zeros_like(img_c)
        both_img = None if img_c is None else torch.cat([img_u, img_c])
        states = torch.cat([uncond[0], text[0]])
        pooled = torch.cat([uncond[1], text[1]])

        def single(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            return denoise(x, sigma, text_states=text[0], image_embeds=img_c, text_embeds=text[1])

        def doubled(x2: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:  # [uncond; cond] (2B, C, h, w)
            return denoise(x2, sigma2, text_states=states, image_embeds=both_img, text_embeds=pooled)

        image_scale = guidance_scale if image_guidance_scale is None or img_c is None else image_guidance_scale
        if image_scale == 0.0 and img_c is not None:  # text alone: the image input is null in both rows
            img_c, both_img = img_u, torch.cat([img_u, img_u])
        if image_scale in (0.0, guidance_scale):
            guided = single if guidance_scale == 1.0 else batched_cfg(doubled, guidance_scale, guidance_rescale)
        else:
            # Rows [∅, ∅; text, ∅; text, image], built once rather than at every denoiser call.
            tripled_img = torch.cat([img_u, img_u, img_c])
            tripled_states = torch.cat([uncond[0], text[0], text[0]])
            tripled_pooled = torch.cat([uncond[1], text[1], text[1]])

            def tripled(x3: torch.Tensor, sigma3: torch.Tensor) -> torch.Tensor:  # (3B, C, h, w)
                return denoise(x3, sigma3, text_states=tripled_states, image_embeds=tripled_img,
                               text_embeds=tripled_pooled)

            guided = batched_dual_cfg(tripled, guidance_scale, image_scale, guidance_rescale)
        guided = clamped(guided, clip)

        C = self.decoder.config.in_channels
        # the sampler's state stays float32 whatever the model's dtype (see `Denoiser`)
        noise = _randn((B, C, *shape), generators, self.device, torch.float32)
        if latents is None:
            x = noise * init
        elif start > 0:
            x = latents.to(self.device, torch.float32) + sigmas[0] * noise  # VE: x = x0 + σ ε
        else:
            x = latents.to(self.device, torch.float32) * init
        x = _run_sampler(sampler, guided, x, sigmas, generators, "decoder", progress, callback,
                         schedule=denoise.schedule)
        return _vp_sample(x, sigmas)

    @contextmanager
    def _vae_precision(self) -> Iterator[torch.dtype]:
        """Yields the dtype to run the VAE in: float32 for the call when a float16 VAE's config sets
        `force_upcast` (diffusers' flag, on in converted configs: safer than diffusers' Stable unCLIP pipelines,
        which run it in float16), else the VAE's own dtype."""
        dtype = self.vae.decoder.conv_out.weight.dtype
        if not (self.vae.config.force_upcast and dtype == torch.float16):
            yield dtype
            return
        self.vae.float()
        try:
            yield torch.float32
        finally:
            self.vae.to(dtype)

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] → diffusion latents (B, C, H/f, W/f): the posterior's mode, scaled."""
        with self._vae_precision() as dtype:
            return self.vae.to_latents(self.vae.encode(pixels.to(dtype)).mode()).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: OutputType = "pil") -> Any:
        """Diffusion latents (B, C, h, w) → images in [0, 1] as `output_type` ("latent": the latents as they are)."""
        if output_type == "latent":
            return latents
        with self._vae_precision() as dtype:
            images = self.vae.decode(self.vae.from_latents(latents.to(dtype))).float()
        if not torch.isfinite(images).all():  # black images otherwise, with no other sign
            warnings.warn(f"the VAE decoded non-finite values in {dtype}: the images are wrong. A float16 VAE that "
                          "overflows runs in float32 with force_upcast=true in its config.json", stacklevel=2)
        images = ((images + 1) / 2).clamp(0, 1)  # (B, 3, H, W)
        if output_type == "pt":
            return images.cpu()
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    def _check(self, steps: int, guidance_scale: float, prior_guidance_scale: float, sampler: str,
               output_type: str, height: int | None, width: int | None) -> tuple[int, int]:
        check_count("num_inference_steps", steps)
        for name, value in (("guidance_scale", guidance_scale), ("prior_guidance_scale", prior_guidance_scale)):
            check_scale(name, value)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; choose one of {list(OUTPUT_TYPES)}")
        f = self.vae.config.downsample_factor
        height = self.config.sample_size if height is None else height
        width = self.config.sample_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not is_int(value) or value < f or value % f:
                raise ValueError(f"{name}={value!r} must be a positive multiple of the VAE factor {f}")
        return height // f, width // f

    def _generators(self, n: int, seed: int | None, generator: Generators) -> list[torch.Generator]:
        """One generator per image: image i uses seed + i, so an image from a batch equals the same seed alone.
        A single generator for a single image is used as it is: it then draws, in order, the prior's start
        noise, the prior sampler's noise, the image-embedding noise and the latents — diffusers' order."""
        if generator is not None:
            if seed is not None:
                raise ValueError("pass seed or generator, not both")
            gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
            if not all(isinstance(g, torch.Generator) for g in gens):
                raise ValueError(f"generator must be a torch.Generator or a list of them, got {generator!r} (pass "
                                 "seed= for an integer seed)")
            if len(gens) == 1 and n > 1:
                base = int(torch.randint(0, 2**62, (1,), generator=gens[0], device=gens[0].device).item())
                gens = [torch.Generator(device="cpu").manual_seed(base + i) for i in range(n)]
            if len(gens) != n:
                raise ValueError(f"got {len(gens)} generators for {n} images; pass one, or one per image")
            return gens
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        if not is_int(seed) or not -(2**63) <= int(seed) <= 2**64 - n:  # what manual_seed takes
            raise ValueError(f"seed must be an integer from -2**63 to 2**64 - {n} (image i uses seed + i), got "
                             f"{seed!r}")
        return [torch.Generator(device="cpu").manual_seed(int(seed) + i) for i in range(n)]

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | tuple[str, ...] | None = None,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 num_inference_steps: int = 25, prior_num_inference_steps: int = 25, guidance_scale: float = 5.0,
                 prior_guidance_scale: float = 4.0, sampler: str | None = None, prior_sampler: str | None = None,
                 guidance_rescale: float = 0.0, seed: int | None = None, generator: Generators = None,
                 latents: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None,
                 output_type: OutputType = "pil", progress: bool = True, callback: Any = None,
                 noise_level: int | None = None, image_guidance_scale: float | None = None) -> PipelineOutput:
        """Generate `num_images_per_prompt` images for each prompt.

        The prior (when present) samples a CLIP image embedding per image, with its own steps, guidance and
        sampler; `image_embeds` (B, D) skips it. Without a prior the decoder is conditioned on the text alone.
        `image_guidance_scale` guides the decoder towards that embedding separately from the text (`sample_latents`;
        default: the pipeline's `PipelineConfig.image_guidance_scale`, else `guidance_scale`).
        `sampler` / `prior_sampler` default to the pipeline's configured samplers (`PipelineConfig.
        decoder_sampling` / `prior_sampling`), else "dpmpp_2m" and the decoder's. `noise_level` overrides
        `PipelineConfig.noise_level` (noise-augmented decoders only). `seed` seeds image i with seed + i;
        `generator` may be one generator or one per image. Returns `PipelineOutput(images, image_embeds)`.

        Guidance with a separate image scale: the decoder's prediction is u + g (t − u) + g_img (f − t), with u the
        unconditional, t the text-only and f the text-and-image prediction. So `guidance_scale=0` is the
        unconditional prediction only with `image_guidance_scale=0`, and `guidance_scale=1` is unguided only with
        `image_guidance_scale` 1 (f) or 0 (t). `guidance_rescale` φ (Lin et al. 2024, §3.4) rescales the guided
        v-prediction, as the paper does, whatever the network predicts (diffusers' Stable Diffusion pipelines
        rescale ε for ε-prediction models, which differs).

        Seeding: each image's generator draws the prior's noise first, then the decoder's (diffusers' order). A
        call given `image_embeds` skips the prior, so with the same seed its decoder noise, and its image, differ
        from those of the call that sampled the embeddings; calls given the same embeddings and seed agree.

        `callback(info)` is called after each decoder step with a dict: `i` (the step), `sigma`, `sigma_next`,
        `x` (the sampler's state after the step, in the variance-exploding form x0 + sigma_next · ε: divide by
        sqrt(1 + sigma_next²) for diffusers-style latents) and `denoised` (the guided x0 prediction, in latent
        space).
        """
        prompts = prompt_list(prompt)
        check_count("num_images_per_prompt", num_images_per_prompt)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(n, str) for n in negative_prompt):
            negatives = list(negative_prompt)  # one per prompt
        else:
            raise ValueError(f"negative_prompt must be a string or a list of strings (one per prompt), got "
                            f"{negative_prompt!r}")
        if len(negatives) != len(prompts):
            raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts")
        sampler, prior_sampler = self._samplers(sampler, prior_sampler)
        shape = self._check(num_inference_steps, guidance_scale, prior_guidance_scale, sampler, output_type,
                            height, width)
        if self.prior is not None and image_embeds is None:
            check_count("prior_num_inference_steps", prior_num_inference_steps)
        self._noise_level(noise_level)
        image_guidance_scale = check_scale("image_guidance_scale",
                                           self.image_guidance(image_guidance_scale, guidance_scale))
        check_fraction("guidance_rescale", guidance_rescale)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable (it gets a dict per decoder step), got {callback!r}")
        n = num_images_per_prompt
        expected = (len(prompts) * n, self.decoder.config.in_channels, *shape)
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise ValueError(f"latents must be a torch.Tensor of shape {expected}, got {type(latents).__name__}")
        if image_embeds is not None and not self.decoder.config.uses_image_embeds:
            raise ValueError("image_embeds: this pipeline's decoder is conditioned on text alone (no "
                             "UNetConfig.image_embed_dim), so it takes no image embeddings")
        if image_embeds is not None and (not isinstance(image_embeds, torch.Tensor) or image_embeds.ndim != 2):
            got = f"shape {tuple(image_embeds.shape)}" if isinstance(image_embeds, torch.Tensor) else \
                type(image_embeds).__name__
            raise ValueError(f"image_embeds must be a torch.Tensor of shape (images, embedding width), got {got}")
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {expected} (images, "
                             "latent channels, height and width over the VAE factor): pass height/width to match")
        prompts = [p for p in prompts for _ in range(n)]
        negatives = [p for p in negatives for _ in range(n)]
        gens = self._generators(len(prompts), seed, generator)
        text = self.encode_prompt(prompts)
        uncond = self.encode_prompt(negatives)
        if image_embeds is None and self.prior is not None:
            prior_text, prior_uncond = (text, uncond) if self._prior_reads_decoder_text else \
                (self.encode_prior_prompt(prompts), self.encode_prior_prompt(negatives))
            image_embeds = self.sample_prior(prior_text, prior_uncond, gens, prior_num_inference_steps,
                                             prior_guidance_scale, prior_sampler, progress)
        elif image_embeds is not None:
            image_embeds = image_embeds.to(self.device, self.dtype)
            if image_embeds.shape[0] != len(prompts):
                raise ValueError(f"image_embeds has {image_embeds.shape[0]} rows for {len(prompts)} images")
        x = self.sample_latents(text, uncond, image_embeds, gens, shape, num_inference_steps, guidance_scale,
                                sampler, guidance_rescale, latents=latents, progress=progress, callback=callback,
                                noise_level=noise_level, image_guidance_scale=image_guidance_scale)
        return PipelineOutput(self.decode_latents(x, output_type), image_embeds)

    def image_guidance(self, image_guidance_scale: float | None, guidance_scale: float) -> float:
        """The decoder's guidance towards the image embedding that a text-to-image call uses: `image_guidance_scale`,
        else the pipeline's `PipelineConfig.image_guidance_scale`, else `guidance_scale` (plain guidance)."""
        for scale in (image_guidance_scale, self.config.image_guidance_scale):
            if scale is not None:
                return scale
        return guidance_scale

def _run_sampler(name: str, denoiser: Any, x: torch.Tensor, sigmas: torch.Tensor, generators: list[torch.Generator],
                 label: str, progress: bool, callback: Any = None,
                 schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """`get_sampler(name)(denoiser, x, sigmas, ...)` with a progress bar labelled `label` ("prior", "decoder")
    when `progress`; `callback` still sees every step. DDPM's last step draws (and adds no noise) when the walk's
    last timestep on `schedule` is > 0 (trailing spacing, a steps_offset), as diffusers' DDPM draws at every
    timestep > 0: the generators stay in step with diffusers' for what they draw next."""
    bar = tqdm(total=len(sigmas) - 1, desc=label, unit="step", disable=not progress)

    def step(info: dict[str, Any]) -> None:
        bar.update()
        if callback is not None:
            callback(info)

    try:
        last_t = float(schedule.sigma_to_t(sigmas[-2:-1].double().cpu())) if schedule is not None else 0.0
        extra = {"final_draw": True} if name == "ddpm" and last_t > 0.5 else {}
        return get_sampler(name)(denoiser, x, sigmas, generator=generators, callback=step, **extra)
    finally:
        bar.close()


def _vp_sample(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The sampler's last VE state x = x0 + σ ε as the VP sample x / sqrt(1 + σ²) that diffusers' schedulers
    return: x itself when the walk ends at σ = 0, scaled by sqrt(ᾱ_0) with `final_sigma="min"`."""
    last = float(sigmas[-1])
    return x if last == 0.0 else x / math.sqrt(1.0 + last**2)


def _randn(shape: tuple[int, ...], generators: list[torch.Generator], device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Row i drawn from generators[i], on the generator's device (CPU generators: results do not depend on the
    device the models run on)."""
    rows = [torch.randn(shape[1:], generator=g, dtype=torch.float32, device=g.device).cpu() for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


__all__ = ["PipelineConfig", "PipelineOutput", "TextToImagePipeline", "slerp"]
