"""Data as it comes, turned into the JSONL that train.py and evaluate.py read (data.py's format).

    python convert.py coco-segment dataset/train/_annotations.coco.json --vae vae-oid.npz

coco-segment: a COCO instance-segmentation export (Roboflow's "COCO Segmentation") becomes
`segment <class>` examples whose answers are boxes and <seg> tokens, encoded by the VQ-VAE as
big_vision encodes them.

The output is written whole (files.write_atomically), by default as annotations.jsonl beside the
input, never over the input nor over an existing file unless --overwrite. What it is not: the reading
of the JSONL (data.py).
"""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cli import UserError, fail
from detections import segment_tokens
from files import new_output, write_jsonl

def rle_counts(counts) -> list[int]:
    """COCO's run lengths, from a list or from its compressed string (6 bits a character, 5 of value
    and a continuation bit, the last chunk signed; from the third run on, relative to the one two back)."""
    if isinstance(counts, list):
        return counts
    runs, i = [], 0
    while i < len(counts):
        value, shift, more = 0, 0, True
        while more:
            c = ord(counts[i]) - 48
            value |= (c & 0x1F) << shift
            more, i, shift = c & 0x20, i + 1, shift + 5
            if not more and c & 0x10:
                value |= -1 << shift
        runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    return runs


def coco_mask(segmentation, height: int, width: int) -> np.ndarray:
    """An annotation's segmentation, polygons ([[x, y, x, y, ...], ...]) or RLE ({"counts", "size"}),
    as a bool (H, W) mask."""
    if isinstance(segmentation, dict):  # runs of 0s then 1s, alternating, down the columns
        runs = rle_counts(segmentation["counts"])
        flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
        return flat.reshape(segmentation["size"][1], segmentation["size"][0]).T
    image = Image.new("L", (width, height))
    for polygon in segmentation:
        ImageDraw.Draw(image).polygon(list(zip(polygon[::2], polygon[1::2])), fill=1)
    return np.asarray(image, dtype=bool)


def coco_segmentation_examples(data: dict, vae):
    """A COCO instance-segmentation export (Roboflow's "COCO Segmentation": _annotations.coco.json beside the
    images), read as JSON, as train.py's examples. Yields, image by image, (examples, skipped): one example
    per class, prefix `segment <class>`, suffix each instance's box, 16 <seg> tokens and ` <class>`, joined
    with ` ; ` as PaliGemma writes them; skipped counts the instances whose box holds no whole pixel (or is
    not a number)."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image in data["images"]:
        height, width = image["height"], image["width"]
        by_class, skipped = {}, 0
        for a in sorted(by_image.get(image["id"], []), key=lambda a: (a["bbox"][1], a["bbox"][0])):
            x, y, w, h = a["bbox"]
            finite = all(math.isfinite(v) for v in (x, y, w, h))  # a NaN box is no box
            tokens = finite and segment_tokens(coco_mask(a["segmentation"], height, width), (x, y, x + w, y + h), vae)
            if not tokens:
                skipped += 1
                continue
            by_class.setdefault(names[a["category_id"]], []).append(f"{tokens} {names[a['category_id']]}")
        yield [dict(image=image["file_name"], prefix=f"segment {name}", suffix=" ; ".join(objects))
               for name, objects in by_class.items()], skipped


def coco_segment(coco: Path, out: Path, vae_path: str | None) -> tuple[int, int]:
    """`python convert.py coco-segment`: the examples written to `out`; returns their number and the
    instances skipped."""
    from vqvae import VQVAE

    try:
        vae = VQVAE.from_pretrained(vae_path)
    except (OSError, ValueError) as e:
        raise UserError(f"--vae: {e}") from None
    data = read_json(coco, "a COCO export")
    try:
        examples, skipped = [], 0
        for i, (image_examples, image_skipped) in enumerate(coco_segmentation_examples(data, vae), 1):
            examples += image_examples
            skipped += image_skipped
            if i % 500 == 0 or i == len(data["images"]):
                print(f"{i}/{len(data['images'])} images encoded", file=sys.stderr, flush=True)
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise UserError(f"{coco}: not a COCO instance-segmentation export ({type(e).__name__}: {e})") from None
    for e in examples:  # image paths relative to the JSONL, as train.py reads them
        e["image"] = os.path.relpath(coco.parent / e["image"], out.parent)
    write_jsonl(out, examples)
    return len(examples), skipped


def read_json(path: Path, what: str):
    """A JSON file, or a UserError that names it and says what is wrong."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be {what}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    seg = formats.add_parser("coco-segment", help="a COCO instance-segmentation export -> segment examples")
    seg.add_argument("coco", type=Path, help="_annotations.coco.json, beside its images")
    seg.add_argument("--vae", default=None, help="the VQ-VAE npz that encodes masks (default: big_vision's "
                     "vae-oid.npz from the hub, which PaliGemma's checkpoints were trained with)")
    for sub in (seg,):
        sub.add_argument("--out", type=Path, default=None, help="default: annotations.jsonl beside the input")
        sub.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    out = args.out or args.coco.with_name("annotations.jsonl")
    if out.resolve() == args.coco.resolve():
        fail(f"--out {out} is the COCO export itself; choose another --out")
    if why := new_output(out, args.overwrite):
        fail(why)
    try:
        n, skipped = coco_segment(args.coco, out, args.vae)
    except UserError as e:
        fail(str(e), e.details)
    print(f"{out}: {n} examples from {args.coco}"
          + (f"; {skipped} instance(s) skipped, their boxes hold no whole pixel of the image (or are not numbers)"
             if skipped else ""))


if __name__ == "__main__":
    main()
