"""Answers that can only be well-formed: detections.AnswerGrammar accepts what our encoders write
and nothing malformed; constrained generation yields parseable answers; a repeated object ends the
answer; training can shuffle the objects and still resume bit for bit; evaluation draws its
predictions."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_dataset, stopped_then_resumed
from detections import (AnswerConstraint, AnswerGrammar, AnswerTokens, answer_problems, loc_tokens,
                        parse_detections, segment_tokens)
from drawing import evaluation_picture
from paligemma import PaliGemma, read_config
from processor import Processor
from vqvae import VQVAE

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["circle", "square", "red triangle"]


@pytest.fixture(scope="module")
def tokens(mqa_checkpoint):
    return AnswerTokens(Processor.from_pretrained(mqa_checkpoint).tokenizer)


def walk(grammar: AnswerGrammar, ids: list[int], remaining: int = 1000) -> int | None:
    """Feeds ids to the grammar; returns the position of the first one it does not allow (None: all
    allowed)."""
    for position, token in enumerate(ids):
        allowed = np.concatenate([np.atleast_1d(a) for a in grammar.allowed(remaining - position)])
        if token not in allowed:
            return position
        grammar.advance(token)
    return None


def random_answer(rng, segment: bool, vae) -> str:
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        x1, y1 = (int(v) for v in rng.integers(0, 90, 2))
        box = (x1, y1, x1 + int(rng.integers(3, 20)), y1 + int(rng.integers(3, 20)))
        if segment:
            mask = np.zeros((112, 112), dtype=bool)
            mask[box[1]:box[3],
                 box[0]:box[2]] = rng.random((box[3] - box[1], box[2] - box[0])) < 0.7
            written = segment_tokens(mask, box, vae)
        else:
            written = loc_tokens(box, 112, 112)
        objects.append(f"{written} {rng.choice(NAMES)}")
    return " ; ".join(objects)


@pytest.mark.parametrize("segment", [False, True])
def test_accepts_what_our_encoders_write(segment, tokens, mqa_checkpoint):
    tokenizer = Processor.from_pretrained(mqa_checkpoint).tokenizer
    vae = VQVAE.from_npz(ROOT / "tiny" / "vae-tiny.npz")
    rng = np.random.default_rng(0)
    for _ in range(40):
        answer = random_answer(rng, segment, vae)
        grammar = AnswerGrammar(NAMES, segment, tokens)
        assert walk(grammar, tokenizer.encode(answer) + [tokenizer.eos_id]) is None, answer
        assert grammar.phase == "done"
        assert len(grammar.objects) == len(parse_detections(answer, 112, 112))
        prompt = ("segment " if segment else "detect ") + " ; ".join(NAMES)
        assert answer_problems(answer, prompt) == dict(malformed=0, labels_not_in_prompt=0,
                                                       repeated_objects=0)
    # nothing found: allowed
    assert walk(AnswerGrammar(NAMES, segment, tokens), [tokenizer.eos_id]) is None


BOX = "<loc0100><loc0200><loc0300><loc0400>"
SEGS = "".join(f"<seg{i:03d}>" for i in range(16))
MALFORMED = {  # answer, segment prompt?, what answer_problems finds
    "three locs": ("<loc0100><loc0200><loc0300> circle", False, "malformed"),
    "a label not in the prompt": (f"{BOX} hexagon", False, "labels_not_in_prompt"),
    "seg tokens in a detect answer": (f"{BOX}{SEGS} circle", False, "malformed"),
    "15 seg tokens": (f"{BOX}{SEGS[:-8]} circle", True, "malformed"),
    "no seg tokens in a segment answer": (f"{BOX} circle", True, "malformed"),
    "a box that ends before it starts": ("<loc0300><loc0200><loc0100><loc0400> circle", False,
                                         "malformed"),
    "text after a label": (f"{BOX} circle is round", False, "labels_not_in_prompt"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_refuses_malformed_answers(case, tokens, mqa_checkpoint):
    answer, segment, problem = MALFORMED[case]
    tokenizer = Processor.from_pretrained(mqa_checkpoint).tokenizer
    assert walk(AnswerGrammar(NAMES, segment, tokens),
                tokenizer.encode(answer) + [tokenizer.eos_id]) is not None
    assert answer_problems(answer,
                           ("segment " if segment else "detect ") + " ; ".join(NAMES))[problem] == 1


def test_a_repeated_object_ends_the_answer(tokens, mqa_checkpoint):
    tokenizer = Processor.from_pretrained(mqa_checkpoint).tokenizer
    near = "<loc0101><loc0200><loc0300><loc0401>"  # IoU 0.99 with BOX
    answer = (f"{BOX} circle ; <loc0500><loc0500><loc0600><loc0600> circle ; {near} circle ; "
              f"{BOX} square")
    ids = tokenizer.encode(answer)
    grammar = AnswerGrammar(NAMES, False, tokens)
    first = ids.index(tokenizer.encode("<loc0101>")[0])
    end_of_name = first + 4 + len(tokenizer.encode(" circle ; "))
    assert walk(grammar, ids[:end_of_name]) is None
    # only <eos> now
    assert [list(np.atleast_1d(a)) for a in grammar.allowed(100)] == [[tokenizer.eos_id]]
    constraint = AnswerConstraint(["detect circle ; square"], tokens, 10)
    constraint.rows[0] = grammar
    kept = constraint.answer(0, ids[:end_of_name], tokenizer.decode)
    assert kept == answer.split(" ; <loc0101>")[0]  # the two objects before, without the " ; "
    assert answer_problems(answer, "detect circle ; square")["repeated_objects"] == 1
    assert answer_problems(answer, "detect circle ; square")["labels_not_in_prompt"] == 0


def test_a_repeated_last_object_is_cut_when_generation_stops_at_its_eos(tokens, mqa_checkpoint):
    """generate shows each token to the constraint at the next step, so the batch's last <eos> is
    never shown: answer() reads it, and the object it ends, repeated, is cut."""
    tokenizer = Processor.from_pretrained(mqa_checkpoint).tokenizer
    ids = tokenizer.encode(f"{BOX} circle ; <loc0101><loc0200><loc0300><loc0401> circle")
    ids.append(tokenizer.eos_id)
    constraint = AnswerConstraint(
        ["detect circle ; square"], tokens,
        read_config(mqa_checkpoint / "config.json").text_config.vocab_size)
    previous = None
    for k, token in enumerate(ids):  # as generate calls it
        assert constraint(previous, 100 - k)[0, token]
        previous = torch.tensor([token])
    assert constraint.rows[0].phase == "label"  # <eos> not yet seen
    assert constraint.answer(0, ids, tokenizer.decode) == f"{BOX} circle"
    assert constraint.rows[0].cut is not None


def test_the_token_limit_is_never_cut_mid_object(tokens, mqa_checkpoint):
    """With few tokens left, no object is begun that could not end before the limit."""
    tokenizer = Processor.from_pretrained(mqa_checkpoint).tokenizer
    grammar = AnswerGrammar(["circle"], False, tokens)
    need = 4 + len(tokenizer.encode(" circle")) + 1
    assert [list(np.atleast_1d(a)) for a in grammar.allowed(need - 1)] == [[tokenizer.eos_id]]
    assert len(np.concatenate([np.atleast_1d(a) for a in grammar.allowed(need)])) == 1 + 1023


def test_constrained_generation_is_always_parseable(mqa_checkpoint, tokens):
    """A random model, greedy: free answers are mostly malformed; constrained ones never are, in a
    batch of rows with prompts of their own (and a caption prompt, which stays free)."""
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    processor = Processor.from_pretrained(mqa_checkpoint)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(6)]
    prefixes = ["detect circle ; square", "segment circle", "detect red triangle", "caption en",
                "detect square", "segment square ; circle"]
    batch = processor(images, prefixes)
    args = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    free = model.generate(*args, max_new_tokens=60)
    grammar = AnswerConstraint(prefixes, tokens, model.config.text_config.vocab_size)
    constrained = model.generate(*args, max_new_tokens=60, constrain=grammar)
    problems = {"free": 0, "constrained": 0}
    for name, new in (("free", free), ("constrained", constrained)):
        for i, (prefix, ids) in enumerate(zip(prefixes, new.tolist())):
            if prefix.startswith(("detect", "segment")):
                answer = processor.decode(ids)
                if name == "constrained":
                    answer = grammar.answer(i, ids, processor.decode)
                problems[name] += sum(answer_problems(answer, prefix).values())
    print(f"problems in 5 detect/segment answers of a random model: free {problems['free']}, "
          f"constrained {problems['constrained']}")
    assert problems["constrained"] == 0 < problems["free"]
    assert torch.equal(constrained[3],
                       free[3][:len(constrained[3])]) or constrained.shape[1] < free.shape[1]


def test_shuffled_objects_resume_bit_for_bit(run_train, mqa_checkpoint, tmp_path, monkeypatch):
    from data import Draws
    example = dict(image="x.png", prefix="detect a ; b", suffix=f"{BOX} a ; {BOX} b ; {BOX} a")
    draws = Draws([example], shuffle_seed=0)
    orders = {draws[(0, epoch)]["suffix"] for epoch in range(8)}
    assert len(orders) > 1 and draws[(0, 3)] == draws[(0, 3)]
    assert Draws([example])[(0, 5)] == example  # not shuffling: as written
    args = ["--steps", "6", "--lr", "1e-2", "--eval-every", "0", "--shuffle-objects"]
    straight = run_train(tmp_path / "straight", *args)
    stopped_then_resumed(run_train, monkeypatch, tmp_path / "resumed", *args, step=3)
    a, b = (PaliGemma.from_pretrained(f).state_dict() for f in (straight, tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_shuffle_objects_is_kept_on_resume(run_train, tmp_path, monkeypatch):
    """--resume without --shuffle-objects keeps shuffling, as the run did: the same weights as a run
    never stopped (on answers of several objects, whose order changes the loss)."""
    data = make_dataset(tmp_path / "many", 16, "many.jsonl")
    lines = [json.loads(line) for line in data.read_text().splitlines()]
    for record in lines:
        if record["prefix"].startswith("detect"):
            record["suffix"] = (f"{BOX} square ; <loc0500><loc0100><loc0900><loc0400> square ; "
                                f"{BOX} square")
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["--steps", "6", "--lr", "1e-2", "--eval-every", "0", "--batch-size", "8"]
    straight = run_train(tmp_path / "straight", *args, "--shuffle-objects", data=data)
    unshuffled = run_train(tmp_path / "unshuffled", *args, data=data)
    import train
    monkeypatch.setattr(train, "log", lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)
                        if str(a[0]).startswith("step 3/") else None)
    with pytest.raises(SystemExit):
        run_train(tmp_path / "resumed", *args, "--shuffle-objects", data=data)
    monkeypatch.undo()
    assert torch.load(tmp_path / "resumed" / "train_state.pt")["options"]["shuffle_objects"] is True
    run_train(tmp_path / "resumed", *args, "--resume", data=data)  # without --shuffle-objects
    a, b, c = (PaliGemma.from_pretrained(f).state_dict() for f in (straight, tmp_path / "resumed",
                                                                   unshuffled))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # shuffling changes the weights: the test can fail
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_the_evaluation_picture(run_train, tmp_path, capsys):
    out = run_train(tmp_path / "o", "--steps", "1", "--eval-every", "1")
    assert f"picture: {out / 'eval' / 'step-1.jpg'}" in capsys.readouterr().out
    with Image.open(out / "eval" / "step-1.jpg") as picture:
        # 8 validation examples, 4 a row
        assert picture.format == "JPEG" and picture.width == 4 * 512
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"detect/malformed_answers", "detect/labels_not_in_prompt",
            "repeated_objects_cut"} <= metrics[-1].keys()
    # Boxes change the pixels where they are drawn, a target's dashed outline too (white, thin).
    grey = Image.new("RGB", (100, 100), (128, 128, 128))
    example = (grey, "detect circle", "<loc0100><loc0100><loc0500><loc0500> circle",
               "<loc0600><loc0600><loc0900><loc0900> circle")
    drawn = np.asarray(evaluation_picture([example])).astype(int)
    scale = 512 / 100  # the tile's pixels per pixel of the image
    top, left, right = (round(v / 1024 * 100 * scale) for v in (100, 100, 500))
    edge = drawn[top - 2:top + 3, left + 10:right - 10]
    # the predicted box's top edge, in colour, all along
    assert (np.abs(edge - 128).sum(-1) > 100).any(0).all()
    top, left, right = (round(v / 1024 * 100 * scale) for v in (600, 600, 900))
    edge = drawn[top - 2:top + 3, left + 10:right - 10]
    white, grey = (edge > 200).all(-1).any(0), (np.abs(edge - 128).sum(-1) < 30).all(0)
    # the target's: white dashes, gaps
    assert white.sum() > 0.3 * len(white) and grey.sum() > 0.2 * len(grey)


BAD_NAMES = ["detect <loc0001>", "detect a<seg001>b", "segment cat<image>", "detect a\tb", "detect "
             "a\nb",
             "<image>detect cat"]


@pytest.mark.parametrize("prompt", BAD_NAMES, ids=[repr(p) for p in BAD_NAMES])
def test_prompts_the_grammar_cannot_answer_are_refused(prompt, tokens, mqa_checkpoint, data,
                                                       tmp_path):
    """A class name holding a <loc>, <seg> or <image> token, a tab or a newline (and any prompt
    written with <image>, as transformers' documentation writes them): one line in infer.py and in
    the data check, a ValueError in the Python API; never a row left without a token to take."""
    import infer
    from cli import UserError
    from data import read_jsonl
    processor = Processor.from_pretrained(mqa_checkpoint)
    with pytest.raises(ValueError, match="prompt .*: (the class name|it holds <image>)"):
        processor.tokens([prompt])
    if "<image>" not in prompt:
        with pytest.raises(ValueError, match="class name"):
            AnswerConstraint([prompt], tokens, 100)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(image=str(data.parent / "train.jsonl-0.png"), prefix=prompt,
                                   suffix="x")) + "\n")
    with pytest.raises(UserError) as e:
        read_jsonl(bad, skip_bad=False)
    detail = e.value.details[0]
    assert f"{bad}:1: " in detail and ("class name" in detail or "<image>" in detail)
    with pytest.raises(SystemExit) as stop:
        infer.main(["--model", str(mqa_checkpoint), "--image",
                    str(data.parent / "train.jsonl-0.png"), "--prompt", prompt])
    assert stop.value.code == 2


def test_a_name_of_hundreds_of_tokens(tokens):
    grammar = AnswerGrammar(["very " * 500 + "long"], False, tokens)
    assert grammar.trie.need > 500  # set without a call per token (a RecursionError before)


def test_answers_the_token_limit_ended_are_counted_under_the_grammar(mqa_checkpoint):
    """The grammar starts an object only if it can finish, then forces <eos>: an answer the limit
    cut looks finished, and is still counted as ended by the limit."""
    from answers import answer_batch
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    processor = Processor.from_pretrained(mqa_checkpoint)
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    off = torch.autocast("cpu", enabled=False)
    prompts = ["detect square ; circle", "caption en"]
    short = answer_batch(model, processor, images, prompts, 5, torch.device("cpu"), off)
    # no object fits in 5 tokens
    assert [a.text for a in short][0] == "" and all(a.at_limit for a in short)
    long = answer_batch(model, processor, images[:1], prompts[:1], 200, torch.device("cpu"), off)
    assert not long[0].at_limit
