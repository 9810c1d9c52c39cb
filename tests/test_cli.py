"""The `latent-diffusion` command line on a tiny random pipeline."""

import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from latent_diffusion.cli import main

CLI = str(Path(sys.executable).parent / "latent-diffusion")


def test_generate_writes_one_png_per_image(tiny_pipeline_dir, tmp_path, capsys):
    rc = main(["generate", "a red circle on the left", "--pipeline", str(tiny_pipeline_dir), "--num-images", "2",
               "--steps", "2", "--prior-steps", "2", "--seed", "5", "--out", str(tmp_path / "out"), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "out" / "seed5.png"), str(tmp_path / "out" / "seed6.png")]
    assert Image.open(printed[0]).size == (16, 16)


def test_generate_grid(tiny_pipeline_dir, tmp_path):
    for name in ("grid.png", "grid.jpg"):  # any extension Pillow writes is one grid file, not a folder
        rc = main(["generate", "a blue star", "--pipeline", str(tiny_pipeline_dir), "--num-images", "3", "--steps",
                   "2", "--prior-steps", "2", "--sampler", "ddim", "--out", str(tmp_path / name), "--quiet"])
        assert rc == 0 and (tmp_path / name).is_file() and Image.open(tmp_path / name).size == (48, 16)


def test_generate_fast_gives_the_same_images(tiny_pipeline_dir, tmp_path, monkeypatch):
    """`--fast` (thresholds lowered so the tiny models take the oneDNN and transposed-upsampling paths) changes
    the images by float rounding at most."""
    import numpy as np

    from latent_diffusion import speed

    monkeypatch.setattr(speed, "ONEDNN_MIN_ROWS", 1)
    monkeypatch.setattr(speed, "ONEDNN_MIN_MACS", 1)
    real_switch, real_linear, real_kernel = speed.transposed_upsample, speed.linear, speed.phase_kernel
    calls = {"linear": 0, "upsample": 0}

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(speed, "transposed_upsample", lambda model, min_pixels=1024: real_switch(model, 1))
    monkeypatch.setattr(speed, "linear", count("linear", real_linear))
    monkeypatch.setattr(speed, "phase_kernel", count("upsample", real_kernel))
    images = {}
    for flags in ([], ["--fast"]):
        out = tmp_path / f"grid{len(flags)}.png"
        assert main(["generate", "a red circle", "--pipeline", str(tiny_pipeline_dir), "--num-images", "2",
                     "--steps", "3", "--prior-steps", "2", "--out", str(out), "--quiet", *flags]) == 0
        images[len(flags)] = np.asarray(Image.open(out), dtype=np.int16)
        if not flags:
            assert calls == {"linear": 0, "upsample": 0}
    assert calls["linear"] > 0 and calls["upsample"] > 0
    assert np.abs(images[1] - images[0]).max() <= 1


def test_bad_input_is_one_line_and_nonzero(tiny_pipeline_dir, tmp_path):
    """The real console script: a clear one-line error, no traceback, a non-zero exit."""
    cases = [
        ["--steps", "0", "--pipeline", str(tiny_pipeline_dir)],
        ["--pipeline", str(tmp_path / "missing")],
        ["--guidance", "-1", "--pipeline", str(tiny_pipeline_dir)],
        ["--prior-steps", "-5", "--pipeline", str(tiny_pipeline_dir)],
    ]
    for extra in cases:
        result = subprocess.run([CLI, "generate", "a red circle", *extra, "--out", str(tmp_path)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
        assert "num_inference_steps" not in result.stderr and "guidance_scale" not in result.stderr  # flags, as typed
    result = subprocess.run([CLI, "generate", "x", "--sampler", "plms"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "invalid choice: 'plms'" in result.stderr


def test_convert_to_half_precision(tiny_pipeline_dir, tmp_path):
    from safetensors.torch import load_file

    from latent_diffusion.pipeline import TextToImagePipeline

    assert main(["convert", str(tiny_pipeline_dir), str(tmp_path / "half"), "--dtype", "float16"]) == 0
    weights = load_file(str(tmp_path / "half" / "decoder" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "half")
    assert pipe.dtype == torch.float32
    assert main(["convert", str(tiny_pipeline_dir), str(tiny_pipeline_dir)]) == 2  # refuses to overwrite itself
    assert pipe.config.image_guidance_scale is None
    assert main(["convert", str(tmp_path / "half"), str(tmp_path / "ig"), "--image-guidance", "0.5"]) == 0
    assert TextToImagePipeline.from_pretrained(tmp_path / "ig").config.image_guidance_scale == 0.5
    assert main(["convert", str(tmp_path / "half"), str(tmp_path / "bad"), "--image-guidance", "-1"]) == 2


def test_device_that_is_not_there_and_a_diffusers_folder_are_named(tiny_pipeline_dir, tmp_path, capsys):
    import json
    import shutil

    if not torch.cuda.is_available():
        assert main(["generate", "x", "--pipeline", str(tiny_pipeline_dir), "--device", "cuda"]) == 2
        assert "--device 'cuda': no cuda device is available" in capsys.readouterr().err
    diffusers_like = tmp_path / "unclip"
    shutil.copytree(tiny_pipeline_dir, diffusers_like)
    (diffusers_like / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableUnCLIPPipeline", "_diffusers_version": "0.42.1", "tokenizer": ["transformers", "x"]}))
    assert main(["generate", "x", "--pipeline", str(diffusers_like)]) == 2
    assert "is a diffusers StableUnCLIPPipeline folder: load it with" in capsys.readouterr().err
    (diffusers_like / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1"}))
    assert main(["generate", "x", "--pipeline", str(diffusers_like)]) == 2
    assert "StableDiffusionPipeline folder, which does not convert" in capsys.readouterr().err


def test_error_messages_name_flags_but_leave_paths_and_words_alone():
    from latent_diffusion.cli import _as_flags

    assert _as_flags("guidance_scale must be >= 0, got -1.0") == "--guidance must be >= 0, got -1.0"
    assert _as_flags("height=30 must be a positive multiple") == "--height=30 must be a positive multiple"
    for untouched in ("missing weight file /runs/width sweep/num_inference_steps/model.safetensors",
                      "prior width 7 is not divisible by heads=2"):
        assert _as_flags(untouched) == untouched



def test_out_paths_guidance_and_seed_are_checked_before_loading(tmp_path, capsys, monkeypatch):
    """Every case fails on its flags: the pipeline folder is never read (it does not exist)."""
    import latent_diffusion.pipeline as pipeline

    monkeypatch.setattr(pipeline.TextToImagePipeline, "from_pretrained", None)  # loading would fail loudly
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir.png").mkdir()
    cases = {
        ("--guidance", "nan"): "--guidance must be a finite number >= 0, got nan",
        ("--image-guidance", "inf"): "--image-guidance must be a finite number >= 0, got inf",
        ("--seed", str(2**64)): f"--seed must be from -2**63 to 2**64 - 4 (image i uses seed + i), got {2**64}",
        ("--out", str(tmp_path / "afile")): "is a file that is not an image format written as a grid",
        ("--out", str(tmp_path / "dir.png")): "is a folder; give an image file path for a grid",
        ("--out", str(tmp_path / "afile" / "sub")): f"{tmp_path / 'afile'} is a file, not a folder",
        ("--out", str(tmp_path / "afile" / "grid.png")): f"{tmp_path / 'afile'} is a file, not a folder",
    }
    for flags, message in cases.items():
        assert main(["generate", "x", "--pipeline", str(tmp_path / "pipe"), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (flags, err)
    assert main(["evaluate", "--pipeline", str(tmp_path / "pipe"), "--prior-guidance", "nan"]) == 2
    assert "--prior-guidance must be a finite number >= 0, got nan" in capsys.readouterr().err


def test_a_rerun_names_the_files_it_replaces(tiny_pipeline_dir, tmp_path, capsys):
    args = ["generate", "a red circle", "--pipeline", str(tiny_pipeline_dir), "--num-images", "2", "--steps", "2",
            "--prior-steps", "2", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    assert "replaced" not in capsys.readouterr().err
    assert main([*args, "--seed", "1"]) == 0  # seed1.png is written again, seed2.png is new
    assert f"note: replaced 1 earlier file(s) of the same name in {tmp_path / 'out'}" in capsys.readouterr().err


def test_damaged_files_are_named(tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    for damaged, content in (("text_encoder/model.safetensors", b"\x00" * 100), ("model_index.json", b"{broken")):
        folder = tmp_path / damaged.split("/")[0].replace(".", "_")
        shutil.copytree(tiny_pipeline_dir, folder)
        (folder / damaged).write_bytes(content)
        assert main(["generate", "x", "--pipeline", str(folder), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read {folder / damaged}"), err


def test_a_lora_folder_given_as_the_pipeline_is_named(tiny_pipeline_dir, tmp_path, capsys):
    (tmp_path / "lora_index.json").write_text("{}")
    assert main(["generate", "a red circle", "--pipeline", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{tmp_path} is a LoRA folder: pass its base pipeline as --pipeline and the LoRA as --lora" in \
        capsys.readouterr().err
    assert main(["evaluate", "--pipeline", str(tiny_pipeline_dir), "--lora-scale", "0.5", "--out",
                 str(tmp_path / "e")]) == 2
    assert "--lora-scale needs --lora" in capsys.readouterr().err
