"""Samplers as plain functions over a denoiser, k-diffusion style (Karras et al. 2022).

A *denoiser* is a callable `denoiser(x, sigma, **extra) -> x0` on the VE process x = x0 + sigma eps:
x is (B, ...) — (B, D) embeddings or (B, C, H, W) latents — sigma is (B,) (all rows equal) and the result
is the estimate of E[x0 | x] with x's shape. `Denoiser` turns a network trained on the VP schedule into
one; `cfg` / `batched_cfg` wrap denoisers into guided ones.

Every sampler has one signature, `sample_x(denoiser, x, sigmas, *, generator=None, callback=None,
disable_progress=True, **extra) -> x`, where x (B, ...) is the start sample already at noise level
sigmas[0] (VE; see `initial_noise_scale`) and sigmas (n+1,) decreases to the final level, usually 0.
Stochastic samplers draw noise in step order as diffusers' schedulers do, so a seeded generator reproduces them
draw for draw (and is left in the same state for whatever draws next): `euler_ancestral` and `ddim` with eta > 0
once per step, the last one included; `ddpm` once per step whose next sigma is > 0, and on the last step too with
`final_draw=True` (diffusers' DDPM draws at every timestep > 0: its last one is > 0 with trailing spacing or a
steps_offset).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .schedule import NoiseSchedule, PredictionType, _check_prediction_type, prediction_to_x0

DenoiserFn = Callable[..., torch.Tensor]
Generators = torch.Generator | list[torch.Generator] | None
Callback = Callable[[dict[str, Any]], None] | None


class Denoiser:
    """Wraps a VP-trained network `model(x_in, t, **kwargs) -> prediction` into a VE denoiser; the one
    place where eps / v / x0 predictions become x0.

    With alpha = 1/sqrt(1 + sigma²) the VP sample is x_VP = alpha x (Karras et al. 2022, Table 1, c_in),
    with VP noise level sigma_VP = sigma alpha, and the network sees t = schedule.sigma_to_t(sigma)
    (continuous; rounded when `quantize`, as diffusers does for Karras sigmas; interpolated in sigma rather than
    log sigma with `linear_t`, as diffusers' Euler schedulers' fractional timesteps are). `clip_denoised` clamps
    x0 to ±value (the `clip_sample` of diffusers).

    `dtype` is the network's input dtype (None: x's). A half-precision model should still be sampled with a
    float32 x: the VE sample is x0 + σ ε with σ up to ~2·10⁴ (cosine schedule), which overflows float16 and
    leaves bfloat16 no digits for x0; only the network's input x_in (std ≈ 1) and output are half precision.
    """

    def __init__(self, model: Callable[..., torch.Tensor], schedule: NoiseSchedule,
                 prediction_type: PredictionType | None = None, clip_denoised: float | None = None,
                 quantize: bool = False, dtype: torch.dtype | None = None, linear_t: bool = False):
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type or schedule.config.prediction_type
        _check_prediction_type(self.prediction_type)
        self.clip_denoised = clip_denoised
        self.quantize, self.linear_t = quantize, linear_t
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """x: (B, ...) VE sample; sigma: (B,). Returns x0: (B, ...) in x's dtype."""
        # schedule maths in float64, on sigma's device (no host sync), or on the CPU for MPS (no float64)
        sigma = sigma.detach().to("cpu" if sigma.device.type == "mps" else sigma.device, torch.float64)
        t = self.schedule.sigma_to_t(sigma, self.quantize, self.linear_t).to(x.device, torch.float32)  # (B,)
        c_in = (1 + sigma**2).rsqrt().to(x.device)
        x_in = x * _append_dims(c_in, x).to(x.dtype)
        pred = self.model(x_in.to(self.dtype or x.dtype), t, **kwargs).to(x.dtype)
        x0 = prediction_to_x0(pred, x_in, c_in, sigma.to(x.device) * c_in, self.prediction_type)
        if self.clip_denoised is not None:
            x0 = x0.clamp(-self.clip_denoised, self.clip_denoised)
        return x0


def _append_dims(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with like's number of dims, on like's device."""
    return v.reshape(-1, *[1] * (like.ndim - 1)).to(like.device)


# ---- guidance ------------------------------------------------------------------------------------------


def _guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float, x: torch.Tensor,
           sigma: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance u + s (c - u) (Ho & Salimans 2022, Eq. 6) on x0 predictions, then the
    guidance rescale of Lin et al. 2024 (`_rescale`)."""
    return _rescale(uncond + scale * (cond - uncond), cond, rescale, x, sigma)


def _rescale(guided: torch.Tensor, cond: torch.Tensor, rescale: float, x: torch.Tensor,
             sigma: torch.Tensor) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, §3.4, Eq. 15–16 and Algorithm 2), on v-predictions as the paper does it:
    the x0 predictions (B, ...) at the VE sample x and noise level sigma (B,) imply
    v = α (x − (1 + σ²) x0) / σ with α = 1/sqrt(1 + σ²) (Salimans & Ho 2022, v = α ε − σ_VP x0 in VE terms);
    the guided v is blended (weight `rescale`) with itself scaled to the conditional v's std over all non-batch
    dims, then mapped back to x0. v is affine in x0, so the guidance itself is the same in either space."""
    if rescale <= 0:
        return guided
    guided_dtype = guided.dtype
    dtype = torch.promote_types(x.dtype, torch.float32)  # 1 + σ² overflows float16 from σ ≈ 256
    s = _append_dims(sigma, x).to(dtype).clamp_min(1e-6)
    root = (1 + s**2).sqrt()
    x, guided, cond = x.to(dtype), guided.to(dtype), cond.to(dtype)
    v_guided, v_cond = ((x - (1 + s**2) * x0) / (s * root) for x0 in (guided, cond))
    dims = tuple(range(1, x.ndim))
    rescaled = v_guided * v_cond.std(dim=dims, keepdim=True) / v_guided.std(dim=dims, keepdim=True)
    v = rescale * rescaled + (1 - rescale) * v_guided
    return ((x - v * s * root) / (1 + s**2)).to(guided_dtype)


def cfg(cond_fn: DenoiserFn, uncond_fn: DenoiserFn, scale: float, rescale: float = 0.0) -> DenoiserFn:
    """A guided denoiser from a conditional and an unconditional one (two network calls per step, one
    when scale == 1)."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        cond = cond_fn(x, sigma, **extra)
        if scale == 1.0 and rescale == 0.0:
            return cond
        return _guide(uncond_fn(x, sigma, **extra), cond, scale, rescale, x, sigma)

    return denoiser


def batched_cfg(fn: DenoiserFn, scale: float, rescale: float = 0.0) -> DenoiserFn:
    """A guided denoiser from `fn(x2, sigma2, **extra) -> x0` (2B, ...) that denoises the doubled batch
    [uncond; cond] in one network call (fn builds its own doubled conditioning)."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        uncond, cond = fn(torch.cat([x, x]), torch.cat([sigma, sigma]), **extra).chunk(2)  # 2 × (B, ...)
        return _guide(uncond, cond, scale, rescale, x, sigma)

    return denoiser


def batched_dual_cfg(fn: DenoiserFn, text_scale: float, image_scale: float, rescale: float = 0.0) -> DenoiserFn:
    """Guidance with separate scales for two conditions (InstructPix2Pix, Brooks et al. 2023, Eq. 3), on x0:
    u + s_T (t - u) + s_I (f - t), where u = D(x | ∅, ∅), t = D(x | text, ∅), f = D(x | text, image) come from
    one call of `fn(x3, sigma3, **extra) -> x0` (3B, ...) on the tripled batch [u; t; f] (fn builds the tripled
    conditioning). s_I = s_T is plain guidance towards f (`batched_cfg`); s_I = 0 ignores the image. Then the
    guidance rescale of Lin et al. 2024 against f, as in `_guide`."""

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        uncond, text, full = fn(torch.cat([x, x, x]), torch.cat([sigma, sigma, sigma]), **extra).chunk(3)
        return _rescale(uncond + text_scale * (text - uncond) + image_scale * (full - text), full, rescale, x, sigma)

    return denoiser


def clamped(fn: DenoiserFn, limit: float | None) -> DenoiserFn:
    """`fn` with its x0 prediction clipped to [-limit, limit] (after guidance); `fn` itself when limit is None."""
    if limit is None:
        return fn

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        return fn(x, sigma, **extra).clamp(-limit, limit)

    return denoiser


# ---- helpers -------------------------------------------------------------------------------------------


def initial_noise_scale(sigma_max: float) -> float:
    """Std of the start sample in VE space: the VP prior N(0, I) is x_VP = x / sqrt(1 + sigma²), so
    x = sqrt(1 + sigma_max²) · N(0, I)."""
    return math.sqrt(1.0 + sigma_max**2)


def _sigma_batch(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """A noise level as the (B,) tensor a denoiser takes: on x's device, float64 (float32 on MPS)."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)


def _randn(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) like x (B, ...): one draw of x.shape from a single generator, or one draw of x.shape[1:]
    per row from a list of B generators (diffusers' `randn_tensor`). Drawn on the generator's device."""
    if isinstance(generator, list):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.stack(rows).to(x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part to sigma_down and fresh noise sigma_up,
    sigma_down² + sigma_up² = sigma_next².

    The DDPM posterior q(x_s | x_t, x0) in VE space (forward x_t = x_s + sqrt(σ² - σ'²) z) is Gaussian with
    mean x0 + (σ'²/σ²)(x_t - x0) and variance σ'²(σ² - σ'²)/σ² (Ho et al. 2020, Eq. 6–7, divided by
    sqrt(ᾱ_s)). An Euler step to sigma_down moves x to x0 + (sigma_down/σ)(x - x0), so the posterior is
    sigma_up² = σ'²(σ² - σ'²)/σ², sigma_down = σ'²/σ. DDIM's σ_t(η) (Song et al. 2021, Eq. 16) is η times
    this sigma_up, and its Eq. 12 is the same Euler step to sigma_down = sqrt(σ'² - sigma_up²).
    """
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def _sample_ancestral(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, eta: float,
                      generator: Generators, callback: Callback, disable_progress: bool,
                      extra: dict[str, Any], final_draw: bool) -> torch.Tensor:
    """Euler steps to sigma_down plus fresh noise sigma_up (see `_ancestral_sigmas`). A step to sigma 0 adds no
    noise; it still draws (a zero-weighted draw) when `final_draw`, as diffusers' scheduler does."""
    sig = sigmas.tolist()
    for i in tqdm(range(len(sig) - 1), disable=disable_progress):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), **extra)
        sigma_down, sigma_up = _ancestral_sigmas(sigma, sigma_next, eta)
        # Euler step x + d (sigma_down - sigma), d = (x - denoised) / sigma the probability-flow ODE's dx/dsigma
        # (Karras et al. 2022, Eq. 3), written as the same interpolation towards x0: at sigma ~ 1e4 (cosine or
        # zero-SNR schedules) x + d·Δσ cancels two numbers of size sigma in float32.
        x = denoised + (sigma_down / sigma) * (x - denoised)
        if eta > 0 and (sigma_next > 0 or final_draw):  # one draw per stochastic step, even where sigma_up is 0
            x = x + _randn(x, generator) * sigma_up
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
    return x


# ---- samplers ------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
                callback: Callback = None, disable_progress: bool = True, final_draw: bool = False,
                **extra: Any) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Algorithm 2, with the posterior variance β̃ of Eq. 7 over
    skipped steps; diffusers' `fixed_small`): in VE space an ancestral Euler step with eta = 1,
    sigma_up = sqrt(σ'²(σ² - σ'²)/σ²), sigma_down = σ'²/σ. `final_draw`: the last step draws too (no noise is
    added), as diffusers' DDPM does when its last timestep is > 0."""
    return _sample_ancestral(denoiser, x, sigmas, 1.0, generator, callback, disable_progress, extra, final_draw)


@torch.no_grad()
def sample_ddim(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, generator: Generators = None,
                callback: Callback = None, disable_progress: bool = True, eta: float = 0.0,
                **extra: Any) -> torch.Tensor:
    """DDIM (Song et al. 2021, Eq. 12): x_s = sqrt(ᾱ_s) x0 + sqrt(1 - ᾱ_s - σ_η²) eps + σ_η z. Divided by
    sqrt(ᾱ_s) this is x0 + sigma_down eps + sigma_up z: eta = 0 is the deterministic Euler step of the
    probability-flow ODE, eta = 1 is DDPM. With eta > 0 every step draws, the last one included (diffusers')."""
    return _sample_ancestral(denoiser, x, sigmas, eta, generator, callback, disable_progress, extra, True)


@torch.no_grad()
def sample_euler_ancestral(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           generator: Generators = None, callback: Callback = None,
                           disable_progress: bool = True, eta: float = 1.0, **extra: Any) -> torch.Tensor:
    """Ancestral Euler (Karras et al. 2022, Eq. 3 Euler steps with the ancestral noise split; k-diffusion's
    `sample_euler_ancestral`). Same update as DDPM / DDIM, by default on linspace sigmas; every step draws, the
    last one included (diffusers')."""
    return _sample_ancestral(denoiser, x, sigmas, eta, generator, callback, disable_progress, extra, True)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                    generator: Generators = None, callback: Callback = None, disable_progress: bool = True,
                    **extra: Any) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), deterministic; `generator` is unused.

    In VE space λ = -log sigma, and the data-prediction exponential integrator step from σ to σ' is
    x' = (σ'/σ) x - (e^{-h} - 1) D with h = λ' - λ. D is x0 on the first step and on the step to sigma = 0
    (first order), else the multistep correction D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i.
    """
    sig = sigmas.tolist()
    old_denoised, h_last = None, None
    for i in tqdm(range(len(sig) - 1), disable=disable_progress):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, _sigma_batch(sigma, x), **extra)
        if sigma_next == 0.0:
            x, h = denoised, None  # the limit h -> inf of the first-order step
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None or h_last == 0 or h == 0:  # first order (h = 0: a repeated sigma)
                d = denoised
            else:
                r = h_last / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_next=sigma_next, denoised=denoised))
        old_denoised, h_last = denoised, h
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
}

# The timestep spacing of each diffusers scheduler's default config, as `NoiseSchedule.sampling_sigmas`
# keyword arguments.
_DEFAULT_SAMPLING: dict[str, dict[str, Any]] = {
    "ddpm": {"spacing": "leading"},
    "ddim": {"spacing": "leading"},
    "euler_ancestral": {"spacing": "linspace_float"},
    "dpmpp_2m": {"spacing": "linspace_dpm"},
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler function called `name` (a key of SAMPLERS)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
    return SAMPLERS[name]


def default_sampling(name: str) -> dict[str, Any]:
    """Keyword arguments for `NoiseSchedule.sampling_sigmas` giving the sigmas diffusers' default config of
    the matching scheduler walks, e.g. `schedule.sampling_sigmas(50, **default_sampling("ddim"))`."""
    get_sampler(name)
    return dict(_DEFAULT_SAMPLING[name])
