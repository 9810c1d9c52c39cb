"""Measure the shapes checker: acceptance of real pairs, rejection of wrong specs and of single-attribute edits.

    python bench/checker_rates.py --num 2000 --out bench/results/checker_rates.json

Rows (each on ``--num`` real renders from ``ShapesDataset(num, seed)``):
- ``accept real``: real image with its own spec passes (target ≥ 99.5%).
- ``reject mismatched``: real image with the spec of another sample fails (target ≥ 99.5%). Pairs whose two captions
  are identical are skipped (the other spec then describes the image just as well).
- ``reject edit: <kind>``: real image with its spec after one edit of a stated attribute (``edit_spec``) fails
  (target ≥ 99.5%); samples where no such edit exists are skipped.
- ``accept blurred`` (informative, no target): the real image blurred (Gaussian σ=1 px) plus Gaussian noise
  (σ=8 grey levels) with its own spec, a stand-in for softer generated images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import ImageFilter

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]
from _common import machine_info, write_json  # noqa: E402

from latent_diffusion.data.checker import check_detections, detect  # noqa: E402
from latent_diffusion.data.shapes import EDIT_KINDS, ShapesDataset, caption, edit_spec  # noqa: E402

TARGET = 0.995


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=2000, help="number of real samples")
    parser.add_argument("--seed", type=int, default=1234, help="dataset seed")
    parser.add_argument("--out", type=Path, default=Path("bench/results/checker_rates.json"), help="JSON output")
    args = parser.parse_args()

    data = ShapesDataset(args.num, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    specs, detections = [], []
    counts = {name: [0, 0] for name in ["accept real", "reject mismatched", *(f"reject edit: {k}" for k in EDIT_KINDS),
                                        "accept blurred"]}  # name -> [hits, trials]
    failures: dict[str, int] = {}
    start = time.perf_counter()
    for i in range(args.num):
        spec, image = data.sample(i)
        detected = detect(image)
        specs.append(spec)
        detections.append(detected)
        result = check_detections(detected, spec)
        counts["accept real"][0] += result.passed
        counts["accept real"][1] += 1
        for name in result.failed:
            failures[name] = failures.get(name, 0) + 1
        for kind in EDIT_KINDS:
            edited = edit_spec(spec, kind, rng)
            if edited is not None:
                counts[f"reject edit: {kind}"][0] += not check_detections(detected, edited).passed
                counts[f"reject edit: {kind}"][1] += 1
        soft = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
        soft = np.clip(soft + rng.normal(0.0, 8.0, soft.shape), 0, 255).astype(np.uint8)
        counts["accept blurred"][0] += check_detections(detect(soft), spec).passed
        counts["accept blurred"][1] += 1
    for i in range(args.num):  # mismatched: image i with the spec of a random other sample
        j = int((i + rng.integers(1, args.num)) % args.num)
        if caption(specs[i]) == caption(specs[j]):
            continue
        counts["reject mismatched"][0] += not check_detections(detections[i], specs[j]).passed
        counts["reject mismatched"][1] += 1
    seconds = time.perf_counter() - start

    rows = []
    print("| test | n | rate | target |\n|---|---:|---:|---:|")
    for name, (hits, trials) in counts.items():
        rate = hits / max(trials, 1)
        target = None if name == "accept blurred" else TARGET
        rows.append({"test": name, "n": trials, "rate": rate, "target": target})
        mark = "—" if target is None else f"{target:.3f} {'ok' if rate >= target else 'MISSED'}"
        print(f"| {name} | {trials} | {rate:.4f} | {mark} |")
    print(f"\nreal-pair failures by attribute: {failures or 'none'}; {seconds:.1f} s "
          f"({1000 * seconds / args.num:.1f} ms per sample incl. rendering and two detections)")
    write_json(args.out, {"machine": machine_info(), "num": args.num, "seed": args.seed, "seconds": seconds,
                          "rows": rows, "real_failures": failures})


if __name__ == "__main__":
    main()
