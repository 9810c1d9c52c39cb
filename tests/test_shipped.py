"""The shipped default pipeline: found from any directory, loads offline, generates the right images."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

from latent_diffusion.cli import default_pipeline
from latent_diffusion.data.checker import check
from latent_diffusion.data.shapes import SceneSpec, ShapeObject, caption

CLI = str(Path(sys.executable).parent / "latent-diffusion")


def test_shipped_pipeline_generates_from_any_directory(tmp_path):
    """The README's command from another folder, offline, without PATH: the images show the prompt (the checker
    passes the shipped pipeline on 0.97 of one-object prompts at these settings; both seeds must pass here)."""
    assert (default_pipeline() / "model_index.json").is_file()
    spec = SceneSpec([ShapeObject("red", "circle", "medium", 3)], stated=[frozenset({"cell"})])
    prompt = caption(spec)
    assert prompt == "a red circle on the left"
    result = subprocess.run([CLI, "generate", prompt, "--num-images", "2", "--steps", "20", "--prior-steps", "20",
                             "--out", "samples", "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    paths = [Path(tmp_path, p) for p in result.stdout.split()]
    assert [p.name for p in paths] == ["seed0.png", "seed1.png"]
    for path in paths:
        image = Image.open(path)
        assert image.size == (64, 64)
        verdict = check(image, spec)
        assert verdict.passed, (path.name, verdict)
