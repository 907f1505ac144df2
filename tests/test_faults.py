"""What a long run meets: a kill at any instant of a save, SIGTERM to its whole process group,
Ctrl-C once or twice. Nothing is lost: --out always loads, resumes, and resumed training equals
uninterrupted training."""

import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import checkpoint
import train
from paligemma import PaliGemma

ROOT = Path(__file__).resolve().parent.parent


def in_child(fn) -> int:
    """Runs fn in a forked copy of this process; returns its wait status (SIGKILL is a real
    kill)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)
            fn()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def count_or_kill(at: int | None, counted: list):
    """Wraps every file operation of the first checkpoint save of a run (train.save_checkpoint: a
    file written, fsync, rename, unlink): SIGKILL this process just before operation number `at`;
    record them in `counted`."""
    real_save, saving, saved = train.save_checkpoint, [], []

    def operation(name, real):
        def wrapped(*args, **kwargs):
            if saving:
                if len(counted) == at:
                    os.kill(os.getpid(), signal.SIGKILL)
                named = args and isinstance(args[0], (str, Path))
                counted.append(f"{name} {Path(args[0]).name if named else ''}")
            return real(*args, **kwargs)
        return wrapped
    for name in ("replace", "fsync", "unlink"):
        setattr(os, name, operation(name, getattr(os, name)))
    real_write_atomically = checkpoint.write_atomically
    checkpoint.write_atomically = lambda path, write: real_write_atomically(
        path, lambda tmp: operation("write", lambda t: write(t))(tmp))

    def save(*args, **kwargs):
        saving.extend([] if saved else [True])
        real_save(*args, **kwargs)
        saving.clear(), saved.append(True)
    train.save_checkpoint = save


def resume(out: Path, data: Path, steps: int):
    train.main(["--data", str(data), "--model", "unused/hub-id", "--out", str(out), "--steps",
                str(steps), "--batch-size", "4", "--save-every", "1", "--eval-every", "0", "--lr",
                "1e-3", "--resume"])


def test_a_kill_at_every_file_operation_of_a_save(trained, data, tmp_path):
    """A run resumed at step 2 is killed (SIGKILL) in its save of step 3, before each of the save's
    file operations in turn. Every time, --out loads with from_pretrained and resumes, from step 2
    or 3, to the same weights at step 4 as a run that was never killed; no temporary file outlives
    the resumed run."""
    reference = shutil.copytree(trained, tmp_path / "reference")
    # with the killed runs' one thread: the same sums
    assert in_child(lambda: resume(reference, data, 4)) == 0
    expected = PaliGemma.from_pretrained(reference).state_dict()

    ops_file = tmp_path / "operations"

    def count():
        counted = []
        count_or_kill(None, counted)
        resume(shutil.copytree(trained, tmp_path / "counting"), data, 4)
        ops_file.write_text("\n".join(counted))
    assert in_child(count) == 0
    operations = ops_file.read_text().splitlines()
    print(f"{len(operations)} file operations in a save: {', '.join(operations)}")
    assert len(operations) >= 10
    assert any(op.startswith("write .model.safetensors") for op in operations)

    resumed_from = set()
    for at in range(len(operations)):
        out = shutil.copytree(trained, tmp_path / f"killed-{at}")
        status = in_child(lambda: (count_or_kill(at, []), resume(out, data, 4)))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (at, status)
        PaliGemma.from_pretrained(out)  # loads, whatever the instant of the kill
        resumed_from.add(int(checkpoint.read_train_state(out, "cpu")[0]["step"]))
        assert in_child(lambda: resume(out, data, 4)) == 0
        state = PaliGemma.from_pretrained(out).state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected), (
            f"killed before {operations[at]}")
        assert not list(out.glob(".*.tmp")), list(out.iterdir())
        assert not (out / checkpoint.NEXT_STATE).exists(), list(out.iterdir())
    assert resumed_from == {2, 3}  # the kills fell before and after the step-3 weights took effect


# train.py's main with each forward pass slowed to 0.3 s, so that a signal surely lands within a
# step
SLOW_TRAINING = """import sys, time
sys.path.insert(0, {root!r})
import paligemma, train
forward = paligemma.SuffixLossSum.forward
def slow_forward(*args, **kwargs):
    time.sleep(0.3)
    return forward(*args, **kwargs)
paligemma.SuffixLossSum.forward = slow_forward
train.main(sys.argv[1:])
"""


def start_training(data, model, out, *extra) -> subprocess.Popen:
    """train.py in its own process group, as a scheduler starts it; returns once it is training."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAINING.format(root=str(ROOT)), "--data",
                             str(data), "--model", str(model), "--out", str(out), "--steps",
                             "100000", "--batch-size", "4", "--log-every", "1", "--eval-every", "0",
                             *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(proc, "step 2/")
    return proc


def wait_for(proc: subprocess.Popen, start: str):
    for line in proc.stdout:
        if line.startswith(start):
            return
    raise AssertionError(proc.stderr.read())


def group_ends(pgid: int, seconds: float = 20) -> bool:
    """Whether every process of the group (the DataLoader's workers too) is gone within
    `seconds`."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_sigterm_to_the_process_group_saves_and_exits_143(mqa_checkpoint, data, tmp_path):
    """SLURM, systemd and container runtimes send SIGTERM to every process of the job, DataLoader
    workers included: the run saves at the end of its step and exits with 143."""
    proc = start_training(data, mqa_checkpoint, tmp_path / "o")
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: saving at the end of this step" in out, out + err
    assert "continue with --resume" in out, out + err
    assert group_ends(proc.pid)
    step = int(checkpoint.read_train_state(tmp_path / "o", "cpu")[0]["step"])
    assert f"stopped at step {step}" in out
    PaliGemma.from_pretrained(tmp_path / "o")


def test_ctrl_c_saves_and_exits_130_a_second_one_stops_at_once(mqa_checkpoint, data, tmp_path):
    proc = start_training(data, mqa_checkpoint, tmp_path / "once")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped at step" in out, err
    assert group_ends(proc.pid)

    proc = start_training(data, mqa_checkpoint, tmp_path / "twice", "--save-every", "1")
    proc.send_signal(signal.SIGINT)
    wait_for(proc, "SIGINT: saving at the end of this step")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped at once" in err and "Traceback" not in err, err
    assert group_ends(proc.pid)
    PaliGemma.from_pretrained(tmp_path / "twice")  # the last checkpoint is whole


def test_sigterm_to_a_torchrun_job(mqa_checkpoint, data, tmp_path):
    """torchrun and its ranks all get SIGTERM: the ranks agree on the step, rank 0 saves it, and the
    job ends non-zero (torchrun reports the signal in its own words)."""
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_TRAINING.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             str(script), "--data", str(data), "--model", str(mqa_checkpoint),
                             "--out", str(tmp_path / "o"), "--steps", "100000", "--batch-size", "2",
                             "--log-every", "1", "--eval-every", "0", "--device",
                             "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    wait_for(proc, "step 2/")
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and group_ends(proc.pid)
    step = int(checkpoint.read_train_state(tmp_path / "o", "cpu")[0]["step"])
    assert f"saved {tmp_path / 'o'} at step {step}" in out and f"stopped at step {step}" in out, out
    PaliGemma.from_pretrained(tmp_path / "o")


def test_sighup_saves_and_exits_129(mqa_checkpoint, data, tmp_path):
    """A closed terminal or ssh session sends SIGHUP: saved at the end of the step, the workers
    gone."""
    proc = start_training(data, mqa_checkpoint, tmp_path / "o")
    os.killpg(proc.pid, signal.SIGHUP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 129 and "SIGHUP: saving at the end of this step" in out, out + err
    assert group_ends(proc.pid)
    assert f"stopped at step {checkpoint.read_train_state(tmp_path / 'o', 'cpu')[0]['step']}" in out


def test_a_signal_during_the_final_evaluation(mqa_checkpoint, data, tmp_path):
    """SIGTERM while the final evaluation runs (each forward pass slowed to 0.3 s, 8 examples one at
    a time): the evaluation stops, the checkpoint of the last step is saved, exit 143, at once
    rather than after it."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAINING.format(root=str(ROOT)), "--data",
                             str(data), "--model", str(mqa_checkpoint), "--out",
                             str(tmp_path / "o"), "--steps", "2", "--batch-size", "1",
                             "--log-every", "1", "--eval-every", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(proc, "saved ")
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped at step 2" in out, out + err
    assert "eval step" not in out, out + err
    assert time.monotonic() - start < 8 * 0.6  # not the whole evaluation
    assert checkpoint.read_train_state(tmp_path / "o", "cpu")[0]["step"] == 2


def test_two_runs_into_one_out(mqa_checkpoint, data, tmp_path):
    """The second is refused naming the first's process; once the first is killed (kill -9), the
    lock is gone."""
    first = start_training(data, mqa_checkpoint, tmp_path / "o")
    second = subprocess.run([sys.executable, ROOT / "train.py", "--data", data, "--model",
                             mqa_checkpoint, "--out", tmp_path / "o", "--steps", "1",
                             "--batch-size", "4", "--overwrite"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert f"is in use by another train.py run (process {first.pid})" in second.stderr
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    again = subprocess.run([sys.executable, ROOT / "train.py", "--data", data, "--model",
                            mqa_checkpoint, "--out", tmp_path / "o", "--steps", "1", "--batch-size",
                            "4", "--overwrite", "--eval-every", "0"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr


def test_ctrl_c_during_the_data_check(mqa_checkpoint, data, tmp_path):
    """Stopped at once (exit 130, one line), not after every queued image has been checked."""
    lines = data.read_text().splitlines()
    many = tmp_path / "many.jsonl"
    for f in data.parent.glob("train.jsonl-*.png"):
        for copy in range(40):  # 640 distinct images
            shutil.copy(f, tmp_path / f"{copy}-{f.name}")
    many.write_text("".join(line.replace('"train.jsonl-', f'"{copy}-train.jsonl-') + "\n"
                            for copy in range(40) for line in lines))
    slow = ("import sys, time; sys.path.insert(0, {root!r}); import data, train; check = "
            "data.check_image; data.check_image = lambda *a: (time.sleep(0.2), check(*a))[1]; "
            "train.main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", slow.format(root=str(ROOT)), "--data", str(many),
                             "--model", str(mqa_checkpoint), "--out",
                             str(tmp_path / "o")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(proc, f"{many}: checking")
    time.sleep(0.5)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped (Ctrl-C) before training began" in err, err
    assert "Traceback" not in err, err
    assert time.monotonic() - start < 5  # 640 images x 0.2 s / 8 threads would be 16 s
