"""Answer prompts about images with a PaliGemma checkpoint.

    python infer.py --model google/paligemma-3b-pt-224 --image cat.jpg --prompt "caption en"
    python infer.py --model out/ --image a.jpg --image b.png --prompt "detect circle" --out boxes.png

Prints one answer per image on stdout (nothing else there), timings on stderr. One prompt serves all
images, or give one per image. With `--out`, the boxes of a `detect` answer are drawn on the image.
Bad input (a missing or unreadable image, a checkpoint without weights, a prompt too long) is one
line on stderr and exit code 2.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from paligemma import PaliGemma, Processor, parse_detections


def fail(message: str):
    print(f"infer.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def draw_detections(image: Image.Image, detections) -> Image.Image:
    """A copy of `image` with each (box in pixels, label) drawn on it."""
    image = image.convert("RGB")
    draw = ImageDraw.Draw(image)
    width = max(1, round(min(image.size) / 150))
    for i, ((x1, y1, x2, y2), label) in enumerate(detections):
        colour = ("red", "lime", "blue", "yellow", "magenta", "cyan")[i % 6]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        if label:
            left, top, right, bottom = draw.textbbox((x1, y1), label)
            draw.rectangle((left, top, right + 2, bottom + 2), fill=colour)
            draw.text((x1 + 1, y1 + 1), label, fill="black")
    return image


def load_images(paths: list[str]) -> list[Image.Image]:
    images = []
    for path in paths:
        if not Path(path).is_file():
            fail(f"{path}: no such image file")
        try:
            with Image.open(path) as image:
                image.load()
                images.append(image)
        except (UnidentifiedImageError, OSError) as e:
            fail(f"{path}: cannot read the image ({e})")
    return images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="google/paligemma-3b-pt-224", help="checkpoint folder or hub id")
    p.add_argument("--image", action="append", required=True, help="an image file; repeat for several")
    p.add_argument("--prompt", action="append", required=True, help="e.g. 'caption en'; one for all images or one each")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    p.add_argument("--out", default=None, help="PNG file to draw detected boxes on (with several images, _0, _1, ... are added)")
    args = p.parse_args(argv)

    if len(args.prompt) not in (1, len(args.image)):
        fail(f"{len(args.prompt)} prompts for {len(args.image)} images: give one prompt, or one per image")
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    images = load_images(args.image)
    device = args.device or default_device()
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32

    start = time.perf_counter()
    try:
        model = PaliGemma.from_pretrained(args.model, dtype=dtype, device=device)
        processor = Processor.from_pretrained(args.model)
    except (OSError, ValueError) as e:
        fail(str(e))
    print(f"loaded {args.model} ({dtype}, {device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)

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
    print(f"prompt {batch['input_ids'].shape[1]} tokens x {len(images)}; generated {n_tokens} tokens in {seconds:.2f} s "
          f"({n_tokens / seconds:.1f} tokens/s, prompt included)", file=sys.stderr)

    answers = [processor.decode(row).strip() for row in new.tolist()]
    for answer in answers:
        print(" ".join(answer.splitlines()))
    if args.out:
        for i, (image, answer) in enumerate(zip(images, answers)):
            out = Path(args.out)
            if len(images) > 1:
                out = out.with_name(f"{out.stem}_{i}{out.suffix}")
            detections = parse_detections(answer, *image.size)
            if detections:
                draw_detections(image, detections).save(out)
                print(f"{out}: {len(detections)} boxes drawn", file=sys.stderr)
            else:
                print(f"{args.image[i]}: the answer holds no boxes; nothing written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
