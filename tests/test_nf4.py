"""nf4.py is bitsandbytes' NF4 (a test-only dependency, like peft): the same packed bytes and
statistics, the same dequantized weights; QLoRA equals transformers + bitsandbytes + peft in logits,
loss and adapter gradients; train.py --quantize nf4 trains, resumes, merges and saves what
transformers and peft load."""

import json

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import peft
import pytest
import torch
import transformers
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors.torch import load_file

import infer
from checkpoint import save_adapter
from conftest import (PREFIXES, SUFFIXES, TOL, hf_config, hf_model, make_checkpoint,
                      max_diff_on_tokens, random_images, stopped_then_resumed)
from lora import add_lora, load_adapter
from nf4 import NF4, NF4Linear, quantize
from paligemma import PaliGemma, SuffixLossSum, count_targets
from processor import Processor

# Every linear layer's input width a multiple of 64, the quantization block: bitsandbytes 0.50's CPU
# kernel dequantizes other widths wrongly (test_dequantized_weights_equal_bitsandbytes), which would
# fail parity for a reason that is not ours.
QLORA_CONFIGS = {
    "pg1": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=16),
                vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, image_size=28)),
    "pg2": dict(text=dict(model_type="gemma2", hidden_size=128, intermediate_size=192,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=32, query_pre_attn_scalar=16),
                vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, image_size=42)),
}


def bnb_quantize(w):
    return bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


@pytest.mark.parametrize("seed", range(12))
def test_same_bytes_and_statistics_as_bitsandbytes(seed):
    """Random shapes (partial blocks, odd counts, fewer than 256 blocks) and dtypes."""
    g = torch.Generator().manual_seed(seed)
    shape = (int(torch.randint(1, 3000, (), generator=g)),
             int(torch.randint(1, 700, (), generator=g)))
    dtype = (torch.float32, torch.bfloat16, torch.float16)[seed % 3]
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    codes, state = bnb_quantize(w)
    ours = quantize(w)
    assert torch.equal(ours["weight"], codes) and torch.equal(ours["absmax"], state.absmax)
    assert torch.equal(ours["nested_absmax"],
                       state.state2.absmax) and torch.equal(ours["offset"], state.offset)
    assert torch.equal(ours["quant_map"],
                       state.code) and torch.equal(ours["nested_quant_map"], state.state2.code)
    assert state.code.tolist() == list(torch.tensor(NF4).tolist())


def nf4_layer(w: torch.Tensor) -> NF4Linear:
    layer = NF4Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
    for name, t in quantize(w).items():
        getattr(layer, name).copy_(t)
    return layer


@pytest.mark.parametrize("shape", [(2048, 2048), (16384, 2048), (7, 9), (96, 352), (1152, 4304)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_weights_equal_bitsandbytes(shape, dtype):
    """Equal to bitsandbytes' reference dequantization (its PyTorch kernel) for every shape, and to
    its dequantize_4bit where rows hold whole blocks. bitsandbytes 0.50's CPU kernel differs from
    its own reference where they do not (measured: SigLIP's fc2, 1152 x 4304, off by up to 0.09 on
    weights of std 0.03), so there ours follows the reference."""
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.03).to(dtype)
    codes, state = bnb_quantize(w)
    ours = nf4_layer(w).dequantized()
    absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = _dequantize_4bit_compute(codes.reshape(-1), absmax, state.code, 64, shape, dtype)
    assert ours.dtype == dtype and torch.equal(ours, reference)
    if shape[1] % 64 == 0:
        assert torch.equal(ours, bnb_functional.dequantize_4bit(codes, state))
    # 4 bits: close, not equal
    assert (ours.float() - w.float()).abs().max() < 0.2 * w.float().abs().max()


def test_matmul_gradients_and_memory():
    """The input gets the gradient of x @ W.T with W dequantized; the layer keeps no dequantized
    weight."""
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    layer = nf4_layer(w)
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(y, x @ layer.dequantized().T)
    assert torch.allclose(x.grad, torch.ones(3, 256) @ layer.dequantized(), atol=1e-6)
    assert not any(p.requires_grad for p in layer.parameters())
    # 4.13 bits a weight, and the tables
    assert sum(t.nbytes for t in layer.buffers()) < 0.15 * w.nbytes


# ----------------------------------------------------------------------------------------------
# QLoRA against transformers + bitsandbytes + peft


@pytest.fixture(scope="module", params=sorted(QLORA_CONFIGS))
def qlora_checkpoint(request, workdir, tokenizer_model, sp_size):
    folder = workdir / f"qlora-{request.param}"
    if not folder.exists():
        cfg = QLORA_CONFIGS[request.param]
        make_checkpoint(folder, tokenizer_model, hf_config(sp_size, cfg["text"], cfg["vision"]))
    return folder


def transformers_4bit(folder):
    """transformers' PaliGemma with every linear layer in bitsandbytes' NF4 (double quantization,
    float32 compute), on bitsandbytes' generic path (the AVX512-BF16 one repacks weights; facts
    sheet 8.3)."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True,
                                             bnb_4bit_compute_dtype=torch.float32)
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        folder, quantization_config=config, device_map="cpu", dtype=torch.float32,
        attn_implementation="eager")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def ours_4bit_with_adapter(folder, adapter_folder):
    model = PaliGemma.from_pretrained(folder, quantize="nf4")
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    save_adapter(adapter_folder, model, str(folder))
    return model


def test_qlora_logits_equal_transformers_bitsandbytes_peft(qlora_checkpoint, tmp_path):
    ours = ours_4bit_with_adapter(qlora_checkpoint, tmp_path / "adapter")
    n_ours = sum(isinstance(m, NF4Linear) for m in ours.modules())
    hf = transformers_4bit(qlora_checkpoint)
    assert n_ours == sum(isinstance(m, bnb.nn.Linear4bit) for m in hf.modules()) > 0
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    batch = Processor.from_pretrained(qlora_checkpoint)(random_images(3), PREFIXES, SUFFIXES)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                    "token_type_ids")}
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs, labels=batch["labels"]).logits
        full = PaliGemma.from_pretrained(qlora_checkpoint)
        load_adapter(full, tmp_path / "adapter")
        unquantized = full(**inputs)
    diff = max_diff_on_tokens(a, b, batch["attention_mask"])
    print(f"{qlora_checkpoint.name}: {n_ours} NF4 layers; ours vs transformers + bitsandbytes + "
          f"peft {diff:.1e} (4 bits vs full precision: "
          f"{max_diff_on_tokens(a, unquantized, batch['attention_mask']):.2f})")
    assert diff <= TOL and max_diff_on_tokens(a, unquantized, batch["attention_mask"]) > 1e-3


def test_qlora_training_step_equals_peft(qlora_checkpoint, tmp_path):
    """One step's loss and every adapter gradient, ours and transformers + bitsandbytes + peft."""
    ours = ours_4bit_with_adapter(qlora_checkpoint, tmp_path / "adapter").train()
    theirs = peft.PeftModel.from_pretrained(transformers_4bit(qlora_checkpoint),
                                            tmp_path / "adapter", is_trainable=True).train()
    batch = Processor.from_pretrained(qlora_checkpoint)(random_images(3), PREFIXES, SUFFIXES)
    loss = SuffixLossSum(ours)(**batch) / count_targets(batch["labels"])
    loss.backward()
    their_loss = theirs(**batch).loss
    their_loss.backward()
    grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters()
             if p.requires_grad}
    worst = 0.0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            theirs_grad = grads["base_model.model.model." + name]
            worst = max(worst, (p.grad - theirs_grad).abs().max().item())
    print(f"{qlora_checkpoint.name}: loss {loss.item():.6f} vs {their_loss.item():.6f}, adapter "
          f"gradients {worst:.1e}")
    assert abs(loss.item() - their_loss.item()) <= TOL and worst <= TOL
    assert len(grads) == sum(p.requires_grad for p in ours.parameters()) > 0


# ----------------------------------------------------------------------------------------------
# train.py and infer.py --quantize nf4


def test_train_qlora_resumes_merges_and_peft_loads_it(run_train, mqa_checkpoint, tmp_path, capsys,
                                                      monkeypatch):

    args = ["--trainable", "lora", "--quantize", "nf4", "--lora-rank", "4", "--lr", "5e-2",
            "--steps", "6", "--eval-every", "0"]
    out = run_train(tmp_path / "o", *args, "--merge")
    printed = capsys.readouterr().out
    assert "weights as it stores them" in printed and "trainable (lora)" in printed
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    # Stopped after step 3 and resumed: the same adapter as the uninterrupted run.
    stopped_then_resumed(run_train, monkeypatch, tmp_path / "resumed", *args, step=3)
    a, b = (load_file(f / "adapter_model.safetensors") for f in (out, tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # peft loads the adapter onto the bfloat16 base, and it changes the model there too; the merged
    # folder (full-precision base + adapter) equals ours unmerged and loads in transformers.
    batch = Processor.from_pretrained(mqa_checkpoint)(random_images(3), PREFIXES, SUFFIXES)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                    "token_type_ids")}
    with torch.no_grad():
        base = transformers.PaliGemmaForConditionalGeneration.from_pretrained(mqa_checkpoint,
                                                                              dtype=torch.bfloat16)
        plain = base(**inputs, labels=batch["labels"]).logits.float()
        adapter = peft.PeftModel.from_pretrained(base, out).eval()
        adapted = adapter(**inputs, labels=batch["labels"]).logits.float()
        ours = PaliGemma.from_pretrained(mqa_checkpoint)
        load_adapter(ours, out)
        unmerged = ours(**inputs)
        merged = hf_model(out / "merged")(**inputs, labels=batch["labels"]).logits
    mask = batch["attention_mask"]
    assert max_diff_on_tokens(adapted, plain,
                              mask) > 1e-2 and max_diff_on_tokens(adapted, unmerged, mask) < 0.1
    assert max_diff_on_tokens(merged, unmerged, mask) <= TOL


def test_train_attention_on_a_4bit_base(run_train, mqa_checkpoint, tmp_path):
    """--trainable attn --quantize nf4: the decoder's q/k/v/o learn in float32, the rest is frozen
    in 4 bits; the checkpoint holds the source's own frozen weights, bit for bit, and the trained
    ones."""
    out = run_train(tmp_path / "o", "--quantize", "nf4", "--steps", "2", "--lr", "1e-2",
                    "--eval-every", "0")
    saved = load_file(out / "model.safetensors")
    source = load_file(mqa_checkpoint / "model.safetensors")
    source = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v
              for k, v in source.items()}
    attention = [k for k in saved if ".self_attn." in k and k.startswith("language_model.")]
    frozen_linears = [k for k in saved if k.endswith((
        "fc1.weight", "fc2.weight", "gate_proj.weight", "multi_modal_projector.linear.weight"))]
    assert attention and frozen_linears and saved.keys() == source.keys()
    assert all(torch.equal(saved[k], source[k]) for k in frozen_linears)
    assert all(not torch.equal(saved[k], source[k]) for k in attention)
    hf_model(out)  # transformers loads it
    run_train(out, "--quantize", "nf4", "--steps", "3", "--lr", "1e-2", "--eval-every", "0",
              "--resume")


def test_infer_in_4_bits(mqa_checkpoint, data, capsys):
    infer.main(["--model", str(mqa_checkpoint), "--image", str(data.parent / "train.jsonl-0.png"),
                "--prompt", "caption en", "--max-new-tokens", "3", "--quantize", "nf4"])
    printed = capsys.readouterr()
    assert "layers read in nf4 and dequantized once" in printed.err and printed.out.count("\n") == 1


@pytest.mark.parametrize("extra", [["--trainable", "all"], ["--trainable", "llm"], ["--fsdp"]])
def test_quantize_refuses_what_it_cannot_do(extra, run_train, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "o", "--quantize", "nf4", *extra)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--quantize keeps frozen weights in 4 bits" in err
