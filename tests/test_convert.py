"""convert.py: COCO detection, segmentation and captions, VQAv2, TextVQA/DocVQA-style JSON and
Hugging Face parquet files become the JSONL train.py and evaluate.py read. Small files in each
official layout (the formats' published field names), checked line by line, odd cases included;
polygons rasterized exactly as pycocotools; bad input one line naming the file and record."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_rle

import convert
import evaluate
from detections import parse_detections, segment_tokens
from vqvae import VQVAE

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tiny" / "paligemma-tiny"
VAE = ROOT / "tiny" / "vae-tiny.npz"


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def images(folder: Path, *names: str, size=(64, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", size, "grey").save(folder / name)
    return folder


def one_line_error(args: list) -> str:
    r = subprocess.run([sys.executable, ROOT / "convert.py", *map(str, args)], capture_output=True,
                       text=True, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.startswith("convert.py: error: ")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def coco_file(folder: Path, annotations: list[dict], categories=None, extra_images=()) -> Path:
    """instances_val2017.json's layout: two images (a.jpg, b.jpg, 64x48) and the annotations
    given."""
    images(folder, "a.jpg", "b.jpg")
    data = dict(info={}, licenses=[], images=[dict(id=1, file_name="a.jpg", width=64, height=48),
                                              dict(id=2, file_name="b.jpg", width=64, height=48),
                                              *extra_images],
                annotations=annotations, categories=categories or [
                    dict(id=1, name="cat", supercategory="animal"),
                    dict(id=2, name="hot dog", supercategory="food"),
                    dict(id=3, name="ŝpinaĉo", supercategory="food")])
    (folder / "instances.json").write_text(json.dumps(data))
    return folder / "instances.json"


def box(i, image, category, bbox, **extra):
    return dict(id=i, image_id=image, category_id=category, bbox=bbox, area=bbox[2] * bbox[3],
                iscrowd=0) | extra


def test_coco_detection(tmp_path, capsys):
    path = coco_file(tmp_path, [
        box(1, 1, 2, [30, 20, 10, 10]), box(2, 1, 1, [4, 4, 20, 16]),
        box(3, 1, 3, [50, 30, 30, 30]),  # leaves the image: clipped to it, and counted
        box(4, 1, 1, [0, 0, 64, 48], iscrowd=1),  # a crowd region: skipped, counted
        box(5, 1, 1, [70, 10, 5, 5]),  # wholly outside: skipped, counted
    ])  # image b has no annotation: no example, counted
    convert.main(["coco-detect", str(path)])
    printed = capsys.readouterr().out
    assert "1 crowd annotations" in printed and "1 boxes clipped to their image" in printed
    assert "1 boxes holding no whole pixel of the image" in printed
    assert "1 images without objects" in printed
    [line] = lines_of(tmp_path / "annotations.jsonl")
    # names sorted
    assert line["image"] == "a.jpg" and line["prefix"] == "detect cat ; hot dog ; ŝpinaĉo"
    found = parse_detections(line["suffix"], 64, 48)
    assert [d.label for d in found] == ["cat", "hot dog", "ŝpinaĉo"]  # top to bottom
    assert np.allclose(found[2].box, (50, 30, 64, 48),
                       atol=64 / 1024) and np.allclose(found[0].box, (4, 4, 24, 20),
                                                       atol=64 / 1024)
    convert.main(["coco-detect", str(path), "--classes", "all", "--out",
                  str(tmp_path / "all.jsonl")])
    assert [e["prefix"] for e in lines_of(tmp_path / "all.jsonl")] == ["detect cat ; hot dog ; "
                                                                       "ŝpinaĉo"] * 2
    assert lines_of(tmp_path / "all.jsonl")[1]["suffix"] == ""  # asked for all, finds none


def test_polygons_are_rasterized_as_pycocotools(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w, k = int(rng.integers(5, 80)), int(rng.integers(5, 80)), int(rng.integers(3, 12))
        angles, radii = np.sort(rng.uniform(0, 2 * np.pi, k)), rng.uniform(0.3, 40, k)
        x = rng.uniform(-5, w + 5) + radii * np.cos(angles)
        y = rng.uniform(-5, h + 5) + radii * np.sin(angles)
        polygon = np.round(np.stack([x, y], 1).ravel(), int(rng.integers(0, 3))).tolist()
        theirs = coco_rle.decode(coco_rle.merge(coco_rle.frPyObjects([polygon], h, w))).astype(bool)
        assert np.array_equal(convert.coco_mask([polygon], h, w), theirs), polygon


def test_coco_segmentation_encodes_as_one_mask_at_a_time(tmp_path):
    """Masks batched through the VQ-VAE give the codes that detections.segment_tokens gives one by
    one."""
    vae = VQVAE.from_pretrained(VAE)
    triangle = [4, 4, 24, 4, 14, 20]
    path = coco_file(tmp_path, [
        box(1, 1, 1, [4, 4, 20, 16], segmentation=[triangle]),
        box(2, 2, 2, [10, 10, 40, 30], segmentation=[[10, 10, 50, 12, 30, 40, 12, 38]])])
    examples, counts = convert.coco_segment(path, tmp_path, vae)
    assert [e["prefix"] for e in examples] == ["segment cat", "segment hot dog"] and not counts
    alone = segment_tokens(convert.coco_mask([triangle], 48, 64), (4, 4, 24, 20), vae)
    assert examples[0]["suffix"] == f"{alone} cat"


BAD_COCO = [
    ("an RLE of another size", dict(segmentation={"counts": [0, 12], "size": [3, 4]}),
     "annotation 1 (image 1): its RLE's size [3, 4] is not its image's [48, 64]"),
    ("counts that do not cover the image",
     dict(segmentation={"counts": [10, 20], "size": [48, 64]}),
     "annotation 1 (image 1): its RLE's counts cover 30 pixels"),
    ("a corrupt compressed RLE", dict(segmentation={"counts": "PPa", "size": [48, 64]}),
     "annotation 1 (image 1): its compressed RLE ends in the middle of a number"),
    ("a one-point polygon", dict(segmentation=[[3, 3]]), "annotation 1 (image 1): a polygon of it "
     "has fewer than 3"),
    ("an empty polygon list", dict(segmentation=[]), "annotation 1 (image 1): it has no "
     "segmentation"),
]


@pytest.mark.parametrize("name, change, expected", BAD_COCO, ids=[b[0] for b in BAD_COCO])
def test_bad_coco_annotations_are_named_or_skipped(name, change, expected, tmp_path, capsys):
    path = coco_file(tmp_path, [box(1, 1, 1, [4, 4, 20, 16]) | change,
                                box(2, 2, 1, [4, 4, 20, 16], segmentation=[[4, 4, 24, 4, 14, 20]])])
    assert expected in one_line_error(["coco-segment", path, "--vae", VAE])
    assert not (tmp_path / "annotations.jsonl").exists()
    convert.main(["coco-segment", str(path), "--vae", str(VAE), "--skip-bad"])
    assert "1 masks that cannot be read" in capsys.readouterr().out
    assert len(lines_of(tmp_path / "annotations.jsonl")) == 1


@pytest.mark.parametrize("categories, extra_images, expected", [
    ([dict(id=1, name="a;b")], (), "category 1 is named 'a;b': it holds ';'"),
    ([dict(id=1, name=" ")], (), "category 1 is named ' ': it is empty"),
    ([dict(id=1, name="x<loc0001>")], (), "category 1 is named 'x<loc0001>': it holds '<' or '>'"),
    ([dict(id=1, name="tab\there")], (), "it holds a control character"),
    (None, [dict(id=1, file_name="a.jpg", width=64, height=48)], "image 1 is listed twice "
     "(images[2])"),
    (None, [dict(id=9, file_name="huge.jpg", width=10**6, height=10**6)],
     "image 9 is 1000000 x 1000000 pixels, more than the limit of 89,478,485"),
], ids=["semicolon", "empty", "loc token", "tab", "image twice", "huge image"])
def test_coco_files_refused_whole(categories, extra_images, expected, tmp_path):
    path = coco_file(tmp_path, [box(1, 1, 1, [4, 4, 20, 16])], categories, extra_images)
    assert expected in one_line_error(["coco-detect", path])


def test_an_annotation_of_an_unknown_image(tmp_path, capsys):
    path = coco_file(tmp_path, [box(1, 7, 1, [4, 4, 20, 16]), box(2, 1, 1, [4, 4, 20, 16])])
    assert "annotation 1 names image 7, which the file does not list" in one_line_error([
        "coco-detect", path])
    convert.main(["coco-detect", str(path), "--skip-bad"])
    assert "1 annotations of unknown images" in capsys.readouterr().out


def test_coco_captions(tmp_path):
    images(tmp_path / "val2017", "000000000139.jpg", "000000000285.jpg")
    data = dict(images=[dict(id=139, file_name="000000000139.jpg", width=64, height=48),
                        dict(id=285, file_name="000000000285.jpg", width=64, height=48)],
                annotations=[dict(id=i, image_id=139, caption=c) for i, c in enumerate(
                    ["A woman stands in the dining area at the table.", "A room with chairs, a "
                     "table, and a woman.",
                     " A woman  standing in a kitchen by a window\n", "A person standing at a "
                     "table.",
                     "A woman sitting at a table."])] + [dict(id=9, image_id=285, caption="A big "
                                                              "brown bear.")])
    (tmp_path / "captions_val2017.json").write_text(json.dumps(data))
    convert.main(["coco-captions", str(tmp_path / "captions_val2017.json"), "--images",
                  str(tmp_path / "val2017")])
    lines = lines_of(tmp_path / "annotations.jsonl")
    assert [(e["image"], e["prefix"]) for e in lines] == [
        ("val2017/000000000139.jpg", "caption en"), ("val2017/000000000285.jpg", "caption en")]
    assert lines[0]["suffix"] == "A woman stands in the dining area at the table."
    assert len(lines[0]["answers"]) == 5
    # whitespace collapsed
    assert lines[0]["answers"][2] == "A woman standing in a kitchen by a window"
    convert.main(["coco-captions", str(tmp_path / "captions_val2017.json"), "--images",
                  str(tmp_path / "val2017"), "--each-caption", "--out",
                  str(tmp_path / "each.jsonl")])
    assert len(lines_of(tmp_path / "each.jsonl")) == 6


def vqav2_files(folder: Path) -> tuple[Path, Path]:
    images(folder / "val2014", "COCO_val2014_000000262148.jpg")
    questions = dict(data_subtype="val2014", questions=[
        dict(image_id=262148, question="Where is he looking?", question_id=262148000),
        dict(image_id=262148, question="How many people are there?", question_id=262148001)])
    answers = [dict(answer=a, answer_confidence="yes", answer_id=i + 1) for i, a in enumerate(
        ["down", "down", "at table", "skateboard", "down", "table", "down", "down", "down",
         "down"])]
    annotations = dict(data_subtype="val2014", annotations=[
        dict(question_id=262148000, image_id=262148, question_type="where is", answer_type="other",
             multiple_choice_answer="down", answers=answers),
        dict(question_id=262148001, image_id=262148, question_type="how many", answer_type="number",
             multiple_choice_answer="2", answers=[dict(answer="2", answer_confidence="yes",
                                                       answer_id=j)
                                                  for j in range(1, 11)])])
    (folder / "questions.json").write_text(json.dumps(questions))
    (folder / "annotations.json").write_text(json.dumps(annotations))
    return folder / "questions.json", folder / "annotations.json"


def test_vqav2_and_then_evaluate(tmp_path):
    """Converted, then scored: the ten human answers are the references of VQA accuracy."""
    questions, annotations = vqav2_files(tmp_path)
    convert.main(["vqav2", str(questions), str(annotations), "--images", str(tmp_path / "val2014")])
    lines = lines_of(tmp_path / "annotations.jsonl")
    # duplicates kept: VQA counts them
    assert lines[0] == dict(image="val2014/COCO_val2014_000000262148.jpg",
                            prefix="answer en Where is he looking?", suffix="down",
                            answers=["down", "down", "at table", "skateboard", "down", "table",
                                     "down", "down", "down", "down"])
    evaluate.main(["--model", str(TINY), "--data", str(tmp_path / "annotations.jsonl"), "--out",
                   str(tmp_path / "e")])
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())["scores"]["answer"]
    assert scores["examples"] == 2 and 0 <= scores["vqa_accuracy"] <= 1


def test_vqav2_missing_image_and_unanswered_question(tmp_path):
    questions, annotations = vqav2_files(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000262148.jpg").unlink()
    assert "question 262148000 (record 0): its image" in one_line_error([
        "vqav2", questions, annotations, "--images", tmp_path / "val2014"])


def test_textvqa_and_docvqa_layouts(tmp_path):
    images(tmp_path / "train_images", "003a8ae2ef43b901.jpg")
    images(tmp_path / "documents", "xnbl0037_1.png")
    textvqa = dict(dataset_name="textvqa", data=[dict(
        question="what is written?", image_id="003a8ae2ef43b901", answers=["stop"] * 9 + ["STOP"],
        question_id=34602)])
    docvqa = dict(dataset_name="docvqa", data=[dict(
        questionId=52212, question="Whose name is on the page?",
        image="documents/xnbl0037_1.png", answers=["T.F. Riehl"])])
    (tmp_path / "textvqa.json").write_text(json.dumps(textvqa))
    (tmp_path / "docvqa.json").write_text(json.dumps(docvqa))
    convert.main(["vqa", str(tmp_path / "textvqa.json"), "--images",
                  str(tmp_path / "train_images")])
    convert.main(["vqa", str(tmp_path / "docvqa.json"), "--out", str(tmp_path / "doc.jsonl")])
    first = lines_of(tmp_path / "annotations.jsonl")[0]
    assert first["image"] == "train_images/003a8ae2ef43b901.jpg"
    assert lines_of(tmp_path / "doc.jsonl")[0] == dict(
        image="documents/xnbl0037_1.png", prefix="answer en Whose name is on the page?",
        suffix="T.F. Riehl", answers=["T.F. Riehl"])
    docvqa["data"][0]["answers"] = None  # a test split's question: no answers
    (tmp_path / "docvqa.json").write_text(json.dumps(docvqa))
    assert "record 0 (question 52212): no answers" in one_line_error([
        "vqa", tmp_path / "docvqa.json", "--out", tmp_path / "x.jsonl"])


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_of_a_hugging_face_dataset(tmp_path, capsys):
    red, blue = png_bytes("red"), png_bytes("blue")
    table = pa.table({"image": [{"bytes": red, "path": "a.png"}, {"bytes": blue, "path": None},
                                {"bytes": red, "path": "a.png"}],
                      "question": ["what colour?", "what colour?", "and now?"],
                      "multiple_choice_answer": ["red", "blue", "red"],
                      "answers": [[{"answer": "red", "answer_id": 1},
                                   {"answer": "crimson", "answer_id": 2}],
                                  [{"answer": "blue", "answer_id": 1}],
                                  [{"answer": "red", "answer_id": 1}]]})
    pq.write_table(table, tmp_path / "validation-00000-of-00001.parquet")
    out = tmp_path / "vqa" / "val.jsonl"
    out.parent.mkdir()
    convert.main(["parquet", str(tmp_path / "validation-00000-of-00001.parquet"), "--prefix",
                  "answer en {question}", "--suffix", "{multiple_choice_answer}", "--answers",
                  "{answers}", "--out", str(out)])
    lines = lines_of(out)
    assert lines[0]["prefix"] == "answer en what colour?"
    assert lines[0]["answers"] == ["red", "crimson"]
    assert lines[0]["image"] == lines[2]["image"] != lines[1]["image"]  # an image written once
    assert len(list((out.parent / "images").iterdir())) == 2
    with Image.open(out.parent / lines[1]["image"]) as image:
        assert image.getpixel((0, 0)) == (0, 0, 255)
    assert "no column 'answer'" in one_line_error([
        "parquet", tmp_path / "validation-00000-of-00001.parquet", "--prefix", "{question}",
        "--suffix", "{answer}", "--out", tmp_path / "x.jsonl"])
    pq.write_table(pa.table({"image": [{"bytes": b"not a png", "path": None}], "text": ["x"]}),
                   tmp_path / "b.parquet")
    assert "row 0: its image does not decode" in one_line_error([
        "parquet", tmp_path / "b.parquet", "--prefix", "caption en", "--suffix", "{text}", "--out",
        tmp_path / "y.jsonl"])
    assert "nope.parquet: no such file" in one_line_error([
        "parquet", tmp_path / "nope.parquet", "--prefix", "caption en", "--suffix", "{text}"])


def test_a_parquet_image_cut_by_a_kill_is_written_again(tmp_path):
    """images/ keeps each image under its digest; one a killed run left cut short is not taken as
    written."""
    red = png_bytes("red")
    pq.write_table(pa.table({"image": [{"bytes": red, "path": "a.png"}], "text": ["x"]}),
                   tmp_path / "a.parquet")
    args = ["parquet", str(tmp_path / "a.parquet"), "--prefix", "caption en", "--suffix", "{text}",
            "--out", str(tmp_path / "a.jsonl")]
    convert.main(args)
    [image] = (tmp_path / "images").iterdir()
    image.write_bytes(red[:20])  # as a kill in the middle of writing it would have left it
    convert.main(args + ["--overwrite"])
    assert image.read_bytes() == red and not list((tmp_path / "images").glob(".*.tmp"))


def test_output_rules(tmp_path):
    path = coco_file(tmp_path, [box(1, 1, 1, [4, 4, 20, 16])])
    (tmp_path / "annotations.jsonl").write_text("mine")
    assert "exists: replace it with --overwrite" in one_line_error(["coco-detect", path])
    assert "is one of the input files" in one_line_error(["coco-detect", path, "--out", path])
    assert (tmp_path / "annotations.jsonl").read_text() == "mine"
    assert json.loads(path.read_text())["images"]


def test_a_nan_box_in_a_coco_export_is_skipped(tmp_path, capsys):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.jpg")
    export = {"images": [dict(id=1, file_name="a.jpg", width=32,
                              height=32)], "categories": [dict(id=1, name="x")],
              "annotations": [dict(id=1, image_id=1, category_id=1, bbox=[float("nan"), 2, 10, 10],
                                   segmentation=[[2, 2, 12, 2, 12, 12]]),
                              dict(id=2, image_id=1, category_id=1, bbox=[2, 2, 10, 10],
                                   segmentation=[[2, 2, 12, 2, 12, 12]])]}
    # json writes NaN, as Python reads it
    (tmp_path / "_annotations.coco.json").write_text(json.dumps(export))
    convert.main(["coco-segment", str(tmp_path / "_annotations.coco.json"), "--vae",
                  str(ROOT / "tiny" / "vae-tiny.npz")])
    assert "1 boxes that are not numbers" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "annotations.jsonl").read_text())["suffix"].split(" ; ")) == 1
