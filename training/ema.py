"""The exponential moving average of a model's weights that the stages export (Polyak averaging; the warmup of
the decay is that of TensorFlow's `ExponentialMovingAverage` with `num_updates`)."""

from __future__ import annotations

from typing import Any

import torch


class EMA:
    """Exponential moving average of parameters, θ_ema ← d θ_ema + (1 - d) θ, with the warmup
    d_t = min(d, (1 + t) / (10 + t)). Checkpointed with the run; the exported weights are the EMA ones.
    `trained_only` averages only the parameters that require grad (LoRA adapters: the frozen base never moves,
    and averaging it would cost a full fp32 copy)."""

    def __init__(self, model: torch.nn.Module, decay: float, trained_only: bool = False):
        self.decay, self.trained_only = decay, trained_only
        self.restart(model)

    def restart(self, model: torch.nn.Module) -> None:
        """Start the average over at `model`'s current weights (step 0)."""
        self.step = 0
        trained = {k for k, p in model.named_parameters() if p.requires_grad} if self.trained_only else None
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if trained is None or k in trained}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        state = model.state_dict()
        groups: dict[type, list[str]] = {}  # sharded (DTensor) and plain tensors do not mix in one foreach call
        for k in self.shadow:
            if state[k].is_floating_point():
                groups.setdefault(type(state[k]), []).append(k)
        # θ_ema + (1 - d)(θ - θ_ema) as one fused kernel per group, not two per tensor: a small model's step on a
        # GPU is launch-bound
        for keys in groups.values():
            torch._foreach_lerp_([self.shadow[k] for k in keys], [state[k].float() for k in keys], 1 - d)
        for k in self.shadow:
            if not state[k].is_floating_point():
                self.shadow[k].copy_(state[k])

    def copy_to(self, model: torch.nn.Module) -> None:
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.shadow.items()}, strict=not self.trained_only)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        if missing:
            raise ValueError(f"the saved EMA lacks {len(missing)} of the averaged weights, e.g. {missing[:3]}")
        self.step = int(state["step"])  # checkpoints load on the CPU: keep each average where the model is
        # (an average over the whole model, from before `trained_only`, gives its trained entries)
        self.shadow = {k: v.to(self.shadow[k].device, torch.float32) for k, v in state["shadow"].items()
                       if k in self.shadow}
