"""Config and weight I/O shared by every model: frozen-dataclass configs as JSON, weights as safetensors.

A model folder holds `config.json` (the model's config dataclass) and `model.safetensors`.
Nothing on the load path ever unpickles: a folder that only has `*.bin`/`*.pt`/`*.ckpt`
weights is refused with an error that says how to convert it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

C = TypeVar("C")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# a diffusers model folder's weights (this project's own name is accepted there too)
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", WEIGHTS_NAME)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def config_from_dict(cls: type[C], data: dict[str, Any], *, source: str = "config") -> C:
    """Build the frozen config dataclass `cls` from `data`, refusing unknown keys by name.

    Lists become tuples so configs stay hashable and compare equal after a JSON round trip.
    Keys starting with `_` (metadata such as `_class_name`) are ignored.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields and not k.startswith("_"))
    if unknown:
        raise ValueError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}; allowed keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        if k.startswith("_"):
            continue
        if isinstance(v, list):
            v = tuple(tuple(x) if isinstance(x, list) else x for x in v)
        sub = dataclass_in(hints.get(k))
        if isinstance(v, dict) and sub is not None:
            v = config_from_dict(sub, v, source=f"{source}.{k}")
        else:
            v = coerce_field(v, hints.get(k), f"{source}: {k}")
        kwargs[k] = v
    return cls(**kwargs)


_YAML_BOOLS = {False: {"no", "n", "off", "false"}, True: {"yes", "y", "on", "true"}}


def coerce_field(value: Any, hint: Any, where: str) -> Any:
    """Check a config value against its field's type hint (loosely), converting ints and numeric strings to
    floats where a float is expected. Raises ValueError naming the field, the value and what is allowed."""
    if hint is None or hint is Any:
        return value
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    options = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [hint]
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where}=None is not allowed; expected {' or '.join(map(_type_name, options))}")
    for option in options:
        o = typing.get_origin(option)
        if o is typing.Literal:
            choices = typing.get_args(option)
            if value in choices:
                return value
            if isinstance(value, bool):  # YAML 1.1 reads no / off / yes / on as booleans: give the word back
                spelled = [c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOLS[value]]
                if len(spelled) == 1:
                    return spelled[0]
        elif option is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        elif option is bool and isinstance(value, bool):
            return value
        elif option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        elif option is str and isinstance(value, str):
            return value
        elif o is tuple and isinstance(value, tuple):
            items = typing.get_args(option)
            if not items:
                return value
            kinds = [items[0]] * len(value) if len(items) == 2 and items[1] is Ellipsis else list(items)
            if len(kinds) != len(value):
                raise ValueError(f"{where}={list(value)!r} has {len(value)} items; expected {len(kinds)}")
            return tuple(coerce_field(v, k, f"{where}[{i}]") for i, (v, k) in enumerate(zip(value, kinds)))
        elif o is None and isinstance(option, type) and not dataclasses.is_dataclass(option) \
                and option not in (float, bool, int, str) and isinstance(value, option):
            return value
        elif dataclasses.is_dataclass(option) and isinstance(value, option):
            return value
    shown = list(value) if isinstance(value, tuple) else value
    raise ValueError(f"{where}={shown!r} is not allowed; expected {' or '.join(map(_type_name, options))}")


def _type_name(hint: Any) -> str:
    """A type hint as an error message names it: int, one of ['a', 'b'], a list of int, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list ([...]) of {_type_name(args[0])}"
    if origin is tuple:
        return f"a list [{', '.join(map(_type_name, args)) if args else 'values'}]"
    return getattr(hint, "__name__", str(hint))


def dataclass_in(hint: Any) -> type | None:
    """The dataclass a type hint names, directly or inside `X | None`; else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (nested dataclasses become dicts)."""
    return dataclasses.asdict(config)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """`write(tmp)` into a temporary file beside `path`, then rename it over `path`: a crash never leaves half a
    file. The temporary file is created with mode 0o666, so the umask gives it the permissions a plain `open`
    would (tempfile.mkstemp's are owner-only), and keeps them whatever `write` does to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that recreated the file (safetensors does)
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `_atomic_write`)."""
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def save_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically save tensors (made contiguous, shared storage broken) as safetensors."""
    _atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, tmp))


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` with an error that names the file (an empty or truncated file otherwise
    reports only "Error while deserializing header")."""
    try:
        return load_file(str(path), device=device)
    except SafetensorError as error:
        raise ValueError(f"cannot read {path}: {error} (an incomplete or damaged file? save or copy it again)") \
            from error


def find_weights(folder: str | os.PathLike, names: tuple[str, ...] = (WEIGHTS_NAME,)) -> Path:
    """Return the safetensors weight file in `folder`, refusing pickles and naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    for name in names:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"refusing to load pickle weight file(s) {pickles} in {folder}: only safetensors are loaded. "
            "Convert with `safetensors.torch.save_file(torch.load(path, weights_only=True), "
            f"'{folder / names[0]}')` if you trust the file."
        )
    others = sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json")))
    hint = (f"; the folder holds {others}: a variant (such as diffusers' fp16) or a sharded checkpoint is not "
            f"read, rename a single-file variant to {names[0]}") if others else ""
    raise FileNotFoundError(f"missing weight file {folder / names[0]} (expected one of {list(names)}){hint}")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing config file {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"cannot read {path}: not valid JSON ({error})") from None


def save_model(model: torch.nn.Module, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Save `model.config` as `config.json` and its state dict as `model.safetensors` in `folder`."""
    folder = Path(folder)
    data = {"_class_name": type(model).__name__, **config_to_dict(model.config)}
    save_json(folder / CONFIG_NAME, data)
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_safetensors(folder / WEIGHTS_NAME, state)


def load_model(cls: type, folder: str | os.PathLike, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> Any:
    """Load a model saved by `save_model`: build it from `config.json`, then load `model.safetensors` strictly.

    Half-precision weights are upcast to the model's dtype (fp32 unless `dtype` is given).
    """
    folder = Path(folder)
    data = read_json(folder / CONFIG_NAME)
    config = config_from_dict(cls.config_class, data, source=str(folder / CONFIG_NAME))
    model = build_with_weights(cls, config, load_safetensors(find_weights(folder)), source=str(folder), dtype=dtype)
    return model.to(device=device or "cpu")


def build_with_weights(cls: type, config: Any, state: dict[str, torch.Tensor], *, source: str,
                       dtype: torch.dtype | None = None) -> Any:
    """`cls(config)` holding `state` (checked strictly), in eval mode. The model is built on the meta device, so
    no memory or time goes to an initialisation the weights replace; floating-point tensors become `dtype`
    (fp32 unless given)."""
    with torch.device("meta"):
        model = cls(config)
    target = dtype or torch.float32
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    load_state_dict_checked(model, state, source=source, assign=True)
    return model.eval()


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str,
                            assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with an error that names missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def head(xs: list[str]) -> str:
            return f"{xs[:8]}{' ...' if len(xs) > 8 else ''} ({len(xs)})"
        raise ValueError(
            f"weights in {source} do not fit {type(model).__name__}: missing {head(missing)}, "
            f"unexpected {head(unexpected)}, shape mismatches {head(shapes)}"
        )
    model.load_state_dict(state, strict=True, assign=assign)
