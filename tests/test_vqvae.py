"""vqvae.py against an independent reference in JAX/flax (test-only), defined as big_vision defines
it: the decoder with flax's ConvTranspose(padding=2, transpose_kernel=True), the encoder with
TensorFlow-style 'SAME' convolutions (jax.lax.conv_general_dilated)."""

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vqvae import VQVAE, architecture

jax.config.update("jax_platforms", "cpu")


def vae_npz(path, down_kernel: int = 4, codebook_dim: int = 512, seed: int = 0):
    """Random arrays under vae-oid.npz's names and shapes, the encoder's stride-2 kernels
    `down_kernel` wide (an odd one pads unevenly under 'SAME')."""
    rng = np.random.default_rng(seed)
    shapes = architecture(dim=codebook_dim, down_kernel=down_kernel)
    def scale(shape):
        return np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 10)
    arrays = {name: (rng.normal(0, 1, shape) / scale(shape)).astype(np.float32)
              for name, shape in shapes.items()}
    np.savez(path, **arrays)
    return arrays


# ----------------------------------------------------------------------------------------------
# The reference, in JAX: NHWC, kernels in HWIO (torch's OIHW transposed), as big_vision converts
# them


def hwio(w):
    return jnp.asarray(np.transpose(w, (2, 3, 1, 0)))


class FlaxResBlock(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        h = fnn.relu(fnn.Conv(x.shape[-1], (3, 3), padding=1, name="c0")(x))
        h = fnn.relu(fnn.Conv(x.shape[-1], (3, 3), padding=1, name="c1")(h))
        return x + fnn.Conv(x.shape[-1], (1, 1), padding=0, name="c2")(h)


class FlaxDecoder(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        x = fnn.relu(fnn.Conv(128, (1, 1), padding=0, name="conv_in")(x))
        x = FlaxResBlock(name="res0")(x)
        x = FlaxResBlock(name="res1")(x)
        for i, features in enumerate((128, 64, 32, 16)):
            x = fnn.relu(fnn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=2,
                                           transpose_kernel=True, name=f"up{i}")(x))
        return fnn.Conv(1, (1, 1), padding=0, name="conv_out")(x)


def flax_params(a):
    # noqa: E731
    conv = lambda name: {"kernel": hwio(a[f"{name}.weight"]),
                         "bias": jnp.asarray(a[f"{name}.bias"])}
    # noqa: E731
    res = lambda name: {f"c{j}": conv(f"{name}.net.{k}") for j, k in enumerate((0, 2, 4))}
    return {"conv_in": conv("decoder.0"), "res0": res("decoder.2"), "res1": res("decoder.3"),
            **{f"up{j}": conv(f"decoder.{i}") for j, i in enumerate((4, 6, 8, 10))},
            "conv_out": conv("decoder.12")}


def reference_decode(a, codes):
    x = jnp.asarray(a["_vq_vae._embedding"])[codes].reshape(len(codes), 4, 4, -1)
    return np.asarray(FlaxDecoder().apply({"params": flax_params(a)}, x))[..., 0]


def same_conv(a, name, x, stride=1):
    y = jax.lax.conv_general_dilated(x, hwio(a[f"{name}.weight"]), (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + a[f"{name}.bias"]


def reference_encode(a, masks):
    x = 2.0 * (jnp.asarray(masks)[..., None] - 0.5)
    for i in (0, 2, 4, 6):
        x = jax.nn.relu(same_conv(a, f"encoder.{i}", x, 2))
    for i in (8, 9):
        h = jax.nn.relu(same_conv(a, f"encoder.{i}.net.0", x))
        h = jax.nn.relu(same_conv(a, f"encoder.{i}.net.2", h))
        x = x + same_conv(a, f"encoder.{i}.net.4", h)
    z = same_conv(a, "encoder.10", x).reshape(-1, a["_vq_vae._embedding"].shape[1])
    e = a["_vq_vae._embedding"]
    distances = (z**2).sum(1, keepdims=True) + (e**2).sum(1) - 2 * z @ e.T
    return np.asarray(jnp.argmin(distances, axis=1)).reshape(-1, 16), np.asarray(z)


def random_masks(n, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    masks = []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, 54, 2).tolist() + [rng.uniform(6, 30)]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
        masks.append(disc * rng.uniform(0.5, 1))
    return np.stack(masks)


@pytest.mark.parametrize("down_kernel", [4, 3])
def test_decode_and_encode_equal_the_jax_reference(down_kernel, tmp_path):
    arrays = vae_npz(tmp_path / "vae.npz", down_kernel)
    vae = VQVAE.from_npz(tmp_path / "vae.npz")
    codes = np.random.default_rng(1).integers(0, 128, (5, 16))
    with torch.no_grad():
        ours = vae.decode(torch.from_numpy(codes)).numpy()
    theirs = reference_decode(arrays, codes)
    print(f"decode: max |difference| {np.abs(ours - theirs).max():.1e} (values up to "
          f"{np.abs(theirs).max():.1f})")
    assert ours.shape == (5, 64, 64) and np.abs(ours - theirs).max() <= 1e-4

    masks = random_masks(6)
    with torch.no_grad():
        z = vae.encoder_output(torch.from_numpy(masks))
        ours = vae.encode(torch.from_numpy(masks)).numpy()
    theirs, z_ref = reference_encode(arrays, masks)
    diff = np.abs(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy() - z_ref).max()
    print(f"encode ({down_kernel}x{down_kernel} stride-2 kernels): encoder output max |difference| "
          f"{diff:.1e}")
    assert diff <= 1e-4 and ours.dtype == np.int64 and np.array_equal(ours, theirs)


def test_strict_loading_names_what_is_wrong(tmp_path):
    arrays = vae_npz(tmp_path / "vae.npz")
    np.savez(tmp_path / "missing.npz",
             **{k: v for k, v in arrays.items() if k != "decoder.6.weight"})
    with pytest.raises(ValueError, match="has no array decoder.6.weight"):
        VQVAE.from_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "extra.npz", **arrays, **{"decoder.99.weight": np.zeros(3)})
    with pytest.raises(ValueError, match=r"unexpected arrays: decoder\.99\.weight"):
        VQVAE.from_npz(tmp_path / "extra.npz")
    np.savez(tmp_path / "shape.npz", **arrays | {"decoder.0.bias": np.zeros(7, np.float32)})
    with pytest.raises(ValueError,
                       match=r"wrong shapes: decoder\.0\.bias \[7\] \(expected \[128\]\)"):
        VQVAE.from_npz(tmp_path / "shape.npz")
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(ValueError, match="not a readable npz file"):
        VQVAE.from_npz(tmp_path / "text.npz")
    with pytest.raises(FileNotFoundError, match="no such VQ-VAE file"):
        VQVAE.from_pretrained(tmp_path / "nope.npz")


def test_tiny_vae_round_trip():
    """The committed tiny VQ-VAE (tiny/mask_vae.py) on masks of the kind it was trained on:
    decode(encode(mask)) gives the mask back, and encode(decode(codes)) codes that decode to the
    same mask (not always the same codes: several codebook rows draw alike)."""
    from pathlib import Path

    from tiny import mask_vae

    vae = VQVAE.from_npz(Path(__file__).resolve().parent.parent / "tiny" / "vae-tiny.npz")
    masks = torch.from_numpy(np.stack([mask_vae.random_mask(np.random.default_rng(i))
                                       for i in range(64)]))
    iou = lambda a, b: ((a & b).sum((1, 2)) / (a | b).sum((1, 2)))  # noqa: E731
    with torch.no_grad():
        codes = vae.encode(masks)
        decoded = vae.decode(codes) > 0
        again = vae.encode(decoded.float())
        redrawn = vae.decode(again) > 0
    ious, same = iou(decoded, masks > 0.5), iou(redrawn, decoded)
    print(f"tiny VQ-VAE: mask IoU after a round trip {ious.mean():.3f} (worst {ious.min():.3f}); "
          f"encode(decode(codes)): {(again == codes).float().mean():.0%} the same codes, mask IoU "
          f"{same.mean():.3f}")
    assert ious.mean() > 0.9 and same.mean() > 0.95
