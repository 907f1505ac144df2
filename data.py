"""Training data: JSONL files read and checked, batches made, and segmentation data made from COCO masks.

    {"image": "relative/to/the/jsonl.jpg", "prefix": "answer en what colour is the car?", "suffix": "red"}

One example per line: the format of Roboflow's PaliGemma export and of big_vision. `read_jsonl` checks
every line (and decodes its image) before training starts, naming the file and line of what is wrong;
`micro_batches` orders the examples, reproducibly for --resume and alike for any number of processes;
`collate` turns examples into tensors with the Processor, in the DataLoader's worker processes.

    python data.py --coco dataset/train/_annotations.coco.json --vae vae-oid.npz   # -> annotations.jsonl

turns a COCO instance-segmentation export (Roboflow's "COCO Segmentation") into `segment <class>`
examples whose answers are boxes and <seg> tokens, encoded by the VQ-VAE as big_vision encodes them.

What it is not: the training loop (train.py) or the model's inputs (processor.py, which `collate` uses).
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import write_atomically
from cli import fail, log
from detections import prompt_names, segment_tokens
from processor import MAX_PIXELS, Processor, load_image

LARGE_IMAGE = 4096 * 4096  # pixels; such images are decoded one at a time when the data is checked
_one_large_image = threading.Lock()


def parse_line(path: Path, line_no: int, raw: bytes) -> tuple[dict | None, str | None]:
    """One JSONL line -> (its record, None) or (None, "file:line: what is wrong")."""
    where = f"{path}:{line_no}"
    try:
        record = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))  # a BOM may open the file
    except UnicodeDecodeError as e:
        return None, f"{where}: not UTF-8 text (byte {e.start + 1} of the line)"
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg})"
    except RecursionError:
        return None, f"{where}: nested too deeply to be an example"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object with image, prefix and suffix"
    missing = [k for k in ("image", "prefix", "suffix") if not isinstance(record.get(k), str)]
    if missing:
        return None, f"{where}: missing or not a string: {', '.join(missing)}"
    for key in ("image", "prefix", "suffix"):
        try:
            record[key].encode("utf-8")
        except UnicodeEncodeError as e:  # a valid JSON escape of no character, e.g. "\\ud800" alone
            return None, f"{where}: {key} holds {record[key][e.start]!r}, half of a UTF-16 pair: not text"
    return record, None


def check_image(image: Path, max_pixels: int) -> str | None:
    """Why an image cannot be trained on, or None; decoded and dropped, one large image at a time."""
    try:  # the header only, for the size (of a regular file: opening a FIFO would wait for a writer)
        with Image.open(image) if image.is_file() else contextlib.nullcontext() as im:
            large = im is not None and im.width * im.height > LARGE_IMAGE
    except Exception:  # load_image below says what is wrong
        large = False
    try:
        with _one_large_image if large else contextlib.nullcontext():
            load_image(image, max_pixels)
    except ValueError as e:
        return f"image {e}"
    return None


def check_images(images: list[Path], max_pixels: int, source: Path) -> dict[Path, str | None]:
    """check_image of each, in threads, with a progress line every 10 seconds; Ctrl-C stops it at once."""
    pool, results, last = ThreadPoolExecutor(8), {}, time.monotonic()
    try:
        futures = {pool.submit(check_image, image, max_pixels): image for image in images}
        for n, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if time.monotonic() - last > 10:
                log(f"{source}: {n:,} of {len(images):,} images checked")
                last = time.monotonic()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return results


def read_jsonl(path: Path, skip_bad: bool, check=None, max_pixels: int = MAX_PIXELS) -> list[dict]:
    """All examples of a JSONL file, every line checked before training starts, and each distinct image
    decoded once. `check(example)` may add a reason of the caller's."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except IsADirectoryError:
        fail(f"{path}: is a directory, not a JSONL file")
    except OSError as e:
        fail(f"{path}: cannot be read ({e.strerror})")
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    parsed = [(n, *parse_line(path, n, line)) for n, line in lines]
    images = list(dict.fromkeys(path.parent / r["image"] for _, r, _ in parsed if r))
    log(f"{path}: checking {len(lines):,} lines and their {len(images):,} images")
    bad_image = check_images(images, max_pixels, path)
    examples, errors = [], []
    for n, record, error in parsed:
        example = record and dict(image=path.parent / record["image"], prefix=record["prefix"],
                                  suffix=record["suffix"])
        why = error or bad_image[example["image"]] or (check(example) if check else None)
        errors += [why if error else f"{path}:{n}: {why}"] if why else []
        examples += [] if why else [example]
    if errors and not skip_bad:
        for err in errors[:20]:
            print(err, file=sys.stderr)
        fail(f"{len(errors)} bad line(s) in {path}" + (" (first 20 shown)" if len(errors) > 20 else "")
             + "; fix them or pass --skip-bad")
    if errors:
        log(f"{path}: skipped {len(errors)} bad line(s), e.g. {errors[0]}")
    if not examples:
        fail(f"{path}: no usable examples")
    return examples


def read_datasets(train_file: Path, val_file: Path | None, processor: Processor, max_len: int, skip_bad: bool,
                  val_examples: int, max_pixels: int = MAX_PIXELS) -> tuple[list[dict], list[dict]]:
    """The training examples and the first `val_examples` of the validation file (none without one), every
    line checked, each prompt with room in `max_len` text tokens for its answer."""
    def room_for_answer(example):
        n = len(processor.text_tokens(example["prefix"])[0])
        return f"the prompt is {n} tokens: --max-len {max_len} leaves no room for the answer" if n >= max_len else None
    train_set = read_jsonl(train_file, skip_bad, room_for_answer, max_pixels)
    val_set = read_jsonl(val_file, skip_bad, room_for_answer, max_pixels)[:val_examples] if val_file else []
    log(f"data: {len(train_set)} training examples from {train_file}; "
        + (f"{len(val_set)} validation examples from {val_file}" if val_file else "no validation file"))
    truncated = sum(len(processor.text_tokens(e["prefix"], e["suffix"])[0]) > max_len for e in train_set)
    if truncated:
        log(f"data: {truncated} training example(s) longer than --max-len {max_len} text tokens are truncated")
    return train_set, val_set


def default_val_file(train_file: Path) -> Path | None:
    """The validation file beside a training file, under the names Roboflow's exports use:
    _annotations.valid.jsonl (PaliGemma export) or valid/annotations.jsonl (JSONL export), or valid.jsonl."""
    candidates = [train_file.parent / "_annotations.valid.jsonl", train_file.parent / "valid.jsonl",
                  train_file.parent.parent / "valid" / train_file.name]
    return next((c for c in candidates if c.is_file() and c.resolve() != train_file.resolve()), None)


# ----------------------------------------------------------------------------------------------
# Batches


def micro_batches(n: int, batch_size: int, grad_accum: int, seed: int, start: int, steps: int,
                  rank: int = 0, world: int = 1):
    """The examples process `rank` of `world` reads, micro-batch by micro-batch, from optimizer step `start`
    on, as (index, epoch) pairs.

    Each epoch is a permutation fixed by (seed, epoch). Optimizer step s takes the next
    batch_size * grad_accum * world examples; each micro-batch of them is split across the processes, so
    the examples of a step do not depend on how many processes share it.
    """
    per_step = batch_size * grad_accum * world
    steps_per_epoch = n // per_step
    order, epoch = None, None
    for step in range(start, steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        chunk = [(i, epoch) for i in order[(step % steps_per_epoch) * per_step:][:per_step]]
        for a in range(grad_accum):
            yield chunk[a * batch_size * world:(a + 1) * batch_size * world][rank::world]


class Draws(torch.utils.data.Dataset):
    """The examples by (index, epoch); with `shuffle_seed`, the objects of a detect or segment answer come in
    an order fixed by (seed, epoch, index): another each epoch, the same again after --resume."""

    def __init__(self, examples: list[dict], shuffle_seed: int | None = None):
        self.examples, self.shuffle_seed = examples, shuffle_seed

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        example = self.examples[index]
        if self.shuffle_seed is None or not prompt_names(example["prefix"]):
            return example
        objects = example["suffix"].split(" ; ")
        random.Random(f"{self.shuffle_seed}:{epoch}:{index}").shuffle(objects)
        return example | {"suffix": " ; ".join(objects)}


def collate(examples: list[dict], processor: Processor, max_len: int) -> dict:
    """A training batch: the prompts with their suffixes, labels on the suffixes. An image that can no
    longer be read (deleted or changed since the check) gives {"error": why} instead."""
    try:
        images = [load_image(e["image"]) for e in examples]
    except ValueError as e:
        return dict(error=f"image {e}")
    return processor(images, [e["prefix"] for e in examples], [e["suffix"] for e in examples], max_len=max_len)


def ignore_signals(worker_id: int):
    """In DataLoader workers: the main process handles Ctrl-C, SIGTERM and SIGHUP (also when they are sent to
    the whole process group), saves and stops the workers itself; torch's workers would die of them."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def training_loader(examples: Draws, processor: Processor, max_len: int, batches: list[list[tuple[int, int]]]):
    """The micro-batches (lists of micro_batches' (index, epoch) pairs), collated in worker processes."""
    return torch.utils.data.DataLoader(
        examples, batch_sampler=batches, collate_fn=functools.partial(collate, processor=processor, max_len=max_len),
        num_workers=min(4, os.cpu_count() or 1), worker_init_fn=ignore_signals)


def batches_until_closed(loader):
    """The loader's batches, from a generator: closing it (also by an exception) deletes the loader's
    iterator, which stops its worker processes at once; they ignore SIGTERM, so nothing else would."""
    it = iter(loader)
    yield from it


# ----------------------------------------------------------------------------------------------
# Segmentation fine-tuning data from masks: python data.py --coco train/_annotations.coco.json


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


def main(argv=None):
    from vqvae import VQVAE

    p = argparse.ArgumentParser(description="Turns a COCO instance-segmentation export into train.py's JSONL: "
                                "`segment <class>` prompts answered with boxes and <seg> tokens.")
    p.add_argument("--coco", type=Path, required=True, help="_annotations.coco.json, beside its images")
    p.add_argument("--vae", default=None, help="the VQ-VAE npz that encodes masks (default: big_vision's "
                   "vae-oid.npz from the hub, which PaliGemma's checkpoints were trained with)")
    p.add_argument("--out", type=Path, default=None, help="default: annotations.jsonl beside --coco")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    out = args.out or args.coco.with_name("annotations.jsonl")
    # --out checked first: never the export itself, nor a file already there unless --overwrite
    if out.resolve() == args.coco.resolve():
        fail(f"--out {out} is the COCO export itself; choose another --out")
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        fail(f"--out {out}: " + ("is a folder" if out.is_dir() else f"{out.parent} is not a writable folder"))
    if out.exists() and not args.overwrite:
        fail(f"--out {out} exists: replace it with --overwrite, or choose another --out")
    try:
        vae = VQVAE.from_pretrained(args.vae)
    except (OSError, ValueError) as e:
        fail(f"--vae: {e}")
    try:
        data = json.loads(args.coco.read_text(encoding="utf-8"))
        examples, skipped = [], 0
        for i, (image_examples, image_skipped) in enumerate(coco_segmentation_examples(data, vae), 1):
            examples += image_examples
            skipped += image_skipped
            if i % 500 == 0 or i == len(data["images"]):
                print(f"{i}/{len(data['images'])} images encoded", file=sys.stderr, flush=True)
    except json.JSONDecodeError as e:
        fail(f"{args.coco}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
    except RecursionError:
        fail(f"{args.coco}: nested too deeply to be a COCO export")
    except UnicodeDecodeError as e:
        fail(f"{args.coco}: not UTF-8 text (byte {e.start})")
    except (OSError, ValueError) as e:
        fail(str(e))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        fail(f"{args.coco}: not a COCO instance-segmentation export ({type(e).__name__}: {e})")
    for e in examples:  # image paths relative to the JSONL, as train.py reads them
        e["image"] = os.path.relpath(args.coco.parent / e["image"], out.parent)
    write_atomically(out, lambda tmp: tmp.write_text("".join(json.dumps(e) + "\n" for e in examples)))
    print(f"{out}: {len(examples)} examples from {args.coco}"
          + (f"; {skipped} instance(s) skipped, their boxes hold no whole pixel of the image (or are not numbers)"
             if skipped else ""))


if __name__ == "__main__":
    main()
