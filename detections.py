"""PaliGemma's detect and segment answers: boxes as <loc> tokens, masks as <seg> tokens, read and written.

    detect cat ; dog  ->  <loc0051><loc0309><loc0708><loc0646> cat ; <loc0412><loc0020><loc0988><loc0501> dog
    segment cat       ->  <loc0051><loc0309><loc0708><loc0646><seg012><seg097>...(16 in all) cat

A box is four coordinates in 1024ths of the image, y first: `<locY1><locX1><locY2><locX2>`; <locK> reads
K/1024, and a coordinate c is written <locK> with K = floor(c * 1024), at most 1023. (big_vision's
segmentation code writes round(c * 1023) and reads K/1023: boxes differ by less than 0.1%.) A mask is a
4x4 grid of codes of a VQ-VAE (vqvae.py), which decodes it to a 64x64 mask that is resized into the box.
Objects are joined by " ; ".

parse_detections   answer text -> Detection(box in pixels, label, codes, mask)
loc_tokens         a box in pixels -> its four <loc> tokens
segment_tokens     an object's mask and box -> its <loc> and <seg> tokens (training data from masks)

What it is not: the tokenizer (processor.py) or the scores of answers (metrics.py). It imports numpy and
PIL only (a VQ-VAE, when given, brings torch with it), so that scoring answers needs neither torch nor
the model.
"""

import re
from typing import NamedTuple

import numpy as np
from PIL import Image

# PaliGemma's own tokens: 1024 box coordinates and 128 mask codes. Others (<loc1024>, <seg128>) are text.
LOC = r"<loc(?:0\d{3}|10[01]\d|102[0-3])>"  # <loc0000> .. <loc1023>
SEG = r"<seg(?:0\d\d|1[01]\d|12[0-7])>"  # <seg000> .. <seg127>
OBJECT = re.compile(f"({LOC})({LOC})({LOC})({LOC})((?:{SEG})*)([^;<]*)")


class Detection(NamedTuple):
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    label: str
    codes: tuple[int, ...] | None = None  # the 16 <seg> codes of a segment answer
    mask: np.ndarray | None = None  # bool (H, W), from the codes, when a VQ-VAE was given to decode them


def paste_mask(vae, codes, box, width: int, height: int) -> np.ndarray:
    """The VQ-VAE's 64x64 mask of `codes`, resized bilinearly to the box (whole pixels, as big_vision's
    evaluator cuts it) and pasted into an (H, W) bool array: inside where the decoder's output is > 0."""
    logits = np.asarray(vae.decode(np.array([codes])))[0]  # (64, 64)
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
    codes = vae.encode(np.asarray(crop, dtype=np.float32)[None] / 255)[0]  # (16,)
    return loc_tokens(box, width, height) + "".join(f"<seg{int(c):03d}>" for c in codes)
