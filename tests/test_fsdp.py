"""train.py --fsdp (FSDP2) with 2 gloo processes on the CPU: the same training as one process, half
the memory per process, checkpoints in the official layout, and --resume."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PREFIXES, SUFFIXES, TOL, hf_model, max_diff_on_tokens, random_images
from paligemma import TRAINABLE, PaliGemma
from processor import Processor
from test_faults import SLOW_TRAINING, wait_for
import train as train_py

ROOT = Path(__file__).resolve().parent.parent


def train(data, model, out, *extra, processes: int = 1) -> str:
    """train.py in 1 process (batch 4), or under torchrun with --fsdp (batch 4 / processes each):
    the same global batch. Returns what it printed."""
    common = ["--data", data, "--model", model, "--out", out, "--device", "cpu", "--eval-every",
              "0", "--log-every", "1", "--batch-size", str(4 // processes), *extra]
    command = [sys.executable, ROOT / "train.py"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
         ROOT / "train.py", "--fsdp"]
    r = subprocess.run(list(map(str, command + common)), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def weights(folder) -> dict[str, torch.Tensor]:
    return PaliGemma.from_pretrained(folder).state_dict()


def memory(printed: str) -> tuple[float, float]:
    """(weights, optimizer state) in MiB, as process 0 reports them after the first step."""
    m = re.search(r"memory of process 0: weights ([\d.]+) MiB, optimizer state ([\d.]+) MiB",
                  printed)
    return float(m.group(1)), float(m.group(2))


@pytest.mark.parametrize("trainable", ["attn", "all", "lora"])
def test_fsdp_equals_one_process(trainable, mqa_checkpoint, data, tmp_path):
    """SGD (Adam would amplify the last-bit differences of summing in another order): within
    1e-6."""
    extra = ["--trainable", trainable, "--steps", "3", "--optimizer", "sgd", "--lr", "0.5"]
    one = train(data, mqa_checkpoint, tmp_path / "one", *extra)
    two = train(data, mqa_checkpoint, tmp_path / "two", *extra, processes=2)
    assert "2 processes, sharded (FSDP)" in two and two.count("step 3/3") == 1
    if trainable == "lora":
        from safetensors.torch import load_file
        a, b = (load_file(tmp_path / f / "adapter_model.safetensors") for f in ("one", "two"))
    else:
        a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # the sharded run's checkpoint: the official layout, as transformers reads it
    if trainable == "attn":
        batch = Processor.from_pretrained(tmp_path / "two")(random_images(3), PREFIXES, SUFFIXES)
        inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask",
                                        "token_type_ids")}
        with torch.no_grad():
            ours = PaliGemma.from_pretrained(tmp_path / "two")(**inputs)
            theirs = hf_model(tmp_path / "two")(**inputs, labels=batch["labels"]).logits
        assert max_diff_on_tokens(ours, theirs, batch["attention_mask"]) <= TOL
    assert memory(two)[0] < 0.6 * memory(one)[0]  # each process holds about half the weights


def test_fsdp_halves_memory_and_resumes(mqa_checkpoint, data, tmp_path, capsys):
    extra = ["--steps", "4", "--lr", "1e-2", "--save-every", "1"]
    plain = train(data, mqa_checkpoint, tmp_path / "plain", "--steps", "1")
    straight = train(data, mqa_checkpoint, tmp_path / "straight", *extra, processes=2)
    (w1, o1), (w2, o2) = memory(plain), memory(straight)
    print(f"process 0 holds: weights {w1} -> {w2} MiB, AdamW state {o1} -> {o2} MiB (1 -> 2 "
          "processes)")
    assert 0.45 < w2 / w1 < 0.6 and 0.45 < o2 / o1 < 0.6
    # as computed from the shapes (float32 here): 4 bytes a weight, and AdamW's 8 for each trainable
    # one
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    trainable = sum(p.numel() for n, p in model.named_parameters() if TRAINABLE["attn"](n))
    expected = (4 * sum(p.numel() for p in model.parameters()) + 8 * trainable) / 2 / 2**20
    assert abs((w2 + o2) / expected - 1) < 0.05, (w2 + o2, expected)
    optimizer_files = (tmp_path / "straight").glob("optimizer-step*")
    assert sorted(p.name for p in optimizer_files) == ["optimizer-step4"]

    # The same run, stopped by Ctrl-C to its process group after step 2 (each step slowed to 0.3 s),
    # resumed.
    (tmp_path / "slow_train.py").write_text(SLOW_TRAINING.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             str(tmp_path / "slow_train.py"), "--fsdp", "--data", str(data),
                             "--model", str(mqa_checkpoint), "--out", str(tmp_path / "resumed"),
                             "--device", "cpu", "--eval-every", "0", "--log-every", "1",
                             "--batch-size", "2", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for(proc, "step 2/4")
    os.killpg(proc.pid, signal.SIGINT)
    printed, _ = proc.communicate(timeout=120)
    stopped = int(re.search(r"stopped at step (\d)", printed).group(1))
    assert proc.returncode != 0 and stopped < 4
    train(data, mqa_checkpoint, tmp_path / "resumed", *extra, "--resume", processes=2)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(SystemExit):
        train_py.main(["--data", str(data), "--out", str(tmp_path / "resumed"), "--steps", "6",
                       "--resume", "--batch-size", "4"])
    assert "was trained with --fsdp True, not False" in capsys.readouterr().err


AT_TEARDOWN = """import atexit, os, sys
sys.path.insert(0, {root!r})
import train
def tasks():
    return sorted(open(f"/proc/self/task/{{t}}/comm").read().strip()
                  for t in os.listdir("/proc/self/task"))
atexit.register(lambda: print("threads at Python's teardown:", tasks(), flush=True))
train.main(sys.argv[1:])
"""


def test_ranks_end_before_pythons_teardown(mqa_checkpoint, data, tmp_path):
    """FSDP2's device mesh stays cached inside torch.distributed.tensor with its process group,
    whose gloo threads (pt_gloo_runloop) would still run while Python tears down: that aborted a
    rank now and then (SIGABRT, "terminate called without an active exception"). A rank that trained
    and saved ends before its teardown."""
    (tmp_path / "at_teardown.py").write_text(AT_TEARDOWN.format(root=str(ROOT)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        str(tmp_path / "at_teardown.py"), "--fsdp", "--data", str(data), "--model",
                        str(mqa_checkpoint), "--out", str(tmp_path / "o"), "--device", "cpu",
                        "--steps", "1", "--batch-size", "2", "--eval-every", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"saved {tmp_path / 'o'} at step 1" in r.stdout, r.stdout + r.stderr[-3000:]
    assert "gloo" not in r.stdout, r.stdout
