"""Stage 3: the diffusion prior (Ramesh et al. 2022, §2.2): x0-prediction MSE on CLIP image embeddings,
normalised per dimension by a mean/std measured on the training data and stored in the prior. Captions are
dropped (replaced by the empty caption) with probability `text_dropout`, for classifier-free guidance.

Validation reports the cosine similarity between sampled and true image embeddings on held-out captions next to
a shuffled-caption baseline (the same samples scored against another caption's true embedding).

    accelerate launch -m training.train_prior --config configs/shapes/tiny.yaml --output-dir runs/tiny

Writes `prior/` into the output folder (needs `train_clip` first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latent_diffusion.diffusion import Denoiser, NoiseSchedule, diffusion_loss, get_sampler, initial_noise_scale
from latent_diffusion.io import config_to_dict, save_json
from latent_diffusion.models import DiffusionPrior, DiffusionPriorConfig
from latent_diffusion.pipeline import PipelineConfig
from training.common import SCHEDULE_FILE, build_dataset, encode_batch, load_clip
from training.config import run_from_command_line, stage_parser
from training.loop import fit
from training.stage import setup_stage


def main(argv: list[str] | None = None) -> None:
    args, overrides = stage_parser(__doc__, "training.train_prior").parse_known_args(argv)
    stage = setup_stage("prior", args, overrides, lambda c: c.prior.optim if c.prior else c.decoder.optim)
    cfg, acc = stage.config, stage.accelerator
    if cfg.prior is None:
        stage.print("prior: disabled in the config (prior: null); nothing to train")
        return
    if stage.skip_if_done("prior"):
        return
    pc = cfg.prior
    pipe_cfg = PipelineConfig()
    tokenizer, text_encoder, image_encoder = load_clip(stage.output_dir, acc.device, onednn=pc.optim.onednn_linear)
    dataset = build_dataset(cfg.data, cfg.seed)
    heldout = build_dataset(cfg.data, cfg.seed, heldout=True)

    def features(items: list[dict] | dict, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        batch = items if isinstance(items, dict) else torch.utils.data.default_collate(items)
        captions = list(batch["caption"])
        if drop is not None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return encode_batch(tokenizer, text_encoder, image_encoder, captions, batch["pixel_values"],
                            pipe_cfg.image_mean, pipe_cfg.image_std)

    tc = text_encoder.config
    torch.manual_seed(cfg.seed)
    prior = DiffusionPrior(DiffusionPriorConfig(
        embed_dim=image_encoder.config.projection_dim, text_embed_dim=tc.projection_dim,
        text_states_dim=tc.hidden_size, max_text_tokens=tokenizer.model_max_length, width=pc.width,
        layers=pc.layers, heads=pc.heads)).to(acc.device)
    # Per-dimension statistics of the training image embeddings (deterministic: the first batches).
    n_stats = min(len(dataset), pc.stats_samples)
    embeds = torch.cat([features([dataset[i] for i in range(lo, min(lo + 256, n_stats))])["image_embeds"]
                        for lo in range(0, n_stats, 256)])
    prior.set_embedding_stats(embeds.mean(0), embeds.std(0))
    schedule = NoiseSchedule(pc.schedule)

    def loss_fn(model, batch, rnd, step):
        f = features(batch, drop=rnd.rand() < pc.text_dropout)
        x0 = prior.normalize(f["image_embeds"])  # the buffers are identical on every process
        t = rnd.randint(schedule.num_train_timesteps)
        noise = rnd.randn(x0.shape[1])

        def model_fn(x_t, tt):
            return model(x_t, tt, f["text_states"], f["text_embeds"], f["text_mask"])

        return diffusion_loss(model_fn, x0, schedule, timesteps=t, noise=noise), {}

    def validate(model, step):
        n = min(pc.heldout_captions, len(heldout))
        items = [heldout[i] for i in range(n)]
        f, empty = features(items), features(items, drop=torch.ones(n, dtype=torch.bool))
        denoise = Denoiser(model, schedule, clip_denoised=pipe_cfg.prior_clip_denoised)

        def guided(x, sigma):
            u = denoise(x, sigma, text_states=empty["text_states"], text_embeds=empty["text_embeds"],
                        text_mask=empty["text_mask"])
            c = denoise(x, sigma, text_states=f["text_states"], text_embeds=f["text_embeds"],
                        text_mask=f["text_mask"])
            return u + 4.0 * (c - u)

        sigmas = schedule.sampling_sigmas(25, spacing="trailing").to(acc.device)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, model.config.embed_dim, generator=g).to(acc.device) * initial_noise_scale(sigmas[0])
        pred = model.denormalize(get_sampler("ddim")(guided, x, sigmas))
        true = f["image_embeds"]
        cos = F.cosine_similarity(pred, true).mean().item()
        shuffled = F.cosine_similarity(pred, true.roll(1, dims=0)).mean().item()
        return {"cosine": cos, "cosine_shuffled_captions": shuffled}

    prior = fit(stage, prior, dataset, loss_fn, pc.optim, validate=validate)
    if acc.is_main_process:
        prior.save_pretrained(stage.output_dir / "prior")
        # the schedule it was trained on, for the decoder stage to record in model_index.json (a later command's
        # config need not repeat this one's overrides)
        save_json(stage.output_dir / "prior" / SCHEDULE_FILE, config_to_dict(pc.schedule))
    stage.mark_done()
    acc.wait_for_everyone()
    stage.print(f"prior: wrote {stage.output_dir / 'prior'}")


if __name__ == "__main__":
    run_from_command_line(main)
