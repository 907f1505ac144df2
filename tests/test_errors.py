"""Every bad input to train.py and infer.py is one line on stderr and exit code 2, never a traceback, and
nothing a user has is overwritten: each case is the command's arguments and a fragment of the message."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data as data_py
import infer
import train
from conftest import random_images, rewrite_official
from paligemma import PaliGemma, read_config
from processor import Processor, load_image

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys, main, argv) -> str:
    """Runs a command's main in this process; it must exit with code 2 and one error line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


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
    (["--trainable", "lora", "--lora-targets", "q_proj,qkv"], "argument --lora-targets: qkv: not one of"),
    (["--trainable", "lora", "--lora-rank", "0"], "argument --lora-rank: must be an integer >= 1"),
    (["--trainable", "lora", "--fsdp", "--merge"], "--fsdp does not take --merge"),
    (["--device", "nonsense"], "--device 'nonsense' is not a device name"),
    (["--device", "cuda:99"], "--device 'cuda:99': this machine has"),
    *([(["--device", "cuda"], "--device 'cuda': this machine has no CUDA GPU")]
      if not torch.cuda.is_available() else []),
    *([(["--device", "mps"], "--device 'mps': MPS")] if not torch.backends.mps.is_available() else []),
]


@pytest.mark.parametrize("extra, expected", OPTIONS, ids=[" ".join(o[0]) for o in OPTIONS])
def test_train_options(extra, expected, mqa_checkpoint, data, tmp_path, capsys):
    line = one_line_error(capsys, train.main, ["--data", data, "--model", mqa_checkpoint, "--out", tmp_path / "o",
                                               *extra])
    assert expected in line


# ----------------------------------------------------------------------------------------------
# train.py: --out, --model, --resume


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
    return ["--out", tmp / "o"], "holds a checkpoint (model.safetensors): continue it with --resume, replace it"


def resume_without_checkpoint(tmp, ckpt, data):
    return ["--out", tmp / "empty", "--resume"], "holds no checkpoint written by train.py"


def resume_and_overwrite(tmp, ckpt, data):
    shutil.copytree(ckpt, tmp / "o")
    return ["--out", tmp / "o", "--resume", "--overwrite"], "give one of them"


def resume_without_step(tmp, ckpt, data):
    shutil.copytree(ckpt, tmp / "o")  # a transformers save: no step in its metadata
    return ["--out", tmp / "o", "--resume"], "has no step in its metadata: it was not written by train.py"


CASES = [out_is_a_file, out_below_a_file, out_is_the_model, model_inside_out, out_inside_model,
         out_holds_a_checkpoint, resume_without_checkpoint, resume_and_overwrite, resume_without_step]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_train_out_model_resume(case, mqa_checkpoint, data, tmp_path, capsys):
    extra, expected = case(tmp_path, mqa_checkpoint, data)
    before = {p: p.read_bytes() for p in mqa_checkpoint.iterdir()}
    line = one_line_error(capsys, train.main, ["--data", data, "--model", mqa_checkpoint, "--out", tmp_path / "o",
                                               "--steps", "1", "--batch-size", "4", *extra])
    assert expected in line
    assert {p: p.read_bytes() for p in mqa_checkpoint.iterdir()} == before  # the source model is untouched


def test_out_not_writable(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and real_access(p, mode))
    line = one_line_error(capsys, train.main, ["--data", data, "--model", mqa_checkpoint, "--out",
                                               tmp_path / "ro" / "o"])
    assert "is not writable (permission denied)" in line


def test_overwrite_replaces_an_earlier_run(trained, data, tmp_path, capsys):
    out = shutil.copytree(trained, tmp_path / "o")
    train.main(["--data", str(data), "--model", str(trained), "--out", str(out), "--steps", "1", "--batch-size", "4",
                "--eval-every", "0", "--overwrite"])
    assert "--overwrite" in capsys.readouterr().out
    assert torch.load(out / "train_state.pt")["step"] == 1
    assert {json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()} == {1}


def test_resume_checks(trained, data, tmp_path, capsys):
    args = ["--data", data, "--model", "unused/hub-id", "--steps", "3", "--batch-size", "4", "--resume"]
    out = shutil.copytree(trained, tmp_path / "sgd")
    assert "trained with --optimizer adamw, not sgd" in one_line_error(
        capsys, train.main, args + ["--out", out, "--optimizer", "sgd"])
    out = shutil.copytree(trained, tmp_path / "truncated")
    (out / "train_state.pt").write_bytes((out / "train_state.pt").read_bytes()[:1000])
    expected = f"--resume: {out / 'train_state.pt'} cannot be read"
    assert expected in one_line_error(capsys, train.main, args + ["--out", out])
    out = shutil.copytree(trained, tmp_path / "done")
    assert "is at step 2 already" in one_line_error(capsys, train.main, args + ["--out", out, "--steps", "2"])


# ----------------------------------------------------------------------------------------------
# train.py: data


def write_lines(tmp, data, *lines: bytes) -> Path:
    """A JSONL beside the fixture's images, with the fixture's first 4 lines and then `lines`."""
    for f in data.parent.glob("train.jsonl-*.png"):
        shutil.copy(f, tmp)
    path = tmp / "bad.jsonl"
    path.write_bytes(b"\n".join(data.read_bytes().splitlines()[:4] + list(lines)) + b"\n")
    return path


def line(image, prefix="caption en", suffix="x") -> bytes:
    return json.dumps({"image": str(image), "prefix": prefix, "suffix": suffix}).encode()


DATA = [
    ("non-UTF-8", lambda tmp: line("train.jsonl-0.png").replace(b"caption", b"capti\xff\xfeon"),
     ":5: not UTF-8 text (byte "),
    ("image is a directory", lambda tmp: (tmp / "folder.png").mkdir() or line("folder.png"),
     "folder.png: is a directory, not an image file"),
    ("empty image", lambda tmp: (tmp / "empty.png").write_bytes(b"") and b"" or line("empty.png"),
     "empty.png: is an empty file"),
    ("file name too long", lambda tmp: line("x" * 300 + ".png"), ": file name too long for this system"),
    ("no room for the answer", lambda tmp: line("train.jsonl-0.png", prefix="caption en " + "word " * 40),
     "--max-len 16 leaves no room for the answer"),
]


@pytest.mark.parametrize("name, bad_line, expected", DATA, ids=[d[0] for d in DATA])
def test_train_bad_data(name, bad_line, expected, mqa_checkpoint, data, tmp_path, capsys):
    path = write_lines(tmp_path, data, bad_line(tmp_path))
    with pytest.raises(SystemExit) as e:
        train.main(["--data", str(path), "--model", str(mqa_checkpoint), "--out", str(tmp_path / "o"),
                    "--max-len", "16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path}:5: " in err and expected in err and "Traceback" not in err, err


def test_data_file_errors(mqa_checkpoint, data, tmp_path, capsys, monkeypatch):
    args = ["--model", mqa_checkpoint, "--out", tmp_path / "o"]
    assert "is a directory, not a JSONL file" in one_line_error(capsys, train.main, ["--data", tmp_path, *args])
    assert "no such file" in one_line_error(capsys, train.main, ["--data", tmp_path / "nope.jsonl", *args])
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission "
                        "denied")) if p.name == "locked.jsonl" else real(p))
    assert "locked.jsonl: cannot be read (Permission denied)" in one_line_error(
        capsys, train.main, ["--data", tmp_path / "locked.jsonl", *args])


def test_utf8_bom_is_accepted(mqa_checkpoint, data, tmp_path):
    path = write_lines(tmp_path, data)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    train.main(["--data", str(path), "--model", str(mqa_checkpoint), "--out", str(tmp_path / "o"), "--steps", "1",
                "--batch-size", "4", "--eval-every", "0"])
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_image_gone_during_training(trained, data, tmp_path, capsys, monkeypatch):
    """An image deleted after the data check: the run stops naming it; the checkpoint it resumed stays."""
    path = write_lines(tmp_path, data)
    out = shutil.copytree(trained, tmp_path / "o")
    before = (out / "model.safetensors").read_bytes()
    real_log = train.log

    def delete_after_check(*args, **kwargs):
        real_log(*args, **kwargs)
        if str(args[0]).startswith("resumed from"):
            for f in tmp_path.glob("train.jsonl-*.png"):
                f.unlink()
    monkeypatch.setattr(train, "log", delete_after_check)
    line = one_line_error(capsys, train.main, ["--data", path, "--model", "unused/hub-id", "--out", out, "--steps", "4",
                                               "--batch-size", "4", "--resume"])
    assert "no such image file; stopped before step 3" in line and "--resume" in line
    assert (out / "model.safetensors").read_bytes() == before


def test_large_images_are_decoded_one_at_a_time(data, monkeypatch):
    """The data check decodes in threads but never holds two large images at once."""
    active, most = [0], [0]
    real = data_py.load_image

    def counting(path):
        active[0] += 1
        most[0] = max(most[0], active[0])
        try:
            return real(path)
        finally:
            active[0] -= 1
    monkeypatch.setattr(data_py, "load_image", counting)
    monkeypatch.setattr(data_py, "LARGE_IMAGE", 0)  # every image counts as large
    assert len(data_py.read_jsonl(data, skip_bad=False)) == 16 and most[0] == 1


def test_disk_full_during_save(trained, data, tmp_path, capsys, monkeypatch):
    out = shutil.copytree(trained, tmp_path / "o")
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def full(path, tensors, metadata):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_safetensors", full)
    line = one_line_error(capsys, train.main, ["--data", data, "--model", "unused/hub-id", "--out", out, "--steps", "3",
                                               "--batch-size", "4", "--eval-every", "0", "--resume"])
    assert "cannot save the checkpoint of step 3" in line and "No space left on device" in line and "intact" in line
    after = {f.name: f.read_bytes() for f in out.iterdir()}
    assert {k: v for k, v in after.items() if k != "metrics.jsonl"} == \
        {k: v for k, v in before.items() if k != "metrics.jsonl"}  # the step-2 checkpoint, and no temporary file


def test_saved_files_have_the_mode_of_their_siblings(trained):
    modes = {f.name: f.stat().st_mode & 0o777 for f in trained.iterdir()}
    assert len(set(modes.values())) == 1, modes


# ----------------------------------------------------------------------------------------------
# Checkpoints, as --model of either tool and through the Python API


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


CHECKPOINTS = [
    ("truncated weights", lambda t, c: broken(t, c, lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:5000])), "model.safetensors: not a readable safetensors file"),
    ("empty weights", lambda t, c: broken(t, c, lambda f: (f / "model.safetensors").write_bytes(b"")),
     "model.safetensors: not a readable safetensors file"),
    ("corrupt weights", lambda t, c: broken(t, c, lambda f: (f / "model.safetensors").write_bytes(b"\x10" * 64)),
     "model.safetensors: not a readable safetensors file"),
    ("weights are a folder", lambda t, c: broken(t, c, lambda f: (f / "model.safetensors").unlink() or
                                                 (f / "model.safetensors").mkdir()), "it is a folder"),
    ("invalid config.json", lambda t, c: broken(t, c, lambda f: (f / "config.json").write_text('{"text_config": {,}')),
     "config.json: not valid JSON (Expecting property name enclosed in double quotes at line 1, column 18)"),
    ("config.json not an object", lambda t, c: broken(t, c, lambda f: (f / "config.json").write_text("[1, 2]")),
     "config.json: expected a JSON object"),
    ("config field of the wrong type", lambda t, c: broken(t, c, wrong_field_type),
     'vision_config.hidden_size is "wide"; expected int >= 1'),
    ("gemma3", lambda t, c: broken(t, c, wrong_model_type),
     "text_config.model_type is 'gemma3'; supported are 'gemma' (PaliGemma) and 'gemma2' (PaliGemma 2)"),
    ("index without weight_map", lambda t, c: sharded(t, c, lambda index: {"metadata": {}}),
     "model.safetensors.index.json: expected a JSON object with a weight_map"),
    ("index names a missing tensor", lambda t, c: sharded(t, c, lambda index: index | {"weight_map": index["weight_map"]
     | {"language_model.model.norm.weight": "model-00001-of-00002.safetensors"
        if index["weight_map"]["language_model.model.norm.weight"].startswith("model-00002")
        else "model-00002-of-00002.safetensors"}}), "puts language_model.model.norm.weight in model-0000"),
    ("corrupt tokenizer", lambda t, c: broken(t, c, lambda f: (f / "tokenizer.model").write_bytes(b"garbage")),
     "tokenizer.model: not a readable SentencePiece model"),
]


@pytest.mark.parametrize("name, make, expected", CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def test_broken_checkpoints(name, make, expected, mqa_checkpoint, data, tmp_path, capsys):
    folder = make(tmp_path, mqa_checkpoint)
    with pytest.raises((ValueError, OSError), match=".") as e:
        PaliGemma.from_pretrained(folder)
        Processor.from_pretrained(folder)
    assert expected in str(e.value)
    for main, argv in ((train.main, ["--data", data, "--out", tmp_path / "o"]),
                       (infer.main, ["--image", data.parent / "train.jsonl-0.png", "--prompt", "caption en"])):
        assert expected in one_line_error(capsys, main, ["--model", folder, *argv])


def test_config_layer_types_must_fit(mqa_checkpoint, tmp_path):
    folder = broken(tmp_path, mqa_checkpoint, lambda f: None)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"] |= {"model_type": "gemma2", "layer_types": ["full_attention"]}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="layer_types has 1 entries for 2 layers"):
        read_config(folder / "config.json")


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
    (lambda tmp, image: ["--out", tmp / "boxes.xyz"], "give an image file name ending in .png or .jpg"),
    (lambda tmp, image: ["--out", tmp / "missing" / "boxes.png"], "the folder " + "{tmp}/missing does not exist"),
    (lambda tmp, image: ["--out", image], "is one of the input images; it would be overwritten"),
    (lambda tmp, image: ["--image", image.with_name("a_1.png"), "--out", image], "a_1.png is one of the input images"),
    (lambda tmp, image: ["--image", tmp], "is a directory, not an image file"),
    (lambda tmp, image: ["--image", bomb(tmp)], "bomb.png: too large to decode safely"),
    (lambda tmp, image: ["--vae", tmp / "vae-oid.npz"], "--vae {tmp}/vae-oid.npz: no such file"),
]


@pytest.mark.parametrize("case, expected", INFER, ids=[str(i) for i in range(len(INFER))])
def test_infer_errors(case, expected, mqa_checkpoint, image, tmp_path, capsys):
    extra = case(tmp_path, image) if callable(case) else case
    before = image.read_bytes()
    argv = ["--model", mqa_checkpoint, "--image", image, "--prompt", "caption en", *extra]
    assert expected.format(tmp=tmp_path) in one_line_error(capsys, infer.main, argv)
    assert image.read_bytes() == before


def test_infer_out_not_writable(mqa_checkpoint, image, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    line = one_line_error(capsys, infer.main, ["--model", mqa_checkpoint, "--image", image, "--prompt", "caption en",
                                               "--out", tmp_path / "boxes.png"])
    assert "not writable (permission denied)" in line


def test_errors_as_a_user_sees_them(mqa_checkpoint, image, tmp_path):
    """The real command lines: exit code 2, one line, no traceback."""
    for script, args in (("train.py", ["--data", tmp_path / "nope.jsonl", "--model", mqa_checkpoint, "--out",
                                       tmp_path / "o"]),
                         ("infer.py", ["--model", mqa_checkpoint, "--image", image, "--prompt", "x", "--out", image])):
        r = subprocess.run([sys.executable, ROOT / script, *map(str, args)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"{script}: error: "), r.stderr


# ----------------------------------------------------------------------------------------------
# The Python API


def test_processor_wants_pil_images(mqa_checkpoint):
    processor = Processor.from_pretrained(mqa_checkpoint)
    for thing, expected in ((None, "got NoneType"), ("cat.jpg", "got str: open files with processor.load_image"),
                            (np.zeros((8, 8, 3), np.uint8), "got ndarray")):
        with pytest.raises(TypeError, match=f"expected a PIL image, {expected}"):
            processor([thing], ["caption en"])


def test_wrong_resolution_names_the_expected_one(mqa_checkpoint):
    model = PaliGemma.from_pretrained(mqa_checkpoint)
    batch = Processor.from_pretrained(mqa_checkpoint)(random_images(1), ["caption en"])
    with pytest.raises(ValueError, match=r"this model takes images of 28x28 pixels, as \(B, 3, 28, 28\)"):
        model(batch["input_ids"], torch.zeros(1, 3, 56, 56))


def test_high_bit_depth_images_keep_their_contrast(mqa_checkpoint):
    """I;16, I and F images: scaled by their range, not clipped to white or black as PIL converts them."""
    processor = Processor.from_pretrained(mqa_checkpoint)
    ramp = np.linspace(0, 1, 28 * 28).reshape(28, 28)
    for image in (Image.fromarray((ramp * 65535).astype(np.uint16)),  # I;16
                  Image.fromarray((ramp * 1e6 - 5e5).astype(np.int32)),  # I, negative values too
                  Image.fromarray(ramp.astype(np.float32))):  # F in [0, 1]
        pixels = processor.preprocess_image(image)
        expected = processor.preprocess_image(Image.fromarray((ramp * 255).round().astype(np.uint8)))
        assert (pixels - expected).abs().max() <= 2 / 255 + 1e-6, image.mode


def test_only_real_loc_and_seg_tokens_are_special(mqa_checkpoint):
    tok = Processor.from_pretrained(mqa_checkpoint).tokenizer
    unk = tok.sp.unk_id()
    for text in ("<loc1024>", "<loc9999>", "<seg128>", "<seg999>"):
        assert unk not in tok.encode(text) and tok.decode(tok.encode(text)) == text, text
    assert tok.encode("<loc1023><seg127>") == [tok.sp.piece_to_id("<loc1023>"), tok.sp.piece_to_id("<seg127>")]


def test_load_image_names_the_problem(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    for path, expected in ((tmp_path / "nope.jpg", "no such image file"), (tmp_path, "is a directory"),
                           (tmp_path / "empty.jpg", "is an empty file"), (tmp_path / "text.jpg", "cannot be decoded")):
        with pytest.raises(ValueError, match=expected):
            load_image(path)
