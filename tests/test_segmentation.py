"""Segment answers parsed into masks, and COCO segmentation exports turned into training data."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_rle

import convert
from convert import coco_mask
from detections import parse_detections
from test_vqvae import vae_npz
from vqvae import VQVAE


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae") / "vae.npz"
    arrays = vae_npz(path)
    # masks neither empty nor full
    np.savez(path, **arrays | {"decoder.12.bias": np.array([0.35], np.float32)})
    return VQVAE.from_npz(path)


def segs(*codes) -> str:
    return "".join(f"<seg{c:03d}>" for c in codes)


def test_parse_segment_answers(vae):
    one, two = list(range(16)), list(range(100, 116))
    text = (f"<loc0000><loc0000><loc0512><loc0512>{segs(*one)} cat ; "
            f"<loc0512><loc0256><loc1000><loc0768>{segs(*two)} dog ; "
            # 3 codes, not 16: a box only
            f"<loc0100><loc0100><loc0200><loc0200>{segs(1, 2, 3)} short ; "
            # <seg128> is text, not a code
            f"<loc0100><loc0100><loc0200><loc0200><seg128>{segs(*one)} bad")
    found = parse_detections(text, width=200, height=100, vae=vae)
    assert [(d.label, d.codes) for d in found] == [("cat", tuple(one)), ("dog", tuple(two)),
                                                   ("short", None), ("", None)]
    cat, dog = found[0].mask, found[1].mask
    assert cat.shape == (100,
                         200) and cat[:, 100:].sum() == 0 and cat[50:].sum() == 0 and cat.sum() > 0
    assert dog[:50].sum() == 0 and dog.sum() > 0 and found[2].mask is None
    # no VQ-VAE: boxes and codes only
    assert all(d.mask is None for d in parse_detections(text, 200, 100))


def test_coco_masks_from_polygons_and_rle():
    truth = np.zeros((30, 40), dtype=bool)
    truth[5:20, 8:33] = True
    truth[10:12, 10:30] = False
    compressed = coco_rle.encode(np.asfortranarray(truth.astype(np.uint8)))
    assert np.array_equal(
        coco_mask({"counts": compressed["counts"].decode(), "size": [30, 40]}, 30, 40), truth)
    assert np.array_equal(coco_mask({"counts": uncompressed_rle(truth), "size": [30, 40]}, 30, 40),
                          truth)
    polygon = [[8, 5, 33, 5, 33, 20, 8, 20]]
    theirs = coco_rle.decode(coco_rle.merge(coco_rle.frPyObjects(polygon, 30, 40))).astype(bool)
    ours = coco_mask(polygon, 30, 40)
    # rasterised alike but for edge pixels
    assert (ours & theirs).sum() / (ours | theirs).sum() > 0.9


def test_coco_export_to_jsonl(vae, tmp_path, capsys):
    """A hand-made export: two cats (a polygon, a compressed RLE) and a dog (uncompressed RLE) in
    one image, a cat in another."""
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), "grey").save(tmp_path / name)
    blob = np.zeros((48, 64), dtype=np.uint8)
    blob[30:44, 40:60] = 1
    rle = coco_rle.encode(np.asfortranarray(blob))
    square = np.zeros((48, 64), dtype=bool)
    square[2:12, 30:40] = True
    export = {
        "images": [dict(id=1, file_name="a.jpg", width=64, height=48),
                   dict(id=2, file_name="b.jpg", width=64, height=48)],
        "categories": [dict(id=0, name="animals"), dict(id=1, name="cat"), dict(id=2, name="dog")],
        "annotations": [
            dict(id=1, image_id=1, category_id=1, bbox=[4, 4, 20, 16],
                 segmentation=[[4, 4, 24, 4, 14, 20]]),
            dict(id=2, image_id=1, category_id=1, bbox=[40, 30, 20, 14],
                 segmentation={"counts": rle["counts"].decode(), "size": [48, 64]}),
            dict(id=3, image_id=1, category_id=2, bbox=[30, 2, 10, 10],
                 segmentation={"counts": uncompressed_rle(square), "size": [48, 64]}),
            dict(id=4, image_id=2, category_id=1, bbox=[0, 0, 64, 48],
                 segmentation=[[0, 0, 63, 0, 63, 47, 0, 47]]),
            dict(id=5, image_id=2, category_id=2, bbox=[10, 10, 0.3, 5],
                 segmentation=[[10, 10, 10.3, 10, 10, 15]]),
            dict(id=6, image_id=2, category_id=2, bbox=[70, 10, 5, 5],
                 segmentation=[[70, 10, 75, 10, 70, 15]]),
            dict(id=7, image_id=2, category_id=2, bbox=[54, 40, 20, 20],
                 segmentation=[[54, 40, 74, 40, 54, 60]]),
        ],
    }
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "_annotations.coco.json").write_text(json.dumps(export))
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).rename(tmp_path / "export" / name)
    np.savez(tmp_path / "vae.npz", **{k: v.detach().numpy() for k, v in vae.state_dict().items()})
    coco = str(tmp_path / "export" / "_annotations.coco.json")
    convert.main(["coco-segment", coco, "--vae", str(tmp_path / "vae.npz"), "--out",
                  str(tmp_path / "train.jsonl")])
    # boxes 0.3 pixels wide or outside the image are skipped, and counted
    assert "2 boxes holding no whole pixel of the image" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    # one line per image and class, the classes and instances top to bottom
    assert [(e["image"], e["prefix"]) for e in lines] == [
        ("export/a.jpg", "segment dog"), ("export/a.jpg", "segment cat"),
        ("export/b.jpg", "segment cat"), ("export/b.jpg", "segment dog")]
    # a box that leaves the image is cut to it
    assert np.allclose(parse_detections(lines[3]["suffix"], 64, 48)[0].box, (54, 40, 64, 48),
                       atol=0.1)
    one_object = r"(<loc\d{4}>){4}(<seg\d{3}>){16} "
    assert re.fullmatch(f"{one_object}dog", lines[0]["suffix"])
    assert re.fullmatch(f"{one_object}cat ; {one_object}cat", lines[1]["suffix"])
    boxes = [d.box for d in parse_detections(lines[1]["suffix"], 64, 48)]
    # top to bottom
    assert np.allclose(boxes, [(4, 4, 24, 20), (40, 30, 60, 44)], atol=64 / 1024 + 1e-9)

    # --out is never the export itself, nor a file already there without --overwrite; written whole
    before = (tmp_path / "train.jsonl").read_text()
    for out, expected in ((coco, "is one of the input files"),
                          (str(tmp_path / "train.jsonl"), "exists")):
        with pytest.raises(SystemExit) as stopped:
            convert.main(["coco-segment", coco, "--vae", str(tmp_path / "vae.npz"), "--out", out])
        assert stopped.value.code == 2 and expected in capsys.readouterr().err
    assert (tmp_path / "train.jsonl").read_text() == before
    assert json.loads(Path(coco).read_text())["images"]
    convert.main(["coco-segment", coco, "--vae", str(tmp_path / "vae.npz"), "--out",
                  str(tmp_path / "train.jsonl"), "--overwrite"])
    assert (tmp_path / "train.jsonl").read_text() == before
    written = [p.name for p in tmp_path.iterdir() if p.name.startswith("train")]
    assert written == ["train.jsonl"]


def uncompressed_rle(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of a mask: the lengths of its runs down the columns, 0s first."""
    flat = mask.T.ravel().astype(int)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.r_[0, edges, flat.size]).tolist()
    return [0] + runs if flat[0] else runs
