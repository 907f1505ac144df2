"""SigLIP vision tower, as PaliGemma uses it.

A plain Vision Transformer (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", 2023;
the So400m/14 shape from Alabdulmohsin et al., 2023):

    image (B, 3, H, W) in [-1, 1]
      -> 14x14 patches, a stride-14 conv          (B, N, D)   N = (H/14)*(W/14), D = 1152
      -> + learned position embedding             (B, N, D)
      -> L pre-LayerNorm blocks: x + Attn(LN(x)); x + MLP(LN(x))
      -> final LayerNorm ("post_layernorm")       (B, N, D)

What it is not: the SigLIP *contrastive* model. There is no text tower, no CLS token and no
attention-pooling head (PaliGemma uses `vision_use_head=False` and reads all N tokens).

Shape letters: B batch, N patches (image tokens), D hidden size, hd head_dim.

Parameter names follow the Hugging Face checkpoints (`embeddings.patch_embedding`,
`encoder.layers.{i}.self_attn.q_proj`, `post_layernorm`, ...) so weights load without renames.
This file imports only torch and can be copied on its own.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SiglipConfig:
    # Defaults are SigLIP So400m/14 at 224 px, the vision tower of every PaliGemma checkpoint.
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 14
    image_size: int = 224  # 224, 448 or 896 in the released checkpoints
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:  # 256, 1024 or 4096: the number of image tokens
        return (self.image_size // self.patch_size) ** 2


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention with biases; every patch sees every patch."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, hd)
        k = self.k_proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # scale hd**-0.5, no mask
        return self.out_proj(y.transpose(1, 2).reshape(B, N, D))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.ModuleDict(dict(
            fc1=nn.Linear(cfg.hidden_size, cfg.intermediate_size),
            fc2=nn.Linear(cfg.intermediate_size, cfg.hidden_size),
        ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        h = F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh")
        return x + self.mlp.fc2(h)


class SiglipVisionModel(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.config = cfg
        # nn.ModuleDicts only to give the parameters the checkpoint's names.
        self.embeddings = nn.ModuleDict(dict(
            patch_embedding=nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                      stride=cfg.patch_size),
            position_embedding=nn.Embedding(cfg.num_patches, cfg.hidden_size),
        ))
        self.encoder = nn.ModuleDict(dict(
            layers=nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
        ))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D), patches in row-major order."""
        size, channels = self.config.image_size, self.config.num_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1:] != (channels, size, size):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}; this model takes "
                             f"images of {size}x{size} pixels, as (B, {channels}, {size}, {size})")
        x = self.embeddings.patch_embedding(pixel_values)  # (B, D, H/14, W/14)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + self.embeddings.position_embedding.weight
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
