"""A training stage's set-up and bookkeeping: `setup_stage` parses the config, starts Accelerate and makes the
folders; `Stage` carries them through `main()` and `fit`, and records the run — the resolved config (with a note
of the settings a resumed run changed) and the DONE marker that lets `train_all --resume latest` skip a finished
stage.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from training.checkpoint import checkpoint_step, list_checkpoints
from training.config import (
    COLLECTIVE_TIMEOUT_MINUTES,
    ExperimentConfig,
    FinetuneConfig,
    OptimConfig,
    close_process_group,
    config_to_yaml,
    load_config,
    save_config,
)

TRAINING_STAGES = ("clip", "vae", "prior", "decoder")  # the stages that build one pipeline folder together
STAGE_OUTPUT = {"clip": "text_encoder", "vae": "vae", "prior": "prior", "decoder": "decoder"}  # what each writes


@dataclass
class Stage:
    """What a stage's `main()` works with: the config, the Accelerator and its folders."""

    name: str
    config: ExperimentConfig | FinetuneConfig
    accelerator: Accelerator
    output_dir: Path  # the pipeline folder all stages write into
    work_dir: Path  # output_dir/_work/<stage>: checkpoints, metrics, validation images
    max_steps: int
    resume: str | None
    fsdp: bool = False  # shard parameters, gradients and optimizer state (training/sharding.py)
    trained_only: bool = False  # checkpoints hold the trained parameters only (LoRA: the frozen base is elsewhere)
    base: Path | None = None  # the folder the frozen base comes from: checkpoints record its fingerprint, checked
    base_fingerprint: str | None = None  # checkpoint.pipeline_fingerprint(base), taken when the base was loaded
    check_legacy: Callable[[Path], None] | None = None  # checks a checkpoint from before parameter orders were saved
    pending_signal: str | None = None  # SIGINT/SIGTERM met in the last steps, past the loop's last check

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args))

    def done(self, component: str) -> bool:
        """True when this stage's finished output exists and `--resume` does not ask for more steps than the
        finished run was given (so `train_all --resume latest` skips it, also when `optim.max_minutes` ended it
        early; raise its max_steps to continue it)."""
        if not ((self.work_dir / "DONE").is_file() and (self.output_dir / component).is_dir()):
            return False
        if self.resume is None:
            return True
        finished_for = self.finished_for()
        if finished_for is not None:
            return self.max_steps <= finished_for
        found = list_checkpoints(self.work_dir)  # a marker from before max_steps was recorded in it
        return bool(found) and checkpoint_step(found[-1]) >= self.max_steps

    def finished_for(self) -> int | None:
        """The max_steps of the run that marked this stage DONE (None: no marker, or one that does not say)."""
        marker = self.work_dir / "DONE"
        found = re.search(r"^max_steps (\d+)$", marker.read_text(), re.MULTILINE) if marker.is_file() else None
        return int(found.group(1)) if found else None

    def skip_if_done(self, component: str) -> bool:
        """True, after saying so, when `done(component)`."""
        if not self.done(component):
            return False
        finished_for = self.finished_for()
        run = f"a run of max_steps {finished_for}" if finished_for is not None else "its run"
        hint = (f" (it finished {run}: to continue it, pass --resume latest and a larger max_steps; to train it "
                f"again, use a new --output-dir or delete {self.work_dir / 'DONE'})")
        shown = self._changes_since_record()
        changed = f". It was trained with other settings than these: {shown}" if shown else ""
        self.print(f"{self.name}: finished output exists in {self.output_dir}; skipping{hint}{changed}")
        return True

    def _record(self) -> Path:
        """This stage's config record, `_work/<stage>/config.yaml`; for runs from before per-stage records, the
        shared OUTPUT_DIR/config.yaml."""
        own = self.work_dir / "config.yaml"
        return own if own.is_file() else self.output_dir / "config.yaml"

    def _changes_since_record(self) -> str:
        """The settings (shared ones and this stage's section, under train_all) that differ from this stage's
        record of the run that trained it (`_work/<stage>/config.yaml`, else OUTPUT_DIR/config.yaml); '' if none."""
        earlier = self._record()
        new = config_to_yaml(self.config)
        if not earlier.is_file() or earlier.read_text() == new:
            return ""
        others = tuple(f"{n}." for n in TRAINING_STAGES if n != self.name) \
            if isinstance(self.config, ExperimentConfig) else ()  # (the other stages' sections)
        # (a longer max_steps is how a finished run is continued: not worth a note)
        return changes_note(yaml.safe_load(earlier.read_text()) or {}, yaml.safe_load(new), skip=others)

    def record_config(self, start: int = 0) -> None:
        """Write the resolved config to OUTPUT_DIR/config.yaml and to this stage's `_work/<stage>/config.yaml`
        (main process): done by a stage once it is about to train (`fit`, past its checks), so a skipped or refused
        stage leaves the record of the run that trained it. A run resumed at `start` > 0 with other settings than
        this stage's own record says which (under train_all, of the shared settings and this stage's section only),
        and keeps the earlier record as `_work/<stage>/config-before-step-<start>.yaml`."""
        if not self.is_main:
            return
        earlier = self._record()
        if start > 0:
            shown = self._changes_since_record()
            if shown:
                kept = self.work_dir / f"config-before-step-{start}.yaml"
                n = 1
                while kept.exists():  # never over an earlier record (a resume that failed at this step, say)
                    n += 1
                    kept = self.work_dir / f"config-before-step-{start}-{n}.yaml"
                shutil.copyfile(earlier, kept)
                self.print(f"{self.name}: resuming at step {start} with other settings than the run so far: {shown} "
                           f"(its config is kept as {kept})")
        save_config(self.config, self.output_dir / "config.yaml")
        save_config(self.config, self.work_dir / "config.yaml")

    def mark_done(self) -> None:
        """Write the DONE marker; then, if a signal came during the last steps (the stage finished all the same),
        stop every process as the signal asked, before any later stage starts. Processes agree on that once the
        marker is written (a rank that left early would make the launcher kill the others mid-save)."""
        acc = self.accelerator
        if self.is_main:
            (self.work_dir / "DONE").write_text(f"finished {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                                                f"max_steps {self.max_steps}\n")
        pending = self.pending_signal
        if acc.num_processes > 1:
            acc.wait_for_everyone()
            if acc.reduce(torch.tensor(float(pending is not None), device=acc.device), reduction="sum") > 0:
                pending = pending or "SIGTERM"
        if pending is not None:
            self.print(f"{self.name}: finished; stopping for the {pending} received near the end")
            close_process_group()  # every process stops here together (the sum above)
            raise SystemExit(128 + getattr(signal, pending))


def changes_note(old: dict[str, Any], new: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    """'key: old -> new; ...' for the settings that differ (8 named at most), leaving out max_steps (a longer run
    is how a finished one is continued) and the keys starting with a prefix in `skip`; '' when none differ."""
    changed = [c for c in changed_settings(old, new)
               if not c.split(":")[0].endswith("max_steps") and not c.startswith(skip)]
    return "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")


def changed_settings(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every dotted key whose value differs between two nested config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_distributed_type(kind: DistributedType) -> None:
    """Refuse the Accelerate engines the stages do not run under: its FSDP (the stages shard themselves), DeepSpeed
    and Megatron-LM (their own checkpoint formats skip the stages' save hooks: EMA, trained-only LoRA state)."""
    if kind == DistributedType.FSDP:
        raise ValueError("this Accelerate config uses distributed_type FSDP, which the stages do not use: launch with "
                         "a data-parallel config (configs/accelerate/multi_gpu.yaml) and pass --fsdp; each stage "
                         "then shards its model block by block itself (training/sharding.py)")
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(f"this Accelerate config uses distributed_type {kind.value}, which the stages do not support "
                         "(their checkpoints, EMA and LoRA-only saves go through Accelerate's own save hooks): launch "
                         "with a data-parallel config (configs/accelerate/multi_gpu.yaml), adding --fsdp to shard "
                         "large models")


def setup_stage(name: str, args: Any, overrides: list[str], optim: Callable[[Any], OptimConfig],
                cpu: bool = False, config: FinetuneConfig | None = None, shardable: bool = True,
                find_unused_parameters: bool = False) -> Stage:
    """Parse the config (unless a resolved `config` is given), start Accelerate with the stage's mixed precision
    and create the folders (main process only). The config is recorded once the stage trains (`fit`,
    `Stage.record_config`). `find_unused_parameters`: the trained parameters include some a step may not reach
    (DDP must then look for them, or it stops at the second step)."""
    config = load_config(args.config, overrides) if config is None else config
    both = [o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].endswith("optim.max_steps")]
    if args.max_steps is not None and both:
        raise ValueError(f"--max-steps {args.max_steps} sets every stage's optim.max_steps, and {both[0]} one of "
                         "them: pass one of the two")
    if args.max_steps is not None:  # every stage's optim.max_steps (train_all passes it to all), recorded
        config = _with_max_steps(config, args.max_steps)
    oc = optim(config)
    fsdp = bool(getattr(args, "fsdp", False))
    if fsdp and not shardable:
        raise ValueError(f"{name}: --fsdp is not supported by this stage (it covers train_vae, train_prior and "
                         "train_decoder); launch it without --fsdp")
    # step_scheduler_with_optimizer=False: the LR schedule counts optimiser steps, whatever the process count
    # (by default Accelerate steps it once per process, so a 2-process run would decay twice as fast).
    # oc.mixed_precision None leaves the choice to the launcher (ACCELERATE_MIXED_PRECISION); a value overrides it.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    # The collectives' timeout (torch's default is 10 min with NCCL): the other processes wait while the main one
    # alone trains the tokenizer, writes decoder.cache or validates. Given to the process group as it starts (the
    # first stage of a train_all run; the later ones keep its group) through PartialState, as the Accelerator would
    # start it (ACCELERATE_USE_CPU included); Accelerate's InitProcessGroupKwargs drops a value equal to its own
    # default (10 min, which gloo would then take as 30).
    minutes = getattr(args, "collective_timeout", COLLECTIVE_TIMEOUT_MINUTES)
    PartialState(cpu or parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=datetime.timedelta(minutes=minutes))
    accelerator = Accelerator(mixed_precision=oc.mixed_precision, cpu=cpu, step_scheduler_with_optimizer=False,
                              kwargs_handlers=handlers)
    check_distributed_type(accelerator.distributed_type)
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate has no fp16 autocast on the CPU: the run would be fp32 (or meet fp16 frozen weights, finetune)
        configured = "--mixed-precision fp16 (or the config's optim.mixed_precision)" if name == "finetune" else \
            "optim.mixed_precision fp16 (the config or the command line)"
        source = configured if oc.mixed_precision == "fp16" else \
            "mixed precision fp16 (from the launcher: accelerate launch --mixed_precision, or its config)"
        raise ValueError(f"{name}: {source} needs a GPU; on a CPU use bf16 (or no)")
    set_seed(config.seed)
    output_dir = Path(args.output_dir)
    refuse_foreign_output(output_dir, ("finetune",) if name == "finetune" else TRAINING_STAGES,
                          None if name == "finetune" else STAGE_OUTPUT[name])
    accelerator.wait_for_everyone()  # every process has looked before the main one creates _work/<name>
    work_dir = output_dir / "_work" / name
    if accelerator.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
    if fsdp and accelerator.num_processes < 2:
        raise ValueError(f"{name}: --fsdp shards across processes but this run has one; launch with "
                         "`accelerate launch --multi_gpu --num_processes N` (N >= 2) or drop --fsdp")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        source = "the config or the command line" if oc.mixed_precision is not None else \
            "the launcher, or Accelerate's default"
        print(f"{name}: mixed precision {accelerator.mixed_precision} (from {source})", flush=True)
    return Stage(name, config, accelerator, output_dir, work_dir, oc.max_steps, args.resume, fsdp)


def refuse_foreign_output(out: Path, own: tuple[str, ...], component: str | None = None) -> None:
    """Refuse an output folder that holds a pipeline, a LoRA or runs with no training record here from the stages
    `own` (converted, saved, copied or fine-tuned): its weights and config.yaml would be replaced. Fine: a folder
    these stages are writing (resumed, or finished and skipped); one of component folders copied in to start from
    (no model_index.json); a pipeline whose `component` (the stage's output) was moved aside to train a new one."""
    if any((out / "_work" / stage).is_dir() for stage in own):
        return
    others = sorted(p.name for p in (out / "_work").iterdir()) if (out / "_work").is_dir() else []
    held = [name for name in ("model_index.json", "lora_index.json") if (out / name).is_file()]
    if component is not None and "lora_index.json" not in held and not others and not (out / component).exists():
        return
    if held or others:
        what = f"a pipeline or LoRA ({', '.join(held)})" if held else f"runs of {others} (_work/)"
        writer = "a fine-tune" if own == ("finetune",) else "the training stages"
        slot = f"; to train a new {component}/ into this pipeline, move its {component}/ aside first" \
            if component is not None and held == ["model_index.json"] and not others else ""
        raise ValueError(f"--output-dir {out} already holds {what} with no training record of {writer} here "
                         f"(_work/): its files would be replaced; pick a new folder{slot}")


def _with_max_steps(config: Any, max_steps: int) -> Any:
    """`config` (nested frozen dataclasses) with `max_steps` in every OptimConfig it holds (absent sections, such
    as `prior: null`, stay absent)."""
    if isinstance(config, OptimConfig):
        return dataclasses.replace(config, max_steps=max_steps)
    changes = {f.name: _with_max_steps(getattr(config, f.name), max_steps) for f in dataclasses.fields(config)
               if dataclasses.is_dataclass(getattr(config, f.name))}
    return dataclasses.replace(config, **changes) if changes else config
