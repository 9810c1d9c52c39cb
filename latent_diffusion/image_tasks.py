"""The pipeline's image-conditioned calls, mixed into `TextToImagePipeline`: image variations and interpolation
between CLIP image embeddings (unCLIP, Ramesh et al. 2022, §3.1–3.2) and SDEdit's img2img (Meng et al. 2022). Each
conditions the same prior, decoder and VAE as a text-to-image call, through the pipeline's own sampling methods."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from latent_diffusion.checks import IMAGE_SUFFIXES, check_count, check_fraction, check_scale, is_int, prompt_list
from latent_diffusion.pipeline_config import Generators, OutputType, PipelineOutput


class ImageTasks:
    """`image_variations`, `interpolate` and `img2img`, mixed into `TextToImagePipeline`. They rely on its
    components (`prior`, `decoder`, `vae`) and methods: `encode_prompt`, `encode_prior_prompt`, `encode_image`,
    `encode_latents`, `decode_latents`, `sample_prior`, `sample_latents`, `image_guidance`, and the checks
    `_check`, `_samplers`, `_generators` and `_prior_reads_decoder_text`."""

    def image_variations(self, image: Any, num_images_per_prompt: int = 1, num_inference_steps: int = 25,
                         guidance_scale: float = 5.0, sampler: str | None = None, seed: int | None = None,
                         generator: Generators = None, output_type: OutputType = "pil", progress: bool = True,
                         prompt: str = "", negative_prompt: str | None = None,
                         noise_level: int | None = None) -> PipelineOutput:
        """Variations of image(s): decode their CLIP image embeddings (unCLIP §3.1) with `prompt` (default empty;
        Stable unCLIP's image variations take one too) and, for noise-augmented decoders, `noise_level`."""
        check_count("num_images_per_prompt", num_images_per_prompt)
        if not self.decoder.config.uses_image_embeds:
            raise ValueError("image variations need a decoder conditioned on CLIP image embeddings; this pipeline's "
                             "decoder reads the text alone")
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be one string (for every image), got {prompt!r}")
        embeds = self.encode_image(image)
        embeds = embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return self([prompt] * (embeds.shape[0] // num_images_per_prompt), negative_prompt=negative_prompt,
                    num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, sampler=sampler, seed=seed, generator=generator,
                    image_embeds=embeds, output_type=output_type, progress=progress, noise_level=noise_level,
                    image_guidance_scale=guidance_scale)  # the image is the point here, whatever the default

    @torch.no_grad()
    def interpolate(self, a: str | Any, b: str | Any, num_steps: int = 5,
                    num_inference_steps: int = 25, guidance_scale: float = 5.0, prior_guidance_scale: float = 4.0,
                    sampler: str | None = None, seed: int | None = 0, output_type: OutputType = "pil",
                    progress: bool = True, image_guidance_scale: float | None = None,
                    prior_num_inference_steps: int = 25) -> PipelineOutput:
        """Images along the spherical interpolation (Shoemake 1985) between the CLIP image embeddings of `a` and
        `b` (prompts — strings — go through the prior; images — a PIL image, a `pathlib.Path` file or a tensor, as
        `encode_image` takes them — through the image encoder; unCLIP §3.2). Every frame uses the
        same seed (None: a random one); when both ends are prompts their text conditioning is interpolated linearly
        too, and the decoder's image guidance defaults as in a text-to-image call (`image_guidance`), else (an
        image at either end) to `guidance_scale`, as in `image_variations`. The prior samples with
        `prior_num_inference_steps`, as in a text-to-image call."""
        if not is_int(num_steps) or num_steps < 2:
            raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
        for end in (a, b):
            if isinstance(end, str) and end.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(end):
                warnings.warn(f"interpolate takes the string {end!r} as a prompt; pass pathlib.Path({end!r}) for "
                              "the image file", stacklevel=2)
        if not self.decoder.config.uses_image_embeds:
            raise ValueError("interpolation needs a decoder conditioned on CLIP image embeddings")
        sampler, prior_sampler = self._samplers(sampler, None)
        if image_guidance_scale is None and not (isinstance(a, str) and isinstance(b, str)):
            image_guidance_scale = guidance_scale  # an image at an end: its embedding is the point
        image_guidance_scale = check_scale("image_guidance_scale",
                                           self.image_guidance(image_guidance_scale, guidance_scale))
        seed = self._generators(1, seed, None)[0].initial_seed()
        shape = self._check(num_inference_steps, guidance_scale, prior_guidance_scale, sampler, output_type,
                            None, None)
        if isinstance(a, str) or isinstance(b, str):
            check_count("prior_num_inference_steps", prior_num_inference_steps)

        def embed(end: str | Any) -> torch.Tensor:
            if isinstance(end, str):
                if self.prior is None:
                    raise ValueError("interpolating prompts needs a prior")
                text, uncond = self.encode_prior_prompt([end]), self.encode_prior_prompt([""])
                return self.sample_prior(text, uncond, self._generators(1, seed, None), prior_num_inference_steps,
                                         prior_guidance_scale, prior_sampler, progress)
            embeds = self.encode_image(end)
            if embeds.shape[0] != 1:
                raise ValueError(f"each end of an interpolation is one image, got {embeds.shape[0]}")
            return embeds

        ea, eb = embed(a), embed(b)
        w = torch.linspace(0, 1, num_steps, device=self.device, dtype=self.dtype)
        embeds = torch.cat([slerp(ea, eb, float(t)) for t in w])
        prompts = [a if isinstance(a, str) and isinstance(b, str) else ""] * num_steps
        text = self.encode_prompt(prompts)
        if isinstance(a, str) and isinstance(b, str):
            tb = self.encode_prompt([b] * num_steps)
            lerp = w.view(-1, 1, 1)
            text = ((1 - lerp) * text[0] + lerp * tb[0], (1 - lerp[:, 0]) * text[1] + lerp[:, 0] * tb[1], text[2])
        uncond = self.encode_prompt([""] * num_steps)
        gens = [torch.Generator().manual_seed(seed) for _ in range(num_steps)]
        x = self.sample_latents(text, uncond, embeds, gens, shape, num_inference_steps, guidance_scale, sampler,
                                progress=progress, image_guidance_scale=image_guidance_scale)
        return PipelineOutput(self.decode_latents(x, output_type), embeds)

    @torch.no_grad()
    def img2img(self, image: Any, prompt: str | list[str], strength: float = 0.6, num_inference_steps: int = 25,
                guidance_scale: float = 5.0, prior_guidance_scale: float = 4.0, sampler: str | None = None,
                seed: int | None = None, generator: Generators = None, output_type: OutputType = "pil",
                progress: bool = True, image_guidance_scale: float | None = None,
                prior_num_inference_steps: int = 25) -> PipelineOutput:
        """SDEdit (Meng et al. 2022): noise the image's latents to `strength` of the schedule and denoise them
        towards `prompt`. strength 0 returns the (re-encoded) image; 1 ignores it and equals a text-to-image call
        with the same seed and settings. `image_guidance_scale` as in `__call__` (default: the pipeline's)."""
        strength = check_fraction("strength", strength)
        sampler, prior_sampler = self._samplers(sampler, None)
        image_guidance_scale = check_scale("image_guidance_scale",
                                           self.image_guidance(image_guidance_scale, guidance_scale))
        pixels = images_to_tensor(image, self.device, self.dtype)
        prompts = [prompt] * pixels.shape[0] if isinstance(prompt, str) else prompt_list(prompt)
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {pixels.shape[0]} images")
        f = self.vae.config.downsample_factor
        if pixels.shape[-2] % f or pixels.shape[-1] % f:
            raise ValueError(f"the image is {pixels.shape[-1]}×{pixels.shape[-2]} pixels; img2img needs a width and "
                             f"height that are multiples of the VAE factor {f}: resize or crop it first")
        shape = self._check(num_inference_steps, guidance_scale, prior_guidance_scale, sampler, output_type,
                            pixels.shape[-2], pixels.shape[-1])
        latents = self.encode_latents(pixels * 2 - 1)
        gens = self._generators(len(prompts), seed, generator)
        text, uncond = self.encode_prompt(prompts), self.encode_prompt([""] * len(prompts))
        embeds = None
        if self.prior is not None:
            prior_text, prior_uncond = (text, uncond) if self._prior_reads_decoder_text else \
                (self.encode_prior_prompt(prompts), self.encode_prior_prompt([""] * len(prompts)))
            check_count("prior_num_inference_steps", prior_num_inference_steps)
            embeds = self.sample_prior(prior_text, prior_uncond, gens, prior_num_inference_steps,
                                       prior_guidance_scale, prior_sampler)
        # floor, as SDEdit's implementations do: any strength below 1 keeps something of the image
        start = num_inference_steps - int(num_inference_steps * strength)
        if start >= num_inference_steps:
            return PipelineOutput(self.decode_latents(latents, output_type), embeds)
        # strength 1 starts from pure noise: the image is ignored.
        x = self.sample_latents(text, uncond, embeds, gens, shape, num_inference_steps, guidance_scale, sampler,
                                latents=latents if start > 0 else None, start=start, progress=progress,
                                image_guidance_scale=image_guidance_scale)
        return PipelineOutput(self.decode_latents(x, output_type), embeds)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (B, D), interpolating the norm linearly."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na, b / nb
    omega = torch.acos((ua * ub).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / so
    return direction * ((1 - t) * na + t * nb)


def images_to_tensor(images: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """PIL image(s) or image file path(s) (any mode: transparency on white) or a tensor (B, 3, H, W) / (3, H, W)
    in [0, 1] → (B, 3, H, W) in [0, 1]."""
    from latent_diffusion.data.image_text import open_image, to_rgb

    if isinstance(images, torch.Tensor):
        t = images if images.ndim == 4 else images[None]
        if not t.is_floating_point():
            raise ValueError(f"an image tensor must be floating point with values in [0, 1], got {t.dtype} (divide "
                             "8-bit images by 255)")
        # A resampled image overshoots [0, 1] a little (bicubic ringing): refuse only a range that is clearly
        # another convention ([-1, 1], 0..255), then clip.
        if t.numel() and not -0.1 <= t.min() <= t.max() <= 1.1:  # (NaN fails too)
            raise ValueError(f"an image tensor must have values in [0, 1], got [{t.min():.3g}, {t.max():.3g}] "
                             "(map [-1, 1] images with (x + 1) / 2)")
        t = t.clamp(0, 1)
    else:
        images = images if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("got an empty list of images; pass at least one")
        opened = []
        for im in images:
            if isinstance(im, (str, Path)):
                im = open_image({"path": str(im)})
            if not isinstance(im, Image.Image):
                raise TypeError(f"expected PIL images, image file paths or a (B, 3, H, W) tensor, got "
                                f"{type(im).__name__}")
            opened.append(to_rgb(im))
        arrays = [np.asarray(im, dtype=np.float32) / 255.0 for im in opened]
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise ValueError(f"images have different sizes {sorted(sizes)}; resize them to one size")
        t = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if t.shape[1] != 3:
        raise ValueError(f"images must have 3 channels, got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)
