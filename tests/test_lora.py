"""LoRA: our adapters are PEFT's (peft loads ours onto transformers' PaliGemma and we load peft's),
merging changes nothing, and train.py --trainable lora learns, resumes and merges."""

import json
import shutil

import peft  # a test dependency, like transformers: the product never imports it
import pytest
import torch
from safetensors.torch import load_file, save_file

import infer
from conftest import (PREFIXES, SUFFIXES, TOL, fresh_checkpoint, hf_model, make_dataset,
                      max_diff_on_tokens, random_images, stopped_then_resumed)
from checkpoint import save_adapter
from gemma import GemmaAttention, GemmaConfig, rope
from lora import MLP, LoRALinear, add_lora, load_adapter, merge_lora
from paligemma import PaliGemma
from processor import Processor


@pytest.fixture(scope="module", params=["mqa", "pg2-gqa"])
def base(request, workdir, tokenizer_model, sp_size):
    """A PaliGemma 1 and a PaliGemma 2 checkpoint."""
    return fresh_checkpoint(workdir, tokenizer_model, sp_size, request.param)


def inputs_of(folder):
    batch = Processor.from_pretrained(folder)(random_images(3), PREFIXES, SUFFIXES)
    return {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                  "token_type_ids")}, batch


def randomised(model):
    """Adapters that change the model (B is zero at initialisation), at a scale where float32
    rounding stays under TOL (at std 0.2 on rsLoRA MLP adapters, transformers + peft itself was
    1.2e-5 from a float64 run)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    return model


@torch.no_grad()
@pytest.mark.parametrize("options",
                         [dict(rank=4, alpha=8), dict(rank=2, alpha=3, targets=MLP, rslora=True)])
def test_peft_loads_our_adapter(base, options, tmp_path):
    ours = PaliGemma.from_pretrained(base)
    add_lora(ours, **options)
    save_adapter(tmp_path / "adapter", randomised(ours), str(base))
    inputs, batch = inputs_of(base)
    theirs = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "adapter").eval()
    a, b = ours(**inputs), theirs(**inputs, labels=batch["labels"]).logits
    diff = max_diff_on_tokens(a, b, batch["attention_mask"])
    base_diff = max_diff_on_tokens(a, hf_model(base)(**inputs, labels=batch["labels"]).logits,
                                   batch["attention_mask"])
    print(f"{base.name} {options}: ours vs transformers + peft {diff:.1e} (vs the base model: "
          f"{base_diff:.2f})")
    assert diff <= TOL and base_diff > 1e-2


def peft_adapter(base, folder, target_modules):
    """An adapter made by peft itself on transformers' PaliGemma, with random (non-zero) A and B."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                             init_lora_weights=False)
    model = peft.get_peft_model(hf_model(base), config)
    model.save_pretrained(folder)
    return model.eval()


@torch.no_grad()
def test_we_load_peft_adapters(base, tmp_path):
    inputs, batch = inputs_of(base)
    for name, targets in (("language model", r".*language_model.*\.(q_proj|v_proj|down_proj)"),
                          # a list adapts SigLIP too
                          ("both towers", ["q_proj", "k_proj", "v_proj", "o_proj"])):
        theirs = peft_adapter(base, tmp_path / name, targets)
        ours = PaliGemma.from_pretrained(base)
        load_adapter(ours, tmp_path / name)
        diff = max_diff_on_tokens(ours(**inputs), theirs(**inputs, labels=batch["labels"]).logits,
                                  batch["attention_mask"])
        print(f"{base.name}, peft adapter on the {name}: {diff:.1e}")
        assert diff <= TOL
    # the same adapter under transformers <= 4.51's names:
    # base_model.model.language_model.model.layers...
    old = shutil.copytree(tmp_path / "language model", tmp_path / "old")
    state = load_file(old / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.model.language_model.",
                         "base_model.model.language_model.model."): v
               for k, v in state.items()}, old / "adapter_model.safetensors")
    new, legacy = PaliGemma.from_pretrained(base), PaliGemma.from_pretrained(base)
    load_adapter(new, tmp_path / "language model")
    load_adapter(legacy, old)
    assert torch.equal(new(**inputs), legacy(**inputs))


def test_adapter_keys_must_match_layers(mqa_checkpoint, tmp_path):
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    add_lora(model, rank=2, alpha=2)
    save_adapter(tmp_path / "a", model, str(mqa_checkpoint))
    state = load_file(tmp_path / "a" / "adapter_model.safetensors")
    # 2 layers only
    extra = "base_model.model.model.language_model.layers.7.self_attn.q_proj.lora_A.weight"
    save_file(state | {extra: torch.zeros(2, 64)}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"1 tensor\(s\) match no linear layer of the model: .*layers\.7\.self_attn"):
        load_adapter(PaliGemma.from_pretrained(mqa_checkpoint), tmp_path / "a")
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file(state | {key: torch.zeros(3, 64)}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError,
                       match=r"q_proj\.lora_A has shape \[3, 64\], expected \[2, 64\] \(rank 2\)"):
        load_adapter(PaliGemma.from_pretrained(mqa_checkpoint), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora = True is not supported"):
        load_adapter(PaliGemma.from_pretrained(mqa_checkpoint), tmp_path / "a")


@torch.no_grad()
def test_merged_equals_unmerged_and_zero_b_equals_the_base(base):
    inputs, batch = inputs_of(base)
    reference = PaliGemma.from_pretrained(base)(**inputs)
    model = PaliGemma.from_pretrained(base)
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "o_proj", "up_proj"))
    assert torch.equal(model(**inputs), reference)  # B = 0: exactly the base model
    unmerged = randomised(model)(**inputs)
    merged = merge_lora(model)(**inputs)
    assert not any(".lora_" in name for name, _ in model.named_parameters())
    diff = max_diff_on_tokens(merged, unmerged, batch["attention_mask"])
    print(f"{base.name}: merged vs unmerged {diff:.1e}")
    assert diff <= TOL and max_diff_on_tokens(unmerged, reference, batch["attention_mask"]) > 1e-2


def test_train_lora_learns_resumes_and_merges(run_train, mqa_checkpoint, tmp_path, capsys,
                                              monkeypatch):
    handful = make_dataset(tmp_path / "data", 4, "handful.jsonl")
    args = ["--trainable", "lora", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,gate_proj",
            "--lr", "5e-2", "--steps", "30", "--eval-every", "0"]
    out = run_train(tmp_path / "o", *args, "--merge", data=handful)
    assert {f.name for f in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "train_state.pt", "metrics.jsonl", "merged",
                                               "README.md", "train.lock"}
    assert not (out / "merged" / "adapter_config.json").exists()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    print(f"LoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < losses[0] - 0.5  # a random base model: the adapters move it, slowly
    assert "trainable (lora)" in capsys.readouterr().out

    # The trained adapter changes the model; the merged folder equals it, in ours and in
    # transformers.
    inputs, batch = inputs_of(mqa_checkpoint)
    with torch.no_grad():
        adapted = PaliGemma.from_pretrained(mqa_checkpoint)
        load_adapter(adapted, out)
        ours = adapted(**inputs)
        base = PaliGemma.from_pretrained(mqa_checkpoint)(**inputs)
        assert max_diff_on_tokens(ours, base, batch["attention_mask"]) > 1e-2
        merged = PaliGemma.from_pretrained(out / "merged")(**inputs)
        theirs = hf_model(out / "merged")(**inputs, labels=batch["labels"]).logits
    assert max_diff_on_tokens(merged, ours, batch["attention_mask"]) <= TOL
    assert max_diff_on_tokens(theirs, ours, batch["attention_mask"]) <= TOL

    # Resumed after step 12, the adapter equals the uninterrupted run's.
    stopped_then_resumed(run_train, monkeypatch, tmp_path / "resumed", *args, step=12, data=handful)
    a, b = (load_file(f / "adapter_model.safetensors") for f in (out, tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # infer.py takes the adapter's folder as --model (its base is recorded in it), or --adapter.
    capsys.readouterr()
    for argv in (["--model", out], ["--model", mqa_checkpoint, "--adapter", out]):
        infer.main([str(x) for x in argv] + ["--image", str(handful.parent / "handful.jsonl-0.png"),
                                             "--prompt", "answer en what colour is it?",
                                             "--max-new-tokens", "3"])
    printed = capsys.readouterr()
    assert printed.out.count("\n") == 2 and printed.err.count("with the adapter") == 2

    # Resumed without repeating --trainable lora and its options: the run's own options, saved with
    # it.
    run_train(tmp_path / "resumed", "--resume", "--steps", "40", data=handful)
    assert torch.load(tmp_path / "resumed" / "train_state.pt")["step"] == 40
    assert "trainable (lora)" in capsys.readouterr().out


def test_lora_options_need_trainable_lora(run_train, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "o", "--lora-rank", "4", "--merge")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--lora-rank, --merge only with --trainable lora" in err


def test_adapters_under_autocast_keep_one_copy_of_their_input():
    """q/k/v's adapters read the same input: under autocast it is kept once for backward, not once
    per adapter (a float32 cast before autocast's own would make a new copy in each), with the same
    outputs."""
    cfg = GemmaConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      num_hidden_layers=1)
    torch.manual_seed(0)
    attention = GemmaAttention(cfg, 0).to(torch.bfloat16)
    add_lora(torch.nn.ModuleDict({"language_model": attention}), rank=4, alpha=8,
             targets=("q_proj", "k_proj", "v_proj"))
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    cos, sin = rope(torch.arange(5)[None], 32, 10000.0, torch.bfloat16)
    kept = set()

    def pack(t):
        if t.shape == (10, 64):  # the adapters' lora_A inputs, (B*T, D)
            kept.add(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(
        "cpu", dtype=torch.bfloat16):
        y = attention(x, cos, sin, None)
    assert len(kept) == 1
    # the old way: each adapter's input cast to float32 first, then to bfloat16 by autocast
    with torch.no_grad():
        for layer in (attention.q_proj, attention.k_proj, attention.v_proj):
            layer.forward = lambda x, layer=layer: LoRALinear.forward(layer, x.float()).to(x.dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(attention(x, cos, sin, None), y.detach())


def test_dropout_resumes_bit_for_bit(run_train, tmp_path, monkeypatch):
    """--lora-dropout draws from torch's random numbers: their state is saved with the train state,
    so a run stopped and resumed gives the uninterrupted run's adapter exactly (it differs from one
    without dropout: the draws matter)."""
    args = ["--trainable", "lora", "--lora-rank", "4", "--lr", "5e-2", "--steps", "6",
            "--eval-every", "0"]
    straight = run_train(tmp_path / "straight", *args, "--lora-dropout", "0.3")
    plain = run_train(tmp_path / "plain", *args)
    resumed = stopped_then_resumed(run_train, monkeypatch, tmp_path / "resumed", *args,
                                   "--lora-dropout", "0.3", step=3)
    a, b, c = (load_file(f / "adapter_model.safetensors") for f in (straight, resumed, plain))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    assert json.loads((straight / "adapter_config.json").read_text())["lora_dropout"] == 0.3


def test_merge_keeps_the_checkpoints_dtypes(run_train, mqa_checkpoint, tmp_path):
    """--merge with --dtype bfloat16: the merged checkpoint holds the source's float32 weights, the
    vision tower's exactly as they were, the merged layers W + s * B @ A computed in float32."""
    out = run_train(tmp_path / "o", "--trainable", "lora", "--lora-rank", "4", "--lr", "5e-2",
                    "--steps", "3", "--eval-every", "0", "--dtype", "bfloat16", "--merge")
    source = load_file(mqa_checkpoint / "model.safetensors")
    merged = load_file(out / "merged" / "model.safetensors")
    vision = [k for k in merged if "vision_tower" in k]
    assert vision and all(merged[k].dtype == torch.float32 for k in merged)
    assert all(torch.equal(merged[k],
                           source[k.replace("vision_model.", "")] if k not in source else source[k])
               for k in vision)
    adapter = load_file(out / "adapter_model.safetensors")
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    prefix = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * (16 / 4)
    assert torch.equal(merged[key], source[key] + delta)
