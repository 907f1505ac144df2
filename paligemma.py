r"""PaliGemma: a SigLIP vision tower, a linear projector and a Gemma decoder.

PaliGemma (Beyer et al., "PaliGemma: A versatile 3B VLM for transfer", 2024) reads an image and a
text prompt (the *prefix*) and writes text (the *suffix*):

    image (B, 3, 224, 224) --SigLIP (siglip.py)--> (B, 256, 1152) --multi_modal_projector-->
          (B, 256, 2048): written into the token embeddings at the <image> positions of

    tokens:  <image> x 256   <bos> prefix "\n"   suffix <eos>
             \_______________ prefix: full attention ____/ \_ causal _/
                                        |
                                        v
                              Gemma decoder (gemma.py) --> logits (B, T, 257216)

This file holds what is PaliGemma-specific, the model first: the prefix-LM attention mask (with
worked examples); sampling; the model itself (image features merged into the token embeddings, where
image features are *not* scaled by sqrt(hidden) and text embeddings are; 1-based positions;
generation, which encodes the image once, prefills the prompt into a KV-cache and then decodes one
token per step); what fine-tuning trains and its loss, taken on the suffix tokens alone; then, at
the end, loading: config.json parsed and checked (a wrong field is an error that names it), where a
checkpoint's tensors are and what they are called, and strict reading of the Hugging Face
safetensors from a folder or a hub id.

What it is not: the tokenizer, the image preprocessing (processor.py) or the parsing of answers
(detections.py), a training loop (train.py) or a command-line tool (infer.py). It imports torch and
safetensors only (huggingface_hub when given a hub id, quantize.py when asked to quantize), so
that it can be copied with siglip.py and gemma.py.

Shape letters, as in gemma.py: B batch, T tokens, N image tokens (SigLIP's patches), D the decoder's
hidden size, S keys (T, or the KV-cache's slots), V vocabulary.
"""

import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from gemma import Gemma, GemmaConfig, KVCache
from siglip import SiglipConfig, SiglipVisionModel

# ----------------------------------------------------------------------------------------------
# Configuration: the fields of config.json that the model reads (read_config, at the end, parses it)


@dataclass
class PaliGemmaConfig:
    vision_config: SiglipConfig = field(default_factory=SiglipConfig)
    text_config: GemmaConfig = field(default_factory=GemmaConfig)
    image_token_index: int = 257152  # <image>, the first id after the 257152 SentencePiece pieces
    pad_token_id: int = 0  # what generate writes after <eos>
    eos_token_id: int = 1  # where generate stops a row


# ----------------------------------------------------------------------------------------------
# The prefix-LM attention mask


def prefix_lm_mask(valid: torch.Tensor, steps: torch.Tensor, query_slots: torch.Tensor,
                   window: int | None = None) -> torch.Tensor:
    """Which keys each query may attend to: PaliGemma's prefix-LM mask, as big_vision builds it.

    valid (B, S): True where a key is a real token (False: padding, or a cache slot not written
        yet).
    steps (B or 1, S): big_vision's causal step of each token, the running sum of its token types
        (0: image, <bos>, prompt and "\\n"; 1: suffix): the whole prefix is step 0 and every suffix
        token starts a step of its own.
    query_slots (Tq,): the positions among the S of the tokens that ask.
    window: Gemma 2's sliding window (layers marked "sliding_attention"), or None.
    Returns (B, 1, Tq, S) bool: query i sees key j when j is valid and step[j] <= step[i]; with a
    window, also only when i - j < window, unless both are in the prefix (transformers >= 5.14).

    Token types [0 0 0 1 1 1], steps [0 0 0 1 2 3]:   With left padding, valid [0 1 1 1 1],
                                                      token types [0 0 0 1 1]:
              key 0 1 2 3 4 5                                  key 0 1 2 3 4
        query 0     1 1 1 . . .  the prefix sees     query 0     . 1 1 . .  a pad's row is
              1     1 1 1 . . .  the whole prefix,         1     . 1 1 . .  never read; no
              2     1 1 1 . . .  both ways                 2     . 1 1 . .  row sees a pad
              3     1 1 1 1 . .  a suffix token            3     . 1 1 1 .
              4     1 1 1 1 1 .  sees the prefix           4     . 1 1 1 1
              5     1 1 1 1 1 1  and the suffix
                                 up to itself

    With window 2 on the left example, rows 3, 4, 5 keep only keys 2..3, 3..4 and 4..5 (i - j < 2);
    rows 0-2 are unchanged. Generation uses the same rule over the KV-cache's slots: the prompt is
    step 0 and the k-th new token step k, so a new token sees the prompt and every token before it.
    """
    step_q = steps[:, query_slots]  # (B, Tq)
    visible = (steps[:, None, :] <= step_q[:, :, None]) & valid[:, None, :]  # (B, Tq, S)
    if window is not None:
        keys = torch.arange(steps.shape[1], device=steps.device)
        near = query_slots[:, None] - keys[None, :] < window  # (Tq, S)
        both_prefix = (step_q == 0)[:, :, None] & (steps == 0)[:, None, :]
        visible = visible & (near | both_prefix)
    return visible[:, None]


# ----------------------------------------------------------------------------------------------
# Sampling


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator=None) -> torch.Tensor:
    """(B, V) -> (B,). Greedy at temperature 0; else temperature first, then top-k, then top-p
    (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def check_generation(max_new_tokens: int, temperature: float, top_k: int, top_p: float):
    """The generation options' valid ranges, as one error naming the option."""
    if type(max_new_tokens) is not int or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, not {max_new_tokens!r}")
    if not 0 <= temperature < float("inf"):  # also refuses nan
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), not {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k), not {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1: no top-p), not {top_p}")


# ----------------------------------------------------------------------------------------------
# The model


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.hidden_size,
                                               config.text_config.hidden_size)
        self.language_model = Gemma(config.text_config)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D) with the projected image features in the <image> positions."""
        is_image = input_ids == self.config.image_token_index  # (B, T)
        # <image> may lie outside the vocabulary
        x = self.language_model.embed(input_ids.masked_fill(is_image, 0))
        # in the compute dtype, never in 4 bits
        conv = self.vision_tower.embeddings.patch_embedding.weight
        # (B, N, D)
        features = self.multi_modal_projector(self.vision_tower(pixel_values.to(conv.dtype)))
        if is_image.sum() != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} <image> tokens, but {features.shape[0]} "
                f"image(s) give {features.shape[0]} x {features.shape[1]} features: each prompt "
                f"needs one image and {features.shape[1]} <image> tokens (use the Processor to "
                "build input_ids)"
            )
        # patches in row-major order
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))

    def attention_masks(self, valid: torch.Tensor,
                        steps: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The prefix-LM mask (B, 1, T, T) of T tokens attending to each other and, for Gemma 2, its
        sliding-window variant; None and None when every token sees every token (no padding, no
        suffix, the window not reached), which lets attention run unmasked."""
        window, T = self.config.text_config.sliding_window, valid.shape[1]
        if valid.all() and not steps.any() and (window is None or T <= window):
            return None, None
        queries = torch.arange(T, device=valid.device)
        return (prefix_lm_mask(valid, steps, queries),
                None if window is None else prefix_lm_mask(valid, steps, queries, window))

    def hidden_states(self, input_ids, pixel_values, attention_mask=None,
                      token_type_ids=None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, D), before the output head."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:  # no suffix: the whole input is the prefix
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids, pixel_values)
        # 1-based as in transformers, and left padding is skipped
        positions = attention_mask.long().cumsum(-1)
        mask, sliding_mask = self.attention_masks(attention_mask.bool(), token_type_ids.cumsum(-1))
        return self.language_model(x, positions, mask, sliding_mask)

    def forward(self, input_ids, pixel_values, attention_mask=None,
                token_type_ids=None) -> torch.Tensor:
        """input_ids (B, T), pixel_values (B, 3, H, W), attention_mask and token_type_ids (B, T) ->
        logits (B, T, V)."""
        h = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)
        return self.language_model.logits(h)

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values, attention_mask=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, constrain: Callable | None = None) -> torch.Tensor:
        """Continues each (left-padded) prompt; returns the new token ids (B, n <= max_new_tokens).

        The image is encoded once and the whole prompt (all prefix: bidirectional) is prefilled into
        the KV-cache in one pass; then one token per step attends to everything before it. A row
        that has written <eos> gets <pad> from then on, and the loop ends when every row has. Greedy
        when temperature is 0; otherwise sampled after temperature, top-k and top-p, reproducibly
        given a seed. `constrain(previous tokens (B,) or None at the first step, tokens left)`
        returns the tokens each row may take next, (B, V) bool (e.g. detections.AnswerConstraint);
        the others get -inf before sampling.
        """
        B, T = input_ids.shape
        max_len = self.config.text_config.max_position_embeddings
        check_generation(max_new_tokens, temperature, top_k, top_p)
        if attention_mask is None and (input_ids[:, 0] == self.config.pad_token_id).any():
            raise ValueError("input_ids start with <pad> (a left-padded batch) but no "
                             "attention_mask says so: pass the Processor's attention_mask, or the "
                             "pads are read as text")
        if T + max_new_tokens > max_len:
            raise ValueError(f"the prompt is {T} tokens long and {max_new_tokens} new tokens are "
                             f"asked for: together more than the model's {max_len} positions")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm, device = self.language_model, input_ids.device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)

        # Prefill: the prompt's T tokens, all prefix, attend to each other and fill slots 0..T-1.
        x = self.embed(input_ids, pixel_values)  # (B, T, D)
        # cache slots: the prompt, then every new token but the last (never fed)
        S = T + max_new_tokens - 1
        cache = KVCache(lm.config, B, S, x.dtype, device)
        positions = attention_mask.long().cumsum(-1)  # (B, T)
        mask, sliding = self.attention_masks(attention_mask.bool(), torch.zeros_like(input_ids))
        h = lm(x, positions, mask, sliding, cache, torch.arange(T, device=device))
        logits = lm.logits(h[:, -1])  # (B, V): the head only where the next token is read

        # Decoding: the k-th new token goes to slot T-1+k as causal step k; every slot but the
        # prompt's padding holds a real token once written.
        valid = F.pad(attention_mask.bool(), (0, S - T), value=True)  # (B, S)
        # (1, S): 0 0 .. 0 1 2 ..
        steps = (torch.arange(S, device=device) - (T - 1)).clamp(min=0)[None]
        position, slot = positions[:, -1:], torch.tensor([T - 1], device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            if constrain is not None:
                allowed = torch.as_tensor(
                    constrain(out[-1] if out else None, max_new_tokens - step), device=device)
                logits = logits.masked_fill(~allowed, float("-inf"))
            token = sample(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(done, self.config.pad_token_id)
            out.append(token)
            done |= token == self.config.eos_token_id
            if done.all() or step == max_new_tokens - 1:
                break
            position, slot = position + 1, slot + 1
            logits = self.decode_step(token, position, slot, valid, steps, cache)
        return torch.stack(out, dim=1)

    def decode_step(self, token, position, slot, valid, steps, cache: KVCache) -> torch.Tensor:
        """One new token per row: token (B,), position (B, 1), its cache slot (1,), the slots'
        validity (B, S) and causal steps (1, S) -> next-token logits (B, V). Shapes do not change
        from step to step, so that `model.decode_step = torch.compile(model.decode_step)` compiles
        it once."""
        lm = self.language_model
        # (B, 1, 1, S): the prompt and the tokens up to this one
        mask = prefix_lm_mask(valid, steps, slot)
        window = lm.config.sliding_window
        sliding_mask = None if window is None else prefix_lm_mask(valid, steps, slot, window)
        h = lm(lm.embed(token[:, None]), position, mask, sliding_mask, cache, slot, read_cache=True)
        return lm.logits(h[:, -1])

    @classmethod
    def from_pretrained(cls, name_or_dir,
                        dtype: torch.dtype | Callable[[str], torch.dtype] = torch.float32,
                        device="cpu", quantize: str | None = None,
                        keep: Callable[[str], bool] | None = None) -> "PaliGemma":
        """Loads a Hugging Face-format checkpoint from a local folder or a hub id, strictly.

        Every tensor the model needs must be in the checkpoint with the right shape (see
        read_checkpoint). Tensors are read one at a time and converted straight to `dtype` on
        `device`; `dtype` may be a function of the parameter's name (train.py reads the weights it
        trains in float32 and the frozen ones in the compute dtype). With `quantize` ("nf4", "int8"
        or "int4": quantize.py), the linear layers that format takes (but those `keep(name)` keeps)
        are stored in it, each weight quantized as it is read: the full-precision model is never in
        memory.
        """
        folder = resolve_checkpoint(
            name_or_dir, ["config.json", "*.safetensors", "model.safetensors.index.json"])
        config = read_config(folder / "config.json")
        # before building what could be huge
        check_layer_counts(config, checkpoint_index(folder), folder)
        with torch.device("meta"):  # no memory is allocated until the weights are read
            model = cls(config)
        dtype_of = dtype if callable(dtype) else lambda name: dtype
        expected = {name: list(t.shape) for name, t in model.state_dict().items()}
        quantized = {}
        if quantize is not None:
            import quantize as formats
            quantized = formats.quantize_linears(model, quantize, dtype_of, keep, device)
        state = {}
        # on the CPU, views of the file's memory map
        for name, tensor in read_checkpoint(folder, expected):
            if name in quantized:
                state |= quantized[name].state(name, tensor.to(device))
            else:
                # when quantizing, a copy: a view would keep the map, and every quantized weight's
                # pages, alive
                state[name] = tensor.to(device=device, dtype=dtype_of(name), copy=bool(quantized))
        model.load_state_dict(state, strict=True, assign=True)
        if quantize is not None:
            formats.add_output_head(model, quantize)
        return model.eval()


# ----------------------------------------------------------------------------------------------
# Fine-tuning: which weights learn, and the loss, taken on the suffix alone (the prefix is the
# prompt)

TRAINABLE = {  # train.py --trainable: which parameters learn (LoRA's adapters are lora.py's)
    # q, k, v, o
    "attn": lambda name: name.startswith("language_model.layers.") and ".self_attn." in name,
    "llm": lambda name: name.startswith("language_model."),
    "all": lambda name: True,
}


class SuffixLossSum(nn.Module):
    """PaliGemma and its training loss as one module, so that DDP and torch.compile see a single
    forward."""

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, attention_mask, token_type_ids,
                labels) -> torch.Tensor:
        """The cross-entropy *summed* over the batch's target tokens (suffix and <eos>: the labels
        that are not -100); divide by count_targets(labels), over all micro-batches and processes of
        a step, for the mean."""
        # (B, T, D)
        h = self.model.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)
        targets = labels[:, 1:]  # position t predicts token t + 1
        is_target = targets != -100
        # (n_targets, V), not (B, T, V)
        logits = self.model.language_model.logits(h[:, :-1][is_target])
        return F.cross_entropy(logits.float(), targets[is_target], reduction="sum")


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """The number of tokens the loss is taken over: the labels other than -100 after the shift by
    one."""
    return (labels[:, 1:] != -100).sum()


# ----------------------------------------------------------------------------------------------
# Loading: config.json, where a checkpoint's tensors are and what they are called, strict reading.
# The official layout nests the towers one level deeper than our modules.

GEMMA2_DEFAULTS = dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, sliding_window=4096)


def _dataclass_from_dict(cls, d, where: str):
    """Fills the fields of `cls` found in `d`, each checked against the field's type (sizes >= 1);
    every other key of a transformers config is ignored."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} is {type(d).__name__}; expected a JSON object")
    values = {}
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        # int | None
        kinds = typing.get_args(f.type) if isinstance(f.type, types.UnionType) else (f.type,)
        kinds = tuple(typing.get_origin(k) or k for k in kinds)  # list[str] -> list
        ok = isinstance(v, kinds) and (bool in kinds or not isinstance(v, bool))
        ok |= float in kinds and isinstance(v, int) and not isinstance(v, bool)
        if not ok or (kinds[0] is int and v is not None and v < 1):
            expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{where}.{f.name} is {json.dumps(v)}; expected {expected}"
                             + (" >= 1" if kinds[0] is int else ""))
        values[f.name] = v
    return cls(**values)


def read_config(path) -> PaliGemmaConfig:
    """A checkpoint's config.json, checked: a wrong field is an error that names it. Fields that are
    absent take the defaults of transformers' configs (Gemma2Config's for PaliGemma 2)."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                         f"{e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be a config") from None
    if not isinstance(d, dict) or not isinstance(d.get("text_config", {}), dict):
        raise ValueError(f"{path}: expected a JSON object with a text_config object")
    text = dict(d.get("text_config", {}))
    kind = text.get("model_type", "gemma")
    if kind not in ("gemma", "gemma2"):
        raise ValueError(f"{path}: text_config.model_type is {kind!r}; supported are 'gemma' "
                         "(PaliGemma) and 'gemma2' (PaliGemma 2)")
    text.setdefault("rope_theta",
                    (text.get("rope_parameters") or {}).get("rope_theta", GemmaConfig.rope_theta))
    if kind == "gemma2":  # PaliGemma 2; absent fields take transformers' Gemma2Config defaults
        n = text.get("num_hidden_layers", GemmaConfig.num_hidden_layers)
        n = n if isinstance(n, int) else 0
        alternating = [("sliding_attention", "full_attention")[i % 2] for i in range(n)]
        text = GEMMA2_DEFAULTS | {"layer_types": alternating} | text | {"post_norms": True}
    top = {k: d[k] for k in ("image_token_index", "pad_token_id", "eos_token_id") if k in d}
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in top.values()):
        raise ValueError(f"{path}: image_token_index, pad_token_id and eos_token_id must be "
                         "integers >= 0")
    vision = _dataclass_from_dict(SiglipConfig, d.get("vision_config", {}),
                                  f"{path}: vision_config")
    config = PaliGemmaConfig(vision,
                             _dataclass_from_dict(GemmaConfig, text, f"{path}: text_config"), **top)
    layer_types = config.text_config.layer_types
    if layer_types is not None and len(layer_types) != config.text_config.num_hidden_layers:
        raise ValueError(f"{path}: text_config.layer_types has {len(layer_types)} entries for "
                         f"{config.text_config.num_hidden_layers} layers")
    return config


CHECKPOINT_PREFIXES = {  # checkpoint key prefix -> our parameter prefix
    # transformers 5 writes a fresh model without `vision_model.`
    "vision_tower.vision_model.": "vision_tower.",
    "language_model.model.": "language_model.",
    "multi_modal_projector.linear.": "multi_modal_projector.",
}
# SigLIP's pooling head; the tied head
UNUSED_PREFIXES = ("vision_tower.head.", "lm_head.", "language_model.lm_head.")


def _rename(key: str, prefixes: dict[str, str]) -> str:
    return next((new + key[len(old):] for old, new in prefixes.items() if key.startswith(old)), key)


def _listing(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def resolve_checkpoint(name_or_dir, patterns: list[str]) -> Path:
    """A local folder as it is, or a hub id (e.g. google/paligemma-3b-pt-224) downloaded to the
    local cache."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a PaliGemma checkpoint: it has no config.json")
        return path
    if path.exists():
        raise FileNotFoundError(f"{name_or_dir} is a file, not a checkpoint folder (nor a hub id)")
    # e.g. tiny/paligemma_tiny, a typo beside tiny/...
    if path.parent.is_dir() and str(path.parent) != ".":
        nearby = ", ".join(sorted(p.name for p in path.parent.iterdir() if p.is_dir())[:8])
        raise FileNotFoundError(f"{name_or_dir}: no such local folder ({path.parent} holds: "
                                f"{nearby or 'no folders'})")
    if str(name_or_dir).startswith((".", "/", "~")) or str(name_or_dir).count("/") != 1:
        raise FileNotFoundError(f"{name_or_dir}: no such checkpoint folder (nor a hub id of the "
                                "form owner/name)")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(str(name_or_dir), allow_patterns=patterns))
    except Exception as e:
        # network, gating, authentication, missing repo: the hub library raises many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"{name_or_dir} is not a local folder and could not be fetched from the Hugging Face "
            f"hub ({reason}). PaliGemma checkpoints are gated: accept the licence on the model's "
            "page and run `huggingface-cli login`, or pass the path of a downloaded checkpoint "
            "folder."
        ) from None


def checkpoint_tensors(folder: Path) -> dict[str, tuple[Path, list[int]]]:
    """{checkpoint key: (safetensors file, shape)} of a single-file or a sharded (indexed)
    checkpoint, read from the files' headers; a file that cannot be read, or an index naming a
    tensor that its shard lacks, is an error that names it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {}  # file -> the keys the index puts there
            for key, file in weight_map.items():
                inside = (folder / file).resolve().is_relative_to(folder.resolve())
                if Path(file).is_absolute() or not inside:
                    raise ValueError(f"{index} puts {key} in {file}, outside the checkpoint's "
                                     "folder")
                files.setdefault(folder / file, []).append(key)
        except json.JSONDecodeError as e:
            raise ValueError(f"{index}: not valid JSON ({e.msg} at line {e.lineno}, column "
                             f"{e.colno})") from None
        except RecursionError:
            raise ValueError(f"{index}: nested too deeply to be a checkpoint's index") from None
        except (KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise ValueError(f"{index}: expected a JSON object with a weight_map {{tensor name: "
                             "file}") from None
    elif (folder / "model.safetensors").exists():
        files = {folder / "model.safetensors": None}
    else:
        raise FileNotFoundError(f"{folder} holds no weights: neither model.safetensors nor "
                                "model.safetensors.index.json")
    found = {}
    for file, keys in files.items():
        try:
            with safe_open(file, framework="pt") as f:
                shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        except (SafetensorError, OSError) as e:
            reason = str(e)
            if file.is_dir() or not file.exists():
                reason = "it is a folder" if file.is_dir() else "no such file"
            raise ValueError(f"{file}: not a readable safetensors file ({reason})") from None
        for key in keys if keys is not None else shapes:
            if key not in shapes:
                raise ValueError(f"{index} puts {key} in {file.name}, which does not hold it")
            found[key] = (file, shapes[key])
    return found


def checkpoint_index(folder: Path) -> dict[str, tuple[str, Path, list[int]]]:
    """{our name: (checkpoint key, safetensors file, shape)} of a checkpoint's tensors, read from
    the files' headers; the unused pooling head and the tied lm_head are left out."""
    found = {}
    for key, (file, shape) in checkpoint_tensors(folder).items():
        if not (name := _rename(key, CHECKPOINT_PREFIXES)).startswith(UNUSED_PREFIXES):
            found[name] = (key, file, shape)
    return found


def check_layer_counts(config: PaliGemmaConfig, index: dict, folder: Path):
    """The config's numbers of layers against the checkpoint's tensors (read_checkpoint checks the
    rest)."""
    for tower, cfg in (("vision_tower.encoder.layers.", config.vision_config),
                       ("language_model.layers.", config.text_config)):
        held = {name[len(tower):].split(".")[0] for name in index if name.startswith(tower)}
        if len(held) != cfg.num_hidden_layers:
            what = "missing" if cfg.num_hidden_layers > len(held) else "unexpected"
            first = min(cfg.num_hidden_layers, len(held))
            raise ValueError(f"{folder / 'config.json'} gives {tower.split('.')[0]} "
                             f"{cfg.num_hidden_layers} layers; the checkpoint holds {len(held)} "
                             f"({what} tensors: {tower}{first}.*)")


def read_checkpoint(folder: Path, expected: dict[str, list[int]]):
    """The tensors of the checkpoint in `folder`, one at a time as stored: (our name, tensor on the
    CPU). First, strictly: every name in `expected` must be there with its shape, and nothing else
    but the unused pooling head and the tied lm_head; a mismatch is an error that names the
    tensors."""
    found = checkpoint_index(folder)
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found[n][0] for n in found.keys() - expected.keys())
    wrong = sorted(f"{found[n][0]} {found[n][2]} (expected {expected[n]})"
                   for n in found.keys() & expected.keys() if found[n][2] != expected[n])
    found_wrong = [("missing tensors", missing), ("unexpected tensors", unexpected),
                   ("wrong shapes", wrong)]
    problems = [f"{what}: {_listing(names)}" for what, names in found_wrong if names]
    if problems:
        raise ValueError(f"checkpoint {folder} does not match its config.json: "
                         + "; ".join(problems))
    by_file = {}  # file -> {our name: checkpoint key}
    for name, (key, file, _) in found.items():
        by_file.setdefault(file, {})[name] = key
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt") as f:
                for name, key in keys.items():
                    yield name, f.get_tensor(key)
        except (SafetensorError, OSError) as e:  # e.g. a file truncated after its header
            raise ValueError(f"{file}: cannot be read ({e})") from None


def official_name(name: str) -> str:
    """Our name of a tensor -> its name in the official checkpoints."""
    return _rename(name, {ours: official for official, ours in CHECKPOINT_PREFIXES.items()})


def official_state_dict(model: PaliGemma) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of the official checkpoints, the layout `from_pretrained`
    reads."""
    return {official_name(key): value for key, value in model.state_dict().items()}
