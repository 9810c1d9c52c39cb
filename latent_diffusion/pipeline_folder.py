"""Reading and writing pipeline folders (`TextToImagePipeline.save_pretrained` / `from_pretrained`).

A folder holds `model_index.json` (the component classes, the `PipelineConfig`, the LoRAs baked into the weights)
and one subfolder per component: our models as `config.json` + `model.safetensors`, the `transformers` CLIP parts
as transformers writes them (safetensors only), the tokenizers as vocabulary files. Nothing on the load path
unpickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latent_diffusion.checks import float_dtype
from latent_diffusion.io import config_from_dict, config_to_dict, find_weights, read_json, save_json
from latent_diffusion.models import AutoencoderKL, DiffusionPrior, ImageNormalizer, UNet
from latent_diffusion.pipeline_config import PipelineConfig

if TYPE_CHECKING:
    from latent_diffusion.pipeline import TextToImagePipeline

MODEL_INDEX = "model_index.json"
TEXT_ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "decoder", "vae")


def save_pipeline(pipe: TextToImagePipeline, folder: str | Path, dtype: torch.dtype | str | None = None,
                  components: str | list[str] | None = None) -> None:
    """Write `pipe` as a pipeline folder; `dtype` casts the floating-point weights (torch.float16 or "float16"
    halves them). `components` (names, or one name) writes only those (plus `model_index.json`), leaving the others'
    files untouched."""
    from transformers.utils import logging as hf_logging

    from latent_diffusion.lora import lora_components

    hf_logging.disable_progress_bar()  # transformers' per-file "Writing model shards" bars

    adapted = lora_components(pipe)
    if adapted:
        raise ValueError(f"a LoRA is loaded into {adapted}: call unload_lora() first, or fuse_lora() then "
                         "unload_lora() to save it baked into the weights")
    dtype = float_dtype(dtype) if dtype is not None else None  # checked before anything is written
    folder = Path(folder)
    tokenizers = {"tokenizer": pipe.tokenizer, "prior_tokenizer": pipe.prior_tokenizer}
    tokenizers = {k: v for k, v in tokenizers.items() if v is not None}
    if components is not None:
        valid = sorted(pipe._modules() | tokenizers)
        components = [components] if isinstance(components, str) else list(components)
        if not all(isinstance(c, str) for c in components):
            raise ValueError(f"components must be component names (of {valid}), got {components!r}")
        unknown = sorted(set(components) - set(valid))
        if unknown:
            raise ValueError(f"this pipeline has no component named {', '.join(map(repr, unknown))}; its "
                             f"components: {valid}")
    for name, tok in tokenizers.items():
        if components is None or name in components:
            tok.save_pretrained(folder / name)
    for name, m in pipe._modules().items():
        if components is not None and name not in components:
            continue
        if isinstance(m, (UNet, AutoencoderKL, DiffusionPrior, ImageNormalizer)):
            m.save_pretrained(folder / name, dtype=dtype)
        else:
            m.save_pretrained(folder / name, safe_serialization=True)
            if dtype is not None:
                _cast_safetensors(folder / name / "model.safetensors", dtype)
    index = {"_class_name": type(pipe).__name__, "_version": "0.1.0",
             "components": {k: type(m).__name__ for k, m in (pipe._modules() | tokenizers).items()},
             "config": config_to_dict(pipe.config)}
    if pipe.fused_loras:
        index["fused_loras"] = pipe.fused_loras
    save_json(folder / MODEL_INDEX, index)


def load_pipeline(cls: type[TextToImagePipeline], folder: str | Path,
                  dtype: torch.dtype | str | None = None) -> TextToImagePipeline:
    """A `cls` from a folder written by `save_pipeline`, its weights in `dtype` (fp32 by default; weights stored
    in half precision are upcast). Refuses a diffusers folder with the way to load it."""
    from transformers import CLIPTokenizer, CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"pipeline folder not found: {folder}")
    dtype = float_dtype(dtype) if dtype is not None else torch.float32
    if not (folder / MODEL_INDEX).is_file():
        from latent_diffusion.lora import LORA_INDEX

        if (folder / LORA_INDEX).is_file():
            raise ValueError(f"{folder} is a LoRA folder, not a pipeline: load its base pipeline, then "
                             f"pipe.load_lora({str(folder)!r})")
    index = read_json(folder / MODEL_INDEX)
    if "_diffusers_version" in index:
        _refuse_diffusers(folder, index.get("_class_name", "pipeline"))
    components = index.get("components", {})
    for required in REQUIRED_COMPONENTS:
        if required not in components:
            raise ValueError(f"{folder / MODEL_INDEX} lists no {required!r} component")
    for name in components:
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"missing component folder {folder / name}")
    config = config_from_dict(PipelineConfig, index.get("config", {}), source=str(folder / MODEL_INDEX))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = load_text_encoder(folder / "text_encoder", components["text_encoder"], dtype)
    image_encoder = None
    if "image_encoder" in components:
        image_encoder = load_transformers(CLIPVisionModelWithProjection, folder / "image_encoder", dtype=dtype)
    prior = DiffusionPrior.from_pretrained(folder / "prior", dtype=dtype) if "prior" in components else None
    extra: dict[str, Any] = {}
    if "prior_text_encoder" in components:
        extra["prior_tokenizer"] = CLIPTokenizer.from_pretrained(folder / "prior_tokenizer")
        extra["prior_text_encoder"] = load_text_encoder(folder / "prior_text_encoder",
                                                        components["prior_text_encoder"], dtype)
    if "image_normalizer" in components:
        extra["image_normalizer"] = ImageNormalizer.from_pretrained(folder / "image_normalizer", dtype=dtype)
    pipe = cls(tokenizer, text_encoder, UNet.from_pretrained(folder / "decoder", dtype=dtype),
               AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype), prior, image_encoder, config, **extra)
    pipe.fused_loras = list(index.get("fused_loras", []))
    return pipe


def _refuse_diffusers(folder: Path, kind: str) -> None:
    from latent_diffusion.convert import PIPELINES

    if kind in PIPELINES:
        raise ValueError(f"{folder} is a diffusers {kind} folder: load it with TextToImagePipeline.from_diffusers, "
                         "or convert it once with `latent-diffusion convert --from-diffusers SOURCE DEST`")
    raise ValueError(f"{folder} is a diffusers {kind} folder, which does not convert to a pipeline (those that do: "
                     f"{list(PIPELINES)}); its UNet and VAE folders load with UNet.from_diffusers and "
                     "AutoencoderKL.from_diffusers")


def load_transformers(cls: type, folder: Path, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder, use_safetensors=True)`, naming the file when its weights cannot be read."""
    from safetensors import SafetensorError

    weights = find_weights(folder)  # refuses pickles and names a missing file before transformers looks
    try:
        return cls.from_pretrained(folder, use_safetensors=True, **kwargs)
    except SafetensorError as error:  # (transformers passes it on without the file's name)
        raise ValueError(f"cannot read {weights}: {error} (an incomplete or damaged file? save or copy it again)") \
            from error


def load_text_encoder(folder: Path, class_name: str, dtype: torch.dtype) -> Any:
    """A `CLIPTextModel` or `CLIPTextModelWithProjection` from a component folder, by its recorded class name."""
    import transformers

    if class_name not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"component {folder.name!r} is a {class_name}; supported: {list(TEXT_ENCODER_CLASSES)}")
    return load_transformers(getattr(transformers, class_name), folder, dtype=dtype)


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    from latent_diffusion.io import load_safetensors, save_safetensors

    state = load_safetensors(path)
    save_safetensors(path, {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
