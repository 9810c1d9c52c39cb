"""Fine-tuning: a LoRA run through the real `accelerate launch`, the LoRA API on a pipeline (load, scale, fuse,
unfuse, unload), exact resume, full fine-tuning, mixed precision, and the errors for bad input."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.conftest import CAPTIONS, free_port

pytest.importorskip("peft")

from latent_diffusion.lora import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_INDEX,
    add_lora,
    fuse_lora,
    load_lora,
    lora_components,
    save_lora,
    set_lora_scale,
    unfuse_lora,
    unload_lora,
)

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
# Small and fast: 2-step sampling for validation grids, a learning rate that moves the adapters visibly in 2 steps.
FAST = ["--batch-size", "4", "--learning-rate", "1e-3", "--validation_steps", "2", "--validation_images", "1",
        "--optim.checkpoint_every", "1", "--optim.log_every", "1"]
SAMPLE = dict(num_inference_steps=2, prior_num_inference_steps=2, seed=0, progress=False, output_type="pt")
PROMPTS = ["a red circle on the left", "a large blue star"]


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "_work" / "finetune" / "metrics.jsonl").read_text().splitlines()]


def run_in_process(*args: str) -> None:
    from accelerate.state import AcceleratorState

    from training import finetune

    try:
        finetune.main(list(args))
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    """8 captioned images of mixed sizes and modes, plus one unreadable file listed in the metadata."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    sizes = [(20, 24), (16, 16), (32, 16), (18, 30), (40, 40), (17, 23), (64, 48), (16, 20)]
    for i, (mode, (w, h)) in enumerate(zip(["RGB", "L", "RGBA", "P", "LA", "RGB", "CMYK", "RGB"], sizes)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        name = f"{i}.jpg" if mode == "CMYK" else f"{i}.png"
        image.save(folder / name)
        rows.append({"file_name": name, "text": CAPTIONS[i * 5]})
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    rows.append({"file_name": "broken.png", "text": "a red circle"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def lora_run(tiny_pipeline_dir, imagefolder, tmp_path_factory) -> Path:
    """A 2-step LoRA fine-tune of the decoder and the prior, launched exactly as a user types it."""
    out = tmp_path_factory.mktemp("lora") / "out"
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "training.finetune", "--pipeline", str(tiny_pipeline_dir),
           "--train-data-dir", str(imagefolder), "--method", "lora", "--components", "decoder,prior",
           "--rank", "4", "--alpha", "8", "--max-steps", "2", "--output-dir", str(out), *FAST]
    result = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "skipped 1 unreadable image(s) of 9" in result.stdout + result.stderr
    return out


def test_lora_launch_writes_safetensors_adapters(lora_run):
    index = json.loads((lora_run / LORA_INDEX).read_text())
    assert sorted(index["components"]) == ["decoder", "prior"]  # the text encoder stayed frozen
    assert not (lora_run / "text_encoder").exists()
    for component in ("decoder", "prior"):
        config = json.loads((lora_run / component / ADAPTER_CONFIG).read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
        weights = load_file(str(lora_run / component / ADAPTER_WEIGHTS))  # safetensors, not a pickle
        assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
        assert {v.dtype for v in weights.values()} == {torch.float32}
        assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k)  # B starts at 0: it trained
        assert all(k.rsplit(".lora_", 1)[0].endswith(("to_q", "to_k", "to_v", "to_out")) for k in weights)
    log = metrics(lora_run)
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert {"world_size": 1, "ranks_in_sync": True} in log
    assert {"skipped_images": 1, "dataset_size": 9} in log
    assert (lora_run / "_work" / "finetune" / "validation-0000000.png").is_file()  # the base model's grid
    assert (lora_run / "_work" / "finetune" / "validation-0000002.png").is_file()


def test_lora_changes_the_output_and_scale_0_or_unload_give_the_base_exactly(tiny_pipeline, lora_run):
    pipe = tiny_pipeline
    base = pipe(PROMPTS, **SAMPLE).images
    base_keys = set(pipe.decoder.state_dict())
    assert load_lora(pipe, lora_run) == ["decoder", "prior"]
    adapted = pipe(PROMPTS, **SAMPLE).images
    assert (adapted - base).abs().max() > 1e-3
    set_lora_scale(pipe, 0.0)
    assert torch.equal(pipe(PROMPTS, **SAMPLE).images, base)
    set_lora_scale(pipe, 1.0)
    assert torch.equal(pipe(PROMPTS, **SAMPLE).images, adapted)
    with pytest.raises(ValueError, match="already loaded"):
        load_lora(pipe, lora_run)
    unload_lora(pipe)
    assert lora_components(pipe) == []
    assert set(pipe.decoder.state_dict()) == base_keys  # plain layers again: the pipeline saves as before
    assert torch.equal(pipe(PROMPTS, **SAMPLE).images, base)


def test_fuse_then_unfuse_restores_the_base_weights(tiny_pipeline, lora_run):
    pipe = tiny_pipeline
    base = {k: v.clone() for k, v in pipe.decoder.state_dict().items()}
    load_lora(pipe, lora_run, scale=0.7)
    adapted = pipe(PROMPTS, **SAMPLE).images
    fuse_lora(pipe)
    torch.testing.assert_close(pipe(PROMPTS, **SAMPLE).images, adapted, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="unfuse_lora"):
        set_lora_scale(pipe, 1.0)
    assert [r["scale"] for r in pipe.fused_loras] == [pytest.approx(0.7)]
    unfuse_lora(pipe)
    assert pipe.fused_loras == []  # unfused: nothing is baked in
    assert torch.equal(pipe(PROMPTS, **SAMPLE).images, adapted)
    unload_lora(pipe)
    after = pipe.decoder.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # bit for bit
    # fuse + unload bakes the LoRA in: the plain pipeline now gives the adapted images.
    load_lora(pipe, lora_run, scale=0.7)
    fuse_lora(pipe)
    unload_lora(pipe)
    torch.testing.assert_close(pipe(PROMPTS, **SAMPLE).images, adapted, rtol=0, atol=1e-4)


def test_resume_continues_exactly(tiny_pipeline_dir, imagefolder, lora_run, tmp_path):
    """From the first run's step-1 checkpoint to step 2 == the uninterrupted run."""
    checkpoint = lora_run / "_work" / "finetune" / "checkpoint-1"
    run_in_process("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--components",
                   "decoder,prior", "--rank", "4", "--alpha", "8", "--max-steps", "2", "--output-dir",
                   str(tmp_path), "--resume", str(checkpoint), *FAST)
    for component in ("decoder", "prior"):
        a = load_file(str(lora_run / component / ADAPTER_WEIGHTS))
        b = load_file(str(tmp_path / component / ADAPTER_WEIGHTS))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    straight = [r for r in metrics(lora_run) if r.get("step") == 2 and "loss" in r]
    resumed = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in resumed] == [2]  # step 1 is not replayed
    assert resumed[0]["loss"] == pytest.approx(straight[0]["loss"], rel=1e-6)


def test_resume_is_exact_with_lora_dropout(tiny_pipeline_dir, imagefolder, tmp_path):
    """Dropout draws from torch's global generator, which the loop seeds per step: 1 + 1 resumed steps equal 2."""
    common = ["--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--components", "decoder",
              "--rank", "4", "--lora.dropout", "0.5", *FAST]
    run_in_process(*common, "--max-steps", "2", "--output-dir", str(tmp_path / "straight"))
    run_in_process(*common, "--max-steps", "1", "--output-dir", str(tmp_path / "resumed"))
    run_in_process(*common, "--max-steps", "2", "--output-dir", str(tmp_path / "resumed"), "--resume", "latest")
    a = load_file(str(tmp_path / "straight" / "decoder" / ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / "decoder" / ADAPTER_WEIGHTS))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    # loaded for inference, the adapters' dropout is off: a seed gives one image
    from latent_diffusion import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora(tmp_path / "straight")
    assert not any(m.training for m in pipe.decoder.modules())
    first, again = (pipe("a red circle", **SAMPLE).images for _ in range(2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_resume_names_changed_settings_and_refuses_another_base(tiny_pipeline_dir, imagefolder, tmp_path, capsys):
    import shutil

    common = ["--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--output-dir",
              str(tmp_path / "out"), *FAST]
    run_in_process(*common, "--max-steps", "1")
    run_in_process(*common, "--max-steps", "2", "--resume", "latest", "--learning-rate", "2e-3")
    out = capsys.readouterr().out
    assert "resuming at step 1 with other settings than the run so far: optim.lr: 0.001 -> 0.002" in out
    kept = tmp_path / "out" / "_work" / "finetune" / "config-before-step-1.yaml"
    assert "lr: 0.001" in kept.read_text() and "lr: 0.002" in (tmp_path / "out" / "config.yaml").read_text()
    # a LoRA checkpoint holds the adapters only (the frozen base comes from --pipeline)
    saved = load_file(str(tmp_path / "out" / "_work" / "finetune" / "checkpoint-2" / "model.safetensors"))
    assert saved and all(".lora_" in k for k in saved)
    with pytest.raises(ValueError, match=r"--resume .*checkpoint-2: the checkpoint trained other parameters"):
        run_in_process(*common, "--max-steps", "3", "--resume", "latest", "--components", "decoder,prior")
    # a checkpoint from before parameter orders were recorded, whose run typed another order, is refused
    state_file = tmp_path / "out" / "_work" / "finetune" / "checkpoint-2" / "trainer_state.json"
    state, config = json.loads(state_file.read_text()), (tmp_path / "out" / "config.yaml").read_text()
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "params"}))
    (tmp_path / "out" / "config.yaml").write_text(config.replace("- decoder", "- prior\n- decoder"))
    with pytest.raises(ValueError, match=r"checkpoint-2: its run trained --components prior,decoder in that order"):
        run_in_process(*common, "--max-steps", "3", "--resume", "latest", "--components", "decoder,prior")
    state_file.write_text(json.dumps(state))
    (tmp_path / "out" / "config.yaml").write_text(config)
    # the base may move (a byte-identical copy resumes), but not change
    other = tmp_path / "other-base"
    shutil.copytree(tiny_pipeline_dir, other)
    elsewhere = [str(other) if a == str(tiny_pipeline_dir) else a for a in common]
    run_in_process(*elsewhere, "--max-steps", "3", "--resume", "latest")
    weights = load_file(str(other / "decoder" / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(other / "decoder" / "model.safetensors"))  # retrained
    with pytest.raises(ValueError, match="checkpoint-3: it continues a run on .*, but this run's base .*other-base "
                                         "holds other files"):
        run_in_process(*elsewhere, "--max-steps", "4", "--resume", "latest")


def test_a_base_that_differs_on_another_node_stops_every_process(tmp_path):
    """Each process checks its own node's copy of the base; the answer is summed over processes, so a process whose
    copy matches stops too (rather than wait alone at the next collective) and says where the difference is."""
    from types import SimpleNamespace

    from training.checkpoint import load_checkpoint

    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"fsdp": False, "base": "base", "base_fingerprint": "f"}))
    summed = []

    def reduce(tensor, reduction):
        summed.append(float(tensor))
        return tensor + 1  # another process's copy differs

    acc = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=reduce)
    stage = SimpleNamespace(accelerator=acc, fsdp=False, base=Path("base"), base_fingerprint="f")
    with pytest.raises(ValueError, match="holds other files on another node"):
        load_checkpoint(stage, checkpoint, None, None, None, None)
    assert summed == [0.0]  # this process's copy matched


def test_bf16_mixed_precision_keeps_the_adapters_fp32(tiny_pipeline_dir, imagefolder, tmp_path):
    run_in_process("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--components",
                   "decoder,text_encoder", "--max-steps", "1", "--mixed-precision", "bf16", "--output-dir",
                   str(tmp_path), *FAST)
    setup = next(r["setup"] for r in metrics(tmp_path) if "setup" in r)
    assert setup["trainable_dtypes"] == ["torch.float32"]
    assert setup["frozen_dtypes"] == ["torch.bfloat16"]  # the frozen base is stored in the compute dtype
    assert sorted(json.loads((tmp_path / LORA_INDEX).read_text())["components"]) == ["decoder", "text_encoder"]


def test_cpu_speed_switches_reach_every_component_and_train_the_same(tiny_pipeline_dir, imagefolder, tmp_path,
                                                                     monkeypatch):
    from safetensors.torch import load_file

    from latent_diffusion import TextToImagePipeline, speed

    monkeypatch.setattr(speed, "ONEDNN_MIN_ROWS", 1)  # the tiny models' GEMMs are all small: take every one
    monkeypatch.setattr(speed, "ONEDNN_MIN_MACS", 1)
    switched = []
    real = TextToImagePipeline.apply_speed

    def record(pipe, **switches):
        out = real(pipe, **switches)
        switched.append({name: [type(m) for m in module.modules() if isinstance(m, torch.nn.Linear)]
                         for name, module in pipe._modules().items()})
        return out

    monkeypatch.setattr(TextToImagePipeline, "apply_speed", record)
    common = ["--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--max-steps", "2", *FAST]
    run_in_process(*common, "--output-dir", str(tmp_path / "fast"), "--optim.onednn_linear", "true",
                   "--optim.transposed_upsample", "true")
    run_in_process(*common, "--output-dir", str(tmp_path / "plain"))
    fast_run, plain_run = switched  # the switched run, then the plain run (switches off: classes unchanged)
    assert all(kinds and all(k is speed.OneDNNLinear for k in kinds) for kinds in fast_run.values() if kinds)
    assert {"text_encoder", "image_encoder", "decoder"} <= {n for n, kinds in fast_run.items() if kinds}
    assert not any(k is speed.OneDNNLinear for kinds in plain_run.values() for k in kinds)
    adapters = sorted((tmp_path / "fast").rglob("*.safetensors"))
    assert adapters
    for path in adapters:
        a, b = load_file(str(path)), load_file(str(tmp_path / "plain" / path.relative_to(tmp_path / "fast")))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_full_finetune_writes_a_complete_pipeline(tiny_pipeline_dir, imagefolder, tmp_path, capsys):
    from latent_diffusion import TextToImagePipeline

    run_in_process("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--method", "full",
                   "--max-steps", "2", "--output-dir", str(tmp_path), *FAST)
    resolved = (tmp_path / "config.yaml").read_text()
    assert "ema_decay: 0.999" in resolved  # EMA is on for full fine-tuning
    pipe = TextToImagePipeline.from_pretrained(tmp_path)
    base = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    new, old = pipe.decoder.state_dict(), base.decoder.state_dict()
    assert any(not torch.equal(new[k], old[k]) for k in old)
    for name in ("vae", "prior", "text_encoder"):  # not fine-tuned: unchanged
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert pipe(PROMPTS[:1], **SAMPLE).images.shape == (1, 3, 16, 16)
    # run again into the finished folder: the same settings skip it, other ones are refused by name
    common = ["--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--method", "full",
              "--output-dir", str(tmp_path), *FAST]
    capsys.readouterr()
    run_in_process(*common, "--max-steps", "3")
    assert "skipping" in (out := capsys.readouterr().out) and "other settings than these" not in out
    run_in_process(*common, "--max-steps", "2", "--learning-rate", "2e-3")
    assert "It was trained with other settings than these: optim.lr: 0.001 -> 0.002" in capsys.readouterr().out


def test_the_output_folder_must_not_be_the_base(tiny_pipeline_dir, imagefolder, tmp_path):
    base = shutil.copytree(tiny_pipeline_dir, tmp_path / "base")
    with pytest.raises(ValueError, match="is the --pipeline folder: fine-tuning writes a new folder"):
        run_in_process("--pipeline", str(base), "--train-data-dir", str(imagefolder), "--max-steps", "1",
                       "--output-dir", str(tmp_path / "." / "base"), *FAST)
    assert sorted(p.name for p in base.iterdir()) == sorted(p.name for p in tiny_pipeline_dir.iterdir())


def test_evaluate_takes_a_fine_tunes_held_out_pairs_from_its_base(tmp_path):
    from latent_diffusion.cli import heldout_pairs

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.yaml").write_text("data:\n  exclude_pairs: [purple star, cyan cross]\n")
    (tmp_path / "tuned").mkdir()
    (tmp_path / "tuned" / "config.yaml").write_text(
        f"pipeline: {tmp_path / 'base'}\nmethod: full\ndata:\n  source: image_text\n  exclude_pairs: []\n")
    assert heldout_pairs(tmp_path / "tuned") == (("cyan", "cross"), ("purple", "star"))
    (tmp_path / "base" / "config.yaml").unlink()  # a base without a recipe: none
    assert heldout_pairs(tmp_path / "tuned") == ()


def test_decoder_like_the_shipped_one_fine_tunes_with_the_prior(tiny_pipeline_dir, imagefolder, tmp_path, capsys):
    """A decoder like the shipped one — zero-terminal-SNR v-prediction, reading CLIP's token embeddings too —
    fine-tunes with the prior: min-SNR-γ (which would give the last timesteps no weight) is turned off with a
    message, the prior still gets its own text states (not the decoder's longer ones), and the loss stays finite."""
    import shutil

    base = tmp_path / "zero-snr"
    shutil.copytree(tiny_pipeline_dir, base)
    index = json.loads((base / "model_index.json").read_text())
    index["config"]["decoder_schedule"].update(rescale_zero_terminal_snr=True, prediction_type="v_prediction")
    index["config"]["decoder_token_embeddings"] = True
    (base / "model_index.json").write_text(json.dumps(index))
    run_in_process("--pipeline", str(base), "--train-data-dir", str(imagefolder), "--method", "full",
                   "--components", "decoder,prior", "--max-steps", "2", "--output-dir", str(tmp_path / "out"), *FAST)
    assert "zero-terminal-SNR schedule; min-SNR-γ is off" in capsys.readouterr().out
    losses = [m["loss"] for m in metrics(tmp_path / "out") if "loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)


def test_full_finetune_of_the_vae_decoder_learns_the_images_and_keeps_the_encoder(tiny_pipeline_dir, imagefolder,
                                                                                   tmp_path):
    """--components vae_decoder trains the VAE's decoder on reconstruction; its encoder (hence the latents the
    diffusion decoder learned from) and every other component stay bit for bit."""
    from latent_diffusion import TextToImagePipeline
    from training.common import build_dataset
    from training.config import DataConfig

    run_in_process("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--method", "full",
                   "--components", "vae_decoder", "--max-steps", "6", "--optim.ema_decay", "null",
                   "--output-dir", str(tmp_path), *FAST)
    pipe, base = TextToImagePipeline.from_pretrained(tmp_path), TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    new, old = pipe.vae.state_dict(), base.vae.state_dict()
    changed = {k.split(".")[0] for k in old if not torch.equal(new[k], old[k])}
    assert changed == {"decoder"}, changed
    for name in ("decoder", "prior", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b)
    logged = [r["vae_l1"] for r in metrics(tmp_path) if "vae_l1" in r]
    assert len(logged) == 6
    data = build_dataset(DataConfig(source="image_text", train_data_dir=str(imagefolder), image_size=16), 0)
    x = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
    with torch.no_grad():
        l1 = [(vae.decode(vae.encode(x).mode()) - x).abs().mean().item() for vae in (base.vae, pipe.vae)]
    assert l1[1] < 0.9 * l1[0], l1  # the training images come back closer


def test_a_lora_for_another_architecture_is_refused_by_layer(tiny_pipeline, tmp_path):
    from latent_diffusion.models import PRIOR_PRESETS, UNET_PRESETS, DiffusionPrior, UNet

    wider = UNet(replace(UNET_PRESETS["tiny-unclip"], channels=(16, 48)))
    add_lora(wider, rank=4)
    save_lora(tmp_path / "wider", {"decoder": wider}, base_pipeline="runs/wide")
    with pytest.raises(ValueError, match=r"another shape: down\.1\.attn\.0\.blocks\.0\.attn1\.to_k \(adapter 48→48, "
                                         r"layer 32→32\).*channels=\[16, 48\] vs \[16, 32\].*; the LoRA was "
                                         r"trained on the pipeline runs/wide"):
        load_lora(tiny_pipeline, tmp_path / "wider")
    prior = DiffusionPrior(PRIOR_PRESETS["tiny"])
    add_lora(prior, rank=4)
    save_lora(tmp_path / "swapped", {"decoder": prior})  # a prior's LoRA filed as the decoder's
    with pytest.raises(ValueError, match=r"does not have: blocks\.0\.attn\.to_k.*trained on a DiffusionPrior"):
        load_lora(tiny_pipeline, tmp_path / "swapped")
    assert lora_components(tiny_pipeline) == []  # nothing half-loaded
    with pytest.raises(FileNotFoundError, match="not a LoRA folder"):
        load_lora(tiny_pipeline, tmp_path)


def test_bad_training_data_is_named(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "a.png")
    args = ["--pipeline", str(tiny_pipeline_dir), "--max-steps", "1", "--output-dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"no captions: add a metadata\.jsonl .*'file_name'.*'text'"):
        run_in_process(*args, "--train-data-dir", str(folder))
    with pytest.raises(ValueError, match=r"--train-data-dir FOLDER or --dataset-name"):
        run_in_process(*args)
    for flags, message in [
        (["--components", "decoder,vae"], r"--components decoder,vae: give distinct names from"),
        (["--components", "decoder,vae_decoder"], r"--components vae_decoder needs --method full \(got lora\)"),
        (["--lora.rnak", "4"], r"unknown config key '--lora.rnak'"),
        (["--components", ""], r"--components : give distinct names"),
        (["--alpha", "0"], r"alpha=0.0.*alpha > 0"),
        (["--lora.dropout", "1.5"], r"dropout=1.5.*dropout in \[0, 1\)"),
        (["--data.image_size", "15"], r"--data.image_size 15: the pipeline's VAE needs a multiple of 2"),
        (["--validation_images", "-1"], r"validation_images must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            run_in_process(*args, "--train-data-dir", str(folder), *flags)


def test_pipeline_methods_cli_flag_and_save_guard(tiny_pipeline, tiny_pipeline_dir, lora_run, tmp_path, capsys):
    from latent_diffusion import TextToImagePipeline
    from latent_diffusion.cli import main

    pipe = tiny_pipeline
    base = pipe(PROMPTS, **SAMPLE).images
    for bad in (float("nan"), "abc"):  # refused before anything loads
        with pytest.raises(ValueError, match="LoRA scale must be a finite number"):
            pipe.load_lora(lora_run, scale=bad)
    assert lora_components(pipe) == []
    assert pipe.load_lora(lora_run, scale=0.5) == ["decoder", "prior"]
    with pytest.raises(ValueError, match="LoRA scale must be a finite number, got inf"):
        pipe.set_lora_scale(float("inf"))
    with pytest.raises(ValueError, match="unload_lora"):
        pipe.save_pretrained(tmp_path / "refused")
    pipe.fuse_lora()
    pipe.unload_lora()  # the fused update stays: the folder saves with the LoRA baked in
    pipe.save_pretrained(tmp_path / "baked")
    assert (pipe(PROMPTS, **SAMPLE).images - base).abs().max() > 1e-4
    # the baked folder records its LoRA, so the same adapters (from any copy of their folder) are not applied twice
    baked = TextToImagePipeline.from_pretrained(tmp_path / "baked")
    assert [(round(r["scale"], 6), r["components"]) for r in baked.fused_loras] == [(0.5, ["decoder", "prior"])]
    copy = shutil.copytree(lora_run, tmp_path / "lora-copy")
    for folder, components in ((lora_run, None), (copy, None), (copy, ["decoder"]), (lora_run, ["prior"])):
        with pytest.raises(ValueError, match="LoRA in .* is already fused into this pipeline's weights .* twice"):
            baked.load_lora(folder, components=components)
    assert lora_components(baked) == []
    outs = []
    for extra in ([], ["--lora", str(lora_run), "--lora-scale", "1.0"]):
        out = tmp_path / f"cli{len(extra)}.png"
        assert main(["generate", "a red circle", "--pipeline", str(tiny_pipeline_dir), "--steps", "2",
                     "--prior-steps", "2", "--num-images", "1", "--out", str(out), "--quiet", *extra]) == 0
        outs.append(np.asarray(Image.open(out), dtype=np.float32))
    assert np.abs(outs[0] - outs[1]).max() > 0
    assert "was trained on the pipeline" not in capsys.readouterr().err  # its own base: no note
    other = shutil.copytree(tiny_pipeline_dir, tmp_path / "base-copy")
    assert main(["generate", "a red circle", "--pipeline", str(other), "--steps", "1", "--prior-steps", "1",
                 "--out", str(tmp_path / "other.png"), "--quiet", "--lora", str(lora_run)]) == 0
    assert f"note: the LoRA {lora_run} was trained on the pipeline {tiny_pipeline_dir.resolve()}; applying it to " \
        f"{other}" in capsys.readouterr().err
    assert main(["generate", "x", "--pipeline", str(tiny_pipeline_dir), "--lora-scale", "0.5"]) == 2
    assert "--lora-scale needs --lora" in capsys.readouterr().err


def teach_concept_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("teach_concept", ROOT / "examples" / "teach_concept.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["teach_concept"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("concept", ["pink", "heart"])
def test_teach_concept_data_shows_the_concept_but_never_the_heldout_pair(tmp_path, concept):
    from latent_diffusion.data.shapes import SceneSpec

    module = teach_concept_module()
    c = module.CONCEPTS[concept]
    base_heldout = {("purple", "star"), ("cyan", "cross")}  # the base pipeline's, never to be shown
    module.write_data(tmp_path, c, num_images=40, exclude=base_heldout)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    specs = [SceneSpec.from_dict(r["spec"]) for r in rows]
    with_concept = [s for s in specs if any(getattr(o, c.kind) == concept for o in s.objects)]
    assert len(with_concept) == 30  # three in four
    assert not any(c.is_heldout(o) and getattr(o, c.kind) == concept for s in specs for o in s.objects)
    assert not any((o.color, o.shape) in base_heldout for s in specs for o in s.objects)
    assert all(concept in r["text"].split() for r, s in zip(rows, specs) if s in with_concept)
    groups = module.prompt_groups(c)
    assert list(groups) == [concept, c.heldout_group, "control"]
    firsts = [s.objects[0] for s in groups[c.heldout_group]]
    assert firsts and all(c.is_heldout(o) and getattr(o, c.kind) == concept for o in firsts)


def test_teach_concept_replay_adds_images_of_the_base_pipeline_that_load(tiny_pipeline_dir, tmp_path):
    """Prior preservation: the base pipeline's own images of ordinary captions join the imagefolder and load with
    the user's images (rows without a scene spec)."""
    import shutil

    from latent_diffusion.data.image_text import ImageTextDataset
    from latent_diffusion.data.shapes import parse_pairs

    module = teach_concept_module()
    base = tmp_path / "base"
    shutil.copytree(tiny_pipeline_dir, base)  # + a training config that held out two pairs
    (base / "config.yaml").write_text("data:\n  exclude_pairs: [red circle, blue square]\n")
    data = tmp_path / "data"
    module.write_data(data, module.CONCEPTS["heart"], num_images=4, fraction=1.0)
    module.write_replay(data, str(base), 40)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    replay = rows[4:]
    held_out = parse_pairs("red circle, blue square")
    assert not any(pair in parse_pairs_in(r["text"]) for r in replay for pair in held_out)
    replay = replay[:3]
    assert [r["file_name"] for r in replay] == ["replay-0000.png", "replay-0001.png", "replay-0002.png"]
    assert all(r["spec"] is None and "heart" not in r["text"].split() for r in rows[4:])
    assert all("heart" in r["text"].split() for r in rows[:4])
    pixels = [np.asarray(Image.open(data / r["file_name"]), dtype=np.float32) for r in replay]
    assert np.abs(pixels[0] - pixels[1]).max() > 0  # drawn, one image per caption
    loaded = ImageTextDataset(train_data_dir=str(data), image_size=32)
    assert len(loaded) == 44 and loaded[43]["caption"] == rows[-1]["text"]
    assert loaded[43]["pixel_values"].shape == (3, 32, 32)


def parse_pairs_in(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a shapes caption names ("a small red circle on the left and ...")."""
    from latent_diffusion.data.shapes import COLORS, SHAPES

    words = text.split()
    return {(c, s) for c, s in zip(words, words[1:]) if c in COLORS and s in SHAPES}


def test_gradient_checkpointing_without_the_decoder_is_refused(tiny_pipeline_dir, imagefolder, tmp_path):
    """Fine-tuning checkpoints the decoder only: asked for while the decoder is not trained, it is refused by name
    instead of being ignored."""
    with pytest.raises(ValueError, match="gradient_checkpointing checkpoints the decoder"):
        run_in_process("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--components",
                       "prior", "--max-steps", "1", "--optim.gradient_checkpointing", "true", "--output-dir",
                       str(tmp_path), *FAST)


def test_unreadable_images_with_workers_end_in_one_error_line(tiny_pipeline_dir, tmp_path):
    """Every image unreadable, read by DataLoader workers (which ignore SIGTERM): one `error:` line and exit 2,
    not the worker's traceback and a process that waits for its workers forever."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.png").write_bytes(b"not a png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a red circle"})
                                                   + "\n" for i in range(4)))
    result = subprocess.run([sys.executable, "-m", "training.finetune", "--pipeline", str(tiny_pipeline_dir),
                             "--train-data-dir", str(folder), "--max-steps", "2", "--optim.num_workers", "2",
                             "--validation_images", "0", "--output-dir", str(tmp_path / "out"), "--batch-size", "2"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: none of the 4 images can be read (see the warnings from 'latent_diffusion.data'): "
                      "check the image paths and the image column"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_fp16_on_a_cpu_is_refused_before_any_model_loads(tiny_pipeline_dir, imagefolder, tmp_path):
    """Accelerate has no CPU fp16 autocast: the fp16 frozen weights met fp32 activations in the first validation."""
    with pytest.raises(ValueError, match=r"--mixed-precision fp16 \(or the config.s optim.mixed_precision\) "
                                         "needs a GPU; on a CPU use bf16"):
        run_in_process("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--max-steps", "1",
                       "--mixed-precision", "fp16", "--output-dir", str(tmp_path), *FAST)


def test_an_option_spelt_with_underscores_is_named(tiny_pipeline_dir, imagefolder, tmp_path):
    with pytest.raises(ValueError, match="unknown option --learning_rate; did you mean --learning-rate"):
        run_in_process("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder),
                       "--learning_rate", "1e-4", "--output-dir", str(tmp_path))



def test_two_process_full_finetune_of_a_text_encoder_some_steps_do_not_reach(tiny_pipeline, imagefolder, tmp_path):
    """A decoder that reads no pooled text leaves the text encoder's projection without a gradient: DDP must be
    told to look for unused parameters, or the second step stops with a reduction error."""
    from latent_diffusion.models import UNet

    pipe = tiny_pipeline
    pipe.decoder = UNet(replace(pipe.decoder.config, pooled_text_dim=None))
    pipe.save_pretrained(tmp_path / "pipe")
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "training.finetune",
           "--pipeline", str(tmp_path / "pipe"), "--train-data-dir", str(imagefolder), "--method", "full",
           "--components", "decoder,text_encoder", "--max-steps", "2", "--output-dir", str(tmp_path / "out"), *FAST]
    result = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (tmp_path / "out" / "text_encoder" / "model.safetensors").is_file()


def test_lora_loading_mistakes_are_named(tiny_pipeline, lora_run):
    from latent_diffusion import TextToImagePipeline, speed

    assert load_lora(tiny_pipeline, lora_run, components="decoder") == ["decoder"]  # one name, as a string
    unload_lora(tiny_pipeline)
    with pytest.raises(ValueError, match=f"{lora_run} is a LoRA folder, not a pipeline: load its base pipeline"):
        TextToImagePipeline.from_pretrained(lora_run)
    speed.fuse_qkv(tiny_pipeline.decoder)
    with pytest.raises(ValueError, match="the decoder has fused q/k/v projections") as refused:
        load_lora(tiny_pipeline, lora_run)
    assert "trained on the pipeline" not in str(refused.value)  # the base is not the cause
    assert lora_components(tiny_pipeline) == []


def test_an_output_folder_a_fine_tune_did_not_write_is_refused(tiny_pipeline_dir, imagefolder, tmp_path,
                                                               monkeypatch):
    other = tmp_path / "other-pipeline"
    shutil.copytree(tiny_pipeline_dir, other)
    before = (other / "decoder" / "model.safetensors").read_bytes()
    args = ("--pipeline", str(tiny_pipeline_dir), "--train-data-dir", str(imagefolder), "--max-steps", "1", *FAST)
    for method in ("lora", "full"):
        with pytest.raises(ValueError, match=r"already holds a pipeline or LoRA \(model_index.json\) with no "
                                             "training record of a fine-tune here"):
            run_in_process(*args, "--method", method, "--output-dir", str(other))
    assert (other / "decoder" / "model.safetensors").read_bytes() == before and not (other / "_work").exists()
    runs = tmp_path / "runs"
    (runs / "_work" / "decoder").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"already holds runs of \['decoder'\] \(_work/\)"):
        run_in_process(*args, "--output-dir", str(runs))
    with pytest.raises(ValueError, match="finetune: --fsdp is not supported by this stage"):
        run_in_process(*args, "--fsdp", "--output-dir", str(tmp_path / "fsdp"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # what accelerate launch --mixed_precision fp16 sets
    with pytest.raises(ValueError, match=r"mixed precision fp16 \(from the launcher: accelerate launch "
                                         r"--mixed_precision, or its config\) needs a GPU"):
        run_in_process(*args, "--output-dir", str(tmp_path / "fp16"))
