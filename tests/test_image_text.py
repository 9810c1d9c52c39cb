"""Your-own-data loading (imagefolder / csv / parquet via `datasets`) and the emoji dataset's error paths."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFont  # noqa: E402

from latent_diffusion.data import emoji as emoji_data  # noqa: E402
from latent_diffusion.data.image_text import ImageTextDataset, swap_left_right, to_rgb  # noqa: E402

SIZE = 16
RED, BLUE = (220, 30, 30), (30, 70, 230)


def half_red_half_blue(width: int = 80, height: int = 48) -> Image.Image:
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(Image.new("RGB", (width // 2, height), RED), (0, 0))
    return image


def palette_image() -> Image.Image:
    image = Image.new("P", (24, 36), 1)
    image.putpalette([0, 0, 0, 30, 160, 50] + [0, 0, 0] * 254)
    return image


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A jsonl imagefolder (every mode + a corrupt file + a list-of-captions row), a csv one, one without metadata."""
    root = tmp_path_factory.mktemp("image-text")
    jsonl = root / "jsonl"
    jsonl.mkdir()
    half_red_half_blue().save(jsonl / "a_halves.png")
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(jsonl / "b_clear.png")  # fully transparent -> white
    Image.new("L", (30, 50), 0).save(jsonl / "c_black.png")
    palette_image().save(jsonl / "d_palette.png")
    (jsonl / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    Image.fromarray(np.full((40, 40), 128 * 257, dtype=np.uint16)).save(jsonl / "f_deep.png")  # I;16 mid-grey
    Image.new("LA", (20, 20), (0, 0)).save(jsonl / "g_clear_gray.png")
    rows = [
        ("a_halves.png", ["red on the left, blue on the right"]),
        ("b_clear.png", ["nothing", "an empty square", "a blank image"]),
        ("c_black.png", ["black"]),
        ("d_palette.png", ["green"]),
        ("e_corrupt.png", ["corrupt"]),
        ("f_deep.png", ["grey"]),
        ("g_clear_gray.png", ["transparent grey"]),
    ]
    (jsonl / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))

    csv_dir = root / "csv"
    csv_dir.mkdir()
    Image.new("RGB", (SIZE * 2, SIZE), RED).save(csv_dir / "red.jpg")
    Image.new("RGB", (SIZE, SIZE * 3), BLUE).save(csv_dir / "blue.png")
    with open(csv_dir / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], ["red.jpg", "a red, wide thing"], ["blue.png", "blue"]])

    bare = root / "bare"
    bare.mkdir()
    Image.new("RGB", (8, 8)).save(bare / "x.png")
    return {"jsonl": jsonl, "csv": csv_dir, "bare": bare, "cache": str(root / "hf-cache")}


def make(folders, name: str = "jsonl", **kwargs) -> ImageTextDataset:
    kwargs.setdefault("train_data_dir", str(folders[name]))
    return ImageTextDataset(image_size=SIZE, cache_dir=folders["cache"], **kwargs)


def by_caption(dataset: ImageTextDataset) -> dict[str, torch.Tensor]:
    return {item["caption"]: item["pixel_values"] for item in (dataset[i] for i in range(len(dataset)))}


def test_imagefolder_modes_shapes_and_values(folders):
    dataset = make(folders)
    assert len(dataset) == 7
    items = by_caption(dataset)
    for pixels in items.values():
        assert pixels.shape == (3, SIZE, SIZE) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(items["transparent grey"], torch.ones(3, SIZE, SIZE))  # LA composited on white
    assert torch.allclose(items["black"], -torch.ones(3, SIZE, SIZE))  # L -> RGB
    assert torch.allclose(items["green"][:, 0, 0], torch.tensor([30, 160, 50]) / 127.5 - 1)  # P -> RGB
    assert torch.allclose(items["grey"], torch.full((3, SIZE, SIZE), 128 / 127.5 - 1), atol=1e-6)  # I;16 scaled
    assert "corrupt" not in items


def test_corrupt_image_skipped_counted_and_replaced_by_next(folders, caplog):
    dataset = make(folders)
    paths = [dataset._data[i]["image"]["path"] for i in range(len(dataset))]
    bad = next(i for i, p in enumerate(paths) if p.endswith("e_corrupt.png"))
    with caplog.at_level(logging.WARNING, logger="latent_diffusion.data"):
        item = dataset[bad]
        again = dataset[bad]
    assert dataset.skipped == 1  # distinct bad files, however often they are met
    assert sum("e_corrupt.png" in r.getMessage() for r in caplog.records) == 1
    following = dataset[(bad + 1) % len(dataset)]
    assert item["caption"] == following["caption"] == again["caption"]
    assert torch.equal(item["pixel_values"], following["pixel_values"])
    with caplog.at_level(logging.INFO, logger="latent_diffusion.data"):
        dataset.log_summary()
    assert "1 of 7 images skipped" in caplog.records[-1].getMessage()


def test_metadata_listing_a_missing_file_is_not_fatal(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "here.png")
    lines = [{"file_name": "here.png", "text": "red"}, {"file_name": "gone.png", "text": "lost"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    dataset = ImageTextDataset(train_data_dir=str(tmp_path), image_size=SIZE, cache_dir=str(tmp_path / "cache"))
    assert [dataset[i]["caption"] for i in range(2)] == ["red", "red"]
    assert dataset.skipped == 1


def test_missing_captions_are_counted(tmp_path, caplog):
    """Null, absent and blank captions train as the empty caption: said once, with the count."""
    rows = [{"text": "red"}, {"text": None}, {}, {"text": "  "}, {"text": "a red square"}]
    for i, row in enumerate(rows):
        Image.new("RGB", (8, 8), RED).save(tmp_path / f"{i}.png")
        row["file_name"] = f"{i}.png"
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="latent_diffusion.data"):
        dataset = ImageTextDataset(train_data_dir=str(tmp_path), image_size=SIZE, cache_dir=str(tmp_path / "cache"))
    assert [r.getMessage() for r in caplog.records] == [
        "image-text data: 3 of 5 images have no caption (null, missing or blank); they train with the empty caption"]
    assert dataset[1]["caption"] == ""


def test_unreadable_images_met_by_dataloader_workers_are_counted(folders):
    """Workers flag bad items in shared memory: the main process's count includes them (fine-tuning reports it)."""
    dataset = make(folders)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=lambda batch: batch)
    assert sum(len(batch) for batch in loader) == len(dataset)
    assert dataset.skipped == 1
    copied = pickle.loads(pickle.dumps(dataset))  # a plain pickle (or deepcopy) keeps a snapshot of the flags
    assert copied.skipped == 1 and len(copied) == len(dataset)


def test_relative_paths_resolve_next_to_the_data_file(tmp_path, monkeypatch):
    """A path listed in a data file is relative to that file's folder, even when the current directory holds a
    file of the same name, and for data files in subfolders of the folder given."""
    sub = tmp_path / "data" / "sub"
    (sub / "pics").mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE), RED).save(sub / "pics" / "r.png")
    (sub / "table.csv").write_text("path,caption\npics/r.png,red\n")
    elsewhere = tmp_path / "cwd"
    (elsewhere / "pics").mkdir(parents=True)
    Image.new("RGB", (SIZE, SIZE), BLUE).save(elsewhere / "pics" / "r.png")
    monkeypatch.chdir(elsewhere)
    red = torch.full((SIZE, SIZE), RED[0] / 127.5 - 1)
    for source in (sub / "table.csv", tmp_path / "data"):
        dataset = ImageTextDataset(dataset_name=str(source), image_column="path", caption_column="caption",
                                   image_size=SIZE, cache_dir=str(tmp_path / "cache"))
        assert torch.allclose(dataset[0]["pixel_values"][0], red, atol=0.02), source
        assert dataset.skipped == 0


def test_data_files_in_several_folders_read_their_own_images(tmp_path):
    """part1/ and part2/ each list images/0.png: each row opens its own file's image. A metadata.csv deep below a
    folder of data files (a script's) does not turn it into an imagefolder."""
    for part, colour, text in (("part1", RED, "red"), ("part2", BLUE, "blue")):
        (tmp_path / "ds" / part / "images").mkdir(parents=True)
        Image.new("RGB", (SIZE, SIZE), colour).save(tmp_path / "ds" / part / "images" / "0.png")
        (tmp_path / "ds" / part / "data.jsonl").write_text(json.dumps({"image": "images/0.png", "text": text}) + "\n")
    (tmp_path / "ds" / "tools" / "scripts").mkdir(parents=True)
    (tmp_path / "ds" / "tools" / "scripts" / "metadata.csv").write_text("a,b\n1,2\n")
    dataset = ImageTextDataset(dataset_name=str(tmp_path / "ds"), image_size=SIZE, cache_dir=str(tmp_path / "cache"))
    items = by_caption(dataset)
    assert torch.allclose(items["red"][0], torch.full((SIZE, SIZE), RED[0] / 127.5 - 1), atol=0.02)
    assert torch.allclose(items["blue"][2], torch.full((SIZE, SIZE), BLUE[2] / 127.5 - 1), atol=0.02)
    assert dataset.skipped == 0


def test_imagefolder_with_a_stray_data_file_is_still_an_imagefolder(tmp_path):
    Image.new("RGB", (SIZE, SIZE), RED).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "red"}) + "\n")
    (tmp_path / "a.json").write_text(json.dumps({"exif": "sidecar"}))
    dataset = ImageTextDataset(dataset_name=str(tmp_path), image_size=SIZE, cache_dir=str(tmp_path / "cache"))
    assert dataset[0]["caption"] == "red"


def test_several_captions_per_image_are_reported(folders):
    """The jsonl folder gives a list of captions per image, the csv one a single caption."""
    assert make(folders).several_captions
    assert not make(folders, "csv", caption_column="caption").several_captions


def test_csv_metadata_and_caption_column(folders):
    dataset = make(folders, "csv", caption_column="caption", random_crop=True)
    assert sorted(dataset.captions()) == ["a red, wide thing", "blue"]
    items = by_caption(dataset)
    assert torch.allclose(items["a red, wide thing"][0], torch.full((SIZE, SIZE), RED[0] / 127.5 - 1), atol=0.05)
    assert torch.allclose(items["blue"][2], torch.full((SIZE, SIZE), BLUE[2] / 127.5 - 1), atol=0.02)


def test_parquet_with_image_bytes_and_relative_paths_in_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = []
    for colour in (RED, BLUE):
        buffer = io.BytesIO()
        Image.new("RGB", (20, 30), colour).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    table = pa.table({"png": blobs, "caption": ["red", "blue"], "extra": [1, 2]})
    pq.write_table(table, tmp_path / "data.parquet")
    dataset = ImageTextDataset(dataset_name=str(tmp_path / "data.parquet"), image_column="png",
                               caption_column="caption", image_size=SIZE, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 2
    assert torch.allclose(dataset[1]["pixel_values"][2], torch.full((SIZE, SIZE), BLUE[2] / 127.5 - 1))

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (SIZE, SIZE), RED).save(tmp_path / "pics" / "r.png")
    (tmp_path / "table.csv").write_text("path,caption\npics/r.png,red square\n")
    dataset = ImageTextDataset(dataset_name=str(tmp_path / "table.csv"), image_column="path", caption_column="caption",
                               image_size=SIZE, cache_dir=str(tmp_path / "cache"))
    assert dataset[0]["caption"] == "red square" and dataset.skipped == 0


def test_column_errors_list_the_columns(folders):
    with pytest.raises(ValueError, match=r"caption column 'text' not found; columns: \['image', 'caption'\]"):
        make(folders, "csv")
    with pytest.raises(ValueError, match=r"image column 'img' not found; columns: \['image', 'caption'\]"):
        make(folders, "csv", image_column="img", caption_column="caption")
    with pytest.raises(ValueError, match=r"split 'test' not found; splits: \['train'\]"):
        make(folders, "csv", caption_column="caption", split="test")
    with pytest.raises(ValueError, match=r"the image and caption columns are both 'image'"):
        make(folders, "csv", caption_column="image")


def test_images_without_metadata_name_the_metadata_file(folders):
    with pytest.raises(ValueError, match=r"no captions: add a metadata\.jsonl \(or metadata\.csv\).*'file_name'"):
        make(folders, "bare")


def test_bad_sources(folders, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        ImageTextDataset()
    with pytest.raises(ValueError, match="exactly one"):
        ImageTextDataset(dataset_name="x", train_data_dir=str(folders["csv"]))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ImageTextDataset(train_data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConnectionError, match="not available offline"):
        ImageTextDataset(dataset_name="someone/surely-not-a-local-dataset", cache_dir=folders["cache"])
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "one"}\n'
                                             '{"file_name": "b.png", "text": ["two", "three"]}\n')
    with pytest.raises(ValueError, match="write every caption as a list"):
        ImageTextDataset(train_data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_swap_left_right():
    assert swap_left_right("a circle on the left, a Right arrow, LEFT") == "a circle on the right, a Left arrow, RIGHT"
    assert swap_left_right("the leftmost star faces rightwards, left-hand") == (
        "the rightmost star faces leftwards, right-hand"
    )
    assert swap_left_right("bright lefty copyright") == "bright lefty copyright"


def test_flip_swaps_left_and_right_in_the_caption(folders):
    dataset = make(folders, random_flip=True, seed=3)
    index = next(i for i in range(len(dataset)) if dataset._data[i]["image"]["path"].endswith("a_halves.png"))
    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        item = dataset[index]
        left_is_red = item["pixel_values"][0, :, 0].mean() > item["pixel_values"][2, :, 0].mean()
        flipped = item["caption"] == "red on the right, blue on the left"
        assert flipped or item["caption"] == "red on the left, blue on the right"
        assert left_is_red != flipped
        seen.add(flipped)
    assert seen == {True, False}


def test_determinism_and_epochs(folders):
    options = {"random_crop": True, "random_flip": True, "seed": 7}
    first, second = make(folders, **options), make(folders, **options)
    for i in range(len(first)):
        a, b = first[i], second[i]
        assert a["caption"] == b["caption"] and torch.equal(a["pixel_values"], b["pixel_values"])
    index = next(i for i in range(len(first)) if first._data[i]["image"]["path"].endswith("b_clear.png"))
    picks = set()
    for epoch in range(10):
        first.set_epoch(epoch)
        picks.add(first[index]["caption"])
    assert picks <= {"nothing", "an empty square", "a blank image"} and len(picks) >= 2


def test_captions_and_default_collate(folders):
    dataset = make(folders)
    captions = dataset.captions()
    assert len(captions) == 9 and "corrupt" in captions and "a blank image" in captions  # no image decoded
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3)))
    assert batch["pixel_values"].shape == (3, 3, SIZE, SIZE)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == 3


def test_to_rgb_palette_transparency_and_16_bit_big_endian():
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([255, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (255, 255, 255)
    deep = Image.frombytes("I;16B", (2, 1), np.array([0, 65535], dtype=">u2").tobytes())
    assert [to_rgb(deep).getpixel((x, 0)) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]


# ----------------------------------------------------------------------------------------------------------------------
# emoji


def test_emoji_missing_font_names_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setattr(emoji_data, "FONT_PATH", tmp_path / "NotoColorEmoji.ttf")
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        emoji_data.EmojiDataset()


def test_emoji_missing_package_names_pip_install(monkeypatch, tmp_path):
    font = tmp_path / "font.ttf"
    font.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "emoji", None)  # makes `import emoji` raise ImportError
    with pytest.raises(ImportError, match="pip install emoji"):
        emoji_data.EmojiDataset(font_path=font)


def test_emoji_caption_and_render_mechanics():
    assert emoji_data.emoji_caption(":red_apple:", "\U0001f34e") == "red apple"
    assert emoji_data.emoji_caption(":Japan:", "\U0001f1ef\U0001f1f5") == "flag of Japan"
    image = emoji_data.render_emoji("A", ImageFont.load_default(size=40), SIZE, padding=0.25)
    array = np.asarray(image)
    assert image.size == (SIZE, SIZE) and array.min() < 100  # drawn
    assert (array[0] >= 250).all() and (array[:, 0] >= 250).all()  # padded on white
    assert emoji_data.render_emoji(" ", ImageFont.load_default(size=40), SIZE) is None


@pytest.mark.skipif(not emoji_data.FONT_PATH.exists(), reason="fonts-noto-color-emoji not installed")
def test_emoji_dataset_renders():
    pytest.importorskip("emoji")
    dataset = emoji_data.EmojiDataset(image_size=32)
    assert 1500 < len(dataset) < 2100
    item = dataset[dataset.captions().index("red apple")]
    pixels = item["pixel_values"]
    assert pixels.shape == (3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(pixels[:, 0, 0], torch.ones(3))  # white corner
    assert pixels[0].mean() > pixels[1].mean()  # red apple is red
