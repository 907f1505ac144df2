"""A synthetic dataset of simple scenes in PaliGemma's JSONL format, deterministic by seed.

    python -m tiny.shapes --out data/shapes --tasks caption,colour,shape,detect --train 6000 \\
        --valid 200

Each 112x112 image holds one to three non-overlapping shapes (circle, square, triangle; `--shapes`
can add star) in one of five colours, of random sizes and positions, on a noisy grey background;
`--max-shapes` allows more (a crowded scene holds as many as fit). Each example asks one question
about it, in a task PaliGemma knows:

    caption   "caption en"                            -> "2 shapes: a red circle and a blue square"
    colour    "answer en what colour is the circle?"  -> "red"        (shapes that occur once)
    shape     "answer en which shape is red?"         -> "circle"     (colours that occur once)
    count     "answer en how many shapes are there?"  -> "2"
    detect    "detect circle" or "detect circle ; square ; triangle"
              -> "<loc0123><loc0045><loc0400><loc0321> circle ; ..."
    ocr       "ocr"                                   -> "407" or "blue": a number of 2 or 3 digits
                                                         or a colour's name, written over the scene
                                                         (not by default)

`--detect star` asks detect questions about stars alone (in scenes that hold one), for fine-tuning a
model to detect a shape that its pretraining never asked about. `--coco` writes the scenes as a COCO
instance-segmentation export instead (OUT/train/ and OUT/valid/, as Roboflow lays it out), which
`python convert.py coco-segment` turns into `segment <shape>` examples.

Boxes are y_min, x_min, y_max, x_max in 1024ths of the image, as PaliGemma writes them. The files
are `_annotations.train.jsonl` and `_annotations.valid.jsonl` (Roboflow's names, which train.py
finds) with the images in `images/`.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cli import number
from detections import loc_tokens

SIZE = 112
SHAPES = ("circle", "square", "triangle")  # the default; "star" is drawn too
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (235, 200, 30), "purple": (150, 60, 180)}
DEFAULT_TASKS = ("caption", "colour", "shape", "count", "detect")
TASKS = (*DEFAULT_TASKS, "ocr")
ALL_SHAPES_PROMPT = "detect " + " ; ".join(SHAPES)


def random_scene(rng: np.random.Generator, shapes=SHAPES, most: int = 3) -> list[dict]:
    """1 to `most` shapes (fewer where no free place is found), each {"shape", "colour", "box": (x1,
    y1, x2, y2) in pixels}, not overlapping."""
    scene = []
    for _ in range(int(rng.integers(1, most + 1))):
        for _attempt in range(100):
            side = int(rng.integers(22, 46))
            x1, y1 = (int(v) for v in rng.integers(2, SIZE - side - 2, size=2))
            box = (x1, y1, x1 + side, y1 + side)
            if all(box[2] + 2 < s["box"][0] or s["box"][2] + 2 < box[0] or box[3] + 2 < s["box"][1]
                   or s["box"][3] + 2 < box[1] for s in scene):
                scene.append(dict(shape=str(rng.choice(shapes)),
                                  colour=str(rng.choice(list(COLOURS))), box=box))
                break
    return scene


def outline(shape: dict) -> list[tuple[float, float]]:
    """The polygon of a shape, in pixels, filling its box (x2 and y2 exclusive): what is drawn, and
    the segmentation of a COCO export."""
    x1, y1, x2, y2 = shape["box"]
    if shape["shape"] == "square":
        return [(x1, y1), (x2 - 1, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)]
    if shape["shape"] == "triangle":
        return [((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)]
    if shape["shape"] == "circle":
        angles, radii = np.arange(48) * np.pi / 24, np.ones(48)
    else:  # star: five points, the inner corners at 0.4 of the radius
        angles, radii = np.arange(10) * np.pi / 5, np.array([1, 0.4] * 5)
    px, py = radii * np.sin(angles), -radii * np.cos(angles)  # stretched to the box
    px = x1 + (px - px.min()) / np.ptp(px) * (x2 - 1 - x1)
    py = y1 + (py - py.min()) / np.ptp(py) * (y2 - 1 - y1)
    return list(zip(px.tolist(), py.tolist()))


def draw(scene: list[dict], rng: np.random.Generator | None = None,
         text: dict | None = None) -> Image.Image:
    """The scene on a grey background, with `text` (random_text's) written over it; with `rng`, plus
    pixel noise."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    for s in scene:
        pen.polygon(outline(s), fill=COLOURS[s["colour"]])
    if text:  # PIL's own font (Aileron), black with a white edge, legible over any colour
        pen.text(text["xy"], text["text"], font=ImageFont.load_default(size=text["size"]),
                 fill="black", stroke_width=1, stroke_fill="white")
    if rng is None:
        return image
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, (SIZE, SIZE, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def random_text(rng: np.random.Generator) -> dict:
    """A number of 2 or 3 digits or a colour's name, its font size (34 to 44 px) and where it
    starts, so that it fits in the image."""
    if rng.random() < 0.5:
        text = str(int(rng.integers(10, 1000)))
    else:
        text = str(rng.choice(list(COLOURS)))
    size = int(rng.integers(34, 45))
    left, top, right, bottom = ImageFont.load_default(size=size).getbbox(text, stroke_width=1)
    x, y = (int(rng.integers(2, max(3, SIZE - 2 - extent))) for extent in (right, bottom))
    return dict(text=text, size=size, xy=(x, y))


def ask(scene: list[dict], task: str, rng: np.random.Generator,
        detect=None) -> tuple[str, str] | None:
    """(prefix, suffix) of one task about the scene, or None when the scene cannot answer it.
    `detect`: the one shape that detect questions ask about (default: one that is there, or all
    three)."""
    if task == "caption":
        parts = [f"a {s['colour']} {s['shape']}" for s in scene]
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return "caption en", f"{len(scene)} shape{'s' if len(scene) > 1 else ''}: {listing}"
    if task == "count":
        return "answer en how many shapes are there?", str(len(scene))
    if task in ("colour", "shape"):
        key, other = ("shape", "colour") if task == "colour" else ("colour", "shape")
        unique = [s for s in scene if sum(t[key] == s[key] for t in scene) == 1]
        if not unique:
            return None
        s = unique[int(rng.integers(len(unique)))]
        question = f"which shape is {s['colour']}?"
        if task == "colour":
            question = f"what colour is the {s['shape']}?"
        return f"answer en {question}", s[other]
    # detect: one kind of shape that is there, or all three kinds; boxes top to bottom
    if detect is not None and all(s["shape"] != detect for s in scene):
        return None
    present = sorted({s["shape"] for s in scene})
    kinds = (detect,) if detect else SHAPES if rng.random() < 0.5 else (str(rng.choice(present)),)
    found = sorted((s for s in scene if s["shape"] in kinds),
                   key=lambda s: (s["box"][1], s["box"][0]))
    prefix = ALL_SHAPES_PROMPT if len(kinds) > 1 else f"detect {kinds[0]}"
    return prefix, " ; ".join(f"{loc_tokens(s['box'], SIZE, SIZE)} {s['shape']}" for s in found)


def write_split(out: Path, split: str, n: int, tasks: list[str], seed: int, shapes=SHAPES,
                detect=None, most=3):
    rng = np.random.default_rng([seed, ("train", "valid").index(split)])
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    while len(lines) < n:
        scene = random_scene(rng, shapes, most)
        task = tasks[int(rng.integers(len(tasks)))]
        text = random_text(rng) if task == "ocr" else None
        qa = ("ocr", text["text"]) if text else ask(scene, task, rng, detect)
        if qa is None:
            continue
        name = f"images/{split}-{len(lines):05d}.jpg"
        draw(scene, rng, text).save(out / name, quality=92)
        lines.append(json.dumps({"image": name, "prefix": qa[0], "suffix": qa[1]}))
    (out / f"_annotations.{split}.jsonl").write_text("\n".join(lines) + "\n")


def write_coco(out: Path, split: str, n: int, seed: int, shapes=SHAPES, most=3):
    """n scenes as Roboflow's "COCO Segmentation" export lays them out: OUT/SPLIT/ with the images
    and _annotations.coco.json, each shape an instance with its box and polygon."""
    rng = np.random.default_rng([seed, ("train", "valid").index(split), 1])
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    # Roboflow's dataset-level category
    categories = [dict(id=0, name="shapes", supercategory="none")]
    categories += [dict(id=i + 1, name=shape, supercategory="shapes")
                   for i, shape in enumerate(shapes)]
    images, annotations = [], []
    for i in range(n):
        scene = random_scene(rng, shapes, most)
        name = f"{split}-{i:05d}.jpg"
        draw(scene, rng).save(folder / name, quality=92)
        images.append(dict(id=i, file_name=name, width=SIZE, height=SIZE))
        for s in scene:
            x1, y1, x2, y2 = s["box"]
            annotations.append(dict(
                id=len(annotations), image_id=i, category_id=shapes.index(s["shape"]) + 1,
                bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1), iscrowd=0,
                segmentation=[[round(v, 2) for point in outline(s) for v in point]]))
    (folder / "_annotations.coco.json").write_text(json.dumps(dict(
        images=images, annotations=annotations, categories=categories)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated, of {', '.join(TASKS)}; a task named twice is asked "
                   "twice as often")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of circle, square, "
                   "triangle, star")
    p.add_argument("--detect", default=None, help="the one shape that detect questions ask about")
    p.add_argument("--max-shapes", type=number(int, 1), default=3,
                   help="the most shapes a scene holds (as many as fit, each 22 to 45 pixels wide)")
    p.add_argument("--train", type=number(int, 0), default=1000, help="training examples")
    p.add_argument("--valid", type=number(int, 0), default=100, help="validation examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--coco", action="store_true", help="write a COCO segmentation export "
                   "(OUT/train/, OUT/valid/) instead of JSONL; "
                   "convert.py coco-segment turns it into segment examples")
    p.add_argument("--overwrite", action="store_true", help="write into an --out that holds files "
                   "already")
    args = p.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        p.error(f"--out {args.out} holds files already (a dataset?): choose an empty or new "
                "folder, or --overwrite")
    tasks, shapes = args.tasks.split(","), tuple(args.shapes.split(","))
    if unknown := set(tasks) - set(TASKS):
        p.error(f"unknown task(s) {', '.join(sorted(unknown))}; the tasks are {', '.join(TASKS)}")
    if unknown := set(shapes) - {*SHAPES, "star"}:
        p.error(f"unknown shape(s) {', '.join(sorted(unknown))}; the shapes are circle, square, "
                "triangle, star")
    if args.detect is not None and args.detect not in shapes:
        p.error(f"--detect {args.detect}: not among --shapes {args.shapes}")
    for split, n in (("train", args.train), ("valid", args.valid)):
        if args.coco:
            write_coco(args.out, split, n, args.seed, shapes, args.max_shapes)
        else:
            write_split(args.out, split, n, tasks, args.seed, shapes, args.detect, args.max_shapes)
    what = "COCO segmentation export" if args.coco else ", ".join(tasks)
    print(f"{args.out}: {args.train} training and {args.valid} validation images ({what})")


if __name__ == "__main__":
    main()
