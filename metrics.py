"""Scores of PaliGemma's answers against their targets, as the benchmarks score them.

score_answers    all of the below for a validation set's answers, each prompt by its kind
exact_match      VQA-style: lower case, no punctuation, no articles, single spaces, then equal
detection_map    COCO box mAP@50 and mAP@50:95, and AP per label, exactly as pycocotools' COCOeval
mask_iou         the IoU of an answer's masks with the target's (segment prompts, masks decoded by a VQ-VAE)
repeated_boxes   boxes an answer writes twice (each is a false positive)

What it is not: a place that runs the model (train.py's `evaluate` does). It imports numpy and
detections.py only, so that it can score answers without torch: copy it with detections.py.
"""

import string

import numpy as np

from detections import answer_problems, parse_detections


def normalize_answer(text: str) -> str:
    """VQA-style: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(answer: str, target: str) -> bool:
    return normalize_answer(answer) == normalize_answer(target)


# ----------------------------------------------------------------------------------------------
# COCO box mAP

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's, spelled as pycocotools spells them
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def coco_iou(d, g) -> float:
    """IoU of two (x, y, w, h) boxes, in pycocotools' arithmetic (its bbIou), so that ties fall alike."""
    w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
    h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (d[2] * d[3] + g[2] * g[3] - w * h)


def coco_matches(detections: list, targets: list) -> np.ndarray:
    """(thresholds, detections) bool: at each IoU threshold, whether each detection (in order) takes a target:
    the one of highest IoU >= the threshold among those not yet taken (a later one on ties)."""
    ious = [[coco_iou(d, g) for g in targets] for d in detections]
    matched = np.zeros((len(IOU_THRESHOLDS), len(detections)), dtype=bool)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = [False] * len(targets)
        for i in range(len(detections)):
            best, m = min(threshold, 1 - 1e-10), -1
            for j in range(len(targets)):
                if not taken[j] and ious[i][j] >= best:
                    best, m = ious[i][j], j
            if m >= 0:
                taken[m], matched[t, i] = True, True
    return matched


def labelled_xywh(answer: str) -> list[tuple[tuple, str]]:
    """An answer's boxes as COCO writes them, (x, y, w, h) in units of the image, with their labels."""
    return [((d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]), d.label)
            for d in parse_detections(answer, 1, 1)]


def average_precision(matches: list[np.ndarray], n_targets: int) -> np.ndarray:
    """One label's precision (thresholds, recall points) over the images' matches, as COCOeval accumulates
    it: cumulative true and false positives, precision made monotone from the right, read at 101 recalls."""
    tp = np.cumsum(np.concatenate(matches, axis=1), axis=1).astype(float)
    fp = np.arange(1, tp.shape[1] + 1) - tp
    q = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
    for t in range(len(IOU_THRESHOLDS)):
        recall, p = tp[t] / n_targets, tp[t] / (fp[t] + tp[t] + np.spacing(1))
        p = np.maximum.accumulate(p[::-1])[::-1]
        at = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
        q[t, at < len(p)] = p[at[at < len(p)]]
    return q


def detection_map(pairs: list[tuple[str, str]]) -> dict:
    """COCO box mAP of detect answers, as pycocotools' COCOeval computes it: pairs are (predicted answer,
    target suffix), one per image. Per label: detections ranked by score (PaliGemma gives none, so all
    score 1 and rank in the order of the images, then of the boxes within an answer), at most 100 per
    image; a detection takes an unmatched target of the same label at IoU >= the threshold, or is a false
    positive (a repeated box too); precision made monotone and read at 101 recall points, for IoU
    thresholds 0.50:0.05:0.95. Labels without targets are left out of the means, as in COCO.
    Returns map50, map50_95 (-1 without any target, as pycocotools) and ap50_95 per label."""
    per_label = {}  # label -> [matches of each image, number of targets]
    for predicted, target in pairs:
        detections, targets = labelled_xywh(predicted), labelled_xywh(target)
        for label in dict.fromkeys([label for _, label in targets + detections]):
            mine = [box for box, other in detections if other == label][:100]
            theirs = [box for box, other in targets if other == label]
            entry = per_label.setdefault(label, [[], 0])
            entry[0].append(coco_matches(mine, theirs))
            entry[1] += len(theirs)
    precision = {label: average_precision(matches, n) for label, (matches, n) in per_label.items() if n}
    if not precision:
        return dict(map50=-1.0, map50_95=-1.0, ap50_95={})
    every = np.stack(list(precision.values()))  # (labels, thresholds, recall points)
    return dict(map50=float(every[:, 0].mean()), map50_95=float(every.mean()),
                ap50_95={label: float(q.mean()) for label, q in sorted(precision.items())})


# ----------------------------------------------------------------------------------------------
# Masks, repeated boxes


def mask_iou(predicted: str, target: str, width: int, height: int, vae) -> float:
    """IoU of the union of an answer's masks with the union of the target's (decoded by the VQ-VAE too)."""
    def union(text):
        masks = np.zeros((height, width), dtype=bool)
        for d in parse_detections(text, width, height, vae):
            if d.mask is not None:
                masks |= d.mask
        return masks
    p, t = union(predicted), union(target)
    return float((p & t).sum() / max((p | t).sum(), 1))


def repeated_boxes(answer: str) -> int:
    """Boxes an answer writes again (the same box and label): each is a false positive for mAP."""
    found = [(d.box, d.label) for d in parse_detections(answer, 1, 1)]
    return len(found) - len(set(found))


# ----------------------------------------------------------------------------------------------
# A validation set's answers


def score_answers(rows: list[tuple[str, str, str, tuple[int, int]]], vae=None) -> dict:
    """rows: (prefix, answer, target, (width, height) of the image). detect and segment prompts get COCO
    box mAP (map50, map50_95, ap50_95 per label), repeated_boxes and what AnswerGrammar would prevent
    (malformed_answers, labels_not_in_prompt, repeated_objects), segment prompts with a VQ-VAE mask_iou,
    the others exact_match: each key only where there are such prompts."""
    detections = [(answer, target) for prefix, answer, target, _ in rows if prefix.startswith(("detect", "segment"))]
    masks = [mask_iou(answer, target, *size, vae) for prefix, answer, target, size in rows
             if prefix.startswith("segment") and vae is not None]
    matches = [exact_match(answer, target) for prefix, answer, target, _ in rows
               if not prefix.startswith(("detect", "segment"))]
    scores = {}
    if matches:
        scores["exact_match"] = sum(matches) / len(matches)
    if detections:
        scores |= detection_map(detections)
        scores["repeated_boxes"] = sum(repeated_boxes(answer) for answer, _ in detections)
        problems = [answer_problems(answer, prefix) for prefix, answer, _, _ in rows
                    if prefix.startswith(("detect", "segment"))]
        scores |= {"malformed_answers" if k == "malformed" else k: sum(p[k] for p in problems) for k in problems[0]}
    if masks:
        scores["mask_iou"] = sum(masks) / len(masks)
    return scores


def format_scores(scores: dict) -> str:
    """One line of the numbers, and a second of AP per label where there is one."""
    numbers = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()
                        if not isinstance(v, dict))
    per_label = ", ".join(f"{label} {ap:.3f}" for label, ap in scores.get("ap50_95", {}).items())
    return numbers + (f"\n  AP@50:95 per label: {per_label}" if per_label else "")
