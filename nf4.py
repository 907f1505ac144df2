"""4-bit NormalFloat (NF4) weights, for a frozen base under LoRA (QLoRA: Dettmers et al., 2023), in
bitsandbytes' layout.

NF4 is a 4-bit code of 16 levels, placed at quantiles of a normal distribution (plus an exact 0), so
that weights, which are roughly normal, use each level about equally often. A weight is quantized in
blocks of 64: each block is divided by its largest magnitude (its absmax) and every value is
replaced by the index of the nearest level, two indices a byte (the first in the high nibble). The
absmax of each block (a float32 per 64 weights, half a bit per weight) is itself quantized ("double
quantization"): its mean is subtracted and the rest coded in 8 bits with bitsandbytes' dynamic code,
in blocks of 256 with a float32 absmax each, which saves about 0.37 bits per weight. In all, a
weight takes 4.13 bits instead of 16 in bfloat16.

    weight (out, in) --quantize--> weight (out*in/2, 1) uint8, absmax (blocks,) uint8,
                                   nested_absmax (blocks/256,) float32, offset () float32
    --dequantize--> weight (out, in) in the compute dtype, just before each matmul (and again in
                    backward)

The buffers' names are those of transformers' bitsandbytes checkpoints, and the bytes are those of
`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)`
(the tests compare). quantize.py registers it beside the formats for decoding; inference
dequantizes an NF4 model's weights once (dequantize_linears) rather than for every product. Imports
torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn

BLOCK, NESTED_BLOCK = 64, 256
CHUNK = 2**22  # weights dequantized this many at a time
# The 16 levels: quantiles of N(0, 1) (9 negative ones, 0, 8 positive ones, as bitsandbytes computes
# them in create_normal_map(offset=0.9677083)), scaled to [-1, 1].
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (Dettmers, 2016): 0, 1, and for exponents 10^-6 ..
    10^0 the midpoints of 2^i equal steps between 0.1 and 1 times the exponent, with both signs.
    (256,) sorted."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + [-m for m in means]
    return torch.tensor(sorted(values))


def quantize_blocks(x: torch.Tensor, code: torch.Tensor, block: int,
                    grid: int = 0) -> tuple[torch.Tensor, ...]:
    """x (n,) float32 -> (for each value the index of the nearest level of `code` (n,) uint8, absmax
    per block). Each value is multiplied by the inverse of its block's absmax (the last, partial
    block divided by it in 4 bits), as bitsandbytes does. With `grid` (its CPU kernel for 8 bits, a
    lookup table of 65536 entries), each scaled value is first rounded to the nearest of `grid` + 1
    points evenly spaced over [-1, 1]: the choice between two neighbouring levels follows that
    grid."""
    n, full = len(x), len(x) // block * block
    absmax = x[:full].view(-1, block).abs().amax(1)
    if full < n:
        absmax = torch.cat([absmax, x[full:].abs().amax()[None]])
    if grid:
        # 0 / 0 (one block): level 0
        scaled = (x * (1.0 / absmax).repeat_interleave(block)[:n]).nan_to_num(-1.0)
        scaled = torch.floor((scaled + 1) * (grid / 2) + 0.5) / (grid / 2) - 1
    else:
        inverse = 1.0 / absmax[:full // block].clamp(min=1e-38)
        scaled = (x[:full].view(-1, block) * inverse[:, None]).flatten()
        scaled = torch.cat([scaled, x[full:] / absmax[full // block:].clamp(min=1e-38)])
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled.clamp(-1, 1), midpoints).to(torch.uint8), absmax


def dequantize_blocks(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      block: int) -> torch.Tensor:
    values = code[q.long()]
    return values * absmax.repeat_interleave(block)[:len(values)]


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight in NF4 with double-quantized absmax: {weight, absmax, nested_absmax, offset,
    quant_map, nested_quant_map}, the tensors of an NF4Linear."""
    nf4, dynamic = torch.tensor(NF4, device=weight.device), dynamic_code().to(weight.device)
    q, absmax = quantize_blocks(weight.detach().flatten().float(), nf4, BLOCK)
    q = F.pad(q, (0, len(q) % 2), value=NF4.index(0.0))  # an odd count is padded with a 0
    offset = absmax.mean()
    absmax_q, nested_absmax = quantize_blocks(absmax - offset, dynamic, NESTED_BLOCK, grid=65535)
    return dict(weight=(q[::2] << 4 | q[1::2])[:, None], absmax=absmax_q,
                nested_absmax=nested_absmax, offset=offset, quant_map=nf4, nested_quant_map=dynamic)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 and dequantized to `dtype` for each
    matmul."""

    name = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        blocks = -(-in_features * out_features // BLOCK)
        for name, shape, kind in (("weight", (-(-in_features * out_features // 2), 1), torch.uint8),
                                  ("absmax", (blocks,), torch.uint8),
                                  ("nested_absmax", (-(-blocks // NESTED_BLOCK),), torch.float32),
                                  ("offset", (), torch.float32),
                                  ("quant_map", (16,), torch.float32),
                                  ("nested_quant_map", (256,), torch.float32)):
            self.register_buffer(name, torch.empty(shape, dtype=kind, device=device))
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))

    @staticmethod
    def fits(in_features: int, out_features: int) -> bool:
        return True  # blocks of 64 run across rows: any width

    @staticmethod
    def state(weight_name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's tensors, by name in the model, from its full-precision weight (quantized
        where it lies)."""
        prefix = weight_name.rpartition(".")[0]
        return {f"{prefix}.{key}": value for key, value in quantize(weight).items()}

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) in self.dtype, a chunk at a time so that the float32 temporaries
        stay small."""
        absmax = dequantize_blocks(self.absmax, self.nested_absmax, self.nested_quant_map,
                                   NESTED_BLOCK) + self.offset
        # byte -> 2 levels
        levels = torch.stack([self.quant_map.repeat_interleave(16), self.quant_map.repeat(16)], 1)
        n = self.in_features * self.out_features
        out = torch.empty(n, dtype=self.dtype, device=self.weight.device)
        for start in range(0, n, CHUNK):  # CHUNK is a multiple of the block: a chunk starts a block
            end = min(n, start + CHUNK)
            codes = self.weight[start // 2:(end + 1) // 2, 0].int()  # two 4-bit codes a byte
            values = levels.index_select(0, codes).flatten()[:end - start]
            if (end - start) % BLOCK == 0:
                values.view(-1, BLOCK).mul_(absmax[start // BLOCK:end // BLOCK, None])
            else:  # the last block is partial
                values.mul_(absmax[start // BLOCK:].repeat_interleave(BLOCK)[:end - start])
            out[start:end] = values
        return out.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias


class DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and again in backward, so that no dequantized weight is
    kept for backward (that would hold every layer's weight at full size at once). Only x gets a
    gradient."""

    @staticmethod
    def forward(ctx, x, layer: NF4Linear):
        ctx.layer = layer
        return F.linear(x, layer.dequantized())

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized().to(grad.dtype), None


@torch.no_grad()
def dequantize_linears(model: nn.Module) -> int:
    """Every NF4Linear of a model (a LoRA layer's base too) replaced by an nn.Linear holding its
    weight dequantized once, in the layer's dtype: the weights a QLoRA adapter was trained against,
    at the speed of the compute dtype (the memory too). Returns the number of layers."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, NF4Linear)]
    for name, m in layers:
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.dtype,
                           device=m.weight.device)
        linear.weight.copy_(m.dequantized())
        if m.bias is not None:
            linear.bias.copy_(m.bias)
        linear.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return len(layers)
