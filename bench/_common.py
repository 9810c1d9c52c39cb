"""Helpers shared by the benchmark scripts: interleaved timing, machine facts, markdown tables and JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def add_run_args(parser: argparse.ArgumentParser, name: str, repeats: int, iters: int | None = None,
                 tiny_help: str = "tiny sizes, 1 repeat: a smoke test of the logic") -> None:
    """The options every timing script shares: --repeats, --iters (when `iters` is given), --threads, --tiny and
    --out (default bench/results/NAME.json); `parse_run_args` applies them."""
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved repeats (the median is reported)")
    if iters is not None:
        parser.add_argument("--iters", type=int, default=iters, help="calls (steps) per repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/{name}.json"))


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None, name: str) -> argparse.Namespace:
    """Parse `argv`, set torch's threads, and under --tiny run 1 repeat (of 1 call) and write the JSON to the
    temp folder unless --out was given."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.repeats = 1
        if hasattr(args, "iters"):
            args.iters = 1
        if args.out == parser.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / f"{name}_tiny.json"
    return args


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, iters: int, warmup: int = 2,
                device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """Time each callable `iters` times per repeat, alternating between them (A B C A B C ..., with the start
    rotating each repeat so no variant always runs first), and report the median of the per-call times.

    Returns {name: {"median_ms", "min_ms", "runs_ms"}}: `runs_ms` holds one mean per repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fns[n]()
            sync(device)
            runs[n].append((time.perf_counter() - t0) / iters * 1e3)
    return {n: {"median_ms": statistics.median(v), "min_ms": min(v), "runs_ms": [round(x, 3) for x in v]}
            for n, v in runs.items()}


def cpu_model() -> str:
    """The CPU's model name as `lscpu` reports it (falls back to /proc/cpuinfo, then `platform`)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Facts every published figure needs: machine, library versions, threads, date and the exact command."""
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant decimals."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != 0 and abs(v) < 1e-3:
                return f"{v:.1e}"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | Path, data: dict[str, Any], quiet: bool = False) -> None:
    """Write `data` as indented JSON; strings holding paths inside the repository are made relative to it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_repo_relative(data), indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")


def _repo_relative(value: Any) -> Any:
    root = str(Path(__file__).resolve().parent.parent) + "/"
    if isinstance(value, str):
        return value.replace(root, "")
    if isinstance(value, dict):
        return {k: _repo_relative(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_repo_relative(v) for v in value]
    return value


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Give every parameter non-trivial values (diffusers zero-initialises some output layers); norm scales
    stay near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if is_norm_scale else scale) + float(is_norm_scale))
