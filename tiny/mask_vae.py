"""Trains the tiny mask VQ-VAE in tiny/vae-tiny.npz, offline, on shape masks.

    python -m tiny.mask_vae          # about 2 minutes on 2 CPU cores (1500 steps of 32 masks)

big_vision's vae-oid.npz (the VQ-VAE that PaliGemma's <seg> tokens were made with) comes from the
hub, which these machines cannot reach. This trains one of the same architecture, narrower (codebook
128 x 32, 8 to 64 channels), on the masks of the shapes of tiny/shapes.py and of random polygons and
ellipses, each cut to its box and resized to 64x64 as processor.segment_tokens cuts a mask, and
saves it under vae-oid's array names, so that vqvae.VQVAE.from_npz loads it. The objective is the
VQ-VAE's (van den Oord et al., 2017): the masks' cross-entropy through a straight-through quantizer,
plus the codebook and commitment terms; codes that no mask uses are moved to encoder outputs now and
then.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from files import write_atomically
from cli import number
from tiny import shapes
from vqvae import VQVAE, architecture

# vae-oid's architecture, narrower: a codebook of 128 x 32, encoder channels 16..64, decoder
# channels 64..8
ARCHITECTURE = architecture(dim=32, encoder=(16, 32, 64, 64), decoder=(64, 32, 16, 8))


def random_mask(rng: np.random.Generator) -> np.ndarray:
    """One object's mask cut to its box and resized to 64x64, in [0, 1]: a shape of tiny/shapes.py,
    or a random polygon or ellipse, stretched, turned or cut by the image's edge."""
    canvas = Image.new("L", (128, 128))
    kind = rng.integers(3)
    if kind == 0:  # a shape as the dataset draws it
        if rng.random() < 0.3:
            w, h = (int(v) for v in rng.integers(16, 100, 2))
        else:
            w = h = int(rng.integers(16, 100))
        x, y = (int(v) for v in rng.integers(0, 128 - max(w, h), 2))
        points = shapes.outline(dict(
            shape=str(rng.choice(["circle", "square", "triangle", "star"])),
            box=(x, y, x + w, y + h)))
    else:  # a random polygon (kind 1) or ellipse (kind 2), turned
        n = int(rng.integers(3, 9)) if kind == 1 else 40
        angles = np.sort(rng.uniform(0, 2 * np.pi, n)) if kind == 1 else np.linspace(
            0, 2 * np.pi, n, endpoint=False)
        radii = rng.uniform(0.5, 1, n) if kind == 1 else np.ones(n)
        sx, sy, turn = rng.uniform(15, 60), rng.uniform(15, 60), rng.uniform(0, np.pi)
        px, py = radii * np.cos(angles) * sx, radii * np.sin(angles) * sy
        cx, cy = rng.uniform(20, 108, 2)  # near the edge, the object is cut
        points = list(zip(cx + px * np.cos(turn) - py * np.sin(turn),
                          cy + px * np.sin(turn) + py * np.cos(turn)))
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    mask = np.asarray(canvas)
    ys, xs = np.nonzero(mask)
    if len(xs) < 20:
        return random_mask(rng)
    crop = Image.fromarray(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    crop = crop.resize((64, 64), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32) / 255


def train(steps: int, batch_size: int, seed: int) -> VQVAE:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = VQVAE(ARCHITECTURE)
    codebook, dim = ARCHITECTURE["_vq_vae._embedding"]
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() == 4:
            torch.nn.init.kaiming_uniform_(p, nonlinearity="relu")
    # noqa: E731
    batch = lambda: torch.from_numpy(np.stack([random_mask(rng) for _ in range(batch_size)]))
    with torch.no_grad():  # the codebook starts at encoder outputs
        z = model.encoder_output(batch()).permute(0, 2, 3, 1).reshape(-1, dim)
        model._vq_vae._embedding.copy_(z[torch.randperm(len(z))[:codebook]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    used, start = torch.zeros(codebook), time.perf_counter()
    for step in range(1, steps + 1):
        masks = batch()
        z = model.encoder_output(masks)  # (B, D, 4, 4)
        codes = model.nearest_codes(z.detach())  # (B, 16)
        q = model._vq_vae._embedding[codes].view(len(z), 4, 4, -1).permute(0, 3, 1, 2)
        logits = model.decoder_output(z + (q - z).detach())  # straight through the quantizer
        loss = F.binary_cross_entropy_with_logits(logits, masks) + F.mse_loss(q, z.detach()) \
            + 0.25 * F.mse_loss(z, q.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        used += torch.bincount(codes.flatten(), minlength=codebook)
        if step % 200 == 0:
            with torch.no_grad():  # codes no mask used move to recent encoder outputs
                dead = (used == 0).nonzero().flatten()
                flat = z.detach().permute(0, 2, 3, 1).reshape(-1, dim)
                model._vq_vae._embedding[dead] = flat[torch.randint(len(flat), (len(dead),))]
                drawn, truth = logits > 0, masks > 0.5
                iou = ((drawn & truth).sum() / (drawn | truth).sum()).item()
            print(f"step {step}/{steps}: loss {loss.item():.4f}, mask IoU {iou:.3f}, {len(dead)} "
                  f"unused codes moved, {time.perf_counter() - start:.0f} s", flush=True)
            used.zero_()
    return model.eval()


def save_npz(path: Path, arrays: dict[str, np.ndarray]):
    with open(path, "wb") as f:  # a file, not a name: np.savez would add .npz to a temporary name
        np.savez(f, **arrays)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "vae-tiny.npz")
    p.add_argument("--steps", type=number(int, 1), default=1500)
    p.add_argument("--batch-size", type=number(int, 8), default=32,
                   help="masks per step (at least 8: the codebook starts as 128 of their 16 "
                   "vectors each)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.out.parent.is_dir() or args.out.is_dir():
        p.error(f"--out {args.out}: give a file name in an existing folder")
    model = train(args.steps, args.batch_size, args.seed)
    arrays = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    write_atomically(args.out, lambda tmp: save_npz(tmp, arrays))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
