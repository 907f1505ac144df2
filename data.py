"""Training data: JSONL files read and checked, and batches made of them.

    {"image": "images/a.jpg", "prefix": "answer en what colour is the car?", "suffix": "red"}
    {"image": "b.jpg", "prefix": "caption en", "suffix": "a dog", "answers": ["a dog", "a pug"]}

One example per line (image paths relative to the JSONL file): the format of Roboflow's PaliGemma
export and of big_vision; "answers", where a line has them, are the references its answer is scored
against (else the suffix is). `read_jsonl` checks every line (and decodes its image) before training
starts, naming the file and line of what is wrong; `micro_batches` orders the examples, reproducibly
for --resume and alike for any number of processes; `collate` turns examples into tensors with the
Processor, in the DataLoader's worker processes.

What it is not: the training loop (train.py), the model's inputs (processor.py, which `collate`
uses) or other formats of data (convert.py turns them into this one). A file or line that cannot be
used is a cli.UserError that names it.
"""

import contextlib
import functools
import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from PIL import Image

from cli import UserError, log
from detections import prompt_names
from processor import MAX_PIXELS, Processor, load_image, prompt_problem

LARGE_IMAGE = 4096 * 4096  # pixels; such images are decoded one at a time when the data is checked
_one_large_image = threading.Lock()


def parse_line(path: Path, line_no: int, raw: bytes) -> tuple[dict | None, str | None]:
    """One JSONL line -> (its record, None) or (None, "file:line: what is wrong"). "answers", a list
    of strings, may stand beside the suffix (or instead of it, in a file only scored): the
    references a scored answer is compared with (VQAv2's ten human answers, COCO's five
    captions)."""
    where = f"{path}:{line_no}"
    try:
        # a BOM may open the file
        record = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))
    except UnicodeDecodeError as e:
        return None, f"{where}: not UTF-8 text (byte {e.start + 1} of the line)"
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg})"
    except RecursionError:
        return None, f"{where}: nested too deeply to be an example"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object with image, prefix and suffix"
    answers = record.get("answers")
    if answers is not None and (not isinstance(answers, list) or not answers
                                or not all(isinstance(a, str) for a in answers)):
        return None, (f"{where}: answers must be a list of one or more strings (the references of "
                      "the answer)")
    missing = [k for k in ("image", "prefix", "suffix") if not isinstance(record.get(k), str)
               and not (k == "suffix" and answers and "suffix" not in record)]
    if missing:
        return None, f"{where}: missing or not a string: {', '.join(missing)}"
    texts = {k: record[k] for k in ("image", "prefix", "suffix") if k in record}
    texts |= dict(enumerate(answers or []))
    for key, text in texts.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a valid JSON escape of no character, e.g. "\\ud800" alone
            what = key if isinstance(key, str) else f"answers[{key}]"
            return None, f"{where}: {what} holds {text[e.start]!r}, half of a UTF-16 pair: not text"
    return record, None


def check_image(image: Path, max_pixels: int) -> str | None:
    """Why an image cannot be trained on, or None; decoded and dropped, one large image at a
    time."""
    try:
        # the header only, for the size (of a regular file: opening a FIFO would wait for a writer)
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
    """check_image of each, in threads, with a progress line every 10 seconds; Ctrl-C stops it at
    once."""
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
    """All examples of a JSONL file, every line checked before training starts, and each distinct
    image decoded once. `check(example)` may add a reason of the caller's."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror})") from None
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    parsed = [(n, *parse_line(path, n, line)) for n, line in lines]
    images = list(dict.fromkeys(path.parent / r["image"] for _, r, _ in parsed if r))
    log(f"{path}: checking {len(lines):,} lines and their {len(images):,} images")
    bad_image = check_images(images, max_pixels, path)
    examples, errors = [], []
    for n, record, error in parsed:
        example = record and dict(line=n, image=path.parent / record["image"],
                                  prefix=record["prefix"], suffix=record.get("suffix"),
                                  references=record.get("answers") or [record["suffix"]])
        why = error or bad_image[example["image"]] or prompt_problem(example["prefix"]) \
            or (check(example) if check else None)
        errors += [why if error else f"{path}:{n}: {why}"] if why else []
        examples += [] if why else [example]
    if errors and not skip_bad:
        shown = " (first 20 shown)" if len(errors) > 20 else ""
        raise UserError(f"{len(errors)} bad line(s) in {path}{shown}; fix them or pass --skip-bad",
                        details=errors[:20])
    if errors:
        log(f"{path}: skipped {len(errors)} bad line(s), e.g. {errors[0]}")
    if not examples:
        raise UserError(f"{path}: no usable examples")
    return examples


def read_datasets(train_file: Path, val_file: Path | None, processor: Processor, max_len: int,
                  skip_bad: bool, val_examples: int,
                  max_pixels: int = MAX_PIXELS) -> tuple[list[dict], list[dict]]:
    """The training examples and the first `val_examples` of the validation file (none without one),
    every line checked, each prompt with room in `max_len` text tokens for its answer. A training
    line needs a suffix; a validation line without one is scored against its answers, and its loss
    taken on the first."""
    def room_for_answer(example):
        n = len(processor.text_tokens(example["prefix"])[0])
        if n >= max_len:
            return f"the prompt is {n} tokens: --max-len {max_len} leaves no room for the answer"
        return None

    def learnable(example):
        return "no suffix: training needs the answer to learn (answers alone only score)" \
            if example["suffix"] is None else room_for_answer(example)
    train_set = read_jsonl(train_file, skip_bad, learnable, max_pixels)
    val_set = read_jsonl(val_file, skip_bad, room_for_answer,
                         max_pixels)[:val_examples] if val_file else []
    for e in val_set:
        e["suffix"] = e["suffix"] if e["suffix"] is not None else e["references"][0]
    log(f"data: {len(train_set)} training examples from {train_file}; "
        + (f"{len(val_set)} validation examples from {val_file}" if val_file else "no validation "
           "file"))
    truncated = sum(len(processor.text_tokens(e["prefix"],
                                              e["suffix"])[0]) > max_len for e in train_set)
    if truncated:
        log(f"data: {truncated} training example(s) longer than --max-len {max_len} text tokens "
            "are truncated")
    return train_set, val_set


def default_val_file(train_file: Path) -> Path | None:
    """The validation file beside a training file, under the names Roboflow's exports use:
    _annotations.valid.jsonl (PaliGemma export) or valid/annotations.jsonl (JSONL export), or
    valid.jsonl."""
    candidates = [train_file.parent / "_annotations.valid.jsonl", train_file.parent / "valid.jsonl",
                  train_file.parent.parent / "valid" / train_file.name]
    return next((c for c in candidates if c.is_file() and c.resolve() != train_file.resolve()),
                None)


# ----------------------------------------------------------------------------------------------
# Batches


def micro_batches(n: int, batch_size: int, grad_accum: int, seed: int, start: int, steps: int,
                  rank: int = 0, world: int = 1):
    """The examples process `rank` of `world` reads, micro-batch by micro-batch, from optimizer step
    `start` on, as (index, epoch) pairs.

    Each epoch is a permutation fixed by (seed, epoch). Optimizer step s takes the next
    batch_size * grad_accum * world examples; each micro-batch of them is split across the
    processes, so the examples of a step do not depend on how many processes share it.
    """
    per_step = batch_size * grad_accum * world
    steps_per_epoch = n // per_step
    order, epoch = None, None
    for step in range(start, steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            shuffle = torch.Generator().manual_seed(seed + epoch)
            order = torch.randperm(n, generator=shuffle).tolist()
        chunk = [(i, epoch) for i in order[(step % steps_per_epoch) * per_step:][:per_step]]
        for a in range(grad_accum):
            yield chunk[a * batch_size * world:(a + 1) * batch_size * world][rank::world]


class Draws(torch.utils.data.Dataset):
    """The examples by (index, epoch); with `shuffle_seed`, the objects of a detect or segment
    answer come in an order fixed by (seed, epoch, index): another each epoch, the same again after
    --resume."""

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
    """A training batch: the prompts with their suffixes, labels on the suffixes. An image that can
    no longer be read (deleted or changed since the check) gives {"error": why} instead."""
    try:
        images = [load_image(e["image"]) for e in examples]
    except ValueError as e:
        return dict(error=f"image {e}")
    return processor(images, [e["prefix"] for e in examples], [e["suffix"] for e in examples],
                     max_len=max_len)


def ignore_signals(worker_id: int):
    """In DataLoader workers: the main process handles Ctrl-C, SIGTERM and SIGHUP (also when they
    are sent to the whole process group), saves and stops the workers itself; torch's workers would
    die of them."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def training_loader(examples: Draws, processor: Processor, max_len: int,
                    batches: list[list[tuple[int, int]]], seed: int):
    """The micro-batches (lists of micro_batches' (index, epoch) pairs), collated in worker
    processes. The loader draws its workers' seeds from a generator of its own, not from torch's, so
    that dropout's draws in the training step are the same in a resumed run."""
    return torch.utils.data.DataLoader(
        examples, batch_sampler=batches,
        collate_fn=functools.partial(collate, processor=processor, max_len=max_len),
        num_workers=min(4, os.cpu_count() or 1), worker_init_fn=ignore_signals,
        generator=torch.Generator().manual_seed(seed))


def batches_until_closed(loader):
    """The loader's batches, from a generator: closing it (also by an exception) deletes the
    loader's iterator, which stops its worker processes at once; they ignore SIGTERM, so nothing
    else would."""
    it = iter(loader)
    yield from it
