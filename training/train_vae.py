"""Stage 2: the KL autoencoder (Rombach et al. 2022, §3): L1 (+ optional L2) reconstruction plus a small-weight
KL to N(0, I), and optionally (`gan_weight` > 0) a PatchGAN hinge loss from step `gan_start` (Esser et al. 2021);
afterwards the latent scaling factor 1/std(z) is measured on training data and stored in the VAE config
(Rombach et al. 2022, App. G).

    accelerate launch -m training.train_vae --config configs/shapes/tiny.yaml --output-dir runs/tiny

Writes `vae/` into the output folder.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from latent_diffusion.models import (
    AutoencoderKL,
    AutoencoderKLConfig,
    PatchDiscriminator,
    PatchDiscriminatorConfig,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from training.common import build_dataset
from training.config import run_from_command_line, stage_parser
from training.loop import fit
from training.stage import setup_stage


def random_crop(x: torch.Tensor, size: int, u: torch.Tensor) -> torch.Tensor:
    """One random size×size crop per image; offsets from uniforms u (B, 2) in [0, 1). x: (B, C, H, W)."""
    H, W = x.shape[-2:]
    tops = (u[:, 0] * (H - size + 1)).long().tolist()
    lefts = (u[:, 1] * (W - size + 1)).long().tolist()
    return torch.stack([img[:, t:t + size, l:l + size] for img, t, l in zip(x, tops, lefts)])


class AutoencoderWithDiscriminator(nn.Module):
    """The autoencoder and its PatchGAN, trained together by one optimizer. The generator's term sees the
    discriminator through detached parameters and the discriminator's terms see detached reconstructions, so a
    single backward pass gives each network the gradient of its own objective only. They share the learning
    rate schedule and the gradient clipping (of their joint norm); before `gan_start` the discriminator's
    gradient is exactly zero, so AdamW (without weight decay, the VAE default) leaves it as initialised."""

    def __init__(self, vae: AutoencoderKL, disc: PatchDiscriminator):
        super().__init__()
        self.vae, self.disc = vae, disc

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) → reconstruction, posterior, and patch logits (B, 1, h, w) of D on x̂ (for the
        generator), on x and on detached x̂ (for the discriminator)."""
        recon, posterior = self.vae(x, noise=noise)
        frozen = {name: p.detach() for name, p in self.disc.named_parameters()}
        return {"recon": recon, "posterior": posterior, "fake_for_g": functional_call(self.disc, frozen, (recon,)),
                "real": self.disc(x), "fake": self.disc(recon.detach())}


def main(argv: list[str] | None = None) -> None:
    args, overrides = stage_parser(__doc__, "training.train_vae").parse_known_args(argv)
    stage = setup_stage("vae", args, overrides, lambda c: c.vae.optim)
    cfg, acc = stage.config, stage.accelerator
    if stage.skip_if_done("vae"):
        return
    vc = cfg.vae
    dataset = build_dataset(cfg.data, cfg.seed)
    heldout = build_dataset(cfg.data, cfg.seed, heldout=True)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(AutoencoderKLConfig(channels=vc.channels, latent_channels=vc.latent_channels,
                                            layers_per_block=vc.layers_per_block, norm_groups=vc.norm_groups,
                                            mid_attention=vc.mid_attention, scaling_factor=1.0))
    f = vae.config.downsample_factor
    if vc.crop_size is not None and vc.crop_size % f:
        raise ValueError(f"vae.crop_size={vc.crop_size} must be a multiple of the downsampling factor {f}")

    model: nn.Module = vae
    if vc.gan_weight > 0:
        if stage.fsdp:
            raise ValueError("vae.gan_weight > 0 is not supported with --fsdp; train the VAE data-parallel")
        side = vc.crop_size or cfg.data.image_size
        if side // 2 ** vc.disc_layers < 3:
            raise ValueError(f"vae.disc_layers={vc.disc_layers} leaves no patch of a {side}-pixel training image "
                             f"(it needs at least {3 * 2 ** vc.disc_layers} pixels): use fewer layers")
        model = AutoencoderWithDiscriminator(vae, PatchDiscriminator(PatchDiscriminatorConfig(
            channels=vc.disc_channels, layers=vc.disc_layers)))

    def loss_fn(model, batch, rnd, step):
        x = batch["pixel_values"].to(acc.device)
        if vc.crop_size and vc.crop_size < x.shape[-1]:
            x = random_crop(x, vc.crop_size, torch.stack([rnd.rand(), rnd.rand()], dim=1))
        c, f = vae.config.latent_channels, vae.config.downsample_factor
        noise = rnd.randn(c, x.shape[-2] // f, x.shape[-1] // f)
        if vc.gan_weight > 0:
            out = model(x, noise)
            recon, posterior = out["recon"], out["posterior"]
        else:
            recon, posterior = model(x, noise=noise)
        l1 = (recon - x).abs().mean()
        loss = l1 + vc.kl_weight * posterior.kl().mean()
        if vc.l2_weight:
            loss = loss + vc.l2_weight * F.mse_loss(recon, x)
        logs = {"l1": l1.detach()}
        if vc.gan_weight > 0:
            g_loss, d_loss = hinge_generator_loss(out["fake_for_g"]), hinge_discriminator_loss(out["real"], out["fake"])
            on = float(step >= vc.gan_start)  # multiplied rather than skipped: every parameter always gets a gradient
            loss = loss + on * (vc.gan_weight * g_loss + d_loss)
            logs.update(g_loss=g_loss.detach(), d_loss=d_loss.detach())
        return loss, logs

    def validate(model, step):
        ae = model.vae if isinstance(model, AutoencoderWithDiscriminator) else model
        x = torch.stack([heldout[i]["pixel_values"] for i in range(min(64, len(heldout)))]).to(acc.device)
        recon = ae.decode(ae.encode(x).mode())
        return {"heldout_l1": (recon - x).abs().mean().item()}

    trained = fit(stage, model, dataset, loss_fn, vc.optim, validate=validate)
    vae = trained.vae if isinstance(trained, AutoencoderWithDiscriminator) else trained  # the discriminator stays

    if acc.is_main_process:
        # The scaling factor makes the diffusion latents unit-variance (Rombach et al. 2022, App. G).
        with torch.no_grad():
            zs, n = [], min(len(dataset), vc.scale_samples)
            for b, lo in enumerate(range(0, n, 256)):
                x = torch.stack([dataset[i]["pixel_values"] for i in range(lo, min(lo + 256, n))]).to(acc.device)
                zs.append(vae.encode(x).sample(torch.Generator(acc.device).manual_seed(b)).flatten())
            std = torch.cat(zs).std().item()
        final = AutoencoderKL(replace(vae.config, scaling_factor=1.0 / std))
        final.load_state_dict(vae.state_dict())
        final.save_pretrained(stage.output_dir / "vae")
        stage.print(f"vae: latent std {std:.4f} → scaling_factor {1 / std:.4f}; wrote {stage.output_dir / 'vae'}")
    stage.mark_done()
    acc.wait_for_everyone()


if __name__ == "__main__":
    run_from_command_line(main)
