"""latent_diffusion: latent, text-conditioned diffusion with a CLIP prior."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in transformers; import it on first use so `import latent_diffusion` stays light.
    if name == "TextToImagePipeline":
        from latent_diffusion.pipeline import TextToImagePipeline

        return TextToImagePipeline
    raise AttributeError(f"module 'latent_diffusion' has no attribute {name!r}")


__all__ = ["TextToImagePipeline", "__version__"]
