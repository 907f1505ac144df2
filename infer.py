"""Answer prompts about images with a PaliGemma checkpoint.

    python infer.py --model google/paligemma-3b-pt-224 --image cat.jpg --prompt "caption en"
    python infer.py --model out/ --image a.jpg --image b.png --prompt "detect circle" --out boxes.png
    python infer.py --model lora-out/ --image a.jpg --prompt "caption en"     # an adapter on its base model

Prints one answer per image on stdout (nothing else there), timings on stderr. One prompt serves all
images, or give one per image. With `--out`, the boxes of a `detect` answer (and the masks of a `segment`
answer, decoded by the VQ-VAE of vqvae.py) are drawn on the image.
Bad input (a missing or unreadable image, a checkpoint without weights, an option out of range, an
`--out` that cannot be written or that would overwrite an input image) is one line on stderr and
exit code 2, before the model is loaded where it can be known then.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from checkpoint import write_atomically
from cli import add_device_options, device_and_dtype, fail, number
from detections import SEG, Detection, parse_detections
from lora import load_adapter, read_adapter_config
from paligemma import PaliGemma
from processor import Processor, load_image, to_rgb
from vqvae import VQVAE


COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 200, 200),
           (240, 50, 230), (210, 180, 20))


def draw_detections(image: Image.Image, detections: list[Detection]) -> Image.Image:
    """A copy of `image` with each object's box and label, and its mask (a translucent fill with an outline)
    when it has one. Images under 512 pixels are drawn enlarged, so that labels can be read; a label sits
    above its box where there is room, else inside it, and never leaves the image."""
    scale = max(1, round(512 / max(image.size)))
    canvas = to_rgb(image).resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    line = max(2, canvas.height // 250)
    overlay = Image.new("RGBA", canvas.size)
    for i, d in enumerate(detections):
        if d.mask is not None:
            mask = Image.fromarray(d.mask.astype(np.uint8) * 255).resize(canvas.size, Image.Resampling.NEAREST)
            overlay.paste((*COLOURS[i % len(COLOURS)], 120), mask=mask)
            edge = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * line + 1)))
            overlay.paste((*COLOURS[i % len(COLOURS)], 255), mask=edge)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, canvas.height // 32))
    for i, d in enumerate(detections):
        colour = COLOURS[i % len(COLOURS)]
        x1, y1, x2, y2 = (v * scale for v in d.box)
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        if d.label:
            left, top, right, bottom = draw.textbbox((0, 0), d.label, font=font)
            w, h = right - left + 6, bottom - top + 6
            x = min(max(x1, 0), canvas.width - w)
            y = y1 - h if y1 >= h else min(y1, canvas.height - h)
            draw.rectangle((x, y, x + w, y + h), fill=colour)
            dark = sum(c * w for c, w in zip(colour, (0.3, 0.59, 0.11))) < 150
            draw.text((x + 3 - left, y + 3 - top), d.label, fill="white" if dark else "black", font=font)
    return canvas


def output_paths(out: str, images: list[str]) -> list[Path]:
    """Where the drawings go: --out itself, or with several images NAME_0.png, NAME_1.png, ...; checked
    to be writable image files that are not among the input images."""
    out = Path(out)
    if out.is_dir():
        fail(f"--out {out} is a folder; give a file name such as {out / 'boxes.png'}")
    if out.suffix.lower() not in Image.registered_extensions() or Image.registered_extensions()[out.suffix.lower()] \
            not in Image.SAVE:
        fail(f"--out {out}: give an image file name ending in .png or .jpg (the extension says the format)")
    if not out.parent.is_dir():
        fail(f"--out {out}: the folder {out.parent} does not exist")
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    inputs = {Path(image).resolve() for image in images}
    for path in paths:
        if path.resolve() in inputs:
            fail(f"--out {path} is one of the input images; it would be overwritten")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            fail(f"--out {path}: not writable (permission denied)")
    return paths


def save_image(image: Image.Image, path: Path):
    """Written whole (checkpoint.write_atomically): never half an image."""
    try:
        write_atomically(path, lambda tmp: image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()]))
    except OSError as e:
        fail(f"--out {path}: cannot be written ({e.strerror or e})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="google/paligemma-3b-pt-224",
                   help="checkpoint folder or hub id; a folder holding a LoRA adapter loads its base and applies it")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder (PEFT's format) to apply to --model")
    p.add_argument("--image", action="append", required=True, help="an image file; repeat for several")
    p.add_argument("--prompt", action="append", required=True, help="e.g. 'caption en'; one for all images or one each")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=64)
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0, help="1: no top-p")
    p.add_argument("--top-k", type=number(int, 0), default=0, help="0: no top-k")
    p.add_argument("--seed", type=int, default=None)
    add_device_options(p)
    p.add_argument("--out", default=None, help="image file to draw the boxes and masks of the answer on (with several "
                   "images, _0, _1, ... are added)")
    p.add_argument("--vae", default=None, help="the VQ-VAE npz that decodes <seg> tokens into masks (default: "
                   "big_vision's vae-oid.npz from the hub); loaded only when an answer holds <seg> tokens")
    args = p.parse_args(argv)

    if len(args.prompt) not in (1, len(args.image)):
        fail(f"{len(args.prompt)} prompts for {len(args.image)} images: give one prompt, or one per image")
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    out_paths = output_paths(args.out, args.image) if args.out else []
    if args.vae and not Path(args.vae).is_file():
        fail(f"--vae {args.vae}: no such file (a VQ-VAE npz such as vae-oid.npz)")
    device, dtype = device_and_dtype(args)
    try:
        images = [load_image(path) for path in args.image]
    except ValueError as e:
        fail(str(e))

    start = time.perf_counter()
    try:
        adapter = args.adapter or (args.model if (Path(args.model) / "adapter_config.json").is_file() else None)
        base = args.model if args.adapter or not adapter else read_adapter_config(adapter)["base_model_name_or_path"]
        model = PaliGemma.from_pretrained(base, dtype=dtype, device=device)
        processor = Processor.from_pretrained(base)
        if adapter:
            load_adapter(model, adapter)
    except (OSError, ValueError) as e:
        fail(str(e))
    print(f"loaded {base}" + (f" with the adapter {adapter}" if adapter else "")
          + f" ({dtype}, {device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    batch = {k: v.to(device) for k, v in processor(images, prompts).items()}
    start = time.perf_counter()
    try:
        new = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    except ValueError as e:
        fail(str(e))
    seconds = time.perf_counter() - start
    n_tokens = int((new != processor.tokenizer.pad_id).sum())
    print(f"prompt {batch['input_ids'].shape[1]} tokens x {len(images)}; "
          f"generated {n_tokens} tokens in {seconds:.2f} s "
          f"({n_tokens / seconds:.1f} tokens/s, prompt included)", file=sys.stderr)

    answers = [processor.decode(row).strip() for row in new.tolist()]
    for answer in answers:
        print(" ".join(answer.splitlines()))
    vae = None
    if out_paths and any(re.search(SEG, answer) for answer in answers):
        try:
            vae = VQVAE.from_pretrained(args.vae)
        except (OSError, ValueError) as e:
            print(f"the answers hold masks, which are not drawn: {e}", file=sys.stderr)
    for image, answer, out, name in zip(images, answers, out_paths, args.image):
        detections = parse_detections(answer, *image.size, vae=vae)
        if detections:
            save_image(draw_detections(image, detections), out)
            masks = sum(d.mask is not None for d in detections)
            print(f"{out}: {len(detections)} boxes" + (f" and {masks} masks" if masks else "") + " drawn",
                  file=sys.stderr)
        else:
            print(f"{name}: the answer holds no boxes; nothing written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
