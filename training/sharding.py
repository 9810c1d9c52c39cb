"""Fully sharded data parallelism (FSDP2: `torch.distributed.fsdp.fully_shard`; Zhao et al. 2023, "PyTorch FSDP"),
applied from outside the model code, block by block, as torchtitan does: each ResBlock, SpatialTransformer and
PriorBlock becomes one unit whose parameters are gathered just for its forward and backward, then the root takes
whatever is left (stems, time MLP, heads).

Parameters, gradients and AdamW state are split across the processes as DTensors, so each process holds about
1/N of them (plus one gathered block at a time); the model is moved to the GPU unit by unit, already split.
Gradients are averaged across processes like DDP's, so in fp32 a sharded run computes the same weights as an
unsharded one with the same global batch. Checkpoints and exports are written in full (unsharded) form by rank 0:
the weights load anywhere; resuming the optimizer state needs `--fsdp` again (any number of processes from two).
Every function that touches sharded tensors here is collective: all ranks call it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from latent_diffusion.layers import ResBlock
from latent_diffusion.models.prior import PriorBlock
from latent_diffusion.models.unet import SpatialTransformer

SHARD_UNITS = (ResBlock, SpatialTransformer, PriorBlock)


def shard_model(model: nn.Module, device: torch.device, world_size: int, mixed_precision: str = "no") -> nn.Module:
    """Shard `model` (on the CPU or already on `device`) in place over a 1-D mesh of all processes and return it;
    `fully_shard` moves each unit to `device` as it splits it. Under bf16 the gathered parameters are cast to bf16
    for compute while gradients are reduced in fp32 (FSDP2's MixedPrecisionPolicy). Forward inputs are not cast:
    autocast handles activations, and a float timestep such as 257 must not become bf16's 256."""
    if mixed_precision == "fp16":
        raise ValueError("--fsdp trains in fp32 or bf16, not fp16 (fp16 needs a sharded gradient scaler): set "
                         "--<stage>.optim.mixed_precision bf16, or launch with `accelerate launch "
                         "--mixed_precision bf16`")
    mesh = init_device_mesh(device.type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, SHARD_UNITS):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    # The root's parameters are needed again right at the start of backward: keep them gathered.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def full_tensors(state: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of a state dict's tensors, gathered one at a time (collective: every rank calls it;
    ranks with `keep=False`, e.g. all but the main one, take part in the gathers and get {})."""
    out = {}
    for k, v in state.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = full.detach().cpu().clone()
        del full
    return out


def shard_like(full: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split full tensors the way the matching tensors of `reference` (a sharded state dict) are split."""
    out = {}
    for k, ref in reference.items():
        if k not in full:
            raise KeyError(f"'{k}' is missing from the checkpoint")
        value = full[k].to(dtype=ref.dtype)
        if isinstance(ref, DTensor):
            out[k] = distribute_tensor(value.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements)
        else:
            out[k] = value.to(ref.device)
    return out


def unsharded_copy(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A plain (unsharded) model of the same class and config holding `state` (full tensors)."""
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard swaps the class
    plain = cls(model.config)
    plain.load_state_dict(state)
    return plain.to(device)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter names (collective; complete on rank 0, empty elsewhere)."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state read on rank 0 (other ranks pass {}) into the sharded optimizer (collective)."""
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor result (e.g. the global gradient norm) as a plain tensor (collective for DTensors)."""
    return value.full_tensor() if isinstance(value, DTensor) else value
