"""Answer prompts about images with a PaliGemma checkpoint.

    python infer.py --model google/paligemma-3b-pt-224 --image cat.jpg --prompt "caption en"
    python infer.py --model out/ --image a.jpg --image b.png --prompt "detect cat" --out boxes.png
    python infer.py --model lora-out/ --image a.jpg --prompt "caption en"  # an adapter on its base

Prints one answer per image on stdout (nothing else there), timings on stderr. One prompt serves all
images, or give one per image. Answers to `detect` and `segment` prompts can only take PaliGemma's
form (detections.AnswerConstraint; `--no-constrain` lets them run free). With `--out`, the boxes of
a `detect` answer (and the masks of a `segment` answer, decoded by the VQ-VAE of vqvae.py) are drawn
on the image. Bad input (a missing or unreadable image, a checkpoint without weights, an option out
of range, an `--out` that cannot be written or that would overwrite an input image) is one line on
stderr and exit code 2, before the model is loaded where it can be known then.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

from PIL import Image

from answers import load_model
from cli import (DefaultsFormatter, UserError, add_answer_options, add_device_options,
                 add_image_limit, add_model_options, add_vae_option, device_and_dtype, fail,
                 number, use_own_image_limit)
from detections import SEG, AnswerConstraint, AnswerTokens, parse_detections
from drawing import draw_detections
from files import write_atomically
from processor import load_image, prompt_problem
from quantize import FORMATS
from vqvae import VQVAE


def output_paths(out: str, images: list[str], overwrite: bool) -> list[Path]:
    """Where the drawings go: --out itself, or with several images NAME_0.png, NAME_1.png, ...;
    checked to be writable image files that are not among the input images, nor files already there
    (unless `overwrite`)."""
    out = Path(out)
    if out.is_dir():
        fail(f"--out {out} is a folder; give a file name such as {out / 'boxes.png'}")
    image_format = Image.registered_extensions().get(out.suffix.lower())
    if image_format not in Image.SAVE:
        fail(f"--out {out}: give an image file name ending in .png or .jpg (the extension says the "
             "format)")
    if not out.parent.is_dir():
        fail(f"--out {out}: the folder {out.parent} does not exist")
    paths = [out]
    if len(images) > 1:
        paths = [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
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
    """Written whole (files.write_atomically): never half an image."""
    try:
        write_atomically(
            path,
            lambda tmp: image.save(tmp, format=Image.registered_extensions()[path.suffix.lower()]))
    except OSError as e:
        fail(f"--out {path}: cannot be written ({e.strerror or e})")


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    add_model_options(p, list(FORMATS))
    p.add_argument("--image", action="append", required=True, help="an image file; repeat for "
                   "several")
    p.add_argument("--prompt", action="append", required=True, help="e.g. 'caption en'; one for "
                   "all images or one each")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=64)
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, above=True), default=1.0, help="1: no top-p")
    p.add_argument("--top-k", type=number(int, 0), default=0, help="0: no top-k")
    p.add_argument("--seed", type=int, default=None)
    add_answer_options(p)
    add_device_options(p)

    p.add_argument("--out", default=None, help="image file to draw the boxes and masks of the "
                   "answer on (with several images, _0, _1, ... are added)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out image that exists")
    add_image_limit(p)
    add_vae_option(p)
    return p


def draw_answers(images, answers: list[str], out_paths: list[Path], names: list[str],
                 vae_path: str | None):
    """Each answer's boxes and masks drawn on its image into its --out file (the VQ-VAE read only
    when an answer holds masks)."""
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
            with_masks = f" and {masks} masks" if masks else ""
            print(f"{out}: {len(detections)} boxes{with_masks} drawn", file=sys.stderr)
        else:
            print(f"{name}: the answer holds no boxes; nothing written to {out}", file=sys.stderr)


def main(argv=None):
    args = options().parse_args(argv)
    if len(args.prompt) not in (1, len(args.image)):
        fail(f"{len(args.prompt)} prompts for {len(args.image)} images: give one prompt, or one "
             "per image")
    prompts = args.prompt * len(args.image) if len(args.prompt) == 1 else args.prompt
    for prompt in prompts:
        if problem := prompt_problem(prompt):
            fail(f"--prompt {prompt!r}: {problem}")
    out_paths = output_paths(args.out, args.image, args.overwrite) if args.out else []
    if args.vae and not Path(args.vae).is_file():
        fail(f"--vae {args.vae}: no such file (a VQ-VAE npz such as vae-oid.npz)")
    use_own_image_limit()
    try:
        device, dtype = device_and_dtype(args.device, args.dtype)
        images = [load_image(path, args.max_image_pixels) for path in args.image]
        model, processor = load_model(args.model, args.adapter, dtype, device, args.quantize)
    except (UserError, ValueError, OSError) as e:
        fail(str(e))

    batch = {k: v.to(device) for k, v in processor(images, prompts).items()}
    grammar = None if args.no_constrain else AnswerConstraint.for_prompts(
        prompts, AnswerTokens(processor.tokenizer), model.config.text_config.vocab_size,
        args.repeat_iou)
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

    answers = [(grammar.answer(i, ids, processor.decode) if grammar else processor.decode(ids))
               .strip() for i, ids in enumerate(new.tolist())]
    for name, row in zip(args.image, grammar.rows if grammar else []):
        if row is not None and row.cut is not None:
            print(f"{name}: the answer repeated an object (IoU >= {args.repeat_iou}); it ends "
                  "before it", file=sys.stderr)
    for answer in answers:
        print(" ".join(answer.splitlines()))
    if out_paths:
        draw_answers(images, answers, out_paths, args.image, args.vae)


if __name__ == "__main__":
    main()
