"""A model's answers to a set of examples, generated in batches: what train.py's evaluation and
evaluate.py score.

    load_model     a checkpoint, or an adapter on its base, ready to answer
    read_vae       --vae's VQ-VAE, which decodes segment answers' masks for scoring
    answer_batch   one batch of images and prompts -> their answers, each with how it ended
    evaluate       train.py's evaluation: the validation loss, and the answers scored by metrics.py

Answers are greedy, generated with the KV-cache (PaliGemma.generate); detect and segment answers
follow their grammar (detections.AnswerConstraint: always well-formed, a repeated object ends the
answer) unless `constrain` is off.

What it is not: the scores (metrics.py) or a tool (train.py and evaluate.py call it).
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import metrics
from cli import UserError
from detections import AnswerConstraint, AnswerTokens, prompt_task
from lora import adapter_base, load_adapter
from nf4 import dequantize_linears
from paligemma import PaliGemma, SuffixLossSum, count_targets
from processor import Processor, load_image
from quantize import describe
from vqvae import VQVAE


def load_model(model: str, adapter: str | None, dtype, device, quantize: str | None = None
               ) -> tuple[PaliGemma, Processor]:
    """A checkpoint (a folder or a hub id) on `device`, with `adapter` (a LoRA adapter folder in
    PEFT's format) applied; a folder holding an adapter as `model` loads its base, which the adapter
    records. quantize: int8 or int4, the decoder's weights for fast decoding (quantize.py); nf4, the
    weights a QLoRA adapter was trained against: read in 4 bits, then dequantized once to `dtype`
    (decoding at its speed, never dequantizing at every token). Says what it loaded on stderr."""
    start = time.perf_counter()
    if adapter is None and (Path(model) / "adapter_config.json").is_file():
        adapter, model = model, adapter_base(model)
    loaded = PaliGemma.from_pretrained(model, dtype=dtype, device=device, quantize=quantize)
    processor = Processor.from_pretrained(model)
    if adapter:
        load_adapter(loaded, adapter)
    formats = describe(loaded)
    if quantize == "nf4":
        formats = f"{dequantize_linears(loaded)} layers read in nf4 and dequantized once to {dtype}"
    print(f"loaded {model}" + (f" with the adapter {adapter}" if adapter else "")
          + f" ({formats}; {device}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return loaded, processor


def read_vae(path: str | None, examples: list[dict]) -> VQVAE | None:
    """--vae's VQ-VAE, or None (and a line on stderr when segment prompts will be scored without
    their masks)."""
    if path is None:
        if any(prompt_task(e["prefix"]) == "segment" for e in examples):
            print("the data has segment prompts: their masks are scored (miou, mask_iou) only "
                  "with --vae", file=sys.stderr)
        return None
    try:
        return VQVAE.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"--vae: {e}") from None


@dataclass
class Answer:
    text: str
    # max_new_tokens ended it: no <eos>, or under the grammar an <eos> the limit forced
    at_limit: bool
    cut: bool  # the grammar ended it before an object that repeated an earlier one


@torch.no_grad()
def answer_batch(model: PaliGemma, processor: Processor, images: list, prefixes: list[str],
                 max_new_tokens: int, device, autocast, constrain: bool = True,
                 repeat_iou: float = 0.9, pixels=None) -> list[Answer]:
    """Greedy answers to one batch of prompts about images (or their `pixels`, already
    preprocessed)."""
    if pixels is None:
        pixels = processor.pixels(images).to(device)
    prompts = {k: v.to(device) for k, v in processor.tokens(prefixes).items()}
    grammar = None
    if constrain:
        grammar = AnswerConstraint.for_prompts(prefixes, AnswerTokens(processor.tokenizer),
                                               model.config.text_config.vocab_size, repeat_iou)
    with autocast:
        new = model.generate(prompts["input_ids"], pixels, prompts["attention_mask"],
                             max_new_tokens=max_new_tokens, constrain=grammar)
    eos = model.config.eos_token_id
    at_limit = [False] * len(prefixes)
    if new.shape[1] == max_new_tokens:
        at_limit = (new != eos).all(1).tolist()
    answers = []
    for r, ids in enumerate(new.tolist()):
        text = grammar.answer(r, ids, processor.decode) if grammar else processor.decode(ids)
        row = grammar.rows[r] if grammar else None  # a detect or segment answer's grammar
        # under the grammar an answer always ends with <eos>: it knows when the limit ended it
        answers.append(Answer(text, at_limit[r] or bool(row and row.at_limit),
                              bool(row and row.cut is not None)))
    return answers


@torch.no_grad()
def evaluate(model: PaliGemma, processor: Processor, examples: list[dict], batch_size: int,
             max_len: int, max_new_tokens: int, device, autocast, vae=None, constrain: bool = True,
             repeat_iou: float = 0.9, stop=lambda: False) -> tuple[dict | None, list[tuple]]:
    """train.py's evaluation: the validation loss, and greedy answers to the prompts alone scored by
    their tasks (metrics.score), as "task/metric" numbers. Returns the metrics (None when `stop()`
    said to stop) and the first 16 examples as (image, prefix, answer, target)."""
    model.eval()
    loss_sum, n_targets, at_limit, cut, rows, shown = 0.0, 0, 0, 0, [], []
    for i in range(0, len(examples), batch_size):
        if stop():
            model.train()
            return None, shown
        chunk = examples[i:i + batch_size]
        images, prefixes = [load_image(e["image"]) for e in chunk], [e["prefix"] for e in chunk]
        pixels = processor.pixels(images).to(device)  # one image preprocessing for both
        batch = processor.tokens(prefixes, [e["suffix"] for e in chunk], max_len)
        with autocast:
            loss_sum += SuffixLossSum(model)(**{k: v.to(device) for k, v in batch.items()},
                                             pixel_values=pixels).item()
        n_targets += int(count_targets(batch["labels"]))
        answers = answer_batch(model, processor, images, prefixes, max_new_tokens, device, autocast,
                               constrain, repeat_iou, pixels)
        at_limit += sum(a.at_limit for a in answers)
        cut += sum(a.cut for a in answers)
        rows += [metrics.Row(e["prefix"], a.text, e["references"], image.size)
                 for e, image, a in zip(chunk, images, answers)]
        shown += [(image, e["prefix"], a.text, e["suffix"])
                  for e, image, a in zip(chunk, images, answers)]
        del shown[16:]
    model.train()
    summary, _ = metrics.score(rows, vae)
    grammar = constrain and ("detect" in summary or "segment" in summary)
    return (dict(val_loss=loss_sum / max(n_targets, 1), answers_at_token_limit=at_limit)
            | ({"repeated_objects_cut": cut} if grammar else {}) | metrics.flat(summary)), shown
