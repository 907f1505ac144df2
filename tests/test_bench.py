"""bench.py must not break silently: one iteration of the tiny preset, as a user runs it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_runs():
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--preset", "tiny", "--repeat", "1"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("load (s)", "prefill, batch 8", "generate 64 tokens, batch 1", "its decoding steps alone",
                "attention-only train step", "LoRA r=8 q/k/v/o train step", "peak RSS", "limit",
                "trainable parameters: attention only 655,360, LoRA 53,248", "with the grammar",
                "paligemma-3b-pt-224 with LoRA r=8 on q/k/v/o: 1,843,200 trainable parameters, adapter file 7.0 MiB"):
        assert row in r.stdout, row
