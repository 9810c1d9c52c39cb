"""Noto Color Emoji rendered as captioned images: the optional, realistic built-in data.

Every fully-qualified emoji the `emoji` package knows (about 1,900; about 3,900 with skin tones) is drawn with
Pillow from the Noto Color Emoji bitmap font, cropped to its content, padded to a square on white and resized to
``image_size``. Captions are the package's English names: ":red_apple:" -> "red apple", flags -> "flag of Japan".
Emoji the installed font has no glyph for (newer than the font) are dropped.

Needs ``apt-get install fonts-noto-color-emoji`` and ``pip install emoji``. Items are
``{"pixel_values": FloatTensor (3, S, S) in [-1, 1], "caption": str}``, like every dataset of the project.
Emoji are not flipped: arrows and text in them have a direction.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features

logger = logging.getLogger("latent_diffusion.data")

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_INSTALL = "apt-get install fonts-noto-color-emoji"
FONT_SIZE = 109  # the only size of the colour bitmap (CBDT) strikes in Noto Color Emoji
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_ZWJ, _KEYCAP = "\u200d", "\u20e3"


def _is_regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF


def _is_tag(ch: str) -> bool:
    return 0xE0020 <= ord(ch) <= 0xE007F


def emoji_caption(name: str, sequence: str) -> str:
    """The caption for an emoji from its package name: ":red_apple:" -> "red apple"; country flags get "flag of"."""
    caption = name.strip(":").replace("_", " ")
    if all(_is_regional(ch) for ch in sequence) or any(_is_tag(ch) for ch in sequence):
        caption = f"flag of {caption}"
    return caption


def list_emoji(skin_tones: bool = False) -> list[tuple[str, str]]:
    """(sequence, caption) of every fully-qualified emoji, skin-tone variants only if asked; sorted by code points."""
    try:
        import emoji
    except ImportError as error:
        raise ImportError("the emoji dataset needs the 'emoji' package: pip install emoji") from error
    fully_qualified = emoji.STATUS["fully_qualified"]
    out = []
    for sequence, data in emoji.EMOJI_DATA.items():
        if data["status"] != fully_qualified or (not skin_tones and _SKIN_TONES.intersection(sequence)):
            continue
        out.append((sequence, emoji_caption(data["en"], sequence)))
    return sorted(out)


def _needs_shaping(sequence: str) -> bool:
    """Sequences that only become one glyph through OpenType shaping (Raqm): ZWJ, flags, keycaps, tags, tones."""
    return any(ch in (_ZWJ, _KEYCAP) or _is_regional(ch) or _is_tag(ch) or ch in _SKIN_TONES for ch in sequence)


def render_emoji(
    sequence: str, font: ImageFont.FreeTypeFont, image_size: int, padding: float = 0.1
) -> Image.Image | None:
    """Draw one emoji: crop to its non-transparent pixels, pad to a square on white, resize to `image_size`.

    `padding` is the white margin on each side as a fraction of the emoji's longer side. None if nothing is drawn.
    """
    left, top, right, bottom = font.getbbox(sequence)
    margin = int(font.size) // 2  # generous: bitmap-glyph boxes can be off by a few pixels; the alpha crop trims it
    canvas = Image.new("RGBA", (right - left + 2 * margin, bottom - top + 2 * margin), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((margin - left, margin - top), sequence, font=font, fill=(0, 0, 0, 255), embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    content = canvas.crop(box)
    side = round(max(content.size) * (1 + 2 * padding))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(content, ((side - content.width) // 2, (side - content.height) // 2))
    return square.convert("RGB").resize((image_size, image_size), Image.Resampling.LANCZOS)


class EmojiDataset(torch.utils.data.Dataset):
    """Rendered Noto Color Emoji with their names as captions, as ``{"pixel_values", "caption"}``.

    All images are rendered once in ``__init__`` (a few seconds) and kept as uint8: ~12 KB each at 64×64.
    """

    def __init__(
        self,
        *,
        image_size: int = 64,
        skin_tones: bool = False,
        padding: float = 0.1,
        font_path: str | Path | None = None,
    ) -> None:
        path = Path(font_path) if font_path is not None else FONT_PATH
        if not path.exists():
            raise FileNotFoundError(f"Noto Color Emoji font not found at {path}; install it with: {FONT_INSTALL}")
        candidates = list_emoji(skin_tones)
        raqm = features.check("raqm")
        if not raqm:
            logger.warning("Pillow has no Raqm layout: emoji sequences (ZWJ, flags, keycaps, skin tones) are left out")
            candidates = [(s, c) for s, c in candidates if not _needs_shaping(s.replace("\ufe0f", ""))]
        layout = ImageFont.Layout.RAQM if raqm else ImageFont.Layout.BASIC
        font = ImageFont.truetype(str(path), FONT_SIZE, layout_engine=layout)

        # A code point the font cannot have (plane-16 private use) draws the font's "missing glyph"; drop look-alikes.
        missing = render_emoji("\U0010fffd", font, image_size, padding)
        missing_array = None if missing is None else np.asarray(missing)
        images, captions, sequences = [], [], []
        for sequence, caption in candidates:
            image = render_emoji(sequence, font, image_size, padding)
            if image is None:
                continue
            array = np.asarray(image)
            if missing_array is not None and np.array_equal(array, missing_array):
                continue
            images.append(array)
            captions.append(caption)
            sequences.append(sequence)
        if not images:
            raise RuntimeError(f"no emoji could be rendered with {path}")
        if len(images) < len(candidates):
            logger.info("emoji: %d of %d have no glyph in %s and are left out", len(candidates) - len(images),
                        len(candidates), path.name)
        self.images = np.stack(images)  # (N, S, S, 3) uint8
        self.sequences = sequences
        self._captions = captions

    def __len__(self) -> int:
        return len(self._captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = torch.from_numpy(self.images[index]).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, S, S)
        return {"pixel_values": pixels, "caption": self._captions[index]}

    def captions(self) -> list[str]:
        """Every caption, for tokenizer training."""
        return list(self._captions)
