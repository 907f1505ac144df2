"""Every bad input to train.py and infer.py is one line on stderr and exit code 2, never a
traceback, and nothing a user has is overwritten: each case is the command's arguments and a
fragment of the message. One section per input surface: train.py's options; --out, --model and
--resume; the data; what happens while it runs; checkpoints and adapters (of both tools and the
Python API); infer.py. evaluate.py's and convert.py's are in their own test files, the Python API's
beside their modules' tests."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import convert
import data as data_py
import infer
import train
from conftest import make_dataset, random_images, rewrite_official
from paligemma import PaliGemma
from processor import Processor

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, main, argv, stdout_empty=False) -> str:
    """Runs a command's main in this process; it must exit with code 2 and one error line (and,
    with `stdout_empty`, print nothing on stdout, where infer.py writes its answers)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert not (stdout_empty and out), out
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def after_log_line(monkeypatch, start: str, action):
    """train.py's log, with `action()` run just after the line that starts with `start`."""
    real_log = train.log

    def log(*args, **kwargs):
        real_log(*args, **kwargs)
        if str(args[0]).startswith(start):
            action()
    monkeypatch.setattr(train, "log", log)


def train_args(data, model, out, *extra):
    return ["--data", data, "--model", model, "--out", out, "--batch-size", "4", "--log-every", "1",
            *extra]


# ----------------------------------------------------------------------------------------------
# train.py: options, checked when parsed


OPTIONS = [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, not 0"),
    (["--steps", "-1"], "argument --steps: must be an integer >= 1, not -1"),
    (["--max-len", "-1"], "argument --max-len: must be an integer >= 1"),
    (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
    (["--grad-accum", "0"], "argument --grad-accum: must be an integer >= 1"),
    (["--log-every", "0"], "argument --log-every: must be an integer >= 1"),
    (["--lr", "-0.001"], "argument --lr: must be a number >= 0, not -0.001"),
    (["--lr", "nan"], "argument --lr: must be a number >= 0, not nan"),
    (["--weight-decay", "-0.1"], "argument --weight-decay: must be a number >= 0"),
    (["--warmup", "1.5"], "argument --warmup: must be a number in [0, 1]"),
    (["--epochs", "0"], "argument --epochs: must be a number > 0"),
    (["--steps", "ten"], "argument --steps: 'ten' is not an integer"),
    (["--trainable", "lora", "--lora-targets", "q_proj,qkv"], "argument --lora-targets: qkv: not "
     "one of"),
    (["--trainable", "lora", "--lora-rank", "0"], "argument --lora-rank: must be an integer >= 1"),
    (["--trainable", "lora", "--fsdp", "--merge"], "--fsdp does not take --merge"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device name"),
    (["--device", "cuda:99"], "--device 'cuda:99': this machine has"),
    *([(["--device", "cuda"], "--device 'cuda': this machine has no CUDA GPU")]
      if not torch.cuda.is_available() else []),
    *([(["--device", "mps"],
        "--device 'mps': MPS")] if not torch.backends.mps.is_available() else []),
]


@pytest.mark.parametrize("extra, expected", OPTIONS, ids=[" ".join(o[0]) for o in OPTIONS])
def test_train_options(extra, expected, mqa_checkpoint, data, tmp_path, capsys):
    line = one_line_error(
        capsys, train.main,
        ["--data", data, "--model", mqa_checkpoint, "--out", tmp_path / "o", *extra])
    assert expected in line


# ----------------------------------------------------------------------------------------------
# train.py: --out, --model and --resume, before anything is loaded


def out_is_a_file(tmp, ckpt, data):
    (tmp / "f").write_text("x")
    return ["--out", tmp / "f"], "is a file, not a folder"


def out_below_a_file(tmp, ckpt, data):
    (tmp / "f").write_text("x")
    return ["--out", tmp / "f" / "o"], "is a file, not a folder"


def out_is_the_model(tmp, ckpt, data):
    return ["--out", ckpt], "the checkpoint being fine-tuned would be overwritten"


def model_inside_out(tmp, ckpt, data):
    shutil.copytree(ckpt, tmp / "o" / "model")
    return ["--model", tmp / "o" / "model", "--out", tmp / "o"], "one holds the other"


def out_inside_model(tmp, ckpt, data):
    shutil.copytree(ckpt, tmp / "model")
    return ["--model", tmp / "model", "--out", tmp / "model" / "ft"], "one holds the other"


def out_holds_a_checkpoint(tmp, ckpt, data):
    (tmp / "o").mkdir()
    shutil.copy(ckpt / "model.safetensors", tmp / "o")
    return ["--out", tmp / "o"], ("holds a checkpoint (model.safetensors): continue it with "
                                  "--resume, replace it")


def resume_without_checkpoint(tmp, ckpt, data):
    return ["--out", tmp / "empty", "--resume"], "holds no checkpoint written by train.py"


def resume_and_overwrite(tmp, ckpt, data):
    shutil.copytree(ckpt, tmp / "o")
    return ["--out", tmp / "o", "--resume", "--overwrite"], "give one of them"


def resume_without_step(tmp, ckpt, data):
    shutil.copytree(ckpt, tmp / "o")  # a transformers save: no step in its metadata
    return ["--out", tmp / "o",
            "--resume"], "has no step in its metadata: it was not written by train.py"


CASES = [out_is_a_file, out_below_a_file, out_is_the_model, model_inside_out, out_inside_model,
         out_holds_a_checkpoint, resume_without_checkpoint, resume_and_overwrite,
         resume_without_step]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_train_out_model_resume(case, mqa_checkpoint, data, tmp_path, capsys):
    extra, expected = case(tmp_path, mqa_checkpoint, data)
    before = {p: p.read_bytes() for p in mqa_checkpoint.iterdir()}
    line = one_line_error(capsys, train.main, ["--data", data, "--model", mqa_checkpoint, "--out",
                                               tmp_path / "o", "--steps", "1", "--batch-size", "4",
                                               *extra])
    assert expected in line
    # the source model is untouched
    assert {p: p.read_bytes() for p in mqa_checkpoint.iterdir()} == before


def test_out_not_writable(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: Path(p) != tmp_path / "ro" and real_access(p, mode))
    line = one_line_error(capsys, train.main, ["--data", data, "--model", mqa_checkpoint, "--out",
                                               tmp_path / "ro" / "o"])
    assert "is not writable (permission denied)" in line


def test_overwrite_replaces_an_earlier_run(trained, data, tmp_path, capsys):
    out = shutil.copytree(trained, tmp_path / "o")
    train.main(["--data", str(data), "--model", str(trained), "--out", str(out), "--steps", "1",
                "--batch-size", "4", "--eval-every", "0", "--overwrite"])
    assert "--overwrite" in capsys.readouterr().out
    assert torch.load(out / "train_state.pt")["step"] == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(line)["step"] for line in lines} == {1}


def test_resume_checks(trained, data, tmp_path, capsys):
    args = ["--data", data, "--model", "unused/hub-id", "--steps", "3", "--batch-size", "4",
            "--resume"]
    out = shutil.copytree(trained, tmp_path / "sgd")
    assert "trained with --optimizer adamw, not sgd" in one_line_error(
        capsys, train.main, args + ["--out", out, "--optimizer", "sgd"])
    out = shutil.copytree(trained, tmp_path / "truncated")
    (out / "train_state.pt").write_bytes((out / "train_state.pt").read_bytes()[:1000])
    expected = f"--resume: {out / 'train_state.pt'} cannot be read"
    assert expected in one_line_error(capsys, train.main, args + ["--out", out])
    out = shutil.copytree(trained, tmp_path / "done")
    assert "is at step 2 already" in one_line_error(capsys, train.main,
                                                    args + ["--out", out, "--steps", "2"])


def test_resume_with_changed_options(trained, data, tmp_path, capsys):
    """Each option is applied and said, or refused naming both values (docs/fine-tuning.md: What
    the tools promise)."""
    def resume(name, *extra):
        out = shutil.copytree(trained, tmp_path / name)
        train.main([str(a) for a in train_args(data, "unused/hub-id", out, "--steps", "3",
                                               "--eval-every", "0", "--resume", *extra)])
        return out, capsys.readouterr().out
    plain, _ = resume("plain")
    decayed, said = resume("decay", "--weight-decay", "0.5")
    assert "--resume: --weight-decay 0.5 from here on (the run had 0.0)" in said
    a, b = (PaliGemma.from_pretrained(f).state_dict() for f in (plain, decayed))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the new weight decay takes effect
    _, said = resume("longer", "--steps", "6")
    assert "--resume: the schedule now ends at step 6 (the run's at 2)" in said
    other = shutil.copy(data, tmp_path / "changed.jsonl")
    Path(other).write_text(Path(other).read_text().replace("what colour", "which colour"))
    for f in data.parent.glob("train.jsonl-*.png"):
        shutil.copy(f, tmp_path)
    out = shutil.copytree(trained, tmp_path / "changed-data")
    train.main([str(a) for a in train_args(other, "unused/hub-id", out, "--steps", "3",
                                           "--eval-every", "0", "--resume")])
    assert "is not the data the run began with" in capsys.readouterr().out
    out = shutil.copytree(trained, tmp_path / "batch")
    assert "was trained with --batch-size 4, not 2" in one_line_error(
        capsys, train.main,
        train_args(data, "unused/hub-id", out, "--steps", "3", "--resume", "--batch-size", "2"))


def test_a_train_state_without_an_entry(trained, data, tmp_path, capsys):
    out = shutil.copytree(trained, tmp_path / "o")
    state = torch.load(out / "train_state.pt")
    del state["scaler"]
    torch.save(state, out / "train_state.pt")
    assert "train_state.pt has no scaler" in one_line_error(
        capsys, train.main, train_args(data, "unused/hub-id", out, "--steps", "3", "--resume"))


def test_an_adapter_resumed_on_another_base(adapter_run, data, tmp_path, capsys):
    out = shutil.copytree(adapter_run, tmp_path / "o")
    assert "is an adapter of" in one_line_error(capsys, train.main, train_args(
        data, "other/base-model", out, "--steps", "2", "--trainable", "lora", "--resume"))


def test_a_second_run_into_the_same_out_is_refused(mqa_checkpoint, data, tmp_path, capsys):
    hold = (f"import sys, time; from pathlib import Path; sys.path.insert(0, {str(ROOT)!r}); "
            f"import checkpoint; lock = checkpoint.lock_out_folder(Path({str(tmp_path / 'o')!r})); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"  # as a first run holds it
    line = one_line_error(capsys, train.main,
                          train_args(data, mqa_checkpoint, tmp_path / "o", "--steps", "1"))
    assert f"is in use by another train.py run (process {holder.pid})" in line
    holder.kill()  # the first run dies: the kernel releases its lock
    holder.wait()
    train.main([str(a) for a in train_args(data, mqa_checkpoint, tmp_path / "o", "--steps", "1",
                                           "--eval-every", "0")])


def test_the_lock_is_never_a_link_nor_another_kind_of_file(mqa_checkpoint, data, tmp_path, capsys):
    """OUT/train.lock as a symbolic link would have train.py truncate its target and write its
    process id there: refused, the target untouched; a FIFO or a folder in its place, refused
    too."""
    out = tmp_path / "o"
    out.mkdir()
    (tmp_path / "victim.txt").write_text("precious")
    (out / "train.lock").symlink_to(tmp_path / "victim.txt")
    line = one_line_error(capsys, train.main, train_args(data, mqa_checkpoint, out, "--steps", "1"))
    assert "train.lock is a symbolic link" in line
    assert (tmp_path / "victim.txt").read_text() == "precious"
    (out / "train.lock").unlink()
    os.mkfifo(out / "train.lock")
    assert "train.lock is not a regular file" in one_line_error(capsys, train.main, train_args(
        data, mqa_checkpoint, out, "--steps", "1"))


def test_a_lock_that_fails_for_another_reason(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    """lockf failing as on NFS without a lock daemon is said as it is, not as a run holding
    --out."""
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    line = one_line_error(capsys, train.main,
                          train_args(data, mqa_checkpoint, tmp_path / "o", "--steps", "1"))
    assert "train.lock cannot be locked (No locks available)" in line
    assert "in use by another" not in line


def test_report_files_that_are_folders_are_refused_first(mqa_checkpoint, data, tmp_path, capsys):
    for name in ("metrics.png", "metrics.jsonl"):
        (tmp_path / name / name).mkdir(parents=True)
        assert f"{tmp_path / name / name} is a folder" in one_line_error(
            capsys, train.main, train_args(data, mqa_checkpoint, tmp_path / name, "--steps", "1"))


def test_out_dangling_symlink_and_deleted(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert "is a symbolic link to" in one_line_error(
        capsys, train.main, train_args(data, mqa_checkpoint, tmp_path / "link"))
    after_log_line(monkeypatch, "step 2/", lambda: shutil.rmtree(tmp_path / "o"))
    train.main([str(a) for a in train_args(data, mqa_checkpoint, tmp_path / "o", "--steps", "2",
                                           "--eval-every", "0")])
    assert "was deleted during training; it is made again" in capsys.readouterr().out
    PaliGemma.from_pretrained(tmp_path / "o")


# ----------------------------------------------------------------------------------------------
# train.py: data, every line checked before training starts


def write_lines(tmp, data, *lines: bytes) -> Path:
    """A JSONL beside the fixture's images, with the fixture's first 4 lines and then `lines`."""
    for f in data.parent.glob("train.jsonl-*.png"):
        shutil.copy(f, tmp)
    path = tmp / "bad.jsonl"
    path.write_bytes(b"\n".join(data.read_bytes().splitlines()[:4] + list(lines)) + b"\n")
    return path


def line(image, prefix="caption en", suffix="x") -> bytes:
    return json.dumps({"image": str(image), "prefix": prefix, "suffix": suffix}).encode()


def surrogate(tmp):
    return b'{"image": "train.jsonl-0.png", "prefix": "caption \\ud800en", "suffix": "x"}'


DATA = [
    ("non-UTF-8", lambda tmp: line("train.jsonl-0.png").replace(b"caption", b"capti\xff\xfeon"),
     ":5: not UTF-8 text (byte "),
    ("image is a directory", lambda tmp: (tmp / "folder.png").mkdir() or line("folder.png"),
     "folder.png: is a directory, not an image file"),
    ("empty image", lambda tmp: (tmp / "empty.png").write_bytes(b"") and b"" or line("empty.png"),
     "empty.png: is an empty file"),
    ("file name too long", lambda tmp: line("x" * 300 + ".png"), ": file name too long for this "
     "system"),
    ("no room for the answer",
     lambda tmp: line("train.jsonl-0.png", prefix="caption en " + "word " * 40),
     "--max-len 32 leaves no room for the answer"),
    ("a lone surrogate", surrogate, "prefix holds '\\ud800', half of a UTF-16 pair: not text"),
    ("nested brackets", lambda tmp: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ("a FIFO as the image", lambda tmp: os.mkfifo(tmp / "pipe.png") or line("pipe.png"), "is a "
     "FIFO (named pipe)"),
    ("/dev/zero as the image", lambda tmp: line("/dev/zero"), "/dev/zero: is a character device"),
    ("a 13000 x 13000 image",
     lambda tmp: Image.new("1", (13000, 13000)).save(tmp / "big.png") or line("big.png"),
     "big.png: is 13000 x 13000 pixels, more than the limit of 89,478,485 (--max-image-pixels "
     "raises it)"),
]


@pytest.mark.parametrize("name, bad_line, expected", DATA, ids=[d[0] for d in DATA])
@pytest.mark.parametrize("where", ["--data", "--val"])
def test_bad_data(name, bad_line, expected, where, mqa_checkpoint, data, tmp_path, capsys):
    """One line naming the file and line, in the training file or the validation file; --skip-bad
    skips it."""
    path = write_lines(tmp_path, data, bad_line(tmp_path))
    files = {"--data": data, "--val": data.parent / "valid.jsonl"} | {where: path}
    argv = train_args(files["--data"], mqa_checkpoint, tmp_path / "o", "--val", files["--val"],
                      "--steps", "1", "--max-len", "32")
    with pytest.raises(SystemExit) as e:
        train.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path}:5: " in err and expected in err, err
    assert "Traceback" not in err, err
    train.main([str(a) for a in argv + ["--skip-bad", "--eval-every", "0"]])
    assert f"skipped 1 bad line(s), e.g. {path}:5: " in capsys.readouterr().out


def test_bad_lines_are_reported_with_file_and_line(run_train, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = data.read_text().splitlines()
    for name in ("train.jsonl-0.png", "train.jsonl-1.png", "train.jsonl-2.png",
                 "train.jsonl-3.png"):
        (tmp_path / name).write_bytes((data.parent / name).read_bytes())
    bad.write_text("\n".join(good[:4] + [
        "{not json",
        json.dumps({"image": "train.jsonl-0.png", "prefix": "caption en"}),
        json.dumps({"image": "missing.png", "prefix": "caption en", "suffix": "x"}),
        json.dumps({"image": "broken.png", "prefix": "caption en", "suffix": "x"}),
    ]) + "\n")
    with pytest.raises(SystemExit) as e:
        run_train(tmp_path / "o", "--steps", "1", data=bad)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"{bad}:5: not valid JSON" in err
    assert f"{bad}:6: missing or not a string: suffix" in err
    assert f"{bad}:7: image {tmp_path / 'missing.png'}: no such image file" in err
    assert f"{bad}:8: image {tmp_path / 'broken.png'}: cannot be decoded" in err
    assert "4 bad line(s)" in err
    run_train(tmp_path / "o", "--steps", "1", "--skip-bad", data=bad)
    assert "skipped 4 bad line(s)" in capsys.readouterr().out


def test_data_file_errors(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    args = ["--model", mqa_checkpoint, "--out", tmp_path / "o"]
    assert "is a directory, not a JSONL file" in one_line_error(capsys, train.main,
                                                                ["--data", tmp_path, *args])
    assert "no such file" in one_line_error(capsys, train.main,
                                            ["--data", tmp_path / "nope.jsonl", *args])
    real = Path.read_bytes
    def read_bytes(path):
        if path.name == "locked.jsonl":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert "locked.jsonl: cannot be read (Permission denied)" in one_line_error(
        capsys, train.main, ["--data", tmp_path / "locked.jsonl", *args])


def test_utf8_bom_is_accepted(mqa_checkpoint, data, tmp_path):
    path = write_lines(tmp_path, data)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    train.main(["--data", str(path), "--model", str(mqa_checkpoint), "--out", str(tmp_path / "o"),
                "--steps", "1", "--batch-size", "4", "--eval-every", "0"])
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_a_long_validation_prompt_is_refused_before_training(mqa_checkpoint, data, tmp_path,
                                                             capsys):
    val = write_lines(tmp_path, data,
                      line("train.jsonl-0.png", prefix="caption en " + "word " * 40))
    line_ = one_line_error(
        capsys, train.main,
        train_args(data, mqa_checkpoint, tmp_path / "o", "--val", val, "--max-len", "16"))
    assert "1 bad line(s)" in line_ and not (tmp_path / "o" / "model.safetensors").exists()


def test_large_images_are_decoded_one_at_a_time(data, monkeypatch):
    """The data check decodes in threads but never holds two large images at once."""
    active, most = [0], [0]
    real = data_py.load_image

    def counting(path, *rest):
        active[0] += 1
        most[0] = max(most[0], active[0])
        try:
            return real(path, *rest)
        finally:
            active[0] -= 1
    monkeypatch.setattr(data_py, "load_image", counting)
    monkeypatch.setattr(data_py, "LARGE_IMAGE", 0)  # every image counts as large
    assert len(data_py.read_jsonl(data, skip_bad=False)) == 16 and most[0] == 1


def test_vae_files_that_are_not_npz(mqa_checkpoint, data, tmp_path, capsys):
    np.save(tmp_path / "vae.npy", np.zeros(3))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": [],
                                                 "categories": []}))
    for vae, expected in ((tmp_path / "vae.npy", "a single array (.npy), not an npz archive"),
                          (tmp_path / "corrupt.npz", "corrupt.npz: not a readable npz file")):
        assert expected in one_line_error(
            capsys, train.main, train_args(data, mqa_checkpoint, tmp_path / "o", "--vae", vae))
        line_ = one_line_error(capsys, convert.main,
                               ["coco-segment", tmp_path / "c.json", "--vae", vae])
        assert "--vae: " in line_ and expected in line_


# ----------------------------------------------------------------------------------------------
# train.py: while it runs (an image gone, a full disk, memory)


def test_image_gone_during_training(trained, data, tmp_path, capsys, monkeypatch):
    """An image deleted after the data check: the run stops naming it; the checkpoint it resumed
    stays."""
    path = write_lines(tmp_path, data)
    out = shutil.copytree(trained, tmp_path / "o")
    before = (out / "model.safetensors").read_bytes()
    after_log_line(monkeypatch, "resumed from",
                   lambda: [f.unlink() for f in tmp_path.glob("train.jsonl-*.png")])
    line = one_line_error(capsys, train.main, ["--data", path, "--model", "unused/hub-id", "--out",
                                               out, "--steps", "4", "--batch-size", "4",
                                               "--resume"])
    assert "no such image file; stopped before step 3" in line and "--resume" in line
    assert (out / "model.safetensors").read_bytes() == before


def test_a_validation_image_gone_saves_first(mqa_checkpoint, tmp_path, capsys, monkeypatch):
    """The evaluation of step 2 meets a deleted validation image: step 2 is saved, then one line
    names it."""
    folder = tmp_path / "d"
    make_dataset(folder, 8, "valid.jsonl", seed=1)
    data = make_dataset(folder, 8, "train.jsonl")
    after_log_line(monkeypatch, "step 1/",
                   lambda: [f.unlink() for f in folder.glob("valid.jsonl-*.png")])
    line = one_line_error(
        capsys, train.main,
        train_args(data, mqa_checkpoint, tmp_path / "o", "--steps", "4", "--eval-every", "2"))
    assert "evaluation at step 2: image" in line and "valid.jsonl-0.png: no such image file" in line
    assert "saved at step 2" in line and checkpoint.read_train_state(tmp_path / "o",
                                                                     "cpu")[0]["step"] == 2


def test_disk_full_during_save(trained, data, tmp_path, capsys, monkeypatch):
    out = shutil.copytree(trained, tmp_path / "o")
    def files():
        return {f.name: f.read_bytes() for f in out.iterdir()
                if f.is_file() and f.name not in ("train.lock", "metrics.jsonl")}
    before = files()

    def full(path, tensors, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_safetensors", full)
    line = one_line_error(capsys, train.main, ["--data", data, "--model", "unused/hub-id", "--out",
                                               out, "--steps", "3", "--batch-size", "4",
                                               "--eval-every", "0", "--resume"])
    assert "cannot save the checkpoint of step 3" in line and "No space left on device" in line
    assert "intact" in line
    assert files() == before  # the step-2 checkpoint, and no temporary file


def test_the_metrics_file_on_a_full_disk(trained, data, tmp_path, capsys, monkeypatch):
    import report
    out = shutil.copytree(trained, tmp_path / "o")
    weights = (out / "model.safetensors").read_bytes()

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and mode == "a":
            raise OSError(errno.ENOSPC, "No space left on device")
        return open(path, mode, *args, **kwargs)
    monkeypatch.setattr(report, "open", full, raising=False)
    line = one_line_error(capsys, train.main,
                          train_args(data, "unused/hub-id", out, "--steps", "3", "--resume"))
    assert "cannot write" in line and "metrics.jsonl (No space left on device)" in line
    assert "is intact" in line
    assert (out / "model.safetensors").read_bytes() == weights


def test_a_full_disk_at_the_evaluation_picture(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    import report
    real = report.write_atomically

    def full_disk(path, write):
        if path.suffix == ".jpg":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, write)
    monkeypatch.setattr(report, "write_atomically", full_disk)
    line = one_line_error(
        capsys, train.main,
        train_args(data, mqa_checkpoint, tmp_path / "o", "--steps", "2", "--eval-every", "0"))
    assert "cannot write" in line and "step-2.jpg (No space left on device)" in line
    # saved before the final evaluation
    assert checkpoint.read_train_state(tmp_path / "o", "cpu")[0]["step"] == 2


def test_saved_files_have_the_mode_of_their_siblings(trained):
    modes = {f.name: f.stat().st_mode & 0o777 for f in trained.iterdir() if f.is_file()}
    assert len(set(modes.values())) == 1, modes


def test_out_of_memory_says_what_to_lower(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                           "allocate memory")
    monkeypatch.setattr(train, "forward_backward", oom)
    line_ = one_line_error(
        capsys, train.main,
        train_args(data, mqa_checkpoint, tmp_path / "o", "--steps", "1", "--eval-every", "0"))
    assert "out of memory at step 1" in line_
    assert "lower --batch-size (4), or add --grad-checkpointing, or add --quantize nf4" in line_


# ----------------------------------------------------------------------------------------------
# Checkpoints and adapters, as --model of either tool and through the Python API


def broken(tmp, ckpt, edit) -> Path:
    folder = shutil.copytree(ckpt, tmp / "broken")
    edit(folder)
    return folder


def sharded(tmp, ckpt, edit_index) -> Path:
    folder = rewrite_official(ckpt, tmp / "broken", shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps(edit_index(index)))
    return folder


def wrong_model_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma3"
    (folder / "config.json").write_text(json.dumps(config))


def wrong_field_type(folder):
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["hidden_size"] = "wide"
    (folder / "config.json").write_text(json.dumps(config))


def weights_as_a_folder(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").mkdir()


def file_edit(name, change):
    """A copy of the checkpoint whose file `name` holds change(its bytes)."""
    def edit(folder):
        (folder / name).write_bytes(change((folder / name).read_bytes()))
    return lambda t, c: broken(t, c, edit)


def index_files(rename):
    """A sharded copy whose index puts each tensor in rename(its file)."""
    return lambda t, c: sharded(t, c, lambda index: index | {
        "weight_map": {k: rename(v) for k, v in index["weight_map"].items()}})


def norm_in_the_other_shard(index):
    key = "language_model.model.norm.weight"
    first = index["weight_map"][key].startswith("model-00001")
    other = "model-00002-of-00002.safetensors" if first else "model-00001-of-00002.safetensors"
    return index | {"weight_map": index["weight_map"] | {key: other}}


NOT_SAFETENSORS = "model.safetensors: not a readable safetensors file"
CHECKPOINTS = [
    ("truncated weights", file_edit("model.safetensors", lambda b: b[:5000]), NOT_SAFETENSORS),
    ("empty weights", file_edit("model.safetensors", lambda b: b""), NOT_SAFETENSORS),
    ("corrupt weights", file_edit("model.safetensors", lambda b: b"\x10" * 64), NOT_SAFETENSORS),
    ("weights are a folder", lambda t, c: broken(t, c, weights_as_a_folder), "it is a folder"),
    ("invalid config.json", file_edit("config.json", lambda b: b'{"text_config": {,}'),
     "config.json: not valid JSON (Expecting property name enclosed in double quotes at line 1, "
     "column 18)"),
    ("config.json not an object", file_edit("config.json", lambda b: b"[1, 2]"),
     "config.json: expected a JSON object"),
    ("config field of the wrong type", lambda t, c: broken(t, c, wrong_field_type),
     'vision_config.hidden_size is "wide"; expected int >= 1'),
    ("gemma3", lambda t, c: broken(t, c, wrong_model_type),
     "text_config.model_type is 'gemma3'; supported are 'gemma' (PaliGemma) and 'gemma2' "
     "(PaliGemma 2)"),
    ("index without weight_map", lambda t, c: sharded(t, c, lambda index: {"metadata": {}}),
     "model.safetensors.index.json: expected a JSON object with a weight_map"),
    ("index names a missing tensor", lambda t, c: sharded(t, c, norm_in_the_other_shard),
     "puts language_model.model.norm.weight in model-0000"),
    ("corrupt tokenizer", file_edit("tokenizer.model", lambda b: b"garbage"),
     "tokenizer.model: not a readable SentencePiece model"),
    ("nested brackets in config.json",
     file_edit("config.json", lambda b: b"[" * 100_000 + b"]" * 100_000),
     "config.json: nested too deeply"),
    ("an index naming an absolute path", index_files(lambda file: "/etc/passwd"),
     "outside the checkpoint's folder"),
    ("an index leading out of the folder", index_files(lambda file: "../" + file),
     "outside the checkpoint's folder"),
    ("100000 layers in config.json", file_edit("config.json", lambda b: b.replace(
        b'"num_hidden_layers": 2', b'"num_hidden_layers": 100000', 1)),
     "gives language_model 100000 layers; the checkpoint holds 2"),
]


@pytest.mark.parametrize("name, make, expected", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_broken_checkpoints(name, make, expected, mqa_checkpoint, data, tmp_path, capsys):
    """The Python API raises, quickly, naming the file; train.py and infer.py say it in one line."""
    folder = make(tmp_path, mqa_checkpoint)
    start = time.perf_counter()
    with pytest.raises((ValueError, OSError), match=".") as e:
        PaliGemma.from_pretrained(folder)
        Processor.from_pretrained(folder)
    assert expected in str(e.value) and time.perf_counter() - start < 5
    for main, argv in (
        (train.main, ["--data", data, "--out", tmp_path / "o"]),
        (infer.main, ["--image", data.parent / "train.jsonl-0.png", "--prompt", "caption en"])):
        assert expected in one_line_error(capsys, main, ["--model", folder, *argv])


def adapter_config_edit(edit):
    def make(out):
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps(edit(config)))
    return make


ADAPTERS = [
    ("no base model",
     adapter_config_edit(lambda c: {k: v for k, v in c.items() if k != "base_model_name_or_path"}),
     "names no base model (base_model_name_or_path)"),
    ("a null base model", adapter_config_edit(lambda c: c | {"base_model_name_or_path": None}),
     "names no base model"),
    ("a number for the base model",
     adapter_config_edit(lambda c: c | {"base_model_name_or_path": 3}),
     "base_model_name_or_path is 3, not the name of a model"),
    ("not an object", adapter_config_edit(lambda c: [c]), "expected a JSON object, not list"),
]


@pytest.fixture(scope="module")
def adapter_run(mqa_checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter") / "o"
    train.main([str(a) for a in train_args(data, mqa_checkpoint, out, "--steps", "1",
                                           "--eval-every", "0", "--trainable", "lora",
                                           "--lora-rank", "2")])
    return out


@pytest.mark.parametrize("name, edit, expected", ADAPTERS, ids=[a[0] for a in ADAPTERS])
def test_broken_adapter_configs(name, edit, expected, adapter_run, data, tmp_path, capsys):
    out = shutil.copytree(adapter_run, tmp_path / "o")
    edit(out)
    image = data.parent / "train.jsonl-0.png"
    assert expected in one_line_error(capsys, infer.main,
                                      ["--model", out, "--image", image, "--prompt", "x"])
    assert expected in one_line_error(
        capsys, train.main,
        train_args(data, "unused/hub-id", out, "--steps", "2", "--trainable", "lora", "--resume"))


# ----------------------------------------------------------------------------------------------
# infer.py


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("infer") / "a.png"
    random_images(1)[0].save(path)
    return path


def bomb(tmp):
    Image.new("L", (15000, 15000)).save(tmp / "bomb.png")  # 225 megapixels, a few hundred KB as PNG
    return tmp / "bomb.png"


def no_weights(tmp) -> list:
    """--model: a folder with a config.json and no weights."""
    (tmp / "empty").mkdir()
    shutil.copy(Path(__file__).resolve().parent.parent / "tiny" / "paligemma-tiny" / "config.json",
                tmp / "empty")
    return ["--model", tmp / "empty"]


INFER = [
    (["--temperature", "-1"], "argument --temperature: must be a number >= 0"),
    (["--temperature", "inf"], "argument --temperature: must be a number >= 0, not inf"),
    (["--temperature", "nan"], "argument --temperature: must be a number >= 0, not nan"),
    (["--top-p", "0"], "argument --top-p: must be a number in (0, 1], not 0"),
    (["--top-p", "1.5"], "argument --top-p: must be a number in (0, 1]"),
    (["--top-k", "-3"], "argument --top-k: must be an integer >= 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device name"),
    (lambda tmp, image: ["--out", tmp], "is a folder; give a file name"),
    (lambda tmp, image: ["--out", tmp / "boxes"], "give an image file name ending in .png or .jpg"),
    (lambda tmp, image: ["--out", tmp / "boxes.xyz"], "give an image file name ending in .png or "
     ".jpg"),
    (lambda tmp, image: ["--out", tmp / "missing" / "boxes.png"], "the folder " + "{tmp}/missing "
     "does not exist"),
    (lambda tmp, image: ["--out", image], "is one of the input images; it would be overwritten"),
    (lambda tmp, image: ["--image", image.with_name("a_1.png"), "--out", image], "a_1.png is one "
     "of the input images"),
    (lambda tmp, image: ["--image", tmp], "is a directory, not an image file"),
    (lambda tmp, image: ["--image", bomb(tmp)], "bomb.png: is 15000 x 15000 pixels, more than the "
     "limit of 89,478,485"),
    (lambda tmp, image: ["--vae", tmp / "vae-oid.npz"], "--vae {tmp}/vae-oid.npz: no such file"),
    (lambda tmp, image: ["--image", image.with_name("nope.png")], "nope.png: no such image file"),
    (lambda tmp, image: (tmp / "broken.jpg").write_bytes(b"not an image")
     and ["--image", tmp / "broken.jpg"],
     "broken.jpg: cannot be decoded as an image"),
    (lambda tmp, image: no_weights(tmp), "holds no weights"),
    (["--max-new-tokens", "9000"], "more than the model's 8192 positions"),
    (["--prompt", "ocr", "--prompt", "ocr"], "3 prompts for 1 images"),
]


@pytest.mark.parametrize("case, expected", INFER, ids=[str(i) for i in range(len(INFER))])
def test_infer_errors(case, expected, mqa_checkpoint, image, tmp_path, capsys):
    extra = case(tmp_path, image) if callable(case) else case
    before = image.read_bytes()
    argv = ["--model", mqa_checkpoint, "--image", image, "--prompt", "caption en", *extra]
    line = one_line_error(capsys, infer.main, argv, stdout_empty=True)
    assert expected.format(tmp=tmp_path) in line
    assert image.read_bytes() == before


def test_infer_out_not_writable(mqa_checkpoint, image, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    line = one_line_error(capsys, infer.main, ["--model", mqa_checkpoint, "--image", image,
                                               "--prompt", "caption en", "--out",
                                               tmp_path / "boxes.png"])
    assert "not writable (permission denied)" in line


def test_errors_as_a_user_sees_them(mqa_checkpoint, image, tmp_path):
    """The real command lines: exit code 2, one line, no traceback."""
    for script, args in ((
        "train.py",
        ["--data", tmp_path / "nope.jsonl", "--model", mqa_checkpoint, "--out", tmp_path / "o"]),
                         ("infer.py", ["--model", mqa_checkpoint, "--image", image, "--prompt", "x",
                                       "--out", image])):
        r = subprocess.run([sys.executable, ROOT / script, *map(str, args)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"{script}: error: "), r.stderr


def test_what_a_new_user_met(mqa_checkpoint, data, image, tmp_path, capsys):
    assert "holds the data file" in one_line_error(capsys, train.main,
                                                   train_args(data, mqa_checkpoint, data.parent))
    other = tmp_path / "other.png"
    Image.new("RGB", (8, 8)).save(other)
    before = other.read_bytes()
    assert "exists: replace it with --overwrite" in one_line_error(
        capsys, infer.main,
        ["--model", mqa_checkpoint, "--image", image, "--prompt", "x", "--out", other])
    assert other.read_bytes() == before
    typo = mqa_checkpoint.parent / mqa_checkpoint.name.replace("-", "_")
    assert "no such local folder" in one_line_error(
        capsys, infer.main, ["--model", typo, "--image", image, "--prompt", "x"])
    for script in ("train.py", "infer.py"):
        r = subprocess.run([sys.executable, ROOT / script, "--help"], capture_output=True,
                           text=True, timeout=60)
        assert "(default: google/paligemma-3b-pt-224)" in " ".join(r.stdout.split()), r.stdout
