"""Our logits equal transformers' PaliGemma on the same weights and inputs (float32)."""

import numpy as np
import torch
from PIL import Image

from conftest import hf_config, hf_model, make_checkpoint
from paligemma import PaliGemma, Processor

TOL = 1e-4  # the bound; the measured differences are printed (pytest -s)


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(37, 53), (64, 20), (100, 100), (13, 77)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3), dtype=np.uint8)) for i in range(n)]


def max_diff_on_tokens(ours: torch.Tensor, theirs: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Max |difference| over the real (non-padding) positions; padding positions are never read."""
    keep = attention_mask.bool()
    return (ours[keep] - theirs[keep]).abs().max().item()


def compare(folder, prefixes, suffixes=None, label=""):
    ours, theirs = PaliGemma.from_pretrained(folder), hf_model(folder)
    batch = Processor.from_pretrained(folder)(random_images(len(prefixes)), prefixes, suffixes)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        a = ours(**inputs)
        b = theirs(**inputs, labels=batch.get("labels")).logits
    assert a.shape == b.shape
    diff = max_diff_on_tokens(a, b, batch["attention_mask"])
    print(f"{label} {folder.name}: max |logit difference| {diff:.2e}")
    assert diff <= TOL
    return diff


PREFIXES = ["caption en", "answer en how many circles are there?", "detect square"]
SUFFIXES = ["a red circle", "2", "<loc0100><loc0200><loc0300><loc0400> square"]


def test_single_example(checkpoint):
    compare(checkpoint, PREFIXES[:1], label="single")


def test_padded_batch_without_suffix(checkpoint):
    compare(checkpoint, PREFIXES, label="batch")


def test_padded_batch_with_suffix(checkpoint):
    compare(checkpoint, PREFIXES, SUFFIXES, label="batch+suffix")


def test_prefix_lm_mask_matters(mqa_checkpoint):
    """The suffix is causal and the prefix bidirectional: feeding the same tokens as all-prefix changes logits."""
    model, processor = PaliGemma.from_pretrained(mqa_checkpoint), Processor.from_pretrained(mqa_checkpoint)
    batch = processor(random_images(1), PREFIXES[:1], SUFFIXES[:1])
    with torch.no_grad():
        prefix_lm = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["token_type_ids"])
        all_prefix = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    n_suffix = int(batch["token_type_ids"].sum())
    prefix_end = batch["input_ids"].shape[1] - n_suffix
    # Prefix positions never see the suffix under the prefix-LM mask, but do when everything is prefix.
    assert (prefix_lm[:, :prefix_end] - all_prefix[:, :prefix_end]).abs().max() > 1e-3


def test_real_widths(workdir, tokenizer_model, sp_size):
    """paligemma-3b-pt-224's real shapes (vocab 257216, MQA with head_dim 256, 224 px) with one layer per tower."""
    config = hf_config(
        sp_size,
        text=dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=1, head_dim=256),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1, num_attention_heads=16, image_size=224),
        vocab_size=257216)
    folder = make_checkpoint(workdir / "real-widths", tokenizer_model, config)
    compare(folder, PREFIXES[1:3], SUFFIXES[1:3], label="real widths")
