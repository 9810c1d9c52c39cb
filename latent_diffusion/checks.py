"""Checks of the arguments users pass to the pipeline and the CLI: each refuses a bad value by name, saying what
is allowed, before any work starts."""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Image files by name: what `interpolate` tells from a prompt, and what `generate --out` writes as one grid
# (formats Pillow writes from RGB).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")  # what the models run in


def is_int(value: Any) -> bool:
    """An integer (Python, numpy, a 0-d integer tensor), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_count(name: str, value: Any) -> None:
    """Refuse a count (steps, images) that is not an integer >= 1, naming it."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def real_or_nan(value: Any) -> float:
    """`value` as a float when it is a real scalar (Python, numpy, a 0-d tensor), else NaN (also for bools and
    strings, which float() would take)."""
    try:
        return float(value) if not isinstance(value, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def check_scale(name: str, value: Any) -> float:
    """A guidance scale: a finite number >= 0 (NaN or inf would give black images), returned as a float."""
    number = real_or_nan(value)
    if not 0 <= number < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_fraction(name: str, value: Any) -> float:
    """A number in [0, 1] (guidance_rescale, img2img's strength), returned as a float."""
    number = real_or_nan(value)
    if not 0 <= number <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return number


def prompt_list(prompt: Any) -> list[str]:
    """`prompt` (a string, or a list/tuple of strings) as a non-empty list, refusing anything else by value."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if prompts is None or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r}")
    if not prompts:
        raise ValueError("prompt is an empty list; pass at least one prompt")
    return prompts


def float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """One of the dtypes the models run in (`FLOAT_DTYPES`), also by name ("float16", "torch.bfloat16")."""
    import torch

    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one the models run in; use torch.float32, torch.float16 or "
                         "torch.bfloat16 (or their names)")
    return getattr(torch, name)


def device_and_dtype(device: Any, dtype: Any) -> tuple[torch.device | None, torch.dtype | None]:
    """`pipe.to` / `from_pretrained` arguments, checked: a dtype (or a dtype's name) in the device's place is taken
    as the dtype, as diffusers' `pipe.to(torch.float16)` does."""
    import torch

    if isinstance(device, torch.dtype) or (isinstance(device, str) and device.removeprefix("torch.") in FLOAT_DTYPES):
        if dtype is not None:
            raise ValueError(f"got two dtypes, {device} and {dtype}: pass the device first, e.g. ('cuda', {dtype})")
        device, dtype = None, device
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device={device!r} is not a device ('cpu', 'cuda', 'cuda:1', 'mps', ...): {error}") \
                from None
    return device, float_dtype(dtype) if dtype is not None else None
