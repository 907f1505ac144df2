"""evaluate.py: a checkpoint scored on a test file as the benchmarks score it, with the same numbers
as train.py's evaluation; its files; its refusals and Ctrl-C."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import train
from tiny import shapes

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tiny" / "paligemma-tiny"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """The tiny shapes' validation file: captions, colour and count questions, detection; a line
    with several references ("answers") and none of its own suffix."""
    folder = tmp_path_factory.mktemp("scenes")
    shapes.main(["--out", str(folder), "--tasks", "caption,colour,count,detect", "--train", "0",
                 "--valid", "24"])
    path = folder / "_annotations.valid.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    lines.append(dict(image=lines[0]["image"], prefix="answer en how many shapes are there?",
                      answers=["2", "two", "3"]))
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_scores_predictions_and_page(scenes, tmp_path, capsys):
    out = tmp_path / "eval"
    evaluate.main(["--model", str(TINY), "--data", str(scenes), "--out", str(out), "--batch-size",
                   "8"])
    printed = capsys.readouterr()
    assert "caption (" in printed.out and "cider" in printed.out and "detect (" in printed.out
    assert "examples/s" in printed.err and "s left" in printed.err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["complete"] and scores["examples"] == 25 and scores["answers_at_token_limit"] == 0
    assert {"caption", "answer", "detect"} <= scores["scores"].keys()
    predictions = [json.loads(line)
                   for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["line"] for p in predictions] == list(range(1, 26))
    assert predictions[-1]["references"] == ["2", "two", "3"]
    assert "vqa_accuracy" in predictions[-1]["scores"]
    page = (out / "index.html").read_text()
    assert "<table>" in page and page.count("<div class=ex>") == 25
    assert "http" not in page.split("</table>")[0]
    assert len(list((out / "images").glob("*.jpg"))) == 25


def test_the_same_map_as_trains_final_evaluation(tmp_path):
    """evaluate.py on the validation file gives the numbers train.py's final evaluation gave the
    same checkpoint (the same batches, the same greedy answers)."""
    data = tmp_path / "shapes"
    shapes.main(["--out", str(data), "--tasks", "detect", "--train", "16", "--valid", "16"])
    out = tmp_path / "ckpt"
    train.main(["--data", str(data / "_annotations.train.jsonl"), "--model", str(TINY), "--out",
                str(out), "--steps", "2", "--batch-size", "8", "--lr", "2e-3", "--eval-examples",
                "16"])
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    evaluate.main(["--model", str(out), "--data", str(data / "_annotations.valid.jsonl"), "--out",
                   str(tmp_path / "eval"), "--batch-size", "8"])
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["scores"]["detect"]
    print(f"train.py's final evaluation map50 {final['detect/map50']}, evaluate.py "
          f"{scores['map50']}")
    assert scores["map50"] == final["detect/map50"] > 0.1
    assert scores["map50_95"] == final["detect/map50_95"]


def one_line_error(args: list) -> tuple[str, str]:
    """evaluate.py as a user runs it: exit code 2, one error line (the first bad lines of a file may
    come before it), no traceback. Returns the line and all of stderr."""
    r = subprocess.run([sys.executable, ROOT / "evaluate.py", *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.startswith("evaluate.py: error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0], r.stderr


def test_refusals(scenes, tmp_path):
    bad = scenes.with_name("bad.jsonl")  # beside the images its lines name
    bad.write_text(scenes.read_text().splitlines()[0] + "\n{not json\n")
    line, err = one_line_error(["--model", TINY, "--data", bad, "--out", tmp_path / "a"])
    assert f"1 bad line(s) in {bad}" in line and f"{bad}:2: not valid JSON" in err
    gone = tmp_path / "gone.jsonl"
    gone.write_text(json.dumps(dict(image="nowhere.jpg", prefix="caption en", suffix="x")) + "\n")
    assert "nowhere.jpg: no such image file" in one_line_error(["--model", TINY, "--data", gone,
                                                                "--out", tmp_path / "b"])[1]
    held = tmp_path / "held"
    held.mkdir()
    (held / "scores.json").write_text("mine")
    assert "holds the results of an evaluation" in one_line_error(["--model", TINY, "--data",
                                                                   scenes, "--out", held])[0]
    assert (held / "scores.json").read_text() == "mine"
    assert "is a file, not a folder" in one_line_error(["--model", TINY, "--data", scenes, "--out",
                                                        scenes])[0]
    # nothing made for a refused run
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_ctrl_c_writes_what_is_done(scenes, tmp_path, monkeypatch):
    calls = []
    real = evaluate.answer_batch

    def second_is_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(evaluate, "answer_batch", second_is_interrupted)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", str(TINY), "--data", str(scenes), "--out", str(tmp_path / "o"),
                       "--batch-size", "8"])
    assert e.value.code == 130
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert scores["examples"] == 8 and not scores["complete"]
    assert len((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()) == 8
