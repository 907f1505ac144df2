"""int8 and int4 weights for decoding (int8.py, int4.py, quantize.py): the quantization as
specified, the kernels' products against the dequantized weights, the layers each format takes (and
where a width does not fit), the quantized copy of the tied output head, saving, infer.py; and the
CUDA paths that can be checked on a CPU (SDPA's key/value expansion, the KV-cache's static
addresses)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import gemma
import int4
import int8
from conftest import fresh_checkpoint, random_images
from gemma import KVCache
from paligemma import PaliGemma
from processor import Processor
from quantize import describe

ROOT = Path(__file__).resolve().parent.parent


def test_int8_is_symmetric_per_output_channel():
    w = torch.randn(48, 64) * torch.linspace(0.1, 3, 48)[:, None]
    q = int8.quantize(w)
    scales = q["scales"].float()  # in bfloat16, as the kernel takes them
    assert q["weight"].dtype == torch.int8 and torch.allclose(scales, w.abs().amax(1) / 127,
                                                              rtol=2**-8)
    error = (q["weight"].float() * scales[:, None] - w).abs()
    assert (error <= scales[:, None] / 2 + 1e-6).all()  # rounding to the nearest step
    # each row's largest weight takes the extreme code
    assert (q["weight"].abs().amax(1) == 127).all()


def test_int4_is_asymmetric_in_groups():
    w = torch.randn(32, 256)
    codes, scales_and_zeros = int4.quantize(w, 64)
    assert codes.min() >= 0 and codes.max() <= 15 and scales_and_zeros.shape == (4, 32, 2)
    # (out, groups)
    scales, zeros = scales_and_zeros[..., 0].float().T, scales_and_zeros[..., 1].float().T
    dequantized = (codes.reshape(32, 4, 64).float() - 8) * scales[..., None] + zeros[..., None]
    groups = w.reshape(32, 4, 64)
    # the minimum is exact but for the bfloat16 rounding of the step and the zero
    assert ((dequantized.amin(-1) - groups.amin(-1)).abs() <= 0.02 * scales).all()
    # within half a step, the step and the zero being rounded to bfloat16 as the kernel reads them
    bound = scales[..., None] * 0.51 + 2**-8 * groups.abs().amax(-1, True)
    assert ((dequantized - groups).abs() <= bound).all()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_the_kernels_compute_the_dequantized_product(kind):
    """The layer's product is x (as bfloat16) times its dequantized weight, within bfloat16's
    rounding."""
    torch.manual_seed(0)
    w, x = torch.randn(96, 256) * 0.05, torch.randn(3, 5, 256)
    if kind == "int8":
        layer = int8.Int8Linear(256, 96, False, torch.float32)
        for key, value in int8.Int8Linear.state("w.weight", w).items():
            setattr(layer, key.rpartition(".")[2], value)
        dequantized = layer.dequantized()
    else:
        layer = int4.Int4Linear(256, 96, False, torch.float32)
        for key, value in int4.Int4Linear.state("w.weight", w).items():
            setattr(layer, key.rpartition(".")[2], value)
        codes, sz = int4.quantize(w, 128)
        sz = sz.float()
        dequantized = ((codes.reshape(96, 2, 128).float() - 8) * sz[..., 0].T[..., None]
                       + sz[..., 1].T[..., None]).reshape(96, 256)
    expected = F.linear(x.to(torch.bfloat16).float(), dequantized.float())
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == (3, 5, 96)
    assert (got - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_loading_in_a_format(kind, mqa_checkpoint):
    """The decoder's linear layers and a quantized copy of the output head; the vision tower, the
    projector and the embedding as they were; logits near float32's; greedy generation runs."""
    model = PaliGemma.from_pretrained(mqa_checkpoint, quantize=kind)
    reference = PaliGemma.from_pretrained(mqa_checkpoint)
    layers = 7 * len(model.language_model.layers) + 1  # q/k/v/o, gate/up/down, and the head
    assert f"{kind}: {layers} layers" in describe(model) and model.language_model.head.name == kind
    assert torch.equal(model.language_model.embed_tokens.weight,
                       reference.language_model.embed_tokens.weight)
    assert not any("head." in k for k in model.state_dict())  # the head's copy is not saved
    batch = Processor.from_pretrained(mqa_checkpoint)(random_images(2), ["caption en", "detect "
                                                                         "square"])
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
        theirs = reference(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    diff = (ours - theirs).abs()
    print(f"{kind}: logits against float32, max {diff.max():.3g}, mean {diff.mean():.3g}")
    # random weights: 4 bits' worst
    assert diff.mean() < {"int8": 0.02, "int4": 0.2}[kind] * theirs.abs().mean()
    new = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                         max_new_tokens=4)
    assert new.shape[0] == 2


def test_a_width_int4_cannot_take_stays_int8(workdir, tokenizer_model, sp_size):
    """The gqa test model's hidden size, 48, divides into no int4 group (32 to 256): its layers that
    read it fall back to int8; those reading the MLP's 96 take int4."""
    folder = fresh_checkpoint(workdir, tokenizer_model, sp_size, "gqa")
    model = PaliGemma.from_pretrained(folder, quantize="int4")
    kinds = {name: m.name for name, m in model.named_modules() if hasattr(m, "name") and name}
    assert kinds["language_model.layers.0.self_attn.q_proj"] == "int8"
    assert kinds["language_model.layers.0.mlp.down_proj"] == "int4"
    assert "int4: " in describe(model) and "int8: " in describe(model)


def test_saving_a_quantized_run_writes_the_source_weights(run_train, mqa_checkpoint, tmp_path):
    """A checkpoint of a run on an NF4 base holds the source's full-precision frozen weights
    (quantize.QUANTIZED names the layers whose weights come from the source)."""
    out = run_train(tmp_path / "o", "--quantize", "nf4", "--steps", "1", "--eval-every", "0")
    saved = load_file(out / "model.safetensors")
    source = load_file(mqa_checkpoint / "model.safetensors")
    key = "language_model.model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(saved[key], source[key])


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_infer_in_a_format(kind, mqa_checkpoint, tmp_path):
    random_images(1)[0].save(tmp_path / "a.png")
    r = subprocess.run([sys.executable, ROOT / "infer.py", "--model", mqa_checkpoint, "--image",
                        tmp_path / "a.png", "--prompt", "caption en", "--max-new-tokens", "4",
                        "--quantize", kind],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{kind}: " in r.stderr and r.stdout.count("\n") == 1, r.stderr


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_expanded_keys_and_values_give_the_same_attention(kv_heads):
    """gemma.attention on CUDA with a mask expands the key/value heads (SDPA's memory-efficient
    kernel then takes the mask): the same outputs; with one key/value head, a view of the same
    memory."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 5,
                          16), torch.randn(2, kv_heads, 7, 16), torch.randn(2, kv_heads, 7, 16)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True
    grouped, expanded = (gemma.attention(q, k, v, mask, 0.25, expand=e) for e in (False, True))
    assert torch.allclose(grouped, expanded, atol=1e-6)
    if kv_heads == 1:
        assert k.expand(-1, 8, -1, -1).data_ptr() == k.data_ptr()


def test_the_kv_cache_has_static_addresses(mqa_checkpoint):
    """CUDA graphs (torch.compile mode="reduce-overhead") skip a graph whose inputs are written in
    place unless their addresses are marked static, as transformers' static cache marks them."""
    config = PaliGemma.from_pretrained(mqa_checkpoint).config.text_config
    cache = KVCache(config, 2, 16, torch.float32, "cpu")
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in cache.k + cache.v)
