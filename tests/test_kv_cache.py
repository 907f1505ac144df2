"""Prefill into the pre-allocated KV-cache, then one token per step, equals one full forward pass."""

import torch
import torch.nn.functional as F

from gemma import KVCache
from paligemma import PaliGemma, Processor
from test_parity import PREFIXES, SUFFIXES, random_images


def test_cached_decoding_equals_full_forward(checkpoint):
    model, processor = PaliGemma.from_pretrained(checkpoint), Processor.from_pretrained(checkpoint)
    batch = processor(random_images(3), PREFIXES, SUFFIXES)  # left-padded, with a causal suffix
    ids, am, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    B, T = ids.shape
    P = T - int(tt.sum(-1).min())  # prefill up to where the shortest suffix starts; the rest step by step
    lm = model.language_model
    with torch.no_grad():
        full = model(ids, batch["pixel_values"], am, tt)
        x, positions = model.embed(ids, batch["pixel_values"]), am.cumsum(-1)
        masks = model.masks(am, tt)  # the prefix-LM mask, and its sliding-window variant for PaliGemma 2

        S = T + 5  # cache slots past T stay empty and masked

        def rows(start, end):  # the masks' rows for queries [start, end), over all S cache slots
            return [None if m is None else F.pad(m[:, :, start:end], (0, S - T)) for m in masks]

        cache = KVCache(lm.config, B, max_len=S, dtype=x.dtype, device=x.device)
        mask, sliding = rows(0, P)
        steps = [lm.logits(lm(x[:, :P], positions[:, :P], mask, cache, torch.arange(P), sliding))]
        for t in range(P, T):
            mask, sliding = rows(t, t + 1)
            steps.append(lm.logits(lm(x[:, t:t + 1], positions[:, t:t + 1], mask, cache, torch.tensor([t]), sliding)))
    stepped = torch.cat(steps, dim=1)
    keep = am.bool()
    diff = (stepped[keep] - full[keep]).abs().max().item()
    print(f"{checkpoint.name}: cached vs full max |logit difference| {diff:.1e}")
    assert T - P >= 2 and diff < 1e-5
