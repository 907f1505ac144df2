"""8-bit integer weights for inference: a linear layer whose weight is read half the bytes of
bfloat16.

Batch-1 decoding reads every weight once per token, so its speed is memory bandwidth over the
weights' bytes. Each output channel's weights are scaled by their largest magnitude into -127..127
(symmetric, per channel: scale = absmax / 127) and stored as int8; the product dequantizes inside
the kernel:

    weight (out, in) --quantize--> weight (out, in) int8, scales (out,)
    y = (x @ weight.T) * scales     torch.ops.aten._weight_int8pack_mm on the CPU

On the CPU the kernel is vectorized only for bfloat16 activations (float32 ones fall to a scalar
loop, slower than float32 dense): x goes in as bfloat16 and the result comes back in x's dtype. On a
GPU the same product is written as F.linear(x, weight.to(x.dtype)) * scales, which torch.compile
fuses into one kernel (gpt-fast's int8 path); eager, it dequantizes the weight for each product.

What it is not: training (weights here are frozen and get no gradient), or a checkpoint format: a
checkpoint keeps its full-precision weights, quantized again as they are read. Imports torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn


def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight (out, in) -> {"weight": int8 (out, in), "scales": bfloat16 (out,)}: the scales in
    the activations' dtype, as the kernel takes them (converting them at every product would read
    and write them again each time)."""
    w = weight.detach().float()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    return dict(weight=(w / scales.float()[:, None]).round().clamp(-127, 127).to(torch.int8),
                scales=scales)


class Int8Linear(nn.Module):
    """A frozen linear layer with an int8 weight and a scale per output channel."""

    name = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device=None, persistent: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        weight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight", weight, persistent=persistent)
        scales = torch.empty(out_features, dtype=torch.bfloat16, device=device)
        self.register_buffer("scales", scales, persistent=persistent)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                     requires_grad=False)

    @staticmethod
    def fits(in_features: int, out_features: int) -> bool:
        return True  # any width

    @staticmethod
    def state(weight_name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's tensors, by name in the model, from its full-precision weight."""
        prefix = weight_name.rpartition(".")[0]
        return {f"{prefix}.{key}": value for key, value in quantize(weight).items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dequantized(self) -> torch.Tensor:
        """The weight (out, in) in self.dtype, as the products read it."""
        return (self.weight.float() * self.scales.float()[:, None]).to(self.dtype)
