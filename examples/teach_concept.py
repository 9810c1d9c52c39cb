"""Proof that fine-tuning learns: teach a trained shapes pipeline a concept it has never seen — the colour "pink"
(RGB 240, 110, 180) or the shape "heart" — from 200 captioned images, and measure it with the shapes checker.

One command does it all — write the data, fine-tune with LoRA through `accelerate launch`, and score base against
fine-tuned (the checker is told what pink / a heart is):

    python examples/teach_concept.py all --concept pink --pipeline assets/shapes-64 --out runs/pink
    python examples/teach_concept.py all --concept heart --pipeline assets/shapes-64 --out runs/heart

or step by step (each step reads what the previous one wrote under --out):

    python examples/teach_concept.py data --concept pink --out runs/pink          # 200 images + metadata.jsonl
    python examples/teach_concept.py train --concept pink --pipeline assets/shapes-64 --out runs/pink [-- flags...]
    python examples/teach_concept.py evaluate --concept pink --pipeline assets/shapes-64 --out runs/pink

`data` writes an imagefolder (`OUT/data`: PNGs + `metadata.jsonl` with `file_name`, `text` and the scene `spec`):
200 scenes of one or two shapes; three in four hold the new concept ("a large pink circle on the left and a blue
square in the center", "a small red heart at the top"), the rest are ordinary scenes that keep the old vocabulary
in practice. One combination is never shown — a pink *star*, a *green* heart — to test whether the new concept
composes with what the model already knows. `--replay N` adds N images that the *base* pipeline draws for ordinary
captions (`replay-*.png`): DreamBooth's prior preservation, which keeps long fine-tuning from overfitting the 200
images and forgetting the rest (`--concept-fraction 1.0 --replay 400` met both goals for the heart).

`train` runs `accelerate launch [--accelerate-args] -m training.finetune --method lora --components decoder,prior`
(rank 8, 2000 steps of batch 16 by default; `--method full` fine-tunes the whole decoder and prior instead; anything
after `--` is passed to training.finetune, e.g. `-- --max-steps 500 --mixed-precision bf16`). A colour the VAE never
saw (pink) also needs the VAE decoder trained: `--method full -- --components decoder,prior,vae_decoder`. The
result lands in `OUT/lora` (or `OUT/full`, a complete pipeline), validation grids in `OUT/<method>/_work/finetune/`
(`validation-0000000.png` is the base model).

`evaluate` samples, with the base pipeline and with the LoRA loaded (same prompts and seeds), three single-object
prompt groups — the concept (`pink` / `heart`, with sizes and positions), the held-out combination, and `control`
(single shapes in the old vocabulary) — and checks every image; then it runs the original evaluation suite
(`latent_diffusion.evaluate`, DPM-Solver++(2M) 20 steps) with both, to measure forgetting: "retention" is the
LoRA's suite pass rate over the base pipeline's. It writes `OUT/eval/results.json`, `results.md` and one grid per
group and model. Success looks like: the base pipeline scores ~0 on the concept groups (it cannot draw what it
never saw), the fine-tuned one clearly above it, and the control and suite pass rates stay where they were.

Cost: the data takes seconds; training the shipped 64×64 pipeline for 2000 steps takes minutes on a GPU and hours
on a 2-core CPU (try `-- --max-steps 300` there first); `evaluate` samples (16 + 8 + 16) prompts × 4 seeds and the
suite's 32 prompts × 2 seeds, for each of the two models.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from latent_diffusion.data.checker import check  # noqa: E402
from latent_diffusion.data.shapes import (  # noqa: E402
    SceneSpec,
    ShapeObject,
    caption,
    render,
    sample_spec,
)

PINK = (240, 110, 180)


@dataclass(frozen=True)
class Concept:
    """A new word for the model: a colour (drawn in `rgb`) or a shape (one of shapes.NEW_SHAPES), and the one
    combination with the old vocabulary that training never shows."""

    name: str
    kind: str  # "color" or "shape"
    rgb: tuple[int, int, int] | None = None
    heldout: str = ""  # the old shape (for a colour) or the old colour (for a shape) never paired with it

    def apply(self, obj: ShapeObject) -> ShapeObject:
        if self.kind == "color":
            return ShapeObject(self.name, obj.shape, obj.size, obj.cell, rgb=self.rgb)
        return ShapeObject(obj.color, self.name, obj.size, obj.cell, rgb=obj.rgb)

    def is_heldout(self, obj: ShapeObject) -> bool:
        """Would giving `obj` the concept produce the held-out combination?"""
        return (obj.shape if self.kind == "color" else obj.color) == self.heldout

    @property
    def heldout_group(self) -> str:
        return f"{self.name} {self.heldout}" if self.kind == "color" else f"{self.heldout} {self.name}"

    def check_kwargs(self) -> dict[str, Any]:
        return {"extra_colors": {self.name: self.rgb}} if self.kind == "color" else {"extra_shapes": (self.name,)}

    def validation_prompts(self) -> list[str]:
        if self.kind == "color":
            return [f"a {self.name} circle", f"a large {self.name} square on the left", f"a {self.heldout_group}",
                    "a red circle"]
        return [f"a red {self.name}", f"a large blue {self.name} on the left", f"a {self.heldout_group}",
                "a red circle"]


CONCEPTS = {"pink": Concept("pink", "color", rgb=PINK, heldout="star"),
            "heart": Concept("heart", "shape", heldout="green")}


def with_concept(spec: SceneSpec, index: int, concept: Concept) -> SceneSpec:
    """The same scene with object `index` given the concept."""
    objects = list(spec.objects)
    objects[index] = concept.apply(objects[index])
    return SceneSpec(tuple(objects), spec.relations, spec.stated)


def write_data(folder: Path, concept: Concept, num_images: int = 200, seed: int = 0, fraction: float = 0.75,
               exclude: set[tuple[str, str]] | None = None) -> None:
    """An imagefolder of `num_images` captioned scenes, `fraction` of them with the concept (never the held-out
    pair); the others are ordinary scenes that remind the model of what it knew. No scene shows a (colour, shape)
    pair of `exclude` (the base pipeline's held-out pairs, which its evaluation suite tests as unseen)."""
    if num_images > 200:
        raise ValueError(f"--num-images {num_images}: the demo uses at most 200 images")
    if not 0 < fraction <= 1:
        raise ValueError(f"--concept-fraction {fraction}: expected a fraction in (0, 1]")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        spec = sample_spec(rng, exclude, max_objects=2)
        if int((i + 1) * fraction) > int(i * fraction):  # spread evenly: int(num_images * fraction) in all
            candidates = [j for j, o in enumerate(spec.objects) if not concept.is_heldout(o)]
            while not candidates:  # every object would make the held-out pair: draw another scene
                spec = sample_spec(rng, exclude, max_objects=1)
                candidates = [j for j, o in enumerate(spec.objects) if not concept.is_heldout(o)]
            spec = with_concept(spec, candidates[int(rng.integers(len(candidates)))], concept)
        name = f"{i:04d}.png"
        render(spec, rng, image_size=64).save(folder / name)
        rows.append({"file_name": name, "text": caption(spec), "spec": spec.to_json()})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    count = sum(concept.name in r["text"].split() for r in rows)
    print(f"wrote {num_images} images ({count} with {concept.name}) and metadata.jsonl to {folder}")


def write_replay(folder: Path, pipeline: str, num_images: int, seed: int = 7, device: str = "cpu") -> None:
    """Prior preservation (DreamBooth, Ruiz et al. 2023, §4.2): `num_images` images the *base* pipeline generates for
    ordinary captions of one to three objects (the scene distribution it was trained on), added to the imagefolder
    (`replay-*.png`, with no scene spec in metadata.jsonl). Fine-tuning on them alongside the user's images keeps the
    model close to what it drew before — no original training data needed. The pairs the pipeline held out of
    training stay out of the captions, so the evaluation's held-out group stays unseen."""
    import torch

    from latent_diffusion import TextToImagePipeline
    from latent_diffusion.cli import heldout_pairs

    pipe = TextToImagePipeline.from_pretrained(pipeline, device=device)
    rng = np.random.default_rng([seed, 12345])
    exclude = set(heldout_pairs(Path(pipeline)))
    captions = [caption(sample_spec(rng, exclude)) for _ in range(num_images)]  # 1-3 objects: rehearse all of it
    rows, batch = [], 16
    for start in tqdm(range(0, num_images, batch), desc="replay images", unit="batch"):
        with torch.no_grad():
            images = pipe(captions[start:start + batch], num_inference_steps=20, prior_num_inference_steps=20,
                          seed=seed + start, progress=False).images
        for i, image in enumerate(images, start):
            image.save(folder / f"replay-{i:04d}.png")
            rows.append({"file_name": f"replay-{i:04d}.png", "text": captions[i], "spec": None})  # drawn, not rendered
    with open(folder / "metadata.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"added {num_images} replay images generated by {pipeline} to {folder}")


def train(pipeline: str, out: Path, concept: Concept, accelerate_args: str, extra: list[str],
          method: str = "lora") -> None:
    """Run the fine-tune exactly as a user would type it (from the repository root, so the paths are made
    absolute first)."""
    out = out.resolve()
    pipeline = str(Path(pipeline).resolve()) if Path(pipeline).exists() else pipeline
    prompts = [x for p in concept.validation_prompts() for x in ("--validation-prompt", p)]
    lora = ["--rank", "8", "--alpha", "8"] if method == "lora" else []
    # The `accelerate` of this interpreter's environment, also when that environment is not activated.
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher) if launcher.is_file() else "accelerate", "launch", *shlex.split(accelerate_args),
           "-m", "training.finetune",
           "--pipeline", pipeline, "--train-data-dir", str(out / "data"), "--method", method,
           "--components", "decoder,prior", *lora,
           *([] if any(a.split("=")[0].endswith("max_steps") for a in extra) else ["--max-steps", "2000"]),
           "--batch-size", "16", "--learning-rate", "1e-4", *prompts,
           "--output-dir", str(out / method), *extra]  # later flags win: `extra` overrides the defaults above
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


def prompt_groups(concept: Concept, per_group: int = 16, seed: int = 1) -> dict[str, list[SceneSpec]]:
    """Single-object evaluation scenes, distinct prompts per group, disjoint from the training seeds."""
    rng = np.random.default_rng([seed, 99])
    groups: dict[str, list[SceneSpec]] = {concept.name: [], concept.heldout_group: [], "control": []}
    sizes = {concept.name: per_group, concept.heldout_group: per_group // 2, "control": per_group}
    seen: set[str] = set()
    while any(len(groups[g]) < sizes[g] for g in groups):
        spec = sample_spec(rng, max_objects=1)
        if rng.random() < 0.4:
            group = "control"
        else:
            group = concept.heldout_group if concept.is_heldout(spec.objects[0]) else concept.name
            spec = with_concept(spec, 0, concept)
        text = caption(spec)
        if len(groups[group]) < sizes[group] and text not in seen:
            seen.add(text)
            groups[group].append(spec)
    return groups


def evaluate(pipeline: str, out: Path, concept: Concept, seeds: int = 4, steps: int = 25, device: str = "cpu",
             suite_seeds: int = 2, method: str = "lora", lora_scale: float = 1.0,
             image_guidance: float | None = None) -> dict:
    """Checker pass rate and concept accuracy per group, base vs fine-tuned ("tuned": the LoRA loaded at
    `lora_scale`, or the full fine-tune's pipeline), same prompts and seeds; then the original suite's pass rate
    for both (forgetting). A LoRA scale below 1 trades concept strength for retention, without retraining;
    `image_guidance` overrides both pipelines' decoder guidance towards the prior's image embedding (a concept the
    prior learned reaches the images through it)."""
    import torch

    from latent_diffusion import TextToImagePipeline
    from latent_diffusion.cli import heldout_pairs, make_grid
    from latent_diffusion.evaluate import evaluate as evaluate_suite
    from latent_diffusion.evaluate import json_ready, prompt_suite
    from latent_diffusion.lora import load_lora, unload_lora

    tags = ([f"scale{lora_scale:g}"] if lora_scale != 1.0 and method == "lora" else []) + \
        ([f"ig{image_guidance:g}"] if image_guidance is not None else [])
    folder = out / "-".join(["eval", *tags])
    folder.mkdir(parents=True, exist_ok=True)
    pipe = TextToImagePipeline.from_pretrained(pipeline, device=device)
    groups = prompt_groups(concept)
    attribute = concept.kind
    suite = prompt_suite(8, heldout_pairs=heldout_pairs(Path(pipeline)))
    results: dict = {"concept": concept.name, "method": method, "groups": {}, "suite": {}}
    if method == "lora":
        results["lora_scale"] = lora_scale
    results["image_guidance_scale"] = image_guidance if image_guidance is not None else \
        pipe.config.image_guidance_scale
    for model in ("base", "tuned"):
        if model == "tuned" and method == "lora":
            load_lora(pipe, out / "lora", scale=lora_scale)
        elif model == "tuned":
            pipe = TextToImagePipeline.from_pretrained(out / method, device=device)
        for group, specs in tqdm(groups.items(), desc=f"evaluate {model}", unit="group"):
            prompts = [caption(s) for s in specs]
            with torch.no_grad():
                images = pipe(prompts, num_images_per_prompt=seeds, num_inference_steps=steps,
                              prior_num_inference_steps=steps, seed=0, progress=False,
                              image_guidance_scale=image_guidance).images
            checks = [check(im, specs[i // seeds], **concept.check_kwargs()) for i, im in enumerate(images)]
            results["groups"].setdefault(group, {})[model] = {
                "pass_rate": float(np.mean([c.passed for c in checks])),
                f"{attribute}_accuracy": float(np.mean([not {attribute, "count"} & set(c.failed) for c in checks])),
                "images": len(checks)}
            name = model if model == "base" else method
            make_grid(images, columns=seeds * 4).save(folder / f"{group.replace(' ', '_')}-{name}.png")
        with torch.no_grad():
            scored = evaluate_suite(pipe, suite, seeds=suite_seeds, settings=(("DPM-Solver++(2M) 20", "dpmpp_2m", 20),),
                                    image_guidance_scale=image_guidance)
        results["suite"][model] = scored["samplers"]["DPM-Solver++(2M) 20"]["pass_rate"]
    if method == "lora":
        unload_lora(pipe)
    base_suite = results["suite"]["base"]
    results["suite"]["retention"] = results["suite"]["tuned"] / base_suite if base_suite else None
    (folder / "results.json").write_text(json.dumps(json_ready(results), indent=2, allow_nan=False) + "\n")
    lines = [f"| group | prompts | base pass | tuned pass | base {attribute} acc. | tuned {attribute} acc. |",
             "|---|---|---|---|---|---|"]
    for group, r in results["groups"].items():
        lines.append(f"| {group} | {len(groups[group])} | {r['base']['pass_rate']:.2f} | {r['tuned']['pass_rate']:.2f} "
                     f"| {r['base'][f'{attribute}_accuracy']:.2f} | {r['tuned'][f'{attribute}_accuracy']:.2f} |")
    retention = results["suite"]["retention"]
    lines += ["", "| original suite (DPM-Solver++(2M) 20) | prompts × seeds | base pass | tuned pass | retention |",
              "|---|---|---|---|---|",
              f"| all groups | {len(suite)} × {suite_seeds} | {base_suite:.3f} | {results['suite']['tuned']:.3f} | "
              f"{'—' if retention is None else f'{retention:.2f}'} |"]
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {folder}/results.json, results.md and the grids")
    return results


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    intro, rest = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=intro, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=rest)
    parser.add_argument("step", choices=["data", "train", "evaluate", "all"])
    parser.add_argument("--concept", choices=sorted(CONCEPTS), default="pink", help="what to teach")
    parser.add_argument("--method", choices=["lora", "full"], default="lora", help="LoRA or full fine-tuning")
    parser.add_argument("--out", default=None,
                        help="working folder: data/, lora/ or full/, eval/ (default runs/CONCEPT)")
    parser.add_argument("--pipeline", default=str(ROOT / "assets" / "shapes-64"), help="the pipeline to teach")
    parser.add_argument("--num-images", type=int, default=200, help="training images (at most 200)")
    parser.add_argument("--concept-fraction", type=float, default=0.75, help="share of images showing the concept")
    parser.add_argument("--replay", type=int, default=0,
                        help="also write this many images generated by the base pipeline (prior preservation)")
    parser.add_argument("--accelerate-args", default="", help='e.g. "--multi_gpu --num_processes 2"')
    parser.add_argument("--seeds", type=int, default=4, help="evaluation images per prompt")
    parser.add_argument("--steps", type=int, default=25, help="evaluation sampling steps")
    parser.add_argument("--device", default="cuda" if _has_cuda() else "cpu", help="evaluation device")
    parser.add_argument("--image-guidance", type=float, default=None,
                        help="evaluate: decoder guidance towards the prior's image embedding for both pipelines "
                             "(default: each pipeline's own); results in OUT/eval-igG/")
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="evaluate the LoRA at this scale (results in OUT/eval-scaleS when not 1)")
    args = parser.parse_args(argv)
    concept = CONCEPTS[args.concept]
    out = Path(args.out or f"runs/{concept.name}")
    if args.step in ("data", "all"):
        from latent_diffusion.cli import heldout_pairs

        write_data(out / "data", concept, args.num_images, fraction=args.concept_fraction,
                   exclude=set(heldout_pairs(Path(args.pipeline))))
        if args.replay:
            write_replay(out / "data", args.pipeline, args.replay, device=args.device)
    if args.step in ("train", "all"):
        train(args.pipeline, out, concept, args.accelerate_args, extra, args.method)
    if args.step in ("evaluate", "all"):
        evaluate(args.pipeline, out, concept, args.seeds, args.steps, args.device, method=args.method,
                 lora_scale=args.lora_scale, image_guidance=args.image_guidance)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
