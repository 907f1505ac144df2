"""metrics.detection_map is COCO box mAP exactly as pycocotools (a test-only dependency) computes
it."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detections import parse_detections
from metrics import detection_map, repeated_boxes

LABELS = ["cat", "dog", "car"]


def answer(boxes) -> str:
    """(y1, x1, y2, x2 in loc units, label) -> PaliGemma's answer text."""
    return " ; ".join(f"<loc{y1:04d}><loc{x1:04d}><loc{y2:04d}><loc{x2:04d}> {label}"
                      for y1, x1, y2, x2, label in boxes)


def pycocotools_map(pairs) -> dict:
    """The same boxes (parsed as detection_map parses them, at image size 1) through pycocotools'
    COCOeval, every detection with score 1 and ids in the order of the images and the answers."""
    labels = sorted({d.label for p, t in pairs for text in (p, t)
                     for d in parse_detections(text, 1, 1)})
    category = {label: i + 1 for i, label in enumerate(labels)}
    images, targets, detections = [], [], []
    for image_id, (predicted, target) in enumerate(pairs, 1):
        images.append(dict(id=image_id, width=1, height=1))
        for (x1, y1, x2, y2), label, *_ in parse_detections(target, 1, 1):
            box = [x1, y1, x2 - x1, y2 - y1]
            targets.append(dict(id=len(targets) + 1, image_id=image_id, category_id=category[label],
                                bbox=box, area=box[2] * box[3], iscrowd=0))
        for (x1, y1, x2, y2), label, *_ in parse_detections(predicted, 1, 1):
            detections.append(dict(image_id=image_id, category_id=category[label],
                                   bbox=[x1, y1, x2 - x1, y2 - y1], score=1.0))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        categories = [dict(id=i, name=n) for n, i in category.items()]
        gt.dataset = dict(images=images, annotations=targets, categories=categories)
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(detections) if detections else COCO(), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    # (thresholds, recall points, labels), area all, 100 boxes
    precision = evaluation.eval["precision"][:, :, :, 0, 2]
    per_label = {label: float(precision[:, :, category[label] - 1].mean()) for label in labels
                 if (precision[:, :, category[label] - 1] > -1).all()}
    return dict(map50=float(evaluation.stats[1]), map50_95=float(evaluation.stats[0]),
                ap50_95=per_label)


def random_case(rng: np.random.Generator) -> list[tuple[str, str]]:
    """Images with 0-4 targets of up to 3 labels, and answers that find, miss, shift, mislabel and
    repeat them."""
    pairs = []
    for _ in range(int(rng.integers(1, 8))):
        targets = []
        for _ in range(int(rng.integers(0, 5))):
            y1, x1 = (int(v) for v in rng.integers(0, 800, 2))
            h, w = (int(v) for v in rng.integers(20, 220, 2))
            targets.append((y1, x1, min(1023, y1 + h), min(1023, x1 + w), str(rng.choice(LABELS))))
        predicted = []
        for y1, x1, y2, x2, label in targets:
            if rng.random() < 0.8:
                # IoU from 1 down to below 0.5: exact ties with the thresholds too
                shift = int(rng.integers(0, 40))
                box = (y1 + shift, x1, min(1023, y2 + shift), x2)
                predicted.append((*box, label if rng.random() < 0.9 else str(rng.choice(LABELS))))
                if rng.random() < 0.2:
                    predicted.append(predicted[-1])  # the same box again: a false positive
        for _ in range(int(rng.integers(0, 3))):  # boxes where nothing is
            y1, x1 = (int(v) for v in rng.integers(0, 900, 2))
            predicted.append((y1, x1, y1 + 100, x1 + 100, str(rng.choice(LABELS))))
        rng.shuffle(predicted)
        pairs.append((answer(predicted), answer(targets)))
    return pairs


@pytest.mark.parametrize("seed", range(60))
def test_equals_pycocotools(seed):
    pairs = random_case(np.random.default_rng(seed))
    ours, theirs = detection_map(pairs), pycocotools_map(pairs)
    assert ours["map50"] == pytest.approx(theirs["map50"], abs=1e-6)
    assert ours["map50_95"] == pytest.approx(theirs["map50_95"], abs=1e-6)
    assert ours["ap50_95"].keys() == theirs["ap50_95"].keys()
    assert all(ours["ap50_95"][k] == pytest.approx(theirs["ap50_95"][k],
                                                   abs=1e-6) for k in ours["ap50_95"])


def test_edge_cases_equal_pycocotools():
    box, other = (100, 100, 300, 300, "cat"), (500, 500, 700, 700, "dog")
    cases = {
        "perfect": [(answer([box]), answer([box]))],
        "no prediction": [("", answer([box])), (answer([box]), answer([box]))],
        "image without targets": [(answer([box]), ""),
                                  (answer([box, other]), answer([box, other]))],
        "duplicated box": [(answer([box, box, box]), answer([box]))],
        "order matters with equal scores": [
            (answer([(100, 100, 300, 200, "cat"), box]), answer([box])),
            (answer([box]), answer([box]))],
        "label never in the targets": [(answer([box, (0, 0, 50, 50, "zebra")]), answer([box]))],
    }
    for name, pairs in cases.items():
        ours, theirs = detection_map(pairs), pycocotools_map(pairs)
        assert (ours["map50"], ours["map50_95"]) == pytest.approx(
            (theirs["map50"], theirs["map50_95"]), abs=1e-6), name
    assert detection_map([("", "")])["map50"] == -1  # nothing to find: pycocotools' -1
    duplicated = cases["duplicated box"]
    assert detection_map(duplicated)["map50"] < 1 and repeated_boxes(duplicated[0][0]) == 2
