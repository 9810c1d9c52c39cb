"""Training: the real `accelerate launch` of every stage, exact resume, 2-process equivalence, configs, NaN guard."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import load_config
from training.loop import StepBatchSampler

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
MICRO = str(ROOT / "tests" / "configs" / "micro.yaml")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
       "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def launch(module: str, *args: str, processes: int = 1, script: bool = False) -> subprocess.CompletedProcess:
    """`accelerate launch` exactly as a user types it (the flags DESIGN.md lists for real 2-process CPU runs);
    `script`: `module` is a script's path."""
    if processes == 1:
        cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
        env = ENV
    else:
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--main_process_port", str(free_port())]
        env = {**ENV, "ACCELERATE_USE_CPU": "1"}
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", *([] if script else ["-m"]), module, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def metrics(folder: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (folder / "_work" / stage / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(str(folder / component / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """Every stage launched on its own, one process, global batch 8, 2 steps."""
    out = tmp_path_factory.mktemp("one") / "pipe"
    for stage in ("train_clip", "train_vae", "train_prior", "train_decoder"):
        launch(f"training.{stage}", "--config", MICRO, "--output-dir", str(out), "--max-steps", "2")
    return out


def test_every_stage_launches_and_the_pipeline_loads(one_process_run):
    from latent_diffusion import TextToImagePipeline

    out = one_process_run
    for stage in ("clip", "vae", "prior", "decoder"):
        log = metrics(out, stage)
        assert {"world_size": 1, "ranks_in_sync": True} in log
        assert {"start_step": 0, "mixed_precision": "no", "processes": 1, "fsdp": False} in [r.get("run") for r in log]
        assert [r["step"] for r in log if "loss" in r] == [1, 2]
        assert all(r["loss"] == r["loss"] for r in log if "loss" in r)  # finite
    assert (out / "_work" / "decoder" / "validation-0000002.png").is_file()
    resolved = load_config(out / "config.yaml")
    assert resolved.decoder.optim.batch_size == 8
    pipe = TextToImagePipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor != 1.0  # measured from data
    assert not torch.equal(pipe.prior.clip_std, torch.ones_like(pipe.prior.clip_std))  # stats stored
    image = pipe("a red circle", num_inference_steps=2, prior_num_inference_steps=2, seed=0, progress=False).images
    assert image[0].size == (16, 16)


def test_two_processes_match_one_process(one_process_run, tmp_path):
    """Same global batch (2 × 4 vs 1 × 8): same weights, and both ranks end identical."""
    out = tmp_path / "two"
    batch = [f"--{s}.optim.batch_size" for s in ("clip", "vae", "prior", "decoder")]
    launch("training.train_all", "--config", MICRO, "--output-dir", str(out), "--max-steps", "2",
           *[x for flag in batch for x in (flag, "4")], processes=2)
    for stage in ("clip", "vae", "prior", "decoder"):
        assert {"world_size": 2, "ranks_in_sync": True} in metrics(out, stage)
    # the loss's logged parts are averaged over the processes, as the loss is: the same as one process's
    one, two = ([r for r in metrics(run, "vae") if "l1" in r][-1] for run in (one_process_run, out))
    assert two["l1"] == pytest.approx(one["l1"], rel=1e-4)
    for component in ("text_encoder", "vae", "prior", "decoder"):
        assert_same_weights(weights(one_process_run, component), weights(out, component), f"2-process {component}")


def copy_clip(source: Path, dest: Path) -> None:
    """Give `dest` the finished CLIP stage of `source` (so train_all skips it)."""
    import shutil

    for part in ("tokenizer", "text_encoder", "image_encoder", "_work/clip"):
        shutil.copytree(source / part, dest / part)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, lr: float = 1e-3,
                        steps: int = 2) -> None:
    """Weights of two runs that differ only in float summation order (another process count, sharding).

    Adam's first steps move each element by about lr whatever the size of its gradient, so an element whose gradient
    is float noise can step the other way in the other run and differ by up to 2 lr per step. Attention key biases
    have a zero gradient in exact arithmetic (they shift all of a query's logits alike), so any of their elements
    may differ; in every other tensor at most 1% of the elements, or one, may (a tensor whose gradient was not
    reduced over the processes differs in far more)."""
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert diff.max() <= 2 * lr * steps, f"{what}: {k} differs by {diff.max():.2e}, more than Adam's steps allow"
        if k.endswith(("k_proj.bias", "to_k.bias")):
            continue
        off = int((diff > 1e-5 + 1e-4 * a[k].abs().max()).sum())
        assert off <= max(1, math.ceil(0.01 * diff.numel())), f"{what}: {off} of {diff.numel()} elements of {k} " \
            f"differ (max {diff.max():.2e})"


def test_fsdp_matches_data_parallel_and_resumes_exactly(one_process_run, tmp_path):
    """--fsdp over 2 processes (FSDP2 shards as DTensors over gloo): the same weights as one process with the same
    global batch; checkpoints written in full; resuming a sharded checkpoint continues exactly. The decoder trains
    from `decoder.cache`, which the two processes encode half each (a cached run's weights equal an uncached one's,
    so a sample given another's features would show in the decoder's weights)."""
    from accelerate.state import AcceleratorState

    from training import train_vae

    out = tmp_path / "fsdp"
    copy_clip(one_process_run, out)
    batch = [x for s in ("vae", "prior", "decoder") for x in (f"--{s}.optim.batch_size", "4")]
    launch("training.train_all", "--config", MICRO, "--output-dir", str(out), "--max-steps", "2", "--fsdp",
           *batch, "--decoder.cache", "true", processes=2)
    assert len(list((out / "_work" / "decoder").glob("features-*.safetensors"))) == 1
    for stage in ("vae", "prior", "decoder"):
        assert {"world_size": 2, "fsdp": True} in metrics(out, stage)
        state = json.loads((out / "_work" / stage / "checkpoint-2" / "trainer_state.json").read_text())
        assert state["fsdp"] and state["step"] == 2
    for component in ("vae", "prior", "decoder"):  # the exported prior and decoder are the EMA weights
        assert_same_weights(weights(one_process_run, component), weights(out, component), f"fsdp {component}")
    vae_checkpoint = load_file(str(out / "_work" / "vae" / "checkpoint-2" / "model.safetensors"))
    assert vae_checkpoint.keys() == weights(out, "vae").keys()  # full tensors, not shards

    # Resume: checkpoint-2 of a 4-step constant-LR run, continued in another folder, ends where the run ended.
    common = ["--config", MICRO, "--vae.optim.lr_schedule", "constant", "--vae.optim.ema_decay", "0.9",
              "--vae.optim.batch_size", "4", "--fsdp", "--max-steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    copy_clip(one_process_run, straight)
    copy_clip(one_process_run, resumed)
    launch("training.train_vae", *common, "--output-dir", str(straight), processes=2)
    launch("training.train_vae", *common, "--output-dir", str(resumed), "--resume",
           str(straight / "_work" / "vae" / "checkpoint-2"), processes=2)
    a, b = weights(straight, "vae"), weights(resumed, "vae")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    losses = [r["loss"] for r in metrics(straight, "vae") if "loss" in r]
    assert [r["loss"] for r in metrics(resumed, "vae") if "loss" in r] == pytest.approx(losses[2:], rel=1e-5)

    # A sharded checkpoint keeps its optimizer state by parameter name: resuming it unsharded is refused.
    with pytest.raises(ValueError, match="written by a run with --fsdp"):
        train_vae.main(["--config", MICRO, "--output-dir", str(tmp_path / "plain"), "--resume",
                        str(straight / "_work" / "vae" / "checkpoint-2")])
    AcceleratorState._reset_state(reset_partial_state=False)


def test_resume_continues_exactly(tmp_path):
    """4 steps straight == 2 steps, then `--resume latest` to 4 (constant LR so the schedules agree)."""
    from accelerate.state import AcceleratorState

    from training import train_vae

    common = ["--config", MICRO, "--vae.optim.lr_schedule", "constant", "--vae.optim.checkpoint_limit", "5",
              "--vae.optim.ema_decay", "0.9"]  # the exported weights are the EMA ones: EMA resumes too
    train_vae.main([*common, "--output-dir", str(tmp_path / "straight"), "--max-steps", "4"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_vae.main([*common, "--output-dir", str(tmp_path / "resumed"), "--max-steps", "2"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_vae.main([*common, "--output-dir", str(tmp_path / "resumed"), "--max-steps", "4", "--resume", "latest"])
    AcceleratorState._reset_state(reset_partial_state=False)
    a, b = weights(tmp_path / "straight", "vae"), weights(tmp_path / "resumed", "vae")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    losses = [r["loss"] for r in metrics(tmp_path / "straight", "vae") if "loss" in r]
    resumed = [r["loss"] for r in metrics(tmp_path / "resumed", "vae") if "loss" in r]
    assert resumed == pytest.approx(losses, rel=1e-5)
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "_work" / "vae").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert not list((tmp_path / "resumed" / "_work" / "vae").glob(".checkpoint-*"))  # no half-written saves
    assert (tmp_path / "resumed" / "_work" / "vae" / "checkpoint-2" / "ema.safetensors").is_file()
    assert not list((tmp_path / "resumed" / "_work" / "vae").rglob("*.pkl"))  # nothing pickled


def test_resume_takes_this_runs_lr_and_sets_later_checkpoints_aside(tmp_path, capsys):
    """Resuming from checkpoint-2 with a new learning rate trains at that rate (the checkpoint restores its own
    run's), and the earlier run's checkpoint-4 is kept as stale-checkpoint-4, out of reach of the rotation and of
    `--resume latest`."""
    from accelerate.state import AcceleratorState

    from training import train_vae

    common = ["--config", MICRO, "--output-dir", str(tmp_path), "--vae.optim.lr_schedule", "constant",
              "--vae.optim.checkpoint_limit", "1"]
    train_vae.main([*common, "--max-steps", "4", "--vae.optim.checkpoint_limit", "5"])
    AcceleratorState._reset_state(reset_partial_state=False)
    work = tmp_path / "_work" / "vae"
    (work / "DONE").unlink()  # as if that run had been stopped after its last checkpoint
    train_vae.main([*common, "--max-steps", "3", "--resume", str(work / "checkpoint-2"), "--vae.optim.lr", "1e-5"])
    AcceleratorState._reset_state(reset_partial_state=False)
    out = capsys.readouterr().out
    assert "resuming with lr 1e-05" in out
    assert f"checkpoint-4 is from a run past step 2; kept as {work / 'stale-checkpoint-4'}" in out
    last = [r for r in metrics(tmp_path, "vae") if "lr" in r][-1]
    assert last["step"] == 3 and last["lr"] == pytest.approx(1e-5)
    assert sorted(p.name for p in work.glob("*checkpoint-*")) == ["checkpoint-3", "stale-checkpoint-4"]
    # a checkpoint past max_steps is not resumed (nothing would train), also one set aside
    (work / "DONE").unlink()
    with pytest.raises(ValueError, match="stale-checkpoint-4 is at step 4, past max_steps 3: there is nothing to "
                                         "train; pass --max-steps 4 or more"):
        train_vae.main([*common, "--max-steps", "3", "--resume", str(work / "stale-checkpoint-4")])
    AcceleratorState._reset_state(reset_partial_state=False)
    kept = shutil.copytree(work / "stale-checkpoint-4", tmp_path / "keep" / "best")  # any folder name: its state
    with pytest.raises(ValueError, match="best is at step 4, past max_steps 3"):
        train_vae.main([*common, "--max-steps", "3", "--resume", str(kept)])
    AcceleratorState._reset_state(reset_partial_state=False)


def test_time_limit_stops_early_and_saves_as_finished(tmp_path, capsys):
    """`optim.max_minutes` ends the loop at a step boundary; the run is exported and marked done like a full one."""
    from accelerate.state import AcceleratorState

    from training import train_vae

    args = ["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "50", "--vae.optim.ema_decay", "0.9"]
    train_vae.main([*args, "--vae.optim.max_minutes", "1e-9"])  # past the limit after the first step
    AcceleratorState._reset_state(reset_partial_state=False)
    assert "stopping at step 1 of 50" in capsys.readouterr().out
    work = tmp_path / "_work" / "vae"
    assert [p.name for p in work.glob("checkpoint-*")] == ["checkpoint-1"]
    assert (work / "DONE").is_file() and (tmp_path / "vae" / "config.json").is_file()
    assert [r["step"] for r in metrics(tmp_path, "vae") if "loss" in r] == [1]
    with pytest.raises(ValueError, match="max_minutes=0.0 must be > 0"):
        train_vae.main([*args, "--vae.optim.max_minutes", "0"])
    AcceleratorState._reset_state(reset_partial_state=False)
    # `train_all --resume latest` passes every stage: the stopped-early stage counts as finished (retraining it
    # would leave the later stages built on the old weights), and a skipped stage keeps its config record.
    recorded = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    train_vae.main([*args, "--resume", "latest", "--data.exclude_pairs", "[cyan cross]"])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert "finished a run of max_steps 50: to continue it" in capsys.readouterr().out
    assert (tmp_path / "config.yaml").read_text() == recorded
    assert [r["step"] for r in metrics(tmp_path, "vae") if "loss" in r] == [1]
    # Raising its max_steps past the finished run's 50 continues it.
    train_vae.main([*args[:4], "--max-steps", "52", "--vae.optim.ema_decay", "0.9", "--vae.optim.checkpoint_every",
                    "0", "--vae.optim.log_every", "51", "--resume", "latest"])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert [r["step"] for r in metrics(tmp_path, "vae") if "loss" in r] == [1, 51, 52]
    assert "log_every: 51" in (tmp_path / "config.yaml").read_text()  # a stage that trains records its config


def test_ema_follows_the_warmed_up_recursion():
    """θ_ema,t = d_t θ_ema,t-1 + (1 - d_t) θ_t with d_t = min(d, (1 + t) / (10 + t)), from θ_ema,0 = θ_0; integer
    buffers are copied. Checked against the recursion in plain floats over 30 updates (the warmup ends at t = 80
    for d = 0.9, so both regimes of a smaller decay are covered by d = 0.3: min reached at t = 3)."""
    from training.ema import EMA

    for decay in (0.9, 0.3):
        model = torch.nn.BatchNorm1d(1)  # a weight and an integer buffer (num_batches_tracked)
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema, expected = EMA(model, decay), 1.0
        for t in range(1, 31):
            value = float(t * t % 7)  # any sequence
            with torch.no_grad():
                model.weight.fill_(value)
                model.num_batches_tracked.fill_(t)
            ema.update(model)
            d = min(decay, (1 + t) / (10 + t))
            expected = d * expected + (1 - d) * value
            assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-5), (decay, t)
        assert ema.shadow["num_batches_tracked"].item() == 30


def test_ema_of_the_trained_parameters_only():
    """`trained_only` (LoRA): the average holds the parameters that require grad, and copying it back leaves the
    frozen ones as they are."""
    from training.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ema = EMA(model, 0.5, trained_only=True)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    frozen = model[0].weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    ema.copy_to(model)
    assert torch.equal(model[0].weight, frozen + 1)  # untouched by the copy
    assert torch.equal(model[1].weight, ema.shadow["1.weight"])  # the trained ones get the average


def test_resumed_ema_stays_on_the_models_device():
    """Checkpoints load on the CPU; a resumed EMA must average on the model's device (a GPU run failed here).
    The meta device stands in for a second device on a CPU-only machine."""
    from training.ema import EMA

    saved = EMA(torch.nn.Linear(3, 2), 0.9).state_dict()
    ema = EMA(torch.nn.Linear(3, 2, device="meta"), 0.9)
    ema.load_state_dict(saved)
    assert {v.device.type for v in ema.shadow.values()} == {"meta"}
    ema.update(torch.nn.Linear(3, 2, device="meta"))  # mixed devices raise here


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    from accelerate.state import AcceleratorState

    from training import train_vae

    with pytest.raises(FloatingPointError, match="loss became"):
        train_vae.main(["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "3",
                        "--vae.optim.lr", "1e30", "--vae.optim.max_grad_norm", "null",
                        "--vae.optim.warmup_steps", "0", "--vae.kl_weight", "1e30"])
    AcceleratorState._reset_state(reset_partial_state=False)


def test_config_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(MICRO, ["--decoder.optim.lr", "3e-4", "--prior", "null", "--data.exclude_pairs",
                              "[red circle]"])
    assert cfg.decoder.optim.lr == 3e-4 and cfg.prior is None and cfg.data.exclude_pairs == ("red circle",)
    with pytest.raises(ValueError, match="decoder.optim has keys.*did you mean --decoder.optim.lr"):
        load_config(MICRO, ["--decoder.optim.lrr", "1"])
    # --key=value, a wrong type named by its flag (not by the YAML file), a section under a null one
    assert load_config(MICRO, ["--decoder.optim.lr=2e-4"]).decoder.optim.lr == 2e-4
    section = load_config(MICRO, ["--decoder.optim", "{lr: 1.0e-4}"]).decoder.optim  # keys on top of the recipe's
    assert section.lr == 1e-4 and section.max_steps == load_config(MICRO).decoder.optim.max_steps != 1000
    with pytest.raises(ValueError, match=r"--decoder.optim.lr='abc' is not allowed; expected float"):
        load_config(MICRO, ["--decoder.optim.lr", "abc"])
    nulled = tmp_path / "nulled.yaml"
    nulled.write_text("prior:\n  optim: null\n")
    assert load_config(nulled, ["--prior.optim.lr", "1e-5"]).prior.optim.lr == 1e-5
    bad = tmp_path / "bad.yaml"
    bad.write_text("vae:\n  chanels: [8, 16]\n")
    with pytest.raises(ValueError, match="chanels"):
        load_config(bad)
    typed = tmp_path / "typed.yaml"
    typed.write_text("vae:\n  optim: {lr: 3e-4, lr_schedule: cosine}\n")  # YAML 1.1 reads 3e-4 as a string
    assert load_config(typed).vae.optim.lr == 3e-4
    typed.write_text("vae:\n  optim: {lr_schedule: linear}\n")
    with pytest.raises(ValueError, match=r"lr_schedule='linear' is not allowed; expected one of \['constant', "
                                         r"'cosine'\]"):
        load_config(typed)
    # list values: each item is checked, by flag
    for flag, value, message in (("--decoder.channels", "[32, x]", r"--decoder.channels\[1\]='x' .* expected int"),
                                 ("--vae.optim.betas", "[0.9, a]", r"--vae.optim.betas\[1\]='a' .* expected float"),
                                 ("--vae.optim.betas", "0.9", r"betas=0.9 .* expected a list \[float, float\]"),
                                 ("--vae.optim.betas", "[0.9, 0.99, 0.5]", "has 3 items; expected 2"),
                                 ("--decoder.optim.lr", "[1e-4]", r"--decoder.optim.lr=\['1e-4'\] .* expected float"),
                                 ("--decoder.optim.lr", "null", "--decoder.optim.lr=None is not allowed; expected "
                                                                "float")):
        with pytest.raises(ValueError, match=message):
            load_config(MICRO, [flag, value])
    with pytest.raises(ValueError, match="data.random_flip applies to image_text data only"):
        load_config(MICRO, ["--data.random_flip", "true"])  # shapes: it would be silently ignored
    with pytest.raises(ValueError, match="batch_size='many'"):
        load_config(MICRO, ["--vae.optim.batch_size", "many"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"timestep_logit_normal=\[0.5, 0.0\] must be \[mean, std\]"):
        load_config(MICRO, ["--decoder.timestep_logit_normal", "[0.5, 0.0]"])
    with pytest.raises(ValueError, match="min_snr_gamma=5.0 gives the last timesteps .* no weight"):
        load_config(MICRO, ["--decoder.schedule.rescale_zero_terminal_snr", "true", "--decoder.min_snr_gamma", "5"])
    with pytest.raises(ValueError, match="prediction_type='epsilon' cannot predict"):
        load_config(MICRO, ["--decoder.schedule.rescale_zero_terminal_snr", "true", "--decoder.min_snr_gamma", "null"])
    bad = [("batch_size", "0", ">= 1"), ("grad_accum", "0", ">= 1"), ("log_every", "0", ">= 1"),
           ("warmup_steps", "-3", ">= 0"), ("lr", "-1e-4", ">= 0"), ("ema_decay", "0", r"in \(0, 1\)")]
    for key, value, allowed in bad:
        with pytest.raises(ValueError, match=f"optim.{key}=.* must be {allowed}"):
            load_config(MICRO, [f"--vae.optim.{key}", value])
    with pytest.raises(ValueError, match="would freeze data.random_flip"):
        load_config(MICRO, ["--decoder.cache", "true", "--data.random_flip", "true", "--data.source", "image_text",
                            "--data.train_data_dir", "my-images"])


def test_decoder_timesteps_can_favour_high_noise():
    """`decoder.timestep_logit_normal` (m, s) draws t/T = sigmoid(N(m, s)) from the step's random stream: m > 0
    moves the timesteps towards the noisy end, all within 0..T-1; None keeps them uniform."""
    from latent_diffusion.diffusion import NoiseSchedule
    from training.common import decoder_loss
    from training.loop import StepRandom

    schedule, seen = NoiseSchedule(), []

    def decoder(x, t, states, image, pooled):
        seen.append(t)
        return torch.zeros_like(x)

    def timesteps(logit_normal):
        seen.clear()
        rnd = StepRandom(0, step=0, micro=0, rank=0, world=1, batch=4096, device=torch.device("cpu"))
        decoder_loss(decoder, torch.zeros(4096, 1, 1, 1), (torch.zeros(4096, 1, 2), torch.zeros(4096, 2)),
                     (torch.zeros(1, 1, 2), torch.zeros(1, 2)), None, rnd, schedule, 0.1, 0.1,
                     timestep_logit_normal=logit_normal)
        return seen[0] / schedule.num_train_timesteps

    uniform, high = timesteps(None), timesteps((1.0, 1.0))
    assert abs(uniform.mean() - 0.5) < 0.02 and abs((uniform > 0.7).float().mean() - 0.3) < 0.03
    assert 0 <= high.min() and high.max() <= 0.999
    expected = torch.sigmoid(torch.tensor(1.0) + torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
    assert abs(high.mean() - expected.mean()) < 0.02 and high.mean() > 0.65
    assert abs(high.median() - expected.median()) < 0.02


def test_step_batches_split_the_global_batch_across_ranks():
    def indices(sampler):
        return [[i for i, _ in batch] for batch in sampler]

    one = StepBatchSampler(10, 4, 1, seed=3, rank=0, world=1, start_step=0, max_steps=5)
    ranks = [StepBatchSampler(10, 2, 1, seed=3, rank=r, world=2, start_step=0, max_steps=5) for r in range(2)]
    single = indices(one)
    split = [a + b for a, b in zip(*[indices(r) for r in ranks])]
    assert single == split
    # Each epoch is a permutation: the first 10 samples (steps 0-1 and half of 2) hold no repeats.
    flat = [i for batch in single for i in batch]
    assert sorted(flat[:10]) == list(range(10))
    assert [e for batch in one for _, e in batch][8:12] == [0, 0, 1, 1]  # the epoch travels with each key
    resumed = indices(StepBatchSampler(10, 4, 1, seed=3, rank=0, world=1, start_step=3, max_steps=5))
    assert resumed == single[3:]


def test_epoch_keys_reach_datasets_with_per_epoch_augmentation():
    from training.loop import EpochKeyed

    class Recorder(torch.utils.data.Dataset):
        epoch = -1

        def __len__(self):
            return 4

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __getitem__(self, i):
            return (i, self.epoch)

    assert EpochKeyed(Recorder())[(2, 5)] == (2, 5)


def test_tensorboard_logs_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate.state import AcceleratorState

    from training import train_vae

    train_vae.main(["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "2"])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert list((tmp_path / "_work" / "vae" / "tensorboard").glob("events.out.tfevents.*"))


def test_max_steps_flag_is_the_stage_max_steps_and_is_recorded(tmp_path, capsys):
    """`--max-steps N` sets optim.max_steps of every stage: the config record says N (for each stage train_all
    runs), so rerunning from it reproduces the run; N < 1 is refused by argparse before anything starts."""
    import yaml
    from accelerate.state import AcceleratorState

    from training import train_vae

    train_vae.main(["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "3"])
    AcceleratorState._reset_state(reset_partial_state=False)
    recorded = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert {recorded[s]["optim"]["max_steps"] for s in ("clip", "vae", "prior", "decoder")} == {3}  # (train_all)
    from training.loop import lr_factor

    oc = load_config(MICRO, ["--vae.optim.max_steps", "3"]).vae.optim
    logged = [(r["step"], r["lr"]) for r in metrics(tmp_path, "vae") if "lr" in r]
    assert logged and all(lr == pytest.approx(oc.lr * lr_factor(step - 1, oc, 3)) for step, lr in logged), logged
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            train_vae.main(["--config", MICRO, "--output-dir", str(tmp_path / "bad"), "--max-steps", bad])
        assert "--max-steps: must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # run again finished, with other settings: skipped, naming this stage's changed ones and how to retrain
    train_vae.main(["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "3", "--vae.optim.lr", "1e-5",
                    "--decoder.optim.lr", "1e-5"])
    AcceleratorState._reset_state(reset_partial_state=False)
    out = capsys.readouterr().out
    assert f"to train it again, use a new --output-dir or delete {tmp_path / '_work' / 'vae' / 'DONE'}" in out
    assert "It was trained with other settings than these: vae.optim.lr: " in out and "decoder." not in out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_with_a_checkpoint_that_resumes(tmp_path, sig):
    """Preemption (SIGTERM) or Ctrl-C (SIGINT) sent to the whole process group, DataLoader workers included, as a
    scheduler or a terminal does: the stage writes a checkpoint at the next step boundary and exits with 128 + the
    signal's number; `--resume latest` continues from that step."""
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "training.train_vae", "--config", MICRO, "--output-dir", str(out), "--max-steps",
           "100000", "--vae.optim.log_every", "1", "--vae.optim.checkpoint_every", "0",  # no periodic checkpoints
           "--vae.optim.num_workers", "2"]
    process = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its own process group, as under a scheduler
    log = out / "_work" / "vae" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.read_text().count('"step"') >= 3) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, getattr(signal, sig))
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + getattr(signal, sig), output[-3000:]
    assert f"interrupted ({sig})" in output
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (out / "_work" / "vae").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and checkpoints[0] >= 3, checkpoints
    assert not (out / "_work" / "vae" / "DONE").exists() and not (out / "vae").exists()
    step = checkpoints[0]
    logged = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r]
    assert logged[-1] == step, logged  # the step it stopped at is logged too
    resume = [*cmd[:5], "--output-dir", str(out), "--max-steps", str(step + 1), "--resume", "latest"]
    resumed = subprocess.run(resume, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout + resumed.stderr
    assert (out / "vae" / "model.safetensors").is_file()


def test_a_repeated_signal_counts_once_and_a_later_one_stops_at_once(monkeypatch):
    """A launcher passes on the signal a scheduler also sent to the training processes: the copy is the same
    request (it stopped the run with no checkpoint), whether it comes at once or is handled late, before the loop
    noticed the first; another signal, or the same one later, is "stop now"."""
    import signal

    from training.loop import Interrupt

    monkeypatch.setattr(Interrupt, "repeat_s", 60.0)
    # (the same signal again: seconds after the first?, noticed by the loop in between?, a copy?)
    for late, noticed, copy in ((False, False, True), (True, False, True), (False, True, True), (True, True, False)):
        with Interrupt("t") as interrupt:
            signal.raise_signal(signal.SIGTERM)
            interrupt._at -= 2 * Interrupt.repeat_s if late else 0
            interrupt.noticed = noticed
            if copy:
                try:
                    signal.raise_signal(signal.SIGTERM)
                except KeyboardInterrupt:
                    pytest.fail(f"a copy of the first signal (late {late}, noticed {noticed}) stopped at once")
                assert interrupt.signal_name == "SIGTERM"
                with pytest.raises(KeyboardInterrupt):  # another signal
                    signal.raise_signal(signal.SIGINT)
            else:
                with pytest.raises(KeyboardInterrupt):
                    signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_processes_agree_to_stop_at_the_step_after_a_signal_or_the_deadline(tmp_path):
    """With several processes the stop flags are combined every step (a launcher kills the processes 30 s after
    it passes a signal on, so a check every few steps could miss it): a signal on one process, or the deadline on
    another, stops all of them at the next step; a process that got no signal takes the other's."""
    script = tmp_path / "vote.py"
    script.write_text(f'''
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from types import SimpleNamespace
import torch, torch.distributed as dist
from training.loop import StopVote
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=rank, world_size=2)
for event in ("signal", "deadline"):
    interrupt = SimpleNamespace(signal_name=None)
    vote = StopVote(SimpleNamespace(num_processes=2, device=torch.device("cpu")), None, interrupt)
    for step in range(1, 20):
        if step == 5 and rank == (1 if event == "signal" else 0):
            interrupt.signal_name = "SIGTERM"
            if event == "deadline":
                interrupt.signal_name, vote.deadline = None, time.perf_counter() - 1
        late, interrupted = vote()
        if late or interrupted:
            print(event, step, late, interrupted, interrupt.signal_name, flush=True)
            break
    vote.close()
dist.destroy_process_group()
''')
    ranks = [subprocess.Popen([sys.executable, str(script), str(r)], env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in ranks]
    assert all(p.returncode == 0 for p in ranks), [err[-2000:] for _, err in outputs]
    for out, _ in outputs:
        assert out.splitlines() == ["signal 6 False True SIGTERM", "deadline 6 True False None"]


def test_the_pipeline_records_the_schedule_the_prior_was_trained_with(one_process_run, tmp_path):
    """Stage by stage, the prior's schedule override need not be repeated for the decoder stage: the prior stage
    writes it beside the prior, and model_index.json records that one."""
    import shutil

    from accelerate.state import AcceleratorState

    from training import train_decoder, train_prior

    for part in ("tokenizer", "text_encoder", "image_encoder", "vae", "_work/clip", "_work/vae"):
        shutil.copytree(one_process_run / part, tmp_path / part)
    common = ["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "1"]
    train_prior.main([*common, "--prior.schedule.prediction_type", "epsilon"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_decoder.main(common)
    AcceleratorState._reset_state(reset_partial_state=False)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["config"]["prior_schedule"]["prediction_type"] == "epsilon"
    assert load_config(MICRO).prior.schedule.prediction_type != "epsilon"  # (the decoder stage's config says so)


def test_the_prior_learns_normalised_embeddings(one_process_run, tmp_path, monkeypatch):
    """The prior stage stores the mean and std of the first `stats_samples` image embeddings, and the diffusion
    loss sees each batch's embeddings normalised by them (what the pipeline's `denormalize` undoes)."""
    import shutil

    from accelerate.state import AcceleratorState

    from training import train_prior

    for part in ("tokenizer", "text_encoder", "image_encoder", "vae", "_work/clip", "_work/vae"):
        shutil.copytree(one_process_run / part, tmp_path / part)
    encoded, targets = [], []
    encode, loss = train_prior.encode_batch, train_prior.diffusion_loss

    def spy_encode(*args, **kwargs):
        encoded.append(encode(*args, **kwargs)["image_embeds"])
        return {**encode(*args, **kwargs), "image_embeds": encoded[-1]}

    def spy_loss(model_fn, x0, *args, **kwargs):
        targets.append((encoded[-1], x0.detach().clone()))
        return loss(model_fn, x0, *args, **kwargs)

    monkeypatch.setattr(train_prior, "encode_batch", spy_encode)
    monkeypatch.setattr(train_prior, "diffusion_loss", spy_loss)
    train_prior.main(["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "2"])
    AcceleratorState._reset_state(reset_partial_state=False)
    n = load_config(MICRO).prior.stats_samples
    stats = torch.cat(encoded)[:n]
    prior = weights(tmp_path, "prior")
    torch.testing.assert_close(prior["clip_mean"], stats.mean(0))
    torch.testing.assert_close(prior["clip_std"], stats.std(0))
    assert len(targets) == 2
    for embeds, x0 in targets:
        torch.testing.assert_close(x0, (embeds - prior["clip_mean"]) / prior["clip_std"])


def test_a_signal_after_the_last_check_finishes_the_stage_then_stops(tmp_path):
    """A signal met in the last steps (past the loop's last check) lets the stage write its DONE marker, then
    stops the process with 128 + the signal, so train_all starts no further stage."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from training.stage import Stage

    stage = Stage("vae", load_config(MICRO), Accelerator(cpu=True), tmp_path, tmp_path / "_work" / "vae", 4, None)
    stage.work_dir.mkdir(parents=True)
    stage.pending_signal = "SIGTERM"
    with pytest.raises(SystemExit) as stop:
        stage.mark_done()
    assert stop.value.code == 143 and (stage.work_dir / "DONE").is_file()
    AcceleratorState._reset_state(reset_partial_state=False)


def test_command_line_errors_are_one_line_and_a_changed_model_is_named_at_resume(tmp_path):
    from accelerate.state import AcceleratorState

    from training import train_vae

    bad = subprocess.run([sys.executable, "-m", "training.train_vae", "--config", MICRO, "--output-dir",
                          str(tmp_path / "bad"), "--vae.optim.lrr", "1"], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: unknown config key '--vae.optim.lrr'" in bad.stderr
    common = ["--config", MICRO, "--output-dir", str(tmp_path / "run")]
    train_vae.main([*common, "--max-steps", "2"])
    AcceleratorState._reset_state(reset_partial_state=False)
    with pytest.raises(ValueError, match=r"checkpoint-2: the checkpoint does not fit this model \([1-9]\d* shape"):
        train_vae.main([*common, "--max-steps", "3", "--resume", "latest", "--vae.channels", "[8, 24]"])
    AcceleratorState._reset_state(reset_partial_state=False)
    with pytest.raises(ValueError, match=r"does not fit this model \([1-9]\d* missing and 0 unexpected key"):
        train_vae.main([*common, "--max-steps", "3", "--resume", "latest", "--vae.layers_per_block", "2"])
    AcceleratorState._reset_state(reset_partial_state=False)


def test_patchgan_gives_each_network_only_its_own_gradient():
    """One backward of L_rec + w·L_G + L_D: the discriminator gets ∇L_D only, the autoencoder ∇(L_rec + w·L_G)."""
    from latent_diffusion.models import (
        AUTOENCODER_PRESETS,
        DISCRIMINATOR_PRESETS,
        AutoencoderKL,
        PatchDiscriminator,
        hinge_discriminator_loss,
        hinge_generator_loss,
    )
    from training.train_vae import AutoencoderWithDiscriminator

    torch.manual_seed(0)
    model = AutoencoderWithDiscriminator(AutoencoderKL(AUTOENCODER_PRESETS["tiny"]),
                                         PatchDiscriminator(DISCRIMINATOR_PRESETS["tiny"]))
    x, noise = torch.randn(2, 3, 16, 16).clamp(-1, 1), torch.randn(4, 8, 8)
    out = model(x, noise)
    assert out["real"].shape == (2, 1, 2, 2)  # one logit per patch
    l1 = (out["recon"] - x).abs().mean()
    (l1 + 0.5 * hinge_generator_loss(out["fake_for_g"]) + hinge_discriminator_loss(out["real"], out["fake"])).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    recon, _ = model.vae(x, noise=noise)
    (l1_again := (recon - x).abs().mean()).backward(retain_graph=True)
    assert l1_again.item() == pytest.approx(l1.item())
    (0.5 * hinge_generator_loss(model.disc(recon))).backward()  # its gradient into D is discarded next
    model.disc.zero_grad()
    hinge_discriminator_loss(model.disc(x), model.disc(recon.detach())).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(joint[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(joint[n].abs().sum() > 0 for n in joint if n.startswith("disc."))


def test_vae_stage_trains_against_a_patchgan_and_exports_the_vae_alone(tmp_path):
    from accelerate.state import AcceleratorState

    from latent_diffusion.models import AutoencoderKL
    from training import train_vae

    train_vae.main(["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "3", "--vae.gan_weight", "0.5",
                    "--vae.gan_start", "1", "--vae.disc_channels", "8", "--vae.disc_layers", "2"])
    AcceleratorState._reset_state(reset_partial_state=False)
    log = [r for r in metrics(tmp_path, "vae") if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3] and all("d_loss" in r and "g_loss" in r for r in log)
    # Before gan_start the adversarial terms are off: the step-1 loss is the reconstruction loss alone.
    assert log[0]["loss"] == pytest.approx(log[0]["l1"], rel=1e-3)
    assert log[1]["loss"] != pytest.approx(log[1]["l1"], rel=1e-3)
    checkpoint = load_file(str(tmp_path / "_work" / "vae" / "checkpoint-3" / "model.safetensors"))
    assert any(k.startswith("disc.") for k in checkpoint)  # resumes with its discriminator
    assert not any(k.startswith("disc.") for k in weights(tmp_path, "vae"))
    AutoencoderKL.from_pretrained(tmp_path / "vae")


def test_compile_switch_compiles_every_block_and_trains_the_same(tmp_path, monkeypatch):
    """`optim.compile`: regional compilation (here with dynamo's eager backend: graph capture without code
    generation, fast on a CPU) leaves the training result unchanged."""
    from accelerate.state import AcceleratorState

    from latent_diffusion import speed
    from training import train_vae

    real, compiled = speed.compile_blocks, []

    def capture_only(model, **kwargs):
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(speed, "compile_blocks", capture_only)
    common = ["--config", MICRO, "--max-steps", "2"]
    train_vae.main([*common, "--output-dir", str(tmp_path / "compiled"), "--vae.optim.compile", "true"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_vae.main([*common, "--output-dir", str(tmp_path / "eager")])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert len(compiled) == 1
    blocks = [m for m in compiled[0].modules() if isinstance(m, speed.block_types())]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    a, b = weights(tmp_path / "compiled", "vae"), weights(tmp_path / "eager", "vae")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_cpu_speed_switches_train_the_same(tmp_path, monkeypatch):
    """`optim.onednn_linear` and `optim.transposed_upsample` (thresholds lowered so the micro VAE takes both
    paths) train to the weights of the plain run."""
    from accelerate.state import AcceleratorState

    from latent_diffusion import speed
    from latent_diffusion.layers import Upsample
    from training import train_vae

    monkeypatch.setattr(speed, "ONEDNN_MIN_ROWS", 1)
    monkeypatch.setattr(speed, "ONEDNN_MIN_MACS", 1)
    real, switched = speed.transposed_upsample, []

    def every_size(model, min_pixels=1024):
        switched.append(model)
        return real(model, min_pixels=1)

    monkeypatch.setattr(speed, "transposed_upsample", every_size)
    common = ["--config", MICRO, "--max-steps", "2"]
    train_vae.main([*common, "--output-dir", str(tmp_path / "fast"), "--vae.optim.onednn_linear", "true",
                    "--vae.optim.transposed_upsample", "true"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_vae.main([*common, "--output-dir", str(tmp_path / "plain")])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert len(switched) == 1
    upsamples = [m for m in switched[0].modules() if isinstance(m, Upsample)]
    assert upsamples and all(type(m) is speed.TransposedUpsample and m.min_pixels == 1 for m in upsamples)
    linears = [m for m in switched[0].modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is speed.OneDNNLinear for m in linears)
    a, b = weights(tmp_path / "fast", "vae"), weights(tmp_path / "plain", "vae")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_onednn_switch_reaches_the_frozen_clip_towers(one_process_run):
    from latent_diffusion import speed
    from training.common import load_clip

    for onednn in (False, True):
        _, text, image = load_clip(one_process_run, torch.device("cpu"), onednn=onednn)
        linears = [m for tower in (text, image) for m in tower.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all((type(m) is speed.OneDNNLinear) == onednn for m in linears)


def test_fsdp_bf16_keeps_float_timesteps_exact(tmp_path):
    """Under bf16 the sharded model computes with bf16 weights, but its inputs are not cast: timestep 257 stays
    257 (bf16 would round it to 256)."""
    script = tmp_path / "check.py"
    script.write_text(f'''
import sys
sys.path.insert(0, {str(ROOT)!r})
import torch, torch.distributed as dist
from latent_diffusion.models import PRIOR_PRESETS, DiffusionPrior
from training.sharding import shard_model
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
model = shard_model(DiffusionPrior(PRIOR_PRESETS["tiny"]), torch.device("cpu"), 1, "bf16")
seen = []
model.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
c = model.config
with torch.autocast("cpu", dtype=torch.bfloat16):
    model(torch.randn(2, c.embed_dim), torch.tensor([257.0, 999.0]), torch.randn(2, 5, c.text_states_dim),
          torch.randn(2, c.text_embed_dim))
print(seen[0].dtype, seen[0].tolist())
dist.destroy_process_group()
''')
    result = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[-2] == "torch.float32 [257.0, 999.0]"


def test_decoder_cache_of_an_empty_dataset_is_refused_by_name(one_process_run, tmp_path):
    """An empty dataset gets the uncached run's message, not an error from inside the encoding."""
    import shutil

    from accelerate.state import AcceleratorState

    from training import train_decoder

    shutil.copytree(one_process_run, tmp_path / "run", ignore=shutil.ignore_patterns("decoder"))
    args = ["--config", MICRO, "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--decoder.cache", "true",
            "--data.num_samples", "0"]
    try:
        with pytest.raises(ValueError, match="^the training dataset is empty$"):
            train_decoder.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def test_decoder_cache_refuses_several_captions_per_image(one_process_run, tmp_path):
    """The cache encodes one caption per image: data with several is refused before any encoding."""
    import shutil

    from accelerate.state import AcceleratorState
    from PIL import Image

    from training import train_decoder

    shutil.copytree(one_process_run, tmp_path / "run", ignore=shutil.ignore_patterns("decoder"))
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(data / "red.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "red.png", "text": ["red", "a red square"]}) + "\n")
    args = ["--config", MICRO, "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--decoder.cache", "true",
            "--data.source", "image_text", "--data.train_data_dir", str(data)]
    try:
        with pytest.raises(ValueError, match="several captions per image"):
            train_decoder.main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def test_decoder_feature_cache_is_kept_and_reused_on_resume(one_process_run, tmp_path, capsys):
    """`decoder.cache`: the features are written once, reused by `--resume`, and give the same weights as a run
    computing them on the fly."""
    import shutil

    from accelerate.state import AcceleratorState

    from training import train_decoder

    for name in ("cached", "plain"):
        shutil.copytree(one_process_run, tmp_path / name, ignore=shutil.ignore_patterns("decoder"))
    common = ["--config", MICRO, "--decoder.optim.lr_schedule", "constant"]
    cached = [*common, "--output-dir", str(tmp_path / "cached"), "--decoder.cache", "true"]
    train_decoder.main([*cached, "--max-steps", "2"])
    AcceleratorState._reset_state(reset_partial_state=False)
    files = list((tmp_path / "cached" / "_work" / "decoder").glob("features-*.safetensors"))
    assert len(files) == 1
    capsys.readouterr()
    train_decoder.main([*cached, "--max-steps", "3", "--resume", "latest"])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert f"cached latents and CLIP features from {files[0]}" in capsys.readouterr().out
    train_decoder.main([*common, "--output-dir", str(tmp_path / "plain"), "--max-steps", "3"])
    AcceleratorState._reset_state(reset_partial_state=False)
    # Features encoded in batches of 256 vs 8 differ in float rounding, which Adam can turn into tiny steps.
    assert_same_weights(weights(tmp_path / "cached", "decoder"), weights(tmp_path / "plain", "decoder"), "cache")


def test_decoder_warm_start_adds_position_embeddings(one_process_run, tmp_path):
    """`decoder.init_from` loads a finished decoder (here into a model that adds position embeddings and a text
    refiner, whose output projections start at zero, and reads CLIP's token embeddings too); with lr 0 the
    exported decoder is the source plus those additions. Another architecture is refused."""
    import shutil

    from accelerate.state import AcceleratorState

    from training import train_decoder

    shutil.copytree(one_process_run, tmp_path / "warm", ignore=shutil.ignore_patterns("decoder"))
    source = str(one_process_run / "decoder")
    args = ["--config", MICRO, "--output-dir", str(tmp_path / "warm"), "--max-steps", "1",
            "--decoder.init_from", source, "--decoder.position_embedding", "true", "--decoder.token_embeddings", "true",
            "--decoder.text_refiner_layers", "1"]
    with pytest.raises(ValueError, match=r"another architecture: channels \(16, 32\) vs \(16, 64\)"):
        train_decoder.main([*args, "--decoder.channels", "[16, 64]"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_decoder.main([*args, "--decoder.optim.lr", "0"])
    AcceleratorState._reset_state(reset_partial_state=False)
    before, after = weights(one_process_run, "decoder"), weights(tmp_path / "warm", "decoder")
    added = sorted(set(after) - set(before))
    pos = [k for k in added if ".pos_proj." in k]
    outs = [k for k in added if k.endswith(("attn1.to_out.weight", "ff.proj_out.weight"))]
    assert pos and len(outs) == 2 and all(".pos_proj." in k or k.startswith("text_refiner.") for k in added)
    assert set(before) <= set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not after[k].any() for k in pos + outs)
    config = json.loads((tmp_path / "warm" / "decoder" / "config.json").read_text())
    assert config["position_embedding"] is True and config["text_refiner_layers"] == 1
    index = json.loads((tmp_path / "warm" / "model_index.json").read_text())
    assert index["config"]["decoder_token_embeddings"] is True


def test_clip_hard_negatives_join_each_images_softmax():
    """NegCLIP loss in closed form; a masked-out negative changes nothing; each negative edits one attribute."""
    import numpy as np
    import torch.nn.functional as F

    from latent_diffusion.data.shapes import COLORS, SHAPES, SceneSpec, ShapesDataset, caption
    from training.train_clip import contrastive_loss, hard_negative

    torch.manual_seed(0)
    text, image, neg = (F.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(2.0)
    plain = contrastive_loss(text, image, scale)
    assert torch.allclose(plain, contrastive_loss(text, image, scale, neg, torch.zeros(4, dtype=torch.bool)))
    per_image = scale.exp() * image @ text.t()
    own = scale.exp() * (image * neg).sum(-1)
    i2t = (torch.logsumexp(torch.cat([per_image, own[:, None]], 1), 1) - per_image.diag()).mean()
    t2i = F.cross_entropy(scale.exp() * text @ image.t(), torch.arange(4))
    assert torch.allclose(contrastive_loss(text, image, scale, neg, torch.ones(4, dtype=torch.bool)),
                          0.5 * (i2t + t2i))
    # The 2-way term: weight × cross-entropy of (own caption, its negative), over the images that have one.
    has = torch.tensor([True, False, True, True])
    pairs = torch.stack([per_image.diag(), own], 1)[has]
    two_way = (torch.logsumexp(pairs, 1) - pairs[:, 0]).mean()
    assert torch.allclose(contrastive_loss(text, image, scale, neg, has, pair_weight=0.5),
                          contrastive_loss(text, image, scale, neg, has) + 0.5 * two_way)
    data = ShapesDataset(20, seed=0)
    moves = 0
    for i in range(20):
        spec = SceneSpec.from_dict(data[i]["spec"])
        edited = hard_negative(spec, np.random.default_rng(i))
        assert edited is not None and edited != caption(spec)
        assert edited == hard_negative(spec, np.random.default_rng(i))
        moved = hard_negative(spec, np.random.default_rng(i), kinds=("cell",))  # only a stated cell changes
        if moved is not None:
            moves += 1
            what = [sorted(w for w in c.replace(",", "").split() if w in COLORS or w in SHAPES)
                    for c in (moved, caption(spec))]
            assert moved != caption(spec) and what[0] == what[1], (moved, caption(spec))
    assert moves > 0


def test_clip_stage_with_hard_negatives_reports_binding(tmp_path):
    from accelerate.state import AcceleratorState

    from training import train_clip

    args = ["--config", MICRO, "--output-dir", str(tmp_path / "clip"), "--max-steps", "2", "--clip.hard_negatives",
            "true"]
    with pytest.raises(ValueError, match="clip.hard_negatives needs scene specs"):
        train_clip.main([*args, "--data.source", "emoji"])
    with pytest.raises(ValueError, match=r"clip.hard_negative_kinds \['cell', 'place'\]: give distinct names"):
        train_clip.main([*args, "--clip.hard_negative_kinds", "[cell, place]"])
    with pytest.raises(ValueError, match=r"clip.hard_negative_weight=1.0: .*only with clip.hard_negatives true"):
        train_clip.main([*args[:-2], "--clip.hard_negative_weight", "1.0"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_clip.main(args)
    AcceleratorState._reset_state(reset_partial_state=False)
    validation = metrics(tmp_path / "clip", "clip")[-1]["validation"]
    assert {"retrieval_top1", "binding_color", "binding_shape", "binding_cell"} <= set(validation)
    assert all(0 <= v <= 1 for v in validation.values())


@pytest.mark.parametrize(("configured", "launcher", "expected"),
                         [(None, "bf16", "bf16"), ("no", "bf16", "no"), ("bf16", None, "bf16"), (None, None, "no")])
def test_mixed_precision_comes_from_the_config_else_the_launcher(tmp_path, monkeypatch, configured, launcher,
                                                                 expected):
    """`optim.mixed_precision` unset takes `accelerate launch --mixed_precision` (which reaches the process as
    ACCELERATE_MIXED_PRECISION); a configured value overrides it."""
    import argparse

    from accelerate.state import AcceleratorState

    from training.stage import setup_stage

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    overrides = [] if configured is None else ["--vae.optim.mixed_precision", configured]
    args = argparse.Namespace(config=MICRO, output_dir=str(tmp_path), max_steps=None, resume=None, fsdp=False)
    try:
        stage = setup_stage("vae", args, overrides, lambda c: c.vae.optim, cpu=True)
        assert stage.accelerator.mixed_precision == expected
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def test_every_process_checks_the_output_folder_before_the_main_one_writes(tmp_path, monkeypatch):
    """The output-folder check reads `_work/`: the main process creates `_work/<stage>` only past a barrier after the
    check, so a slower process never finds it half-made (it refused its own run's folder)."""
    import argparse

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    import training.stage as stage_module

    events = []
    check = stage_module.refuse_foreign_output
    monkeypatch.setattr(stage_module, "refuse_foreign_output", lambda *a, **k: (events.append("check"), check(*a, **k)))
    monkeypatch.setattr(Accelerator, "wait_for_everyone",
                        lambda self: events.append(f"barrier, _work made: {(tmp_path / '_work').exists()}"))
    args = argparse.Namespace(config=MICRO, output_dir=str(tmp_path), max_steps=None, resume=None, fsdp=False)
    try:
        stage_module.setup_stage("vae", args, [], lambda c: c.vae.optim, cpu=True)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
    assert events[:2] == ["check", "barrier, _work made: False"]
    assert (tmp_path / "_work" / "vae").is_dir()


def test_collective_timeout_reaches_the_process_group(tmp_path, capsys):
    """--collective-timeout is the process group's timeout (torch's NCCL default, 10 min, is shorter than the
    main-only phases can take): with 3 s, a process waiting at a barrier for one that sleeps 12 s fails after about
    3 s. 0 and inf are refused by name."""
    from training.config import stage_parser

    script = tmp_path / "wait.py"
    script.write_text(f'''
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import torch.distributed as dist
from training.config import stage_parser
from training.stage import setup_stage
args, overrides = stage_parser("A stage.", "training.train_vae").parse_known_args(sys.argv[1:])
setup_stage("vae", args, overrides, lambda c: c.vae.optim)
if dist.get_rank() == 1:
    time.sleep(12)
else:
    start = time.perf_counter()
    try:
        dist.barrier()
        print("the barrier passed", flush=True)
    except Exception:
        print(f"timed out after {{time.perf_counter() - start:.0f}} s", flush=True)
''')
    result = launch(str(script), "--config", MICRO, "--output-dir", str(tmp_path / "run"), "--collective-timeout",
                    "0.05", processes=2, script=True)
    waited = [line for line in result.stdout.splitlines() if line.startswith(("timed out", "the barrier"))]
    assert len(waited) == 1 and waited[0].startswith("timed out") and int(waited[0].split()[3]) < 9, result.stdout

    parser = stage_parser("A stage.", "training.train_vae")
    assert parser.parse_known_args(["--output-dir", "x"])[0].collective_timeout == 60
    for bad in ("0", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_known_args(["--output-dir", "x", "--collective-timeout", bad])
        assert f"--collective-timeout: must be more than 0 and at most 10080 minutes (a week), got {bad}" in \
            capsys.readouterr().err


@pytest.mark.parametrize(("n", "world", "batch"), [(11, 2, 3), (5, 3, 4), (12, 2, 3), (1, 4, 2), (7, 1, 3)])
def test_feature_cache_shares_come_back_in_dataset_order(n, world, batch):
    """`decoder.cache` with several processes: each encodes its share of every global batch (short shares padded),
    and the gathered rows, padding dropped, are the whole dataset in order on every process."""
    from types import SimpleNamespace

    from training.train_decoder import encode_all, shard_indices

    dataset = [{"x": torch.tensor(i)} for i in range(n)]
    shares = [shard_indices(n, rank, world, batch) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1
    assert len(shares[0]) % batch == 0 if world > 1 else shares[0] == list(range(n))  # one process: no padding
    assert sorted({i for s in shares for i in s}) == list(range(n))
    def process(rank: int) -> SimpleNamespace:
        calls = iter(range(len(shares[0]) // batch))

        def gather(t: torch.Tensor) -> torch.Tensor:
            """This process's rows must be its own share; the others' are what they would give, in rank order."""
            g = next(calls)
            part = [torch.tensor(s[g * batch:(g + 1) * batch]).float() for s in shares]
            assert torch.equal(t, part[rank])
            return torch.cat(part)

        return SimpleNamespace(num_processes=world, process_index=rank, is_main_process=rank == 0, gather=gather)

    for rank in range(world):
        out = encode_all(dataset, lambda b: {"x": b["x"].float()}, process(rank), batch)
        assert out["x"].tolist() == list(range(n))


def test_feature_cache_key_separates_text_only_runs(tmp_path):
    """A text-only run caches no image embeddings, so its cache must not serve a run with a prior (and back)."""
    import dataclasses

    from training.train_decoder import features_key

    cfg = load_config(MICRO)
    with_prior, text_only = features_key(cfg, tmp_path), features_key(dataclasses.replace(cfg, prior=None), tmp_path)
    assert with_prior != text_only
    assert features_key(cfg, tmp_path) == with_prior  # deterministic


def test_resumed_optimizer_takes_the_configs_settings():
    """`apply_optim_config` puts this run's lr (at the schedule's step), betas and weight decay into every param
    group, and into what the schedule reports and multiplies from."""
    from types import SimpleNamespace

    from training.config import OptimConfig
    from training.loop import apply_optim_config, lr_factor

    model = torch.nn.Linear(3, 2)
    old = OptimConfig(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=2, lr_schedule="cosine")
    optimizer = torch.optim.AdamW(model.parameters(), lr=old.lr, betas=old.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, old, 10))
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    new = OptimConfig(lr=1e-5, betas=(0.8, 0.95), weight_decay=0.1, warmup_steps=2, lr_schedule="cosine")
    printed = []
    apply_optim_config(SimpleNamespace(name="vae", max_steps=10, print=printed.append), optimizer, scheduler, new)
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-5 * lr_factor(4, new, 10))
    assert group["betas"] == (0.8, 0.95) and group["weight_decay"] == 0.1
    assert scheduler.get_last_lr() == [group["lr"]]
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * lr_factor(5, new, 10))
    assert "resuming with lr 1e-05" in printed[0]


def test_a_step_the_fp16_scaler_skips_is_reported():
    """`optimizer_step` tells a skipped fp16 step (inf gradients: the scaler lowers its scale) from a taken one."""
    from training.loop import optimizer_step

    model = torch.nn.Linear(3, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)

    class ScaledOptimizer:  # what Accelerate's optimizer does in fp16: step through the scaler, then update it
        def step(self) -> None:
            scaler.step(inner)
            scaler.update()

    for bad, expected in ((False, False), (True, True)):
        inner.zero_grad()
        scaler.scale(model(torch.ones(1, 3)).sum()).backward()
        if bad:
            model.weight.grad[0, 0] = float("inf")
        before = model.weight.detach().clone()
        assert optimizer_step(ScaledOptimizer(), scaler) is expected
        assert torch.equal(model.weight, before) is expected
    assert optimizer_step(inner, None) is False


def test_ema_switched_on_at_resume_starts_from_the_resumed_weights(tmp_path, capsys):
    """A checkpoint written without EMA resumed with `optim.ema_decay`: the EMA starts from the resumed weights
    (it used to fail on the missing ema.safetensors)."""
    from accelerate.state import AcceleratorState

    from training import train_vae

    common = ["--config", MICRO, "--output-dir", str(tmp_path)]
    train_vae.main([*common, "--max-steps", "2", "--vae.optim.ema_decay", "null"])
    AcceleratorState._reset_state(reset_partial_state=False)
    train_vae.main([*common, "--max-steps", "3", "--vae.optim.ema_decay", "0.9", "--resume", "latest"])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert "has no EMA weights" in capsys.readouterr().out
    assert (tmp_path / "_work" / "vae" / "checkpoint-3" / "ema.safetensors").is_file()


def test_gradient_checkpointing_where_a_stage_has_none_is_refused():
    with pytest.raises(ValueError, match="vae.optim.gradient_checkpointing: the vae stage has no gradient"):
        load_config(MICRO, ["--vae.optim.gradient_checkpointing", "true"])
    with pytest.raises(ValueError, match="max_grad_norm=-1.0 must be > 0"):
        load_config(MICRO, ["--vae.optim.max_grad_norm", "-1"])
    assert load_config(MICRO, ["--clip.optim.gradient_checkpointing", "true"]).clip.optim.gradient_checkpointing


def test_clip_stage_checkpoints_gradients_when_asked(tmp_path, monkeypatch):
    """`clip.optim.gradient_checkpointing` turns transformers' checkpointing on in the CLIP being trained."""
    from accelerate.state import AcceleratorState
    from transformers import CLIPModel

    from training import train_clip

    seen = []
    real = CLIPModel.gradient_checkpointing_enable
    monkeypatch.setattr(CLIPModel, "gradient_checkpointing_enable",
                        lambda self, *a, **k: seen.append(self) or real(self, *a, **k))
    try:
        train_clip.main(["--config", MICRO, "--output-dir", str(tmp_path), "--max-steps", "1",
                         "--clip.optim.gradient_checkpointing", "true"])
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
    assert len(seen) == 1 and seen[0].text_model.encoder.gradient_checkpointing


def test_clip_stage_takes_a_pretrained_clip_and_records_the_config(tmp_path):
    """`clip.pretrained`: the stage copies a CLIP folder's towers and tokenizer in, and records the config."""
    from accelerate.state import AcceleratorState
    from transformers import CLIPModel

    from latent_diffusion.models.clip import clip_config, train_clip_tokenizer
    from training import train_clip

    cfg = load_config(MICRO)
    source, out = tmp_path / "clip", tmp_path / "out"
    tokenizer = train_clip_tokenizer(["a red circle", "a blue square on the left"] * 8, source,
                                     vocab_size=cfg.clip.vocab_size, model_max_length=cfg.clip.max_length)
    CLIPModel(clip_config(cfg.clip.preset, tokenizer, max_position_embeddings=cfg.clip.max_length,
                          image_size=cfg.data.image_size)).save_pretrained(source)
    try:
        train_clip.main(["--config", MICRO, "--output-dir", str(out), "--clip.pretrained", str(source)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)
    assert all((out / part).is_dir() for part in ("tokenizer", "text_encoder", "image_encoder"))
    assert f"pretrained: {source}" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_accelerate_engines_the_stages_do_not_run_under_are_refused(kind):
    from accelerate.utils import DistributedType

    from training.stage import check_distributed_type

    with pytest.raises(ValueError, match=f"distributed_type {DistributedType[kind].value}.*multi_gpu.yaml"):
        check_distributed_type(DistributedType[kind])
    for fine in ("NO", "MULTI_CPU", "MULTI_GPU"):
        check_distributed_type(DistributedType[fine])


def test_a_resumed_stage_names_only_its_own_changed_settings(tmp_path, capsys):
    """Under one output folder (train_all's), each stage compares a resumed run with its own record: a change to
    another stage's section is not that stage's note, and a later stage still sees its own change after an
    earlier one has rewritten the shared config.yaml."""
    from accelerate.state import AcceleratorState

    from training import train_clip, train_vae

    common = ["--config", MICRO, "--output-dir", str(tmp_path)]
    for stage in (train_clip, train_vae):
        stage.main([*common, "--max-steps", "2"])
        AcceleratorState._reset_state(reset_partial_state=False)
    changed = ["--clip.optim.weight_decay", "0.25", "--vae.optim.weight_decay", "0.5"]
    capsys.readouterr()
    for stage, name in ((train_clip, "clip"), (train_vae, "vae")):
        (tmp_path / "_work" / name / "DONE").unlink()
        stage.main([*common, "--max-steps", "3", "--resume", "latest", *changed])
        AcceleratorState._reset_state(reset_partial_state=False)
        notes = [line for line in capsys.readouterr().out.splitlines() if "other settings than" in line]
        assert len(notes) == 1 and f"{name}.optim.weight_decay: " in notes[0], notes
        other = "vae" if name == "clip" else "clip"
        assert f"{other}.optim" not in notes[0] and "max_steps" not in notes[0]
        assert (tmp_path / "_work" / name / "config-before-step-2.yaml").is_file()


def test_a_resume_path_applies_to_the_stage_that_wrote_it(tmp_path):
    from accelerate import Accelerator

    from training.checkpoint import resolve_resume
    from training.stage import Stage
    from training.train_all import _resume_owner, _with_resume

    checkpoint = tmp_path / "_work" / "vae" / "stale-checkpoint-125"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    # train_all: the VAE resumes from it, every other stage from its own latest
    assert _resume_owner(str(checkpoint), tmp_path) == "vae" and _resume_owner("latest", tmp_path) is None
    argv = ["--config", MICRO, "--resume", str(checkpoint), "--max-steps", "3"]
    assert _with_resume(argv, "latest") == ["--config", MICRO, "--resume", "latest", "--max-steps", "3"]
    assert _with_resume([f"--resume={checkpoint}"], "latest") == ["--resume=latest"]
    with pytest.raises(ValueError, match="train_all takes 'latest' or a checkpoint in .*_work/<stage>/"):
        _resume_owner(str(tmp_path / "elsewhere" / "checkpoint-3"), tmp_path)
    # a stage on its own refuses another stage's checkpoint by name
    stage = Stage("prior", load_config(MICRO), Accelerator(cpu=True), tmp_path, tmp_path / "_work" / "prior", 4,
                  str(checkpoint))
    with pytest.raises(ValueError, match="that is a checkpoint of the vae stage, not of prior"):
        resolve_resume(stage)
    stage.resume = str(checkpoint).replace("vae", "prior")
    (tmp_path / "_work" / "prior" / "stale-checkpoint-125").mkdir(parents=True)
    (tmp_path / "_work" / "prior" / "stale-checkpoint-125" / "trainer_state.json").write_text("{}")
    assert resolve_resume(stage) == Path(stage.resume)


def test_a_text_only_decoder_keeps_the_image_encoder_for_evaluation(one_process_run, tmp_path, capsys):
    import shutil

    from accelerate.state import AcceleratorState

    from latent_diffusion import TextToImagePipeline
    from training import train_decoder

    shutil.copytree(one_process_run, tmp_path / "text", ignore=shutil.ignore_patterns("decoder"))
    train_decoder.main(["--config", MICRO, "--output-dir", str(tmp_path / "text"), "--max-steps", "1",
                        "--prior", "null"])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert "decoder: note: optim.warmup_steps 1 >= max_steps 1: the whole run is warm-up" in capsys.readouterr().out
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "text")
    assert pipe.prior is None and pipe.image_encoder is not None  # `evaluate` scores with it
    with pytest.raises(ValueError, match="image variations need a decoder conditioned on CLIP image embeddings"):
        pipe.image_variations(torch.rand(3, 16, 16), progress=False)
    with pytest.raises(ValueError, match="this pipeline's decoder is conditioned on text alone"):
        pipe("a red circle", image_embeds=torch.zeros(1, 32), num_inference_steps=1, progress=False)


def test_a_stage_refuses_a_folder_it_would_overwrite_and_settings_that_cannot_apply(tiny_pipeline_dir, tmp_path):
    import shutil

    from accelerate.state import AcceleratorState

    from training import train_vae

    saved = shutil.copytree(tiny_pipeline_dir, tmp_path / "saved")  # written by save_pretrained: no _work/
    cases = [
        (["--output-dir", str(saved)], r"already holds a pipeline or LoRA \(model_index.json\) with no training "
                                       r"record of the training stages here .* move its vae/ aside first"),
        (["--output-dir", str(tmp_path / "a"), "--vae.optim.mixed_precision", "fp16"],
         r"vae: optim.mixed_precision fp16 \(the config or the command line\) needs a GPU"),
        (["--output-dir", str(tmp_path / "b"), "--max-steps", "3", "--vae.optim.max_steps=5"],
         "--max-steps 3 sets every stage's optim.max_steps, and --vae.optim.max_steps one of them"),
    ]
    for args, message in cases:
        try:
            with pytest.raises(ValueError, match=message):
                train_vae.main(["--config", MICRO, *args])
        finally:
            AcceleratorState._reset_state(reset_partial_state=False)
    assert not (saved / "_work").exists() and not (tmp_path / "a").exists()
    (saved / "vae").rename(tmp_path / "vae-aside")  # the slot cleared: a new VAE trains into the pipeline
    train_vae.main(["--config", MICRO, "--output-dir", str(saved), "--max-steps", "1"])
    AcceleratorState._reset_state(reset_partial_state=False)
    assert (saved / "vae" / "model.safetensors").is_file() and (saved / "_work" / "vae" / "DONE").is_file()


def test_stage_help_keeps_flags_whole(monkeypatch):
    """argparse wraps at hyphens by default ("'--" at one line's end, "decoder.optim.lr" at the next's start)."""
    from training.config import stage_parser

    for columns in ("50", "64", "80"):
        monkeypatch.setenv("COLUMNS", columns)
        text = stage_parser("Train.", "training.train_decoder").format_help()
        assert "'--decoder.optim.lr 1e-4'" in " ".join(text.split()), text
        assert "--section.key" in text


def test_fsdp_is_offered_only_by_the_stages_that_shard(capsys):
    """train_clip does not shard: its --help leaves --fsdp out, and the flag is still refused by name."""
    from training import train_clip

    for module, shardable in (("train_clip", False), ("train_decoder", True)):
        with pytest.raises(SystemExit):
            __import__(f"training.{module}", fromlist=["main"]).main(["--help"])
        assert ("--fsdp" in capsys.readouterr().out) == shardable
    with pytest.raises(ValueError, match="clip: --fsdp is not supported by this stage"):
        train_clip.main(["--config", MICRO, "--output-dir", "unused", "--fsdp"])
