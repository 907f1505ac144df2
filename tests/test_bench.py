"""bench.py must not break silently: one iteration of the tiny preset, as a user runs it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_runs():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--preset", "tiny", "--repeat", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("load (s)", "prefill, batch 8", "generate 64 tokens, batch 1", "its decoding steps "
                "alone",
                "attention-only train step", "LoRA r=8 q/k/v/o train step", "peak RSS", "limit",
                "trainable parameters: attention only 655,360, LoRA 53,248", "with the grammar",
                "paligemma-3b-pt-224 with LoRA r=8 on q/k/v/o: 1,843,200 trainable parameters, "
                "adapter file 7.0 MiB"):
        assert row in r.stdout, row


def test_bench_formats_runs():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench.py"), "--preset", "tiny", "--repeat", "1", "--formats"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("ours float32", "ours bfloat16", "ours int8", "ours int4", "ours nf4 (dequantized "
                "once)",
                "transformers float32", "transformers bfloat16", "batch 1, ratios: int8"):
        assert row in r.stdout, row


def test_gpu_check_says_it_needs_a_gpu():
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--gpu-check", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 2 and "--gpu-check needs a CUDA GPU" in r.stdout
