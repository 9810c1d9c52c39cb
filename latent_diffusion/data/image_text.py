"""Your own captioned images, from any Hugging Face `datasets` source.

Sources: an `imagefolder` (images plus `metadata.jsonl` / `metadata.csv` with a `file_name` column and a
caption column), a local parquet / csv / json / arrow file or folder of those, a folder written by
`Dataset.save_to_disk`, or a Hub dataset name (online only).

Items are ``{"pixel_values": FloatTensor (3, S, S) in [-1, 1], "caption": str}``, so torch's default collate gives
``{"pixel_values": (B, 3, S, S), "caption": list[str]}``.

Images are decoded here, not by `datasets` (the image column is cast to ``Image(decode=False)``), so a corrupt,
truncated or missing file is caught: it is logged once, counted in ``dataset.skipped``, and the next readable item
(index + 1, wrapping) is returned in its place. Every random choice (caption, crop, flip) comes from
``np.random.default_rng([seed, index, epoch])``, so an item is a pure function of (seed, index, epoch).
"""

from __future__ import annotations

import ctypes
import io
import logging
import multiprocessing.context
import multiprocessing.sharedctypes
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

logger = logging.getLogger("latent_diffusion.data")

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SOURCE_DIR = "__source_dir"  # per row: the folder of the data file that listed it (data files in several folders)
# File extension -> `datasets` packaged builder.
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


# ----------------------------------------------------------------------------------------------------------------------
# Image processing (pure functions, shared with anything else that turns files into training tensors)


def open_image(item: dict[str, Any], base_dirs: Sequence[Path] = ()) -> Image.Image:
    """Decode one undecoded `datasets` image cell ``{"bytes": ..., "path": ...}``; raise on any problem.

    A relative path is looked up under each of `base_dirs` in turn (the folders of the data files that may have
    listed it, then the folder the data was given as) and only then as given, under the current directory.
    EXIF orientation is applied, so phone photos come out upright.
    """
    if item.get("bytes"):
        image = Image.open(io.BytesIO(item["bytes"]))
    elif item.get("path"):
        path = Path(item["path"])
        if not path.is_absolute():
            path = next((base / path for base in base_dirs if (base / path).is_file()), path)
        image = Image.open(path)
    else:
        raise ValueError("image cell has neither bytes nor a path")
    image.load()  # decode now: truncated files fail here, inside the caller's try
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on white, the background of all
    the project's data. 16-bit greyscale (``I;16*``, and ``I``, read as 16-bit since that is how Pillow opens
    16-bit PNGs and TIFFs) is scaled by 255/65535 - Pillow's own ``convert`` clips it to 255 instead, turning most
    images white. Float images (``F``) are taken to be in [0, 255].
    """
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        array = np.asarray(image).astype(np.float64)
        if image.mode != "F":
            array = array / 257.0  # 65535 / 255
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, RGB


def resize_and_crop(image: Image.Image, size: int, offset: tuple[float, float] | None = None) -> Image.Image:
    """Resize the short side to `size` (bicubic, antialiased on downscale) and crop a `size`² square.

    `offset` = (u, v) in [0, 1) picks the crop position along each axis (a random crop); None crops the centre.
    """
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if offset is None:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    else:
        left = min(int(offset[0] * (new_w - size + 1)), new_w - size)
        top = min(int(offset[1] * (new_h - size + 1)), new_h - size)
    return image.crop((left, top, left + size, top + size))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> FloatTensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most|wards?)?\b)", re.IGNORECASE)


def _has_text(value: Any) -> bool:
    """A caption cell holds text: a non-blank string, or a list with one."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(v is not None and str(v).strip() for v in values)


def _count_blank(data: Any, column: str) -> int:
    """Rows of a `datasets.Dataset` whose caption is null, missing or blank; string columns are counted in Arrow
    (a million rows in hundredths of a second), other types row by row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cells = data.select_columns([column]).data.column(column)
    plain = getattr(data, "_indices", None) is None  # (after select/shuffle the table holds other rows too)
    if plain and (pa.types.is_string(cells.type) or pa.types.is_large_string(cells.type)):
        lengths = pc.fill_null(pc.utf8_length(pc.utf8_trim_whitespace(cells)), 0)
        return int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
    return sum(not _has_text(v) for v in data.select_columns([column])[column])


def swap_left_right(caption: str) -> str:
    """Swap the words "left" <-> "right" (also in leftmost, rightward(s), left-hand), keeping their case.

    Applied to the caption of a horizontally flipped image so "a cat on the left" stays true. The swap is lexical:
    "right" meaning "correct" is swapped too, which is why flipping is off by default.
    """

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, caption)


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def _has_metadata(folder: Path) -> bool:
    return any(next(folder.rglob(name), None) is not None for name in (*METADATA_FILES, "metadata.parquet"))


def _metadata_on_top(folder: Path) -> bool:
    """A metadata file in `folder` or one of its direct subfolders (split folders: train/, test/), where an
    imagefolder keeps it; one deeper down (a script's, a tool's) does not make the folder an imagefolder."""
    folders = [folder, *(child for child in folder.iterdir() if child.is_dir())]
    return any((f / name).is_file() for f in folders for name in (*METADATA_FILES, "metadata.parquet"))


def _load_data_files(builder: str, files: list[str], cache_dir: str | None) -> tuple[Any, tuple[Path, ...]]:
    """(`datasets.load_dataset(builder, data_files=files)`, the files' folder when they share one, else ()).
    When the files sit in several folders, each row gets its file's folder instead (column SOURCE_DIR): relative
    image paths resolve against the folder of the file that lists them."""
    import datasets

    groups: dict[str, list[str]] = {}
    for file in files:
        groups.setdefault(str(Path(file).parent.resolve()), []).append(file)
    if len(groups) == 1:
        return datasets.load_dataset(builder, data_files=files, cache_dir=cache_dir), (Path(next(iter(groups))),)
    parts: dict[str, list[Any]] = {}
    for folder, group in groups.items():
        for split, rows in datasets.load_dataset(builder, data_files=group, cache_dir=cache_dir).items():
            parts.setdefault(split, []).append(rows.add_column(SOURCE_DIR, [folder] * len(rows)))
    return datasets.DatasetDict({split: datasets.concatenate_datasets(p) for split, p in parts.items()}), ()


def _local_builder(path: Path) -> tuple[str, Any]:
    """(builder, data_files or path) for a local file or folder given as `dataset_name`."""
    if path.is_file():
        builder = BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"cannot read {path}: expected one of {sorted(BUILDERS)} or a folder")
        return builder, str(path)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "save_to_disk", str(path)
    if _metadata_on_top(path):  # an imagefolder, even beside stray data files (EXIF or editor sidecars)
        return "imagefolder", str(path)
    files = [p for p in sorted(path.rglob("*")) if p.suffix.lower() in BUILDERS and not p.name.startswith("metadata.")]
    builders = {BUILDERS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise ValueError(f"{path} mixes data file formats {sorted(builders)}; keep one format per folder")
    if builders:
        return builders.pop(), [str(p) for p in files]
    return "imagefolder", str(path)  # images (+ metadata.jsonl / metadata.csv)


def _load_imagefolder(folder: Path, cache_dir: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir)
    except FileNotFoundError as error:
        # `imagefolder` refuses the whole folder when the metadata lists a file that is not there. Missing files
        # should be skipped like unreadable ones, so read a root metadata file directly and keep its paths.
        metadata = [folder / name for name in METADATA_FILES if (folder / name).exists()]
        if not metadata:
            raise
        logger.warning("%s lists files that do not exist (%s); they will be skipped", metadata[0], error)
        builder = "json" if metadata[0].suffix == ".jsonl" else "csv"
        rows = datasets.load_dataset(builder, data_files=str(metadata[0]), split="train", cache_dir=cache_dir)
        if "file_name" not in rows.column_names:
            raise ValueError(f"{metadata[0]} has no 'file_name' column") from error
        paths = [str(folder.resolve() / name) for name in rows["file_name"]]
        return datasets.DatasetDict({"train": rows.remove_columns("file_name").add_column("image", paths)})


def load_source(
    dataset_name: str | None, train_data_dir: str | None, cache_dir: str | None = None
) -> tuple[Any, tuple[Path, ...], Path | None]:
    """Load a `datasets.DatasetDict`; return (dataset dict, folders to resolve relative image paths against, in
    order, imagefolder root)."""
    import datasets
    from pyarrow import ArrowInvalid

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("give exactly one of dataset_name (a Hub name or local data file) and train_data_dir")
    try:
        if train_data_dir is not None:
            folder = Path(train_data_dir).expanduser()
            if not folder.is_dir():
                hint = " (a data file is given as the dataset name: --dataset-name FILE)" if folder.is_file() else ""
                raise FileNotFoundError(f"train_data_dir {str(folder)!r} is not a folder{hint}")
            return _load_imagefolder(folder, cache_dir), (folder,), folder

        path = Path(dataset_name).expanduser()
        if path.exists():
            builder, files = _local_builder(path)
            given = path if path.is_dir() else path.parent
            if builder == "imagefolder":
                return _load_imagefolder(path, cache_dir), (path,), path
            if builder == "save_to_disk":
                loaded = datasets.load_from_disk(files)
                if isinstance(loaded, datasets.Dataset):
                    loaded = datasets.DatasetDict({"train": loaded})
                return loaded, (given,), None
            # relative image paths are relative to the data file that lists them, then to the folder given
            loaded, folders = _load_data_files(builder, [files] if isinstance(files, str) else files, cache_dir)
            return loaded, tuple(dict.fromkeys([*folders, given.resolve()])), None
        if dataset_name.startswith((".", "/", "~")) or path.suffix.lower() in BUILDERS:
            raise FileNotFoundError(f"dataset file {dataset_name!r} does not exist")
        try:
            return datasets.load_dataset(dataset_name, cache_dir=cache_dir), (), None
        except ConnectionError as error:
            if not datasets.config.HF_HUB_OFFLINE:
                raise
            raise ConnectionError(
                f"dataset {dataset_name!r} is not a local path and is not available offline (HF_HUB_OFFLINE / "
                "HF_DATASETS_OFFLINE is set and it is not in the cache): pass a local folder or file, or go online"
            ) from error
    except ArrowInvalid as error:
        hint = ""
        if "changed from" in str(error):
            hint = " (a column mixes single values and lists: write every caption as a list, or every one as a string)"
        raise ValueError(f"cannot read the metadata/data file: {error}{hint}") from error


# ----------------------------------------------------------------------------------------------------------------------
# The dataset


class ImageTextDataset(torch.utils.data.Dataset):
    """Captioned images from a local imagefolder / data file or a Hub dataset, as ``{"pixel_values", "caption"}``.

    A list in the caption column means several captions per image: one is picked per access. ``random_flip``
    mirrors half the images and swaps "left" <-> "right" in their captions (see `swap_left_right`). Call
    ``set_epoch(e)`` each epoch to draw fresh captions, crops and flips; without it they repeat every epoch.

    ``skipped`` counts the distinct unreadable images met so far by this process and its DataLoader workers (their
    finds are flagged in shared memory); ``log_summary()`` logs it in one line.
    """

    def __init__(
        self,
        *,
        dataset_name: str | None = None,
        train_data_dir: str | None = None,
        image_column: str = "image",
        caption_column: str = "text",
        image_size: int = 64,
        random_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        split: str = "train",
        cache_dir: str | None = None,
    ) -> None:
        from datasets import Image as ImageFeature

        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        splits, self._base_dirs, imagefolder = load_source(dataset_name, train_data_dir, cache_dir)
        if split not in splits:
            raise ValueError(f"split {split!r} not found; splits: {list(splits)}")
        data = splits[split]
        columns = data.column_names
        if image_column == caption_column:
            raise ValueError(f"the image and caption columns are both {image_column!r}; name the caption column "
                             f"(columns: {columns})")
        if image_column not in columns:
            raise ValueError(f"image column {image_column!r} not found; columns: {columns}")
        if caption_column not in columns:
            if imagefolder is not None and not _has_metadata(imagefolder):
                raise ValueError(
                    f"{imagefolder} has images but no captions: add a metadata.jsonl (or metadata.csv) beside the "
                    f"images with a 'file_name' column and a {caption_column!r} column, e.g. "
                    f'{{"file_name": "0001.png", "{caption_column}": "a red apple"}}'
                )
            raise ValueError(f"caption column {caption_column!r} not found; columns: {columns}")
        try:
            data = data.select_columns([image_column, caption_column, *[SOURCE_DIR] * (SOURCE_DIR in columns)])
            data = data.cast_column(image_column, ImageFeature(decode=False))
        except (TypeError, ValueError) as error:
            feature = data.features[image_column]
            raise ValueError(f"column {image_column!r} does not hold images ({feature}); columns: {columns}") from error

        self._data = data
        self.image_column, self.caption_column = image_column, caption_column
        blank = _count_blank(data, caption_column)
        if blank:  # they train as unconditional samples, like text dropout: say so rather than silently
            logger.warning("image-text data: %d of %d images have no caption (null, missing or blank); they train "
                           "with the empty caption", blank, len(data))
        self.image_size, self.random_crop, self.random_flip = image_size, random_crop, random_flip
        self.seed, self.epoch = seed, 0
        # One flag per item in shared memory, so DataLoader workers' finds reach the main process's `skipped`
        self._bad = multiprocessing.sharedctypes.RawArray("b", len(data))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:  # pickle / deepcopy, not a DataLoader worker's
            state["_bad"] = bytes(self._bad)  # start: a snapshot of the flags (shared memory cannot be pickled)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_bad"], bytes):
            flags = multiprocessing.sharedctypes.RawArray("b", len(state["_bad"]))
            ctypes.memmove(flags, state["_bad"], len(state["_bad"]))
            state["_bad"] = flags
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def several_captions(self) -> bool:
        """True when the caption column holds lists (several captions per image, one drawn per access)."""
        from datasets import Value

        return not isinstance(self._data.features[self.caption_column], Value)

    @property
    def skipped(self) -> int:
        """Distinct unreadable images met so far by this process and its DataLoader workers."""
        return int(np.frombuffer(self._bad, dtype=np.int8).sum())

    def set_epoch(self, epoch: int) -> None:
        """Make captions, crops and flips a function of (seed, index, epoch)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            row = self._data[i]
            try:
                bases = (Path(row[SOURCE_DIR]), *self._base_dirs) if SOURCE_DIR in row else self._base_dirs
                image = to_rgb(open_image(row[self.image_column], bases))
            except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError, zlib.error, ...
                self._bad[i] = 1
                cell = row[self.image_column]
                where = cell.get("path") or f"item {i} (bytes)"
                logger.warning("skipping unreadable image %s: %s: %s", where, type(error).__name__, error)
                continue
            return self._process(i, image, row[self.caption_column])
        raise ValueError(f"none of the {n} images can be read (see the warnings from 'latent_diffusion.data'): "
                         "check the image paths and the image column")

    def _process(self, index: int, image: Image.Image, captions: Any) -> dict[str, Any]:
        # Four draws in a fixed order, whatever is switched on, so one option never shifts another's randomness.
        pick, crop_x, crop_y, flip = np.random.default_rng([self.seed, index, self.epoch]).random(4)
        if isinstance(captions, (list, tuple)):
            captions = [c for c in captions if c is not None and str(c).strip()]
            caption = str(captions[int(pick * len(captions))]) if captions else ""
        else:
            caption = "" if captions is None else str(captions)
        image = resize_and_crop(image, self.image_size, (crop_x, crop_y) if self.random_crop else None)
        if self.random_flip and flip < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            caption = swap_left_right(caption)
        return {"pixel_values": image_to_tensor(image), "caption": caption}

    def captions(self) -> list[str]:
        """Every caption (lists flattened, empty ones dropped), without decoding any image: tokenizer training."""
        out: list[str] = []
        for value in self._data.select_columns([self.caption_column])[self.caption_column]:
            values = value if isinstance(value, (list, tuple)) else [value]
            out.extend(str(v) for v in values if v is not None and str(v).strip())
        return out

    def log_summary(self) -> None:
        """One log line: how many images were skipped as unreadable."""
        level = logging.WARNING if self.skipped else logging.INFO
        logger.log(level, "image-text data: %d of %d images skipped as unreadable", self.skipped, len(self))
