"""Our logits equal transformers' PaliGemma on the same weights and inputs (float32)."""

import torch

from conftest import PREFIXES, SUFFIXES, compare, hf_config, make_checkpoint, random_images
from paligemma import PaliGemma
from processor import Processor


def test_single_example(checkpoint):
    compare(checkpoint, PREFIXES[:1], label="single")


def test_padded_batch_without_suffix(checkpoint):
    compare(checkpoint, PREFIXES, label="batch")


def test_padded_batch_with_suffix(checkpoint):
    compare(checkpoint, PREFIXES, SUFFIXES, label="batch+suffix")


def test_prefix_lm_mask_matters(mqa_checkpoint):
    """The suffix is causal and the prefix bidirectional: feeding the same tokens as all-prefix
    changes logits."""
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    processor = Processor.from_pretrained(mqa_checkpoint)
    batch = processor(random_images(1), PREFIXES[:1], SUFFIXES[:1])
    with torch.no_grad():
        prefix_lm = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                          batch["token_type_ids"])
        all_prefix = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    n_suffix = int(batch["token_type_ids"].sum())
    prefix_end = batch["input_ids"].shape[1] - n_suffix
    # Prefix positions never see the suffix under the prefix-LM mask, but do when everything is
    # prefix.
    assert (prefix_lm[:, :prefix_end] - all_prefix[:, :prefix_end]).abs().max() > 1e-3


def test_real_widths(workdir, tokenizer_model, sp_size):
    """paligemma-3b-pt-224's real shapes (vocab 257216, MQA with head_dim 256, 224 px) with one
    layer per tower."""
    config = hf_config(
        sp_size,
        text=dict(hidden_size=2048, intermediate_size=16384, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=1, head_dim=256),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1,
                    num_attention_heads=16, image_size=224),
        vocab_size=257216)
    folder = make_checkpoint(workdir / "real-widths", tokenizer_model, config)
    compare(folder, PREFIXES[1:3], SUFFIXES[1:3], label="real widths")
