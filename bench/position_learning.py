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

`--task relation` asks the same of two-object relations ("a red circle to the left of a blue square"): it trains
on two-object scenes captioned with a relation and scores the x0 prediction by whether the subject's colour lies
on the stated side of the object's colour (colour-weighted centroids; 32 prompts, chance 0.5). Variants:

    tokens          as above
    tokens-refiner  `tokens` with a 2-block text refiner (`decoder.text_refiner_layers`)
    layer1          the states after CLIP's first layer (instead of its last) + the token embeddings

`--task pair` is the control for that probe: the same two-object scenes captioned with both cells instead ("a red
circle on the left and a blue square on the right"), probed with opposite cells; same variants.

    python bench/position_learning.py --pipeline assets/shapes-64 --out bench/results/position_learning.json
    python bench/position_learning.py --probe assets/shapes-64      # probe a pipeline's decoder (no training)
    python bench/position_learning.py --task relation --steps 600 --eval-every 200 \
        --out bench/results/relation_learning.json

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

from latent_diffusion.data.shapes import (
    CELLS,
    COLORS,
    RELATIONS,
    SHAPES,
    Relation,
    SceneSpec,
    ShapeObject,
    caption,
    render,
)
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
# context: which text tokens the decoder reads ("tokens": CLIP's output states + its input token embeddings;
# "states": output states only; "layer1": the states after CLIP's first layer + the token embeddings).
POSITION_VARIANTS: dict[str, dict[str, Any]] = {
    "tokens": dict(context="tokens", schedule=ZERO_SNR_V, t_min=700),
    "states": dict(context="states", schedule=ZERO_SNR_V, t_min=700),
    "tokens-minsnr": dict(context="tokens", schedule=ZERO_SNR_V, t_min=700, min_snr_gamma=5.0),
    "tokens-eps": dict(context="tokens", schedule=ScheduleConfig(), t_min=700, min_snr_gamma=5.0),
    "tokens-image": dict(context="tokens", schedule=ZERO_SNR_V, t_min=700, image=True),
    "tokens-uniform": dict(context="tokens", schedule=ZERO_SNR_V),
}
RELATION_VARIANTS: dict[str, dict[str, Any]] = {
    "tokens": dict(context="tokens", schedule=ZERO_SNR_V, t_min=700),
    "tokens-refiner": dict(context="tokens", schedule=ZERO_SNR_V, t_min=700, refiner=2),
    "layer1": dict(context="layer1", schedule=ZERO_SNR_V, t_min=700),
}
TASKS = {"position": POSITION_VARIANTS, "relation": RELATION_VARIANTS, "pair": RELATION_VARIANTS}
# pair-task probes: (subject cell, object cell) phrases and the relation they imply
OPPOSITE_CELLS = (("on the left", "on the right", "to the left of"), ("on the right", "on the left", "to the right of"),
                  ("at the top", "at the bottom", "above"), ("at the bottom", "at the top", "below"))
PROBE_OBJECTS = (("red", "circle"), ("blue", "square"), ("green", "star"), ("black", "cross"))
PROBE_PAIRS = (("red", "circle", "blue", "square"), ("green", "star", "yellow", "triangle"),
               ("purple", "diamond", "orange", "cross"), ("black", "square", "cyan", "circle"))


def single_object_scenes(n: int, rng: np.random.Generator) -> tuple[list[SceneSpec], torch.Tensor]:
    """n scenes of one medium object with a stated cell, and their images (n, 3, 64, 64) in [-1, 1]."""
    specs = [SceneSpec((ShapeObject(str(rng.choice(list(COLORS))), str(rng.choice(list(SHAPES))), "medium",
                                    int(rng.integers(9))),), stated=(frozenset({"cell"}),)) for _ in range(n)]
    return specs, torch.stack([pixels(s, rng) for s in specs])


def relation_scenes(n: int, rng: np.random.Generator,
                    state_cells: bool = False) -> tuple[list[SceneSpec], torch.Tensor]:
    """n scenes of two medium objects (distinct colours and shapes, distinct cells) captioned with one relation
    that holds ("a red circle above a blue square") or, with `state_cells`, with both cells ("a red circle on the
    left and a blue square in the center"), and their images (n, 3, 64, 64) in [-1, 1]."""
    from latent_diffusion.data.shapes import _relation_holds

    specs = []
    while len(specs) < n:
        colors, shapes = rng.choice(list(COLORS), 2, replace=False), rng.choice(list(SHAPES), 2, replace=False)
        cells = rng.choice(9, 2, replace=False)
        objs = tuple(ShapeObject(str(c), str(s), "medium", int(k)) for c, s, k in zip(colors, shapes, cells))
        if state_cells:
            specs.append(SceneSpec(objs, (), stated=(frozenset({"cell"}), frozenset({"cell"}))))
            continue
        true = [r for r in RELATIONS if _relation_holds(r, objs[0].cell, objs[1].cell)]
        specs.append(SceneSpec(objs, (Relation(0, true[int(rng.integers(len(true)))], 1),),
                               stated=(frozenset(), frozenset())))
    return specs, torch.stack([pixels(s, rng) for s in specs])


def pixels(spec: SceneSpec, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(np.asarray(render(spec, rng), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def ink_per_cell(images: torch.Tensor) -> torch.Tensor:
    """Mean darkness (1 - brightness) of each cell of the 3×3 grid, row-major. images (B, 3, H, W) in [-1, 1]
    -> (B, 9)."""
    ink = 1 - (images.clamp(-1, 1).mean(1, keepdim=True) + 1) / 2
    return F.adaptive_avg_pool2d(ink, 3).flatten(1)


def colour_centroids(images: torch.Tensor, colors: list[str]) -> torch.Tensor:
    """Centroid (x, y) in pixels of each image's pixels near a palette colour (weight exp(-d² / 2·40²), d the RGB
    distance). images (B, 3, H, W) in [-1, 1], one colour name per image -> (B, 2)."""
    rgb = (images.clamp(-1, 1) + 1) * 127.5  # (B, 3, H, W) in [0, 255]
    target = torch.tensor([COLORS[c] for c in colors], dtype=rgb.dtype)[:, :, None, None]
    weight = torch.exp(-(rgb - target).pow(2).sum(1) / (2 * 40.0**2))  # (B, H, W)
    H, W = weight.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=rgb.dtype), torch.arange(W, dtype=rgb.dtype), indexing="ij")
    total = weight.sum((1, 2)).clamp_min(1e-6)
    return torch.stack([(weight * xs).sum((1, 2)) / total, (weight * ys).sum((1, 2)) / total], 1)


class Probe:
    """x0 at the last timestep from fixed noise for fixed prompts, decoded by the VAE and scored.

    task "position": 4 objects × 9 stated cells, scored by where the ink is. task "relation": 4 colour/shape
    pairs × 4 relations × both orders, scored by which side of the object's colour the subject's colour lies;
    task "pair": the same pairs in opposite cells, scored alike."""

    def __init__(self, task: str, encode: Any, vae: AutoencoderKL, latent_shape: tuple[int, ...]):
        self.task = task
        if task == "position":
            self.cells = torch.tensor([c for _ in PROBE_OBJECTS for c in range(9)])
            prompts = [f"a {col} {shape} {CELLS[c]}" for col, shape in PROBE_OBJECTS for c in range(9)]
        else:
            pairs = [p for a, b, c, d in PROBE_PAIRS for p in (((a, b), (c, d)), ((c, d), (a, b)))]
            self.relations = [(s, r, o) for s, o in pairs for r in RELATIONS]
            prompts = [f"a {s[0]} {s[1]} {r} a {o[0]} {o[1]}" for s, r, o in self.relations]
            if task == "pair":
                self.relations = [(s, r, o) for s, o in pairs for _, _, r in OPPOSITE_CELLS]
                prompts = [f"a {s[0]} {s[1]} {cs} and a {o[0]} {o[1]} {co}"
                           for s, o in pairs for cs, co, _ in OPPOSITE_CELLS]
        self.contexts = encode(prompts)
        self.pooled = self.contexts["text_embeds"]
        self.noise = torch.randn(len(prompts), *latent_shape, generator=torch.Generator().manual_seed(7))
        self.vae = vae

    @torch.no_grad()
    def __call__(self, unet: UNet, schedule: NoiseSchedule, context: str) -> dict[str, float]:
        """`context`: which text tokens the decoder reads (a key of the encoded features)."""
        was_training = unet.training
        unet.eval()
        t = torch.full((len(self.noise),), schedule.num_train_timesteps - 1)
        alpha, sigma = schedule.alpha_sigma(t, self.noise)
        x = sigma * self.noise  # x_T = α x0 + σ ε with the layout unknown: its ε part only (α = 0 at zero SNR)
        pred = unet(x, t.float(), self.contexts[context], None, self.pooled if unet.config.pooled_text_dim else None)
        x0 = prediction_to_x0(pred, x, alpha, sigma, schedule.config.prediction_type)
        images = self.vae.decode(self.vae.from_latents(x0))
        unet.train(was_training)
        if self.task == "position":
            mass = ink_per_cell(images)
            rows = torch.arange(len(self.cells))
            return {"cell_accuracy": (mass.argmax(1) == self.cells).float().mean().item(),
                    "ink_ratio": (mass[rows, self.cells] / mass.mean(1)).mean().item()}
        subject = colour_centroids(images, [s[0] for s, _, _ in self.relations])
        obj = colour_centroids(images, [o[0] for _, _, o in self.relations])
        # signed distance along the relation's axis, positive when the subject is on the stated side
        sign = {"to the left of": (-1, 0), "to the right of": (1, 0), "above": (0, -1), "below": (0, 1)}
        direction = torch.tensor([sign[r] for _, r, _ in self.relations], dtype=subject.dtype)
        margin = ((subject - obj) * direction).sum(1)
        return {"relation_accuracy": (margin > 0).float().mean().item(), "margin_px": margin.mean().item()}


def small_unet(context_dim: int, image_dim: int | None, tiny: bool, refiner: int = 0) -> UNet:
    """The shipped decoder's sizes (configs/shapes/base.yaml; tests/configs/micro.yaml with `tiny`), without the
    pooled-text input; `refiner` text-refiner blocks."""
    root = Path(__file__).resolve().parent.parent
    dc = load_config(root / ("tests/configs/micro.yaml" if tiny else "configs/shapes/base.yaml")).decoder
    return UNet(UNetConfig(in_channels=4, out_channels=4, channels=dc.channels, attention_levels=dc.attention_levels,
                           layers_per_block=dc.layers_per_block, heads=dc.heads, transformer_depth=dc.transformer_depth,
                           context_dim=context_dim, norm_groups=dc.norm_groups, image_embed_dim=image_dim,
                           image_context_tokens=dc.image_context_tokens if image_dim else 0,
                           text_refiner_layers=refiner, text_refiner_heads=2 if tiny else 4))


def train_variant(name: str, v: dict[str, Any], data: dict[str, torch.Tensor], probe: Probe, steps: int,
                  eval_every: int, tiny: bool, seed: int) -> list[dict[str, float]]:
    """Train one variant from scratch; returns the probe's figures at step 0 and every `eval_every` steps."""
    torch.manual_seed(seed)
    states = data[v["context"]]
    image = data["image"] if v.get("image") else None
    unet = small_unet(states.shape[-1], image.shape[-1] if image is not None else None, tiny, v.get("refiner", 0))
    schedule = NoiseSchedule(v["schedule"])
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    curve = [{"step": 0, **probe(unet, schedule, v["context"])}]
    T, B, start = schedule.num_train_timesteps, 32, time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(states), (B,), generator=gen)
        x0, context = data["latents"][idx], states[idx]
        drop = torch.rand(B, generator=gen) < 0.1  # caption dropout, as in training (classifier-free guidance)
        context = torch.where(drop[:, None, None], data["empty_" + v["context"]], context)
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
            figures = probe(unet, schedule, v["context"])
            curve.append({"step": step, **figures})
            print(f"  {name} step {step}: " + ", ".join(f"{k} {x:.3f}" for k, x in figures.items())
                  + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--pipeline", default="assets/shapes-64", help="pipeline folder whose CLIP and VAE to use")
    parser.add_argument("--task", choices=list(TASKS), default="position")
    parser.add_argument("--variants", default=None,
                        help="comma separated (default: all of the task's): "
                        + "; ".join(f"{t}: {', '.join(v)}" for t, v in TASKS.items()))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--num-scenes", type=int, default=4096)
    parser.add_argument("--probe", default=None, metavar="PIPELINE",
                        help="probe this pipeline's trained decoder instead of training (its CLIP and VAE are used)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, a few steps (a logic check)")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/position_learning.json)")
    args = parser.parse_args()
    variants = TASKS[args.task]
    names = [n.strip() for n in (args.variants or ",".join(variants)).split(",") if n.strip()]
    bad = [n for n in names if n not in variants]
    if bad:
        parser.error(f"unknown {args.task} variants {bad}; choose from {list(variants)}")
    pipeline = Path(args.probe or args.pipeline)
    tokenizer, text_encoder, image_encoder = load_clip(pipeline, torch.device("cpu"))
    for m in (text_encoder, image_encoder):
        m.float()
    vae = AutoencoderKL.from_pretrained(pipeline / "vae", dtype=torch.float32).requires_grad_(False).eval()
    if args.tiny:
        args.steps, args.eval_every, args.num_scenes = 4, 2, 64

    pc = PipelineConfig()

    def encode(prompts: list[str], images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """CLIP features as the decoder stage computes them, per context: "tokens" (output states with the token
        embeddings appended, (B, 2L, D)), "states" (B, L, D), "layer1" (first-layer states + token embeddings);
        text_embeds (B, P) and, given images (B, 3, H, W) in [-1, 1], image_embeds (B, P)."""
        f = encode_batch(tokenizer, text_encoder, image_encoder, prompts, images, pc.image_mean, pc.image_std,
                         token_embeddings=True)
        layer1 = encode_batch(tokenizer, text_encoder, None, prompts, None, pc.image_mean, pc.image_std,
                              token_embeddings=True, layer=1)["text_states"]
        half = f["text_states"].shape[1] // 2
        return {**f, "tokens": f["text_states"], "states": f["text_states"][:, :half], "layer1": layer1}

    latent_shape = (vae.config.latent_channels, 16, 16)
    probe = Probe(args.task, encode, vae, latent_shape)
    result: dict[str, Any] = {"machine": machine_info(), "pipeline": str(pipeline), "task": args.task,
                              "steps": args.steps}
    if args.probe:
        folder = pipeline / "decoder"
        unet = UNet.from_pretrained(folder, dtype=torch.float32)
        index = json.loads((pipeline / "model_index.json").read_text())["config"]
        schedule = NoiseSchedule(ScheduleConfig(**index["decoder_schedule"]))
        figures = probe(unet, schedule, "tokens" if index.get("decoder_token_embeddings") else "states")
        print(markdown_table(["pipeline", *figures], [[str(pipeline), *(f"{x:.3f}" for x in figures.values())]]))
        result["probe"] = figures
    else:
        rng = np.random.default_rng(args.seed)
        if args.task == "position":
            specs, images = single_object_scenes(args.num_scenes, rng)
        else:
            specs, images = relation_scenes(args.num_scenes, rng, state_cells=args.task == "pair")
        captions = [caption(s) for s in specs]
        contexts = ("tokens", "states", "layer1")
        with torch.no_grad():
            parts = [encode(captions[i:i + 256], images[i:i + 256]) for i in range(0, len(captions), 256)]
            data = {k: torch.cat([p[k] for p in parts]) for k in contexts}
            data["image"] = torch.cat([p["image_embeds"] for p in parts])
            data["latents"] = torch.cat([vae.to_latents(vae.encode(images[i:i + 256]).mean)
                                         for i in range(0, len(images), 256)])
            empty = encode([""])
            data.update({f"empty_{k}": empty[k] for k in contexts})
        result["variants"] = {}
        for name in names:
            print(f"{name}: {len(specs)} scenes, {args.steps} steps", flush=True)
            result["variants"][name] = train_variant(name, variants[name], data, probe, args.steps,
                                                     args.eval_every, args.tiny, args.seed)
        first, second = ("cell_accuracy", "ink_ratio") if args.task == "position" else \
            ("relation_accuracy", "margin_px")
        rows = [[n] + [f"{p[first]:.2f} ({p[second]:.1f})" for p in c] for n, c in result["variants"].items()]
        steps = [p["step"] for p in next(iter(result["variants"].values()))]
        print(markdown_table(["variant"] + [f"step {s}" for s in steps], rows))
    name = f"{args.task}_learning.json"
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" / name
                                           if not args.tiny else Path("/tmp") / name)
    write_json(out, result)


if __name__ == "__main__":
    main()
