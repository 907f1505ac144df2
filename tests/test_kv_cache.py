"""Prefill into the pre-allocated KV-cache, then one token per step, equals one full forward
pass."""

import pytest
import torch
import torch.nn.functional as F

from conftest import PREFIXES, SUFFIXES, random_images
from gemma import KVCache
from paligemma import PaliGemma, prefix_lm_mask
from processor import Processor


def test_cached_decoding_equals_full_forward(checkpoint):
    model, processor = PaliGemma.from_pretrained(checkpoint), Processor.from_pretrained(checkpoint)
    batch = processor(random_images(3), PREFIXES, SUFFIXES)  # left-padded, with a causal suffix
    ids, am, tt = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    B, T = ids.shape
    # prefill up to where the shortest suffix starts; the rest step by step
    P = T - int(tt.sum(-1).min())
    lm, window = model.language_model, model.config.text_config.sliding_window
    with torch.no_grad():
        full = model(ids, batch["pixel_values"], am, tt)
        x, positions = model.embed(ids, batch["pixel_values"]), am.cumsum(-1)

        S = T + 5  # cache slots past T are never written: not valid
        valid, steps = F.pad(am.bool(), (0, S - T)), F.pad(tt.cumsum(-1), (0, S - T), value=T)

        # the prefix-LM mask over the first `keys` slots, and its sliding-window variant
        def masks(queries, keys):
            args = valid[:, :keys], steps[:, :keys], queries
            return prefix_lm_mask(*args), None if window is None else prefix_lm_mask(*args, window)

        cache = KVCache(lm.config, B, max_len=S, dtype=x.dtype, device=x.device)
        # the prefill's P tokens attend to each other; each later token reads the cache's S slots
        steps_out = [lm.logits(lm(x[:, :P], positions[:, :P], *masks(torch.arange(P), P), cache,
                                  torch.arange(P)))]
        for t in range(P, T):
            slot = torch.tensor([t])
            steps_out.append(lm.logits(lm(x[:, t:t + 1], positions[:, t:t + 1], *masks(slot, S),
                                          cache, slot, read_cache=True)))
    stepped = torch.cat(steps_out, dim=1)
    keep = am.bool()
    diff = (stepped[keep] - full[keep]).abs().max().item()
    print(f"{checkpoint.name}: cached vs full max |logit difference| {diff:.1e}")
    assert T - P >= 2 and diff < 1e-5


def test_mask_shape_and_cache_reads_are_checked(mqa_checkpoint):
    """A mask of the wrong shape, or reading the cache without a mask, is a clear error, not a
    silent one."""
    lm = PaliGemma.from_pretrained(mqa_checkpoint).language_model
    x, positions = torch.zeros(2, 3, lm.config.hidden_size), torch.arange(1, 4).expand(2, 3)
    cache = KVCache(lm.config, 2, max_len=8, dtype=x.dtype, device=x.device)
    with pytest.raises(ValueError, match=r"expected bool \(B, 1, T, S\) = \(2, 1, 3, 3\)"):
        lm(x, positions, torch.ones(2, 1, 3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(2, 1, 3, 8\): 3 tokens attending to 8 cache slots"):
        lm(x, positions, torch.ones(2, 1, 3, 3, dtype=torch.bool), cache=cache,
           slots=torch.arange(3), read_cache=True)
    with pytest.raises(ValueError, match="read_cache needs a cache, and a mask"):
        lm(x, positions, None, cache=cache, slots=torch.arange(3), read_cache=True)
    with pytest.raises(ValueError, match="expected bool"):
        lm(x, positions, torch.ones(2, 1, 3, 3))  # float, not bool


def test_prefix_lm_mask_worked_examples():
    """The examples of prefix_lm_mask's docstring."""
    mask = prefix_lm_mask(torch.ones(1, 6, dtype=torch.bool), torch.tensor([[0, 0, 0, 1, 2, 3]]),
                          torch.arange(6))
    assert mask.shape == (1, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0]] * 3 + [[1, 1, 1, 1, 0, 0],
                                                                    [1, 1, 1, 1, 1, 0], [1] * 6]
    padded = prefix_lm_mask(torch.tensor([[0, 1, 1, 1, 1]]).bool(), torch.tensor([[0, 0, 0, 1, 2]]),
                            torch.arange(5))
    assert padded[0, 0].int().tolist() == [[0, 1, 1, 0, 0]] * 3 + [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]
    window = prefix_lm_mask(torch.ones(1, 6, dtype=torch.bool), torch.tensor([[0, 0, 0, 1, 2, 3]]),
                            torch.arange(6), 2)
    assert window[0, 0].int().tolist() == [[1, 1, 1, 0, 0, 0]] * 3 + [[0, 0, 1, 1, 0, 0],
                                                                       [0, 0, 0, 1, 1, 0],
                                                                       [0, 0, 0, 0, 1, 1]]
