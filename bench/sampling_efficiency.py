"""Sampling efficiency of a trained shapes pipeline: checker pass rate and FD-CLIP against decoder steps for each
sampler, on the evaluation's prompt suite (`latent_diffusion.evaluate`), and per sampler the fewest steps within
2 points of DDPM at 250 steps.

    python bench/sampling_efficiency.py                          # the shipped pipeline, suite 0, 4 seeds
    python bench/sampling_efficiency.py --tiny                   # a seconds-long smoke run on a random tiny pipeline

Every setting sees the same prompts and seeds (image k of a prompt starts from seed k), with the pipeline's
default guidance. With 32 prompts × 4 seeds a pass rate carries about ±0.04 (one standard error), so "within
2 points" is a statement about this suite, not a sharp threshold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from _common import machine_info, markdown_table, write_json  # noqa: E402

from latent_diffusion import TextToImagePipeline  # noqa: E402
from latent_diffusion.cli import heldout_pairs  # noqa: E402
from latent_diffusion.diffusion import SAMPLERS  # noqa: E402
from latent_diffusion.evaluate import evaluate, prompt_suite  # noqa: E402

DEFAULT_GRID = ("ddpm:250", "ddim:10,20,50", "dpmpp_2m:5,10,15,20,30", "euler_ancestral:20,50")


def parse_grid(specs: list[str]) -> list[tuple[str, int]]:
    """["dpmpp_2m:10,20", ...] → [("dpmpp_2m", 10), ("dpmpp_2m", 20), ...], sampler names checked."""
    out = []
    for spec in specs:
        name, _, steps = spec.partition(":")
        if name not in SAMPLERS or not steps:
            raise ValueError(f"{spec!r}: expected SAMPLER:STEPS[,STEPS...] with SAMPLER one of {sorted(SAMPLERS)}")
        out += [(name, int(s)) for s in steps.split(",")]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default=str(REPO / "assets" / "shapes-64"))
    ap.add_argument("--grid", nargs="+", default=list(DEFAULT_GRID), help="SAMPLER:STEPS,... per sampler")
    ap.add_argument("--num-prompts", type=int, default=8, help="prompts per group")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--suite-seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "sampling_efficiency.json"))
    ap.add_argument("--tiny", action="store_true", help="a random tiny pipeline, 1 prompt per group, 1 seed")
    args = ap.parse_args()
    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_pipeline

        pipe, heldout = build_tiny_pipeline(Path(tempfile.mkdtemp())), ()
        args.grid, args.num_prompts, args.seeds = ["ddpm:4", "dpmpp_2m:2,4"], 1, 1
        args.out = str(Path(tempfile.gettempdir()) / "sampling_efficiency_tiny.json")
    else:
        pipe, heldout = TextToImagePipeline.from_pretrained(args.pipeline), heldout_pairs(Path(args.pipeline))
    grid = parse_grid(args.grid)
    items = prompt_suite(args.num_prompts, args.suite_seed, heldout)
    settings = tuple((f"{name} {steps}", name, steps) for name, steps in grid)
    results = evaluate(pipe, items, seeds=args.seeds, settings=settings, progress=True)
    rows, by_sampler = [], {}
    for (name, steps), (label, _, _) in zip(grid, settings):
        r = results["samplers"][label]
        rows.append([name, steps, r["pass_rate"], *(r["groups"].get(g) for g in ("single", "relation", "three",
                                                                                   "heldout")),
                     r["fd_clip"], r["seconds"]])
        by_sampler.setdefault(name, []).append((steps, r["pass_rate"]))
    reference = results["samplers"].get("ddpm 250", {}).get("pass_rate")
    fewest = {}
    if reference is not None:
        for name, runs in by_sampler.items():
            within = [steps for steps, rate in sorted(runs) if rate >= reference - 0.02]
            fewest[name] = within[0] if within else None
    print(markdown_table(["sampler", "steps", "pass rate", "single", "relation", "three", "held-out", "FD-CLIP",
                          "seconds"], rows))
    if reference is not None:
        print(f"\nDDPM 250 passes {reference:.3f}; fewest steps within 2 points of it: "
              + ", ".join(f"{k} {v if v is not None else 'none in the grid'}" for k, v in fewest.items()))
    write_json(args.out, {"machine": machine_info(), "pipeline": "tiny" if args.tiny else args.pipeline,
                          "num_prompts": len(items), "seeds": args.seeds, "suite_seed": args.suite_seed,
                          "ddpm_250_pass_rate": reference, "fewest_steps_within_2_points": fewest,
                          "results": results["samplers"]})


if __name__ == "__main__":
    main()
