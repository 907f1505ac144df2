"""Generation: greedy equals transformers; the KV-cached loop equals full forward passes; sampling;
detection."""

import pytest
import torch

from conftest import PREFIXES, hf_model, random_images
from paligemma import PaliGemma, sample
from detections import parse_detections
from processor import Processor


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return PaliGemma.from_pretrained(checkpoint), Processor.from_pretrained(checkpoint), checkpoint


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_equals_transformers(tiny, n):
    model, processor, folder = tiny
    # n = 3: left-padded prompts of different lengths
    batch = processor(random_images(n), PREFIXES[:n])
    ours = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                          max_new_tokens=12)
    with torch.no_grad():
        theirs = hf_model(folder).generate(**batch, max_new_tokens=12, do_sample=False,
                                           eos_token_id=None)
    theirs = theirs[:, batch["input_ids"].shape[1]:]
    assert ours.shape == (n, 12) and torch.equal(ours, theirs)


def test_cached_loop_equals_full_forward(tiny):
    """Each greedy token equals the argmax of a full forward pass over prompt + tokens so far."""
    model, processor, _ = tiny
    batch = processor(random_images(3), PREFIXES)
    new = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                         max_new_tokens=6)
    ids, am = batch["input_ids"], batch["attention_mask"]
    for step in range(new.shape[1]):
        tt = torch.cat([torch.zeros_like(ids), torch.ones_like(new[:, :step])], 1)
        full_ids, full_am = torch.cat([ids, new[:, :step]],
                                      1), torch.cat([am, torch.ones_like(new[:, :step])], 1)
        with torch.no_grad():
            logits = model(full_ids, batch["pixel_values"], full_am, tt)
        assert torch.equal(logits[:, -1].argmax(-1), new[:, step]), step


def test_batch_rows_equal_prompts_alone(tiny):
    model, processor, _ = tiny
    images = random_images(3)
    batch = processor(images, PREFIXES)
    together = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                              max_new_tokens=8)
    for i in range(3):
        alone = processor(images[i:i + 1], PREFIXES[i:i + 1])
        assert torch.equal(
            model.generate(alone["input_ids"], alone["pixel_values"], max_new_tokens=8)[0],
            together[i])


def test_eos_stops_a_row(tiny):
    model, processor, _ = tiny
    batch = processor(random_images(3), PREFIXES)
    first = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                           max_new_tokens=1)[:, 0]
    model.config.eos_token_id = int(first[1])  # pretend row 1's first token is <eos>
    try:
        new = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                             max_new_tokens=5)
    finally:
        model.config.eos_token_id = 1
    assert new[1, 0] == first[1] and (new[1, 1:] == model.config.pad_token_id).all()
    # when every row has written <eos>, the loop ends early
    model.config.eos_token_id = int(first[0])
    try:
        alone = model.generate(batch["input_ids"][:1], batch["pixel_values"][:1],
                               batch["attention_mask"][:1], max_new_tokens=5)
    finally:
        model.config.eos_token_id = 1
    assert alone.shape == (1, 1)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
    model, processor, _ = tiny
    batch = processor(random_images(2), PREFIXES[:2])
    args = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    a = model.generate(*args, max_new_tokens=10, temperature=1.5, seed=7)
    b = model.generate(*args, max_new_tokens=10, temperature=1.5, seed=7)
    c = model.generate(*args, max_new_tokens=10, temperature=1.5, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(*args, max_new_tokens=10)
    assert torch.equal(model.generate(*args, max_new_tokens=10, temperature=1.0, top_k=1, seed=3),
                       greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for top_p, allowed in ((0.5, {0}), (0.6, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}),
                           (1.0, {0, 1, 2, 3})):
        g = torch.Generator().manual_seed(0)
        seen = {int(sample(logits, 1.0, 0, top_p, g)) for _ in range(300)}
        assert seen == allowed, top_p


def test_prompt_too_long(tiny):
    model, processor, _ = tiny
    batch = processor(random_images(1), PREFIXES[:1])
    with pytest.raises(ValueError, match="more than the model's 8192 positions"):
        model.generate(batch["input_ids"], batch["pixel_values"], max_new_tokens=8190)


def boxes(detections):
    return [(d.box, d.label) for d in detections]


def test_parse_detections():
    text = ("<loc0100><loc0200><loc0300><loc0400> red circle ; "
            "<loc0000><loc0000><loc1023><loc0512> big blue square")
    assert boxes(parse_detections(text, width=1024, height=512)) == [
        ((200.0, 50.0, 400.0, 150.0), "red circle"), ((0.0, 0.0, 512.0, 511.5), "big blue square")]
    seg = "<loc0100><loc0200><loc0300><loc0400>" + "<seg001>" * 16 + " cat"
    assert boxes(parse_detections(seg, 1024, 1024)) == [((200.0, 100.0, 400.0, 300.0), "cat")]
    for garbage in ("", "a cat", "<loc0100><loc0200> cat", "<loc0100><loc0200><loc0300",
                    "<locabcd>" * 4 + " x", "<loc0300><loc0200><loc0100><loc0400> upside down",
                    ";;; <loc>", "<loc0000><loc0000><loc1024><loc0512> past the last loc token",
                    "<loc0000><loc0000><loc0050><loc9999> x"):
        assert parse_detections(garbage, 100, 100) == [], garbage
    truncated = "<loc0100><loc0200><loc0300><loc0400> dog ; <loc0010><loc00"
    assert boxes(parse_detections(truncated, 1024, 1024)) == [((200.0, 100.0, 400.0, 300.0), "dog")]


def test_compiled_decode_step_compiles_once(mqa_checkpoint):
    """`model.decode_step = torch.compile(model.decode_step)` (docs/performance.md): same tokens,
    and every step of a generate call, and a second call with the same shapes, reuse one compiled
    graph."""
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    processor = Processor.from_pretrained(mqa_checkpoint)
    batch = processor(random_images(3), PREFIXES)
    eager = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                           max_new_tokens=6)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.decode_step = torch.compile(model.decode_step)
    for _ in range(2):
        compiled = model.generate(batch["input_ids"], batch["pixel_values"],
                                  batch["attention_mask"], max_new_tokens=6)
        assert torch.equal(compiled, eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_generate_without_the_mask_of_a_padded_batch(mqa_checkpoint):
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    processor = Processor.from_pretrained(mqa_checkpoint)
    batch = processor(random_images(2), ["caption en", "answer en how many circles are there?"])
    with pytest.raises(ValueError, match="start with <pad> .* but no attention_mask"):
        model.generate(batch["input_ids"], batch["pixel_values"], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, not 2.5"):
        model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                       max_new_tokens=2.5)
