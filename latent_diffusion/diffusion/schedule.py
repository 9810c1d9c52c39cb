"""The discrete VP noise schedule, its VE view (k-diffusion sigmas), the one parameterization boundary
(eps / v / x0) and the training loss.

Two views of the same forward process are used throughout:

* VP (variance preserving, Ho et al. 2020): x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(ᾱ_t),
  sigma_t = sqrt(1 - ᾱ_t). Networks are trained and called in this space.
* VE (variance exploding, Karras et al. 2022): x = x0 + sigma eps with sigma = sqrt((1 - ᾱ) / ᾱ), so that
  x_VP = x_VE / sqrt(1 + sigma^2). Samplers work in this space (see `samplers.py`).

All schedule maths is float64, as in guided-diffusion.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
Spacing = Literal["leading", "trailing", "linspace", "linspace_float", "linspace_dpm", "leading_dpm"]

BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
SPACINGS: tuple[str, ...] = get_args(Spacing)
FINAL_SIGMAS: tuple[str, ...] = ("zero", "min")

# ᾱ_T after the zero-terminal-SNR rescale is exactly 0 (sigma = inf); like diffusers' Euler schedulers we
# clamp it to the smallest positive fp16 subnormal so that sigma_max ≈ 4096 stays finite.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


@dataclass(frozen=True)
class ScheduleConfig:
    """The discrete training schedule (the fields of a diffusers `scheduler_config.json` that matter)."""

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_zero_terminal_snr: bool = False
    prediction_type: PredictionType = "epsilon"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; "
                             f"choose one of {list(BETA_SCHEDULES)}")
        _check_prediction_type(self.prediction_type)
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; "
                         f"choose one of {list(PREDICTION_TYPES)}")


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008,
    discretised as β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta)."""

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_timesteps
    return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(ᾱ) so that sqrt(ᾱ_T) = 0 while sqrt(ᾱ_0) is kept."""
    sqrt_ac = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1 - alphas


class NoiseSchedule:
    """A discrete VP schedule of T = `config.num_train_timesteps` steps, with its VE noise levels.

    Attributes (float64, shape (T,)): `betas`, `alphas_cumprod` (ᾱ_t), `sigmas` (sqrt((1-ᾱ)/ᾱ), increasing
    in t) and `log_sigmas`.
    """

    def __init__(self, config: ScheduleConfig | None = None):
        self.config = config = config or ScheduleConfig()
        T = config.num_train_timesteps
        if config.beta_schedule == "linear":
            betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
        elif config.beta_schedule == "scaled_linear":  # the Latent Diffusion / Stable Diffusion schedule
            betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            betas = _cosine_betas(T)
        if config.rescale_zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        if config.rescale_zero_terminal_snr:
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    # ---- timesteps and sigmas -------------------------------------------------------------------------

    def timesteps(self, n: int, spacing: Spacing = "leading", steps_offset: int = 0) -> torch.Tensor:
        """n decreasing inference timesteps, float64 (n,), spaced as diffusers does (Lin et al. 2024, Tab. 2).

        leading: (arange(n) · (T // n))[::-1] + steps_offset      (DDPM / DDIM default)
        trailing: round(arange(T, 0, -T/n)) - 1                    (reaches t = T-1; zero-SNR models)
        linspace: round(linspace(0, T-1, n))[::-1]                 (DDPM / DDIM "linspace")
        linspace_float: linspace(0, T-1, n)[::-1], not rounded     (Euler-family default)
        linspace_dpm: round(linspace(0, T-1, n+1))[::-1][:-1]      (DPM-Solver default: drops t = 0)
        leading_dpm: (arange(n+1) · (T // (n+1)))[::-1][:-1] + steps_offset   (DPM-Solver's "leading")
        """
        T = self.num_train_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"number of steps must be in [1, {T}], got {n}")
        # numpy, as diffusers, so that values at .5 round identically (round half to even)
        if spacing == "leading":
            ts = (np.arange(n) * (T // n))[::-1] + steps_offset
        elif spacing == "trailing":
            # diffusers' arange(T, 0, -T/n) has n+1 entries for some n (61, 103, ...), the last one giving
            # t = -1; we keep the first n.
            ts = np.round(np.arange(T, 0, -T / n))[:n] - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1]
        elif spacing == "linspace_float":
            ts = np.linspace(0, T - 1, n)[::-1]
        elif spacing == "linspace_dpm":
            ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
        elif spacing == "leading_dpm":
            ts = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1] + steps_offset
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {list(SPACINGS)}")
        if ts.max() > T - 1:  # leading spacings with steps_offset at (nearly) every timestep
            raise ValueError(f"{n} steps with {spacing} spacing and steps_offset {steps_offset} reach t = "
                             f"{int(ts.max())}, past the last timestep {T - 1}: use fewer steps")
        return torch.from_numpy(ts.astype(np.float64))

    def sigmas_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """VE sigma at (possibly fractional) timesteps of any shape, linear in sigma between integers
        (as diffusers' `np.interp`). float64, same shape."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = (lo + 1).clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        sigmas = self.sigmas.to(t.device)
        return (1 - w) * sigmas[lo] + w * sigmas[hi]

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False, linear: bool = False) -> torch.Tensor:
        """Continuous timestep of a VE sigma (any shape), interpolating linearly in log sigma between the
        two neighbouring discrete levels (k-diffusion's `DiscreteSchedule.sigma_to_t`), or with `linear` in sigma
        itself (the exact inverse of `sigmas_at`: diffusers' Euler schedulers feed the network the fractional
        timesteps whose sigmas they interpolate so). Exact at the discrete sigmas; `quantize` rounds to the
        nearest integer timestep. float64, same shape."""
        log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()
        log_sigmas = self.log_sigmas.to(log_sigma.device)
        lo = torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1
        lo = lo.clamp(0, self.num_train_timesteps - 2).reshape(log_sigma.shape)
        if linear:
            sigmas = self.sigmas.to(log_sigma.device)
            low, high, at = sigmas[lo], sigmas[lo + 1], log_sigma.exp()
        else:
            low, high, at = log_sigmas[lo], log_sigmas[lo + 1], log_sigma
        t = lo + ((at - low) / (high - low)).clamp(0, 1)
        return t.round() if quantize else t

    def karras_sigmas(self, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                      rho: float = 7.0) -> torch.Tensor:
        """Karras et al. 2022, Eq. 5: sigma_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ.

        Defaults to the schedule's own range [sigma(0), sigma(T-1)]. Returns float64 (n,), decreasing.
        """
        if n < 1:
            raise ValueError(f"number of steps must be >= 1, got {n}")
        sigma_min = self.sigma_min if sigma_min is None else sigma_min
        sigma_max = self.sigma_max if sigma_max is None else sigma_max
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (max_inv + ramp * (min_inv - max_inv)) ** rho

    def sampling_sigmas(self, n: int, spacing: Spacing = "leading", steps_offset: int = 0,
                        karras: bool = False, final_sigma: Literal["zero", "min"] = "zero") -> torch.Tensor:
        """The (n+1,) float64 decreasing sigmas a sampler walks: sigma at each of the n timesteps (or n Karras
        sigmas, then `spacing` is unused), then the final level: 0, or with "min" the schedule's smallest
        sigma(t=0) (diffusers' DDIM with `set_alpha_to_one=False`)."""
        if final_sigma not in FINAL_SIGMAS:
            raise ValueError(f"unknown final_sigma {final_sigma!r}; choose one of {list(FINAL_SIGMAS)}")
        if karras:
            sigmas = self.karras_sigmas(n)
        else:
            sigmas = self.sigmas_at(self.timesteps(n, spacing, steps_offset))
        last = 0.0 if final_sigma == "zero" else self.sigma_min
        return torch.cat([sigmas, sigmas.new_tensor([last])])

    # ---- training --------------------------------------------------------------------------------------

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The VP forward process q(x_t | x0) (Ho et al. 2020, Eq. 4): sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise.

        x0, noise: (B, ...); t: (B,) integer timesteps in [0, T). Returns (B, ...) in x0's dtype.
        """
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VP (alpha_t, sigma_t) at integer timesteps t (B,), shaped (B, 1, ..., 1) to broadcast against
        `like` (B, ...) and in its dtype / device."""
        ac = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        ac = ac.reshape(-1, *[1] * (like.ndim - 1))
        return ac.sqrt().to(like.dtype), (1 - ac).sqrt().to(like.dtype)


# ---- the parameterization boundary -------------------------------------------------------------------


def _bcast(v: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A float stays a float; a (B,) or (B, 1, ...) tensor becomes (B, 1, ..., 1) in like's dtype."""
    if not isinstance(v, torch.Tensor) or v.ndim == 0:
        return v
    return v.reshape(-1, *[1] * (like.ndim - 1)).to(like.device, like.dtype)


def prediction_to_x0(pred: torch.Tensor, x_t: torch.Tensor, alpha: float | torch.Tensor,
                     sigma: float | torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """The x0 a network prediction implies, for x_t = alpha x0 + sigma eps (VP: alpha² + sigma² = 1).

    pred, x_t: (B, ...); alpha, sigma: floats or (B,) tensors. Returns (B, ...).
    epsilon: x0 = (x_t - sigma eps) / alpha                       (Ho et al. 2020, Eq. 15)
    v_prediction: v = alpha eps - sigma x0, so alpha x_t - sigma v = (alpha² + sigma²) x0
                                                                   (Salimans & Ho 2022, Sec. 4)
    sample: x0 = pred
    """
    _check_prediction_type(prediction_type)
    alpha, sigma = _bcast(alpha, x_t), _bcast(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - sigma * pred) / alpha
    if prediction_type == "v_prediction":
        return (alpha * x_t - sigma * pred) / (alpha**2 + sigma**2)
    return pred


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, alpha: float | torch.Tensor,
                      sigma: float | torch.Tensor, prediction_type: PredictionType) -> torch.Tensor:
    """What the network should output for x_t = alpha x0 + sigma noise: noise, v = alpha noise - sigma x0,
    or x0. Shapes as in `prediction_to_x0`; inverse of it."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return _bcast(alpha, x0) * noise - _bcast(sigma, x0) * x0
    return x0


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: PredictionType) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, Eq. 9 and its v / x0 forms), for the loss in the
    network's own parameterization: epsilon min(snr, γ)/snr, v min(snr, γ)/(snr + 1), sample min(snr, γ)."""
    _check_prediction_type(prediction_type)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   schedule: NoiseSchedule, *, timesteps: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None, min_snr_gamma: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The simple denoising loss (Ho et al. 2020, Eq. 14) in `schedule.config.prediction_type`.

    model_fn(x_t, t) -> prediction, with x_t (B, ...) and t float (B,). x0: (B, ...), e.g. (B, D) embeddings
    or (B, C, H, W) latents. t ~ U{0, ..., T-1} and noise ~ N(0, I) are drawn (from `generator`) unless given.
    Returns the scalar mean over the batch of the per-sample MSE, each weighted by min-SNR-γ if set.
    """
    B = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    if timesteps is None:
        T = schedule.num_train_timesteps
        timesteps = torch.randint(0, T, (B,), generator=generator, device=gen_device)
    timesteps = timesteps.to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    alpha, sigma = schedule.alpha_sigma(timesteps, x0)
    x_t = alpha * x0 + sigma * noise
    pred = model_fn(x_t, timesteps.float())
    target = prediction_target(x0, noise, alpha, sigma, schedule.config.prediction_type)
    loss = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # (B,)
    if min_snr_gamma is not None:
        ac = schedule.alphas_cumprod.to(x0.device)[timesteps.long()]
        snr = ac / (1 - ac)
        loss = loss * min_snr_weight(snr, min_snr_gamma, schedule.config.prediction_type).float()
    return loss.mean()
