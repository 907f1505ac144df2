"""train.py: attention-only fine-tuning, the loss, checkpoints, resume, bad data, torchrun."""

import functools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import answers
import train
from conftest import hf_model, hf_processor, make_dataset, random_images
from paligemma import PaliGemma, SuffixLossSum, count_targets
from data import default_val_file, read_jsonl
from processor import Processor, load_image

ROOT = Path(__file__).resolve().parent.parent


def state(folder) -> dict[str, torch.Tensor]:
    return PaliGemma.from_pretrained(folder).state_dict()


def is_attention(name: str) -> bool:
    return name.startswith("language_model.layers.") and any(f".self_attn.{p}_proj." in name
                                                             for p in "qkvo")


def test_attention_only_changes_exactly_qkvo(run_train, mqa_checkpoint, tmp_path, capsys):
    out = run_train(tmp_path / "o", "--steps", "1", "--lr", "1e-3")
    before, after = state(mqa_checkpoint), state(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if is_attention(k)}
    n_attention = sum(v.numel() for k, v in before.items() if is_attention(k))
    assert f"{n_attention:,} trainable (attn)" in capsys.readouterr().out


def test_loss_equals_transformers_and_target_only_logits(mqa_checkpoint):
    prefixes = ["answer en what colour is it?", "caption en", "detect square"]
    suffixes = ["red", "a green thing on a table", "<loc0100><loc0200><loc0700><loc0900> square"]
    batch = hf_processor(mqa_checkpoint)(images=random_images(3), text=prefixes, suffix=suffixes,
                                         padding="longest", return_tensors="pt")
    ours = Processor.from_pretrained(mqa_checkpoint)(random_images(3), prefixes, suffixes)
    assert torch.equal(ours["labels"], batch["labels"])
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids",
                                    "labels")}
    with torch.no_grad():
        loss = SuffixLossSum(model)(**inputs) / count_targets(batch["labels"])
        theirs = hf_model(mqa_checkpoint)(**inputs).loss
        logits = model(*(inputs[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                             "token_type_ids")))
        full = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
    print(f"loss: ours {loss.item():.7f}, transformers {theirs.item():.7f}, full logits "
          f"{full.item():.7f}")
    assert abs(loss - theirs) < 1e-5 and abs(loss - full) < 1e-6


def test_tiny_model_overfits(run_train, tmp_path):
    handful = make_dataset(tmp_path, 4, "handful.jsonl")
    out = run_train(tmp_path / "o", "--steps", "50", "--lr", "1e-2", "--trainable", "all",
                    "--eval-every", "0", data=handful)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; final eval {metrics[-1]}")
    assert losses[-1] < 0.3 < losses[0]


def test_checkpoint_loads_in_ours_and_transformers(run_train, tmp_path):
    out = run_train(tmp_path / "o", "--steps", "2", "--lr", "1e-2")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.model").exists()
    batch = Processor.from_pretrained(out)(random_images(2), ["caption en", "detect square"],
                                           ["a", "b"])
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                    "token_type_ids")}
    with torch.no_grad():
        ours = PaliGemma.from_pretrained(out)(**inputs)
        theirs = hf_model(out)(**inputs, labels=batch["labels"]).logits
    assert (ours - theirs)[batch["attention_mask"].bool()].abs().max() < 1e-5


def test_resume_equals_uninterrupted(run_train, tmp_path, monkeypatch):
    straight = run_train(tmp_path / "straight", "--steps", "6", "--lr", "1e-2", "--eval-every", "0")

    def log_then_interrupt(*args, **kwargs):  # as if Ctrl-C came during step 3
        if str(args[0]).startswith("step 3/"):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train, "log", log_then_interrupt)
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "resumed", "--steps", "6", "--lr", "1e-2", "--eval-every", "0")
    assert e.value.code == 130  # stopped, not finished
    assert torch.load(tmp_path / "resumed" / "train_state.pt")["step"] == 3
    run_train(tmp_path / "resumed", "--steps", "6", "--lr", "1e-2", "--eval-every", "0", "--resume")
    a, b = state(straight), state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_before_saving(run_train, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "o", "--steps", "3", "--lr", "1e30", "--optimizer", "sgd", "--clip",
                  "0")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "nothing saved" in err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_torchrun_two_processes_equal_one(mqa_checkpoint, data, tmp_path):
    # SGD: Adam would amplify the last-bit differences of summing the batch in another order
    common = ["--data", data, "--model", mqa_checkpoint, "--steps", "3", "--optimizer", "sgd",
              "--lr", "0.5", "--device", "cpu", "--eval-every", "0"]
    one = [sys.executable, ROOT / "train.py", *common, "--batch-size", "4", "--out",
           tmp_path / "one"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", ROOT / "train.py",
           *common, "--batch-size", "2", "--out", tmp_path / "two"]
    for cmd in (one, two):
        r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and r.stdout.count("step 3/3") == 1  # only rank 0 logs
    a, b = state(tmp_path / "one"), state(tmp_path / "two")
    q = "language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], state(mqa_checkpoint)[q])
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_evaluation_answers_the_prompt_alone(mqa_checkpoint, data, monkeypatch):
    """Generation-based metrics must see the prompt only, never the answer they score."""
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    processor = Processor.from_pretrained(mqa_checkpoint)
    examples = read_jsonl(data.parent / "valid.jsonl", skip_bad=False)[:4]
    seen = []
    generate = model.generate
    monkeypatch.setattr(
        model, "generate",
        lambda input_ids, *a, **k: seen.append(input_ids) or generate(input_ids, *a, **k))

    metrics, shown = answers.evaluate(model, processor, examples, batch_size=4, max_len=16,
                                      max_new_tokens=16, device=torch.device("cpu"),
                                      autocast=torch.autocast("cpu", enabled=False))
    prompts = processor([load_image(e["image"]) for e in examples], [e["prefix"] for e in examples])
    assert len(seen) == 1 and torch.equal(seen[0], prompts["input_ids"])
    assert set(metrics) == {"val_loss", "answers_at_token_limit", "answer/vqa_accuracy",
                            "answer/anls", "answer/examples", "detect/map50", "detect/map50_95",
                            "detect/ap50_95", "detect/repeated_boxes", "detect/malformed_answers",
                            "detect/labels_not_in_prompt", "detect/repeated_objects",
                            "detect/examples", "repeated_objects_cut"} and len(shown) == 4


def test_default_validation_file(tmp_path):
    for train_name, val_name in (("_annotations.train.jsonl", "_annotations.valid.jsonl"),
                                 ("train.jsonl", "valid.jsonl"),
                                 ("train/annotations.jsonl", "valid/annotations.jsonl")):
        folder = tmp_path / train_name.replace("/", "_")
        for name in (train_name, val_name):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text("")
        assert default_val_file(folder / train_name) == folder / val_name
    assert default_val_file(tmp_path / "alone" / "train.jsonl") is None


def test_float16_scales_the_loss_and_resumes(run_train, tmp_path):
    """--dtype float16 (GPUs without bfloat16): trains with a loss scale, saved for --resume."""
    out = run_train(tmp_path / "o", "--steps", "2", "--lr", "1e-2", "--dtype", "float16",
                    "--eval-every", "0")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert torch.load(out / "train_state.pt")["scaler"]["scale"] > 1
    run_train(out, "--steps", "3", "--lr", "1e-2", "--dtype", "float16", "--eval-every", "0",
              "--resume")
    assert torch.load(out / "train_state.pt")["step"] == 3


def test_float16_overflow_skips_the_step(run_train, mqa_checkpoint, tmp_path, monkeypatch, capsys):
    """A loss scale too high for float16 overflows the gradients: the step is skipped, nothing
    breaks."""
    monkeypatch.setattr(torch.amp, "GradScaler",
                        functools.partial(torch.amp.GradScaler, init_scale=2.0**60))
    out = run_train(tmp_path / "o", "--steps", "2", "--lr", "1e-2", "--dtype", "float16",
                    "--eval-every", "0")
    assert capsys.readouterr().out.count("gradients overflowed") == 2
    a, b = state(mqa_checkpoint), state(out)
    # Both steps skipped: the attention weights (trained in float32) are still the checkpoint's,
    # unrounded.
    assert all(torch.equal(a[k], b[k]) for k in a if is_attention(k))


def test_every_option_has_one_resume_policy():
    """Each of train.py's options is in exactly one of the lists that say what --resume does with
    it."""
    options = {a.dest for a in train.options()._actions if a.dest != "help"}
    lists = (train.RESUME_MUST_MATCH, train.RESUME_MAY_CHANGE, train.RESUME_NOT_KEPT)
    assert {name: sum(name in listed for listed in lists) for name in options} == dict.fromkeys(
        options, 1)
    assert set().union(*lists) == options


def test_grad_checkpointing_gives_the_same_step(mqa_checkpoint, run_train, tmp_path):
    """Decoder layers recomputed in backward: the same loss and gradients as without, and so the
    same weights after a step of train.py."""
    from run import training_module
    batch = Processor.from_pretrained(mqa_checkpoint)(
        random_images(3), ["caption en", "detect square", "ocr"],
        ["a red circle", "<loc0100><loc0200><loc0700><loc0900> square", "12"])
    results = []
    for checkpointing in (False, True):
        model = PaliGemma.from_pretrained(mqa_checkpoint).train()
        module = training_module(SuffixLossSum(model), checkpointing, ddp=False, compile=False)
        loss = module(**batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    worst = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    print(f"--grad-checkpointing: loss {loss_a:.7f} vs {loss_b:.7f}, gradients at most {worst:.1e} "
          "apart")
    assert abs(loss_a - loss_b) <= 1e-6 and worst <= 1e-6
    plain = run_train(tmp_path / "plain", "--steps", "1", "--lr", "1e-2", "--eval-every", "0")
    checkpointed = run_train(tmp_path / "ckpt", "--steps", "1", "--lr", "1e-2", "--eval-every", "0",
                             "--grad-checkpointing")
    a, b = state(plain), state(checkpointed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
