"""Measure what a pipeline's CLIP encodes: per attribute, how often a real image's embedding is closer to its own
caption than to the caption with that one attribute changed (`latent_diffusion.evaluate.clip_binding`; 0.5 is
chance).

    python bench/clip_binding.py --pipeline assets/shapes-64 --out bench/results/clip_binding.json

The decoder and the prior only see what the text encoder and image encoder keep: an attribute the CLIP cannot
tell apart (a binding near 0.5) is one the generated images cannot follow either.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from latent_diffusion import TextToImagePipeline
from latent_diffusion.data.shapes import SceneSpec, ShapesDataset
from latent_diffusion.evaluate import clip_binding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default="assets/shapes-64", help="pipeline folder")
    parser.add_argument("--num", type=int, default=512, help="real scenes (held-out seed)")
    parser.add_argument("--seed", type=int, default=1_000_003, help="dataset seed")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args()

    pipe = TextToImagePipeline.from_pretrained(args.pipeline)
    data = ShapesDataset(args.num, seed=args.seed)
    items = [data[i] for i in range(args.num)]
    specs = [SceneSpec.from_dict(it["spec"]) for it in items]
    with torch.no_grad():
        pixels = (torch.stack([it["pixel_values"] for it in items]) + 1) / 2  # (N, 3, H, W) in [0, 1]
        image_embeds = torch.cat([pipe.encode_image(pixels[i:i + 128]).float() for i in range(0, len(pixels), 128)])
        result = clip_binding(lambda c: pipe.encode_prompt(c)[1], image_embeds, specs)
    print(f"{args.pipeline}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    if args.out:
        write_json(args.out, {"machine": machine_info(), "pipeline": args.pipeline, "num": args.num,
                              "binding": result})


if __name__ == "__main__":
    main()
