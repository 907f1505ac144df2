"""Data as it comes, turned into the JSONL that train.py and evaluate.py read (data.py's format).

    python convert.py coco-detect   instances_val2017.json --images val2017/
    python convert.py coco-segment  train/_annotations.coco.json --vae vae-oid.npz
    python convert.py coco-captions captions_val2017.json --images val2017/
    python convert.py vqav2 v2_OpenEnded_mscoco_val2014_questions.json \\
        v2_mscoco_val2014_annotations.json --images val2014/
    python convert.py vqa TextVQA_0.5.1_val.json --images train_images/     # TextVQA, DocVQA, ...
    python convert.py parquet data/*.parquet --prefix 'answer en {question}' \\
        --suffix '{multiple_choice_answer}' --answers '{answers}' --out vqa/val.jsonl

Each format is a function from its files to examples ({"image", "prefix", "suffix"}, and "answers":
the references a scored answer is compared with, where there are several):

    coco-detect    one `detect <names>` example an image: the names of the categories it holds,
                   sorted, and every box as <loc> tokens, top to bottom (a box is clipped to its
                   image; crowd boxes and boxes with nothing left are skipped; both are counted)
    coco-segment   one `segment <name>` example an image and category: boxes and 16 <seg> tokens
                   a mask, encoded by the VQ-VAE as big_vision encodes them (polygons rasterized
                   as pycocotools rasterizes them)
    coco-captions  `caption en`: the first caption as the suffix (--each-caption: one example per
                   caption), all of them as answers (CIDEr's references)
    vqav2          `answer en <question>`: the multiple-choice answer as the suffix, the ten as
                   answers
    vqa            TextVQA, DocVQA, ST-VQA, InfoVQA: {"data": [{question, answers, image name}]}
    parquet        templates over the columns of a Hugging Face dataset's files; the images they
                   hold written as files (images/ beside --out), once each

The output (by default annotations.jsonl beside the first input) is written whole, every line
checked as data.read_jsonl checks it, never over an input nor over an existing file unless
--overwrite. Something wrong in the input is one line naming its file and record (--skip-bad skips
such records and counts them). What it is not: the reading of the JSONL (data.py).
"""

import argparse
import hashlib
import io
import json
import math
import os
import re
import string
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cli import MAX_PIXELS, UserError, add_image_limit, fail, use_own_image_limit
from data import check_images, parse_line
from detections import loc_tokens, name_problem
from files import new_output, write_atomically, write_jsonl


def coco_detect(path: Path, images: Path, classes: str = "present", skip_bad: bool = False,
                max_pixels: int = MAX_PIXELS) -> tuple[list[dict], dict]:
    """A COCO detection file (instances_*.json, or Roboflow's COCO export) -> detect examples."""
    coco = Coco(path, images, skip_bad, max_pixels)
    examples = []
    for image, annotations in coco.by_image():
        objects, present = [], set()
        for a in annotations:
            if (box := coco.box(a, image)) is not None:
                name = coco.names[a["category_id"]]
                locs = loc_tokens(box, image["width"], image["height"])
                objects.append((box[1], box[0], f"{locs} {name}"))
                present.add(name)
        names = sorted(coco.names.values() if classes == "all" else present)
        if not names:
            coco.count("images without objects")
            continue
        examples.append(dict(image=coco.image_file(image), prefix="detect " + " ; ".join(names),
                             suffix=" ; ".join(text for _, _, text in sorted(objects))))
    return examples, coco.counts


def coco_segment(path: Path, images: Path, vae, skip_bad: bool = False,
                 max_pixels: int = MAX_PIXELS, chunk: int = 512) -> tuple[list[dict], dict]:
    """A COCO instance-segmentation file (Roboflow's "COCO Segmentation") -> one `segment <name>`
    example an image and category; the masks are encoded `chunk` at a time by the VQ-VAE."""
    coco = Coco(path, images, skip_bad, max_pixels)
    pending, examples = [], {}  # (image, name, box, mask cut to 64x64), example by (image id, name)
    for done, (image, annotations) in enumerate(coco.by_image(), 1):
        for a in annotations:
            if (box := coco.box(a, image)) is None or (mask := coco.mask(a, image)) is None:
                continue
            if (crop := segment_crop(mask, box)) is None:
                coco.count("boxes holding no whole pixel of the image")
                continue
            pending.append((image, coco.names[a["category_id"]], box, crop))
        if len(pending) >= chunk or done == len(coco.images):
            encode_segments(pending, vae, examples, coco)
            pending = []
        if done % 500 == 0 or done == len(coco.images):
            print(f"{done:,}/{len(coco.images):,} images encoded", file=sys.stderr, flush=True)
    return [dict(image=e["image"], prefix=e["prefix"],
                 suffix=" ; ".join(t for _, _, t in sorted(e["objects"])))
            for e in examples.values()], coco.counts


def encode_segments(pending: list, vae, examples: dict, coco: "Coco"):
    """The <seg> tokens of the masks of `pending`, in one call of the VQ-VAE, added to their
    examples."""
    if not pending:
        return
    codes = vae.encode(np.stack([crop for _, _, _, crop in pending]))  # (n, 16)
    for (image, name, box, _), code in zip(pending, codes):
        example = examples.setdefault(
            (image["id"], name),
            dict(image=coco.image_file(image), prefix=f"segment {name}", objects=[]))
        tokens = loc_tokens(box, image["width"],
                            image["height"]) + "".join(f"<seg{int(c):03d}>" for c in code)
        example["objects"].append((box[1], box[0], f"{tokens} {name}"))


def segment_crop(mask: np.ndarray, box) -> np.ndarray | None:
    """An object's mask cut to its box (whole pixels) and resized to 64x64 in [0, 1], as
    big_vision's encoder takes it (detections.segment_tokens, a mask at a time); None when the box
    holds no pixel."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    if x2 <= x1 or y2 <= y1:
        return None
    crop = Image.fromarray(mask[y1:y2, x1:x2].astype(np.uint8) * 255)
    crop = crop.resize((64, 64), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255


def coco_captions(path: Path, images: Path, each_caption: bool = False, skip_bad: bool = False,
                  max_pixels: int = MAX_PIXELS) -> tuple[list[dict], dict]:
    """A COCO captions file (captions_*.json) -> `caption en` examples with every caption as
    answers."""
    coco = Coco(path, images, skip_bad, max_pixels, needs_categories=False)
    examples = []
    for image, annotations in coco.by_image():
        captions = [" ".join(str(a.get("caption", "")).split()) for a in annotations]
        captions = [c for c in captions if c]
        if not captions:
            coco.count("images without captions")
            continue
        for suffix in captions if each_caption else captions[:1]:
            examples.append(dict(image=coco.image_file(image), prefix="caption en", suffix=suffix,
                                 answers=captions))
    return examples, coco.counts


def vqav2(questions_path: Path, annotations_path: Path, images: Path,
          skip_bad: bool = False) -> tuple[list, dict]:
    """VQAv2's questions and annotations files -> `answer en <question>` examples: the
    multiple-choice answer as the suffix, the ten human answers as answers. Images are
    COCO_<subtype>_<id:012d>.jpg (or <id:012d>.jpg) in `images`."""
    questions, annotations = read_json(questions_path, "VQAv2 questions"), read_json(
        annotations_path, "annotations")
    bad = Bad(skip_bad)
    try:
        by_question = {a["question_id"]: a for a in annotations["annotations"]}
        subtype = questions.get("data_subtype", annotations.get("data_subtype", ""))
        examples = []
        for n, q in enumerate(questions["questions"]):
            where = f"{questions_path}: question {q.get('question_id')} (record {n})"
            a = by_question.get(q["question_id"])
            if a is None:
                bad(f"{where}: no annotation in {annotations_path} answers it")
                continue
            names = [f"COCO_{subtype}_{q['image_id']:012d}.jpg", f"{q['image_id']:012d}.jpg"]
            image = next((images / name for name in names if (images / name).is_file()), None)
            if image is None:
                bad(f"{where}: its image {images / names[0]} is not there")
                continue
            examples.append(dict(image=image, prefix=f"answer en {q['question']}",
                                 suffix=a["multiple_choice_answer"],
                                 answers=[str(x["answer"]) for x in a["answers"]]))
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{questions_path}, {annotations_path}: not VQAv2's questions and "
                        f"annotations files ({type(e).__name__}: {e})") from None
    return examples, bad.counts


# DocVQA, ST-VQA, InfoVQA, TextVQA
VQA_IMAGE_KEYS = ("image", "file_path", "image_local_name", "image_id")


def vqa(path: Path, images: Path, skip_bad: bool = False) -> tuple[list[dict], dict]:
    """TextVQA / DocVQA / ST-VQA / InfoVQA: {"data": [{question, answers, image}]} -> `answer en
    <question>` examples, the first answer as the suffix and all as answers (a line without answers,
    a test split's, has only its question: refused, or skipped with --skip-bad)."""
    data, bad, examples = read_json(path, "a VQA file"), Bad(skip_bad), []
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{path}: expected a JSON object with a \"data\" list of questions")
    for n, record in enumerate(data["data"]):
        question = record.get("question_id", record.get("questionId", "?"))
        where = f"{path}: record {n} (question {question})"
        key = next((k for k in VQA_IMAGE_KEYS if isinstance(record.get(k), str)), None)
        answers = record.get("answers")
        if key is None or not isinstance(record.get("question"), str):
            bad(f"{where}: no question or no image name ({' or '.join(VQA_IMAGE_KEYS)})")
            continue
        if not isinstance(answers,
                          list) or not answers or not all(isinstance(a, str) for a in answers):
            bad(f"{where}: no answers (a list of strings)")
            continue
        name = record[key] + (".jpg" if key == "image_id" and not Path(record[key]).suffix else "")
        if not (images / name).is_file():
            bad(f"{where}: its image {images / name} is not there")
            continue
        examples.append(dict(image=images / name, prefix=f"answer en {record['question']}",
                             suffix=answers[0], answers=answers))
    return examples, bad.counts


def parquet(paths: list[Path], out: Path, prefix: str, suffix: str, answers: str | None,
            image_column: str | None, skip_bad: bool = False) -> tuple[list[dict], dict]:
    """Parquet files of a Hugging Face dataset -> examples from templates over their columns
    ("{question}"): the images (bytes, or {bytes, path}) written into images/ beside `out`, named by
    their content's digest, so that each is written once."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("parquet needs the pyarrow package: pip install pyarrow") from None
    folder, bad, examples = out.parent / "images", Bad(skip_bad), []
    folder.mkdir(exist_ok=True)
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own types for a file that is not parquet
            first_line = str(e).splitlines()[0][:200]
            raise UserError(f"{path}: not a readable parquet file ({first_line})") from None
        column = image_column or next(
            (c for c in table.column_names if c.lower() in ("image", "img", "images")), None)
        for template in (prefix, suffix, answers or "", "{" + str(column) + "}"):
            if missing := [f for f in template_fields(template) if f not in table.column_names]:
                raise UserError(f"{path}: no column {missing[0]!r} (--prefix, --suffix, --answers "
                                "or --image-column name it); its columns: "
                                f"{', '.join(table.column_names)}")
        for n, row in enumerate(table.to_pylist()):
            if (image := save_image(row[column], folder, f"{path}: row {n}", bad)) is None:
                continue
            example = dict(image=image, prefix=fill(prefix, row), suffix=fill(suffix, row))
            if answers:
                field = template_fields(answers)[0]
                cell = row[field] if answers.strip() == "{%s}" % field else None
                if isinstance(cell, list):
                    example["answers"] = [answer_text(a) for a in cell]
                else:
                    example["answers"] = [fill(answers, row)]
            examples.append(example)
    return examples, bad.counts


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill(template: str, row: dict) -> str:
    return template.format_map({k: answer_text(v) if isinstance(v, dict) else v
                                for k, v in row.items()})


def answer_text(value) -> str:
    """An answer as the datasets write them: a string, or {"answer": ...} (VQAv2 on the hub)."""
    return str(value["answer"]) if isinstance(value, dict) and "answer" in value else str(value)


def save_image(value, folder: Path, where: str, bad: "Bad") -> Path | None:
    """A parquet image cell (bytes, or {"bytes", "path"}) decoded, and written into `folder` as
    <digest>.<format> unless it is there already."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not isinstance(data, bytes):
        bad(f"{where}: the image column holds no image bytes")
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            kind = (image.format or "png").lower()
    except Exception as e:  # PIL raises many types for bytes that are not an image
        bad(f"{where}: its image does not decode ({type(e).__name__}: {str(e)[:100]})")
        return None
    path = folder / f"{hashlib.sha256(data).hexdigest()[:20]}.{'jpg' if kind == 'jpeg' else kind}"
    # written whole: a run killed mid-write leaves no cut image that a rerun would take as written
    if not path.is_file() or path.stat().st_size != len(data):
        write_atomically(path, lambda tmp: tmp.write_bytes(data))
    return path


# ----------------------------------------------------------------------------------------------
# COCO files: read, checked, a record at a time


class Bad:
    """Records that cannot be converted: a UserError at the first, or with --skip-bad counted by
    kind."""

    def __init__(self, skip: bool):
        self.skip, self.counts, self.first = skip, {}, {}

    def __call__(self, message: str, kind: str | None = None):
        if not self.skip:
            raise UserError(message + "; fix it or pass --skip-bad")
        kind = kind or re.sub(r".*: ", "", message)[:60]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.first.setdefault(kind, message)


class Coco:
    """A COCO file: its images (checked: listed once, a size within --max-image-pixels), categories
    (names checked: they become prompts) and annotations by image; the counts of what was
    skipped."""

    def __init__(self, path: Path, images: Path, skip_bad: bool, max_pixels: int,
                 needs_categories: bool = True):
        self.path, self.folder, self.bad = path, images, Bad(skip_bad)
        data = read_json(path, "a COCO file")
        try:
            self.images, annotations = list(data["images"]), list(data["annotations"])
            categories = data.get("categories", []) if needs_categories else []
            self.names = {c["id"]: c["name"] for c in categories}
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: not a COCO file (no {e} list)") from None
        for c_id, name in self.names.items():
            if why := name_problem(str(name)):
                raise UserError(f"{path}: category {c_id} is named {name!r}: {why}")
        seen = set()
        for n, image in enumerate(self.images):
            sized = isinstance(image, dict) and all(
                isinstance(image.get(k), int) and image[k] > 0 for k in ("width", "height"))
            if not sized or "id" not in image:
                raise UserError(f"{path}: images[{n}] has no id, or no width and height of whole "
                                "pixels")
            if image["id"] in seen:
                raise UserError(f"{path}: image {image['id']} is listed twice (images[{n}])")
            if image["width"] * image["height"] > max_pixels:
                raise UserError(f"{path}: image {image['id']} is {image['width']} x "
                                f"{image['height']} pixels, more than the limit of {max_pixels:,} "
                                "(--max-image-pixels raises it)")
            seen.add(image["id"])
        self.annotations = {}
        for n, a in enumerate(annotations):
            if not isinstance(a, dict) or a.get("image_id") not in seen:
                self.bad(f"{path}: annotation {a.get('id') if isinstance(a, dict) else n} names "
                         f"image {a.get('image_id') if isinstance(a, dict) else '?'}, which the "
                         "file does not list",
                         "annotations of unknown images")
                continue
            self.annotations.setdefault(a["image_id"], []).append(a)
        self.counts = self.bad.counts

    def by_image(self):
        """(image, its annotations top to bottom) for each image whose file is there, in the file's
        order."""
        for image in self.images:
            if not self.image_file(image).is_file():
                self.bad(f"{self.path}: image {image['id']}: {self.image_file(image)} is not there",
                         "missing images")
                continue
            yield image, sorted(self.annotations.get(image["id"], []), key=top_left)

    def image_file(self, image: dict) -> Path:
        return self.folder / image["file_name"]

    def count(self, kind: str):
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def skip(self, a: dict, kind: str, why: str):
        self.bad(f"{self.path}: annotation {a.get('id')} (image {a.get('image_id')}): {why}", kind)

    def box(self, a: dict, image: dict) -> tuple[float, float, float, float] | None:
        """An annotation's box (x1, y1, x2, y2), clipped to its image (and counted); None, counted,
        for a crowd annotation (COCO ignores crowd regions), a box of no numbers, or one with
        nothing inside."""
        if a.get("iscrowd"):
            self.count("crowd annotations")
            return None
        if a.get("category_id") not in self.names:
            self.skip(a, "annotations of unknown categories", "its category "
                      f"{a.get('category_id')} is not "
                      "listed")
            return None
        try:
            x, y, w, h = (float(v) for v in a["bbox"])
        except (KeyError, TypeError, ValueError):
            self.skip(a, "boxes that are not 4 numbers", "its bbox is not 4 numbers")
            return None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            self.count("boxes that are not numbers")
            return None
        box = (max(0.0, x), max(0.0, y), min(float(image["width"]), x + w),
               min(float(image["height"]), y + h))
        if box[2] <= box[0] or box[3] <= box[1]:
            self.count("boxes holding no whole pixel of the image")
            return None
        if box != (x, y, x + w, y + h):
            self.count("boxes clipped to their image")
        return box

    def mask(self, a: dict, image: dict) -> np.ndarray | None:
        """An annotation's mask (H, W) bool from its polygons or RLE; None (and counted, naming it)
        where it has none that can be read."""
        try:
            return coco_mask(a.get("segmentation"), image["height"], image["width"])
        except ValueError as e:
            self.skip(a, "masks that cannot be read", str(e))
            return None


def top_left(annotation: dict) -> tuple[float, float]:
    """An annotation's (y, x), to order objects top to bottom; (0, 0) where its box is not two
    numbers."""
    try:
        y, x = float(annotation["bbox"][1]), float(annotation["bbox"][0])
    except (KeyError, TypeError, IndexError, ValueError):
        return 0.0, 0.0
    return (y, x) if math.isfinite(y) and math.isfinite(x) else (0.0, 0.0)


def read_json(path: Path, what: str):
    """A JSON file, or a UserError that names it and says what is wrong."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                        f"{e.colno})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be {what}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# Masks as COCO writes them: polygons rasterized as pycocotools rasterizes them, and RLE


def coco_mask(segmentation, height: int, width: int) -> np.ndarray:
    """An annotation's segmentation, polygons ([[x, y, x, y, ...], ...], their union) or RLE
    ({"counts", "size"}), as a bool (H, W) mask; a ValueError says what cannot be read."""
    if isinstance(segmentation, dict):
        if list(segmentation.get("size", [])) != [height, width]:
            raise ValueError(f"its RLE's size {segmentation.get('size')} is not its image's "
                             f"[{height}, {width}]")
        runs = rle_counts(segmentation.get("counts"))
        if sum(runs) != height * width or min(runs, default=0) < 0:
            raise ValueError(f"its RLE's counts cover {sum(runs)} pixels, not the image's {height} "
                             f"x {width}")
        # down the columns
        return np.repeat(np.arange(len(runs)) % 2 == 1, runs).reshape(width, height).T
    if not isinstance(segmentation, list) or not segmentation:
        raise ValueError("it has no segmentation (polygons or RLE)")
    mask = np.zeros((height, width), dtype=bool)
    for polygon in segmentation:
        if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2 or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in polygon):
            raise ValueError("a polygon of it has fewer than 3 points, or an odd count of numbers, "
                             "or a non-number")
        mask |= polygon_mask(polygon, height, width)
    return mask


def polygon_mask(xy: list[float], h: int, w: int) -> np.ndarray:
    """pycocotools' rleFrPoly: the outline upsampled 5x into a dense line of points, whose crossings
    of each column's pixel centres toggle the mask on and off down the column."""
    scale, n = 5.0, len(xy) // 2
    # C's (int): toward 0
    x = np.trunc(scale * np.asarray(xy[0::2], dtype=np.float64) + 0.5).astype(np.int64)
    y = np.trunc(scale * np.asarray(xy[1::2], dtype=np.float64) + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])
    us, vs = [], []
    for j in range(n):
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        d = np.arange((dx if dx >= dy else dy) + 1)
        t = (dx if dx >= dy else dy) - d if flip else d
        if dx >= dy:
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    changed = u[1:] != u[:-1]
    xd = np.where(u[1:] < u[:-1], u[1:], u[1:] - 1).astype(np.float64)[changed]
    xd = (xd + 0.5) / scale - 0.5
    yd = np.minimum(v[1:], v[:-1]).astype(np.float64)[changed]
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, h))
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    toggles = np.bincount((xd[keep] * h + yd[keep]).astype(np.int64), minlength=h * w + 1)[:h * w]
    return (np.cumsum(toggles) % 2 == 1).reshape(w, h).T  # column-major, as COCO's RLE


def rle_counts(counts) -> list[int]:
    """COCO's run lengths, from a list or from its compressed string (6 bits a character, 5 of value
    and a continuation bit, the last chunk signed; from the third run on, relative to the one two
    back)."""
    if isinstance(counts, list) and all(isinstance(c, int) for c in counts):
        return counts
    if not isinstance(counts, str):
        raise ValueError("its RLE's counts are neither a list of numbers nor a compressed string")
    runs, i = [], 0
    try:
        while i < len(counts):
            value, shift, more = 0, 0, True
            while more:
                c = ord(counts[i]) - 48
                value |= (c & 0x1F) << shift
                more, i, shift = c & 0x20, i + 1, shift + 5
                if not more and c & 0x10:
                    value |= -1 << shift
            runs.append(value + (runs[-2] if len(runs) > 2 else 0))
    except IndexError:
        raise ValueError("its compressed RLE ends in the middle of a number") from None
    return runs


# ----------------------------------------------------------------------------------------------
# Writing: every line checked, the images relative to the output, the file whole


def write_examples(examples: list[dict], out: Path, skip_bad: bool, max_pixels: int) -> int:
    """The examples as JSONL in `out`, each line checked as data.read_jsonl checks it (its image
    decoded); returns the number written."""
    bad, lines = Bad(skip_bad), []
    images = list(dict.fromkeys(Path(e["image"]) for e in examples))
    broken = {image: why for image, why in check_images(images, max_pixels, out).items() if why}
    for n, e in enumerate(examples):
        record = dict(image=os.path.relpath(Path(e["image"]).resolve(), out.parent.resolve())) | \
            {k: e[k] for k in ("prefix", "suffix", "answers") if k in e}
        raw = json.dumps(record).encode()
        _, why = parse_line(out, n + 1, raw)
        if not why and Path(e["image"]) in broken:
            why = f"{out}:{n + 1}: image {broken[Path(e['image'])]}"
        if why:
            bad(why, "examples whose image cannot be used")
            continue
        lines.append(record)
    write_jsonl(out, lines)
    return len(lines)


def main(argv=None):
    args = options().parse_args(argv)
    use_own_image_limit()
    inputs = args.files if args.format == "parquet" else [args.file]
    if args.format == "vqav2":
        inputs.append(args.annotations)
    out = args.out or inputs[0].with_name("annotations.jsonl")
    if why := new_output(out, args.overwrite, inputs):
        fail(why)
    try:
        start = time.perf_counter()
        examples, counts = convert(args, out)
        n = write_examples(examples, out, args.skip_bad, args.max_image_pixels)
    except UserError as e:
        fail(str(e), e.details)
    skipped = "".join(f"; {count:,} {kind}" for kind, count in counts.items())
    print(f"{out}: {n:,} examples from {', '.join(map(str, inputs))} in "
          f"{time.perf_counter() - start:.1f} s{skipped}")


def convert(args, out: Path) -> tuple[list[dict], dict]:
    """The examples of the format asked for, and the counts of what was skipped."""
    if args.format == "parquet":
        return parquet(args.files, out, args.prefix, args.suffix, args.answers, args.image_column,
                       args.skip_bad)
    images = args.images or args.file.parent
    if args.format == "coco-detect":
        return coco_detect(args.file, images, args.classes, args.skip_bad, args.max_image_pixels)
    if args.format == "coco-segment":
        from vqvae import VQVAE
        try:
            vae = VQVAE.from_pretrained(args.vae)
        except (OSError, ValueError) as e:
            raise UserError(f"--vae: {e}") from None
        return coco_segment(args.file, images, vae, args.skip_bad, args.max_image_pixels)
    if args.format == "coco-captions":
        return coco_captions(args.file, images, args.each_caption, args.skip_bad,
                             args.max_image_pixels)
    if args.format == "vqav2":
        return vqav2(args.file, args.annotations, images, args.skip_bad)
    return vqa(args.file, images, args.skip_bad)


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    add = lambda name, help: formats.add_parser(name, help=help, description=help)  # noqa: E731
    detect = add("coco-detect", "a COCO detection file (instances_*.json) -> detect examples")
    detect.add_argument("--classes", choices=["present", "all"], default="present",
                        help="the names a prompt asks for: those in the image, or every category "
                        "(default present)")
    segment = add("coco-segment", "a COCO instance-segmentation file -> segment examples")
    segment.add_argument("--vae", default=None, help="the VQ-VAE npz that encodes masks (default: "
                         "big_vision's vae-oid.npz from the hub, which "
                         "PaliGemma's checkpoints were trained with)")
    captions = add("coco-captions", "a COCO captions file (captions_*.json) -> caption en examples")
    captions.add_argument("--each-caption", action="store_true", help="one example per caption "
                          "(for training)")
    vqa_v2 = add("vqav2", "VQAv2's questions and annotations files -> answer en examples")
    vqa_doc = add("vqa", "a TextVQA, DocVQA, ST-VQA or InfoVQA file -> answer en examples")
    hub = add("parquet", "parquet files of a Hugging Face dataset -> examples from templates over "
              "their columns")
    hub.add_argument("files", type=Path, nargs="+", help="the .parquet files")
    hub.add_argument("--prefix", required=True, help="e.g. 'answer en {question}'")
    hub.add_argument("--suffix", required=True, help="e.g. '{multiple_choice_answer}'")
    hub.add_argument("--answers", default=None, help="a column of several references, e.g. "
                     "'{answers}'")
    hub.add_argument("--image-column", default=None, help="default: the column named image")
    for sub in (detect, segment, captions, vqa_v2, vqa_doc):
        sub.add_argument("file", type=Path, help="the JSON file (VQAv2: its questions)")
        sub.add_argument("--images", type=Path, default=None, help="the images' folder (default: "
                         "the file's)")
    vqa_v2.add_argument("annotations", type=Path, help="v2_mscoco_*_annotations.json")
    for sub in (detect, segment, captions, vqa_v2, vqa_doc, hub):
        sub.add_argument("--out", type=Path, default=None, help="default: annotations.jsonl beside "
                         "the input")
        sub.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        sub.add_argument("--skip-bad", action="store_true", help="skip records that cannot be "
                         "converted, counted")
        add_image_limit(sub)
    return p


if __name__ == "__main__":
    main()
