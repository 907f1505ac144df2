"""PaliGemma's detect and segment answers: boxes as <loc> tokens, masks as <seg> tokens, read and
written.

    detect cat ; dog  ->  <loc0051><loc0309><loc0708><loc0646> cat ;
                          <loc0412><loc0020><loc0988><loc0501> dog   (one line)
    segment cat       ->  <loc0051><loc0309><loc0708><loc0646><seg012><seg097>...(16 in all) cat

A box is four coordinates in 1024ths of the image, y first: `<locY1><locX1><locY2><locX2>`; <locK>
reads K/1024, and a coordinate c is written <locK> with K = floor(c * 1024), at most 1023.
(big_vision's segmentation code writes round(c * 1023) and reads K/1023: boxes differ by less than
0.1%.) A mask is a 4x4 grid of codes of a VQ-VAE (vqvae.py), which decodes it to a 64x64 mask that
is resized into the box. Objects are joined by " ; ".

parse_detections   answer text -> Detection(box in pixels, label, codes, mask)
loc_tokens         a box in pixels -> its four <loc> tokens
segment_tokens     an object's mask and box -> its <loc> and <seg> tokens (training data from masks)

What it is not: the tokenizer (processor.py) or the scores of answers (metrics.py). It imports numpy
and PIL only (a VQ-VAE, when given, brings torch with it), so that scoring answers needs neither
torch nor the model.
"""

import re
import unicodedata
from typing import NamedTuple

import numpy as np
from PIL import Image

# PaliGemma's own tokens: 1024 box coordinates and 128 mask codes. Others (<loc1024>, <seg128>) are
# text.
LOC = r"<loc(?:0\d{3}|10[01]\d|102[0-3])>"  # <loc0000> .. <loc1023>
SEG = r"<seg(?:0\d\d|1[01]\d|12[0-7])>"  # <seg000> .. <seg127>
OBJECT = re.compile(f"({LOC})({LOC})({LOC})({LOC})((?:{SEG})*)([^;<]*)")


class Detection(NamedTuple):
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    label: str
    codes: tuple[int, ...] | None = None  # the 16 <seg> codes of a segment answer
    # bool (H, W), from the codes, when a VQ-VAE was given to decode them
    mask: np.ndarray | None = None


def decode_masks(vae, codes: list[tuple[int, ...]], chunk: int = 256) -> np.ndarray:
    """The VQ-VAE's 64x64 mask logits of each object's 16 codes, (n, 64, 64), decoded `chunk` at a
    time."""
    return np.concatenate([np.asarray(vae.decode(np.array(codes[i:i + chunk])))
                           for i in range(0, len(codes), chunk)])


def paste_mask(logits: np.ndarray, box, width: int, height: int) -> np.ndarray:
    """A 64x64 mask of logits resized bilinearly to the box (whole pixels, as big_vision's evaluator
    cuts it) and pasted into an (H, W) bool array: inside where the logit is > 0. (Zeros outside the
    box are pages never written: the array takes the memory of the box.)"""
    x1, y1, x2, y2 = (int(v) for v in box)
    mask = np.zeros((height, width), dtype=bool)
    if x2 > x1 and y2 > y1:
        resized = Image.fromarray(logits).resize((x2 - x1, y2 - y1), Image.BILINEAR)
        mask[y1:y2, x1:x2] = np.asarray(resized) > 0
    return mask


def parse_detections(text: str, width: int, height: int, vae=None) -> list[Detection]:
    """`<locY1><locX1><locY2><locX2>[<seg...> x 16] label ; ...` -> the objects, boxes in pixels.

    Whatever cannot be read as four loc tokens and a label is skipped (so is a box whose end is not
    after its start); an object's codes are kept only when exactly 16 <seg> tokens follow its box,
    and its mask is made when `vae` (a vqvae.VQVAE) is given, all of an answer's masks decoded
    together.
    """
    found = []  # (box, label, codes)
    for m in OBJECT.finditer(text):
        y1, x1, y2, x2 = (int(v[4:8]) / 1024 for v in m.groups()[:4])
        if y2 > y1 and x2 > x1:
            codes = tuple(int(c) for c in re.findall(r"<seg(\d{3})>", m.group(5)))
            found.append(((x1 * width, y1 * height, x2 * width, y2 * height), m.group(6).strip(),
                          codes if len(codes) == 16 else None))
    with_codes = [codes for _, _, codes in found if codes]
    logits = iter(decode_masks(vae, with_codes) if vae is not None and with_codes else [])
    return [Detection(box, label, codes,
                      paste_mask(next(logits), box, width, height) if vae is not None and codes
                      else None) for box, label, codes in found]


def loc_tokens(box, width: int, height: int) -> str:
    """(x1, y1, x2, y2) in pixels -> `<locY1><locX1><locY2><locX2>`."""
    x1, y1, x2, y2 = box
    return "".join(f"<loc{min(1023, int(v / size * 1024)):04d}>" for v, size in
                   ((y1, height), (x1, width), (y2, height), (x2, width)))


def segment_tokens(mask: np.ndarray, box, vae) -> str | None:
    """One object's mask (H, W) bool and box (x1, y1, x2, y2, pixels) -> its box and 16 <seg>
    tokens, as big_vision encodes them: the box cut to the image, the mask cut to the box (whole
    pixels), resized to 64x64 bilinearly (PIL antialiases when it shrinks), in [0, 1], encoded by
    the VQ-VAE. None when the box holds no whole pixel of the image."""
    height, width = mask.shape
    box = (max(0, box[0]), max(0, box[1]), min(width, box[2]), min(height, box[3]))
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    if x2 <= x1 or y2 <= y1:
        return None
    crop = Image.fromarray(mask[y1:y2, x1:x2].astype(np.uint8) * 255)
    crop = crop.resize((64, 64), Image.BILINEAR)
    codes = vae.encode(np.asarray(crop, dtype=np.float32)[None] / 255)[0]  # (16,)
    return loc_tokens(box, width, height) + "".join(f"<seg{int(c):03d}>" for c in codes)


# ----------------------------------------------------------------------------------------------
# A prompt's task: the one rule, from PaliGemma's task prefixes (big_vision's transfer configs and
# the mix checkpoints' prompts). It picks the scorers of an answer (metrics.py) and the grammar of
# its generation.

TASKS = ("caption", "answer", "question", "ocr", "detect", "segment", "other")


def name_problem(name: str) -> str | None:
    """Why a class name cannot be asked for in a detect or segment prompt (its answer writes the
    name after each box), or None: the one rule for names, in prompts, data and converted
    datasets."""
    if not name.strip():
        return "it is empty"
    if ";" in name:
        return "it holds ';', which separates the names of a prompt and the objects of an answer"
    if "<" in name or ">" in name:
        return ("it holds '<' or '>': answers write their <loc> and <seg> tokens so, and a name is "
                "read up to a '<'")
    if any(unicodedata.category(c).startswith("C") for c in name):
        return "it holds a control character (a tab, a newline)"
    return None


def prompt_task(prefix: str) -> str:
    """caption ("caption en", "describe en"), answer ("answer en <question>"), question ("question
    en <answer>": question generation), ocr, detect and segment (with at least one class name:
    "detect cat ; dog"), or other (a bare "detect", "segmentation of cat", free text)."""
    word, _, rest = prefix.strip().partition(" ")
    if word in ("caption", "describe"):
        return "caption"
    if word in ("answer", "question", "ocr"):
        return word
    if word in ("detect", "segment") and any(name.strip() for name in rest.split(";")):
        return word
    return "other"


# ----------------------------------------------------------------------------------------------
# Answers that can only be well-formed: the grammar of detect and segment answers, over token ids
#
# PaliGemma's tokenizer splits <loc> and <seg> tokens out of the text and encodes what lies between
# them as one piece of text: after a box comes " cat" (the space is part of the first piece,
# "▁cat"), or, when another object follows, " cat ; " (e.g. "▁cat", "▁;", "▁"). So the names of
# a prompt are encoded as they appear there, both ways, and kept in a trie; a decoding step may only
# take a token that continues a valid answer, and one that still lets the answer end before the
# token limit.


def prompt_names(prefix: str) -> tuple[bool, list[str]] | None:
    """(is it a segment prompt, its class names) for `detect a ; b` and `segment a`; None for other
    prompts."""
    task = prompt_task(prefix)
    if task not in ("detect", "segment"):
        return None
    names = prefix.strip().partition(" ")[2].split(";")
    return task == "segment", [name.strip() for name in names if name.strip()]


def box_iou(a, b) -> float:
    """IoU of two (y1, x1, y2, x2) boxes (in <loc> units: the ratio is the same in pixels)."""
    h, w = min(a[2], b[2]) - max(a[0], b[0]), min(a[3], b[3]) - max(a[1], b[1])
    inter = max(h, 0) * max(w, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class AnswerTokens:
    """The token ids a grammar needs, from a tokenizer (anything with `encode(text)` and
    `eos_id`)."""

    def __init__(self, tokenizer):
        self.encode, self.eos = tokenizer.encode, tokenizer.eos_id
        self.loc = np.array([tokenizer.encode(f"<loc{k:04d}>")[0] for k in range(1024)])
        self.seg = np.array([tokenizer.encode(f"<seg{k:03d}>")[0] for k in range(128)])
        self.loc_value = {int(t): k for k, t in enumerate(self.loc)}


class Trie:
    """The token sequences of the names after a box. A node maps a token to the next node; `ends` is
    the name a following <eos> completes, `more` the name completed here by " ; " (a box must
    follow); `need` is the fewest tokens from here to the end of the answer."""

    def __init__(self):
        self.children, self.ends, self.more, self.need = {}, None, None, 0

    def add(self, tokens, name: str, more: bool):
        node = self
        for t in tokens:
            node = node.children.setdefault(t, Trie())
        if more:
            node.more = name
        else:
            node.ends = name

    def finish(self, object_need: int) -> int:
        """Sets `need` at every node below this one, deepest first (a loop, not a call per token: a
        name may be hundreds of tokens long); object_need: the tokens of a whole object with its
        name and <eos>."""
        order, stack = [], [self]
        while stack:  # parents before children; `need` is then set in the reverse order
            order.append(node := stack.pop())
            stack.extend(node.children.values())
        for node in reversed(order):
            needs = [1 + child.need for child in node.children.values()]
            needs += [1] * (node.ends is not None) + [object_need] * (node.more is not None)
            node.need = min(needs)
        return self.need


class AnswerGrammar:
    """One row's answer to a detect or segment prompt, token by token:
    `<locY1><locX1><locY2><locX2>` with y2 > y1 and x2 > x1, 16 <seg> tokens for a segment prompt,
    one of the prompt's names, objects joined by " ; ", then <eos> (or <eos> at once: nothing
    found). An object that repeats an earlier one (the same name, IoU >= max_iou) ends the answer,
    which is cut before it (`cut`, a token index)."""

    def __init__(self, names: list[str], segment: bool, tokens: AnswerTokens, max_iou: float = 0.9):
        if problem := next((f"class name {n!r}: {why}" for n in names if (why := name_problem(n))),
                           None):
            raise ValueError(problem)
        self.tokens, self.segs, self.max_iou = tokens, 16 if segment else 0, max_iou
        self.trie = Trie()
        for name in names:
            self.trie.add(tokens.encode(" " + name), name, more=False)
            self.trie.add(tokens.encode(f" {name} ; "), name, more=True)
        shortest = min(len(tokens.encode(" " + name)) for name in names) + 1  # a name, then <eos>
        self.object_need = 4 + self.segs + shortest
        self.trie.finish(self.object_need)
        self.phase, self.box, self.node, self.left, self.objects = "start", [], None, 0, []
        self.n, self.object_start, self.cut, self.squeezed, self.at_limit = 0, 0, None, False, False

    def allowed(self, remaining: int) -> list:
        """The tokens that may come next, with `remaining` tokens left: ids, and arrays of ids.
        Where the limit leaves out a token that would otherwise be allowed, `squeezed` says so: an
        answer that then ends was ended by the token limit (`at_limit`), however finished it
        looks."""
        eos, loc = [self.tokens.eos], self.tokens.loc
        room = self.object_need <= remaining  # a whole object still fits
        box_start = [loc[:1023]] if room else []  # y1 < 1023 leaves room for y2
        self.squeezed = not room and self.phase in ("start", "more")
        if self.phase in ("start", "more"):
            return (eos if self.phase == "start" else []) + box_start
        if self.phase == "loc":
            k = len(self.box)  # y2 > y1, x2 > x1
            return [loc[:1023]] if k == 1 else [loc[self.box[k - 2] + 1:]]
        if self.phase == "seg":
            return [self.tokens.seg]
        if self.phase == "label":
            fits = [t for t, child in self.node.children.items() if 1 + child.need <= remaining]
            self.squeezed = (len(fits) < len(self.node.children)
                             or (self.node.more is not None and not room))
            return fits + eos * (self.node.ends is not None) + (box_start if self.node.more else [])
        return eos  # "cut": the answer ends

    def advance(self, token: int):
        self.n += 1
        if token == self.tokens.eos:
            self.at_limit = self.squeezed
            if self.phase == "label":
                self.complete(self.node.ends)
            self.phase = "done"
        elif self.phase in ("start", "more") or (self.phase == "label"
                                                 and token in self.tokens.loc_value):
            if self.phase == "label":  # a box after a name that may also go on: " ; " ended it
                self.complete(self.node.more)
            self.phase, self.box = "loc", [self.tokens.loc_value[token]]
            self.object_start = self.n - 1
        elif self.phase == "loc":
            self.box.append(self.tokens.loc_value[token])
            if len(self.box) == 4:
                if self.segs:
                    self.phase, self.left, self.node = "seg", self.segs, None
                else:
                    self.phase, self.left, self.node = "label", 0, self.trie
        elif self.phase == "seg":
            self.left -= 1
            if self.left == 0:
                self.phase, self.node = "label", self.trie
        else:  # a token of the name
            self.node = self.node.children[token]
            if self.node.more is not None and not self.node.children:
                self.phase = "cut" if self.complete(self.node.more) else "more"

    def complete(self, name: str) -> bool:
        """Records the object; True (and the answer is cut before it) when it repeats an earlier
        one."""
        if any(other == name and box_iou(box, self.box) >= self.max_iou
               for other, box in self.objects):
            self.cut = self.object_start
            return True
        self.objects.append((name, tuple(self.box)))
        return False


class AnswerConstraint:
    """The per-step constraint for `PaliGemma.generate(..., constrain=)`: rows whose prompt is a
    detect or segment prompt follow their own AnswerGrammar; the other rows are free. Called with
    the tokens just written (None at the first step) and the tokens left; returns the allowed
    tokens, (B, V) bool."""

    def __init__(self, prefixes: list[str], tokens: AnswerTokens, vocab_size: int,
                 max_iou: float = 0.9):
        kinds = [prompt_names(p) for p in prefixes]
        self.rows = [AnswerGrammar(k[1], k[0], tokens, max_iou) if k else None for k in kinds]
        self.mask = np.ones((len(prefixes), vocab_size), dtype=bool)

    def __call__(self, previous, remaining: int) -> np.ndarray:
        previous = None if previous is None else previous.tolist()
        for i, row in enumerate(self.rows):
            if row is None or row.phase == "done":
                continue
            if previous is not None:
                row.advance(previous[i])
            if row.phase != "done":
                self.mask[i] = False
                for ids in row.allowed(remaining):
                    self.mask[i, ids] = True
                if not self.mask[i].any():  # never a row with no token to take: it ends
                    self.mask[i, row.tokens.eos] = True
            else:
                self.mask[i] = True
        return self.mask

    @classmethod
    def for_prompts(cls, prefixes: list[str], tokens: AnswerTokens, vocab_size: int,
                    max_iou: float = 0.9):
        """The constraint of a batch, or None (generation runs free) when it holds no detect or
        segment prompt."""
        return cls(prefixes, tokens, vocab_size,
                   max_iou) if any(prompt_names(p) for p in prefixes) else None

    def answer(self, i: int, ids: list[int], decode) -> str:
        """Row i's answer as text (`decode(ids)`), without the repeated object that ended it, if one
        did, nor the " ; " before it. Generation stops after the batch's last token without passing
        it to the constraint: it is read here, so that a repeated object that <eos> ends is found
        too."""
        row = self.rows[i]
        if row is None:  # not a detect or segment prompt
            return decode(ids)
        for token in ids[row.n:]:
            if row.phase == "done":
                break
            row.advance(token)
        if row.cut is None:
            return decode(ids)
        return decode(ids[:row.cut]).rstrip().removesuffix(";").rstrip()


def answer_problems(answer: str, prefix: str, max_iou: float = 0.9) -> dict[str, int]:
    """What AnswerGrammar prevents, found in a detect or segment answer: malformed (1 when a part of
    it is not an object of the prompt's form), labels_not_in_prompt and repeated_objects (counts of
    objects)."""
    segment, names = prompt_names(prefix) or (False, [])
    problems, seen = dict(malformed=0, labels_not_in_prompt=0, repeated_objects=0), []
    form = re.compile(f"({LOC})({LOC})({LOC})({LOC})((?:{SEG}){{16}})? (.+)")
    # only "" (<eos> at once) is no object
    for part in (p.strip() for p in answer.split(";") if answer):
        m = form.fullmatch(part)
        box = m and tuple(int(v[4:8]) for v in m.groups()[:4])
        if not m or bool(m.group(5)) != segment or box[2] <= box[0] or box[3] <= box[1]:
            problems["malformed"] = 1
        elif m.group(6) not in names:
            problems["labels_not_in_prompt"] += 1
        elif any(name == m.group(6) and box_iou(other, box) >= max_iou for name, other in seen):
            problems["repeated_objects"] += 1
        else:
            seen.append((m.group(6), box))
    return problems
