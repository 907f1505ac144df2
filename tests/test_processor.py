"""Our Processor gives the same model inputs as transformers' PaliGemmaProcessor on the same
tokenizer; images and prompts it cannot take are named."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import hf_processor, random_images
from paligemma import PaliGemma
from processor import Processor, Tokenizer, load_image

PREFIXES = ["caption en", "answer en how many circles are there?", "detect circle ; square", "ocr"]
SUFFIXES = ["a red circle on grey", "2",
            "<loc0010><loc0020><loc0300><loc1023> circle ; <loc0000><loc0001><loc0002><loc0003> "
            "square", "Where is 42?"]


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
    theirs = hf_processor(checkpoint)(images=odd_images(), text=PREFIXES, suffix=suffixes,
                                      padding="longest", return_tensors="pt")
    for key in ("input_ids", "attention_mask",
                "token_type_ids") + (("labels",) if with_suffix else ()):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["pixel_values"].shape == theirs["pixel_values"].shape
    diff = (ours["pixel_values"] - theirs["pixel_values"]).abs().max().item()
    print(f"pixel_values max |difference| {diff:.1e}")
    assert diff < 1e-5


def test_layout(mqa_checkpoint):
    processor = Processor.from_pretrained(mqa_checkpoint)
    tok, n = processor.tokenizer, processor.num_image_tokens
    batch = processor(odd_images()[:2], ["caption en", "answer en how many circles are there?"],
                      ["a", "2"])
    row = batch["input_ids"][1].tolist()  # the longer prompt: no padding
    expected = [tok.image_token_id] * n + [tok.bos_id] + tok.encode("answer en how many circles "
                                                                    "are there?\n") \
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
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.image_token_id,
                                            tok.sp.get_piece_size() + 7]) == text


def test_tokenizer_without_loc_tokens_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["plain text only"] * 10),
                                   model_prefix=str(tmp_path / "p"), vocab_size=30,
                                   hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="no <loc0000> piece"):
        Tokenizer(tmp_path / "p.model", image_token_id=30)


def test_mismatched_lengths(mqa_checkpoint):
    with pytest.raises(ValueError, match="2 images, 1 prefixes"):
        Processor.from_pretrained(mqa_checkpoint)(odd_images()[:2], ["caption en"])


def test_processor_wants_pil_images(mqa_checkpoint):
    processor = Processor.from_pretrained(mqa_checkpoint)
    for thing, expected in ((None, "got NoneType"), ("cat.jpg", "got str: open files with "
                                                     "processor.load_image"),
                            (np.zeros((8, 8, 3), np.uint8), "got ndarray")):
        with pytest.raises(TypeError, match=f"expected a PIL image, {expected}"):
            processor([thing], ["caption en"])


def test_high_bit_depth_images_keep_their_contrast(mqa_checkpoint):
    """I;16, I and F images: scaled by their range, not clipped to white or black as PIL converts
    them."""
    processor = Processor.from_pretrained(mqa_checkpoint)
    ramp = np.linspace(0, 1, 28 * 28).reshape(28, 28)
    for image in (Image.fromarray((ramp * 65535).astype(np.uint16)),  # I;16
                  Image.fromarray((ramp * 1e6 - 5e5).astype(np.int32)),  # I, negative values too
                  Image.fromarray(ramp.astype(np.float32))):  # F in [0, 1]
        pixels = processor.preprocess_image(image)
        eight_bits = Image.fromarray((ramp * 255).round().astype(np.uint8))
        expected = processor.preprocess_image(eight_bits)
        assert (pixels - expected).abs().max() <= 2 / 255 + 1e-6, image.mode


def test_only_real_loc_and_seg_tokens_are_special(mqa_checkpoint):
    tok = Processor.from_pretrained(mqa_checkpoint).tokenizer
    unk = tok.sp.unk_id()
    for text in ("<loc1024>", "<loc9999>", "<seg128>", "<seg999>"):
        assert unk not in tok.encode(text) and tok.decode(tok.encode(text)) == text, text
    assert tok.encode("<loc1023><seg127>") == [tok.sp.piece_to_id("<loc1023>"),
                                               tok.sp.piece_to_id("<seg127>")]


def test_load_image_names_the_problem(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for path, expected in (
        (tmp_path / "nope.jpg", "no such image file"), (tmp_path, "is a directory"),
        (tmp_path / "empty.jpg", "is an empty file"), (tmp_path / "text.jpg", "cannot be decoded")):
        with pytest.raises(ValueError, match=expected):
            load_image(path)


def rotated_jpeg(path: Path) -> Path:
    """A 40 x 20 JPEG, red on its left half, tagged with EXIF orientation 6: viewers show it 20 x
    40."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    return path


def test_exif_orientation_is_applied(tmp_path):
    image = load_image(rotated_jpeg(tmp_path / "phone.jpg"))
    assert image.size == (20, 40)
    top = np.asarray(image)[:20].mean((0, 1))
    assert top[0] > 200 and top[2] < 50  # the red half is on top once upright


def test_the_tokenizer_must_fit_the_model(mqa_checkpoint, tmp_path):
    folder = shutil.copytree(mqa_checkpoint, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["image_token_index"] = 10  # below the tokenizer's pieces
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pieces, more than the model's vocabulary below <image>"):
        Processor.from_pretrained(folder)


def test_a_larger_image_limit_is_taken(mqa_checkpoint, tmp_path):
    Image.new("1", (13000, 13000)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=13000 * 13000).size == (13000, 13000)


def test_python_api_messages(mqa_checkpoint):
    processor = Processor.from_pretrained(mqa_checkpoint)
    with pytest.raises(ValueError, match="no examples"):
        processor([], [])
    with pytest.raises(TypeError,
                       match="prefixes must be a list of strings, one per image, not a string"):
        processor(random_images(1), "caption en")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint folder"):
        PaliGemma.from_pretrained(mqa_checkpoint / "config.json")
