"""Prompt-following evaluation on the shapes domain, in the spirit of GenEval (Ghosh et al. 2023): every
prompt has a structured spec, so each generated image is scored exactly by the shapes checker.

The suite has four groups: (a) `single` — one object, colour + shape (+ size / position); (b) `relation` —
two objects and a spatial relation; (c) `three` — three objects; (d) `heldout` — one object whose colour×shape
pair never appeared in training. Reported per group and per attribute, with

* the checker pass rate (an image passes when every stated attribute and the object count are right);
* FD-CLIP: the Fréchet distance (Heusel et al. 2017, Eq. 6) between Gaussians fitted to the trained CLIP's image
  embeddings of generated and of real images of the same prompts;
* CLIP score: 100 · mean cosine between the image embedding and the prompt's text embedding (Hessel et al. 2021,
  without the 2.5 rescaling), with the trained CLIP;

for several samplers, and three ablations of the conditioning: (i) prior + decoder (the default), (ii) decoder on
text alone (null image embedding), (iii) decoder given the true CLIP image embedding of a real image of the
prompt — an upper bound for the prior.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from latent_diffusion.data.checker import check
from latent_diffusion.data.shapes import (
    COLORS,
    EDIT_KINDS,
    SHAPES,
    SceneSpec,
    caption,
    edit_spec,
    render,
    sample_spec,
)

GROUPS: tuple[str, ...] = ("single", "relation", "three", "heldout")
ATTRIBUTES: tuple[str, ...] = ("count", "color", "shape", "size", "cell", "relation")
# (name, sampler, decoder steps): the sampler comparison of the report.
DEFAULT_SETTINGS: tuple[tuple[str, str, int], ...] = (
    ("DDPM 250", "ddpm", 250), ("DDIM 50", "ddim", 50), ("DPM-Solver++(2M) 20", "dpmpp_2m", 20),
    ("DPM-Solver++(2M) 10", "dpmpp_2m", 10),
)
ABLATIONS: tuple[str, ...] = ("prior + decoder", "text only", "true image embedding")


@dataclass(frozen=True)
class SuiteItem:
    group: str
    prompt: str
    spec: SceneSpec


def prompt_suite(num_per_group: int = 8, seed: int = 0,
                 heldout_pairs: tuple[tuple[str, str], ...] = ()) -> list[SuiteItem]:
    """A fixed, deterministic list of prompts with specs: `num_per_group` per group (no `heldout` group when
    no held-out pairs are given). Prompts within a group are distinct."""
    rng = np.random.default_rng([seed, 2024])
    heldout = set(heldout_pairs)
    others = {(c, s) for c in COLORS for s in SHAPES} - heldout
    want = {"single": lambda s: len(s.objects) == 1, "relation": lambda s: bool(s.relations),
            "three": lambda s: len(s.objects) == 3}
    items: list[SuiteItem] = []
    for group in GROUPS:
        if group == "heldout" and not heldout:
            continue
        seen: set[str] = set()
        for _ in range(100_000):
            if len(seen) == num_per_group:
                break
            if group == "heldout":
                spec = sample_spec(rng, exclude=others, max_objects=1)
            else:
                spec = sample_spec(rng, exclude=heldout)
                if not want[group](spec):
                    continue
            text = caption(spec)
            if text not in seen:
                seen.add(text)
                items.append(SuiteItem(group, text, spec))
    return items


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted to rows of a (N, D) and b (M, D).

    Tr((Σ_a Σ_b)^½) is computed as the sum of square roots of the eigenvalues of Σ_a^½ Σ_b Σ_a^½ (symmetric PSD),
    in float64."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"the Fréchet distance needs two (N, D) sets of at least 2 rows each with the same D, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def clip_binding(embed_text: Callable[[list[str]], torch.Tensor], image_embeds: torch.Tensor,
                 specs: list[SceneSpec], seed: int = 0) -> dict[str, float]:
    """How well a CLIP binds each attribute: per edit kind (`edit_spec`), the fraction of images whose embedding
    is closer (cosine) to their own caption than to the caption with one stated attribute changed — the
    image→text side of the ARO / NegCLIP probes (Yuksekgonul et al. 2023). 0.5 is chance.

    image_embeds: (N, P) for the N scenes `specs`; embed_text(captions) -> (M, P). Kinds with no possible edit in
    `specs` are left out."""
    image = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    right = torch.nn.functional.normalize(embed_text([caption(s) for s in specs]).float().to(image), dim=-1)
    rng = np.random.default_rng([seed, 5])
    out: dict[str, float] = {}
    for kind in EDIT_KINDS:
        pairs = [(i, e) for i, e in ((i, edit_spec(s, kind, rng)) for i, s in enumerate(specs)) if e is not None]
        if pairs:
            rows = [i for i, _ in pairs]
            wrong = torch.nn.functional.normalize(embed_text([caption(e) for _, e in pairs]).float().to(image), dim=-1)
            closer = (image[rows] * right[rows]).sum(-1) > (image[rows] * wrong).sum(-1)
            out[kind] = closer.float().mean().item()
    return out


def _stated(spec: SceneSpec, attribute: str) -> bool:
    if attribute in ("count", "color", "shape"):
        return True
    if attribute == "relation":
        return bool(spec.relations)
    return any(attribute in s for s in spec.stated)


def score_images(images: list[Image.Image], items: list[SuiteItem]) -> dict[str, Any]:
    """Checker pass rates overall, per group and per attribute (over images whose prompt states it)."""
    by_group: dict[str, list[bool]] = defaultdict(list)
    by_attr: dict[str, list[bool]] = defaultdict(list)
    for image, item in zip(images, items):
        if image.size != (64, 64):
            image = image.resize((64, 64), Image.BICUBIC)
        result = check(image, item.spec)
        by_group[item.group].append(result.passed)
        for attr in ATTRIBUTES:
            if _stated(item.spec, attr):
                by_attr[attr].append(attr not in result.failed)
    everything = [p for v in by_group.values() for p in v]
    return {"pass_rate": float(np.mean(everything)),
            "groups": {g: float(np.mean(v)) for g, v in by_group.items()},
            "attributes": {a: float(np.mean(v)) for a, v in by_attr.items()}}


@torch.no_grad()
def evaluate(pipe: Any, items: list[SuiteItem], seeds: int = 4, settings=DEFAULT_SETTINGS,
             ablation_setting: tuple[str, str, int] | None = None, guidance_scale: float = 5.0,
             prior_guidance_scale: float = 4.0, prior_steps: int = 25, batch_size: int = 64,
             grid_path: Path | None = None, progress: bool = True,
             image_guidance_scale: float | None = None) -> dict[str, Any]:
    """Generate `seeds` images per suite prompt for every setting (and the ablations) and score them.
    `image_guidance_scale`: the decoder's guidance towards the image embedding (None: the pipeline's default).

    Image k of prompt p draws from a generator seeded with k in every setting and ablation. The prior draws
    from it first (the settings' sampler runs the prior too, unless the pipeline configures the prior's own), so
    settings that change the prior's sampling, or skip the prior, also change the decoder's starting noise."""
    if pipe.image_encoder is None:
        raise ValueError("evaluation needs the pipeline's CLIP image encoder (image_encoder/)")
    expanded = [item for item in items for _ in range(seeds)]
    seed_of = [k for _ in items for k in range(seeds)]
    rng = np.random.default_rng(0)
    real = [render(item.spec, rng, 64) for item in expanded]
    real_embeds = _image_embeds(pipe, real, batch_size)
    # CLIP text embeddings from the tower paired with the image encoder: the prior's own when it has one (a converted
    # Stable unCLIP's decoder reads another text encoder)
    text_embeds = torch.cat([pipe.encode_prior_prompt(list(p))[1] for p in _chunks([i.prompt for i in expanded],
                                                                            batch_size)])

    def generate(sampler: str, steps: int, image_embeds: torch.Tensor | None, name: str) -> list[Image.Image]:
        images: list[Image.Image] = []
        for lo in tqdm(range(0, len(expanded), batch_size), desc=name, disable=not progress, leave=False,
                       unit="batch"):
            hi = min(lo + batch_size, len(expanded))
            gens = [torch.Generator().manual_seed(s) for s in seed_of[lo:hi]]
            out = pipe([i.prompt for i in expanded[lo:hi]], generator=gens, sampler=sampler,
                       num_inference_steps=steps, prior_num_inference_steps=prior_steps,
                       guidance_scale=guidance_scale, prior_guidance_scale=prior_guidance_scale,
                       image_embeds=None if image_embeds is None else image_embeds[lo:hi], progress=False,
                       image_guidance_scale=image_guidance_scale)
            images += out.images
        return images

    def report(images: list[Image.Image], seconds: float) -> dict[str, Any]:
        embeds = _image_embeds(pipe, images, batch_size)
        cos = torch.nn.functional.cosine_similarity(embeds, text_embeds.to(embeds)).mean().item()
        return {**score_images(images, expanded), "fd_clip": frechet_distance(embeds, real_embeds),
                "clip_score": 100 * cos, "seconds": seconds}

    results: dict[str, Any] = {"num_prompts": len(items), "seeds": seeds, "embed_dim": real_embeds.shape[1],
                               "guidance_scale": guidance_scale,
                               "image_guidance_scale": pipe.image_guidance(image_guidance_scale, guidance_scale),
                               "prior_guidance_scale": prior_guidance_scale, "samplers": {}, "ablations": {}}
    real_text_cos = torch.nn.functional.cosine_similarity(real_embeds, text_embeds.to(real_embeds)).mean().item()
    results["real_images"] = {**score_images(real, expanded), "clip_score": 100 * real_text_cos}
    results["clip_binding"] = clip_binding(lambda captions: torch.cat(
        [pipe.encode_prior_prompt(chunk)[1].float().cpu() for chunk in _chunks(captions, batch_size)]), real_embeds,
        [item.spec for item in expanded])
    # The VAE bounds everything the decoder can draw: score the real images after an encode/decode round trip.
    recon = _reconstruct(pipe, real, batch_size)
    results["vae_reconstructions"] = {**score_images(recon, expanded),
                                      "fd_clip": frechet_distance(_image_embeds(pipe, recon, batch_size), real_embeds),
                                      "clip_score": float("nan")}
    first_images, done = None, {}
    for name, sampler, steps in settings:
        t0 = time.perf_counter()
        images = generate(sampler, steps, None, name)
        results["samplers"][name] = done[sampler, steps] = report(images, time.perf_counter() - t0)
        first_images = first_images or images
        if progress:
            print(f"[evaluate] {name}: pass rate {results['samplers'][name]['pass_rate']:.3f}", flush=True)
    if ablation_setting is not None:
        name, sampler, steps = ablation_setting
        results["ablation_sampler"] = name
        has_prior = pipe.prior is not None
        for ablation in ABLATIONS:
            if ablation == "prior + decoder" and not has_prior:
                continue
            if ablation != "prior + decoder" and not pipe.decoder.config.uses_image_embeds:
                continue  # a text-only decoder: nothing to take away or to give
            embeds = None
            if ablation == "text only":  # a zero CLIP image embedding, as the image dropout trains it
                embeds = torch.zeros_like(real_embeds)
            elif ablation == "true image embedding":
                embeds = real_embeds
            if ablation == "prior + decoder" and (sampler, steps) in done:  # the same call as that setting's
                results["ablations"][ablation] = done[sampler, steps]
                continue
            t0 = time.perf_counter()
            images = generate(sampler, steps, embeds, f"ablation {ablation}")
            results["ablations"][ablation] = report(images, time.perf_counter() - t0)
            if progress:
                print(f"[evaluate] ablation {ablation}: pass rate "
                      f"{results['ablations'][ablation]['pass_rate']:.3f}", flush=True)
    if grid_path is not None and first_images:
        _suite_grid(first_images, expanded, seeds).save(grid_path)
    return results


def _reconstruct(pipe: Any, images: list[Image.Image], batch_size: int) -> list[Image.Image]:
    out: list[Image.Image] = []
    for chunk in _chunks(images, batch_size):
        pixels = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                              for im in chunk]).to(pipe.device, pipe.dtype)  # (B, 3, H, W) in [-1, 1]
        latents = pipe.encode_latents(pixels)
        out += pipe.decode_latents(latents, "pil")
    return out


def _chunks(xs: list, n: int) -> list[list]:
    return [xs[i:i + n] for i in range(0, len(xs), n)]


def _image_embeds(pipe: Any, images: list[Image.Image], batch_size: int) -> torch.Tensor:
    return torch.cat([pipe.encode_image(chunk).float().cpu() for chunk in _chunks(images, batch_size)])


def _suite_grid(images: list[Image.Image], items: list[SuiteItem], seeds: int, per_group: int = 4) -> Image.Image:
    """One row per group: the first seed of its first `per_group` prompts."""
    rows = []
    for group in GROUPS:
        idx = [i for i, it in enumerate(items) if it.group == group][::seeds][:per_group]
        if idx:
            rows.append([images[i] for i in idx])
    w, h = images[0].size
    grid = Image.new("RGB", (per_group * w, len(rows) * h), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * w, r * h))
    return grid


def _fd_note(results: dict[str, Any]) -> list[str]:
    """A caution under the header when FD-CLIP's covariances come from no more images than dimensions."""
    n, d = results["num_prompts"] * results["seeds"], results.get("embed_dim")
    if d is None or n > d:
        return []
    return [f"FD-CLIP here compares {n} images in {d} dimensions: the covariances are rank-deficient, so compare it "
            "only between runs with the same number of images."]


def to_markdown(results: dict[str, Any]) -> str:
    """The report as markdown tables: samplers, then ablations; pass rates per group and attribute."""
    groups = [g for g in GROUPS if any(g in r["groups"] for r in results["samplers"].values())]
    head = ["setting", "pass rate", *groups, *ATTRIBUTES, "FD-CLIP", "CLIP score", "time (s)"]

    def num(value: float | None, fmt: str) -> str:
        return "—" if value is None or value != value else format(value, fmt)

    def row(name: str, r: dict[str, Any]) -> str:
        cells = [name, num(r["pass_rate"], ".3f"), *(num(r["groups"].get(g), ".3f") for g in groups),
                 *(num(r["attributes"].get(a), ".3f") for a in ATTRIBUTES), num(r.get("fd_clip"), ".2f"),
                 num(r.get("clip_score"), ".1f"), num(r.get("seconds"), ".0f")]
        return "| " + " | ".join(cells) + " |"

    lines = [f"{results['num_prompts']} prompts × {results['seeds']} seeds; decoder guidance "
             f"{results['guidance_scale']} (towards the image embedding "
             f"{results.get('image_guidance_scale', results['guidance_scale'])}), prior guidance "
             f"{results['prior_guidance_scale']}.", *_fd_note(results), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append(row("real images (checker on renders)", results["real_images"]))
    if "vae_reconstructions" in results:
        lines.append(row("real images through the VAE", results["vae_reconstructions"]))
    lines += [row(name, r) for name, r in results["samplers"].items()]
    if results["ablations"]:
        lines += ["", f"Ablations ({results.get('ablation_sampler', '')}):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += [row(name, r) for name, r in results["ablations"].items()]
    if results.get("clip_binding"):
        lines += ["", "CLIP binding (how often a real image's embedding is closer to its caption than to the caption "
                  "with one attribute changed; chance 0.5): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in results["clip_binding"].items()) + "."]
    return "\n".join(lines) + "\n"


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) inside dicts and lists replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def save_report(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write results.json (strict JSON: a score that does not exist, NaN, is null) and results.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(json_ready(results), indent=2, allow_nan=False) + "\n")
    (out_dir / "results.md").write_text(to_markdown(results))
    return [out_dir / "results.json", out_dir / "results.md"]
