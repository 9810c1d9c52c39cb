"""The `latent-diffusion` command line: `generate` images from a prompt, `evaluate` prompt following, `convert`
pipeline folders."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from latent_diffusion.checks import IMAGE_SUFFIXES

if TYPE_CHECKING:  # the CLI imports torch and the pipeline lazily, so `--help` stays fast
    import torch

    from latent_diffusion.pipeline import TextToImagePipeline

SHIPPED_PIPELINE = Path(__file__).resolve().parent.parent / "assets" / "shapes-64"


FAST_HELP = ("speed switches (same images up to float rounding): on a CPU channels_last, oneDNN linear layers "
             "and transposed-convolution upsampling; elsewhere channels_last")


def speed_up(pipe: TextToImagePipeline, device: torch.device) -> TextToImagePipeline:
    """The `--fast` switches for `device` (see FAST_HELP) applied to `pipe`."""
    cpu = device.type == "cpu"
    return pipe.apply_speed(channels_last=True, onednn=cpu, upsample=cpu)


def default_pipeline() -> Path:
    """The shipped pipeline, found relative to the installed package (works from any directory)."""
    return Path(os.environ.get("LATENT_DIFFUSION_PIPELINE", SHIPPED_PIPELINE))


def _quiet_hub() -> None:
    # Everything loads from local folders: never let a library reach for the network.
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(key, value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default to its help, unless the help states it or there is none (None, a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or "") or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from latent_diffusion.diffusion import SAMPLERS

    parser = argparse.ArgumentParser(prog="latent-diffusion",
                                     description="Latent text-to-image diffusion with a CLIP prior.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images from a prompt and write them as PNG files.",
                       formatter_class=_HelpFormatter)
    g.add_argument("prompt", help='the caption, e.g. "a red circle on the left"')
    g.add_argument("--num-images", type=int, default=4, help="images to generate")
    g.add_argument("--steps", type=int, default=25, help="decoder sampling steps")
    g.add_argument("--prior-steps", type=int, default=25, help="prior sampling steps")
    g.add_argument("--guidance", type=float, default=5.0, help="decoder classifier-free guidance scale")
    g.add_argument("--prior-guidance", type=float, default=4.0, help="prior classifier-free guidance scale")
    g.add_argument("--image-guidance", type=float, default=None,
                   help="decoder guidance towards the prior's image embedding, apart from the text's "
                        "(default: the pipeline's, else --guidance; 0: text alone)")
    g.add_argument("--negative-prompt", default=None,
                   help="what the unconditional branch is given (default: the empty caption)")
    g.add_argument("--sampler", default=None, choices=sorted(SAMPLERS),
                   help="sampler of the decoder, and of the prior unless the pipeline configures the prior's own "
                        "(default: the pipeline's, dpmpp_2m for our own pipelines)")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    g.add_argument("--out", default="outputs",
                   help="a folder (one PNG per image), or an image file path (.png, .jpg, .webp, .bmp, .tif, .gif: "
                        "one grid)")
    g.add_argument("--pipeline", default=str(default_pipeline()), help="pipeline folder (the shipped one by default)")
    g.add_argument("--device", default="auto", help="torch device: auto (cuda if available), cpu, cuda:N, mps")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    g.add_argument("--lora", default=None, help="a LoRA adapter folder written by training.finetune")
    g.add_argument("--lora-scale", type=float, default=None, help="strength of the LoRA update (default 1)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--fast", action="store_true", help=FAST_HELP)

    e = sub.add_parser("evaluate", help="score prompt following on the shapes suite",
                       description="Generate the shapes prompt suite with several samplers and ablations, score every "
                                   "image with the shapes checker, and write results.json, results.md and grid.png.",
                       formatter_class=_HelpFormatter)
    e.add_argument("--pipeline", default=str(default_pipeline()), help="pipeline folder (the shipped one by default)")
    e.add_argument("--out", default="evaluation", help="output folder")
    e.add_argument("--num-prompts", type=int, default=8, help="prompts per group")
    e.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..K-1)")
    e.add_argument("--guidance", type=float, default=5.0, help="decoder guidance scale")
    e.add_argument("--prior-guidance", type=float, default=4.0, help="prior guidance scale")
    e.add_argument("--image-guidance", type=float, default=None,
                   help="decoder guidance towards the image embedding (default: the pipeline's, else --guidance)")
    e.add_argument("--heldout", default=None,
                   help="held-out 'colour shape' pairs, comma separated (default: the pipeline's config.yaml)")
    e.add_argument("--quick", action="store_true", help="only DPM-Solver++(2M) at 20 steps, plus the ablations")
    e.add_argument("--no-ablations", action="store_true", help="skip the conditioning ablations")
    e.add_argument("--device", default="auto", help="torch device; auto: cuda if available, else cpu")
    e.add_argument("--suite-seed", type=int, default=0, help="seed of the prompt suite")
    e.add_argument("--lora", default=None, help="a LoRA adapter folder written by training.finetune, scored on "
                                                "the --pipeline it was trained on")
    e.add_argument("--lora-scale", type=float, default=None, help="strength of the LoRA update (default 1)")
    e.add_argument("--fast", action="store_true", help=FAST_HELP)

    c = sub.add_parser("convert", help="re-save a pipeline (e.g. in half precision) or convert a diffusers folder",
                       description="Load a pipeline folder (ours, or a diffusers Stable unCLIP folder with "
                                   "--from-diffusers) and save it in our layout.",
                       formatter_class=_HelpFormatter)
    c.add_argument("source", help="the pipeline folder to read")
    c.add_argument("dest", help="the folder to write")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="precision of the saved weights (loading upcasts to fp32)")
    c.add_argument("--from-diffusers", action="store_true", help="SOURCE is a diffusers StableUnCLIP(Img2Img) folder")
    c.add_argument("--image-guidance", type=float, default=None,
                   help="record this as the pipeline's default decoder guidance towards the image embedding "
                        "(PipelineConfig.image_guidance_scale; default: keep the source's)")
    return parser


def resolve_device(name: str):  # noqa: ANN201 - torch.device
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r}: {e}; use auto, cpu, cuda, cuda:N or mps") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(device.type)
    if available is not None and not available():
        raise ValueError(f"--device {name!r}: no {device.type} device is available to this torch "
                         f"({torch.__version__}); use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


# File extensions `--out` writes as one grid image (formats Pillow writes from RGB).
GRID_EXTENSIONS = set(IMAGE_SUFFIXES)


def make_grid(images: list, columns: int | None = None):  # noqa: ANN201 - PIL image
    """Paste equally sized PIL images into one grid image (row-major)."""
    from PIL import Image

    columns = columns or min(len(images), 4)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % columns) * w, (i // columns) * h))
    return grid


def _is_pipeline(folder: Path) -> bool:
    """True when `folder` holds a pipeline; else prints why not (a LoRA folder is named as one) and False."""
    from latent_diffusion.lora import LORA_INDEX

    if (folder / "model_index.json").is_file():
        return True
    hint = f"; {folder} is a LoRA folder: pass its base pipeline as --pipeline and the LoRA as --lora {folder}" \
        if (folder / LORA_INDEX).is_file() else "; pass --pipeline DIR"
    print(f"error: no pipeline at {folder} (model_index.json not found){hint}", file=sys.stderr)
    return False


def _check_lora_flags(args: argparse.Namespace) -> None:
    if args.lora_scale is not None and not args.lora:
        raise ValueError("--lora-scale needs --lora (a LoRA folder to scale)")
    if args.lora_scale is not None and not abs(args.lora_scale) < float("inf"):
        raise ValueError(f"--lora-scale must be a finite number, got {args.lora_scale}")


def _load_lora(pipe: TextToImagePipeline, args: argparse.Namespace, folder: Path) -> None:
    """`--lora` into `pipe` (loaded from `folder`), with a note when the LoRA was trained on another pipeline (one of
    the same architecture: another would be refused)."""
    from latent_diffusion.lora import read_lora_index

    if not args.lora:
        return
    pipe.load_lora(args.lora, scale=1.0 if args.lora_scale is None else args.lora_scale)
    base = read_lora_index(Path(args.lora)).get("base_pipeline")
    if base and Path(base).resolve() != folder.resolve():
        print(f"note: the LoRA {args.lora} was trained on the pipeline {base}; applying it to {folder}",
              file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:

    from latent_diffusion.pipeline import TextToImagePipeline

    folder = Path(args.pipeline) if args.pipeline else default_pipeline()
    if not _is_pipeline(folder):
        return 2
    _check_lora_flags(args)
    for flag in ("num_images", "steps", "prior_steps"):  # before the pipeline loads, named as typed
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    _check_scales(args)
    if not -(2**63) <= args.seed <= 2**64 - args.num_images:  # what torch's manual_seed takes
        raise ValueError(f"--seed must be from -2**63 to 2**64 - {args.num_images} (image i uses seed + i), got "
                         f"{args.seed}")
    out_path = Path(args.out)
    grid = out_path.suffix.lower() in GRID_EXTENSIONS
    formats = ", ".join(sorted(GRID_EXTENSIONS))
    if grid and out_path.is_dir():
        raise ValueError(f"--out {out_path} is a folder; give an image file path for a grid, or a folder name "
                         "without an image extension for one file per image")
    if not grid and out_path.exists() and not out_path.is_dir():
        raise ValueError(f"--out {out_path} is a file that is not an image format written as a grid ({formats}); "
                         "give a folder, or an image file path")
    blocking = next((p for p in out_path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ValueError(f"--out {out_path}: {blocking} is a file, not a folder")
    device = resolve_device(args.device)
    pipe = TextToImagePipeline.from_pretrained(folder, device=device)
    _load_lora(pipe, args, folder)
    if args.fast:
        speed_up(pipe, device)
    start = time.perf_counter()
    out = pipe(args.prompt, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
               num_inference_steps=args.steps, prior_num_inference_steps=args.prior_steps,
               guidance_scale=args.guidance, prior_guidance_scale=args.prior_guidance, sampler=args.sampler,
               seed=args.seed, height=args.height, width=args.width, progress=not args.quiet,
               image_guidance_scale=args.image_guidance)
    elapsed = time.perf_counter() - start
    if grid:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        paths = [out_path]
        images = [make_grid(out.images)]
    else:
        out_path.mkdir(parents=True, exist_ok=True)
        paths = [out_path / f"seed{args.seed + i}.png" for i in range(len(out.images))]
        images = out.images
    replaced = sum(p.exists() for p in paths)
    for path, image in zip(paths, images):
        image.save(path)
        print(path)
    print(f"{len(out.images)} image(s) in {elapsed:.2f} s", file=sys.stderr)
    if replaced:
        print(f"note: replaced {replaced} earlier file(s) of the same name{'' if grid else f' in {out_path}'}",
              file=sys.stderr)
    return 0


def _check_scales(args: argparse.Namespace) -> None:
    """The guidance flags, checked as the pipeline checks them (finite, >= 0), before it loads."""
    from latent_diffusion.checks import check_scale

    for flag in ("guidance", "prior_guidance", "image_guidance"):
        if getattr(args, flag) is not None:
            check_scale(f"--{flag.replace('_', '-')}", getattr(args, flag))


def heldout_pairs(folder: Path, text: str | None = None) -> tuple[tuple[str, str], ...]:
    """The colour×shape pairs `text` names ("red circle, blue star"), or, when None, those the pipeline folder's
    training config (`config.yaml`, `data.exclude_pairs`) held out — for a fine-tuned pipeline, those of the base its
    config names; () when there is no config."""
    from latent_diffusion.data.shapes import parse_pairs

    if text is None:
        config = folder / "config.yaml"
        if not config.is_file():
            return ()
        import yaml

        recipe = yaml.safe_load(config.read_text()) or {}
        base = recipe.get("pipeline")
        if "method" in recipe and base and Path(base).resolve() != folder.resolve():
            # a fine-tune's record: the held-out pairs are those of the pipeline it started from
            return heldout_pairs(Path(base)) if (Path(base) / "config.yaml").is_file() else ()
        text = ", ".join((recipe.get("data") or {}).get("exclude_pairs") or [])
    return tuple(sorted(parse_pairs(text))) if text.strip() else ()


def run_record(device: torch.device, argv: list[str]) -> dict[str, object]:
    """What a recorded figure needs beside it: the command, the date, the machine and the library versions."""
    import platform
    import shlex
    from datetime import datetime, timezone

    import torch

    record = {"command": "latent-diffusion " + " ".join(shlex.quote(a) for a in argv),
              "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
              "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def cmd_evaluate(args: argparse.Namespace) -> int:

    from latent_diffusion.evaluate import DEFAULT_SETTINGS, evaluate, prompt_suite, save_report, to_markdown
    from latent_diffusion.pipeline import TextToImagePipeline

    folder = Path(args.pipeline) if args.pipeline else default_pipeline()
    if not _is_pipeline(folder):
        return 2
    for name in ("num_prompts", "seeds"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _check_scales(args)
    _check_lora_flags(args)
    device = resolve_device(args.device)
    pipe = TextToImagePipeline.from_pretrained(folder, device=device)
    _load_lora(pipe, args, folder)
    if args.fast:
        speed_up(pipe, device)
    heldout = heldout_pairs(folder, args.heldout)
    if not heldout and args.heldout is None:
        print(f"note: {folder} records no held-out colour×shape pairs (no config.yaml beside it with "
              "data.exclude_pairs, or naming a base pipeline that has one; save_pretrained does not write one), so "
              "the suite has no held-out group; pass --heldout 'purple star, cyan cross' to name them",
              file=sys.stderr)
    items = prompt_suite(args.num_prompts, args.suite_seed, heldout)
    quick = (("DPM-Solver++(2M) 20", "dpmpp_2m", 20),)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate(pipe, items, seeds=args.seeds, settings=quick if args.quick else DEFAULT_SETTINGS,
                       ablation_setting=None if args.no_ablations else quick[0], guidance_scale=args.guidance,
                       prior_guidance_scale=args.prior_guidance, grid_path=out / "grid.png",
                       image_guidance_scale=args.image_guidance)
    results["pipeline"] = str(folder)
    results["run"] = run_record(device, args.argv)
    for path in save_report(results, out):
        print(path)
    print(out / "grid.png")
    print(to_markdown(results), file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import shutil

    import torch

    from latent_diffusion.pipeline import TextToImagePipeline

    source, dest = Path(args.source), Path(args.dest)
    if source.resolve() == dest.resolve():
        raise ValueError(f"convert writes a new folder; {dest} is the source")
    pipe = (TextToImagePipeline.from_diffusers(source) if args.from_diffusers
            else TextToImagePipeline.from_pretrained(source))
    if args.image_guidance is not None:
        if args.image_guidance < 0:
            raise ValueError(f"--image-guidance must be >= 0, got {args.image_guidance}")
        pipe.config = dataclasses.replace(pipe.config, image_guidance_scale=args.image_guidance)
    pipe.save_pretrained(dest, dtype=None if args.dtype == "float32" else getattr(torch, args.dtype))
    if (source / "config.yaml").is_file():  # the training recipe (held-out pairs for `evaluate`)
        shutil.copy(source / "config.yaml", dest / "config.yaml")
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(dest)
    print(f"{size / 2**20:.1f} MiB", file=sys.stderr)
    return 0


# The pipeline's argument names and the command-line flags that set them, for error messages.
_FLAGS = {"num_inference_steps": "--steps", "prior_num_inference_steps": "--prior-steps",
          "guidance_scale": "--guidance", "prior_guidance_scale": "--prior-guidance",
          "image_guidance_scale": "--image-guidance", "height": "--height", "width": "--width",
          "num_images_per_prompt": "--num-images"}


def _as_flags(message: str) -> str:
    """A `generate` / `evaluate` error from the pipeline with its argument names replaced by the flags that set
    them: the underscored names as whole words outside paths, `height`/`width` only as the pipeline writes them
    (`height=`)."""
    import re

    names = "|".join(k for k in _FLAGS if "_" in k)
    pattern = rf"(?<![\w/.-])(?:({names})\b|(height|width)(?==))"
    return re.sub(pattern, lambda m: _FLAGS[m.group(1) or m.group(2)], message)


def main(argv: list[str] | None = None) -> int:
    _quiet_hub()
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for results.json
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "convert":
            return cmd_convert(args)
    except (ValueError, OSError, ImportError) as e:  # (OSError: a path that is a file, a full disk, ...)
        print(f"error: {e if args.command == 'convert' else _as_flags(str(e))}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
