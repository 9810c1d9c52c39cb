"""Can a decoder learn *where* from the text, and what stops it? Learning curves of a small decoder, per recipe.

Each variant trains a fresh decoder UNet (the shipped decoder's sizes by default) for `--steps` steps, batch 32, on
single-object 64×64 shapes scenes whose captions always state the cell ("a red circle on the left"), encoded once
by a pipeline's frozen CLIP and VAE. Every `--eval-every` steps it decodes the decoder's x0 prediction from pure
noise at the last timestep for 36 probe prompts (4 objects × 9 positions, no guidance, null image embedding) and
reports how often the most ink lies in the stated cell of the 3×3 grid (chance 1/9), and the ink in the stated
cell over the mean cell's (1: no preference). Variants:

    tokens          CLIP output states + CLIP's input token embeddings (`decoder.token_embeddings`), zero-terminal-SNR
                    v-prediction (Lin et al. 2024), plain v loss, trained at t >= 700 only (where the layout is
                    decided; fastest to show)
    states          the same with CLIP's output states only (what the decoder reads without token_embeddings)
    tokens-minsnr   `tokens` with min-SNR-γ = 5 (Hang et al. 2023): x0-error weight min(SNR, γ), 0 at the zero-SNR end
    tokens-eps      `tokens` on the plain scaled-linear ε schedule with min-SNR-γ = 5 (the original decoder recipe)
    tokens-image    `tokens` plus the true CLIP image embedding of each training image (dropped 10%), as in training
    tokens-uniform  `tokens` with uniform timesteps

    python bench/position_learning.py --pipeline assets/shapes-64 --out bench/results/position_learning.json
    python bench/position_learning.py --probe assets/shapes-64      # probe a pipeline's decoder (no training)

`--probe PIPELINE` scores a trained pipeline's decoder with the same probe, with its own schedule and text
conditioning (token embeddings when its model_index.json says so).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from latent_diffusion.data.shapes import COLORS, SHAPES, SceneSpec, ShapeObject, caption, render
from latent_diffusion.diffusion import NoiseSchedule, ScheduleConfig
from latent_diffusion.diffusion.schedule import min_snr_weight, prediction_target, prediction_to_x0
from latent_diffusion.models import AutoencoderKL, UNet, UNetConfig
from latent_diffusion.pipeline import PipelineConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_info, markdown_table, write_json  # noqa: E402

from training.common import encode_batch, load_clip  # noqa: E402
from training.config import load_config  # noqa: E402

ZERO_SNR_V = ScheduleConfig(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
VARIANTS: dict[str, dict[str, Any]] = {
    "tokens": dict(tokens=True, schedule=ZERO_SNR_V, t_min=700),
    "states": dict(tokens=False, schedule=ZERO_SNR_V, t_min=700),
    "tokens-minsnr": dict(tokens=True, schedule=ZERO_SNR_V, t_min=700, min_snr_gamma=5.0),
    "tokens-eps": dict(tokens=True, schedule=ScheduleConfig(), t_min=700, min_snr_gamma=5.0),
    "tokens-image": dict(tokens=True, schedule=ZERO_SNR_V, t_min=700, image=True),
    "tokens-uniform": dict(tokens=True, schedule=ZERO_SNR_V),
}
PROBE_OBJECTS = (("red", "circle"), ("blue", "square"), ("green", "star"), ("black", "cross"))


def single_object_scenes(n: int, rng: np.random.Generator) -> tuple[list[SceneSpec], torch.Tensor]:
    """n scenes of one medium object with a stated cell, and their images (n, 3, 64, 64) in [-1, 1]."""
    specs = [SceneSpec((ShapeObject(str(rng.choice(list(COLORS))), str(rng.choice(list(SHAPES))), "medium",
                                    int(rng.integers(9))),), stated=(frozenset({"cell"}),)) for _ in range(n)]
    return specs, torch.stack([pixels(s, rng) for s in specs])


def pixels(spec: SceneSpec, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(np.asarray(render(spec, rng), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def ink_per_cell(images: torch.Tensor) -> torch.Tensor:
    """Mean darkness (1 - brightness) of each cell of the 3×3 grid, row-major. images (B, 3, H, W) in [-1, 1]
    -> (B, 9)."""
    ink = 1 - (images.clamp(-1, 1).mean(1, keepdim=True) + 1) / 2
    return F.adaptive_avg_pool2d(ink, 3).flatten(1)


class Probe:
    """x0 at the last timestep from fixed noise, for 4 objects × 9 stated cells, scored by where the ink is."""

    def __init__(self, encode: Any, vae: AutoencoderKL, latent_shape: tuple[int, ...]):
        from latent_diffusion.data.shapes import CELLS

        self.cells = torch.tensor([c for _ in PROBE_OBJECTS for c in range(9)])
        prompts = [f"a {col} {shape} {CELLS[c]}" for col, shape in PROBE_OBJECTS for c in range(9)]
        features = encode(prompts)
        self.states, self.pooled = features["text_states"], features["text_embeds"]
        self.noise = torch.randn(len(prompts), *latent_shape, generator=torch.Generator().manual_seed(7))
        self.vae = vae

    @torch.no_grad()
    def __call__(self, unet: UNet, schedule: NoiseSchedule, token_embeddings: bool) -> dict[str, float]:
        """`token_embeddings`: the decoder reads CLIP's input token embeddings after its output states."""
        states = self.states if token_embeddings else self.states[:, : self.states.shape[1] // 2]
        was_training = unet.training
        unet.eval()
        t = torch.full((len(self.cells),), schedule.num_train_timesteps - 1)
        alpha, sigma = schedule.alpha_sigma(t, self.noise)
        x = sigma * self.noise  # x_T = α x0 + σ ε with the layout unknown: its ε part only (α = 0 at zero SNR)
        pred = unet(x, t.float(), states, None, self.pooled if unet.config.pooled_text_dim else None)
        x0 = prediction_to_x0(pred, x, alpha, sigma, schedule.config.prediction_type)
        mass = ink_per_cell(self.vae.decode(self.vae.from_latents(x0)))
        unet.train(was_training)
        rows = torch.arange(len(self.cells))
        return {"cell_accuracy": (mass.argmax(1) == self.cells).float().mean().item(),
                "ink_ratio": (mass[rows, self.cells] / mass.mean(1)).mean().item()}


def small_unet(context_dim: int, image_dim: int | None, tiny: bool) -> UNet:
    """The shipped decoder's sizes (configs/shapes/base.yaml; tests/configs/micro.yaml with `tiny`), without the
    pooled-text input."""
    root = Path(__file__).resolve().parent.parent
    dc = load_config(root / ("tests/configs/micro.yaml" if tiny else "configs/shapes/base.yaml")).decoder
    return UNet(UNetConfig(in_channels=4, out_channels=4, channels=dc.channels, attention_levels=dc.attention_levels,
                           layers_per_block=dc.layers_per_block, heads=dc.heads, transformer_depth=dc.transformer_depth,
                           context_dim=context_dim, norm_groups=dc.norm_groups, image_embed_dim=image_dim,
                           image_context_tokens=dc.image_context_tokens if image_dim else 0))


def train_variant(name: str, v: dict[str, Any], data: dict[str, torch.Tensor], probe: Probe, steps: int,
                  eval_every: int, tiny: bool, seed: int) -> list[dict[str, float]]:
    """Train one variant from scratch; returns the probe's figures at step 0 and every `eval_every` steps."""
    torch.manual_seed(seed)
    states = data["tokens" if v["tokens"] else "states"]
    image = data["image"] if v.get("image") else None
    unet = small_unet(states.shape[-1], image.shape[-1] if image is not None else None, tiny)
    schedule = NoiseSchedule(v["schedule"])
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    curve = [{"step": 0, **probe(unet, schedule, v["tokens"])}]
    T, B, start = schedule.num_train_timesteps, 32, time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(states), (B,), generator=gen)
        x0, context = data["latents"][idx], states[idx]
        drop = torch.rand(B, generator=gen) < 0.1  # caption dropout, as in training (classifier-free guidance)
        context = torch.where(drop[:, None, None], data["empty_tokens" if v["tokens"] else "empty_states"], context)
        img = None
        if image is not None:
            img = torch.where((torch.rand(B, generator=gen) < 0.1)[:, None], 0.0, image[idx])
        t = torch.randint(v.get("t_min", 0), T, (B,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        alpha, sigma = schedule.alpha_sigma(t, x0)
        pred = unet(alpha * x0 + sigma * noise, t.float(), context, img)
        target = prediction_target(x0, noise, alpha, sigma, schedule.config.prediction_type)
        loss = (pred - target).pow(2).mean((1, 2, 3))
        if v.get("min_snr_gamma"):
            ac = schedule.alphas_cumprod[t]
            loss = loss * min_snr_weight(ac / (1 - ac), v["min_snr_gamma"], schedule.config.prediction_type)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        opt.step()
        if step % eval_every == 0:
            figures = probe(unet, schedule, v["tokens"])
            curve.append({"step": step, **figures})
            print(f"  {name} step {step}: stated-cell accuracy {figures['cell_accuracy']:.3f}, ink ratio "
                  f"{figures['ink_ratio']:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--pipeline", default="assets/shapes-64", help="pipeline folder whose CLIP and VAE to use")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma separated, from {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--num-scenes", type=int, default=4096)
    parser.add_argument("--probe", default=None, metavar="PIPELINE",
                        help="probe this pipeline's trained decoder instead of training (its CLIP and VAE are used)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, a few steps (a logic check)")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/position_learning.json)")
    args = parser.parse_args()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        parser.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    pipeline = Path(args.probe or args.pipeline)
    tokenizer, text_encoder, image_encoder = load_clip(pipeline, torch.device("cpu"))
    for m in (text_encoder, image_encoder):
        m.float()
    vae = AutoencoderKL.from_pretrained(pipeline / "vae", dtype=torch.float32).requires_grad_(False).eval()
    if args.tiny:
        args.steps, args.eval_every, args.num_scenes = 4, 2, 64

    pc = PipelineConfig()

    def encode(prompts: list[str], images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """CLIP features as the decoder stage computes them: text_states with the token embeddings appended
        (B, 2L, D), text_embeds (B, P) and, given images (B, 3, H, W) in [-1, 1], image_embeds (B, P)."""
        return encode_batch(tokenizer, text_encoder, image_encoder, prompts, images, pc.image_mean, pc.image_std,
                            token_embeddings=True)

    latent_shape = (vae.config.latent_channels, 16, 16)
    probe = Probe(encode, vae, latent_shape)
    result: dict[str, Any] = {"machine": machine_info(), "pipeline": str(pipeline), "steps": args.steps}
    if args.probe:
        folder = pipeline / "decoder"
        unet = UNet.from_pretrained(folder, dtype=torch.float32)
        index = json.loads((pipeline / "model_index.json").read_text())["config"]
        schedule = NoiseSchedule(ScheduleConfig(**index["decoder_schedule"]))
        figures = probe(unet, schedule, bool(index.get("decoder_token_embeddings")))
        print(markdown_table(["pipeline", "stated-cell accuracy (chance 0.111)", "ink ratio"],
                             [[str(pipeline), f"{figures['cell_accuracy']:.3f}", f"{figures['ink_ratio']:.2f}"]]))
        result["probe"] = figures
    else:
        rng = np.random.default_rng(args.seed)
        specs, images = single_object_scenes(args.num_scenes, rng)
        captions = [caption(s) for s in specs]
        with torch.no_grad():
            parts = [encode(captions[i:i + 256], images[i:i + 256]) for i in range(0, len(captions), 256)]
            tokens = torch.cat([p["text_states"] for p in parts])
            image = torch.cat([p["image_embeds"] for p in parts])
            latents = torch.cat([vae.to_latents(vae.encode(images[i:i + 256]).mean)
                                 for i in range(0, len(images), 256)])
            empty = encode([""])["text_states"]
        half = tokens.shape[1] // 2
        data = {"tokens": tokens, "states": tokens[:, :half], "latents": latents, "image": image,
                "empty_tokens": empty, "empty_states": empty[:, :half]}
        result["variants"] = {}
        for name in names:
            print(f"{name}: {len(specs)} scenes, {args.steps} steps", flush=True)
            result["variants"][name] = train_variant(name, VARIANTS[name], data, probe, args.steps,
                                                     args.eval_every, args.tiny, args.seed)
        rows = [[n] + [f"{p['cell_accuracy']:.2f} ({p['ink_ratio']:.1f})" for p in c]
                for n, c in result["variants"].items()]
        steps = [p["step"] for p in next(iter(result["variants"].values()))]
        print(markdown_table(["variant"] + [f"step {s}" for s in steps], rows))
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" / "position_learning.json"
                                           if not args.tiny else Path("/tmp") / "position_learning.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
