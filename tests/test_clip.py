"""Tests for latent_diffusion.models.clip: tokenizer training, presets, encoding, model split."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPModel,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPTokenizerFast,
    CLIPVisionModelWithProjection,
)

from latent_diffusion.models.clip import (  # noqa: E402
    BOS_TOKEN,
    CLIP_PRESETS,
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    bytes_to_unicode,
    clip_backend_tokenizer,
    clip_config,
    clip_image_preprocess,
    clip_text_config,
    clip_vision_config,
    encode_image,
    encode_text,
    split_clip_model,
    tokenize,
    train_clip_tokenizer,
)

COLOURS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "black"]
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"]
SIZES = ["small", "medium", "large"]
POSITIONS = ["in the top left", "at the top", "on the left", "in the center", "on the right", "at the bottom"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]


def shapes_captions(n: int = 50) -> list[str]:
    """Deterministic shapes-like captions."""
    captions = ["a small red circle on the left", "a blue square above a green star"]
    for i in range(n - len(captions)):
        c1, s1 = COLOURS[i % 8], SHAPES[i % 6]
        c2, s2 = COLOURS[(3 * i + 1) % 8], SHAPES[(5 * i + 2) % 6]
        size = SIZES[(i // 3) % 3]
        if i % 3 == 0:
            captions.append(f"a {size} {c1} {s1} {POSITIONS[i % 6]}")
        elif i % 3 == 1:
            captions.append(f"a {c1} {s1} {RELATIONS[i % 4]} a {c2} {s2}")
        else:
            captions.append(f"a {c1} {s1} {POSITIONS[i % 6]} and a {size} {c2} {s2}")
    return captions


CAPTIONS = shapes_captions()


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


def features(out) -> torch.Tensor:
    """`get_*_features` returns a tensor in transformers 4, a ModelOutput in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_clip_tokenizer(CAPTIONS, out, vocab_size=1024, model_max_length=77)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def test_tokenizer_files_follow_clip_layout(tokenizer_dir, tok):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    merges = [tuple(line.split(" ")) for line in lines[1:]]
    assert merges and all(len(m) == 2 for m in merges)

    tokens = sorted(vocab, key=vocab.get)
    assert sorted(vocab.values()) == list(range(len(vocab)))
    byte_chars = list(bytes_to_unicode().values())
    assert tokens[:256] == byte_chars
    assert tokens[256:512] == [c + "</w>" for c in byte_chars]
    assert tokens[-2:] == [BOS_TOKEN, EOS_TOKEN]
    # Merge results follow in merge order.
    results = list(dict.fromkeys(a + b for a, b in merges))
    assert tokens[512:-2] == results
    assert len(tok) == len(vocab) <= 1024
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (len(vocab) - 2, len(vocab) - 1,
                                                                       len(vocab) - 1)
    assert tok.pad_token == tok.eos_token == EOS_TOKEN and tok.bos_token == BOS_TOKEN
    assert tok.model_max_length == 77


def test_tokenizer_loads_everywhere_and_matches_backend(tokenizer_dir, tok, tmp_path):
    # Only the CLIP pair (no tokenizer.json): transformers rebuilds the tokenizer from it.
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in (tokenizer_dir / "merges.txt").read_text().splitlines()[1:]]
    backend = clip_backend_tokenizer(vocab, merges)
    loaded = [CLIPTokenizerFast.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(tokenizer_dir),
              CLIPTokenizer.from_pretrained(tmp_path)]
    texts = [*CAPTIONS, "A  Red CIRCLE,\tleft!! 123 café ☃ don't", "<|endoftext|> stars"]
    for text in texts:
        expected = backend.encode(text).ids
        assert tok(text).input_ids == expected, text
        for other in loaded:
            assert other(text).input_ids == expected, (type(other), text)


def test_round_trip_and_unseen_characters(tok):
    for caption in [*CAPTIONS, "  A Small RED circle   on the LEFT "]:
        ids = tok(caption).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == normalised(caption)
    unseen = "a ☃ snowman near the château ü"  # characters never seen in training: byte fallback
    ids = tok(unseen).input_ids
    assert tok.eos_token_id not in ids[1:-1]  # no unknown (= eos) tokens
    assert tok.decode(ids, skip_special_tokens=True) == unseen


def test_frequent_words_are_single_tokens(tok):
    for word in ["a", "circle", "square", "red", "green", "left", "above"]:
        assert tok.tokenize(word) == [word + "</w>"]


def test_vocab_size_caps_merges(tmp_path):
    small = train_clip_tokenizer(CAPTIONS, tmp_path, vocab_size=MIN_VOCAB_SIZE + 8)
    assert len(small) == MIN_VOCAB_SIZE + 8
    assert len(small.tokenize("triangle")) > 1  # too few merges to make every word one token
    assert small.decode(small("a purple triangle").input_ids, skip_special_tokens=True) == "a purple triangle"
    with pytest.raises(ValueError, match="vocab_size"):
        train_clip_tokenizer(CAPTIONS, tmp_path / "bad", vocab_size=MIN_VOCAB_SIZE - 1)


def test_training_is_deterministic(tokenizer_dir, tmp_path):
    # Reversed order: the merges depend only on word counts, never on order or hash seeds.
    train_clip_tokenizer(list(reversed(CAPTIONS)), tmp_path, vocab_size=1024)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (tokenizer_dir / name).read_bytes()


def test_text_config_pools_at_eos(tok):
    config = clip_text_config("tiny", tok)
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    model = CLIPTextModel(config).eval()
    batch = tok(["a red circle", "a small blue square above a green star"], padding="max_length",
                return_tensors="pt")
    eos_index = (batch.input_ids == tok.eos_token_id).int().argmax(-1)
    assert eos_index.tolist() == [4, 9]  # bos + words + eos, then padding
    with torch.no_grad():
        out = model(**batch)
    expected = out.last_hidden_state[torch.arange(2), eos_index]
    torch.testing.assert_close(out.pooler_output, expected)
    assert not torch.allclose(out.pooler_output, out.last_hidden_state[:, 0])


def test_presets_and_errors(tok):
    assert {"tiny", "small"} <= set(CLIP_PRESETS)
    config = clip_config("small", tok)
    assert config.vision_config.image_size == 64 and config.vision_config.patch_size == 8
    assert config.projection_dim == config.text_config.projection_dim == config.vision_config.projection_dim
    assert config.text_config.vocab_size == len(tok)
    assert clip_vision_config("tiny", image_size=64).image_size == 64
    with pytest.raises(ValueError, match="tiny"):
        clip_vision_config("huge")
    with pytest.raises(ValueError, match="patch_size"):
        clip_vision_config("tiny", image_size=30)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        clip_text_config("tiny", tok, max_position_embeddings=16)


def test_split_clip_model_matches_clip_features(tok):
    torch.manual_seed(0)
    clip = CLIPModel(clip_config("tiny", tok)).eval()
    text, vision = split_clip_model(clip)
    assert isinstance(text, CLIPTextModelWithProjection) and isinstance(vision, CLIPVisionModelWithProjection)
    assert not text.training and not vision.training
    prompts = ["a red circle", "a blue square above a green star"]
    batch = tok(prompts, padding="max_length", return_tensors="pt")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        text_embeds = text(**batch).text_embeds
        image_embeds = vision(pixel_values=images).image_embeds
        torch.testing.assert_close(text_embeds, features(clip.get_text_features(**batch)))
        torch.testing.assert_close(image_embeds, features(clip.get_image_features(pixel_values=images)))
        # Copies, not shared storage: editing a tower leaves the CLIPModel alone.
        text.text_projection.weight.zero_()
        assert clip.text_projection.weight.abs().sum() > 0


def test_encode_text_shapes_mask_and_truncation(tokenizer_dir):
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=12)
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(clip_text_config("tiny", tok)).eval()
    short, long = "a red circle", "a small red circle on the left and a large blue square in the center"
    with pytest.warns(UserWarning, match=r"a small red circle.*limit of 12"):
        states, pooled, mask = encode_text(tok, model, [short, long])
    assert states.shape == (2, 12, 32) and pooled.shape == (2, 32)
    assert mask.dtype == torch.bool and mask.shape == (2, 12)
    assert mask[0].sum().item() == len(tok(short).input_ids) == 5 and mask[1].all()
    # Truncation keeps the EOS token last, so the pooled embedding reads position 11.
    with torch.no_grad():
        torch.testing.assert_close(pooled[1], model.text_projection(states[1, 11]))
        torch.testing.assert_close(pooled[0], model.text_projection(states[0, 4]))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_text(tok, model, [short])
    plain = CLIPTextModel(clip_text_config("tiny", tok)).eval()
    _, pooled_plain, _ = encode_text(tok, plain, [short, short], device="cpu")
    assert pooled_plain.shape == (2, 32)
    with pytest.raises(TypeError):
        encode_text(tok, model, short)


def test_tokenize_matches_the_tokenizers_padding_and_truncation_and_collates_in_workers(tokenizer_dir):
    from torch.utils.data import DataLoader

    from latent_diffusion.data.shapes import ShapesDataset
    from training.common import TokenizingCollate

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=12)
    prompts = ["a red circle", "a small red circle on the left and a large blue square in the center", ""]
    with pytest.warns(UserWarning, match="limit of 12"):
        ids, mask = tokenize(tok, prompts)
    ref = tok(prompts, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask.bool())
    assert ids[1, -1].item() == tok.eos_token_id  # truncation keeps the end-of-text token

    data = ShapesDataset(8, seed=0)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=TokenizingCollate(tok))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = next(iter(loader))
        expected = tokenize(tok, [data[i]["caption"] for i in range(4)])
    assert torch.equal(batch["input_ids"], expected[0]) and torch.equal(batch["attention_mask"], expected[1])
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and list(batch["caption"]) == [data[i]["caption"]
                                                                                          for i in range(4)]


def test_encode_text_can_read_an_earlier_layer(tokenizer_dir):
    """`layer=k`: the states after the k-th encoder layer, layer-normalised without parameters (the pooled
    embedding is still the last layer's); with the token embeddings appended after them; bad k is named."""
    import torch.nn.functional as F

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=12)
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(clip_text_config("tiny", tok)).eval()
    prompts = ["a red circle above a blue square"]
    with torch.no_grad():
        last, pooled, _ = encode_text(tok, model, prompts)
        first, pooled_1, mask = encode_text(tok, model, prompts, layer=1, token_embeddings=True)
        ids = tok(prompts, padding="max_length", max_length=12, return_tensors="pt")
        hidden = model(**ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(first[:, :12], F.layer_norm(hidden[1], (32,)))
    torch.testing.assert_close(first[:, 12:], F.layer_norm(hidden[0], (32,)))
    torch.testing.assert_close(pooled_1, pooled)
    assert mask.shape == (1, 24) and (first[:, :12] - last).abs().max() > 0.1
    layers = model.config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"layer={layers + 1}: the text encoder has layers 1..{layers}"):
        encode_text(tok, model, prompts, layer=layers + 1)


def test_clip_image_preprocess():
    images = torch.rand(2, 3, 48, 64)
    out = clip_image_preprocess(images, 32)
    assert out.shape == (2, 3, 32, 32)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    assert (out >= -mean / std - 1e-5).all() and (out <= (1 - mean) / std + 1e-5).all()

    # Centre crop: the long side loses equal margins, so only the grey middle survives.
    wide = torch.full((1, 3, 48, 96), 0.5)
    wide[..., :24], wide[..., 72:] = 1.0, 0.0
    out = clip_image_preprocess(wide, 32)
    torch.testing.assert_close(out[..., 3:29], ((0.5 - mean) / std).expand(1, 3, 32, 26), atol=1e-3, rtol=0)

    same = torch.rand(1, 3, 32, 32)  # already the right size: normalisation only
    torch.testing.assert_close(clip_image_preprocess(same, 32), (same - mean) / std)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip_image_preprocess(same * 2 - 1, 32)
    with pytest.raises(ValueError, match="shape"):
        clip_image_preprocess(torch.rand(3, 32, 32), 32)


def test_encode_image_matches_image_embeds():
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(clip_vision_config("tiny")).eval()
    pixel_values = clip_image_preprocess(torch.rand(2, 3, 40, 40), vision.config.image_size)
    with torch.no_grad():
        embeds = encode_image(vision, pixel_values)
        assert embeds.shape == (2, 32)
        torch.testing.assert_close(embeds, vision(pixel_values=pixel_values).image_embeds)
