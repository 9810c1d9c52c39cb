"""The shipped default pipeline: found from any directory, loads offline, generates the right images."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

from latent_diffusion.cli import default_pipeline

CLI = str(Path(sys.executable).parent / "latent-diffusion")


def test_shipped_pipeline_generates_from_any_directory(tmp_path):
    assert (default_pipeline() / "model_index.json").is_file()
    result = subprocess.run([CLI, "generate", "a red circle on the left", "--num-images", "2", "--steps", "3",
                             "--prior-steps", "3", "--out", "samples", "--quiet"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    paths = [Path(tmp_path, p) for p in result.stdout.split()]
    assert [p.name for p in paths] == ["seed0.png", "seed1.png"]
    image = Image.open(paths[0])
    assert image.size == (64, 64)
    # Not a blank canvas: something was drawn on the white background.
    assert min(image.convert("L").getextrema()) < 200
