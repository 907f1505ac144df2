"""PaliGemma 2 specifics. The parity, KV-cache and generation tests run on PaliGemma 2 configs too
(`checkpoint` in conftest.py); these cover the rest."""

import json
import shutil

import pytest
import torch

from conftest import (PREFIXES, SUFFIXES, compare, fresh_checkpoint, hf_config, make_checkpoint,
                      random_images, rewrite_official)
from paligemma import PaliGemma
from processor import Processor


@pytest.fixture(scope="module")
def window_checkpoint(workdir, tokenizer_model, sp_size):
    return fresh_checkpoint(workdir, tokenizer_model, sp_size, "pg2-window")


def test_sliding_window_is_exercised(window_checkpoint):
    """The parity test's sequences are longer than the window, so the window really masks
    something."""
    model = PaliGemma.from_pretrained(window_checkpoint)
    processor = Processor.from_pretrained(window_checkpoint)
    batch = processor(random_images(3), PREFIXES, SUFFIXES)
    mask, sliding = model.attention_masks(batch["attention_mask"].bool(),
                                          batch["token_type_ids"].cumsum(-1))
    assert batch["input_ids"].shape[1] > model.config.text_config.sliding_window
    assert (mask & ~sliding).any() and not (sliding & ~mask).any()
    assert [layer.sliding for layer in model.language_model.layers] == [True, False, True, False]


def test_real_widths(workdir, tokenizer_model, sp_size):
    """paligemma2-3b-pt-224's real shapes (hidden 2304, 8 heads, 4 kv heads, MLP 9216, vocab
    257216), 2 layers."""
    config = hf_config(
        sp_size,
        text=dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=256),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=1,
                    num_attention_heads=16, image_size=224),
        vocab_size=257216)
    folder = make_checkpoint(workdir / "real-widths-2", tokenizer_model, config)
    compare(folder, PREFIXES[1:3], SUFFIXES[1:3], label="PaliGemma 2 real widths")


def test_official_layout_loads(window_checkpoint, tmp_path):
    official = rewrite_official(window_checkpoint, tmp_path / "official", shards=2)
    batch = Processor.from_pretrained(official)(random_images(2), PREFIXES[:2])
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                    "token_type_ids")}
    with torch.no_grad():
        assert torch.equal(PaliGemma.from_pretrained(official)(**inputs),
                           PaliGemma.from_pretrained(window_checkpoint)(**inputs))


def test_gemma1_weights_under_a_gemma2_config_are_refused(mqa_checkpoint, tmp_path):
    shutil.copytree(mqa_checkpoint, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma2"
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    expected = r"missing tensors: .*language_model\.layers\.0\.post_feedforward_layernorm\.weight"
    with pytest.raises(ValueError, match=expected):
        PaliGemma.from_pretrained(tmp_path / "c")


def test_no_final_softcap(run_train, window_checkpoint, tmp_path):
    model = PaliGemma.from_pretrained(window_checkpoint)
    assert model.config.text_config.final_logit_softcapping == 30.0
    out = run_train(tmp_path / "o", "--steps", "1", "--no-final-softcap", model=window_checkpoint)
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["final_logit_softcapping"] is None
    assert PaliGemma.from_pretrained(out).config.text_config.final_logit_softcapping is None
    compare(out, PREFIXES, SUFFIXES, label="no final softcap")  # transformers reads the same config
