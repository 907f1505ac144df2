"""Fixtures: small PaliGemma checkpoints written the way users' checkpoints look, built offline.

A checkpoint here is a randomly initialised transformers `PaliGemmaForConditionalGeneration` saved
with `save_pretrained` (transformers 5 writes the vision tower as `vision_tower.embeddings.*`), or
the same weights rewritten in the official hub layout (`vision_tower.vision_model.*`), single-file
or in two shards with an index; each with a SentencePiece model trained here with Gemma's special
pieces.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers  # noqa: E402  (a test dependency: the suite fails, never skips, without it)

from tiny.pretrain import train_tokenizer  # noqa: E402

SENTENCES = [
    "caption en", "answer en what colour is the square?", "answer en how many circles are there?",
    "detect circle ; square", "a red circle and a blue square on a grey background", "two green "
                                                                                     "triangles",
    "the quick brown fox jumps over the lazy dog 0123456789", "Where is the cow standing? On the "
                                                              "beach.",
]

# Small configs for parity: multi-query and grouped-query attention, head_dim != hidden/heads,
# image token counts of 4 and 9 (28 and 42 px with 14 px patches).
CONFIGS = {
    "mqa": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16),
                vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, image_size=28)),
    "gqa": dict(text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=24),
                vision=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                            num_attention_heads=6, image_size=42)),
}


# PaliGemma 2 (Gemma 2 decoder): grouped-query with a query scale other than head_dim (as in the
# 28B), multi-query, and a sliding window shorter than the sequences the tests use.
CONFIGS2 = {
    "pg2-gqa": dict(text=dict(model_type="gemma2", hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, query_pre_attn_scalar=16),
                    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, image_size=28)),
    "pg2-mqa": dict(text=dict(model_type="gemma2", hidden_size=48, intermediate_size=96,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                              head_dim=16),
                    vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, image_size=42)),
    "pg2-window": dict(text=dict(model_type="gemma2", hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 head_dim=16, sliding_window=6),
                       vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, image_size=42)),
}


def hf_config(sp_size: int, text: dict, vision: dict, vocab_size: int | None = None):
    # room for <image>, padded as the real one is
    vocab_size = vocab_size or (sp_size + 1 + 63) // 64 * 64
    return transformers.PaliGemmaConfig(
        vision_config=dict(patch_size=14, vision_use_head=False, **vision),
        text_config=dict(vocab_size=vocab_size, **text), image_token_index=sp_size,
        projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=vocab_size)


def make_checkpoint(folder: Path, tokenizer: Path, config, seed: int = 0):
    """Saves a random transformers PaliGemma with `save_pretrained` and copies in the tokenizer."""
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    with torch.no_grad():  # the norms start at zero (= scale 1); make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    return folder


def rewrite_official(src: Path, dst: Path, shards: int = 1) -> Path:
    """The same weights in the layout of the hub checkpoints: `vision_tower.vision_model.*`,
    optionally sharded."""
    dst.mkdir(parents=True)
    state = load_file(src / "model.safetensors")
    state = {k.replace("vision_tower.", "vision_tower.vision_model.",
                       1): v for k, v in state.items()}
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(src / name, dst / name)
    if shards == 1:
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
        return dst
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k] for k in part}, dst / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                  "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("paligemma")


@pytest.fixture(scope="session")
def tokenizer_model(workdir) -> Path:
    """A SentencePiece model trained here with Gemma's settings and special pieces
    (tiny/pretrain.py)."""
    return train_tokenizer(SENTENCES * 20, workdir / "sp")


@pytest.fixture(scope="session")
def sp_size(tokenizer_model) -> int:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model)).get_piece_size()


def fresh_checkpoint(workdir: Path, tokenizer_model: Path, sp_size: int, name: str) -> Path:
    folder = workdir / f"fresh-{name}"
    if not folder.exists():
        cfg = (CONFIGS | CONFIGS2)[name]
        make_checkpoint(folder, tokenizer_model, hf_config(sp_size, cfg["text"], cfg["vision"]))
    return folder


@pytest.fixture(scope="session", params=sorted(CONFIGS) + sorted(CONFIGS2))
def checkpoint(request, workdir, tokenizer_model, sp_size) -> Path:
    """A fresh transformers 5 save, one per config, PaliGemma 1 and 2."""
    return fresh_checkpoint(workdir, tokenizer_model, sp_size, request.param)


@pytest.fixture(scope="session")
def mqa_checkpoint(workdir, tokenizer_model, sp_size) -> Path:
    return fresh_checkpoint(workdir, tokenizer_model, sp_size, "mqa")


def hf_model(folder: Path):
    """transformers' PaliGemma in float32; eager attention, the only one that applies Gemma 2's
    soft-capping."""
    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()


def hf_processor(folder: Path):
    """transformers' PaliGemmaProcessor on the same SentencePiece model, with the PIL image
    processor."""
    config = json.loads((folder / "config.json").read_text())
    vision = config["vision_config"]
    image_processor = transformers.SiglipImageProcessorPil(
        size={"height": vision["image_size"], "width": vision["image_size"]})
    image_processor.image_seq_length = (vision["image_size"] // vision["patch_size"]) ** 2
    tokenizer = transformers.GemmaTokenizer.from_pretrained(folder)
    return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------
# Parity helpers: the same inputs through ours and transformers

# float32 bound on |logit difference|; measured differences are ~3e-7 (tiny) to ~6e-6 (real widths)
TOL = 1e-5
PREFIXES = ["caption en", "answer en how many circles are there?", "detect square"]
SUFFIXES = ["a red circle", "2", "<loc0100><loc0200><loc0300><loc0400> square"]


def random_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(37, 53), (64, 20), (100, 100), (13, 77)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 4], 3),
                                         dtype=np.uint8)) for i in range(n)]


def max_diff_on_tokens(ours: torch.Tensor, theirs: torch.Tensor,
                       attention_mask: torch.Tensor) -> float:
    """Max |difference| over the real (non-padding) positions; padding positions are never read."""
    keep = attention_mask.bool()
    return (ours[keep] - theirs[keep]).abs().max().item()


def compare(folder, prefixes, suffixes=None, label=""):
    """Our logits and transformers' on the same checkpoint and inputs: at most TOL apart."""
    from paligemma import PaliGemma
    from processor import Processor

    ours, theirs = PaliGemma.from_pretrained(folder), hf_model(folder)
    batch = Processor.from_pretrained(folder)(random_images(len(prefixes)), prefixes, suffixes)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                    "token_type_ids")}
    with torch.no_grad():
        a = ours(**inputs)
        b = theirs(**inputs, labels=batch.get("labels")).logits
    assert a.shape == b.shape
    diff = max_diff_on_tokens(a, b, batch["attention_mask"])
    print(f"{label} {folder.name}: max |logit difference| {diff:.2e}")
    assert diff <= TOL
    return diff


# ----------------------------------------------------------------------------------------------
# Training data

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (230, 220, 40)}


def make_dataset(folder: Path, n: int, name: str = "train.jsonl", seed: int = 0) -> Path:
    """n examples of solid-colour images with a little noise: 'answer en what colour is it?' ->
    colour; every third one a detect prompt with a box."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 10, (32, 32, 3)), 0,
                         255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}-{i}.png")
        if i % 3 == 2:
            prefix, suffix = "detect square", "<loc0100><loc0200><loc0700><loc0900> square"
        else:
            prefix, suffix = "answer en what colour is it?", colour
        lines.append(json.dumps({"image": f"{name}-{i}.png", "prefix": prefix, "suffix": suffix}))
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    make_dataset(folder, 8, "valid.jsonl", seed=1)
    return make_dataset(folder, 16, "train.jsonl")


@pytest.fixture(autouse=True)
def restore_signals():
    """train.main installs SIGINT / SIGTERM handlers in the process that runs it: undone after each
    test."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture
def run_train(mqa_checkpoint, data):
    """train.main in this process, on the mqa checkpoint and the small dataset."""
    import train

    def run(out, *extra, model=mqa_checkpoint, data=data):
        train.main(["--data", str(data), "--model", str(model), "--out", str(out), "--batch-size",
                    "4", "--log-every", "1", "--seed", "0", *map(str, extra)])
        return out

    return run


def stopped_then_resumed(run_train, monkeypatch, out: Path, *args, step: int, **kwargs) -> Path:
    """run_train stopped as if Ctrl-C came during step `step` (its log line sends SIGINT), then
    resumed."""
    import train
    monkeypatch.setattr(train, "log", lambda *a, **k: os.kill(os.getpid(), signal.SIGINT)
                        if str(a[0]).startswith(f"step {step}/") else None)
    with pytest.raises(SystemExit):
        run_train(out, *args, **kwargs)
    monkeypatch.undo()
    return run_train(out, *args, "--resume", **kwargs)


@pytest.fixture(scope="session")
def trained(mqa_checkpoint, data, tmp_path_factory) -> Path:
    """A checkpoint written by train.py at step 2 (saved at steps 1 and 2), to resume from."""
    import train

    out = tmp_path_factory.mktemp("trained") / "o"
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    train.main(["--data", str(data), "--model", str(mqa_checkpoint), "--out", str(out), "--steps",
                "2", "--batch-size", "4", "--save-every", "1", "--eval-every", "0", "--lr", "1e-3"])
    for sig, handler in handlers.items():  # a session fixture runs outside restore_signals
        signal.signal(sig, handler)
    return out
