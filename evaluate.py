"""Score a checkpoint on a test file, each prompt by its task's benchmark metric.

    python evaluate.py --model out/tiny-star --data data/star/_annotations.valid.jsonl \\
        --out eval/star
    python evaluate.py --model lora-out/ --data vqav2-val.jsonl --out eval/vqav2 --batch-size 32

Every line of the JSONL file (data.py's format; "answers" where a line has several references) is
answered greedily, in batches, with the KV-cache (detect and segment answers under their grammar),
and scored as its task's benchmark scores it (metrics.py). Prints a table per task on stdout and
writes into --out:

    predictions.jsonl   each line's number, prompt, answer, references and its own scores
    scores.json         the table: {task: {metric: value, "examples": n}}, and how the answers
                        were made
    index.html          one page, no network: the table, then every example, worst first, with
                        its image (the answer's boxes and masks drawn, the target's beside them)
    images/             the pictures the page shows

Progress (examples/s, time left) goes to stderr. A bad line or image is refused before the model is
loaded, naming its file and line; an existing --out only with --overwrite; Ctrl-C writes what is
done and exits with 130.
"""

import argparse
import html
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import metrics
from answers import answer_batch, load_model, read_vae
from cli import (DefaultsFormatter, UserError, add_answer_options, add_device_options,
                 add_image_limit, add_model_options, add_vae_option, device_and_dtype, fail,
                 number, use_own_image_limit)
from data import read_jsonl
from detections import parse_detections, prompt_names, prompt_task
from drawing import draw_detections
from files import write_atomically, write_json, write_jsonl, write_text
from processor import load_image, to_rgb
from quantize import FORMATS

OUTPUTS = ("predictions.jsonl", "scores.json", "index.html")


def main(argv=None):
    args = options().parse_args(argv)
    use_own_image_limit()
    try:
        evaluate(args)
    except KeyboardInterrupt:  # before the answers begin: the data check, loading
        print(f"{Path(sys.argv[0]).name}: stopped (Ctrl-C) before any answer; nothing was written",
              file=sys.stderr, flush=True)
        sys.exit(130)


def evaluate(args):
    """Checked, loaded, answered, scored, written."""
    try:
        check_out(args.out, args.overwrite)
        examples = read_jsonl(args.data, args.skip_bad, max_pixels=args.max_image_pixels)
        device, dtype = device_and_dtype(args.device, args.dtype)
        vae = read_vae(args.vae, examples)
        model, processor = load_model(args.model, args.adapter, dtype, device, args.quantize)
    except UserError as e:
        fail(str(e), e.details)
    except (OSError, ValueError) as e:
        fail(str(e))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    rows, at_limit, stopped = answer_all(model, processor, examples, args, device, autocast)
    summary, each = metrics.score(rows, vae) if rows else ({}, [])
    print(table(summary))
    if at_limit:
        print(f"{at_limit} answer(s) were ended by the limit of {args.max_new_tokens} tokens "
              "(--max-new-tokens)")
    write_results(args, examples[:len(rows)], rows, summary, each, vae, stopped, at_limit)
    if stopped:
        print(f"{Path(sys.argv[0]).name}: stopped (Ctrl-C) after {len(rows)} of {len(examples)} "
              f"examples; their scores are in {args.out}", file=sys.stderr)
        sys.exit(130)


def answer_all(model, processor, examples: list[dict], args, device, autocast
               ) -> tuple[list[metrics.Row], int, bool]:
    """Every example answered, batch by batch, with a progress line on stderr every few seconds;
    Ctrl-C ends it after the answers so far. Returns them, how many the token limit ended, and
    whether it was stopped."""
    rows, at_limit, start, shown = [], 0, time.perf_counter(), 0.0
    try:
        for i in range(0, len(examples), args.batch_size):
            chunk = examples[i:i + args.batch_size]
            images = [load_image(e["image"], args.max_image_pixels) for e in chunk]
            answers = answer_batch(model, processor, images, [e["prefix"] for e in chunk],
                                   args.max_new_tokens, device, autocast, not args.no_constrain,
                                   args.repeat_iou)
            rows += [metrics.Row(e["prefix"], a.text.strip(), e["references"], image.size)
                     for e, image, a in zip(chunk, images, answers)]
            at_limit += sum(a.at_limit for a in answers)
            elapsed = time.perf_counter() - start
            if elapsed - shown > 5 or len(rows) == len(examples):
                rate = len(rows) / elapsed
                left = (len(examples) - len(rows)) / rate
                print(f"{len(rows)}/{len(examples)} examples, {rate:.1f} examples/s, "
                      f"{left:.0f} s left", file=sys.stderr, flush=True)
                shown = elapsed
    except KeyboardInterrupt:
        return rows, at_limit, True
    except ValueError as e:  # load_image: an image gone or changed since the check
        fail(f"{e}; nothing was written")
    return rows, at_limit, False


def table(summary: dict[str, dict]) -> str:
    """The scores, a block per task: metric, value, and the number of examples."""
    lines = []
    for task, scores in summary.items():
        lines.append(f"{task} ({scores['examples']} examples)")
        for name, value in scores.items():
            if isinstance(value, dict):
                lines += [f"  {name} {label:<22} {v:8.4f}" for label, v in value.items()]
            elif name != "examples":
                shown = f"{value:8.4f}" if isinstance(value, float) else f"{value:8}"
                lines.append(f"  {name:<32} {shown}")
    return "\n".join(lines) or "no examples answered"


# ----------------------------------------------------------------------------------------------
# What is written: predictions, scores, the page


def write_results(args, examples: list[dict], rows: list[metrics.Row], summary: dict,
                  each: list[dict], vae, stopped: bool, at_limit: int):
    """predictions.jsonl, scores.json, images/ and index.html in --out, each file written whole."""
    out = args.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    # an earlier evaluation's, --overwrite
    for old in (out / "images").glob("[0-9][0-9][0-9][0-9][0-9][0-9].jpg"):
        old.unlink()
    predictions = [dict(line=e["line"], image=str(e["image"]), prefix=r.prefix, answer=r.answer,
                        references=r.references, scores=own)
                   for e, r, own in zip(examples, rows, each)]
    write_jsonl(out / "predictions.jsonl", predictions)
    write_json(out / "scores.json", dict(
        scores=summary, model=args.model, adapter=args.adapter, data=str(args.data),
        examples=len(rows), complete=not stopped, constrained=not args.no_constrain,
        max_new_tokens=args.max_new_tokens, answers_at_token_limit=at_limit))
    order = sorted(range(len(rows)), key=lambda i: worst_first(rows[i], each[i]))
    pictures = {i: picture(out, i, rows[i], examples[i], vae) for i in order}
    write_text(out / "index.html",
               page(args, summary, [(predictions[i], pictures[i]) for i in order], stopped))
    print(f"wrote {out / 'index.html'}, {out / 'predictions.jsonl'}, {out / 'scores.json'}",
          file=sys.stderr)


def worst_first(row: metrics.Row, own: dict) -> tuple:
    """The sort key of a row: its task's headline score, lowest first (CER: highest first)."""
    task = prompt_task(row.prefix)
    return own.get(metrics.HEADLINE[task], 0.0), -own.get("cer", 0.0)


def picture(out: Path, i: int, row: metrics.Row, example: dict, vae) -> str:
    """images/N.jpg: the image, and for detect and segment prompts the answer's boxes and masks
    drawn, the target's beside them; its path relative to the page."""
    image = load_image(example["image"])
    if prompt_names(row.prefix):
        panels = [draw_detections(image, parse_detections(text, *image.size, vae=vae))
                  for text in (row.answer, row.references[0])]
        canvas = Image.new("RGB", (sum(p.width for p in panels) + 8, max(p.height for p in panels)),
                           "white")
        canvas.paste(panels[0], (0, 0))
        canvas.paste(panels[1], (panels[0].width + 8, 0))
    else:
        canvas = to_rgb(image)
    canvas.thumbnail((640, 320))
    path = out / "images" / f"{i:06d}.jpg"
    write_atomically(path, lambda tmp: canvas.save(tmp, format="JPEG", quality=85))
    return f"images/{path.name}"


PAGE_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse}
td,th{padding:2px 10px;text-align:left}.num{text-align:right;font-variant-numeric:tabular-nums}
.ex{display:flex;gap:16px;border-top:1px solid #ddd;padding:10px 0}.ex img{max-height:320px}
.ex pre{white-space:pre-wrap;margin:2px 0;font-size:13px}.s{color:#555;font-size:13px}"""


def page(args, summary: dict, shown: list[tuple[dict, str]], stopped: bool) -> str:
    """index.html: the scores, then every example, worst first."""
    e = html.escape
    head = [f"<!doctype html><meta charset=utf-8><title>{e(str(args.data))}</title>"
            f"<style>{PAGE_STYLE}</style>",
            f"<h1>{e(str(args.model))}</h1><p class=s>{e(str(args.data))}: {len(shown)} examples"
            + (" (stopped before the end)" if stopped else "") + "</p>",
            "<table><tr><th>task<th>metric<th>value"]
    for task, scores in summary.items():
        for name, value in scores.items():
            if not isinstance(value, dict):
                text = f"{value:.4f}" if isinstance(value, float) else str(value)
                head.append(f"<tr><td>{e(task)}<td>{e(name)}<td class=num>{text}")
    head.append("</table><h2>Examples, worst first</h2>")
    body = []
    for p, src in shown:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in p["scores"].items())
        refs = "".join(f"<pre>reference: {e(r)}</pre>" for r in p["references"][:10])
        body.append(f"<div class=ex><img src='{src}' loading=lazy><div>"
                    f"<p class=s>line {p['line']}: {e(p['image'])}</p>"
                    f"<pre>prompt: {e(p['prefix'])}</pre><pre>answer: {e(p['answer'])}</pre>"
                    f"{refs}<p class=s>{e(scores)}</p></div></div>")
    return "\n".join(head + body) + "\n"


# ----------------------------------------------------------------------------------------------
# Options, and what is checked before the model is loaded


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    add_model_options(p, list(FORMATS))
    p.add_argument("--data", type=Path, required=True, help="the JSONL file to score")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions.jsonl, "
                   "scores.json, index.html")
    p.add_argument("--overwrite", action="store_true", help="replace the results that --out holds")
    p.add_argument("--batch-size", type=number(int, 1), default=8)
    p.add_argument("--max-new-tokens", type=number(int, 1), default=128, help="the longest answer "
                   "generated")
    p.add_argument("--skip-bad", action="store_true", help="skip bad JSONL lines instead of "
                   "stopping")
    add_answer_options(p)
    add_vae_option(p)
    add_device_options(p)
    add_image_limit(p)
    return p


def check_out(out: Path, overwrite: bool):
    """--out: a folder, or one that can be made, that holds no earlier results unless
    `overwrite`."""
    existing = next((p for p in [out, *out.resolve().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {existing} is not writable (permission denied)")
    held = [name for name in OUTPUTS if (out / name).exists()]
    if held and not overwrite:
        raise UserError(f"--out {out} holds the results of an evaluation ({', '.join(held)}): "
                        "replace them with --overwrite, or choose another --out")


if __name__ == "__main__":
    main()
