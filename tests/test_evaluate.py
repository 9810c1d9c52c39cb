"""The evaluation: prompt suite, Fréchet distance, scoring, and `latent-diffusion evaluate` end to end."""

import json

import numpy as np
import pytest
import torch

from latent_diffusion.cli import main
from latent_diffusion.data.shapes import EDIT_KINDS, caption, render
from latent_diffusion.evaluate import GROUPS, clip_binding, frechet_distance, prompt_suite, score_images


def test_prompt_suite_groups_are_deterministic_and_honour_heldout():
    heldout = (("purple", "star"), ("cyan", "cross"))
    a, b = prompt_suite(5, 0, heldout), prompt_suite(5, 0, heldout)
    assert [i.prompt for i in a] == [i.prompt for i in b]
    assert {i.group for i in a} == set(GROUPS)
    for item in a:
        pairs = {(o.color, o.shape) for o in item.spec.objects}
        if item.group == "heldout":
            assert len(pairs) == 1 and pairs <= set(heldout)
        else:
            assert not pairs & set(heldout)
        assert {"single": 1, "three": 3, "relation": 2, "heldout": 1}[item.group] == len(item.spec.objects)
    assert all(i.spec.relations for i in a if i.group == "relation")
    assert "heldout" not in {i.group for i in prompt_suite(2, 0)}


def test_frechet_distance_matches_the_gaussian_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(20000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # ‖μ‖² = 4, Tr(I + 4I − 2·2I) = 4: total 8.
    assert abs(frechet_distance(a, b) - 8.0) < 0.25
    assert abs(frechet_distance(a, a)) < 1e-8


def test_frechet_distance_needs_two_rows_per_set():
    with pytest.raises(ValueError, match="at least 2 rows"):
        frechet_distance(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"same D"):
        frechet_distance(torch.randn(5, 4), torch.randn(5, 3))


def test_scoring_real_renders_passes_and_wrong_images_fail():
    items = prompt_suite(6, 1, (("purple", "star"),))
    rng = np.random.default_rng(0)
    real = [render(i.spec, rng) for i in items]
    good = score_images(real, items)
    assert good["pass_rate"] >= 0.95 and set(good["groups"]) == set(GROUPS)
    shuffled = score_images(real[1:] + real[:1], items)
    assert shuffled["pass_rate"] < 0.3 and shuffled["attributes"]["count"] < 1.0


def test_evaluate_command_writes_report(tiny_pipeline_dir, tmp_path):
    rc = main(["evaluate", "--pipeline", str(tiny_pipeline_dir), "--out", str(tmp_path), "--num-prompts", "1",
               "--seeds", "2", "--quick", "--heldout", "purple star"])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["run"]["command"].startswith("latent-diffusion evaluate --pipeline ")
    assert results["run"]["command"].endswith("--heldout 'purple star'") and results["run"]["device"] == "cpu"
    assert set(results["samplers"]) == {"DPM-Solver++(2M) 20"}
    assert set(results["ablations"]) == {"prior + decoder", "text only", "true image embedding"}
    # the "prior + decoder" ablation is the same call as the setting it names: reused, not generated again
    assert results["ablations"]["prior + decoder"] == results["samplers"]["DPM-Solver++(2M) 20"]
    assert results["real_images"]["pass_rate"] >= 0.75
    run = results["samplers"]["DPM-Solver++(2M) 20"]
    assert 0 <= run["pass_rate"] <= 1 and run["fd_clip"] >= 0
    assert set(results["clip_binding"]) <= set(EDIT_KINDS) and "color" in results["clip_binding"]
    report = (tmp_path / "results.md").read_text()
    assert "| setting | pass rate |" in report
    assert "FD-CLIP here compares 8 images in 32 dimensions" in report  # 4 prompts × 2 seeds, a 32-wide CLIP
    assert (tmp_path / "grid.png").is_file()


def test_clip_binding_scores_what_the_text_embedding_keeps():
    """An embedding that keeps every word binds every attribute (1.0); one that drops the position words cannot
    tell a moved object from the original (ties are not 'closer': 0.0 for the cell edits)."""
    specs = [it.spec for it in prompt_suite(8, seed=3, heldout_pairs=())]
    vocab: dict[str, int] = {}

    def bag(captions: list[str], drop: tuple[str, ...] = ()) -> torch.Tensor:  # bag of words
        out = torch.zeros(len(captions), 128)
        for i, text in enumerate(captions):
            for w in text.replace(",", "").split():
                if w not in drop:
                    out[i, vocab.setdefault(w, len(vocab))] += 1.0
        return out

    images = bag([caption(s) for s in specs])  # an "image encoder" that sees exactly the caption
    full = clip_binding(bag, images, specs)
    assert set(full) >= {"color", "shape", "cell", "count"} and min(full.values()) == 1.0
    positions = ("in", "on", "at", "the", "left", "right", "top", "bottom", "center")
    blind = clip_binding(lambda c: bag(c, positions), bag([caption(s) for s in specs], positions), specs)
    assert blind["cell"] == 0.0 and blind["color"] == 1.0


def test_ablations_of_a_text_only_decoder(tmp_path):
    """A text-only decoder (no prior; an image encoder for the scores) has nothing to ablate: no ablation runs,
    instead of a crash on the missing embedding width."""
    from latent_diffusion.evaluate import evaluate
    from latent_diffusion.models import UNET_PRESETS, UNet

    from .conftest import build_tiny_pipeline

    pipe = build_tiny_pipeline(tmp_path, with_prior=False)
    torch.manual_seed(0)
    pipe.decoder = UNet(UNET_PRESETS["tiny"])
    assert not pipe.decoder.config.uses_image_embeds
    setting = ("DDIM 2", "ddim", 2)
    results = evaluate(pipe, prompt_suite(1, 0, ()), seeds=1, settings=(setting,), ablation_setting=setting,
                       prior_steps=2, progress=False)
    assert results["ablations"] == {} and results["samplers"]["DDIM 2"]["pass_rate"] >= 0


def test_results_json_is_strict_json():
    import json
    import math

    from latent_diffusion.evaluate import json_ready

    results = {"reference": {"clip_score": math.nan, "rows": [1.0, math.inf], "n": 3}}
    text = json.dumps(json_ready(results), allow_nan=False)  # what save_report writes
    assert json.loads(text) == {"reference": {"clip_score": None, "rows": [1.0, None], "n": 3}}
