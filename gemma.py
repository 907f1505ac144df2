"""Gemma and Gemma 2, the decoder-only language models inside PaliGemma and PaliGemma 2.

Gemma (Gemma Team, 2024) is a pre-norm transformer decoder:

    token ids (B, T)
      -> embed_tokens, times sqrt(hidden)                  (B, T, D)
      -> L layers:  x = x + Attn(RMSNorm(x))                 multi-query / grouped-query, RoPE
                    x = x + GeGLU-MLP(RMSNorm(x))
      -> final RMSNorm, then the *tied* output head E^T      (B, T, vocab)

Details that matter for exact logits: RMSNorm is computed in float32 and scales by (1 + weight);
the embedding multiplier sqrt(hidden) is cast to the activation dtype; RoPE rotates the two halves
of each head (not interleaved pairs); the MLP is down(gelu_tanh(gate(x)) * up(x)).

Gemma 2 (Gemma Team, 2024b) is the same model with five differences, each a config field here:
  post_norms               RMSNorm also on the output of attention and of the MLP (4 norms a layer)
  query_pre_attn_scalar    attention scores scaled by its -1/2 power instead of head_dim's (144 in
                           27B)
  attn_logit_softcapping   scores -> cap * tanh(scores / cap) before the mask (50); this one path
                           does not use the fused SDPA kernel, which cannot cap
  final_logit_softcapping  the same on the output logits (30)
  sliding_window           layers marked "sliding_attention" in layer_types (every other one) attend
                           causally to the last 4096 positions only

What it is not: a tokenizer, a sampler or a PaliGemma-specific model. The caller passes the input
embeddings (so that PaliGemma can put image features among them), the positions and the boolean
attention mask (so that PaliGemma can use its prefix-LM mask). `KVCache` is pre-allocated once and
written in place, so that generation never concatenates tensors step by step.

Shape letters: B batch, T tokens given to this call, S keys attended to (T, or the KVCache's slots),
D hidden size, H query heads, K key/value heads, hd head_dim, F MLP width, V vocabulary.

Parameter names follow the Hugging Face checkpoints (`embed_tokens`, `layers.{i}.self_attn.q_proj`,
`input_layernorm`, `post_attention_layernorm` (which is the norm *before* the MLP), `norm`).
This file imports only torch and can be copied on its own.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GemmaConfig:
    # Defaults are the decoder of paligemma-3b (Gemma 2B v1, with PaliGemma's vocabulary).
    vocab_size: int = 257216
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1  # 1: multi-query attention; between 1 and heads: grouped-query
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192  # the longest sequence the model was built for
    # Gemma 2 (see the module docstring); the defaults are Gemma 1's.
    post_norms: bool = False
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "sliding_attention" or "full_attention", one per layer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # stored as an offset from 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * (1 + weight), all in float32, then back to x's dtype
        return F.rms_norm(x.float(), self.weight.shape, 1.0 + self.weight.float(),
                          self.eps).type_as(x)


def rope(positions: torch.Tensor, head_dim: int, theta: float,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding tables. positions (B, T) -> cos, sin of shape (B, 1, T, head_dim).

    Both halves of a head share each angle; sin carries the rotation's sign, -sin on the first
    half."""
    even = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (even / head_dim)  # (head_dim/2,)
    freqs = positions[:, None, :, None].float() * inv_freq  # (B, 1, T, head_dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim); rotates the pair (x[i], x[i + head_dim/2]) by the angle of
    position: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Swapping the halves is a roll by
    head_dim/2."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class KVCache:
    """Keys and values of every layer, allocated once for `max_len` slots and written in place.

    k, v: one (B, K, max_len, hd) tensor per layer. `update` writes a layer's new keys and values at
    the given slots and returns the layer's whole cache. A forward pass with `read_cache=True`
    attends over all max_len slots, and its mask says which of them hold keys to attend to; without
    it, the new tokens are written to the cache but attend only to each other (the first chunk of a
    prompt). The shapes never change, so a compiled decoding step is compiled once.
    """

    def __init__(self, cfg: GemmaConfig, batch_size: int, max_len: int, dtype: torch.dtype, device):
        self.max_len = max_len
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        layers = range(cfg.num_hidden_layers)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        # torch.compile(mode="reduce-overhead"): CUDA graphs may write them in place
        for t in self.k + self.v:
            torch._dynamo.mark_static_address(t)

    def update(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, K, T, hd) written at slots (T,) -> this layer's keys and values (B, K, max_len,
        hd)."""
        return self.k[layer].index_copy_(2, slots, k), self.v[layer].index_copy_(2, slots, v)


class GemmaAttention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.softcap = cfg.attn_logit_softcapping

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, read_cache: bool = False):
        B, T, _ = x.shape
        # (B, H, T, hd)
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        # (B, K, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cached = cache.update(self.layer_idx, slots, k, v)  # (B, K, max_len, hd)
            if read_cache:
                k, v = cached  # S = max_len
        # mask (B, 1, T, S) bool, True = may attend. Each group of H/K query heads shares one kv
        # head.
        if self.softcap is None:
            y = attention(q, k, v, mask, self.scale)
        else:  # Gemma 2: cap the scores before the mask; SDPA has no hook for that
            # (B, H, S, hd)
            k, v = (t.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1) for t in (k, v))
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, S)
            scores = self.softcap * torch.tanh(scores / self.softcap)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            y = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attention(q, k, v, mask, scale: float, expand: bool | None = None) -> torch.Tensor:
    """SDPA of q (B, H, T, hd) over k, v (B, K, S, hd), each group of H/K query heads on one
    key/value head. On CUDA, where a mask is given, k and v are expanded to the H heads: with
    enable_gqa SDPA takes only its flash kernel, which takes no mask, or its math kernel (the whole
    score matrix); expanded, its memory-efficient kernel takes the mask. With one key/value head
    (PaliGemma's multi-query attention) the expansion is a view, no copy; with several, a copy.
    `expand` overrides the choice (tests)."""
    H, K = q.shape[1], k.shape[1]
    if expand is None:
        expand = q.device.type == "cuda" and mask is not None
    if expand and K == 1:
        k, v = k.expand(-1, H, -1, -1), v.expand(-1, H, -1, -1)  # stride 0 over the heads
    elif expand and K < H:
        # (B, H, S, hd)
        k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=k.shape[1] != H)


class GeGLU(torch.autograd.Function):
    """gelu_tanh(gate) * up, keeping only gate and up for backward (autograd would keep gelu(gate)
    too: the (B, T, F) tensors of the MLP are a decoder layer's largest activations). The same
    kernels, the same numbers."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.gelu(gate, approximate="tanh") * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.gelu_backward(grad * up, gate, approximate="tanh")
        return grad_gate, grad * F.gelu(gate, approximate="tanh")


class GemmaMLP(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, F) -> (B, T, D)
        return self.down_proj(GeGLU.apply(self.gate_proj(x), self.up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_idx: int):
        super().__init__()
        self.post_norms = cfg.post_norms
        types = cfg.layer_types
        self.sliding = types is not None and types[layer_idx] == "sliding_attention"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = GemmaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GemmaMLP(cfg)
        if cfg.post_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, slots=None, read_cache=False):
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, slots, read_cache)
        if self.post_norms:  # Gemma 2: x + N(Attn(N(x))), then x + N(MLP(N(x)))
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        # in Gemma 1 this norm comes *before* the MLP
        return x + self.mlp(self.post_attention_layernorm(x))


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.has_sliding_layers = any(layer.sliding for layer in self.layers)
        # the output head is the embedding, transposed; or a quantized copy (quantize.py)
        self.head = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, T, D), scaled by sqrt(D) rounded to the weights' dtype."""
        x = self.embed_tokens(input_ids)
        return x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)

    def forward(self, x, positions, mask: torch.Tensor | None,
                sliding_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, read_cache: bool = False) -> torch.Tensor:
        """Input embeddings (B, T, D), positions (B, T), mask (B, 1, T, S) -> final hidden states
        (B, T, D).

        mask: bool, True where a query may attend to a key; None: every token given attends to every
        token given (the unmasked SDPA kernel, about twice as fast). Gemma 2's sliding-window layers
        use `sliding_mask` (same shape) instead. With a cache, the T new keys and values are written
        at its slots `slots` (T,); with `read_cache` the tokens attend over all S = max_len slots of
        the cache (and need a mask that says which slots hold keys), else only to each other (S =
        T).
        """
        B, T, _ = x.shape
        if read_cache and (cache is None or mask is None):
            raise ValueError("read_cache needs a cache, and a mask over its slots saying which "
                             "hold keys")
        if mask is not None and sliding_mask is None and self.has_sliding_layers:
            raise ValueError("this model has sliding-window layers: give sliding_mask with mask")
        S = cache.max_len if read_cache else T
        for name, m in (("mask", mask), ("sliding_mask", sliding_mask)):
            if m is not None and (m.dtype != torch.bool or m.dim() != 4 or m.shape[0] not in (1, B)
                                  or m.shape[1:] != (1, T, S)):
                raise ValueError(f"{name} is {m.dtype} of shape {tuple(m.shape)}; expected bool "
                                 f"(B, 1, T, S) = ({B}, 1, {T}, {S}): {T} tokens attending to {S} "
                                 + ("cache slots" if read_cache else "tokens"))
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, sliding_mask if layer.sliding else mask, cache, slots,
                      read_cache)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., vocab) through the tied output head: the embedding matrix,
        transposed."""
        logits = F.linear(h, self.embed_tokens.weight) if self.head is None else self.head(h)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)
