"""Runs that can be watched and shared: TensorBoard and W&B (read back with their own readers)
across a --resume, metrics.png, the model card (which transformers and peft ignore), and
--push-to-hub."""

import glob
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import peft
import pytest
import transformers
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

import report
from conftest import hf_model

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, run) -> str:
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_tensorboard_scalars_and_picture_across_a_resume(run_train, tmp_path):
    out = run_train(tmp_path / "o", "--steps", "2", "--eval-every", "1", "--tensorboard")
    run_train(out, "--steps", "4", "--eval-every", "1", "--tensorboard", "--resume")
    events = EventAccumulator(str(out / "tensorboard"),
                              size_guidance={"scalars": 0, "images": 0}).Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_loss")] == [0, 1, 2, 3, 4]
    for name in ("lr", "grad_norm", "tokens_per_second", "detect/map50", "detect/map50_95",
                 "answer/vqa_accuracy", "detect/repeated_boxes"):
        assert name in events.Tags()["scalars"], name
    assert any(tag.startswith("detect/AP@50:95/") for tag in events.Tags()["scalars"])
    assert [e.step for e in events.Images("evaluation")] == [0, 1, 2, 3, 4]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses)


def wandb_history(run_file) -> list[dict]:
    """The history records of an offline run's .wandb file: LevelDB's log format (32 KiB blocks of
    records with a 7-byte header) after W&B's 7-byte file header, each record one of wandb's own
    protobufs."""
    data, records, pending, position = open(run_file, "rb").read(), [], b"", 7
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or its last part
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                records.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                for i in record.history.item})
            pending = b""
    return records


def test_wandb_offline_and_its_run_resumed(run_train, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = run_train(tmp_path / "o", "--steps", "2", "--eval-every", "2", "--wandb", "nano-test")
    run_id = torch.load(out / "train_state.pt")["wandb_id"]
    run_train(out, "--steps", "3", "--eval-every", "0", "--wandb", "nano-test", "--resume")
    files = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    # one run, resumed
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    history = [h for f in files for h in wandb_history(f)]
    assert [h["_step"] for h in history if "loss" in h] == [1, 2, 3]
    evaluations = [h for h in history if "val_loss" in h]
    assert [h["_step"] for h in evaluations] == [0, 2, 3]
    assert all("detect/map50" in h for h in evaluations)


def test_metrics_png_and_the_plot_command(run_train, tmp_path, capsys, monkeypatch):
    out = run_train(tmp_path / "o", "--steps", "2", "--eval-every", "1")
    with Image.open(out / "metrics.png") as png:
        assert png.format == "PNG"
        width = png.width
    # loss, val_loss, answer/vqa_accuracy, answer/anls, detect/map50, detect/map50_95,
    # detect/repeated_boxes, detect/malformed_answers: 8 panels of 320 px
    assert report.plot_metrics(out / "metrics.jsonl",
                               tmp_path / "again.png") == 8 and width == 8 * 320
    (out / "metrics.png").unlink()
    report.main([str(out)])
    assert "8 panels" in capsys.readouterr().out and (out / "metrics.png").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    run_train(tmp_path / "p", "--steps", "2", "--eval-every", "1")
    assert capsys.readouterr().out.count("metrics.png is not drawn: pip install matplotlib") == 1


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_model_card_and_the_loaders(run_train, mqa_checkpoint, tmp_path):
    out = run_train(tmp_path / "full", "--steps", "2", "--eval-every", "2")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    # a local folder
    assert meta["license"] == "gemma" and "paligemma" in meta["tags"] and "base_model" not in meta
    assert "## Scores at step 2" in card and "| detect/map50 |" in card
    assert "- 2 steps of 4 examples" in card
    hf_model(out)  # transformers loads the folder, README.md and all
    lora = run_train(tmp_path / "lora", "--steps", "1", "--trainable", "lora", "--lora-rank", "2")
    meta = front_matter((lora / "README.md").read_text())
    assert meta["library_name"] == "peft" and "lora" in meta["tags"]
    assert "PeftModel.from_pretrained" in (lora / "README.md").read_text()
    peft.PeftModel.from_pretrained(
        transformers.PaliGemmaForConditionalGeneration.from_pretrained(mqa_checkpoint), lora)
    card = report.model_card("google/paligemma-3b-pt-224", True, dict(
        name="o", trainable="lora", lora=(8, 16.0,
                                          ("q_proj",)), quantize="nf4", steps=3, batch=8, lr=1e-4,
        data={"train.jsonl": 10}), None)
    meta = front_matter(card)
    assert meta["base_model"] == "google/paligemma-3b-pt-224" and "qlora" in meta["tags"]


def test_push_to_hub(run_train, tmp_path, monkeypatch, capsys):
    sent = {}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: sent.setdefault("created", (repo_id, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda **kw: sent.setdefault("uploaded", kw))
    out = run_train(tmp_path / "o", "--steps", "2", "--eval-every", "2", "--push-to-hub",
                    "me/tiny-ft", "--hub-private", "--tensorboard")
    assert sent["created"] == ("me/tiny-ft", dict(private=True, exist_ok=True))
    uploaded = sent["uploaded"]
    assert uploaded["repo_id"] == "me/tiny-ft" and uploaded["folder_path"] == str(out)
    files = set(uploaded["allow_patterns"])
    assert {"config.json", "model.safetensors", "tokenizer.model", "README.md", "metrics.jsonl",
            "metrics.png",
            "eval/step-2.jpg"} <= files and any(f.startswith("tensorboard/") for f in files)
    assert not any(f.startswith(("train_state", "optimizer-step", ".")) for f in files)
    assert "pushed" in capsys.readouterr().out

    # The hub out of reach (the real library, offline): one line, exit 2, the checkpoint complete.
    monkeypatch.undo()
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(
        capsys, lambda: run_train(tmp_path / "p", "--steps", "2", "--push-to-hub", "me/tiny-ft"))
    assert "the upload failed" in line and "is complete and untouched" in line
    hf_model(tmp_path / "p")


def test_what_is_refused_before_training(run_train, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-token"))
    for extra, expected in (
        (["--push-to-hub", "me/x"], "no Hugging Face token"),
        (["--push-to-hub", "not a repo"], "not a repo id of the form owner/name")):
        assert expected in one_line_error(capsys, lambda: run_train(tmp_path / "o", *extra))
    for module, option, package in (
        ("wandb", ["--wandb", "p"], "pip install wandb"),
        ("torch.utils.tensorboard", ["--tensorboard"], "pip install tensorboard")):
        monkeypatch.setitem(sys.modules, module, None)
        assert package in one_line_error(capsys, lambda: run_train(tmp_path / "o", *option))
    assert not (tmp_path / "o").exists()  # nothing was written


def test_the_hub_check_in_a_fresh_process(tmp_path):
    """check_hub as train.py meets it, in a process where nothing imported huggingface_hub's
    submodules."""
    env = dict(os.environ, HF_TOKEN="hf_test", HF_HUB_OFFLINE="1")
    for repo_id, code, expected in (("me/tiny-ft", 0, ""),
                                    ("not a repo", 2, "not a repo id of the form owner/name")):
        check = (f"import cli, report\ntry:\n    report.check_hub({repo_id!r})\n"
                 "except cli.UserError as e:\n    cli.fail(str(e))")
        done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        assert done.returncode == code and expected in done.stderr, done.stderr
        assert "Traceback" not in done.stderr, done.stderr


def test_a_cut_metrics_line_is_dropped_on_resume(run_train, tmp_path, capsys):
    out = run_train(tmp_path / "o", "--steps", "2", "--eval-every", "0")
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 3, "loss": '
                                       '0.1')
    run_train(out, "--steps", "3", "--eval-every", "0", "--resume")
    assert "its last line was cut short" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2, 3, 3]  # each run ends with an evaluation


def test_the_card_quotes_for_the_shell_and_escapes_for_markdown():
    run = dict(name="run`rm -rf x`|y", trainable="attn", lora=None, quantize=None, steps=2, batch=4,
               lr=1e-3, data={"train.jsonl": 10})
    scores = {"step": 2, "detect/map50": 0.5, "detect/ap50_95": {"a|b": 0.25}}
    card = report.model_card("google/paligemma-3b-pt-224", False, run, scores)
    command = next(line for line in card.splitlines() if line.startswith("python infer.py"))
    assert "--model 'run`rm -rf x`|y'" in command
    row = next(line for line in card.splitlines() if "AP@50:95" in line)
    assert row == "| detect/AP@50:95 a\\|b | 0.2500 |"
    assert len(re.findall(r"(?<!\\)\|", row)) == 3  # two cells, whatever the label holds


@pytest.mark.parametrize("content, expected", [
    ("3\n", "metrics.jsonl:1: not a JSON object with a step"),
    ('{"loss": 1.0}\n{"step": 1}\n', "metrics.jsonl:1: not a JSON object with a step"),
    ("not json\n{\"step\": 1}\n", "metrics.jsonl:1: not valid JSON"),
], ids=["a number", "no step", "not json"])
def test_the_plot_command_on_files_it_cannot_read(content, expected, tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(content)
    assert expected in one_line_error(capsys, lambda: report.main([str(tmp_path)]))


def test_the_plot_command_where_it_cannot_write(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "metrics.png").mkdir()
    assert "cannot write" in one_line_error(capsys, lambda: report.main([str(tmp_path)]))
