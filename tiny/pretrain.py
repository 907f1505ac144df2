"""Pretrains the tiny PaliGemma in tiny/paligemma-tiny from nothing, on CPU.

    python -m tiny.pretrain       # about an hour on 2 CPU cores (train.py, --trainable all)

1. A shapes dataset (tiny/shapes.py): detection in 4 examples of 5, captions in the rest. Not
   counting, which the quick start teaches, nor stars, which the detection quick start teaches.
2. A SentencePiece tokenizer trained on its text, with PaliGemma's layout: <pad> 0, <eos> 1,
   <bos> 2, <unk> 3, <mask> 4, then <loc0000>..<loc1023> and <seg000>..<seg127>, byte fallback;
   <image> is the id after the vocabulary.
3. A randomly initialised PaliGemma of about 2M parameters: the real architecture (SigLIP,
   projector, Gemma) at small widths, 112 px images (64 image tokens), with two priors in the
   initialisation: the patches' position embeddings and the <loc> tokens' embeddings start as
   sine-cosine codes of where they are (see random_checkpoint).
4. train.py --trainable all on the dataset, then config.json, model.safetensors and tokenizer.model
   copied to --out: the official checkpoint layout, which our loader and transformers read.
"""

import argparse
import functools
import json
import math
import shutil
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import save_file
from torch import nn

import train
from files import write_atomically
from cli import number
from paligemma import PaliGemma, official_state_dict, read_config
from tiny import shapes

# Detection, the headline task, in 4 examples of 5 (a mixture with colour and shape questions
# learned it about 10 times more slowly); captions teach the words and numbers. Not "count": the
# quick start teaches it.
PRETRAIN_TASKS = ["detect", "detect", "detect", "detect", "caption"]
TEXT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, head_dim=32)
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              patch_size=14, image_size=shapes.SIZE)


def train_tokenizer(texts: list[str], prefix: Path) -> Path:
    """A SentencePiece model with Gemma's settings and PaliGemma's special pieces (so that
    transformers' GemmaTokenizer agrees with it token for token); returns the .model file."""
    special = (["<mask>"] + [f"<loc{i:04d}>" for i in range(1024)]
               + [f"<seg{i:03d}>" for i in range(128)])
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=1500,
        hard_vocab_limit=False, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True,
        byte_fallback=True, normalization_rule_name="identity", user_defined_symbols=special,
        minloglevel=2)
    return prefix.with_suffix(".model")


def hf_config(vocab_size: int, image_token_index: int) -> dict:
    """A transformers-style config.json for the tiny model."""
    n_image = (VISION["image_size"] // VISION["patch_size"]) ** 2
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
        "hidden_size": TEXT["hidden_size"], "projection_dim": TEXT["hidden_size"],
        "vocab_size": vocab_size, "image_token_index": image_token_index, "pad_token_id": 0,
        "eos_token_id": 1, "bos_token_id": 2,
        "text_config": dict(model_type="gemma", vocab_size=vocab_size, num_image_tokens=n_image,
                            rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                            max_position_embeddings=8192, **TEXT),
        "vision_config": dict(model_type="siglip_vision_model", projection_dim=TEXT["hidden_size"],
                              vision_use_head=False, num_image_tokens=n_image, layer_norm_eps=1e-6,
                              hidden_act="gelu_pytorch_tanh", **VISION),
    }


def random_checkpoint(folder: Path, tokenizer: Path, seed: int) -> Path:
    """A freshly initialised tiny PaliGemma: weights ~ N(0, 0.02), biases 0, norms at their
    identity."""
    sp_size = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(vocab_size=(sp_size + 1 + 63) // 64 * 64, image_token_index=sp_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(tokenizer, folder / "tokenizer.model")
    torch.manual_seed(seed)
    model = PaliGemma(read_config(folder / "config.json"))
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    # The patches' position embeddings start as a 2-D sine-cosine code of their row and column (as
    # MAE's fixed ones), at std 0.02: where a patch lies is known before training starts.
    vision = model.config.vision_config
    side, quarter = vision.image_size // vision.patch_size, vision.hidden_size // 4
    # row-major, as the patches
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    omega = torch.linspace(math.pi / side, math.pi, quarter)
    angles = [g.flatten()[:, None].float() * omega for g in (rows, cols)]
    # (patches, hidden)
    code = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    with torch.no_grad():
        model.vision_tower.embeddings.position_embedding.weight.copy_(code * 0.02 / code.std())
    # Box coordinates <loc0000>..<loc1023> start from a smooth code of their value (sines and
    # cosines of k/1024 at 8 frequencies, projected at random to the embedding width, std 0.02 as
    # the rest): near coordinates start near each other, and since the output head is the embedding,
    # a nearly right coordinate starts nearly as likely as the right one.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    k = torch.arange(1024)[:, None] / 1024
    angles = k * 2 ** torch.arange(8) * math.pi
    code = torch.cat([angles.sin(), angles.cos()], dim=1)  # (1024, 16), each row of norm sqrt(8)
    width = model.language_model.config.hidden_size
    with torch.no_grad():
        loc_ids = [sp.piece_to_id(f"<loc{i:04d}>") for i in range(1024)]
        model.language_model.embed_tokens.weight[loc_ids] = (
            code @ torch.randn(16, width) * (0.02 / math.sqrt(8)))
    save_file({k: v.contiguous() for k, v in official_state_dict(model).items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "paligemma-tiny")
    p.add_argument("--work", type=Path, default=Path("data/tiny-pretrain"), help="dataset and "
                   "training folder")
    p.add_argument("--examples", type=number(int, 1), default=50000)
    p.add_argument("--steps", type=number(int, 4), default=9000,
                   help="evaluated after each quarter")
    p.add_argument("--lr", type=number(float, 0, above=True), default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    data, detect = args.work / "shapes", args.work / "detect"
    shapes.main(["--out", str(data), "--tasks", ",".join(PRETRAIN_TASKS), "--train",
                 str(args.examples), "--valid", "200", "--seed", str(args.seed), "--overwrite"])
    # held out: mAP
    shapes.main(["--out", str(detect), "--tasks", "detect", "--train", "0", "--valid", "200",
                 "--seed", str(args.seed + 1), "--overwrite"])
    lines = (data / "_annotations.train.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    texts = [r["prefix"] + "\n" for r in records] + [r["suffix"] for r in records]
    tokenizer = train_tokenizer(texts, args.work / "tokenizer")
    init = random_checkpoint(args.work / "init", tokenizer, args.seed)
    run = args.work / "run"
    train.main(["--data", str(data / "_annotations.train.jsonl"), "--val",
                str(detect / "_annotations.valid.jsonl"), "--eval-examples", "200", "--model",
                str(init), "--out", str(run), "--overwrite", "--trainable", "all", "--steps",
                str(args.steps), "--batch-size", "32", "--lr", str(args.lr), "--warmup", "0.05",
                "--weight-decay", "0.01", "--max-len", "64", "--device", "cpu", "--dtype",
                "float32", "--eval-every", str(args.steps // 4), "--eval-max-new-tokens", "48",
                "--save-every", "500", "--log-every", "100", "--seed", str(args.seed)])
    args.out.mkdir(parents=True, exist_ok=True)
    # each file whole, never truncated
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        write_atomically(args.out / name, functools.partial(shutil.copyfile, run / name))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
