"""4-bit integer weights for inference, in groups: a linear layer read in a quarter of bfloat16's
bytes.

Each output channel's weights are cut into groups of `group_size` along the input (32 to 256; 128 by
default); a group's values are mapped to 0..15 between its minimum and maximum (asymmetric), and
packed two to a byte in the layout of torch's int4 kernels, with a scale and a zero per group:

    weight (out, in) --quantize--> packed codes, scales_and_zeros (in / group_size, out, 2)
    w = (q - 8) * scale + zero      (tinygemm's convention: zero = min + 8 * scale)
    y = x @ w.T                     aten._weight_int4pack_mm_for_cpu on the CPU,
                                    aten._weight_int4pack_mm on CUDA

On the CPU the kernel is fast only for bfloat16 activations: x goes in as bfloat16 and the result
comes back in x's dtype. On CUDA (tinygemm) the activations are bfloat16 too. The kernels take
widths whose input is a multiple of the group and whose output is a multiple of 16 (`fits`);
quantize.py leaves a layer that does not fit in another format.

What it is not: training, or a checkpoint format (checkpoints keep full-precision weights, quantized
again as they are read). Imports torch only.
"""

import torch
from torch import nn

GROUP_SIZES = (128, 256, 64, 32)  # the first that divides the input is used
INNER_K_TILES = 8  # CUDA's packing; its input must then be a multiple of 128


def group_size_for(in_features: int) -> int | None:
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (out, in) -> codes int32 (out, in) in 0..15, and scales_and_zeros bfloat16
    (in / group_size, out, 2), as gpt-fast and torchao compute them (scale = (max - min) / 15), in
    the dtype the kernels take them (converting them at every product would cost a pass over
    them)."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, -1, group_size)  # (out, in / g, g)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16).float()
    zeros = (low + 8 * scales).to(torch.bfloat16).float()
    low = zeros - 8 * scales  # the minimum as the kernel reads it back
    codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    scales_and_zeros = torch.stack([scales, zeros],
                                   -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return codes.reshape(out_features, in_features), scales_and_zeros


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes (out, in) int32 -> the kernel's layout on their device (CPU: uint8 (out, in / 2); CUDA:
    tinygemm's int32 tiles, from the codes two to a byte, the first in the high nibble)."""
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INNER_K_TILES)
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), INNER_K_TILES)


class Int4Linear(nn.Module):
    """A frozen linear layer with 4-bit weights in groups along the input."""

    name = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device=None, persistent: bool = True, runs_on: str = "cpu"):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.group_size = group_size_for(in_features)
        # The packed codes take the layout of the kernel of the device they run on (`runs_on`): made
        # there (`state`), never saved in a checkpoint.
        if runs_on.startswith("cpu"):
            packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
        else:
            packed = torch.empty(out_features // 8, in_features // (INNER_K_TILES * 16), 32,
                                 INNER_K_TILES // 2, dtype=torch.int32, device=device)
        self.register_buffer("packed", packed, persistent=persistent)
        groups = in_features // (self.group_size or 1)
        scales_and_zeros = torch.empty(groups, out_features, 2, dtype=torch.bfloat16, device=device)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=persistent)
        self.bias = None if not bias else nn.Parameter(
            torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)

    @staticmethod
    def fits(in_features: int, out_features: int) -> bool:
        return group_size_for(in_features) is not None and out_features % 16 == 0

    @staticmethod
    def state(weight_name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's tensors, by name in the model, from its full-precision weight (on the device
        where the layer runs: the packing is the device's)."""
        prefix = weight_name.rpartition(".")[0]
        codes, scales_and_zeros = quantize(weight, group_size_for(weight.shape[1]))
        return {f"{prefix}.packed": pack(codes), f"{prefix}.scales_and_zeros": scales_and_zeros}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        ops = torch.ops.aten
        cpu = x.device.type == "cpu"
        kernel = ops._weight_int4pack_mm_for_cpu if cpu else ops._weight_int4pack_mm
        y = kernel(flat, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias
