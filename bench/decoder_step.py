"""Where one training step of the decoder goes: the step `training.train_decoder` runs (shapes data, frozen CLIP
and VAE features computed on the fly, the decoder's loss, AdamW, EMA) on a pipeline's components, with the shipped
decoder's recipe fixed here (logit-normal (0.7, 1.0) timesteps, text and image dropout 0.1, EMA 0.999, lr 1e-5;
the prediction type is the pipeline's) whatever the pipeline's training config said, timed part by part, as a
whole, and beside the DataLoader alone.

    python bench/decoder_step.py                                  # the shipped pipeline, on CUDA when available
    python bench/decoder_step.py --device cuda --batch-sizes 256 1024 --workers 12 --mixed-precision bf16
    python bench/decoder_step.py --tiny                                      # a seconds-long smoke run

Per batch size B it reports samples/s of
- "loader": the DataLoader alone (`--workers` processes rendering scenes), the ceiling the host can feed;
- each part with the device synchronised around it (median of `--steps`): tokenize (host; training runs it in the
  DataLoader workers, `training.common.TokenizingCollate`), text encoder, image encoder, VAE encoder, decoder
  forward + backward, gradient clipping + AdamW, EMA update;
- "step": the whole step repeated `--steps` times with no synchronisation inside (how the training loop runs it),
  on one batch held on the device: the device's ceiling for on-the-fly features; "tokenizing in the step": the
  same with the tokenizer in the step (as before `TokenizingCollate`);
- "step, cached features": the same without the CLIP and VAE encoders (`decoder.cache: true`).
With `--compare-switches` it also times the whole step (both ways) of the pipeline as loaded against a copy with
the training speed switches on every component (`optim.onednn_linear` and `optim.transposed_upsample`, as
`training.train_decoder` applies them), interleaved (A B A B ..., median), and reports the ratio.
The model and the optimiser change during the measurement (it is training); the figures are rates, not results.

    python bench/decoder_step.py --device cpu --batch-sizes 64 --compare-switches      # the CPU switches, end to end
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from _common import interleaved, machine_info, markdown_table, sync, write_json  # noqa: E402

from latent_diffusion import TextToImagePipeline  # noqa: E402
from latent_diffusion.data.shapes import ShapesDataset  # noqa: E402
from latent_diffusion.diffusion import NoiseSchedule  # noqa: E402
from training.common import decoder_loss, encode_batch, tokenize_once  # noqa: E402
from training.ema import EMA  # noqa: E402
from training.loop import StepRandom  # noqa: E402


def loader_rate(batch: int, workers: int, steps: int) -> float:
    """Samples/s of a shuffled DataLoader over the shapes data (the first batch, worker start-up, not counted)."""
    loader = torch.utils.data.DataLoader(ShapesDataset(1_000_000, seed=0), batch_size=batch, shuffle=True,
                                         num_workers=workers)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return batch * steps / (time.perf_counter() - t0)


def timed(fn: Callable[[], object], device: torch.device, steps: int) -> float:
    """Median seconds of `fn` with the device synchronised before and after each call (one warm-up call)."""
    fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Trainer:
    """The decoder of `pipe` set up to train as `training.train_decoder` does: AdamW, EMA, its noise schedule and
    the empty caption's features (for caption dropout)."""

    def __init__(self, pipe: TextToImagePipeline, device: torch.device, autocast: Any):
        self.pipe, self.device, self.autocast = pipe, device, autocast
        self.unet = pipe.decoder.requires_grad_(True).train()
        self.schedule = NoiseSchedule(pipe.config.decoder_schedule)
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=1e-5, fused=device.type == "cuda")
        self.ema = EMA(self.unet, 0.999)
        self.empty = encode_batch(pipe.tokenizer, pipe.text_encoder, None, [""], None, pipe.config.image_mean,
                                  pipe.config.image_std, pipe.config.decoder_token_embeddings)


def measure(B: int, args: argparse.Namespace, trainer: Trainer, rows: bool = True
            ) -> tuple[dict[str, float], dict[str, float], dict[str, Callable[[], None]]]:
    """Samples/s of each row for batch size `B`, the synchronised seconds of each part, and the whole-step
    callables ("step", "step, cached features"); `rows=False` builds the callables only."""
    pipe, device, autocast, optimizer, ema = trainer.pipe, trainer.device, trainer.autocast, trainer.optimizer, \
        trainer.ema
    empty, schedule = trainer.empty, trainer.schedule
    tok, text_encoder, image_encoder, vae, cfg = pipe.tokenizer, pipe.text_encoder, pipe.image_encoder, pipe.vae, \
        pipe.config
    unet, tokens = pipe.decoder, cfg.decoder_token_embeddings
    data = ShapesDataset(B, seed=1)
    items = [data[i] for i in range(B)]
    captions = [x["caption"] for x in items]
    pixels = torch.stack([x["pixel_values"] for x in items]).to(device)
    state = {"step": 0}

    ids = tokenize_once(tok, captions)

    def text(pretokenized: bool = True) -> dict:
        with autocast:
            return encode_batch(tok, text_encoder, None, captions, None, cfg.image_mean, cfg.image_std, tokens,
                                tokens=ids if pretokenized else None)

    def image() -> dict:
        with autocast:
            return encode_batch(tok, text_encoder, image_encoder, [""], pixels, cfg.image_mean, cfg.image_std)

    def vae_encode() -> torch.Tensor:
        with autocast, torch.no_grad():
            p = vae.encode(pixels)
            return p.mean + p.std * torch.randn_like(p.std)

    def all_features(pretokenized: bool = True) -> dict:
        return {**text(pretokenized), "image_embeds": image()["image_embeds"], "latents": vae.to_latents(vae_encode())}

    features = all_features()

    def forward_backward(f: dict = features) -> None:
        rnd = StepRandom(0, state["step"], 0, 0, 1, B, device)
        state["step"] += 1
        with autocast:
            loss = decoder_loss(unet, f["latents"], (f["text_states"], f["text_embeds"]),
                                (empty["text_states"], empty["text_embeds"]), f["image_embeds"], rnd, schedule,
                                0.1, 0.1, timestep_logit_normal=(0.7, 1.0))
        loss.backward()

    def update() -> None:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    forward_backward()

    def whole(cached: bool, pretokenized: bool = True) -> Callable[[], None]:
        def step() -> None:
            if cached:
                forward_backward()
            else:
                forward_backward(all_features(pretokenized))
            update()
            ema.update(unet)

        return step

    steps = {"step": whole(False), "step, cached features": whole(True)}
    if not rows:
        return {}, {}, steps
    parts = {"tokenize (in DataLoader workers in training)": timed(lambda: tokenize_once(tok, captions), device,
                                                                    args.steps),
             "text encoder": timed(text, device, args.steps),
             "image encoder": timed(image, device, args.steps),
             "VAE encoder": timed(vae_encode, device, args.steps),
             "decoder fwd+bwd": timed(forward_backward, device, args.steps),
             "clip + AdamW": timed(update, device, args.steps),
             "EMA": timed(lambda: ema.update(unet), device, args.steps)}

    def rate(fn: Callable[[], None]) -> float:
        fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync(device)
        return B * args.steps / (time.perf_counter() - t0)

    result = {"loader": loader_rate(B, args.workers, args.steps),
              **{k: B / v for k, v in parts.items()},
              "parts but tokenize, summed": B / sum(v for k, v in parts.items() if not k.startswith("tokenize")),
              "step": rate(steps["step"]), "step, tokenizing in the step": rate(whole(False, pretokenized=False)),
              "step, cached features": rate(steps["step, cached features"])}
    return result, parts, steps


def compare_switches(B: int, args: argparse.Namespace, plain: Trainer, fast: Trainer) -> list[list[Any]]:
    """Rows (batch, what, plain samples/s, switched samples/s, ratio of step times) of the whole step, both ways,
    the two pipelines interleaved."""
    a, b = measure(B, args, plain, rows=False)[2], measure(B, args, fast, rows=False)[2]
    out = []
    for what in a:
        timing = interleaved({"plain": a[what], "switched": b[what]}, repeats=args.repeats, iters=args.steps,
                             device=plain.device)
        p, s = timing["plain"]["median_ms"], timing["switched"]["median_ms"]
        out.append([B, what, B / p * 1e3, B / s * 1e3, s / p])
        print(f"  {what}: plain {B / p * 1e3:.1f} samples/s, switched {B / s * 1e3:.1f} ({s / p:.2f} of the time)",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pipeline", default=str(REPO / "assets" / "shapes-64"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--workers", type=int, default=2, help="DataLoader processes for the loader figure")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "decoder_step.json"))
    ap.add_argument("--compare-switches", action="store_true",
                    help="also time the whole step against a copy with optim.onednn_linear + transposed_upsample")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved repeats of --compare-switches")
    ap.add_argument("--tiny", action="store_true", help="batch 4, 1 step, no workers; JSON to the temp folder")
    args = ap.parse_args()
    if args.tiny:
        args.batch_sizes, args.steps, args.workers, args.repeats = [4], 1, 0, 1
        args.out = str(Path(tempfile.gettempdir()) / "decoder_step_tiny.json")
    device = torch.device(args.device)
    pipe = TextToImagePipeline.from_pretrained(args.pipeline, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.mixed_precision == "bf16"
                else nullcontext())
    trainer = Trainer(pipe, device, autocast)
    fast = None
    if args.compare_switches:
        fast = Trainer(copy.deepcopy(pipe).apply_speed(onednn=True, upsample=True), device, autocast)
    rows, results, compared = [], {}, []
    for B in args.batch_sizes:
        if fast is not None:
            compared += compare_switches(B, args, trainer, fast)
        result, parts, _ = measure(B, args, trainer)
        results[str(B)] = {"samples_per_s": result, "part_ms": {k: v * 1e3 for k, v in parts.items()}}
        for name, value in result.items():
            ms = parts.get(name)
            rows.append([B, name, value, None if ms is None else ms * 1e3])
        print(markdown_table(["batch", "what", "samples/s", "ms (synchronised)"], rows[-len(result):]), flush=True)
    info = machine_info(device)
    print(markdown_table(["batch", "what", "samples/s", "ms (synchronised)"], rows))
    data = {"machine": info, "pipeline": args.pipeline, "mixed_precision": args.mixed_precision,
            "workers": args.workers, "steps": args.steps, "results": results}
    if compared:
        table = markdown_table(["batch", "whole step", "plain samples/s", "switched samples/s", "time ratio"], compared)
        print("\nspeed switches (optim.onednn_linear + optim.transposed_upsample), interleaved:\n" + table)
        data.update(switches={"repeats": args.repeats, "rows": compared, "table": table})
    write_json(args.out, data)


if __name__ == "__main__":
    main()
