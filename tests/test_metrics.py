"""Each metric of metrics.py equals its benchmark's own computation: CIDEr-D and BLEU-4
pycocoevalcap's (its Java PTB tokenizer included), ANLS the anls package's, the character error rate
jiwer's, the edit distance editdistance's; VQA accuracy, relaxed and counting accuracy, and
big_vision's RefCOCO scores on worked examples of their rules. And a prompt's task, the one rule
that picks them."""

import random
import shutil
import string
from pathlib import Path

import anls as anls_package
import editdistance
import jiwer
import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import metrics
from detections import prompt_names, prompt_task, segment_tokens

SUBJECTS = ["A man", "a woman", "Two dogs", "The cat", "A group of people", "an old man's dog", "A "
            "child's toy",
            "a red double-decker bus", "A 3-year-old boy", "The kids' bikes", "Mr. Smith", "Dr. "
            "Jones' office",
            "A brown-and-white horse", "several birds"]
VERBS = ["is standing", "are sitting", "rides a skate-board", "eats pizza", "isn't moving",
         "doesn't move", "can't see", "won't stop", "is holding an umbrella",
         "looks at the camera"]
PLACES = ["on the beach", "in a kitchen", "(in the rain)", "at 5:30 pm", "in the U.S.", "on a "
          "1,000 ft. hill",
          "under a \"STOP\" sign", "with 3.5 slices", "by the road; it's sunny", "in front of a "
          "building: tall",
          "at the park!", "near a sign reading 'no parking'", "at 10% off", "for $5", "in the "
          "1990s' style",
          "-- near the shore", "beside a cat, a dog, and a bird", "on a sunny day...", "wait... "
          "what?!"]


def captions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}"
        text += f", {rng.choice(PLACES)}" * (rng.random() < 0.3) + rng.choice(["", ".", " .", "!",
                                                                               "?", "..."])
        out.append(text if rng.random() < 0.7 else text.lower())
    return out


@pytest.fixture(scope="module")
def caption_set():
    """300 images with 1 to 5 references each, and an answer: one of its references, or another
    caption."""
    rng = random.Random(0)
    pool = iter(captions(2000, 1))
    references = [[next(pool) for _ in range(rng.randint(1, 5))] for _ in range(300)]
    answers = [rng.choice(refs) if rng.random() < 0.3 else next(pool) for refs in references]
    return answers, references


def test_ptb_tokenizer_as_pycocoevalcap_runs_it(caption_set):
    assert shutil.which("java"), ("pycocoevalcap's tokenizer needs a Java runtime (Debian: "
                                  "default-jre-headless)")
    texts = captions(500, 2) + [
        "don't, won't, can't", "it's 9 a.m. now", "Mr. Smith and Mrs. Jones at St. Paul's.",
        "(a) [b] {c}", "a+b=c", "we'd've", "rock 'n' roll", "'90s", "1/2 cup", "100%",
        "I.B.M. is big.", "x -- y", "gonna", "hello,world", "5:30pm", "etc."]
    theirs = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    assert [metrics.ptb_tokenize(t) for t in texts] == [theirs[i][0] for i in range(len(texts))]


def test_cider_and_bleu_equal_pycocoevalcap(caption_set):
    answers, references = caption_set
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs]
                              for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": a}] for i, a in enumerate(answers)})
    cider, each_cider = Cider().compute_score(gts, res)
    bleu, each_bleu = Bleu(4).compute_score(gts, res, verbose=0)
    ours_bleu, ours_each_bleu = metrics.bleu_scores(answers, references)
    worst = max(abs(a - b) for a, b in zip(each_cider, metrics.cider_scores(answers, references)))
    print(f"CIDEr {cider:.6f} vs ours {metrics.cider(answers, references):.6f} (per image at most "
          f"{worst:.1e}); BLEU-4 {bleu[3]:.6f} vs {ours_bleu:.6f}")
    assert abs(metrics.cider(answers, references) - cider) <= 1e-9 and worst <= 1e-9
    assert abs(metrics.bleu4(answers, references) - bleu[3]) <= 1e-9
    assert max(abs(a - b) for a, b in zip(each_bleu[3], ours_each_bleu)) <= 1e-9
    # one image alone: every n-gram in every document
    assert metrics.cider(answers[:1], references[:1]) == 0.0


def random_text(rng: random.Random) -> str:
    letters = string.ascii_letters + "  0123456789.,-éß"
    return "".join(rng.choice(letters) for _ in range(rng.randint(0, 12)))


def test_anls_cer_and_edit_distance_equal_their_packages():
    rng = random.Random(0)
    for _ in range(500):
        answer, refs = random_text(rng), [random_text(rng) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.3:  # close misses, case and spacing
            refs[0] = answer.upper().replace("a", "b", 1) + " "
        assert metrics.anls(answer, refs) == anls_package.anls_score(answer, refs)
        assert metrics.edit_distance(answer, refs[0]) == editdistance.eval(answer, refs[0])
        if refs[0].strip():
            assert metrics.character_error_rate(answer, refs[0]) == pytest.approx(
                jiwer.cer(refs[0], answer), abs=0)
    assert metrics.anls("", [""]) == 1.0 and metrics.anls("Hello  World", ["hello world"]) == 1.0
    rows = [metrics.Row("ocr", a, [r], (1, 1)) for a, r in (("STOP", "STOP"), ("5T0P", "STOP"),
                                                            ("exit", "EXIT 2"))]
    totals, each = metrics.score_ocr(rows)
    assert totals["cer"] == pytest.approx(jiwer.cer([r.references[0] for r in rows],
                                                    [r.answer for r in rows]))
    assert [own["exact_match"] for own in each] == [1.0, 0.0, 0.0]


# VQA accuracy: worked examples of the official evaluation's rules (visualqa.org/evaluation.html,
# vqaEval.py, big_vision's vqav2.py), each value worked out by hand.
VQA = [
    ("yes", ["yes"] * 10, 1.0),  # all ten agree: every leave-one-out subset has 9 matches
    ("Yes", ["yes"] * 10, 0.0),  # agreeing references: no normalisation at all, so case matters
    ("yes\n", ["yes"] * 10, 1.0),  # newlines and tabs become spaces, then stripped
    ("yes.", ["yes"] * 9 + ["yeah"], 1.0),  # they disagree: the period is removed
    # number words become digits: 3 matches, (3 * 2/3 + 7 * 1) / 10
    ("two", ["2"] * 3 + ["3"] * 7, 0.9),
    ("none", ["0"] * 2 + ["1"] * 8, 0.6),  # "none" is 0: (2 * 1/3 + 8 * 2/3) / 10
    ("3.5", ["3.5"] * 2 + ["3"] * 8, 0.6),  # a period before a digit stays
    ("1,000", ["1000"] * 5 + ["100"] * 5, 1.0),  # a digit,digit comma: punctuation is deleted
    ("dont", ["don't"] * 3 + ["no"] * 7, 0.9),  # contractions get their apostrophe
    ("a dog", ["dog"] * 2 + ["cat"] * 8, 0.6),  # articles go
    # a slash not beside a space becomes one
    ("black/white", ["black white"] * 2 + ["black"] * 8, 0.6),
    ("yes !", ["yes"] * 4 + ["no"] * 6, 1.0),  # beside a space it is deleted
    ("red", ["red"] * 5 + ["blue"] * 5, 1.0),
    ("red", ["red"] + ["blue"] * 9, 0.3),  # 9 subsets with 1 match of 3, one with none
    ("red", ["Red", "RED", "red"] + ["blue"] * 7, 0.9),  # they disagree, so all are lower-cased
    ("red", ["blue"] * 10, 0.0),
    ("Red.", ["red"], 1.0),  # one reference: exact match after the normalisation of both
    ("red", ["blue"], 0.0),
    ("the Eiffel tower", ["eiffel tower"], 1.0),
]


@pytest.mark.parametrize("answer, references, expected", VQA,
                         ids=[repr(c[0]) + str(len(c[1])) for c in VQA])
def test_vqa_accuracy_worked_examples(answer, references, expected):
    assert metrics.vqa_accuracy(answer, references) == pytest.approx(expected)


def test_relaxed_and_counting_accuracy():
    relaxed = [("10.4", "10", 1.0), ("10.6", "10", 0.0), ("12%", "0.12", 1.0), ("0", "0", 1.0),
               ("0.01", "0", 0.0), ("abc", "abc", 1.0), ("abc", "abd", 0.0), ("-5", "-5.2", 1.0)]
    assert [metrics.relaxed_accuracy(a, r) for a, r, _ in relaxed] == [e for _, _, e in relaxed]
    counts = [("two", "2", 1.0), ("Twelve", "12", 1.0), ("3", "three", 1.0), ("3", "4", 0.0),
              ("none", "0", 1.0)]
    assert [metrics.count_accuracy(a, r) for a, r, _ in counts] == [e for _, _, e in counts]
    totals, each = metrics.score_answers([
        metrics.Row("answer en how many?", "2", ["2"], (1, 1)),
        metrics.Row("answer en what colour?", "red", ["blue"], (1, 1))])
    assert "count_accuracy" in each[0] and "count_accuracy" not in each[1]
    assert totals["count_accuracy"] == 1.0


def test_referring_segmentation_worked_examples():
    """big_vision's RefCOCO scores: the first object's box IoU and mask IoU against the target's; an
    answer without a whole first object is invalid and scores 0."""
    from vqvae import VQVAE
    vae = VQVAE.from_pretrained(Path(__file__).resolve().parent.parent / "tiny" / "vae-tiny.npz")
    mask = np.zeros((64, 64), dtype=bool)
    mask[8:40, 8:40] = True
    target = segment_tokens(mask, (8, 8, 40, 40), vae) + " cube"
    far = segment_tokens(mask[::-1, ::-1], (24, 24, 56, 56), vae) + " cube"
    rows = [metrics.Row("segment cube", answer, [target], (64, 64))
            for answer in (target, far, "<loc0100><loc0100><loc0500><loc0500> cube", "")]
    totals, each = metrics.score_segments(rows, vae)
    assert each[0]["miou"] == 1.0 and each[0]["box_acc50"] == 1.0  # the same tokens: the same mask
    # IoU of the boxes: 16^2 / (2 * 32^2 - 16^2)
    assert each[1]["box_acc50"] == 0.0 and each[1]["miou"] < 0.5
    assert each[2]["miou"] == 0.0 == each[3]["miou"] and totals["invalid"] == 2
    assert totals["miou"] == pytest.approx(sum(own["miou"] for own in each) / 4)


TASKS = [("caption en", "caption"), ("describe en", "caption"), ("answer en what is it?", "answer"),
         ("question en red", "question"), ("ocr", "ocr"), ("detect cat ; dog", "detect"),
         ("segment cat", "segment"), ("detect", "other"), ("segmentation of cat", "other"),
         ("what is it?", "other"), ("detect ;", "other")]


@pytest.mark.parametrize("prefix, task", TASKS)
def test_one_rule_for_a_prompts_task(prefix, task):
    assert prompt_task(prefix) == task
    assert (prompt_names(prefix) is not None) == (task in ("detect", "segment"))


def test_scores_by_task_and_their_flat_names():
    rows = [metrics.Row("caption en", "a red circle", ["a red circle", "one red circle"], (8, 8)),
            metrics.Row("answer en how many?", "two", ["2"], (8, 8)),
            metrics.Row("detect cat", "<loc0000><loc0000><loc0512><loc0512> cat",
                        ["<loc0000><loc0000><loc0512><loc0512> cat"], (8, 8)),
            metrics.Row("no task", "x", ["x"], (8, 8))]
    summary, each = metrics.score(rows)
    assert list(summary) == ["caption", "answer", "detect", "other"]
    assert summary["answer"]["vqa_accuracy"] == 1.0
    assert summary["detect"]["map50"] == pytest.approx(1.0)
    assert summary["other"] == dict(exact_match=1.0, examples=1)
    assert each[3] == dict(exact_match=1.0)
    assert metrics.flat(summary)["detect/map50"] == summary["detect"]["map50"]
