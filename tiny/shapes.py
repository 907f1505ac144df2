"""A synthetic dataset of simple scenes in PaliGemma's JSONL format, deterministic by seed.

    python -m tiny.shapes --out data/shapes --tasks caption,colour,shape,detect --train 6000 --valid 200

Each 112x112 image holds one to three non-overlapping shapes (circle, square, triangle; `--shapes` can
add star) in one of five colours, of random sizes and positions, on a noisy grey background. Each
example asks one question about it, in a task PaliGemma knows:

    caption   "caption en"                              -> "2 shapes: a red circle and a blue square"
    colour    "answer en what colour is the circle?"    -> "red"        (shapes that occur once)
    shape     "answer en which shape is red?"           -> "circle"     (colours that occur once)
    count     "answer en how many shapes are there?"    -> "2"
    detect    "detect circle" or "detect circle ; square ; triangle"
                                                        -> "<loc0123><loc0045><loc0400><loc0321> circle ; ..."

`--detect star` asks detect questions about stars alone (in scenes that hold one), for fine-tuning a
model to detect a shape that its pretraining never asked about.

Boxes are y_min, x_min, y_max, x_max in 1024ths of the image, as PaliGemma writes them. The files
are `_annotations.train.jsonl` and `_annotations.valid.jsonl` (Roboflow's names, which train.py finds)
with the images in `images/`.
"""

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from processor import loc_tokens

SIZE = 112
SHAPES = ("circle", "square", "triangle")  # the default; "star" is drawn too
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30),
           "purple": (150, 60, 180)}
TASKS = ("caption", "colour", "shape", "count", "detect")
ALL_SHAPES_PROMPT = "detect " + " ; ".join(SHAPES)


def random_scene(rng: np.random.Generator, shapes=SHAPES) -> list[dict]:
    """1 to 3 shapes, each {"shape", "colour", "box": (x1, y1, x2, y2) in pixels}, not overlapping."""
    scene = []
    for _ in range(int(rng.integers(1, 4))):
        for _attempt in range(100):
            side = int(rng.integers(22, 46))
            x1, y1 = (int(v) for v in rng.integers(2, SIZE - side - 2, size=2))
            box = (x1, y1, x1 + side, y1 + side)
            if all(box[2] + 2 < s["box"][0] or s["box"][2] + 2 < box[0] or box[3] + 2 < s["box"][1]
                   or s["box"][3] + 2 < box[1] for s in scene):
                scene.append(dict(shape=str(rng.choice(shapes)), colour=str(rng.choice(list(COLOURS))), box=box))
                break
    return scene


def draw(scene: list[dict], rng: np.random.Generator | None = None) -> Image.Image:
    """The scene on a grey background; with `rng`, plus pixel noise."""
    image = Image.new("RGB", (SIZE, SIZE), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    for s in scene:
        x1, y1, x2, y2 = s["box"]
        colour = COLOURS[s["colour"]]
        if s["shape"] == "circle":
            pen.ellipse((x1, y1, x2 - 1, y2 - 1), fill=colour)
        elif s["shape"] == "square":
            pen.rectangle((x1, y1, x2 - 1, y2 - 1), fill=colour)
        elif s["shape"] == "star":  # five points, the inner corners at 0.4 of the radius, stretched to the box
            angles, radii = np.arange(10) * np.pi / 5, np.array([1, 0.4] * 5)
            px, py = radii * np.sin(angles), -radii * np.cos(angles)
            px = x1 + (px - px.min()) / np.ptp(px) * (x2 - 1 - x1)
            py = y1 + (py - py.min()) / np.ptp(py) * (y2 - 1 - y1)
            pen.polygon(list(zip(px, py)), fill=colour)
        else:
            pen.polygon([((x1 + x2 - 1) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)
    if rng is None:
        return image
    noisy = np.asarray(image, dtype=np.int16) + rng.normal(0, 8, (SIZE, SIZE, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def ask(scene: list[dict], task: str, rng: np.random.Generator, detect=None) -> tuple[str, str] | None:
    """(prefix, suffix) of one task about the scene, or None when the scene cannot answer it. `detect`:
    the one shape that detect questions ask about (default: one that is there, or all three)."""
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
        question = f"what colour is the {s['shape']}?" if task == "colour" else f"which shape is {s['colour']}?"
        return f"answer en {question}", s[other]
    # detect: one kind of shape that is there, or all three kinds; boxes top to bottom
    if detect is not None and all(s["shape"] != detect for s in scene):
        return None
    kinds = (detect,) if detect else SHAPES if rng.random() < 0.5 else (str(rng.choice(sorted({s["shape"] for s in scene}))),)
    found = sorted((s for s in scene if s["shape"] in kinds), key=lambda s: (s["box"][1], s["box"][0]))
    prefix = ALL_SHAPES_PROMPT if len(kinds) > 1 else f"detect {kinds[0]}"
    return prefix, " ; ".join(f"{loc_tokens(s['box'], SIZE, SIZE)} {s['shape']}" for s in found)


def write_split(out: Path, split: str, n: int, tasks: list[str], seed: int, shapes=SHAPES, detect=None):
    rng = np.random.default_rng([seed, ("train", "valid").index(split)])
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    while len(lines) < n:
        scene = random_scene(rng, shapes)
        qa = ask(scene, tasks[int(rng.integers(len(tasks)))], rng, detect)
        if qa is None:
            continue
        name = f"images/{split}-{len(lines):05d}.jpg"
        draw(scene, rng).save(out / name, quality=92)
        lines.append(json.dumps({"image": name, "prefix": qa[0], "suffix": qa[1]}))
    (out / f"_annotations.{split}.jsonl").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tasks", default=",".join(TASKS),
                   help=f"comma-separated, of {', '.join(TASKS)}; a task named twice is asked twice as often")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of circle, square, triangle, star")
    p.add_argument("--detect", default=None, help="the one shape that detect questions ask about")
    p.add_argument("--train", type=int, default=1000, help="training examples")
    p.add_argument("--valid", type=int, default=100, help="validation examples")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tasks, shapes = args.tasks.split(","), tuple(args.shapes.split(","))
    if unknown := set(tasks) - set(TASKS):
        p.error(f"unknown task(s) {', '.join(sorted(unknown))}; the tasks are {', '.join(TASKS)}")
    if unknown := set(shapes) - {*SHAPES, "star"}:
        p.error(f"unknown shape(s) {', '.join(sorted(unknown))}; the shapes are circle, square, triangle, star")
    if args.detect is not None and args.detect not in shapes:
        p.error(f"--detect {args.detect}: not among --shapes {args.shapes}")
    for split, n in (("train", args.train), ("valid", args.valid)):
        write_split(args.out, split, n, tasks, args.seed, shapes, args.detect)
    print(f"{args.out}: {args.train} training and {args.valid} validation examples ({', '.join(tasks)})")


if __name__ == "__main__":
    main()
