"""CLIP glue: an offline CLIP-format tokenizer trainer, small CLIP presets, text and image encoding.

CLIP itself stays the `transformers` classes (`CLIPTokenizer`, `CLIPTextModelWithProjection`,
`CLIPVisionModelWithProjection`, `CLIPModel`); this module only builds and feeds them.

The tokenizer is the CLIP format of Radford et al. 2021: text is NFC-normalised, whitespace
collapsed and lowercased, split into words by CLIP's regex, each word byte-encoded with the
GPT-2 bytes→unicode table and marked with an end-of-word suffix `</w>`, then byte-pair merged.
Files: `vocab.json` (256 byte chars, the same 256 + `</w>`, the merge results in merge order,
then `<|startoftext|>` and `<|endoftext|>`) and `merges.txt` (`#version: 0.2` header).
"""

from __future__ import annotations

import heapq
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)

# Normalisation constants of OpenAI's CLIP image preprocessing (RGB, inputs in [0, 1]).
OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word regex (as in `transformers`' CLIPTokenizer): special tokens, English
# contractions, runs of letters, single digits, runs of other non-space characters.
CLIP_WORD_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
MIN_VOCAB_SIZE = 2 * 256 + 2  # byte chars, byte chars + </w>, bos, eos

CLIP_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few thousand parameters per tower.
    "tiny": {
        "projection_dim": 32,
        "text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8),
    },
    # For the 64×64 shapes data on a CPU budget: 8×8 patches → 64 image tokens, ~1.6M parameters per tower.
    "shapes": {
        "projection_dim": 128,
        "text": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512),
        "vision": dict(hidden_size=128, num_hidden_layers=3, num_attention_heads=4, intermediate_size=512,
                       image_size=64, patch_size=8),
    },
    # For the 64×64 shapes / emoji data: 8×8 patches → 64 image tokens.
    "small": {
        "projection_dim": 128,
        "text": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
        "vision": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                       image_size=64, patch_size=8),
    },
}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP reversible byte → printable unicode character table.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, soft hyphen)
    map to code points 256, 257, ... in byte order. Insertion order is the CLIP vocabulary order:
    the printable bytes first, then the remapped ones.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_backend_tokenizer(vocab: dict[str, int], merges: Sequence[tuple[str, str]]) -> Tokenizer:
    """A `tokenizers.Tokenizer` with CLIP's pipeline over `vocab` / `merges`.

    Encoding adds `<|startoftext|>` … `<|endoftext|>`; no padding or truncation. This is the
    reference the trainer learns against; `CLIPTokenizer` must tokenize identically.
    """
    tok = Tokenizer(BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], continuing_subword_prefix="",
                        end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=EOS_TOKEN))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS_TOKEN, EOS_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return tok


def _merge_word(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every non-overlapping occurrence of `pair` in `symbols`, left to right."""
    a, b = pair
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _learn_merges(word_counts: Counter[str], max_new_tokens: int) -> list[tuple[str, str]]:
    """Byte-pair merges (Sennrich et al. 2016) over byte-encoded words with counts.

    Greedily merges the most frequent adjacent pair until `max_new_tokens` new token strings
    exist or every word is a single token. Ties go to the lexicographically smallest pair, so
    the result depends only on the word counts (the `tokenizers` trainer breaks ties by
    hash-map order and differs run to run). Pair counts are updated incrementally, with a
    lazily invalidated max-heap.
    """
    words = sorted(word_counts)
    freqs = [word_counts[w] for w in words]
    symbols = [[*w[:-1], w[-1] + END_OF_WORD] for w in words]
    pair_counts: Counter[tuple[str, str]] = Counter()
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(symbols):
        for pair in zip(syms, syms[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[str, str]] = []
    new_tokens: set[str] = set()
    while heap and len(new_tokens) < max_new_tokens:
        neg_count, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale heap entry; the current count has its own entry
        merges.append(pair)
        new_tokens.add(pair[0] + pair[1])
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair)):
            old, new = symbols[i], _merge_word(symbols[i], pair)
            old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
            for p in old_pairs:
                pair_counts[p] -= freqs[i]
            for p in new_pairs:
                pair_counts[p] += freqs[i]
            for p in set(old_pairs) - set(new_pairs):
                where[p].discard(i)
            for p in new_pairs:
                where[p].add(i)
            changed.update(old_pairs, new_pairs)
            symbols[i] = new
        left = pair_counts.pop(pair)
        assert left == 0, pair  # greedy left-to-right merging leaves no occurrence
        for p in sorted(changed - {pair}):
            heapq.heappush(heap, (-pair_counts[p], p))
    return merges


def train_clip_tokenizer(captions: Iterable[str], out_dir: str | Path, vocab_size: int = 1024,
                         model_max_length: int = 77) -> CLIPTokenizer:
    """Train a CLIP-format byte-level BPE tokenizer on `captions` and save it to `out_dir`.

    Writes `vocab.json`, `merges.txt` and the `transformers` tokenizer files, and returns
    `CLIPTokenizer.from_pretrained(out_dir)`. `vocab_size` counts everything (512 byte tokens,
    the merges, bos and eos); a small corpus may stop earlier, once every word is one token, so
    size models with `len(tokenizer)`. Deterministic: the same captions give the same files.
    Any text encodes (every byte has a token); pad = unk = eos = `<|endoftext|>`, as in Stable
    Diffusion.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {MIN_VOCAB_SIZE} "
                         "(256 bytes, 256 bytes + '</w>', bos, eos)")
    byte_chars = list(bytes_to_unicode().values())
    base = [*byte_chars, *(c + END_OF_WORD for c in byte_chars)]

    # The same normaliser / word splitter that CLIPTokenizer applies at encode time.
    pipeline = clip_backend_tokenizer({c: i for i, c in enumerate(base + [BOS_TOKEN, EOS_TOKEN])}, [])
    word_counts: Counter[str] = Counter()
    for caption in captions:
        text = pipeline.normalizer.normalize_str(caption)
        word_counts.update(w for w, _ in pipeline.pre_tokenizer.pre_tokenize_str(text)
                           if w not in (BOS_TOKEN, EOS_TOKEN))
    if not word_counts:
        raise ValueError("no words in the captions; the tokenizer needs a non-empty corpus")

    merges = _learn_merges(word_counts, vocab_size - MIN_VOCAB_SIZE)
    tokens = list(base)
    seen = set(base)
    for a, b in merges:
        if a + b not in seen:  # two merge routes can reach the same string: one id
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers >= 5 builds CLIPTokenizer from the vocab/merges objects and saves
    # tokenizer.json + tokenizer_config.json; the vocab/merges pair is written beside them.
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.save_pretrained(out_dir)
    _write_vocab_and_merges(out_dir, vocab, merges)
    return CLIPTokenizer.from_pretrained(out_dir)


def _write_vocab_and_merges(out_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Write CLIP's `vocab.json` and `merges.txt` (with the `#version: 0.2` header)."""
    text = json.dumps(vocab, ensure_ascii=False, indent=0)
    (out_dir / "vocab.json").write_text(text + "\n", encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _preset(preset: str) -> dict[str, Any]:
    if preset not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {preset!r}; choose one of {sorted(CLIP_PRESETS)}")
    return CLIP_PRESETS[preset]


def clip_text_config(preset: str, tokenizer: PreTrainedTokenizerBase,
                     max_position_embeddings: int = 77) -> CLIPTextConfig:
    """`CLIPTextConfig` for `preset`, sized to `tokenizer`.

    vocab size and bos/eos/pad ids come from the tokenizer: with CLIP's defaults (49406/49407)
    and a small vocabulary, `CLIPTextModel` would pool position 0 instead of the EOS token.
    """
    p = _preset(preset)
    if tokenizer.model_max_length > max_position_embeddings:
        raise ValueError(f"tokenizer.model_max_length={tokenizer.model_max_length} exceeds "
                         f"max_position_embeddings={max_position_embeddings}")
    if tokenizer.eos_token_id is None or tokenizer.bos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs bos, eos and pad tokens (CLIP pools the first EOS position)")
    return CLIPTextConfig(
        **p["text"], projection_dim=p["projection_dim"], vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def clip_vision_config(preset: str, image_size: int | None = None) -> CLIPVisionConfig:
    """`CLIPVisionConfig` for `preset`; `image_size` overrides the preset's (a multiple of the patch)."""
    p = _preset(preset)
    vision = dict(p["vision"])
    if image_size is not None:
        if image_size % vision["patch_size"]:
            raise ValueError(f"image_size={image_size} is not a multiple of the preset's "
                             f"patch_size={vision['patch_size']}")
        vision["image_size"] = image_size
    return CLIPVisionConfig(**vision, projection_dim=p["projection_dim"])


def clip_config(preset: str, tokenizer: PreTrainedTokenizerBase, max_position_embeddings: int = 77,
                image_size: int | None = None) -> CLIPConfig:
    """`CLIPConfig` (both towers and the shared projection width) for `preset`, sized to `tokenizer`."""
    return CLIPConfig(
        text_config=clip_text_config(preset, tokenizer, max_position_embeddings),
        vision_config=clip_vision_config(preset, image_size),
        projection_dim=_preset(preset)["projection_dim"],
    )


# --------------------------------------------------------------------------------------------
# Models and encoding
# --------------------------------------------------------------------------------------------


def split_clip_model(clip: CLIPModel) -> tuple[CLIPTextModelWithProjection, CLIPVisionModelWithProjection]:
    """Split a (trained) `CLIPModel` into its text and image towers, each with its projection.

    The towers are new modules holding copies of the weights, on `clip`'s device and dtype and
    in its train/eval mode; their `text_embeds` / `image_embeds` equal
    `clip.get_text_features` / `clip.get_image_features` (unnormalised).
    """
    projection_dim = clip.config.projection_dim
    text_config = CLIPTextConfig.from_dict(
        {**clip.config.text_config.to_dict(), "projection_dim": projection_dim})
    vision_config = CLIPVisionConfig.from_dict(
        {**clip.config.vision_config.to_dict(), "projection_dim": projection_dim})
    param = next(clip.parameters())

    text = CLIPTextModelWithProjection(text_config).to(device=param.device, dtype=param.dtype)
    text.text_model.load_state_dict(clip.text_model.state_dict())
    text.text_projection.load_state_dict(clip.text_projection.state_dict())
    vision = CLIPVisionModelWithProjection(vision_config).to(device=param.device, dtype=param.dtype)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return text.train(clip.training), vision.train(clip.training)


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], stacklevel: int = 2
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, L) and mask (B, L) bool (True at bos … eos) of `prompts`, padded to and truncated at
    L = `tokenizer.model_max_length`, warning once per truncated prompt. One tokenizer pass (a second only for
    the prompts that are too long), cheap enough to run in DataLoader workers (`training.common.TokenizingCollate`).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    max_length, prompts = tokenizer.model_max_length, list(prompts)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, verbose=False)
    ids, mask = enc.input_ids, enc.attention_mask
    long = [i for i, row in enumerate(ids) if len(row) > max_length]
    for i in long:
        warnings.warn(f"prompt {_short(prompts[i])!r} has {len(ids[i])} tokens, over the tokenizer limit of "
                      f"{max_length}; it was truncated", stacklevel=stacklevel)
    if long:  # the tokenizer's own truncation (which keeps the end-of-text token) for those rows
        cut = tokenizer([prompts[i] for i in long], padding="max_length", truncation=True, max_length=max_length)
        for j, i in enumerate(long):
            ids[i], mask[i] = cut.input_ids[j], cut.attention_mask[j]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)


def encode_text(tokenizer: PreTrainedTokenizerBase, text_encoder: torch.nn.Module, prompts: list[str],
                device: torch.device | str | None = None, use_attention_mask: bool = True,
                token_embeddings: bool = False, layer: int | None = None,
                tokens: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokenize `prompts` (`tokenize`) and run the CLIP text encoder; `tokens` = (ids, mask) of `tokenize`
    computed earlier (e.g. in DataLoader workers) skips the tokenizer.

    Pads to `tokenizer.model_max_length` (L) and truncates there, warning once per truncated
    prompt. The attention mask is passed to the encoder, so padding never influences the token
    states — unless `use_attention_mask=False`: then the padding tokens attend to each other, as in
    Stable Diffusion, whose UNet was trained on those states (CLIP is causal, so the states of the
    real tokens are the same either way). Gradients are not disabled: wrap in `torch.no_grad()` for
    a frozen encoder.

    `token_embeddings` appends the encoder's input embeddings (token + position, layer-normalised without
    parameters) to the states as L more tokens. A contrastively trained CLIP keeps in its output states only
    what telling captions apart in a batch needed — small CLIPs keep colour and shape but barely separate
    "left" from "right" (cosine 0.998 at that token) — while its input embeddings keep every word distinct.

    `layer` k takes the states after the encoder's k-th layer (layer-normalised without parameters) instead of
    the last layer's: a contrastive loss trains only the pooled (EOS) output, so the last layer's other states
    are never asked to carry anything, while earlier layers feed that EOS state (cf. Stable Diffusion 2's
    penultimate-layer text states).

    Returns:
        token_states: (B, L, D) `last_hidden_state`; (B, 2L, D) with `token_embeddings`.
        pooled: (B, P) `text_embeds` of a `CLIPTextModelWithProjection`, or (B, D)
            `pooler_output` of a plain `CLIPTextModel` — the state at the first EOS token.
        mask: (B, L) bool, True at real tokens (bos … eos); (B, 2L) with `token_embeddings`.
    """
    input_ids, mask = tokens if tokens is not None else tokenize(tokenizer, prompts, stacklevel=3)  # warn at the caller
    if device is None:
        device = next(text_encoder.parameters()).device
    input_ids, mask = input_ids.to(device), mask.to(device)
    out = text_encoder(input_ids=input_ids, attention_mask=mask.long() if use_attention_mask else None,
                       output_hidden_states=token_embeddings or layer is not None)
    pooled = getattr(out, "text_embeds", None)
    if pooled is None:
        pooled = out.pooler_output
    states = out.last_hidden_state
    if layer is not None:
        if not 1 <= layer < len(out.hidden_states):
            raise ValueError(f"layer={layer}: the text encoder has layers 1..{len(out.hidden_states) - 1}")
        states = F.layer_norm(out.hidden_states[layer], states.shape[-1:])
    if token_embeddings:
        embedded = F.layer_norm(out.hidden_states[0], states.shape[-1:])  # (B, L, D)
        states, mask = torch.cat([states, embedded], dim=1), torch.cat([mask, mask], dim=1)  # (B, 2L, D)
    return states, pooled, mask


def clip_image_preprocess(images: torch.Tensor, image_size: int,
                          mean: Sequence[float] = OPENAI_CLIP_MEAN,
                          std: Sequence[float] = OPENAI_CLIP_STD, check_range: bool = True) -> torch.Tensor:
    """CLIP's image preprocessing in torch: (B, 3, H, W) in [0, 1] → (B, 3, S, S) normalised.

    Resizes the short side to `image_size` (bicubic, antialiased, clamped back to [0, 1]),
    centre-crops the long side, then normalises with `mean` / `std` per channel. Images in
    [-1, 1] (VAE / diffusion range) must be mapped with `(x + 1) / 2` first.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {images.dtype}")
    lo, hi = (images.amin().item(), images.amax().item()) if check_range else (0.0, 1.0)  # .item() syncs a GPU
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"expected images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                         "map [-1, 1] images with (x + 1) / 2")
    h, w = images.shape[-2:]
    if (h, w) != (image_size, image_size):
        scale = image_size / min(h, w)
        new_h, new_w = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True)
        images = images.clamp(0, 1)  # bicubic overshoots at edges
        top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
        images = images[:, :, top: top + image_size, left: left + image_size]
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


def encode_image(image_encoder: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """CLIP image embeddings (B, P): `image_embeds` of a `CLIPVisionModelWithProjection`.

    `pixel_values` come from `clip_image_preprocess`; they are moved to the encoder's device and
    dtype. A plain `CLIPVisionModel` gives its (B, D) `pooler_output` instead.
    """
    param = next(image_encoder.parameters())
    out = image_encoder(pixel_values=pixel_values.to(device=param.device, dtype=param.dtype))
    embeds = getattr(out, "image_embeds", None)
    return out.pooler_output if embeds is None else embeds
