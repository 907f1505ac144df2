"""The VQ-VAE that turns PaliGemma's 16 <seg> tokens into a mask, and masks into <seg> tokens.

PaliGemma answers `segment cat` with a box and a mask:
`<locY1><locX1><locY2><locX2><seg012>...<seg097> cat`. The 16 codes are a 4x4 grid (row-major) of
indices into a codebook of 128 vectors; a small convolutional VQ-VAE (after Ning et al., "All in
Tokens", 2023), trained by Google on Open Images masks and published by big_vision as vae-oid.npz,
decodes them to a 64x64 mask that is pasted into the box:

    decode  codes (B, 16) -> codebook rows (B, D, 4, 4) -> 1x1 conv, ReLU -> 2 residual blocks
            -> 4 x [4x4 transposed conv, stride 2, ReLU]: 4 -> 8 -> 16 -> 32 -> 64
            -> 1x1 conv -> (B, 64, 64)
    encode  mask (B, 64, 64) in [0, 1] -> 2 (m - 0.5)
            -> 4 x [stride-2 conv, ReLU]: 64 -> 32 -> 16 -> 8 -> 4
            -> 2 residual blocks -> conv -> (B, D, 4, 4)
            -> the nearest codebook row (squared L2) -> (B, 16)

A residual block is x + conv1x1(relu(conv3x3(relu(conv3x3(x))))). The decoder's output is a logit: a
pixel is inside where it is > 0. The encoder pads as TensorFlow's 'SAME' does (big_vision encodes
with TensorFlow): a stride-2 convolution with an odd kernel pads one pixel more after than before,
which torch's symmetric `padding=` cannot express. The decoder's transposed convolutions are flax's
`ConvTranspose(padding=2, transpose_kernel=True)`, i.e. torch's `ConvTranspose2d` with padding k -
3.

The parameter names are the npz's (`_vq_vae._embedding`, `decoder.2.net.0.weight`, ...), and every
width and kernel size is read from the arrays' shapes, so that a narrower VQ-VAE of the same
architecture loads too. Imports torch and numpy only (huggingface_hub to download vae-oid.npz).
"""

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HUB_FILE = dict(repo_id="big-vision/paligemma-hf", filename="vae-oid.npz", repo_type="space")
# indices in encoder.*, as in the npz
ENCODER_DOWN, ENCODER_RES, ENCODER_OUT = (0, 2, 4, 6), (8, 9), 10
DECODER_IN, DECODER_RES, DECODER_UP, DECODER_OUT = 0, (2, 3), (4, 6, 8, 10), 12  # and in decoder.*


def architecture(codebook: int = 128, dim: int = 512, encoder=(16, 32, 64, 128),
                 decoder=(128, 64, 32, 16), down_kernel: int = 4) -> dict[str, tuple]:
    """{array name: shape} of a VQ-VAE of this architecture; the defaults are vae-oid.npz's.
    `encoder`: the output channels of the four stride-2 convolutions (the last is the residual
    blocks' width); `decoder`: those of the four transposed convolutions (4x4 kernels). Weights are
    (out, in, k, k), transposed convolutions' (in, out, k, k), as torch stores them."""
    shapes = {"_vq_vae._embedding": (codebook, dim)}
    width = encoder[-1]

    def conv(name, out_channels, in_channels, k, transposed=False):
        shapes[f"{name}.weight"] = (in_channels, out_channels, k, k) if transposed else \
            (out_channels, in_channels, k, k)
        shapes[f"{name}.bias"] = (out_channels,)

    def residual(name):
        for i, k in zip((0, 2, 4), (3, 3, 1)):
            conv(f"{name}.net.{i}", width, width, k)
    for i, in_channels, out_channels in zip(ENCODER_DOWN, (1, *encoder), encoder):
        conv(f"encoder.{i}", out_channels, in_channels, down_kernel)
    for i in ENCODER_RES:
        residual(f"encoder.{i}")
    conv(f"encoder.{ENCODER_OUT}", dim, width, 1)
    conv(f"decoder.{DECODER_IN}", width, dim, 1)
    for i in DECODER_RES:
        residual(f"decoder.{i}")
    for i, in_channels, out_channels in zip(DECODER_UP, (width, *decoder), decoder):
        conv(f"decoder.{i}", out_channels, in_channels, 4, transposed=True)
    conv(f"decoder.{DECODER_OUT}", 1, decoder[-1], 1)
    return shapes


def conv_same(conv: nn.Conv2d, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """`conv` with TensorFlow's 'SAME' padding: the output is ceil(size / stride), the padding split
    with the odd pixel after (for a 3x3 kernel at stride 2 on 64 pixels: 0 before, 1 after)."""
    k, size = conv.weight.shape[-1], x.shape[-1]
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    x = F.pad(x, (total // 2, total - total // 2, total // 2, total - total // 2))
    return F.conv2d(x, conv.weight, conv.bias, stride=stride)


def _conv(shape) -> nn.Conv2d:
    out_channels, in_channels, k, _ = shape
    return nn.Conv2d(in_channels, out_channels, k)  # padding is applied in forward


class ResBlock(nn.Module):
    def __init__(self, shapes: dict, name: str):
        super().__init__()
        conv = lambda i: _conv(shapes[f"{name}.net.{i}.weight"])  # noqa: E731
        self.net = nn.Sequential(conv(0), nn.ReLU(), conv(2), nn.ReLU(), conv(4))

    def forward(self, x):
        h = F.relu(conv_same(self.net[0], x))
        h = F.relu(conv_same(self.net[2], h))
        return x + conv_same(self.net[4], h)


class VQVAE(nn.Module):
    def __init__(self, shapes: dict[str, tuple]):
        """Built from the shapes of the npz's arrays: {name: shape}."""
        super().__init__()
        codebook = nn.Parameter(torch.empty(shapes["_vq_vae._embedding"]))
        self._vq_vae = nn.ParameterDict({"_embedding": codebook})
        encoder = {i: _conv(shapes[f"encoder.{i}.weight"]) for i in (*ENCODER_DOWN, ENCODER_OUT)}
        encoder |= {i: ResBlock(shapes, f"encoder.{i}") for i in ENCODER_RES}
        self.encoder = nn.Sequential(*(encoder.get(i, nn.ReLU()) for i in range(ENCODER_OUT + 1)))
        decoder = {i: _conv(shapes[f"decoder.{i}.weight"]) for i in (DECODER_IN, DECODER_OUT)}
        decoder |= {i: ResBlock(shapes, f"decoder.{i}") for i in DECODER_RES}
        for i in DECODER_UP:  # weights (in, out, k, k)
            in_channels, out_channels, k, _ = shapes[f"decoder.{i}.weight"]
            decoder[i] = nn.ConvTranspose2d(in_channels, out_channels, k, stride=2, padding=k - 3)
        self.decoder = nn.Sequential(*(decoder.get(i, nn.ReLU()) for i in range(DECODER_OUT + 1)))

    @classmethod
    def from_npz(cls, path) -> "VQVAE":
        """A VQ-VAE saved as vae-oid.npz is, strictly: a missing or mis-shaped array is an error
        naming it."""
        try:
            loaded = np.load(path)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ValueError(f"{path}: a single array (.npy), not an npz archive of the "
                                 "VQ-VAE's arrays")
            with loaded as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: not a readable npz file ({e})") from None
        except ValueError as e:
            raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: not a readable "
                             f"npz file ({e})") \
                from None
        try:
            model = cls({name: a.shape for name, a in arrays.items()})
        except KeyError as e:
            raise ValueError(f"{path} is not a PaliGemma mask VQ-VAE: it has no array "
                             f"{e.args[0]}") from None
        except (ValueError, TypeError) as e:  # e.g. a weight of too few dimensions
            raise ValueError(f"{path} is not a PaliGemma mask VQ-VAE: {e}") from None
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        # Quantizer state beside the codebook (statistics of its training) is not used to encode or
        # decode.
        quantizer = {n for n in arrays if n.startswith("_vq_vae.")}
        unexpected = sorted(set(arrays) - set(expected) - quantizer)
        wrong = [f"{name} {list(arrays[name].shape)} (expected {list(shape)})"
                 for name, shape in expected.items() if arrays[name].shape != shape]
        if unexpected or wrong:
            found = [("unexpected arrays", unexpected), ("wrong shapes", wrong)]
            raise ValueError(f"{path} does not match the VQ-VAE's architecture: "
                             + "; ".join(f"{what}: {', '.join(names)}" for what, names in found
                                         if names))
        model.load_state_dict({name: torch.from_numpy(np.asarray(arrays[name], np.float32))
                               for name in expected})
        return model.eval()

    @classmethod
    def from_pretrained(cls, path=None) -> "VQVAE":
        """A local npz file, or (None) big_vision's vae-oid.npz from the Hugging Face hub,
        cached."""
        if path is None:
            import huggingface_hub

            try:
                # snapshot_download fails at once offline; hf_hub_download retries for ~25 s, loudly
                folder = huggingface_hub.snapshot_download(HUB_FILE["repo_id"],
                                                           repo_type=HUB_FILE["repo_type"],
                                                           allow_patterns=[HUB_FILE["filename"]])
                path = Path(folder) / HUB_FILE["filename"]
            except Exception as e:  # network, missing file: the hub library raises many types
                raise OSError("vae-oid.npz could not be fetched from the Hugging Face hub "
                              f"({type(e).__name__}); "
                              "download it from there or from "
                              "gs://big_vision/paligemma/vae-oid.npz and pass its path") from None
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such VQ-VAE file")
        return cls.from_npz(path)

    def encoder_output(self, masks: torch.Tensor) -> torch.Tensor:
        """masks (B, 64, 64), float in [0, 1] -> the encoder's vectors (B, D, 4, 4), before
        quantization."""
        x = 2 * (masks[:, None].float() - 0.5)  # (B, 1, 64, 64) in [-1, 1]
        for i in ENCODER_DOWN:
            x = F.relu(conv_same(self.encoder[i], x, stride=2))  # 64 -> 32 -> 16 -> 8 -> 4
        for i in ENCODER_RES:
            x = self.encoder[i](x)
        return conv_same(self.encoder[ENCODER_OUT], x)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, 4, 4) -> (B, 16): the index of the nearest codebook row (squared L2) at each of
        the 4x4 positions, in row-major order."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B * 16, D)
        codebook = self._vq_vae._embedding  # (128, D)
        distances = (flat**2).sum(1, keepdim=True) + (codebook**2).sum(1) - 2 * flat @ codebook.T
        return distances.argmin(1).view(len(z), 16)

    def decoder_output(self, x: torch.Tensor) -> torch.Tensor:
        """Codebook vectors (B, D, 4, 4) -> mask logits (B, 64, 64)."""
        x = F.relu(conv_same(self.decoder[DECODER_IN], x))
        for i in DECODER_RES:
            x = self.decoder[i](x)
        for i in DECODER_UP:
            x = F.relu(self.decoder[i](x))  # 4 -> 8 -> 16 -> 32 -> 64
        return conv_same(self.decoder[DECODER_OUT], x)[:, 0]

    @torch.no_grad()
    def encode(self, masks) -> torch.Tensor:
        """masks (B, 64, 64), float in [0, 1] (a tensor or an array) -> codes (B, 16) int64, the 4x4
        grid in row-major order."""
        return self.nearest_codes(self.encoder_output(torch.as_tensor(masks)))

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """codes (B, 16) int64 (a tensor or an array) -> mask logits (B, 64, 64) float32: inside
        where > 0."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        rows = self._vq_vae._embedding[codes]  # (B, 16, D)
        return self.decoder_output(rows.view(len(codes), 4, 4, -1).permute(0, 3, 1, 2))
