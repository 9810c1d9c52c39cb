"""Checkpoints of a training stage: written atomically (a temporary folder, then one rename), rotated, found again
for `--resume latest`, and restored exactly (model, optimizer, LR schedule, EMA). Weights are safetensors; the
optimizer state of a sharded run is a tensors-only `torch.save`, loaded with `weights_only=True`.

Folder layout under a stage's work folder: `checkpoint-N/` (N = optimiser steps done) holding Accelerate's state
(or, under `--fsdp`, `model.safetensors` + `optimizer.bin`), `ema.safetensors` and `trainer_state.json`. A stage
with `trained_only` (LoRA fine-tuning) keeps only the trained parameters in `model.safetensors`: its frozen base
comes from the pipeline it was started on, and resuming checks that the run trains exactly those parameters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from latent_diffusion.io import load_safetensors, save_safetensors
from training import sharding

if TYPE_CHECKING:
    from training.ema import EMA
    from training.stage import Stage


def list_checkpoints(work_dir: Path) -> list[Path]:
    """Complete checkpoints (those with `trainer_state.json`), oldest first."""
    found = [p for p in work_dir.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=checkpoint_step)


def saved_step(checkpoint: Path) -> int:
    """The step a checkpoint holds, from its `trainer_state.json` (any folder name: a copy kept as `best/`)."""
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])


def checkpoint_step(path: Path) -> int:
    """N of a `checkpoint-N` folder (also once set aside as `stale-checkpoint-N[-time]`)."""
    found = re.search(r"checkpoint-(\d+)", path.name)
    if found is None:
        raise ValueError(f"{path}: not a checkpoint folder (checkpoint-N)")
    return int(found.group(1))


def save_checkpoint(stage: Stage, step: int, limit: int, ema: EMA | None = None, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None) -> Path:
    """Write a checkpoint into a temporary folder, then rename it atomically: a kill mid-save never leaves a broken
    checkpoint. Keeps the newest `limit`. Data-parallel runs use accelerator.save_state; sharded (--fsdp) runs pass
    `model`, `optimizer` and `scheduler` and are written in full form by rank 0 (same file names). The EMA weights
    go to `ema.safetensors` either way."""
    acc = stage.accelerator
    final = stage.work_dir / f"checkpoint-{step}"
    tmp = stage.work_dir / f".checkpoint-{step}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    state: dict[str, Any] = {"step": step}
    if model is not None:
        state["params"] = _order_digest(model)
    if stage.base is not None:
        state["base"], state["base_fingerprint"] = str(stage.base), stage.base_fingerprint
    if stage.fsdp:  # gather on every rank (collective), keep and write on rank 0
        weights = sharding.full_tensors(model.state_dict(), keep=acc.is_main_process)
        optim_state = sharding.optimizer_state(model, optimizer)
        shadow = sharding.full_tensors(ema.shadow, keep=acc.is_main_process) if ema is not None else None
        state.update(fsdp=True, scheduler=scheduler.state_dict())
        if acc.is_main_process:
            tmp.mkdir(parents=True)
            save_safetensors(tmp / "model.safetensors", weights)
            torch.save(optim_state, tmp / "optimizer.bin")
    else:
        handle = acc.register_save_state_pre_hook(_keep_trained) if stage.trained_only else None
        try:
            acc.save_state(str(tmp), safe_serialization=True)
        finally:
            if handle is not None:
                handle.remove()
        shadow = ema.shadow if ema is not None else None
    acc.wait_for_everyone()
    if acc.is_main_process:
        # Global RNG states are not needed (data and noise are indexed by step) and are pickles: drop them.
        for rng_state in tmp.glob("random_states_*.pkl"):
            rng_state.unlink()
        if ema is not None:
            save_safetensors(tmp / "ema.safetensors", shadow)
            state["ema_step"] = ema.step
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(stage.work_dir)[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def pipeline_fingerprint(folder: str | Path) -> str:
    """A content fingerprint of a pipeline folder as `from_pretrained` reads it (`model_index.json` and the files
    of each component it lists, links followed): the same for a copy or a move, another for other weights. Of a
    safetensors file it hashes the size, the header and the first 4 KiB of every tensor."""
    import hashlib

    folder, digest = Path(folder), hashlib.sha256()
    index = folder / "model_index.json"
    digest.update(index.read_bytes())
    for component in sorted(json.loads(index.read_text()).get("components", {})):
        part = folder / component
        for path in sorted(p for p in part.iterdir() if p.is_file()) if part.is_dir() else []:
            digest.update(f"{component}/{path.name}".encode())
            if path.suffix != ".safetensors":
                digest.update(path.read_bytes())
                continue
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = f.read(size)
                digest.update(path.stat().st_size.to_bytes(8, "little") + header)
                try:
                    tensors = json.loads(header)
                except ValueError:  # damaged: loading will name it
                    continue
                for name in sorted(k for k in tensors if k != "__metadata__"):
                    begin, stop = tensors[name]["data_offsets"]
                    f.seek(8 + size + begin)
                    digest.update(f.read(min(4096, stop - begin)))
    return digest.hexdigest()


def _order_digest(model: torch.nn.Module) -> str:
    """The trained parameters' names in order: the optimizer's state follows it by position."""
    import hashlib

    return hashlib.sha256("\n".join(_trained(model)).encode()).hexdigest()


def _plain(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    return name.removeprefix("module.").replace("_orig_mod.", "")


def _trained(model: torch.nn.Module) -> list[str]:
    """The names of the parameters that require grad, in the model's (the optimizer's) order."""
    return [_plain(name) for name, p in model.named_parameters() if p.requires_grad]


def _keep_trained(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """Accelerate save-state hook: drop every frozen tensor from the state dicts about to be written."""
    for model, state in zip(models, weights):
        trained = set(_trained(model))
        for key in [k for k in state if _plain(k) not in trained]:
            del state[key]


def _check_trained(checkpoint: Path, model: torch.nn.Module) -> None:
    """A trained-only checkpoint must hold every parameter this run trains, and otherwise only frozen ones (a
    checkpoint written in full has the frozen base too); strict loading cannot tell."""
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        saved = {_plain(k) for k in f.keys()}
    trained, every = set(_trained(model)), {_plain(k) for k in model.state_dict()}
    if not trained <= saved <= every:
        extra, missing = sorted(saved - every), sorted(trained - saved)
        raise ValueError(f"--resume {checkpoint}: the checkpoint trained other parameters than this run (only in the "
                         f"checkpoint: {extra[:3]}{' ...' if len(extra) > 3 else ''} ({len(extra)}); only in this run: "
                         f"{missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)})); resume with the "
                         "earlier run's components and LoRA settings, or start a new --output-dir")


def load_checkpoint(stage: Stage, checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, ema: EMA | None) -> int:
    """Restore what `save_checkpoint` wrote and return its step."""
    acc = stage.accelerator
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if bool(state.get("fsdp")) != stage.fsdp:
        written, asked = ("with", "without") if state.get("fsdp") else ("without", "with")
        raise ValueError(f"--resume {checkpoint}: written by a run {written} --fsdp, resumed {asked} it; its "
                         f"optimizer state has another layout: resume {written} --fsdp")
    if stage.base is not None and "base" in state:  # the fingerprint (a move or copy resumes), else the path
        same = state["base_fingerprint"] == stage.base_fingerprint if "base_fingerprint" in state \
            else state["base"] == str(stage.base)
        differs = not same
        if acc.num_processes > 1:  # each node checks its own copy; all stop if any differs (none waits alone)
            differs = bool(acc.reduce(torch.tensor(float(differs), device=acc.device), reduction="sum") > 0)
        if differs:
            where = "" if not same else " on another node"
            raise ValueError(f"--resume {checkpoint}: it continues a run on {state['base']}, but this run's base "
                             f"{stage.base} holds other files{where}: resume with that pipeline, or start a new "
                             "--output-dir")
    # (fine-tuning, whose trained parameters depend on its settings; the stages' model changes are named below)
    if stage.base is not None and "params" in state and state["params"] != _order_digest(model):
        raise ValueError(f"--resume {checkpoint}: the checkpoint trained other parameters, or in another order, than "
                         "this run: resume with the earlier run's settings (components, LoRA layers), or start a new "
                         "--output-dir")
    if "params" not in state and stage.check_legacy is not None:
        stage.check_legacy(checkpoint)
    # EMA switched on at resume (the checkpoint has none): it starts from the resumed weights, below
    has_ema = (checkpoint / "ema.safetensors").is_file() and "ema_step" in state
    ema_state = load_safetensors(checkpoint / "ema.safetensors") if ema is not None and has_ema else None
    if stage.fsdp:
        model.load_state_dict(sharding.shard_like(load_safetensors(checkpoint / "model.safetensors"),
                                                  model.state_dict()))
        optim_state = torch.load(checkpoint / "optimizer.bin", weights_only=True) if acc.is_main_process else {}
        sharding.load_optimizer_state(model, optimizer, optim_state)
        scheduler.load_state_dict(state["scheduler"])
        if ema_state is not None:
            ema_state = sharding.shard_like(ema_state, ema.shadow)
    else:
        if stage.trained_only:
            _check_trained(checkpoint, model)
        try:
            # a trained-only checkpoint lacks the frozen weights; shapes are still checked
            acc.load_state(str(checkpoint), **({"strict": False} if stage.trained_only else {}))
        except RuntimeError as error:  # load_state_dict's: one line per mismatched tensor, every key name listed
            if "Error(s) in loading state_dict" not in str(error):
                raise
            raise ValueError(f"--resume {checkpoint}: the checkpoint does not fit this model ({_mismatch(error)}); "
                             f"it was written with other model settings (the earlier run's are in "
                             f"{stage.output_dir / 'config.yaml'}): resume with those, or start a new --output-dir") \
                from None
    if ema is not None and ema_state is not None:
        ema.load_state_dict({"step": state["ema_step"], "shadow": ema_state})
    elif ema is not None:
        stage.print(f"{stage.name}: {checkpoint.name} has no EMA weights (written without optim.ema_decay); the EMA "
                    "starts from the resumed weights")
        ema.restart(acc.unwrap_model(model))
    return int(state["step"])


def set_aside_later_checkpoints(stage: Stage, step: int) -> None:
    """Rename the checkpoints past `step` (an earlier run's, in the same output folder) to `stale-checkpoint-N`: kept,
    but out of reach of the rotation, which would delete this run's checkpoints first, and of `--resume latest`,
    which would continue the other run."""
    acc = stage.accelerator
    if acc.is_main_process:
        for old in list_checkpoints(stage.work_dir):
            if checkpoint_step(old) > step:
                target = old.with_name(f"stale-{old.name}")
                if target.exists():
                    target = old.with_name(f"stale-{old.name}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(old, target)
                why = f"from a run past step {step}" if step > 0 else \
                    "from an earlier run, which this one does not continue (it was started without --resume)"
                stage.print(f"{stage.name}: {old.name} is {why}; kept as {target} (to continue that run instead, "
                            f"stop this one and pass --resume {target})")
    acc.wait_for_everyone()


def _mismatch(error: RuntimeError) -> str:
    """A one-line summary of a load_state_dict error: the count of mismatched shapes (torch then lists nothing
    else), else of missing and unexpected keys; and the first problem."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    shapes = [line for line in lines if line.startswith("size mismatch")]
    keys = {kind: sum(line.count('"') // 2 for line in lines if line.startswith(kind))
            for kind in ("Missing", "Unexpected")}
    counts = f"{len(shapes)} shape mismatch(es)" if shapes else \
        f"{keys['Missing']} missing and {keys['Unexpected']} unexpected key(s)"
    first = lines[0] if lines else str(error)
    return f"{counts}; first: {first[:200]}"


def resolve_resume(stage: Stage) -> Path | None:
    """The checkpoint `--resume` names: None (start at step 0), `latest` (the newest complete one in the work
    folder, or None when there is none) or a checkpoint folder's path."""
    if stage.resume is None:
        return None
    if stage.resume == "latest":
        found = list_checkpoints(stage.work_dir)
        if not found:
            stage.print(f"{stage.name}: --resume latest: no checkpoint in {stage.work_dir}; starting from step 0")
            return None
        return found[-1]
    path = Path(stage.resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {path}: not a complete checkpoint (no trainer_state.json)")
    other = path.resolve().parent
    if other.parent.name == "_work" and other.name != stage.name:
        raise ValueError(f"--resume {path}: that is a checkpoint of the {other.name} stage, not of {stage.name} "
                         f"(its checkpoints are in {stage.work_dir})")
    return path


