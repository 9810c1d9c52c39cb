"""Checks of the arguments users pass to the pipeline and the CLI: each refuses a bad value by name, saying what
is allowed, before any work starts."""

from __future__ import annotations

import math
import operator
from typing import Any


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


def real(value: Any) -> float:
    """`value` as a float when it is a real scalar (Python, numpy, a 0-d tensor), else NaN (also for bools and
    strings, which float() would take)."""
    try:
        return float(value) if not isinstance(value, (bool, str, bytes)) else math.nan
    except (TypeError, ValueError, RuntimeError):
        return math.nan


def check_scale(name: str, value: Any) -> float:
    """A guidance scale: a finite number >= 0 (NaN or inf would give black images), returned as a float."""
    number = real(value)
    if not 0 <= number < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_fraction(name: str, value: Any) -> float:
    """A number in [0, 1] (guidance_rescale, img2img's strength), returned as a float."""
    number = real(value)
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
