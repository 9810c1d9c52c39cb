"""The sample grid in README.md (assets/samples.png): 4 images (seeds 0-3) for each of six prompts from the shipped
pipeline, DPM-Solver++(2M) 20 steps, upscaled 2× (nearest) with the prompt above each row.

    python examples/readme_samples.py [--pipeline assets/shapes-64] [--out assets/samples.png]
"""

import argparse

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from latent_diffusion import TextToImagePipeline

PROMPTS = ["a red circle on the left", "a large blue square in the center", "a small yellow triangle at the top",
           "a green star", "a purple circle above an orange square", "a black cross to the right of a cyan diamond"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="assets/shapes-64")
    parser.add_argument("--out", default="assets/samples.png")
    args = parser.parse_args()
    pipe = TextToImagePipeline.from_pretrained(args.pipeline)
    rows = [pipe(p, num_images_per_prompt=4, num_inference_steps=20, seed=0, progress=False).images
            for p in tqdm(PROMPTS, desc="prompts")]
    S, pad = 128, 4
    canvas = Image.new("RGB", (4 * (S + pad) + pad, len(PROMPTS) * (S + 22 + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (prompt, images) in enumerate(zip(PROMPTS, rows)):
        y = pad + r * (S + 22 + pad)
        draw.text((pad, y), prompt, fill=(0, 0, 0))
        for c, image in enumerate(images):
            x = pad + c * (S + pad)
            canvas.paste(image.resize((S, S), Image.NEAREST), (x, y + 18))
            draw.rectangle([x - 1, y + 17, x + S, y + 18 + S], outline=(200, 200, 200))
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
