"""The training loop every stage shares, written once (`fit`): step-indexed data, per-step randomness, AdamW
with warmup + cosine/constant LR, EMA (training/ema.py), exact resume (the checkpoints themselves are
training/checkpoint.py), Ctrl-C / preemption handling, NaN guard, JSONL metrics and a tqdm bar on the main
process. A stage's set-up and run records (config, DONE marker) are training/stage.py.

Exactness by construction: the samples of global step s, and the noise drawn for them, depend only on
(seed, s), never on how many processes run or where a run was resumed. Each process takes its contiguous
slice of the global batch, and DDP averages the gradients, so a 2-process run equals a 1-process run with
the same global batch (without dropout, whose masks are drawn per process), and a resumed run equals an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from latent_diffusion import speed
from training import sharding
from training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    saved_step,
    set_aside_later_checkpoints,
)
from training.config import OptimConfig, close_process_group
from training.ema import EMA
from training.stage import Stage


# --- data and randomness indexed by step -------------------------------------------------------------------
class StepBatchSampler(Sampler[list[int]]):
    """Yields, for global steps start..max_steps-1 and each accumulation micro-step, this process's slice of
    the global batch. Epoch e visits the dataset in the order of a permutation seeded by (seed, e)."""

    def __init__(self, size: int, batch_size: int, grad_accum: int, seed: int, rank: int, world: int,
                 start_step: int, max_steps: int):
        if size < 1:
            raise ValueError("the training dataset is empty")
        self.size, self.batch, self.accum, self.seed = size, batch_size, grad_accum, seed
        self.rank, self.world, self.start, self.stop = rank, world, start_step, max_steps
        self._perms: dict[int, np.ndarray] = {}  # the epochs in use (a large dataset's permutation is costly)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._perms[epoch]

    def global_indices(self, step: int, micro: int) -> np.ndarray:
        per_step = self.batch * self.world * self.accum
        first = (step * self.accum + micro) * self.batch * self.world
        positions = np.arange(first, first + self.batch * self.world)
        out = np.empty_like(positions)
        for epoch in np.unique(positions // self.size):
            perm = self.permutation(int(epoch))
            sel = positions // self.size == epoch
            out[sel] = perm[positions[sel] % self.size]
        assert len(out) == per_step // self.accum
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        """Yields (index, epoch) keys, so datasets with random augmentation can vary it per epoch."""
        for step in range(self.start, self.stop):
            for micro in range(self.accum):
                first = (step * self.accum + micro) * self.batch * self.world + self.rank * self.batch
                idx = self.global_indices(step, micro)[self.rank * self.batch:(self.rank + 1) * self.batch]
                epochs = (np.arange(first, first + self.batch) // self.size).tolist()
                yield list(zip(idx.tolist(), epochs))

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.accum


class EpochKeyed(Dataset):
    """Reads `(index, epoch)` keys from `StepBatchSampler`: sets the dataset's epoch (when it has `set_epoch`, for
    per-epoch crops, flips and caption choices), then returns item `index`."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class StepRandom:
    """Random draws for one micro-step, identical whatever the number of processes: each draw is made for
    the whole global batch from a generator seeded by (seed, step, micro), and this process keeps its rows."""

    def __init__(self, seed: int, step: int, micro: int, rank: int, world: int, batch: int, device: torch.device):
        self.seed = int(np.random.default_rng([seed, step, micro, 7]).integers(2**62))  # (+ a rank stays < 2**63)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.lo, self.hi, self.n, self.device = rank * batch, (rank + 1) * batch, batch * world, device

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(self.n, *shape, generator=self.gen)[self.lo:self.hi].to(self.device)

    def rand(self) -> torch.Tensor:
        return torch.rand(self.n, generator=self.gen)[self.lo:self.hi].to(self.device)

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.n,), generator=self.gen)[self.lo:self.hi].to(self.device)


# --- optimisation pieces -----------------------------------------------------------------------------------
def make_optimizer(params: Any, oc: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019); the fused kernel on CUDA."""
    return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay,
                             fused=device.type == "cuda")


def lr_factor(step: int, oc: OptimConfig, max_steps: int) -> float:
    """Linear warmup, then constant or cosine decay to 0 at `max_steps` (Loshchilov & Hutter 2017)."""
    if step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.lr_schedule == "constant":
        return 1.0
    progress = (step - oc.warmup_steps) / max(1, max_steps - oc.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- resume -----------------------------------------------------------------------------------------------
def apply_optim_config(stage: Stage, optimizer: torch.optim.Optimizer, scheduler: Any, oc: OptimConfig) -> None:
    """Give the resumed optimizer and schedule this run's lr, betas and weight decay: a checkpoint restores those of
    the run that wrote it, so `--resume latest --<stage>.optim.lr 1e-5` would otherwise keep the old rate."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper, or the LambdaLR itself
    groups = optimizer.param_groups
    old = (inner.base_lrs[0], tuple(groups[0]["betas"]), groups[0]["weight_decay"])
    inner.base_lrs = [oc.lr] * len(groups)
    for group in groups:
        # the schedule's own count (behind `step` by any fp16 steps the gradient scaler skipped)
        group.update(initial_lr=oc.lr, lr=oc.lr * lr_factor(inner.last_epoch, oc, stage.max_steps),
                     betas=tuple(oc.betas), weight_decay=oc.weight_decay)
    inner._last_lr = [group["lr"] for group in groups]  # what get_last_lr() reports until the next step
    if old != (oc.lr, tuple(oc.betas), oc.weight_decay):
        stage.print(f"{stage.name}: resuming with lr {oc.lr}, betas {tuple(oc.betas)}, weight decay "
                    f"{oc.weight_decay} (the checkpoint's run had {old[0]}, {old[1]}, {old[2]})")


# --- the loop -------------------------------------------------------------------------------------------
# loss_fn(model, batch, rnd, step) -> (loss, parts to log): the parts are scalars (0-d tensors or floats) under the
# same keys on every process and at every step (they are averaged over processes at log steps)
LossFn = Callable[[torch.nn.Module, Any, StepRandom, int], tuple[torch.Tensor, dict[str, torch.Tensor | float]]]


def fit(stage: Stage, model: torch.nn.Module, dataset: Dataset, loss_fn: LossFn, oc: OptimConfig,
        collate: Callable | None = None, validate: Callable[[torch.nn.Module, int], dict[str, float]] | None = None,
        params: Any = None) -> torch.nn.Module:
    """Train `model` for `stage.max_steps` optimiser steps (fewer when `oc.max_minutes` runs out first: the run
    then ends, checkpoints and exports at that step) and return the unwrapped model holding the final
    weights (the EMA weights when `oc.ema_decay` is set). Under `--fsdp` only the main process gets that
    (unsharded) model; the others get their sharded module back.

    loss_fn(model, batch, rnd, step) -> (scalar loss, metrics) computes the loss of this process's micro-batch
    with `model` as prepared by Accelerate (DDP-wrapped when distributed); randomness must come from `rnd`.
    """
    acc = stage.accelerator
    world, rank = acc.num_processes, acc.process_index
    # Speed switches change how the model runs, never its parameters or state-dict keys; compilation comes last.
    speed.apply_speed(model, onednn=oc.onednn_linear, upsample=oc.transposed_upsample)
    if oc.compile:  # block by block, before sharding (as torchtitan orders them); state-dict keys are unchanged
        speed.compile_blocks(model)
    if stage.fsdp:  # shard first: the optimizer must hold the sharded parameters
        if params is not None:
            raise ValueError(f"{stage.name}: --fsdp trains whole models only")
        model = sharding.shard_model(model, acc.device, world, acc.mixed_precision)
    optimizer = make_optimizer(params if params is not None else model.parameters(), oc, acc.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, oc, stage.max_steps))
    if stage.fsdp:
        wrapped = model
    else:
        wrapped, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ema = EMA(acc.unwrap_model(wrapped), oc.ema_decay, stage.trained_only) if oc.ema_decay else None

    start = 0
    checkpoint = resolve_resume(stage)
    if checkpoint is not None:
        at = saved_step(checkpoint)
        if at > stage.max_steps:  # resuming cannot shorten a run
            raise ValueError(f"{stage.name}: {checkpoint} is at step {at}, past max_steps {stage.max_steps}: there "
                             f"is nothing to train; pass --max-steps {at} or more to continue it")
        start = load_checkpoint(stage, checkpoint, wrapped, optimizer, scheduler, ema)
        stage.print(f"resumed from {checkpoint} at step {start}")
        apply_optim_config(stage, optimizer, scheduler, oc)
    set_aside_later_checkpoints(stage, start)
    stage.record_config(start)  # past every refusal: the run trains from here
    if oc.warmup_steps >= stage.max_steps:
        stage.print(f"{stage.name}: note: optim.warmup_steps {oc.warmup_steps} >= max_steps {stage.max_steps}: the "
                    "whole run is warm-up (the learning rate reaches optim.lr at the last step at best, and never "
                    "decays); lower warmup_steps")
    if acc.is_main_process:  # what this run used, beside the resolved config (whose mixed_precision may be null)
        with open(stage.work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"run": {"start_step": start, "mixed_precision": acc.mixed_precision,
                                        "processes": world, "fsdp": stage.fsdp}}) + "\n")

    sampler = StepBatchSampler(len(dataset), oc.batch_size, oc.grad_accum, stage.config.seed, rank, world, start,
                               stage.max_steps)
    loader = DataLoader(EpochKeyed(dataset), batch_sampler=sampler, num_workers=oc.num_workers, collate_fn=collate,
                        persistent_workers=False, worker_init_fn=ignore_stop_signals)
    batches = iter(loader)
    metrics_path = stage.work_dir / "metrics.jsonl"
    bar = tqdm(total=stage.max_steps, initial=start, desc=stage.name, disable=not acc.is_main_process,
               dynamic_ncols=True)
    board = tensorboard_writer(stage) if acc.is_main_process else None
    wrapped.train()
    t0, last_good = time.perf_counter(), None
    bad_step = torch.full((), -1, device=acc.device)
    deadline = t0 + 60 * oc.max_minutes if oc.max_minutes else None
    end = stage.max_steps  # where the loop stops: max_steps, or earlier once the time limit is reached
    # SIGINT / SIGTERM: checkpoint at the next step boundary (with several processes, the one after: StopVote), stop
    with Interrupt(stage.name) as interrupt, _workers_stopped_on_error(batches):
        should_stop = StopVote(acc, deadline, interrupt)
        for step in range(start, stage.max_steps):
            logs: dict[str, torch.Tensor] = {}
            total = torch.zeros((), device=acc.device)
            for micro in range(oc.grad_accum):
                batch = next(batches)
                rnd = StepRandom(stage.config.seed, step, micro, rank, world, oc.batch_size, acc.device)
                # what draws from torch's global generator (dropout, e.g. LoRA's) is a function of the step too, so
                # a resumed run repeats it (per process: dropout masks are this process's own)
                torch.manual_seed(rnd.seed + rank)
                last = micro == oc.grad_accum - 1
                if stage.fsdp:  # accumulate unsharded gradients locally; reduce-scatter on the last micro-step only
                    wrapped.set_requires_gradient_sync(last)
                sync = acc.no_sync(wrapped) if not last and not stage.fsdp else nullcontext()
                with sync, acc.autocast():
                    loss, extra = loss_fn(wrapped, batch, rnd, step)
                acc.backward(loss / oc.grad_accum)
                total += loss.detach() / oc.grad_accum
                for k, v in extra.items():  # kept on the device: read only at log steps (no wait every step)
                    v = v.detach().float() if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=acc.device)
                    logs[k] = logs.get(k, 0.0) + v / oc.grad_accum
            total = acc.reduce(total, reduction="mean")
            # The first step with a non-finite loss, kept on the device: reading it every step would make the host
            # wait for the device each step (no overlap of data loading and kernel launches with compute).
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(total), step, bad_step)
            grad_norm = None
            if oc.max_grad_norm and stage.fsdp:
                grad_norm = sharding.full_value(torch.nn.utils.clip_grad_norm_(wrapped.parameters(), oc.max_grad_norm))
            elif oc.max_grad_norm:
                grad_norm = acc.clip_grad_norm_(wrapped.parameters(), oc.max_grad_norm)
            step_lr = scheduler.get_last_lr()[0]  # the rate this step trains with (logged below)
            # fp16: a step the gradient scaler skipped (inf/nan gradients) moves neither the schedule nor the EMA
            if not optimizer_step(optimizer, getattr(acc, "scaler", None)):
                scheduler.step()
                if ema is not None:
                    ema.update(acc.unwrap_model(wrapped))
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            done = step + 1
            late, interrupted = should_stop() if done < stage.max_steps else (False, False)
            if late:
                end = done
            saving = bool(oc.checkpoint_every) and done % oc.checkpoint_every == 0 and done < stage.max_steps
            # (end: max_steps, or where the time ran out; an interrupted step is logged before the run stops)
            logging_now = done % oc.log_every == 0 or done == end or interrupted
            if logging_now or saving:
                _stop_if_not_finite(stage, bad_step, last_good, bar)
            if logging_now and logs:  # each process's parts of the loss cover its slice: average them
                values = torch.stack([v.to(acc.device) for v in logs.values()])
                logs = dict(zip(logs, (acc.reduce(values, reduction="mean") if world > 1 else values).tolist()))
            if acc.is_main_process and logging_now:
                record = {"step": done, "loss": total.item(), "lr": step_lr,
                          "samples_per_s": oc.batch_size * world * oc.grad_accum * (done - start)
                          / (time.perf_counter() - t0), **logs}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if board is not None:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"{stage.name}/{key}", value, done)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if interrupted:
                _stop_interrupted(stage, interrupt, done, start, bad_step, last_good, bar, ema, wrapped, optimizer,
                                  scheduler, oc.checkpoint_limit)
            if done == end < stage.max_steps:
                stage.print(f"{stage.name}: stopping at step {done} of {stage.max_steps}: the time limit of "
                            f"{oc.max_minutes} min (optim.max_minutes) is reached")
                break
            if saving:
                last_good = save_checkpoint(stage, done, oc.checkpoint_limit, ema, wrapped, optimizer, scheduler)
            if validate is not None and oc.validate_every and done % oc.validate_every == 0 and done < stage.max_steps:
                _run_validation(stage, wrapped, ema, validate, done, metrics_path, sharded=stage.fsdp)
        should_stop.close()
    _shutdown_workers(batches)  # done with the data: no idle workers through the final save and validation
    stage.pending_signal = interrupt.signal_name  # (met past the last check: the stage finishes, then stops)
    bar.close()
    if board is not None:
        board.close()
    if end > start:
        save_checkpoint(stage, end, oc.checkpoint_limit, ema, wrapped, optimizer, scheduler)
    if stage.fsdp:  # the main process gets the whole final model, unsharded; the others keep their shards
        state = _gather_weights(stage, wrapped, ema)
        final = sharding.unsharded_copy(wrapped, state, acc.device) if acc.is_main_process else wrapped
        if acc.is_main_process:  # shards differ by design: there is nothing to compare across ranks
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"world_size": acc.num_processes, "fsdp": True}) + "\n")
    else:
        final = acc.unwrap_model(wrapped)
        check_in_sync(stage, final, metrics_path)
        if ema is not None:
            ema.copy_to(final)
    final.eval()
    if validate is not None:  # (under --fsdp the main process validates its unsharded copy; the others wait)
        _run_validation(stage, final if stage.fsdp else wrapped, None, validate, end, metrics_path)
    _report_skipped(stage, dataset, metrics_path)
    return final


def _report_skipped(stage: Stage, dataset: Dataset, metrics_path: Path) -> None:
    """Log, and say, how many unreadable images the run skipped (datasets that count them: your own images).
    Each process counts those it met (the same file may be met by several): the largest count is a lower bound."""
    from accelerate.utils import gather_object

    acc = stage.accelerator
    per_process = gather_object([getattr(dataset, "skipped", 0)])  # (one process: the list itself)
    skipped = max(per_process)
    if not acc.is_main_process or not hasattr(dataset, "skipped"):
        return
    record = {"skipped_images": skipped, "dataset_size": len(dataset)}
    if len(per_process) > 1:
        record["skipped_per_process"] = per_process
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if skipped:
        at_least = "at least " if len(per_process) > 1 else ""
        stage.print(f"{stage.name}: skipped {at_least}{skipped} unreadable image(s) of {len(dataset)} (see the "
                    "warnings above)")


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Any = None) -> bool:
    """`optimizer.step()` (Accelerate's, which steps and updates fp16's gradient scaler); True when the scaler
    skipped the update for inf/nan gradients, read as a drop of its scale (a fused AdamW skips inside the kernel,
    so the optimizer itself cannot tell). Without a scaler nothing is read: no wait for the device."""
    before = scaler.get_scale() if scaler is not None else None
    optimizer.step()
    return scaler is not None and scaler.get_scale() < before


class Interrupt:
    """While active, SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) do not kill training: the loop writes a
    checkpoint at the next step boundary and stops, so `--resume latest` loses nothing. A second signal stops at
    once, unless it is the same signal within `repeat_s` seconds or before the loop noticed the first: the copy a
    launcher passes on of a signal the process got itself as well (SLURM's scancel signals every process of the
    job). With several processes the checkpoint comes one step later (`StopVote`). Handlers can only be set from the
    main thread; elsewhere this does nothing."""

    repeat_s = 1.0

    def __init__(self, name: str):
        self.name, self.signal_name, self._previous, self._at = name, None, {}, 0.0
        self.noticed = False  # the loop has seen the signal (`StopVote`): a copy would have been handled before

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            # a copy can wait for its handler while the main thread is in one long C call (a device sync, say)
            if name == self.signal_name and (not self.noticed or time.monotonic() - self._at < self.repeat_s):
                return  # the same stop request, delivered twice
            self.__exit__()
            raise KeyboardInterrupt
        self.signal_name, self._at = name, time.monotonic()
        print(f"\n{self.name}: {self.signal_name}: stopping with a checkpoint after this step (again to stop now)",
              flush=True)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT and SIGTERM, which a terminal's Ctrl-C or a scheduler sends to the whole
    process group: the main process checkpoints and then shuts its workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopVote:
    """Whether to stop at this step (past `deadline`, interrupted), agreed by every process so that all stop at one
    step. With several processes each step starts an asynchronous all-reduce (max) of (past the deadline, the
    signal's number) and reads the one started the step before: the processes act one step after a signal or the
    deadline. On a GPU the result is copied to pinned host memory behind the all-reduce and waited for by an event,
    so the host waits for the device's previous step only, never for the step it has just queued. A process that
    got no signal itself takes the others' (its exit code and message name it). A stop must come quickly: the
    launcher kills the processes `TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 30 s by default, after it passes a signal on."""

    def __init__(self, acc: Accelerator, deadline: float | None, interrupt: Interrupt):
        self.deadline, self.interrupt, self.pending = deadline, interrupt, None
        self.several, cuda = acc.num_processes > 1, acc.device.type == "cuda"
        self.flags = torch.zeros(2, dtype=torch.long, device=acc.device) if self.several else None
        self.host = torch.zeros(2, dtype=torch.long, pin_memory=True) if self.several and cuda else None

    def __call__(self) -> tuple[bool, bool]:
        """(late, interrupted): this process's own with one process; else every process's of the step before,
        combined (nothing is left in flight once they say stop)."""
        import torch.distributed as dist

        interrupt = self.interrupt
        interrupt.noticed = interrupt.signal_name is not None
        late = self.deadline is not None and time.perf_counter() > self.deadline
        if not self.several:
            return late, interrupt.noticed
        agreed = (False, False)
        if self.pending is not None:
            late_any, signum = self._read()
            agreed = (late_any > 0, signum > 0)
            if signum and interrupt.signal_name is None:
                interrupt.signal_name = signal.Signals(signum).name
        if not any(agreed):
            self.flags[0].fill_(int(late))  # (a kernel taking the value: no copy from the host, no wait)
            self.flags[1].fill_(getattr(signal, interrupt.signal_name) if interrupt.noticed else 0)
            work = dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, async_op=True)
            if self.host is not None:
                work.wait()  # (NCCL: the stream waits for the all-reduce, not the host)
                self.host.copy_(self.flags, non_blocking=True)
                self.pending = torch.cuda.Event()
                self.pending.record()
            else:
                self.pending = work
        return agreed

    def _read(self) -> list[int]:
        """The all-reduced flags started the step before (waiting for them)."""
        pending, self.pending = self.pending, None
        if self.host is not None:
            pending.synchronize()
            return self.host.tolist()
        pending.wait()
        return self.flags.tolist()

    def close(self) -> None:
        """Wait for the all-reduce still in flight (every process calls this at the same step)."""
        if self.pending is not None:
            self._read()


@contextmanager
def _workers_stopped_on_error(batches: Any) -> Iterator[None]:
    """Shut a DataLoader iterator's workers down when the loop raises: they ignore SIGTERM (`ignore_stop_signals`),
    so Python's exit would otherwise wait for them forever."""
    try:
        yield
    except BaseException:
        _shutdown_workers(batches)
        raise


def _shutdown_workers(batches: Any) -> None:
    shutdown = getattr(batches, "_shutdown_workers", None)  # (a single-process iterator has none)
    if shutdown is not None:
        shutdown()


def _stop_interrupted(stage: Stage, interrupt: Interrupt, done: int, start: int, bad_step: torch.Tensor,
                      last_good: Path | None, bar: Any, ema: EMA | None, wrapped: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, scheduler: Any, limit: int) -> None:
    """Checkpoint the `done` steps (unless none were taken here) and leave with the shell's code for the signal."""
    bar.close()
    if done > start:
        _stop_if_not_finite(stage, bad_step, last_good, bar)
        path = save_checkpoint(stage, done, limit, ema, wrapped, optimizer, scheduler)
        stage.print(f"{stage.name}: interrupted ({interrupt.signal_name}) at step {done}: wrote {path}; "
                    "`--resume latest` continues from it")
    code = 128 + getattr(signal, interrupt.signal_name or "SIGINT")
    close_process_group()  # every process stops at this step together (`StopVote`)
    raise SystemExit(code)


def _stop_if_not_finite(stage: Stage, bad_step: torch.Tensor, last_good: Path | None, bar: Any) -> None:
    """Raise if a step since the start had a non-finite loss (`bad_step` ≥ 0: the first such step)."""
    step = int(bad_step)
    if step < 0:
        return
    bar.close()
    raise FloatingPointError(
        f"{stage.name}: the loss became non-finite (inf or nan) at step {step}; stopping. The last good checkpoint "
        f"is {last_good or (list_checkpoints(stage.work_dir) or ['none'])[-1]}. Lower the learning rate "
        "or use bf16 instead of fp16.")


def tensorboard_writer(stage: Stage) -> Any:
    """A TensorBoard writer into work_dir/tensorboard when the `tensorboard` package is installed, else None
    (the JSONL log is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(stage.work_dir / "tensorboard"))


@torch.no_grad()
def check_in_sync(stage: Stage, model: torch.nn.Module, metrics_path: Path) -> None:
    """Fail loudly if the processes ended with different weights (a broken distributed set-up)."""
    acc = stage.accelerator
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ramp = torch.linspace(-1, 1, flat.numel(), device=flat.device)
    checksum = torch.stack([flat.sum(), flat.abs().sum(), (flat * ramp).sum()])[None]  # (1, 3)
    gathered = acc.gather(checksum)  # (world, 3)
    in_sync = bool(torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-6, atol=1e-6))
    if acc.is_main_process:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"world_size": acc.num_processes, "ranks_in_sync": in_sync}) + "\n")
    if not in_sync:
        raise RuntimeError(f"{stage.name}: processes ended with different weights: checksums {gathered.tolist()}")


def _gather_weights(stage: Stage, wrapped: torch.nn.Module, ema: EMA | None) -> dict[str, torch.Tensor]:
    """The full weights of a sharded model (the EMA ones when there are any) on the main process, {} elsewhere
    (collective)."""
    state = ema.shadow if ema is not None else wrapped.state_dict()
    return sharding.full_tensors(state, keep=stage.accelerator.is_main_process)


def _run_validation(stage: Stage, wrapped: torch.nn.Module, ema: EMA | None, validate: Callable, step: int,
                    metrics_path: Path, sharded: bool = False) -> None:
    """`validate(model, step)` on the main process with the EMA weights when there are any. A `sharded` model is
    first gathered (by every process) into an unsharded copy."""
    acc = stage.accelerator
    acc.wait_for_everyone()
    model, backup = None, None
    if sharded:
        state = _gather_weights(stage, wrapped, ema)
        if acc.is_main_process:
            model = sharding.unsharded_copy(wrapped, state, acc.device)
    elif acc.is_main_process:
        model = acc.unwrap_model(wrapped)
        if ema is not None:  # (only what the EMA replaces)
            backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in ema.shadow}
            ema.copy_to(model)
    if model is not None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = validate(model, step) or {}
        model.train(was_training)
        if backup is not None:
            model.load_state_dict(backup, strict=False)
        if result:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "validation": result}) + "\n")
            stage.print(f"[{stage.name} step {step}] " + ", ".join(f"{k}={v:.4f}" for k, v in result.items()))
    acc.wait_for_everyone()
