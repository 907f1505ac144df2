"""Answer prompts about images with a PaliGemma checkpoint.

    python infer.py --model google/paligemma-3b-pt-224 --image cat.jpg --prompt "caption en"
    python infer.py --model out/ --image a.jpg --image b.png --prompt "detect circle" --out boxes.png
    python infer.py --model lora-out/ --image a.jpg --prompt "caption en"     # an adapter on its base model

Prints one answer per image on stdout (nothing else there), timings on stderr. One prompt serves all
images, or give one per image. Answers to `detect` and `segment` prompts can only take PaliGemma's form
(detections.AnswerConstraint; `--no-constrain` lets them run free). With `--out`, the boxes of a `detect`
answer (and the masks of a `segment` answer, decoded by the VQ-VAE of vqvae.py) are drawn on the image.
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
from cli import DefaultsFormatter, add_device_options, device_and_dtype, fail, number
from detections import SEG, AnswerConstraint, AnswerTokens, Detection, parse_detections, prompt_names
from lora import adapter_base, load_adapter
from paligemma import PaliGemma
from processor import MAX_PIXELS, Processor, load_image, to_rgb
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


def dashed_box(draw: ImageDraw.ImageDraw, box, fill, width: int = 1, dash: int = 6):
    """A rectangle's outline in dashes of `dash` pixels with gaps as long."""
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay), 1)
        for t in range(0, int(length), 2 * dash):
            f, g = t / length, min(t + dash, length) / length
            draw.line([(ax + f * (bx - ax), ay + f * (by - ay)), (ax + g * (bx - ax), ay + g * (by - ay))],
                      fill=fill, width=width)


def evaluation_picture(examples: list[tuple], vae=None, tile: int = 512) -> Image.Image:
    """Validation examples, (image, prefix, answer, target) each, in a grid of 4 a row: detect and segment
    answers drawn as infer.py draws them (boxes and masks in colour), their targets' boxes as thin dashed
    white outlines; under each image, its prompt, and for other prompts the answer and the target too."""
    font = ImageFont.load_default(size=15)
    lines, columns = 3, min(4, len(examples))
    grid = Image.new("RGB", (columns * tile, -(-len(examples) // columns) * (tile + 18 * lines)), "white")
    for i, (image, prefix, answer, target) in enumerate(examples):
        if prompt_names(prefix):
            canvas = draw_detections(image, parse_detections(answer, *image.size, vae=vae))
            scale = canvas.width / image.width
            draw = ImageDraw.Draw(canvas)
            for d in parse_detections(target, *image.size):
                dashed_box(draw, [v * scale for v in d.box], "white", width=max(2, canvas.height // 300))
            text = [prefix]
        else:
            canvas, text = to_rgb(image), [prefix, f"answer: {answer}", f"target: {target}"]
        canvas = canvas.resize((tile, tile), Image.Resampling.BILINEAR)
        x, y = i % columns * tile, i // columns * (tile + 18 * lines)
        grid.paste(canvas, (x, y))
        for k, line in enumerate(text):
            ImageDraw.Draw(grid).text((x + 4, y + tile + 2 + 18 * k), line[:tile // 8], fill="black", font=font)
    return grid


def output_paths(out: str, images: list[str], overwrite: bool) -> list[Path]:
    """Where the drawings go: --out itself, or with several images NAME_0.png, NAME_1.png, ...; checked
    to be writable image files that are not among the input images, nor files already there (unless
    `overwrite`)."""
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
        if path.exists() and not overwrite:
            fail(f"--out {path} exists: replace it with --overwrite, or choose another --out")
        if not os.access(path if path.exists() else path.parent, os.W_OK):
            fail(f"--out {path}: not writable (permission denied)")
    return paths


def save_image(image: Image.Image, path: Path):
    """Written whole (checkpoint.write_atomically): never half an image."""
    try:
        write_atomically(path, lambda tmp: image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()]))
    except OSError as e:
        fail(f"--out {path}: cannot be written ({e.strerror or e})")


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
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
    p.add_argument("--no-constrain", action="store_true", help="let detect and segment answers run free (by default "
                   "they can only take PaliGemma's form: boxes, <seg> tokens, the prompt's labels, ' ; ')")
    p.add_argument("--repeat-iou", type=number(float, 0, 1, above=True), default=0.9,
                   help="an object with an earlier one's label and IoU >= this ends the answer")
    add_device_options(p)
    p.add_argument("--quantize", choices=["nf4"], default=None, help="hold the linear layers' weights in 4 bits (NF4): "
                   "about a third of bfloat16's memory, for small GPUs")
    p.add_argument("--out", default=None, help="image file to draw the boxes and masks of the answer on (with several "
                   "images, _0, _1, ... are added)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out image that exists")
    p.add_argument("--max-image-pixels", type=number(int, 1), default=MAX_PIXELS,
                   help="larger images are refused (PIL's limit against decompression bombs)")
    p.add_argument("--vae", default=None, help="the VQ-VAE npz that decodes <seg> tokens into masks (default: "
                   "big_vision's vae-oid.npz from the hub); loaded only when an answer holds <seg> tokens")
    return p


def load(args, device, dtype) -> tuple[PaliGemma, Processor]:
    """--model (a checkpoint, or a folder holding an adapter: its base with it) and --adapter, on `device`."""
    start = time.perf_counter()
    try:
        adapter = args.adapter or (args.model if (Path(args.model) / "adapter_config.json").is_file() else None)
        base = args.model if args.adapter or not adapter else adapter_base(adapter)
        model = PaliGemma.from_pretrained(base, dtype=dtype, device=device,
                                          quantize=(lambda layer: True) if args.quantize else None)
        processor = Processor.from_pretrained(base)
        if adapter:
            load_adapter(model, adapter)
    except (OSError, ValueError) as e:
        fail(str(e))
    print(f"loaded {base}" + (f" with the adapter {adapter}" if adapter else "")
          + f" ({dtype}{', linear layers in NF4' if args.quantize else ''}, {device}) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return model, processor


def draw_answers(images, answers: list[str], out_paths: list[Path], names: list[str], vae_path: str | None):
    """Each answer's boxes and masks drawn on its image into its --out file (the VQ-VAE read only when an
    answer holds masks)."""
    vae = None
    if any(re.search(SEG, answer) for answer in answers):
        try:
            vae = VQVAE.from_pretrained(vae_path)
        except (OSError, ValueError) as e:
            print(f"the answers hold masks, which are not drawn: {e}", file=sys.stderr)
    for image, answer, out, name in zip(images, answers, out_paths, names):
        detections = parse_detections(answer, *image.size, vae=vae)
        if detections:
            save_image(draw_detections(image, detections), out)
            masks = sum(d.mask is not None for d in detections)
            print(f"{out}: {len(detections)} boxes" + (f" and {masks} masks" if masks else "") + " drawn",
                  file=sys.stderr)
        else:
            print(f"{name}: the answer holds no boxes; nothing written to {out}", file=sys.stderr)


def main(argv=None):
    args = options().parse_args(argv)
    if len(args.prompt) not in (1, len(args.image)):
        fail(f"{len(args.prompt)} prompts for {len(args.image)} images: give one prompt, or one per image")
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    out_paths = output_paths(args.out, args.image, args.overwrite) if args.out else []
    if args.vae and not Path(args.vae).is_file():
        fail(f"--vae {args.vae}: no such file (a VQ-VAE npz such as vae-oid.npz)")
    device, dtype = device_and_dtype(args)
    try:
        images = [load_image(path, args.max_image_pixels) for path in args.image]
    except ValueError as e:
        fail(str(e))

    model, processor = load(args, device, dtype)

    batch = {k: v.to(device) for k, v in processor(images, prompts).items()}
    grammar = None if args.no_constrain else AnswerConstraint.for_prompts(
        prompts, AnswerTokens(processor.tokenizer), model.config.text_config.vocab_size, args.repeat_iou)
    start = time.perf_counter()
    try:
        new = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                             max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k, seed=args.seed, constrain=grammar)
    except ValueError as e:
        fail(str(e))
    seconds = time.perf_counter() - start
    n_tokens = int((new != processor.tokenizer.pad_id).sum())
    print(f"prompt {batch['input_ids'].shape[1]} tokens x {len(images)}; "
          f"generated {n_tokens} tokens in {seconds:.2f} s "
          f"({n_tokens / seconds:.1f} tokens/s, prompt included)", file=sys.stderr)

    answers = [(grammar.answer(i, ids, processor.decode) if grammar else processor.decode(ids)).strip()
               for i, ids in enumerate(new.tolist())]
    for name, row in zip(args.image, grammar.rows if grammar else []):
        if row is not None and row.cut is not None:
            print(f"{name}: the answer repeated an object (IoU >= {args.repeat_iou}); it ends before it",
                  file=sys.stderr)
    for answer in answers:
        print(" ".join(answer.splitlines()))
    if out_paths:
        draw_answers(images, answers, out_paths, args.image, args.vae)


if __name__ == "__main__":
    main()
