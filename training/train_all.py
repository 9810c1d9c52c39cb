"""Every stage in order — CLIP, VAE, prior, decoder — into one pipeline folder, skipping finished stages.

    accelerate launch -m training.train_all --config configs/shapes/tiny.yaml --output-dir runs/tiny
    python -m training.train_all --config configs/shapes/tiny.yaml --output-dir runs/tiny   # one process

`--resume latest` resumes the unfinished stage from its newest checkpoint; `--resume OUTPUT_DIR/_work/<stage>/
checkpoint-N` resumes that stage from that checkpoint (the others from their newest). `--max-steps N` sets every stage's
optim.max_steps.
`--fsdp` shards the VAE, prior and decoder across the processes (CLIP, small, stays data-parallel).
Afterwards `TextToImagePipeline.from_pretrained(OUTPUT_DIR)` loads the result.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from training import train_clip, train_decoder, train_prior, train_vae
from training.config import run_from_command_line, stage_parser

STAGES = (("clip", train_clip), ("vae", train_vae), ("prior", train_prior), ("decoder", train_decoder))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --help and argument errors up front
    args = stage_parser(__doc__, "training.train_all").parse_known_args(argv)[0]
    out = args.output_dir
    owner = _resume_owner(args.resume, Path(out))
    from accelerate.state import AcceleratorState

    say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)  # the launcher sets RANK
    start = time.perf_counter()
    for name, module in STAGES:
        t0 = time.perf_counter()
        marker = Path(out) / "_work" / name / "DONE"
        before = marker.stat().st_mtime_ns if marker.is_file() else None
        stage_argv = argv if owner in (None, name) else _with_resume(argv, "latest")
        if name == "clip" and "--fsdp" in argv:  # CLIP is small: it trains data-parallel
            say("[train_all] clip: --fsdp covers the vae, prior and decoder stages; CLIP trains data-parallel",
                flush=True)
            module.main([a for a in stage_argv if a != "--fsdp"])
        else:
            module.main(stage_argv)
        # Each stage builds its own Accelerator (its own mixed precision); keep the process group.
        AcceleratorState._reset_state(reset_partial_state=False)
        after = marker.stat().st_mtime_ns if marker.is_file() else None
        what = "finished" if after != before else "skipped" if after is not None else "had nothing to train"
        say(f"[train_all] {name} {what} in {time.perf_counter() - t0:.1f} s", flush=True)
    say(f"[train_all] all stages finished in {time.perf_counter() - start:.1f} s", flush=True)


def _resume_owner(resume: str | None, out: Path) -> str | None:
    """The stage whose checkpoint `--resume PATH` names (it resumes from PATH, the others from their latest);
    None for `--resume latest` or none. A PATH outside OUTPUT_DIR/_work/<stage>/ is refused."""
    if resume is None or resume == "latest":
        return None
    folder = Path(resume).resolve().parent
    owner = next((name for name, _ in STAGES if folder == (out / "_work" / name).resolve()), None)
    if owner is None:
        raise ValueError(f"--resume {resume}: train_all takes 'latest' or a checkpoint in {out}/_work/<stage>/ "
                         f"(<stage> one of {[name for name, _ in STAGES]}), which resumes that stage from it and the "
                         "others from their latest")
    return owner


def _with_resume(argv: list[str], value: str) -> list[str]:
    """`argv` with its --resume value replaced by `value`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            out.append(value)
            skip = False
        elif arg == "--resume":
            out.append(arg)
            skip = True
        else:
            out.append(f"--resume={value}" if arg.startswith("--resume=") else arg)
    return out


if __name__ == "__main__":
    run_from_command_line(main)
