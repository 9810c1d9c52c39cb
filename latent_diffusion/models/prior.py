"""The diffusion prior of DALL·E 2 (Ramesh et al. 2022, §2.2): a causal transformer that denoises a CLIP image
embedding given the caption.

Token sequence (B, L + 4, width): [text token states (L), pooled text embedding, timestep embedding,
noised image embedding, learned query]; a causal mask plus the text padding mask; the query token's output
is the prediction of the clean (normalised) image embedding x0 (the paper predicts x0 directly, §2.2).

CLIP image embeddings are normalised per dimension with `clip_mean`/`clip_std` — statistics of the training
data stored as buffers, so they are saved with the weights and a trained prior carries them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latent_diffusion.io import (
    DIFFUSERS_WEIGHTS,
    build_with_weights,
    find_weights,
    load_model,
    load_safetensors,
    read_json,
    save_model,
)
from latent_diffusion.layers import Attention, FeedForward, TimestepMLP, rename_keys, timestep_embedding

MASK_VALUE = -10000.0  # additive mask; finite so a fully masked row cannot produce NaNs


@dataclass(frozen=True)
class DiffusionPriorConfig:
    """Architecture of a `DiffusionPrior`."""

    embed_dim: int = 768  # D: CLIP image embedding size (the diffused variable)
    text_embed_dim: int = 768  # P: pooled (projected) CLIP text embedding size
    text_states_dim: int = 768  # CLIP text token state width
    max_text_tokens: int = 77
    width: int = 2048
    layers: int = 20
    heads: int = 32
    norm_in: bool = False  # LayerNorm on the tokens before the first block (Kandinsky's variant)

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"prior width {self.width} is not divisible by heads={self.heads}")


PRIOR_PRESETS: dict[str, DiffusionPriorConfig] = {
    "tiny": DiffusionPriorConfig(embed_dim=32, text_embed_dim=32, text_states_dim=32, max_text_tokens=77,
                                 width=32, layers=2, heads=2),
}


class PriorBlock(nn.Module):
    """Pre-norm transformer block: masked self-attention then a GELU MLP. (B, T, width)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.ff = FeedForward(width, gated=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.ff(self.norm2(x))


class DiffusionPrior(nn.Module):
    """forward(x (B, D) normalised noisy image embedding, t (B,) or scalar, text_states (B, L, text_states_dim),
    text_embeds (B, P), text_mask (B, L) bool | None) -> (B, D) predicted clean normalised embedding."""

    config_class = DiffusionPriorConfig

    def __init__(self, config: DiffusionPriorConfig):
        super().__init__()
        c = self.config = config
        self.time_embed = TimestepMLP(c.width, c.width)
        self.proj_in = nn.Linear(c.embed_dim, c.width)
        self.text_embed_proj = nn.Linear(c.text_embed_dim, c.width)
        self.text_states_proj = nn.Linear(c.text_states_dim, c.width)
        self.positional_embedding = nn.Parameter(torch.zeros(1, c.max_text_tokens + 4, c.width))
        self.query = nn.Parameter(torch.zeros(1, 1, c.width))
        self.norm_in = nn.LayerNorm(c.width) if c.norm_in else None
        self.blocks = nn.ModuleList(PriorBlock(c.width, c.heads) for _ in range(c.layers))
        self.norm_out = nn.LayerNorm(c.width)
        self.proj_out = nn.Linear(c.width, c.embed_dim)
        self.register_buffer("clip_mean", torch.zeros(c.embed_dim))
        self.register_buffer("clip_std", torch.ones(c.embed_dim))
        nn.init.normal_(self.positional_embedding, std=0.02)
        nn.init.normal_(self.query, std=0.02)

    def normalize(self, embeds: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding (B, D) → the prior's unit-scale space."""
        return (embeds - self.clip_mean) / self.clip_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The prior's space → CLIP image embedding (B, D)."""
        return x * self.clip_std + self.clip_mean

    @torch.no_grad()
    def set_embedding_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store the per-dimension mean/std (D,) of the training image embeddings."""
        if mean.shape != self.clip_mean.shape or std.shape != self.clip_std.shape:
            raise ValueError(f"embedding stats must have shape {tuple(self.clip_mean.shape)}, "
                             f"got mean {tuple(mean.shape)} and std {tuple(std.shape)}")
        self.clip_mean.copy_(mean)
        self.clip_std.copy_(std.clamp_min(1e-6))

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, text_states: torch.Tensor,
                text_embeds: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, _ = text_states.shape
        c = self.config
        if L > c.max_text_tokens:
            raise ValueError(f"text has {L} tokens; this prior takes at most {c.max_text_tokens}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        temb = self.time_embed(timestep_embedding(t, c.width).to(x.dtype))
        tokens = torch.cat([
            self.text_states_proj(text_states),  # (B, L, W)
            self.text_embed_proj(text_embeds)[:, None],
            temb[:, None],
            self.proj_in(x)[:, None],
            self.query.expand(B, -1, -1),
        ], dim=1)  # (B, L + 4, W)
        T = L + 4
        # text at positions 0..L-1, the four other tokens always at the last four positions (where training, with
        # text padded to max_text_tokens, put them), so a shorter (unpadded) text means the same
        pos = self.positional_embedding
        tokens = tokens + (pos if L == c.max_text_tokens else torch.cat([pos[:, :L], pos[:, -4:]], dim=1))
        # Additive mask (B, 1, T, T): causal, plus padded text tokens hidden from every query.
        mask = torch.full((T, T), MASK_VALUE, device=x.device, dtype=tokens.dtype).triu(1)[None, None]
        if text_mask is not None:
            keep = torch.cat([text_mask.bool(), text_mask.new_ones(B, 4, dtype=torch.bool)], dim=1)
            mask = mask + torch.where(keep, 0.0, MASK_VALUE).to(tokens.dtype)[:, None, None, :]
        if self.norm_in is not None:
            tokens = self.norm_in(tokens)
        for block in self.blocks:
            tokens = block(tokens, mask)
        return self.proj_out(self.norm_out(tokens[:, -1]))

    # --- persistence -------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        save_model(self, folder, dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> DiffusionPrior:
        prior = load_model(cls, folder, device, dtype)
        return prior

    @classmethod
    def from_diffusers(cls, folder: str | Path) -> DiffusionPrior:
        """Load a diffusers `PriorTransformer` folder (`config.json` + `diffusion_pytorch_model.safetensors`) of
        the Karlo / Stable unCLIP kind: the `prd` query token, linear text-state projection, no input-embedding
        norm, SiLU time MLP, output width = embedding width; `norm_in_type` None or "layer". Anything else is
        refused by name. The prior's text must then be exactly `num_embeddings` tokens long, as in diffusers."""
        folder = Path(folder)
        config = prior_config_from_diffusers(read_json(folder / "config.json"), source=str(folder / "config.json"))
        state = load_safetensors(find_weights(folder, DIFFUSERS_WEIGHTS))
        state = rename_keys(state, DIFFUSERS_PRIOR_RULES)
        for key in ("clip_mean", "clip_std"):  # diffusers: (1, D) parameters; ours: (D,) buffers
            if key in state:
                state[key] = state[key].reshape(-1)
        return build_with_weights(cls, config, state, source=str(folder))


def prior_config_from_diffusers(raw: dict, source: str = "config.json") -> DiffusionPriorConfig:
    """Translate a diffusers `PriorTransformer` config into a `DiffusionPriorConfig`, refusing what our prior
    does not implement (naming the option and the supported value)."""
    if raw.get("_class_name", "PriorTransformer") != "PriorTransformer":
        raise ValueError(f"{source} describes a {raw['_class_name']}, not a PriorTransformer")
    heads, head_dim = raw.get("num_attention_heads", 32), raw.get("attention_head_dim", 64)
    width = heads * head_dim
    embed_dim = raw.get("embedding_dim", 768)
    # option: (its value, the values we support); None for a size means "derived from the other sizes".
    supported = {
        "additional_embeddings": (raw.get("additional_embeddings", 4), (4,)),
        "added_emb_type": (raw.get("added_emb_type", "prd"), ("prd",)),
        "encoder_hid_proj_type": (raw.get("encoder_hid_proj_type", "linear"), ("linear",)),
        "embedding_proj_norm_type": (raw.get("embedding_proj_norm_type"), (None,)),
        "norm_in_type": (raw.get("norm_in_type"), (None, "layer")),
        "time_embed_act_fn": (raw.get("time_embed_act_fn", "silu"), ("silu",)),
        "time_embed_dim": (raw.get("time_embed_dim"), (None, width)),
        "clip_embed_dim": (raw.get("clip_embed_dim"), (None, embed_dim)),
    }
    for key, (value, allowed) in supported.items():
        if value not in allowed:
            raise ValueError(f"{source}: unsupported {key}={value!r}; supported: {list(allowed)}")
    return DiffusionPriorConfig(
        embed_dim=embed_dim, text_embed_dim=raw.get("embedding_proj_dim") or embed_dim, text_states_dim=embed_dim,
        max_text_tokens=raw.get("num_embeddings", 77), width=width, layers=raw.get("num_layers", 20), heads=heads,
        norm_in=raw.get("norm_in_type") == "layer",
    )


# diffusers key → ours, applied in order.
DIFFUSERS_PRIOR_RULES: list[tuple[str, str]] = [
    (r"^time_embedding\.", "time_embed."),
    (r"^embedding_proj\.", "text_embed_proj."),
    (r"^encoder_hidden_states_proj\.", "text_states_proj."),
    (r"^prd_embedding$", "query"),
    (r"^transformer_blocks\.", "blocks."),
    (r"\.attn1\.to_out\.0\.", ".attn.to_out."),
    (r"\.attn1\.", ".attn."),
    (r"\.norm3\.", ".norm2."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"^proj_to_clip_embeddings\.", "proj_out."),
]
