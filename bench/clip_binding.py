"""Measure what a CLIP encodes, per attribute, two ways (0.5 / 1 / number of classes is chance):

- binding: how often a real image's embedding is closer to its own caption than to the caption with that one
  attribute changed (`latent_diffusion.evaluate.clip_binding`; chance 0.5);
- image probe: a linear classifier (multinomial logistic regression, L-BFGS) on the image embeddings of
  single-object scenes, trained on 80% and scored on the rest, for the object's cell, colour, shape and size
  (chance 1/9, 1/8, 1/6, 1/3): what the image embedding — the prior's target and the decoder's conditioning —
  keeps at all;
- text states: per text-encoder layer (0: the input token embeddings), the mean cosine similarity of the state at
  the EOS token (the one the pooled embedding reads) between a caption and the same caption with one thing
  changed: a stated cell, the relation flipped ("above" → "below"), a colour, or the two objects' colours swapped
  ("a red circle above a blue square" → "a blue circle above a red square"). 1.000 means the layer does not tell
  the two apart at all.

    python bench/clip_binding.py --pipeline assets/shapes-64 --out bench/results/clip_binding.json
    python bench/clip_binding.py --pipeline runs/my-clip        # a train_clip output folder works too

The decoder and the prior only see what the text encoder and image encoder keep: an attribute the CLIP cannot
tell apart is one the generated images cannot follow either.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latent_diffusion.data.shapes import SceneSpec, ShapeObject, ShapesDataset, caption, edit_spec, sample_spec
from latent_diffusion.evaluate import clip_binding
from latent_diffusion.models.clip import clip_image_preprocess, encode_image, encode_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import machine_info, write_json  # noqa: E402

from training.common import load_clip  # noqa: E402

PROBED = ("cell", "color", "shape", "size")
STATE_EDITS = ("cell", "relation", "color", "swap")


def edited_pairs(kind: str, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n (caption, edited caption) pairs of random scenes that allow the edit `kind` (STATE_EDITS)."""
    pairs = []
    while len(pairs) < n:
        spec = sample_spec(rng)
        if kind == "swap":
            if not spec.relations:
                continue
            a, b = spec.objects
            edited = SceneSpec((ShapeObject(b.color, a.shape, a.size, a.cell),
                                ShapeObject(a.color, b.shape, b.size, b.cell)), spec.relations, spec.stated)
        else:
            edited = edit_spec(spec, kind, rng)
        if edited is not None and caption(edited) != caption(spec):
            pairs.append((caption(spec), caption(edited)))
    return pairs


@torch.no_grad()
def state_similarity(tokenizer, text_encoder, pairs: list[tuple[str, str]]) -> list[float]:
    """Mean cosine similarity per layer (0 = token embeddings) of the EOS-token states of each pair."""
    def eos_states(texts: list[str]) -> torch.Tensor:  # -> (layers + 1, N, D)
        batch = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")
        out = text_encoder(**batch, output_hidden_states=True)
        eos = batch.attention_mask.sum(1) - 1  # the last real token
        return torch.stack([h[torch.arange(len(texts)), eos] for h in out.hidden_states])

    a, b = eos_states([p[0] for p in pairs]), eos_states([p[1] for p in pairs])
    return F.cosine_similarity(a, b, dim=-1).mean(1).tolist()


def linear_probe(x: torch.Tensor, labels: list, train_fraction: float = 0.8, l2: float = 1e-3) -> float:
    """Held-out accuracy of a linear softmax classifier of `labels` from standardised features x (N, D)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    n = int(len(x) * train_fraction)
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x[:n] @ w + b, y[:n]) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return ((x[n:] @ w + b).argmax(1) == y[n:]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", default="assets/shapes-64",
                        help="a pipeline folder, or any folder with tokenizer/, text_encoder/, image_encoder/")
    parser.add_argument("--num", type=int, default=512, help="real scenes for binding (held-out seed)")
    parser.add_argument("--probe-num", type=int, default=3000, help="single-object scenes for the image probe")
    parser.add_argument("--seed", type=int, default=1_000_003, help="dataset seed")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args()

    tokenizer, text_encoder, image_encoder = load_clip(Path(args.pipeline), torch.device("cpu"))
    size = image_encoder.config.image_size

    def embed_images(pixels: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) in [0, 1] -> (N, P)
        return torch.cat([encode_image(image_encoder, clip_image_preprocess(pixels[i:i + 128], size)).float()
                          for i in range(0, len(pixels), 128)])

    data = ShapesDataset(args.num + 20 * args.probe_num, seed=args.seed)
    with torch.no_grad():
        items = [data[i] for i in range(args.num)]
        specs = [SceneSpec.from_dict(it["spec"]) for it in items]
        image_embeds = embed_images((torch.stack([it["pixel_values"] for it in items]) + 1) / 2)
        binding = clip_binding(lambda c: encode_text(tokenizer, text_encoder, c)[1], image_embeds, specs)
        singles, i = [], args.num
        while len(singles) < args.probe_num:
            item = data[i]
            i += 1
            spec = SceneSpec.from_dict(item["spec"])
            if len(spec.objects) == 1:
                singles.append((spec.objects[0], item["pixel_values"]))
        probe_embeds = embed_images((torch.stack([p for _, p in singles]) + 1) / 2)
    probe = {k: linear_probe(probe_embeds, [getattr(o, k) for o, _ in singles]) for k in PROBED}
    rng = np.random.default_rng(args.seed)
    states = {k: state_similarity(tokenizer, text_encoder, edited_pairs(k, 256, rng)) for k in STATE_EDITS}
    print(f"{args.pipeline}: binding " + ", ".join(f"{k} {v:.3f}" for k, v in binding.items()))
    for k, per_layer in states.items():
        print(f"{args.pipeline}: EOS-state cosine, {k} edited, layers 0..{len(per_layer) - 1}: "
              + " ".join(f"{c:.3f}" for c in per_layer))
    print(f"{args.pipeline}: image probe " + ", ".join(f"{k} {v:.3f}" for k, v in probe.items()))
    if args.out:
        write_json(args.out, {"machine": machine_info(), "pipeline": args.pipeline, "num": args.num,
                              "binding": binding, "probe_num": args.probe_num, "image_probe": probe,
                              "eos_state_cosine": states})


if __name__ == "__main__":
    main()
