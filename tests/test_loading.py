"""Strict loading of Hugging Face-format checkpoints, in every layout found in the wild."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PREFIXES, random_images, rewrite_official
from paligemma import PaliGemma, read_config
from processor import Processor


@pytest.fixture(scope="module")
def layouts(mqa_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "fresh": mqa_checkpoint,
        "official": rewrite_official(mqa_checkpoint, root / "official"),
        "sharded": rewrite_official(mqa_checkpoint, root / "sharded", shards=2),
    }


def logits(folder, **kw):
    model = PaliGemma.from_pretrained(folder, **kw)
    batch = Processor.from_pretrained(folder)(random_images(2), PREFIXES[:2])
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                     batch["token_type_ids"])


def test_all_layouts_give_the_same_model(layouts):
    assert (layouts["official"] / "model.safetensors").exists()
    assert len(list(layouts["sharded"].glob("model-*.safetensors"))) == 2
    reference = logits(layouts["fresh"])
    for name in ("official", "sharded"):
        assert torch.equal(logits(layouts[name]), reference), name


def test_dtype_and_device(layouts):
    model = PaliGemma.from_pretrained(layouts["sharded"], dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())


def edited(src, dst, edit):
    """A copy of a single-file checkpoint with its tensors changed by `edit(state)`."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named(layouts, tmp_path):
    key = "language_model.model.layers.1.self_attn.k_proj.weight"
    folder = edited(layouts["official"], tmp_path / "c", lambda s: s.pop(key))
    with pytest.raises(
        ValueError, match=r"missing tensors: language_model\.layers\.1\.self_attn\.k_proj\.weight"):
        PaliGemma.from_pretrained(folder)


def test_unexpected_tensor_is_named(layouts, tmp_path):
    extra = {"language_model.model.extra.weight": torch.zeros(3)}
    folder = edited(layouts["official"], tmp_path / "c", lambda s: s.update(extra))
    with pytest.raises(ValueError,
                       match=r"unexpected tensors: language_model\.model\.extra\.weight"):
        PaliGemma.from_pretrained(folder)


def test_wrong_shape_is_named(layouts, tmp_path):
    key = "multi_modal_projector.linear.bias"
    folder = edited(layouts["official"], tmp_path / "c", lambda s: s.update({key: torch.zeros(7)}))
    expected = r"wrong shapes: multi_modal_projector\.linear\.bias \[7\] \(expected \[64\]\)"
    with pytest.raises(ValueError, match=expected):
        PaliGemma.from_pretrained(folder)


def test_unused_heads_are_dropped_by_name(layouts, tmp_path):
    """A SigLIP pooling head and a stored (tied) lm_head are left out on purpose."""
    def add(state):
        state["vision_tower.vision_model.head.probe"] = torch.zeros(1, 1, 32)
        state["lm_head.weight"] = state["language_model.model.embed_tokens.weight"].clone()
    folder = edited(layouts["official"], tmp_path / "c", add)
    assert torch.equal(logits(folder), logits(layouts["official"]))


def test_config_mismatch_is_named(layouts, tmp_path):
    shutil.copytree(layouts["official"], tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing tensors: language_model\.layers\.2\."):
        PaliGemma.from_pretrained(tmp_path / "c")


def test_folder_without_weights(tmp_path, layouts):
    shutil.copy(layouts["fresh"] / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        PaliGemma.from_pretrained(tmp_path)


def test_nonexistent_path():
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        PaliGemma.from_pretrained("./no/such/checkpoint")


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub

    # What a machine without hub access sees (and no download where there is access).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        OSError, match="could not be fetched from the Hugging Face hub.*huggingface-cli login"):
        PaliGemma.from_pretrained("google/paligemma-3b-pt-224")
    with pytest.raises(OSError, match="could not be fetched"):
        Processor.from_pretrained("google/paligemma-3b-pt-224")


def test_wrong_resolution_names_the_expected_one(mqa_checkpoint):
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    batch = Processor.from_pretrained(mqa_checkpoint)(random_images(1), ["caption en"])
    with pytest.raises(ValueError,
                       match=r"this model takes images of 28x28 pixels, as \(B, 3, 28, 28\)"):
        model(batch["input_ids"], torch.zeros(1, 3, 56, 56))


def test_config_layer_types_must_fit(mqa_checkpoint, tmp_path):
    folder = shutil.copytree(mqa_checkpoint, tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"] |= {"model_type": "gemma2", "layer_types": ["full_attention"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_types has 1 entries for 2 layers"):
        read_config(folder / "config.json")
