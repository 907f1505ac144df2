r"""What goes into PaliGemma and what comes out: images, prompts and answers.

    image file --load_image--> PIL image --Processor--> pixel_values (B, 3, S, S) in [-1, 1]
    prefix, suffix --Tokenizer--> input_ids, attention_mask, token_type_ids, labels (B, T)
    new token ids --Tokenizer.decode--> "<loc0123><loc0045><loc0400><loc0321> cat" --parse_detections--> boxes
    "<loc...> x 4 <seg...> x 16 cat" --parse_detections with a VQ-VAE (vqvae.py)--> boxes and masks
    masks of a COCO segmentation export --segment_tokens--> training examples (python processor.py --coco)

The layout of a prompt is the checkpoints' (and transformers' PaliGemmaProcessor's):

    <image> x N   <bos>  prefix "\n"   [suffix <eos>]     (left-padded with <pad> to the batch's longest)
    token_type_ids: 0 ...................  1 ...........
    labels:      -100 ...................  suffix ids, eos  (only when suffixes are given)

What it is not: the model (paligemma.py). It needs sentencepiece, PIL and numpy besides torch.
"""

import errno
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import sentencepiece
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from paligemma import PaliGemmaConfig, resolve_checkpoint

# PaliGemma's own tokens: 1024 box coordinates and 128 mask codes. Others (<loc1024>, <seg128>) are text.
LOC = r"<loc(?:0\d{3}|10[01]\d|102[0-3])>"  # <loc0000> .. <loc1023>
SEG = r"<seg(?:0\d\d|1[01]\d|12[0-7])>"  # <seg000> .. <seg127>


def load_image(path) -> Image.Image:
    """An image file, decoded; a file that cannot be used is a ValueError that names it and says why."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ValueError(f"{path}: is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: is an empty file")
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: too large to decode safely ({e})") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ValueError(f"{str(path)[:60]}...: file name too long for this system") from None
        raise ValueError(f"{path}: cannot be decoded as an image ({e})") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError) as e:  # PIL's decoders raise these too
        raise ValueError(f"{path}: cannot be decoded as an image ({e})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency over white; 16-bit and 32-bit images scaled to 8 bits.

    PIL's own conversion (and so transformers' processor) clips 16-bit and 32-bit pixels to 0..255,
    which makes most such images all white or all black. Here 16-bit ones (I;16) are divided by 257
    (0..65535 -> 0..255), and 32-bit integer (I) and float (F) ones, which have no fixed range, are
    scaled from their own minimum and maximum.
    """
    if not isinstance(image, Image.Image):
        hint = ": open files with processor.load_image (or PIL.Image.open)" if isinstance(image, (str, Path)) else ""
        raise TypeError(f"expected a PIL image, got {type(image).__name__}{hint}")
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8))
    elif image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        low, high = a.min(), a.max()
        scaled = (a - low) / (high - low) * 255 if high > low else np.zeros_like(a)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


class Tokenizer:
    """Gemma's SentencePiece model, plus the tokens PaliGemma adds.

    `<loc0000>`..`<loc1023>` (box coordinates) and `<seg000>`..`<seg127>` (mask codes) are pieces of the
    SentencePiece model; they are split out of the text before SentencePiece sees the rest, so that they
    always become one token each. `<image>` is not a piece: its id comes from the model's config.
    """

    SPECIAL = re.compile(f"({LOC}|{SEG})")

    def __init__(self, model_file, image_token_id: int):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_file}: not a readable SentencePiece model ({str(e).strip()})") from None
        self.image_token_id = image_token_id
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        for piece in ("<loc0000>", "<loc1023>", "<seg000>", "<seg127>"):
            if self.sp.piece_to_id(piece) == self.sp.unk_id():
                raise ValueError(f"{model_file} is not a PaliGemma tokenizer: it has no {piece} piece")

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self.SPECIAL.split(text)):  # odd parts are <loc>/<seg> tokens
            ids += [self.sp.piece_to_id(part)] if i % 2 else self.sp.encode(part)
        return ids

    def decode(self, ids) -> str:
        """Text of the ids, without <pad>, <bos>, <eos>, <image> and ids past the vocabulary (the embedding
        has spare rows); <loc>/<seg> tokens are kept as text."""
        skip = {self.pad_id, self.bos_id, self.eos_id}
        pieces = [self.sp.id_to_piece(i) for i in ids if i not in skip and 0 <= i < self.sp.get_piece_size()]
        text, run = "", []
        for piece in pieces:
            if self.SPECIAL.fullmatch(piece):
                text, run = text + self.sp.decode_pieces(run) + piece, []
            else:
                run.append(piece)
        return text + self.sp.decode_pieces(run)


class Processor:
    """Images and prompts to model inputs, laid out as the checkpoints were trained (see the module
    docstring). Images are converted to RGB (`to_rgb`), resized to the model's square resolution with
    bicubic resampling, and scaled to [-1, 1]."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    @classmethod
    def from_pretrained(cls, name_or_dir) -> "Processor":
        folder = resolve_checkpoint(name_or_dir, ["config.json", "tokenizer.model"])
        if not (folder / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.model (the SentencePiece model)")
        config = PaliGemmaConfig.from_json(folder / "config.json")
        tokenizer = Tokenizer(folder / "tokenizer.model", config.image_token_index)
        return cls(tokenizer, config.vision_config.image_size, config.vision_config.num_patches)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """A PIL image of any size and mode -> (3, S, S) float32 in [-1, 1]."""
        image = to_rgb(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (S, S, 3) in [0, 1]
        return ((x - 0.5) / 0.5).permute(2, 0, 1)

    def text_tokens(self, prefix: str, suffix: str | None = None) -> tuple[list[int], list[int]]:
        """One example's text, <bos> prefix "\\n" [suffix <eos>], as (ids, token types)."""
        tok = self.tokenizer
        ids = [tok.bos_id] + tok.encode(prefix + "\n")
        types = [0] * len(ids)
        if suffix is not None:
            suffix_ids = tok.encode(suffix) + [tok.eos_id]
            ids, types = ids + suffix_ids, types + [1] * len(suffix_ids)
        return ids, types

    def __call__(self, images, prefixes, suffixes=None, max_len: int | None = None) -> dict[str, torch.Tensor]:
        """One image per prompt. Returns input_ids, attention_mask, token_type_ids (B, T),
        pixel_values (B, 3, S, S), and labels (B, T) when suffixes are given. With `max_len`, text tokens
        past max_len are cut (the end of the suffix goes first); the image tokens are not counted."""
        if len(images) != len(prefixes) or (suffixes is not None and len(suffixes) != len(prefixes)):
            raise ValueError(f"got {len(images)} images, {len(prefixes)} prefixes"
                             + ("" if suffixes is None else f" and {len(suffixes)} suffixes")
                             + ": one of each per example")
        image_ids = [self.tokenizer.image_token_id] * self.num_image_tokens
        rows = []  # (ids, token types)
        for i, prefix in enumerate(prefixes):
            ids, types = self.text_tokens(prefix, None if suffixes is None else suffixes[i])
            rows.append((image_ids + ids[:max_len], [0] * len(image_ids) + types[:max_len]))
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (ids, types) in enumerate(rows):  # left padding: the real tokens end at T
            input_ids[i, T - len(ids):] = torch.tensor(ids)
            attention_mask[i, T - len(ids):] = 1
            token_type_ids[i, T - len(ids):] = torch.tensor(types)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     pixel_values=torch.stack([self.preprocess_image(im) for im in images]))
        if suffixes is not None:
            batch["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)
        return batch

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """The number of tokens a batch's loss is taken over: the suffix and <eos> tokens, i.e. the labels
    other than -100 after the shift by one (position t predicts token t + 1)."""
    return (labels[:, 1:] != -100).sum()


# ----------------------------------------------------------------------------------------------
# Answers: boxes and masks
#
# A detect answer is `<locY1><locX1><locY2><locX2> label ; ...`; a segment answer puts 16 <seg> tokens
# after each box (vqvae.py decodes them). Coordinates are in 1024ths of the image, y first: <locK> reads
# K/1024, and a coordinate c is written <locK> with K = floor(c * 1024), at most 1023. (big_vision's
# segmentation code writes round(c * 1023) and reads K/1023: boxes differ by less than 0.1%.)

OBJECT = re.compile(f"({LOC})({LOC})({LOC})({LOC})((?:{SEG})*)([^;<]*)")


class Detection(NamedTuple):
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    label: str
    codes: tuple[int, ...] | None = None  # the 16 <seg> codes of a segment answer
    mask: np.ndarray | None = None  # bool (H, W), from the codes, when a VQ-VAE was given to decode them


def paste_mask(vae, codes, box, width: int, height: int) -> np.ndarray:
    """The VQ-VAE's 64x64 mask of `codes`, resized bilinearly to the box (whole pixels, as big_vision's
    evaluator cuts it) and pasted into an (H, W) bool array: inside where the decoder's output is > 0."""
    with torch.no_grad():
        logits = vae.decode(torch.tensor([codes]))[0].float().numpy()  # (64, 64)
    x1, y1, x2, y2 = (int(v) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    if x2 > x1 and y2 > y1:
        mask[y1:y2, x1:x2] = np.asarray(Image.fromarray(logits).resize((x2 - x1, y2 - y1), Image.BILINEAR)) > 0
    return mask


def parse_detections(text: str, width: int, height: int, vae=None) -> list[Detection]:
    """`<locY1><locX1><locY2><locX2>[<seg...> x 16] label ; ...` -> the objects, boxes in pixels.

    Whatever cannot be read as four loc tokens and a label is skipped (so is a box whose end is not after
    its start); an object's codes are kept only when exactly 16 <seg> tokens follow its box, and its mask
    is made when `vae` (a vqvae.VQVAE) is given.
    """
    detections = []
    for m in OBJECT.finditer(text):
        y1, x1, y2, x2 = (int(v[4:8]) / 1024 for v in m.groups()[:4])
        if y2 > y1 and x2 > x1:
            box = (x1 * width, y1 * height, x2 * width, y2 * height)
            codes = tuple(int(c) for c in re.findall(r"<seg(\d{3})>", m.group(5)))
            codes = codes if len(codes) == 16 else None
            mask = paste_mask(vae, codes, box, width, height) if vae is not None and codes else None
            detections.append(Detection(box, m.group(6).strip(), codes, mask))
    return detections


def loc_tokens(box, width: int, height: int) -> str:
    """(x1, y1, x2, y2) in pixels -> `<locY1><locX1><locY2><locX2>`."""
    x1, y1, x2, y2 = box
    return "".join(f"<loc{min(1023, int(v / size * 1024)):04d}>" for v, size in
                   ((y1, height), (x1, width), (y2, height), (x2, width)))


def segment_tokens(mask: np.ndarray, box, vae) -> str | None:
    """One object's mask (H, W) bool and box (x1, y1, x2, y2, pixels) -> its box and 16 <seg> tokens, as
    big_vision encodes them: the box cut to the image, the mask cut to the box (whole pixels), resized to
    64x64 bilinearly (PIL antialiases when it shrinks), in [0, 1], encoded by the VQ-VAE. None when the
    box holds no whole pixel of the image."""
    height, width = mask.shape
    box = (max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3]))
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    if x2 <= x1 or y2 <= y1:
        return None
    crop = Image.fromarray(mask[y1:y2, x1:x2].astype(np.uint8) * 255).resize((64, 64), Image.BILINEAR)
    with torch.no_grad():
        codes = vae.encode(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255)[None])[0]
    return loc_tokens(box, width, height) + "".join(f"<seg{int(c):03d}>" for c in codes)


# ----------------------------------------------------------------------------------------------
# Segmentation fine-tuning data from masks: python processor.py --coco train/_annotations.coco.json


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
    with ` ; ` as PaliGemma writes them; skipped counts the instances whose box holds no whole pixel."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for image in data["images"]:
        height, width = image["height"], image["width"]
        by_class, skipped = {}, 0
        for a in sorted(by_image.get(image["id"], []), key=lambda a: (a["bbox"][1], a["bbox"][0])):
            x, y, w, h = a["bbox"]
            tokens = segment_tokens(coco_mask(a["segmentation"], height, width), (x, y, x + w, y + h), vae)
            if tokens is None:
                skipped += 1
                continue
            by_class.setdefault(names[a["category_id"]], []).append(f"{tokens} {names[a['category_id']]}")
        yield [dict(image=image["file_name"], prefix=f"segment {name}", suffix=" ; ".join(objects))
               for name, objects in by_class.items()], skipped


def main(argv=None):
    import argparse

    from cli import fail
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
        data = json.loads(args.coco.read_text(encoding="utf-8"))
        vae = VQVAE.from_pretrained(args.vae)
        examples, skipped = [], 0
        for i, (image_examples, image_skipped) in enumerate(coco_segmentation_examples(data, vae), 1):
            examples += image_examples
            skipped += image_skipped
            if i % 500 == 0 or i == len(data["images"]):
                print(f"{i}/{len(data['images'])} images encoded", file=sys.stderr, flush=True)
    except json.JSONDecodeError as e:
        fail(f"{args.coco}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})")
    except UnicodeDecodeError as e:
        fail(f"{args.coco}: not UTF-8 text (byte {e.start})")
    except (OSError, ValueError) as e:
        fail(str(e))
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        fail(f"{args.coco}: not a COCO instance-segmentation export ({type(e).__name__}: {e})")
    for e in examples:  # image paths relative to the JSONL, as train.py reads them
        e["image"] = os.path.relpath(args.coco.parent / e["image"], out.parent)
    partial = out.with_name(out.name + ".partial")  # written whole, then renamed: a kill leaves out as it was
    partial.write_text("".join(json.dumps(e) + "\n" for e in examples))
    os.replace(partial, out)
    print(f"{out}: {len(examples)} examples from {args.coco}"
          + (f"; {skipped} instance(s) skipped, their boxes hold no whole pixel of the image" if skipped else ""))


if __name__ == "__main__":
    main()
