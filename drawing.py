"""PaliGemma's answers drawn on their images: boxes with their labels, masks as translucent fills,
and a grid of validation examples with their targets' boxes beside the answers'.

    draw_detections      an image with detections.Detection objects drawn on it (infer.py --out)
    evaluation_picture   a grid of (image, prefix, answer, target) examples
                         (train.py's OUT/eval/step-N.jpg)

What it is not: the parsing of answers (detections.py). Imports PIL, numpy and this project's
detections.py and processor.py.
"""

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

from detections import Detection, parse_detections, prompt_names
from processor import to_rgb

COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 200, 200), (240, 50, 230), (210, 180, 20))


def draw_detections(image: Image.Image, detections: list[Detection]) -> Image.Image:
    """A copy of `image` with each object's box and label, and its mask (a translucent fill with an
    outline) when it has one. Images under 512 pixels are drawn enlarged, so that labels can be
    read; a label sits above its box where there is room, else inside it, and never leaves the
    image."""
    scale = max(1, round(512 / max(image.size)))
    canvas = to_rgb(image).resize((image.width * scale, image.height * scale),
                                  Image.Resampling.NEAREST)
    line = max(2, canvas.height // 250)
    overlay = Image.new("RGBA", canvas.size)
    for i, d in enumerate(detections):
        if d.mask is not None:
            mask = Image.fromarray(d.mask.astype(np.uint8) * 255)
            mask = mask.resize(canvas.size, Image.Resampling.NEAREST)
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
            draw.text((x + 3 - left, y + 3 - top), d.label, fill="white" if dark else "black",
                      font=font)
    return canvas


def dashed_box(draw: ImageDraw.ImageDraw, box, fill, width: int = 1, dash: int = 6):
    """A rectangle's outline in dashes of `dash` pixels with gaps as long."""
    x1, y1, x2, y2 = box
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)),
                               ((x1, y2), (x1, y1))):
        length = max(abs(bx - ax), abs(by - ay), 1)
        for t in range(0, int(length), 2 * dash):
            f, g = t / length, min(t + dash, length) / length
            draw.line([(ax + f * (bx - ax), ay + f * (by - ay)),
                       (ax + g * (bx - ax), ay + g * (by - ay))],
                      fill=fill, width=width)


def evaluation_picture(examples: list[tuple], vae=None, tile: int = 512) -> Image.Image:
    """Validation examples, (image, prefix, answer, target) each, in a grid of 4 a row: detect and
    segment answers drawn as infer.py draws them (boxes and masks in colour), their targets' boxes
    as thin dashed white outlines; under each image, its prompt, and for other prompts the answer
    and the target too."""
    font = ImageFont.load_default(size=15)
    lines, columns = 3, min(4, len(examples))
    grid = Image.new("RGB", (columns * tile, -(-len(examples) // columns) * (tile + 18 * lines)),
                     "white")
    for i, (image, prefix, answer, target) in enumerate(examples):
        if prompt_names(prefix):
            canvas = draw_detections(image, parse_detections(answer, *image.size, vae=vae))
            scale = canvas.width / image.width
            draw = ImageDraw.Draw(canvas)
            for d in parse_detections(target, *image.size):
                dashed_box(draw, [v * scale for v in d.box], "white",
                           width=max(2, canvas.height // 300))
            text = [prefix]
        else:
            canvas, text = to_rgb(image), [prefix, f"answer: {answer}", f"target: {target}"]
        canvas = canvas.resize((tile, tile), Image.Resampling.BILINEAR)
        x, y = i % columns * tile, i // columns * (tile + 18 * lines)
        grid.paste(canvas, (x, y))
        for k, line in enumerate(text):
            ImageDraw.Draw(grid).text((x + 4, y + tile + 2 + 18 * k), line[:tile // 8],
                                      fill="black", font=font)
    return grid
