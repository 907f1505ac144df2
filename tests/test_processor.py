"""Our Processor gives the same model inputs as transformers' PaliGemmaProcessor on the same tokenizer."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hf_processor
from processor import Processor, Tokenizer

PREFIXES = ["caption en", "answer en how many circles are there?", "detect circle ; square", "ocr"]
SUFFIXES = ["a red circle on grey", "2",
            "<loc0010><loc0020><loc0300><loc1023> circle ; <loc0000><loc0001><loc0002><loc0003> square", "Where is 42?"]


def odd_images() -> list[Image.Image]:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (31, 97, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (120, 45), dtype=np.uint8), mode="L")
    rgba = Image.fromarray(rng.integers(0, 256, (50, 50, 4), dtype=np.uint8), mode="RGBA")
    tall = Image.fromarray(rng.integers(0, 256, (300, 7, 3), dtype=np.uint8))
    return [rgb, grey, rgba, tall]


@pytest.mark.parametrize("with_suffix", [False, True])
def test_matches_transformers(checkpoint, with_suffix):
    suffixes = SUFFIXES if with_suffix else None
    ours = Processor.from_pretrained(checkpoint)(odd_images(), PREFIXES, suffixes)
    theirs = hf_processor(checkpoint)(images=odd_images(), text=PREFIXES, suffix=suffixes, padding="longest",
                                      return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids") + (("labels",) if with_suffix else ()):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    diff = (ours["pixel_values"] - theirs["pixel_values"]).abs().max().item()
    print(f"pixel_values max |difference| {diff:.1e}")
    assert diff < 1e-5


def test_layout(mqa_checkpoint):
    processor = Processor.from_pretrained(mqa_checkpoint)
    tok, n = processor.tokenizer, processor.num_image_tokens
    batch = processor(odd_images()[:2], ["caption en", "answer en how many circles are there?"], ["a", "2"])
    row = batch["input_ids"][1].tolist()  # the longer prompt: no padding
    expected = [tok.image_token_id] * n + [tok.bos_id] + tok.encode("answer en how many circles are there?\n") \
        + tok.encode("2") + [tok.eos_id]
    assert row == expected
    n_prefix = len(row) - len(tok.encode("2")) - 1
    assert batch["labels"][1].tolist() == [-100] * n_prefix + tok.encode("2") + [tok.eos_id]
    pad = int((batch["attention_mask"][0] == 0).sum())
    assert pad > 0 and batch["input_ids"][0, :pad].eq(tok.pad_id).all()  # padded on the left
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_tokenizer_special_tokens(mqa_checkpoint):
    tok = Processor.from_pretrained(mqa_checkpoint).tokenizer
    text = "<loc0000><loc1023><seg000><seg127> a red circle ; <loc0005> square"
    ids = tok.encode(text)
    assert tok.sp.piece_to_id("<loc1023>") in ids
    assert len([i for i in ids if tok.SPECIAL.fullmatch(tok.sp.id_to_piece(i))]) == 5
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.image_token_id, tok.sp.get_piece_size() + 7]) == text


def test_tokenizer_without_loc_tokens_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["plain text only"] * 10), model_prefix=str(tmp_path / "p"),
                                   vocab_size=30, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="no <loc0000> piece"):
        Tokenizer(tmp_path / "p.model", image_token_id=30)


def test_mismatched_lengths(mqa_checkpoint):
    with pytest.raises(ValueError, match="2 images, 1 prefixes"):
        Processor.from_pretrained(mqa_checkpoint)(odd_images()[:2], ["caption en"])
