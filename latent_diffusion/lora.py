"""LoRA adapters (Hu et al. 2022) for a `TextToImagePipeline`, through `peft` (`pip install peft`).

A LoRA adds a low-rank update to chosen linear layers, W x + (α / r) · s · B A x, with A (r, in) and B (out, r),
where s is the user's scale (1 by default). The adapted layers are the attention projections `to_q`, `to_k`,
`to_v`, `to_out` of the decoder UNet and of the prior (and `q_proj`, `k_proj`, `v_proj`, `out_proj` of the CLIP text
encoder), optionally the feed-forward layers too (`proj_in`/`proj_out`; CLIP's `fc1`/`fc2`).

A LoRA folder (written by `training.finetune --method lora`):

    lora_index.json                      which components, rank/alpha, the base pipeline and its component configs
    decoder/adapter_model.safetensors    peft's format: `<layer>.lora_A.weight` (r, in), `<layer>.lora_B.weight`
    decoder/adapter_config.json          peft's `LoraConfig` (rank, alpha, the adapted layers)
    prior/...                            the same, per fine-tuned component

Use it on a pipeline with `load_lora`, `set_lora_scale`, `fuse_lora` / `unfuse_lora` and `unload_lora`. To bake a
LoRA into the weights for good: `fuse_lora(pipe); unload_lora(pipe); pipe.save_pretrained(folder)`. The pipeline
records each LoRA baked in so (`pipe.fused_loras`, saved in `model_index.json`: its folder, a digest of its
weights, its scale), and `load_lora` refuses to apply the same LoRA to those weights a second time.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from latent_diffusion.io import load_safetensors, read_json, save_json, save_safetensors

LORA_INDEX = "lora_index.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LORA_COMPONENTS: tuple[str, ...] = ("decoder", "prior", "text_encoder")
ADAPTER = "default"  # peft's adapter name; one LoRA at a time
FORMAT = "latent-diffusion-lora"

# Layer names per module kind, found by duck typing so the CLIP classes of any transformers version match.
_ATTENTION = (("to_q", "to_k", "to_v", "to_out"), ("q_proj", "k_proj", "v_proj", "out_proj"))
_FEED_FORWARD_CLIP = ("fc1", "fc2")
_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<part>A|B)\.weight$")
_BACKUP = "_unfused_base_weight"  # non-persistent buffer on a fused layer: the exact pre-fusion weight


def _peft() -> Any:
    try:
        import peft
    except ImportError as error:
        raise ImportError("LoRA needs the peft package: pip install peft (in a checkout: pip install -e '.[lora]')") \
            from error
    return peft


# --- finding and adding adapters ------------------------------------------------------------------------------
def lora_target_modules(module: nn.Module, feed_forward: bool = False) -> list[str]:
    """Full names of the linear layers a LoRA adapts in `module`: every attention's q/k/v/out projections and,
    with `feed_forward`, the transformer feed-forward layers."""
    from latent_diffusion.layers import FeedForward

    names: list[str] = []
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        for projections in _ATTENTION:
            if all(isinstance(getattr(m, p, None), nn.Linear) for p in projections):
                names += [prefix + p for p in projections]
        if feed_forward and isinstance(m, FeedForward):
            names += [prefix + "proj_in", prefix + "proj_out"]
        elif feed_forward and all(isinstance(getattr(m, p, None), nn.Linear) for p in _FEED_FORWARD_CLIP):
            names += [prefix + p for p in _FEED_FORWARD_CLIP]
    return names


def _exact(config: Any, layers: Iterable[str]) -> Any:
    """A copy of a peft config whose `target_modules` matches exactly `layers` (peft full-matches a string)."""
    exact = copy.deepcopy(config)
    exact.target_modules = "^(?:" + "|".join(re.escape(n) for n in sorted(layers)) + ")$"
    return exact


def _refuse_fused(module: nn.Module, what: str) -> None:
    """LoRA adapts the separate q/k/v projections, which `speed.fuse_qkv` replaces by one `to_qkv` / `to_kv`."""
    from latent_diffusion.speed import is_fused

    if is_fused(module):
        raise ValueError(f"{what} has fused q/k/v projections (speed.fuse_qkv / apply_speed(fuse=True)); add or "
                         "load the LoRA before fusing, or speed.unfuse_qkv it first")


def add_lora(module: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             feed_forward: bool = False) -> list[str]:
    """Add a fresh, trainable LoRA (A random, B zero: the output is unchanged until it trains) to `module` in place.
    Only the adapter weights require grad afterwards, and they are kept in fp32 whatever the base dtype (so
    fp16 mixed precision can unscale their gradients). Returns the adapted layer names."""
    peft = _peft()
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if lora_layers(module):
        raise ValueError(f"{type(module).__name__} already has a LoRA; unload it first")
    _refuse_fused(module, type(module).__name__)
    layers = lora_target_modules(module, feed_forward)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no attention layers to adapt")
    config = peft.LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=dropout,
                             target_modules=layers, init_lora_weights=True)
    peft.inject_adapter_in_model(_exact(config, layers), module, adapter_name=ADAPTER)
    module.peft_config[ADAPTER] = config  # keep the readable list of layer names for saving
    for name, p in module.named_parameters():
        p.requires_grad_(".lora_" in name)
        if p.requires_grad:
            p.data = p.data.float()
    return layers


def lora_layers(module: nn.Module | None) -> list[nn.Module]:
    """The peft LoRA layers inside `module` (empty when it has none)."""
    if module is None:
        return []
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # without peft no LoRA can have been added
        return []

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights of `module` in peft's key format (`<layer>.lora_A.weight`), as fp32 CPU tensors."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu() for k, v in state.items()}


# --- saving and reading ---------------------------------------------------------------------------------------
def _config_dict(module: nn.Module) -> dict[str, Any] | None:
    config = getattr(module, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_dict"):  # transformers
        return None
    import dataclasses

    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None


def save_lora(folder: str | Path, modules: Mapping[str, nn.Module], base_pipeline: str | None = None,
              extra: Mapping[str, Any] | None = None) -> Path:
    """Write the LoRA of each component (name → module carrying a LoRA) into `folder` (see the module docstring)."""
    folder = Path(folder)
    unknown = sorted(set(modules) - set(LORA_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown LoRA component(s) {unknown}; choose from {list(LORA_COMPONENTS)}")
    entries: dict[str, Any] = {}
    for name, module in modules.items():
        if not lora_layers(module):
            raise ValueError(f"the {name} has no LoRA to save")
        config = module.peft_config[ADAPTER]
        save_safetensors(folder / name / ADAPTER_WEIGHTS, lora_state_dict(module))
        config.save_pretrained(str(folder / name))
        entries[name] = {"rank": config.r, "alpha": config.lora_alpha, "layers": len(lora_layers(module)),
                         "base_class": type(module).__name__, "base_config": _config_dict(module)}
    index = {"format": FORMAT, "version": 1, "components": entries, "base_pipeline": base_pipeline,
             "created": time.strftime("%Y-%m-%d %H:%M:%S"), **(extra or {})}
    save_json(folder / LORA_INDEX, index)
    return folder


def read_lora_index(path: str | Path) -> dict[str, Any]:
    """`lora_index.json` of a LoRA folder, checked."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"LoRA folder not found: {path}")
    if not (path / LORA_INDEX).is_file():
        hint = (" (it holds a whole pipeline: load it with TextToImagePipeline.from_pretrained, or pass it to "
                "latent-diffusion generate as --pipeline)") \
            if (path / "model_index.json").is_file() else ""
        raise FileNotFoundError(f"{path} is not a LoRA folder: no {LORA_INDEX}{hint}")
    index = read_json(path / LORA_INDEX)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path / LORA_INDEX} is not a {FORMAT} index (format={index.get('format')!r})")
    return index


# --- loading --------------------------------------------------------------------------------------------------
def _check_fits(module: nn.Module, state: Mapping[str, torch.Tensor], where: str, component: str,
                entry: Mapping[str, Any]) -> list[str]:
    """The layer names an adapter state dict targets, after checking every one exists in `module` as a linear layer
    of the right shape; raises a ValueError naming the mismatching layers otherwise."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    bad_keys = []
    for key, value in state.items():
        match = _KEY.match(key)
        if match is None:
            bad_keys.append(key)
            continue
        shapes.setdefault(match["layer"], {})[match["part"]] = tuple(value.shape)
    if bad_keys:
        raise ValueError(f"{where}: unsupported adapter weights {bad_keys[:5]} (only plain LoRA A/B weights load)")
    found = dict(module.named_modules())
    missing, mismatched = [], []
    for layer, parts in sorted(shapes.items()):
        target = found.get(layer)
        if not isinstance(target, nn.Linear):
            missing.append(layer)
            continue
        a, b = parts.get("A"), parts.get("B")
        if a is None or b is None or a[1] != target.in_features or b[0] != target.out_features or a[0] != b[1]:
            got = f"{a[1] if a else '?'}→{b[0] if b else '?'}"
            mismatched.append(f"{layer} (adapter {got}, layer {target.in_features}→{target.out_features})")
    if not missing and not mismatched:
        return list(shapes)
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} layer(s) of another shape: {_some(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} layer(s) this {component} does not have: {_some(missing)}")
    theirs, ours, kind = entry.get("base_config"), _config_dict(module), entry.get("base_class")
    if kind and kind != type(module).__name__:
        problems.append(f"the adapter was trained on a {kind}, this {component} is a {type(module).__name__}")
    elif theirs and ours:
        diff = [f"{k}={_plain(theirs[k])} vs {_plain(ours[k])}" for k in ours
                if k in theirs and _plain(theirs[k]) != _plain(ours[k])]
        if diff:
            problems.append(f"the adapter was trained on a {component} with {_some(diff)} (adapter's vs this one's)")
    raise ValueError(f"{where} does not fit this pipeline's {component} (a LoRA for another architecture?): "
                     + "; ".join(problems))


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _some(items: Sequence[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def load_lora_into(module: nn.Module, folder: str | Path, component: str = "model",
                   entry: Mapping[str, Any] | None = None) -> int:
    """Load one component's adapter (`adapter_config.json` + `adapter_model.safetensors` in `folder`) into `module`
    in place, frozen. `entry` is the component's record in `lora_index.json` (for clearer errors). Returns the
    number of adapted layers."""
    peft = _peft()
    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"missing {folder / name}")
    raw = read_json(folder / ADAPTER_CONFIG)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG} describes a {raw['peft_type']} adapter; only LORA loads")
    if lora_layers(module):
        raise ValueError(f"the {component} already has a LoRA; unload it first")
    _refuse_fused(module, f"the {component}")
    state = load_safetensors(folder / ADAPTER_WEIGHTS)
    layers = _check_fits(module, state, str(folder), component, entry or {})
    config = peft.LoraConfig.from_pretrained(str(folder))
    peft.inject_adapter_in_model(_exact(config, layers), module, adapter_name=ADAPTER)
    module.peft_config[ADAPTER] = config
    result = peft.set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    unloaded = [k for k in result.missing_keys if ".lora_" in k]
    if unloaded or result.unexpected_keys:  # cannot happen after _check_fits; never run half a LoRA silently
        raise ValueError(f"{folder}: adapter weights did not load: missing {unloaded[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")
    module.requires_grad_(False)
    module.train(module.training)  # the new layers (their dropout too) follow the module: eval for inference
    return len(layers)


def _components(pipe: Any) -> dict[str, nn.Module]:
    return {name: getattr(pipe, name) for name in LORA_COMPONENTS if getattr(pipe, name, None) is not None}


def lora_components(pipe: Any) -> list[str]:
    """The pipeline components that carry a LoRA now (empty when none is loaded)."""
    return [name for name, module in _components(pipe).items() if lora_layers(module)]


def load_lora(pipe: Any, path: str | Path, scale: float = 1.0,
              components: str | Sequence[str] | None = None) -> list[str]:
    """Load the LoRA folder `path` into the pipeline's components (all it holds, or only `components`) at `scale`.

    Refuses, naming the layers, an adapter whose layers the pipeline does not have or has in another shape.
    Returns the components that got a LoRA."""
    path = Path(path)
    scale = _checked_scale(scale)
    index = read_lora_index(path)
    entries: dict[str, Any] = index.get("components", {})
    wanted = list(entries) if components is None else [components] if isinstance(components, str) else \
        list(components)
    not_in_file = [c for c in wanted if c not in entries]
    if not_in_file:
        raise ValueError(f"{path} has no LoRA for {not_in_file}; it holds {list(entries)}")
    present = _components(pipe)
    absent = [c for c in wanted if c not in present]
    if absent:
        raise ValueError(f"{path} holds a LoRA for {absent}, which this pipeline does not have")
    loaded = lora_components(pipe)
    if loaded:
        raise ValueError(f"a LoRA is already loaded into {loaded}; unload it first with pipe.unload_lora() "
                         "(pipe.fuse_lora() then pipe.unload_lora() keeps it baked into the weights)")
    for name in wanted:  # (before the loop below, whose errors name the LoRA's base pipeline)
        _refuse_fused(present[name], f"the {name}")
    digests = lora_digests(path, wanted)
    baked = [(name, r) for r in getattr(pipe, "fused_loras", []) for name, d in r.get("digests", {}).items()
             if digests.get(name) == d]
    if baked:
        name, record = baked[0]
        raise ValueError(f"the {name} LoRA in {path} is already fused into this pipeline's weights (from "
                         f"{record.get('path')!r} at scale {record.get('scale')}, recorded in "
                         "pipe.fused_loras / model_index.json): loading it again would apply it twice")
    done: list[str] = []
    try:
        for name in wanted:
            load_lora_into(present[name], path / name, name, entries[name])
            done.append(name)
    except BaseException as error:
        for name in done:  # all or nothing
            _remove_lora(present[name])
        if isinstance(error, ValueError) and index.get("base_pipeline"):
            raise ValueError(f"{error}; the LoRA was trained on the pipeline {index['base_pipeline']}") from None
        raise
    pipe._lora_record = {"path": str(path), "components": done, "digests": digests}
    set_lora_scale(pipe, scale)
    return done


def lora_digests(path: str | Path, components: Sequence[str]) -> dict[str, str]:
    """{component: SHA-256 (hex, first 16 digits) of its adapter weights} for those of `components` whose file
    exists in the LoRA folder `path`: the same adapter gives the same digest wherever its folder lies."""
    files = {name: Path(path) / name / ADAPTER_WEIGHTS for name in components}
    return {name: hashlib.sha256(f.read_bytes()).hexdigest()[:16] for name, f in files.items() if f.is_file()}


# --- scale, fusion, unloading ---------------------------------------------------------------------------------
def _all_layers(pipe: Any) -> list[nn.Module]:
    layers = [layer for module in _components(pipe).values() for layer in lora_layers(module)]
    if not layers:
        raise ValueError("no LoRA is loaded into this pipeline; load one first with pipe.load_lora(path)")
    return layers


def _checked_scale(scale: Any) -> float:
    try:
        value = float(scale)
    except (TypeError, ValueError):
        value = float("nan")
    if not math.isfinite(value):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    return value


def set_lora_scale(pipe: Any, scale: float) -> None:
    """Scale the loaded LoRA's update: 0 gives the base model's outputs exactly, 1 the trained strength."""
    scale = _checked_scale(scale)
    layers = _all_layers(pipe)
    if any(layer.merged for layer in layers):
        raise ValueError("the LoRA is fused into the weights; call pipe.unfuse_lora() before changing its scale")
    for layer in layers:
        layer.set_scale(ADAPTER, float(scale))
    record = getattr(pipe, "_lora_record", None)
    if record is not None:
        record["scale"] = scale


def fuse_lora(pipe: Any) -> None:
    """Add the LoRA update (at its current scale) into the base weights: sampling runs at the base model's speed.
    The exact original weights are kept (one copy of the adapted layers) so `unfuse_lora` restores them bit for
    bit. Fusing twice does nothing."""
    for layer in _all_layers(pipe):
        if layer.merged:
            continue
        layer.register_buffer(_BACKUP, layer.get_base_layer().weight.detach().clone(), persistent=False)
        layer.merge(adapter_names=[ADAPTER])
    record = getattr(pipe, "_lora_record", None)
    if record is not None and record.get("scale", 0) != 0 and not _fused(pipe, record):  # (scale 0 adds nothing)
        pipe.fused_loras.append(record)


def _fused(pipe: Any, record: dict[str, Any]) -> bool:
    return any(r is record for r in pipe.fused_loras)


def unfuse_lora(pipe: Any) -> None:
    """Undo `fuse_lora`: the base weights become exactly what they were; the LoRA runs as a separate branch again."""
    for layer in _all_layers(pipe):
        if not layer.merged:
            continue
        layer.unmerge()
        backup = layer._buffers.pop(_BACKUP, None)
        if backup is not None:
            with torch.no_grad():
                layer.get_base_layer().weight.copy_(backup)
    record = getattr(pipe, "_lora_record", None)
    if record is not None and _fused(pipe, record):
        pipe.fused_loras[:] = [r for r in pipe.fused_loras if r is not record]


def _remove_lora(module: nn.Module) -> None:
    """Put every adapted layer's base layer back in place (keeping fused weights fused) and drop peft's state."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if not isinstance(child, LoraLayer):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, child.get_base_layer())
    if "peft_config" in vars(module):
        del module.peft_config


def unload_lora(pipe: Any) -> None:
    """Remove the LoRA: every adapted layer becomes a plain `nn.Linear` again, so the pipeline saves and loads as
    usual. Unfused, the base model comes back exactly; fused (`fuse_lora` first), the LoRA stays baked in."""
    _all_layers(pipe)
    for module in _components(pipe).values():
        _remove_lora(module)
    pipe._lora_record = None  # a fused one stays in pipe.fused_loras


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LORA_COMPONENTS", "LORA_INDEX", "add_lora", "fuse_lora", "load_lora",
    "load_lora_into", "lora_components", "lora_digests", "lora_layers", "lora_state_dict", "lora_target_modules",
    "read_lora_index", "save_lora", "set_lora_scale", "unfuse_lora", "unload_lora",
]
