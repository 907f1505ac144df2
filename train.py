"""Fine-tune PaliGemma on your own JSONL data. By default only the decoder's attention trains.

    python train.py --data dataset/_annotations.train.jsonl --out ckpt/
    python train.py --data dataset/_annotations.train.jsonl --out ckpt/ --trainable lora      # PEFT adapters
    torchrun --nproc_per_node=4 train.py --data train.jsonl --out ckpt/      # data-parallel, 4 GPUs
    torchrun --nproc_per_node=8 train.py --data train.jsonl --out ckpt/ --fsdp   # sharded, for 10B / 28B

Data: one JSON object per line, {"image": "relative/to/the/jsonl.jpg", "prefix": "answer en ...",
"suffix": "..."}: the format of Roboflow's PaliGemma export and of big_vision. The loss is the mean
next-token cross-entropy over the suffix and <eos> tokens of the batch, with the output head applied
only at those positions. Trainable weights (or LoRA adapters, lora.py) are kept in float32 and the
frozen ones in the compute dtype, with autocast (and loss scaling in float16, for GPUs without
bfloat16). `--out` receives a checkpoint in the official Hugging Face layout (config.json,
model.safetensors, tokenizer files) that `infer.py`, `PaliGemma.from_pretrained` and transformers load
(with LoRA: the adapter in PEFT's format), plus train_state.pt (optimizer state and step) for
`--resume`. Evaluation scores answers by exact match, COCO box mAP (detect and segment prompts) and
mask IoU (segment prompts, with a VQ-VAE).

Nothing is lost: bad data and options are refused before training starts; a checkpoint is never
written over its source model, nor over an earlier run unless --resume or --overwrite says so; a
save is crash-consistent (killed at any instant, --out still loads and resumes); Ctrl-C or SIGTERM
(to this process or its whole group) saves at the end of the current step and exits with 130 / 143,
and a second Ctrl-C stops at once; a non-finite loss stops before anything is written.

The file reads as the script runs: the data, the model and its loss, evaluation, checkpoints, the
options, then `main` in named steps (setup, data, model, sharding, optimizer and resume, the training
loop, the final evaluation).

What it is not: a general trainer. One dataset at a time, AdamW or SGD, a cosine schedule.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import signal
import string
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from cli import fail, number
from lora import ATTENTION, MLP, add_lora, adapter_config, adapter_state, load_adapter, merge_lora, read_adapter_config
from paligemma import PaliGemma, default_dtype, official_state_dict, resolve_checkpoint, resolve_device
from processor import Processor, count_targets, load_image, parse_detections
from vqvae import VQVAE

TRAINABLE = {  # --trainable: which parameters learn
    "attn": lambda name: name.startswith("language_model.layers.") and ".self_attn." in name,  # q, k, v, o
    "llm": lambda name: name.startswith("language_model."),
    "all": lambda name: True,
}
RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
STOP = []  # the signals received (SIGINT, SIGTERM): save at the end of the step, then stop


def log(*args, **kwargs):
    if RANK == 0:
        print(*args, **kwargs, flush=True)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Summed (or max'ed) over the processes of a torchrun job; as it is in a single process."""
    if dist.is_initialized():
        dist.all_reduce(t, op)
    return t


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Data

LARGE_IMAGE = 4096 * 4096  # pixels; such images are decoded one at a time when the data is checked
_one_large_image = threading.Lock()


def check_line(path: Path, line_no: int, raw: bytes, check=None) -> tuple[dict | None, str | None]:
    """One JSONL line -> (example, None) or (None, "file:line: what is wrong"). The image is decoded and
    dropped: the check holds no pixels, and decodes one large image at a time. `check(example)` may
    add a reason of the caller's."""
    where = f"{path}:{line_no}"
    try:
        record = json.loads(raw.decode("utf-8-sig" if line_no == 1 else "utf-8"))  # a BOM may open the file
    except UnicodeDecodeError as e:
        return None, f"{where}: not UTF-8 text (byte {e.start + 1} of the line)"
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg})"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object with image, prefix and suffix"
    missing = [k for k in ("image", "prefix", "suffix") if not isinstance(record.get(k), str)]
    if missing:
        return None, f"{where}: missing or not a string: {', '.join(missing)}"
    image = path.parent / record["image"]
    try:
        with Image.open(image) as im:  # the header only, for the size
            large = im.width * im.height > LARGE_IMAGE
    except Exception:  # load_image below says what is wrong
        large = False
    try:
        with _one_large_image if large else contextlib.nullcontext():
            load_image(image)
    except ValueError as e:
        return None, f"{where}: image {e}"
    example = dict(image=image, prefix=record["prefix"], suffix=record["suffix"])
    why = check(example) if check else None
    return (None, f"{where}: {why}") if why else (example, None)


def read_jsonl(path: Path, skip_bad: bool, check=None) -> list[dict]:
    """All examples of a JSONL file, every line checked (images decoded) before training starts."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        fail(f"{path}: no such file")
    except IsADirectoryError:
        fail(f"{path}: is a directory, not a JSONL file")
    except OSError as e:
        fail(f"{path}: cannot be read ({e.strerror})")
    lines = [(n, line) for n, line in enumerate(raw.split(b"\n"), 1) if line.strip()]
    log(f"{path}: checking {len(lines)} lines and their images")
    with ThreadPoolExecutor(8) as pool:
        checked = list(pool.map(lambda nl: check_line(path, *nl, check), lines))
    examples = [e for e, _ in checked if e is not None]
    errors = [err for _, err in checked if err is not None]
    if errors and not skip_bad:
        for err in errors[:20]:
            print(err, file=sys.stderr)
        fail(f"{len(errors)} bad line(s) in {path}" + (" (first 20 shown)" if len(errors) > 20 else "")
             + "; fix them or pass --skip-bad")
    if errors:
        log(f"{path}: skipped {len(errors)} bad line(s), e.g. {errors[0]}")
    if not examples:
        fail(f"{path}: no usable examples")
    return examples


def default_val_file(train_file: Path) -> Path | None:
    """The validation file beside a training file, under the names Roboflow's exports use:
    _annotations.valid.jsonl (PaliGemma export) or valid/annotations.jsonl (JSONL export), or valid.jsonl."""
    candidates = [train_file.parent / "_annotations.valid.jsonl", train_file.parent / "valid.jsonl",
                  train_file.parent.parent / "valid" / train_file.name]
    return next((c for c in candidates if c.is_file() and c.resolve() != train_file.resolve()), None)


def collate(examples: list[dict], processor: Processor, max_len: int) -> dict:
    """A training batch: the prompts with their suffixes, labels on the suffixes. An image that can no
    longer be read (deleted or changed since the check) gives {"error": why} instead."""
    try:
        images = [load_image(e["image"]) for e in examples]
    except ValueError as e:
        return dict(error=f"image {e}")
    return processor(images, [e["prefix"] for e in examples], [e["suffix"] for e in examples], max_len=max_len)


def ignore_signals(worker_id: int):
    """In DataLoader workers: the main process handles Ctrl-C and SIGTERM (also when they are sent to the
    whole process group), saves and stops the workers itself; torch's workers would die of SIGTERM."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def batches_of(loader):
    """The loader's batches. Closing this generator (also by an exception) deletes the loader's iterator,
    which stops its worker processes at once; they ignore SIGTERM, so nothing else would."""
    it = iter(loader)
    yield from it


def micro_batches(n: int, batch_size: int, grad_accum: int, seed: int, start: int, steps: int):
    """The example indices this process reads, micro-batch by micro-batch, from optimizer step `start` on.

    Each epoch is a permutation fixed by (seed, epoch). Optimizer step s takes the next
    batch_size * grad_accum * WORLD examples; each micro-batch of them is split across the processes, so
    the examples of a step do not depend on how many processes share it.
    """
    per_step = batch_size * grad_accum * WORLD
    steps_per_epoch = n // per_step
    order, epoch = None, None
    for step in range(start, steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        chunk = order[(step % steps_per_epoch) * per_step:][:per_step]
        for a in range(grad_accum):
            yield chunk[a * batch_size * WORLD:(a + 1) * batch_size * WORLD][RANK::WORLD]


# ----------------------------------------------------------------------------------------------
# Model and loss


class SuffixLossSum(nn.Module):
    """PaliGemma and its training loss as one module, so that DDP and torch.compile see a single forward."""

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, attention_mask, token_type_ids, labels) -> torch.Tensor:
        """The cross-entropy *summed* over the batch's target tokens (suffix and <eos>); divide by
        count_targets(labels), over all micro-batches and processes of a step, for the mean."""
        h = self.model.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)  # (B, T, D)
        targets = labels[:, 1:]  # position t predicts token t + 1
        is_target = targets != -100
        logits = self.model.language_model.logits(h[:, :-1][is_target])  # (n_targets, V), not (B, T, V)
        return F.cross_entropy(logits.float(), targets[is_target], reduction="sum")


def lr_at(step: int, lr: float, warmup: float, steps: int) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0."""
    warmup_steps = int(warmup * steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


# ----------------------------------------------------------------------------------------------
# Evaluation


def normalize_answer(text: str) -> str:
    """VQA-style: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # COCO's, spelled as pycocotools spells them
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


def coco_iou(d, g) -> float:
    """IoU of two (x, y, w, h) boxes, in pycocotools' arithmetic (its bbIou), so that ties fall alike."""
    w = min(d[0] + d[2], g[0] + g[2]) - max(d[0], g[0])
    h = min(d[1] + d[3], g[1] + g[3]) - max(d[1], g[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / (d[2] * d[3] + g[2] * g[3] - w * h)


def coco_matches(detections: list, targets: list) -> np.ndarray:
    """(thresholds, detections) bool: at each IoU threshold, whether each detection (in order) takes a target:
    the one of highest IoU >= the threshold among those not yet taken (a later one on ties)."""
    ious = [[coco_iou(d, g) for g in targets] for d in detections]
    matched = np.zeros((len(IOU_THRESHOLDS), len(detections)), dtype=bool)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        taken = [False] * len(targets)
        for i in range(len(detections)):
            best, m = min(threshold, 1 - 1e-10), -1
            for j in range(len(targets)):
                if not taken[j] and ious[i][j] >= best:
                    best, m = ious[i][j], j
            if m >= 0:
                taken[m], matched[t, i] = True, True
    return matched


def detection_map(pairs: list[tuple[str, str]]) -> dict:
    """COCO box mAP of detect answers, as pycocotools' COCOeval computes it: pairs are (predicted answer,
    target suffix), one per image. Per label: detections ranked by score (PaliGemma gives none, so all
    score 1 and rank in the order of the images, then of the boxes within an answer), at most 100 per
    image; a detection takes an unmatched target of the same label at IoU >= the threshold, or is a false
    positive (a repeated box too); precision made monotone and read at 101 recall points, for IoU
    thresholds 0.50:0.05:0.95. Labels without targets are left out of the means, as in COCO.
    Returns map50, map50_95 (-1 without any target, as pycocotools) and ap50_95 per label."""
    per_label = {}  # label -> [matches of each image, number of targets]
    for predicted, target in pairs:
        xywh = lambda text: [((d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1]), d.label)  # noqa: E731
                             for d in parse_detections(text, 1, 1)]
        detections, targets = xywh(predicted), xywh(target)
        for label in dict.fromkeys([label for _, label in targets + detections]):
            mine = [box for box, other in detections if other == label][:100]
            theirs = [box for box, other in targets if other == label]
            entry = per_label.setdefault(label, [[], 0])
            entry[0].append(coco_matches(mine, theirs))
            entry[1] += len(theirs)
    precision = {}  # label -> (thresholds, recall points)
    for label, (matches, n_targets) in per_label.items():
        if n_targets == 0:
            continue
        tp = np.cumsum(np.concatenate(matches, axis=1), axis=1).astype(float)
        fp = np.arange(1, tp.shape[1] + 1) - tp
        q = np.zeros((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)))
        for t in range(len(IOU_THRESHOLDS)):
            recall, p = tp[t] / n_targets, tp[t] / (fp[t] + tp[t] + np.spacing(1))
            p = np.maximum.accumulate(p[::-1])[::-1]  # made monotone from the right
            at = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
            q[t, at < len(p)] = p[at[at < len(p)]]
        precision[label] = q
    if not precision:
        return dict(map50=-1.0, map50_95=-1.0, ap50_95={})
    every = np.stack(list(precision.values()))  # (labels, thresholds, recall points)
    return dict(map50=float(every[:, 0].mean()), map50_95=float(every.mean()),
                ap50_95={label: float(q.mean()) for label, q in sorted(precision.items())})


def mask_iou(predicted: str, target: str, width: int, height: int, vae) -> float:
    """IoU of the union of an answer's masks with the union of the target's (decoded by the VQ-VAE too)."""
    def union(text):
        masks = [d.mask for d in parse_detections(text, width, height, vae) if d.mask is not None]
        return np.logical_or.reduce(masks + [np.zeros((height, width), dtype=bool)])
    p, t = union(predicted), union(target)
    return float((p & t).sum() / max((p | t).sum(), 1))


def repeated_boxes(answer: str) -> int:
    """Boxes an answer writes again (the same box and label): each is a false positive for mAP."""
    found = [(d.box, d.label) for d in parse_detections(answer, 1, 1)]
    return len(found) - len(set(found))


@torch.no_grad()
def evaluate(model: PaliGemma, processor: Processor, examples: list[dict], batch_size: int, max_len: int,
             max_new_tokens: int, device, autocast, vae=None) -> tuple[dict, list[str]]:
    """Validation loss, and greedy answers scored: COCO box mAP for detect and segment prompts, mean mask
    IoU for segment prompts (with a VQ-VAE to decode the masks), exact match for the others. Returns the
    metrics and three example answers."""
    model.eval()
    loss_sum, n_targets, matches, detections, masks, at_limit, shown = 0.0, 0, [], [], [], 0, []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        images, prefixes = [load_image(e["image"]) for e in chunk], [e["prefix"] for e in chunk]
        batch = processor(images, prefixes, [e["suffix"] for e in chunk], max_len=max_len)
        prompts = processor(images, prefixes)  # what the model answers: the prompts alone
        batch, prompts = ({k: v.to(device) for k, v in b.items()} for b in (batch, prompts))
        with autocast:
            loss_sum += SuffixLossSum(model)(**batch).item()
            new = model.generate(prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"],
                                 max_new_tokens=max_new_tokens)
        n_targets += int(count_targets(batch["labels"]))
        if new.shape[1] == max_new_tokens:  # rows that wrote no <eos> were cut by the limit
            at_limit += int((new != model.config.eos_token_id).all(1).sum())
        for e, image, row in zip(chunk, images, new.tolist()):
            answer = processor.decode(row).strip()
            if e["prefix"].startswith(("detect", "segment")):
                detections.append((answer, e["suffix"]))
            if e["prefix"].startswith("segment") and vae is not None:
                masks.append(mask_iou(answer, e["suffix"], *image.size, vae))
            elif not e["prefix"].startswith(("detect", "segment")):
                matches.append(normalize_answer(answer) == normalize_answer(e["suffix"]))
            if len(shown) < 3:
                shown.append(f"  {e['prefix']!r} -> {answer!r} (target {e['suffix']!r})")
    model.train()
    metrics = dict(val_loss=loss_sum / max(n_targets, 1), answers_at_token_limit=at_limit)
    if matches:
        metrics["exact_match"] = sum(matches) / len(matches)
    if detections:
        metrics |= detection_map(detections)
        metrics["repeated_boxes"] = sum(repeated_boxes(answer) for answer, _ in detections)
    if masks:
        metrics["mask_iou"] = sum(masks) / len(masks)
    return metrics, shown


# ----------------------------------------------------------------------------------------------
# Checkpoints
#
# --out holds config.json, model.safetensors (its step in the metadata) and the tokenizer files, or,
# with --trainable lora, adapter_config.json and adapter_model.safetensors (the base model is
# elsewhere), and train_state.pt (step, optimizer and loss-scale state, the options that must not
# change on --resume). Every file is written to a temporary name, flushed to disk and renamed over
# the old one, so a file is always whole. The weights and the train state of a step are made
# consistent by the order of the renames: the new train state goes in beside the old one as
# train_state.next.pt, then the weights, then the new state takes the old one's name. Killed at any
# instant, --out holds weights of step N-1 or N, and a train state of the same step.

WEIGHTS = ("model.safetensors", "adapter_model.safetensors")  # a full checkpoint's, an adapter's
CHECKPOINT_FILES = (*WEIGHTS, "model.safetensors.index.json", "train_state.pt")  # what an earlier run leaves
NEXT_STATE = "train_state.next.pt"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """The safetensors format, written tensor by tensor: an 8-byte header length, a JSON header of
    names, dtypes, shapes and byte ranges, then the bytes. (safetensors' own save_file writes through
    a temporary file of its own, with a random name and mode 0600.)"""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = dict(dtype=SAFETENSORS_DTYPES[t.dtype], shape=list(t.shape),
                            data_offsets=[offset, offset + size])
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for t in tensors.values():
            f.write(whole(t).detach().to("cpu").contiguous().view(torch.uint8).numpy().data)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor as it is, or a tensor sharded by --fsdp gathered whole (every process must take part)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def write_atomically(path: Path, write):
    """`write(tmp_path)`, flushed to disk, then renamed over `path`: a crash leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_config(folder: Path, source: Path, no_final_softcap: bool):
    """config.json and the tokenizer files of the checkpoint being fine-tuned, into `folder`."""
    if source.resolve() != folder.resolve():  # tokenizer.model and the other tokenizer/processor files
        for f in source.iterdir():
            if f.name == "tokenizer.model" or (f.suffix == ".json" and f.name not in (
                    "model.safetensors.index.json", "config.json", "adapter_config.json")):
                write_atomically(folder / f.name, functools.partial(shutil.copyfile, f))
    config = json.loads((source / "config.json").read_text())
    if no_final_softcap:  # the fine-tuned model is used without the cap it was trained without
        config["text_config"]["final_logit_softcapping"] = None
    write_atomically(folder / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))


def save_checkpoint(out: Path, source: Path, model: PaliGemma, optimizer, scaler, step: int, options: dict,
                    no_final_softcap: bool, lora_base: str | None = None):
    """The weights (an official-layout checkpoint, or with `lora_base` the adapter in PEFT's format) plus
    the train state of `step`, crash-consistent (see above). A failed write (a full disk) stops the run
    with the previous checkpoint intact. Under --fsdp every process calls it: the optimizer state is
    saved sharded, by torch.distributed.checkpoint, into optimizer-stepN/; the weights are gathered to
    process 0 one tensor at a time, and process 0 writes the rest."""
    sharded = options["fsdp"]
    weights = official_state_dict(model) if lora_base is None else adapter_state(model)
    step_written = False
    try:
        if sharded:  # the sharded optimizer state first: the train state names its folder
            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=out / f"optimizer-step{step}")
        if RANK != 0:
            for t in weights.values():
                whole(t)  # take part in process 0's gathering
            return
        if lora_base is None:
            write_config(out, source, no_final_softcap)
        else:
            config = adapter_config(model, lora_base)
            write_atomically(out / "adapter_config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        state = dict(step=step, optimizer=f"optimizer-step{step}" if sharded else optimizer.state_dict(),
                     scaler=scaler.state_dict(), options=options, processes=WORLD)
        write_atomically(out / NEXT_STATE, lambda tmp: torch.save(state, tmp))
        weights_file = out / WEIGHTS[lora_base is not None]
        write_atomically(weights_file, lambda tmp: write_safetensors(tmp, weights, {"format": "pt", "step": str(step)}))
        step_written = True  # from here on, NEXT_STATE is the train state of the weights
        os.replace(out / NEXT_STATE, out / "train_state.pt")
        fsync_folder(out)
        remove_leftovers(out, keep=state["optimizer"] if sharded else None)  # the optimizer states before
    except OSError as e:
        if not step_written and RANK == 0:
            (out / NEXT_STATE).unlink(missing_ok=True)
        fail(f"cannot save the checkpoint of step {step} in {out} ({e.strerror or e}); "
             "the checkpoint it held before, if any, is intact")
    log(f"saved {out} at step {step}")


def save_merged(folder: Path, source: Path, model: PaliGemma, no_final_softcap: bool):
    """The model with its LoRA merged, as an official-layout checkpoint in `folder`, without adapter files:
    transformers with peft installed would apply an adapter found beside config.json a second time."""
    try:
        folder.mkdir(exist_ok=True)
        write_config(folder, source, no_final_softcap)
        weights = official_state_dict(merge_lora(model))
        write_atomically(folder / "model.safetensors", lambda tmp: write_safetensors(tmp, weights, {"format": "pt"}))
    except OSError as e:
        fail(f"cannot write the merged model into {folder} ({e.strerror or e}); the adapter is saved")
    log(f"saved the merged model in {folder}")


def fsync_folder(folder: Path):
    """The renames in `folder` reach the disk (they are already safe from a killed process)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_train_state(out: Path, device) -> tuple[dict, str]:
    """The train state of the step of the weights in `out`, and its file's name: train_state.pt, or
    train_state.next.pt when a kill interrupted the save between its last two renames."""
    weights = out / next((name for name in WEIGHTS if (out / name).is_file()), WEIGHTS[0])
    try:
        with safe_open(weights, framework="pt") as f:
            step = int((f.metadata() or {})["step"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        what = "has no step in its metadata" if isinstance(e, (KeyError, ValueError)) else f"cannot be read ({e})"
        fail(f"--resume: {weights} {what}: it was not written by train.py")
    for name in ("train_state.pt", NEXT_STATE):
        if not (out / name).is_file():
            continue
        try:
            state = torch.load(out / name, map_location=device, weights_only=True)
        except Exception as e:  # truncated or not a torch file: pickle, zip and torch raise many types
            fail(f"--resume: {out / name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if state.get("step") == step:
            return state, name
    fail(f"--resume: {out} holds weights of step {step} but no train state of that step")


def remove_leftovers(out: Path, keep: str | None = None):
    """Temporary files of a save that a kill interrupted, a train state that never took effect, and the
    sharded optimizer states (optimizer-stepN/) but the one to `keep`."""
    for f in out.glob(".*.tmp"):
        f.unlink()
    (out / NEXT_STATE).unlink(missing_ok=True)
    for folder in out.glob("optimizer-step*"):
        if folder.name != keep:
            shutil.rmtree(folder)


# ----------------------------------------------------------------------------------------------
# Options


def lora_targets(text: str) -> tuple[str, ...]:
    """--lora-targets: comma-separated names of the decoder's linear layers."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ATTENTION + MLP]
    if not names or unknown:
        what = f"{', '.join(unknown)}: not one of" if unknown else f"{text!r} names none of"
        raise argparse.ArgumentTypeError(f"{what} the decoder's linear layers {', '.join(ATTENTION + MLP)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="training JSONL")
    p.add_argument("--val", type=Path, default=None, help="validation JSONL (default: _annotations.valid.jsonl "
                   "or valid.jsonl beside --data, or ../valid/ of a train/ folder)")
    p.add_argument("--model", default="google/paligemma-3b-pt-224", help="checkpoint folder or hub id")
    p.add_argument("--out", type=Path, default=Path("out"), help="checkpoint folder to write")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint that --out holds by a new run")
    p.add_argument("--trainable", choices=[*TRAINABLE, "lora"], default="attn",
                   help="attn: the decoder's q/k/v/o; llm: the decoder; all; lora: low-rank adapters (--lora-*)")
    p.add_argument("--lora-rank", type=number(int, 1), default=None, help="LoRA rank r (default 8)")
    p.add_argument("--lora-alpha", type=number(float, 0, above=True), default=None,
                   help="LoRA scale alpha; the update is scaled by alpha / r (default 16)")
    p.add_argument("--lora-targets", type=lora_targets, default=None,
                   help=f"comma-separated, of {', '.join(ATTENTION + MLP)} (default: {','.join(ATTENTION)})")
    p.add_argument("--lora-dropout", type=number(float, 0, 0.99), default=None,
                   help="on the adapters' input (default 0)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write the merged model into OUT/merged/ at the end")
    p.add_argument("--steps", type=number(int, 1), default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=number(float, 0, above=True), default=1.0)
    p.add_argument("--batch-size", type=number(int, 1), default=8, help="examples per micro-batch and process")
    p.add_argument("--grad-accum", type=number(int, 1), default=1, help="micro-batches per optimizer step")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="sgd: big_vision's recipe (plain SGD, --lr 0.03)")
    p.add_argument("--lr", type=number(float, 0), default=2e-5)
    p.add_argument("--weight-decay", type=number(float, 0), default=0.0)
    p.add_argument("--warmup", type=number(float, 0, 1), default=0.1,
                   help="fraction of the steps with a linear warm-up, then cosine decay")
    p.add_argument("--clip", type=number(float, 0), default=1.0, help="gradient norm clipping (0: none)")
    p.add_argument("--no-final-softcap", action="store_true",
                   help="PaliGemma 2: train (and save) without the final logit soft-cap, as big_vision's transfers do")
    p.add_argument("--max-len", type=number(int, 1), default=128,
                   help="text tokens per example, image tokens not counted")
    p.add_argument("--skip-bad", action="store_true", help="skip bad JSONL lines instead of stopping")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute decoder layers in backward: less memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights, gradients and optimizer state "
                   "across the processes (FSDP2) instead of replicating the model in each")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="compute dtype and dtype "
                   "of frozen weights (default: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0, help="fixes the data order")
    p.add_argument("--log-every", type=number(int, 1), default=10)
    p.add_argument("--eval-every", type=number(int, 0), default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-examples", type=number(int, 0), default=100, help="validation examples to evaluate")
    p.add_argument("--eval-max-new-tokens", type=number(int, 1), default=128,
                   help="the longest answer generated in evaluation")
    p.add_argument("--vae", default=None, help="a VQ-VAE npz (vae-oid.npz) to score the masks of segment prompts")
    p.add_argument("--save-every", type=number(int, 0), default=0, help="save every N steps (0: only at the end)")
    args = p.parse_args(argv)
    lora_options = {"--lora-rank": args.lora_rank, "--lora-alpha": args.lora_alpha, "--lora-targets": args.lora_targets,
                    "--lora-dropout": args.lora_dropout, "--rslora": args.rslora or None, "--merge": args.merge or None}
    if args.trainable != "lora" and (given := [k for k, v in lora_options.items() if v is not None]):
        p.error(f"{', '.join(given)} only with --trainable lora")
    if args.fsdp and (args.merge or args.dtype == "float16"):
        p.error("--fsdp does not take --merge (merge the saved adapter with lora.merge_lora in one process) "
                "nor --dtype float16 (use bfloat16)")
    if args.trainable == "lora" and args.no_final_softcap and not args.merge:
        p.error("--no-final-softcap with --trainable lora needs --merge: the adapter alone is served on the base "
                "model's config, which has the soft-cap")
    if args.trainable == "lora":
        args.lora_rank, args.lora_alpha = args.lora_rank or 8, args.lora_alpha or 16.0
        args.lora_targets, args.lora_dropout = args.lora_targets or ATTENTION, args.lora_dropout or 0.0
    return args


# ----------------------------------------------------------------------------------------------
# The steps of main


def check_out(args):
    """--out against --model and against what it holds, before anything is loaded: never the source
    model, a file, or unwritable; an earlier run's checkpoint only with --resume or --overwrite."""
    out, model = args.out.resolve(), Path(args.model).expanduser().resolve()
    if not args.resume and Path(args.model).expanduser().is_dir() and (
            out == model or out.is_relative_to(model) or model.is_relative_to(out)):
        fail(f"--out {args.out} and --model {args.model} are the same folder or one holds the other: "
             "the checkpoint being fine-tuned would be overwritten; choose another --out")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        fail(f"--out {args.out}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        fail(f"--out {args.out}: {existing} is not writable (permission denied)")
    held = [name for name in CHECKPOINT_FILES if (out / name).exists()]
    if args.resume and not any((out / name).is_file() for name in WEIGHTS):
        fail(f"--resume: {args.out} holds no checkpoint written by train.py (no {' or '.join(WEIGHTS)})")
    if args.resume and args.overwrite:
        fail("--resume continues the checkpoint in --out and --overwrite replaces it: give one of them")
    if held and not args.resume and not args.overwrite:
        fail(f"--out {args.out} holds a checkpoint ({', '.join(held)}): continue it with --resume, "
             "replace it with --overwrite, or choose another --out")


def setup(args) -> tuple[torch.device, torch.dtype]:
    """The device (one GPU per process under torchrun), the process group and the compute dtype."""
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        fail(f"--{e}")
    if args.fsdp and WORLD == 1:
        fail("--fsdp shards across the processes torchrun starts: torchrun --nproc_per_node=N train.py ... --fsdp")
    if WORLD > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed)
    return device, getattr(torch, args.dtype) if args.dtype else default_dtype(device)


def checkpoint_source(args) -> tuple[Path, str | None]:
    """The folder whose weights and tokenizer this run starts from: --model (a folder, or a hub id
    downloaded), or under --resume the run in --out; with LoRA, always the base model, whose name the
    adapter records (returned second: a hub id or a folder's absolute path; None without LoRA)."""
    lora_base = None
    if args.resume and args.trainable != "lora" and (args.out / "adapter_config.json").is_file():
        raise ValueError(f"{args.out} holds a LoRA adapter: resume it with --trainable lora (and its --lora-* options)")
    if args.trainable == "lora" and args.resume:
        lora_base = read_adapter_config(args.out)["base_model_name_or_path"]
    elif args.trainable == "lora":
        local = Path(args.model).expanduser()
        lora_base = str(local.resolve()) if local.is_dir() else args.model
    if args.resume and not lora_base:
        return args.out, None
    return resolve_checkpoint(lora_base or args.model, ["*.json", "*.safetensors", "tokenizer.model"]), lora_base


def load_for_training(args, source: Path, dtype, device) -> tuple[PaliGemma, list[nn.Parameter]]:
    """The model with its trainable parameters in float32 (read from the checkpoint's own precision) and
    the rest frozen in the compute dtype; with LoRA, the whole base is frozen and the adapters are new
    (or, on --resume, read from --out)."""
    learns = TRAINABLE.get(args.trainable, lambda name: False)
    try:
        model = PaliGemma.from_pretrained(source, dtype=lambda name: torch.float32 if learns(name) else dtype,
                                          device=device)
        for name, p in model.named_parameters():
            p.requires_grad_(learns(name))
        if args.trainable == "lora" and args.resume:
            load_adapter(model, args.out)
        elif args.trainable == "lora":
            add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout, args.rslora)
    except (OSError, ValueError) as e:
        fail(str(e))
    return model, [p for p in model.parameters() if p.requires_grad]


def shard(root: SuffixLossSum, device):
    """--fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) splits every parameter along its first dimension
    across the processes; a unit's parameters are all-gathered just before it runs (and again in
    backward) and its gradients reduce-scattered, so that a process holds 1/N of the weights, gradients
    and optimizer state. The units are each SigLIP encoder layer, each Gemma decoder layer, and the rest
    (embeddings, projector, norms) in the root, the training step's module. A unit mixes the float32
    weights that learn with frozen ones in the compute dtype: FSDP2 (torch 2.13) gathers parameters of
    several dtypes as bytes, and asks only that the trainable ones of a unit share a dtype, that of their
    reduce-scattered gradients. Generation uses the layers outside the root's forward: for evaluation
    the root is unsharded, and every process evaluates the same examples, so that the layers' gathers
    happen in the same order everywhere."""
    mesh = init_device_mesh(device.type, (WORLD,))
    for layer in [*root.model.vision_tower.encoder.layers, *root.model.language_model.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def held(tensors) -> float:
    """MiB of the tensors held by this process (of a sharded one, its shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors) / 2**20


def read_data(args, processor: Processor) -> tuple[list[dict], list[dict], int]:
    """The training and validation examples, every line and image checked, and the number of steps.
    A training example must leave room in --max-len for its answer."""
    def room_for_answer(example):
        n = len(processor.text_tokens(example["prefix"])[0])
        return f"the prompt is {n} tokens: --max-len {args.max_len} leaves no room for the answer" \
            if n >= args.max_len else None
    train_set = read_jsonl(args.data, args.skip_bad, room_for_answer)
    val_file = args.val or default_val_file(args.data)
    val_set = read_jsonl(val_file, args.skip_bad)[:args.eval_examples] if val_file else []
    log(f"data: {len(train_set)} training examples from {args.data}; "
        + (f"{len(val_set)} validation examples from {val_file}" if val_file else "no validation file"))
    truncated = sum(len(processor.text_tokens(e["prefix"], e["suffix"])[0]) > args.max_len for e in train_set)
    if truncated:
        log(f"data: {truncated} training example(s) longer than --max-len {args.max_len} text tokens are truncated")
    per_step = args.batch_size * args.grad_accum * WORLD
    if len(train_set) < per_step:
        fail(f"{len(train_set)} training examples are fewer than one step's batch of {per_step}")
    return train_set, val_set, args.steps or max(1, int(args.epochs * len(train_set) // per_step))


RESUME_MUST_MATCH = ("trainable", "optimizer", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "rslora",
                     "fsdp")


def run_options(args) -> dict:
    """The options a resumed run must share with the run it continues (saved in train_state.pt)."""
    return {name: getattr(args, name) for name in RESUME_MUST_MATCH}


def optimizer_and_resume(args, model, params, device, dtype, steps: int):
    """The optimizer and the float16 loss scaler, with their state read back under --resume, and what
    prepare_out needs of the train state: {"step", "file" (train_state.next.pt if a kill interrupted
    a save), "optimizer" (the folder of a sharded optimizer state, or None)}, or None."""
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    # float16 gradients underflow without loss scaling (bfloat16 has float32's range and needs none)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if not args.resume:
        return optimizer, scaler, None
    state, state_file = read_train_state(args.out, device)
    for option, value in run_options(args).items():
        if state.get("options", {}).get(option, value) != value:
            show = lambda v: ",".join(v) if isinstance(v, tuple) else v  # noqa: E731
            fail(f"{args.out} was trained with --{option.replace('_', '-')} {show(state['options'][option])}, "
                 f"not {show(value)}")
    if state["step"] >= steps:
        fail(f"--resume: {args.out} is at step {state['step']} already; ask for more --steps than that")
    if args.fsdp:  # saved sharded: each process reads its part
        if state["processes"] != WORLD:
            fail(f"--resume: {args.out} was saved by {state['processes']} processes under --fsdp, and its optimizer "
                 f"state is sharded {state['processes']} ways: resume with torchrun --nproc_per_node="
                 f"{state['processes']}, not {WORLD}")
        sharded = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(sharded, checkpoint_id=args.out / state["optimizer"])
        set_optimizer_state_dict(model, optimizer, sharded["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] and scaler.is_enabled():  # empty when the run so far was not in float16
        scaler.load_state_dict(state["scaler"])
    log(f"resumed from {args.out} at step {state['step']}")
    return optimizer, scaler, dict(step=state["step"], file=state_file,
                                   optimizer=state["optimizer"] if args.fsdp else None)


def prepare_out(args, resumed: dict | None) -> Path:
    """--out made ready for this run: a save that a kill interrupted finished, its leftovers removed; with
    --overwrite, what of the earlier run this one would not replace (its train state, a sharded model,
    weights of the other kind: an adapter beside a config.json is taken for base + adapter);
    metrics.jsonl kept up to the step resumed from. Returns the metrics file."""
    args.out.mkdir(parents=True, exist_ok=True)
    if resumed and resumed["file"] == NEXT_STATE:
        os.replace(args.out / NEXT_STATE, args.out / "train_state.pt")
    remove_leftovers(args.out, keep=resumed and resumed["optimizer"])
    start = resumed["step"] if resumed else 0
    if args.overwrite:
        other = ("model.safetensors", "config.json") if args.trainable == "lora" else \
            ("adapter_model.safetensors", "adapter_config.json")
        stale = ["train_state.pt", "model.safetensors.index.json", *other]
        with contextlib.suppress(Exception):  # the shards a readable index names
            stale += json.loads((args.out / stale[1]).read_text())["weight_map"].values()
        removed = [name for name in dict.fromkeys(stale) if (args.out / name).is_file()]
        for name in removed:
            (args.out / name).unlink()
        log(f"--overwrite: {args.out}'s earlier run is replaced"
            + (f"; removed {', '.join(removed)}" if removed else ""))
    metrics_file = args.out / "metrics.jsonl"
    lines = metrics_file.read_text().splitlines() if args.resume and metrics_file.exists() else []
    metrics_file.write_text("".join(line + "\n" for line in lines if json.loads(line).get("step", 0) <= start))
    return metrics_file


def wrap(args, model: SuffixLossSum) -> nn.Module:
    """The training step's module: activation checkpointing, data parallelism (DDP; --fsdp has sharded it
    already), compilation."""
    if args.grad_checkpointing:  # recompute each decoder layer's activations in backward
        for layer in model.model.language_model.layers:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    if WORLD > 1 and not args.fsdp:
        model = DistributedDataParallel(model)
    return torch.compile(model) if args.compile else model


def training_loader(args, train_set: list[dict], processor: Processor, start: int, steps: int):
    """The micro-batches of steps start..steps-1, collated in worker processes."""
    sampler = list(micro_batches(len(train_set), args.batch_size, args.grad_accum, args.seed, start, steps))
    return torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, collate_fn=functools.partial(collate, processor=processor,
                                                                       max_len=args.max_len),
        num_workers=min(4, os.cpu_count() or 1), worker_init_fn=ignore_signals)


def stop_on_signals(out: Path):
    """Ctrl-C or SIGTERM: STOP records it, and the loop saves at the end of the step and stops; a second
    Ctrl-C stops at once (the last checkpoint stays intact: saves are crash-consistent)."""
    def on_signal(signum, frame):
        if STOP and signum == signal.SIGINT:
            print(f"stopped at once; the last checkpoint in {out}, if any, is intact", file=sys.stderr, flush=True)
            os._exit(130)
        STOP.append(signum)
        log(f"{signal.Signals(signum).name}: saving at the end of this step, then stopping (Ctrl-C again: at once)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def append_metrics(metrics_file: Path | None, entry: dict):
    """A line of OUT/metrics.jsonl (written by process 0, whose metrics_file is not None)."""
    if metrics_file is not None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(entry) + "\n")


def main(argv=None):
    args = parse_args(argv)

    # Setup: --out checked before anything is loaded; the device and processes; the tokenizer.
    check_out(args)
    device, dtype = setup(args)
    try:
        source, lora_base = checkpoint_source(args)
        processor = Processor.from_pretrained(source)
    except (OSError, ValueError) as e:
        fail(str(e))

    # Data, model, optimizer and resume.
    train_set, val_set, steps = read_data(args, processor)
    try:
        vae = VQVAE.from_pretrained(args.vae) if args.vae else None
    except (OSError, ValueError) as e:
        fail(f"--vae: {e}")
    model, params = load_for_training(args, source, dtype, torch.device("cpu") if args.fsdp else device)
    if args.no_final_softcap:
        model.config.text_config.final_logit_softcapping = None
    root = SuffixLossSum(model)
    if args.fsdp:  # before the optimizer, which must hold the shards
        shard(root, device)
        params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"model: {n_total:,} parameters, {n_trainable:,} trainable ({args.trainable}), compute {dtype}, {device}"
        + (f", {WORLD} processes" if WORLD > 1 else "") + (", sharded (FSDP)" if args.fsdp else ""))
    optimizer, scaler, resumed = optimizer_and_resume(args, model, params, device, dtype, steps)
    start = resumed["step"] if resumed else 0
    barrier()  # every process has read the train state before process 0 tidies --out
    metrics_file = prepare_out(args, resumed) if RANK == 0 else None

    # Wrapping, the data loader, the signals.
    loss_model = wrap(args, root)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    loader = training_loader(args, train_set, processor, start, steps)
    stop_on_signals(args.out)

    def run_eval(step: int):
        if val_set and (RANK == 0 or args.fsdp):  # under --fsdp, every process evaluates alike (see shard)
            if args.fsdp:
                root.unshard()
            metrics, shown = evaluate(model, processor, val_set, args.batch_size, args.max_len,
                                      args.eval_max_new_tokens, device, autocast, vae)
            if args.fsdp:
                root.reshard()
            numbers = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                                if not isinstance(v, dict))
            per_label = ", ".join(f"{label} {ap:.3f}" for label, ap in metrics.get("ap50_95", {}).items())
            log(f"eval step {step}: {numbers}", *([f"  AP@50:95 per label: {per_label}"] if per_label else []),
                *shown, sep="\n")
            append_metrics(metrics_file, dict(step=step, **metrics))
        barrier()

    def save(step: int):
        if RANK == 0 or args.fsdp:  # under --fsdp every process gathers and saves its optimizer shard
            save_checkpoint(args.out, source, model, optimizer, scaler, step, run_options(args), args.no_final_softcap,
                            lora_base)
        barrier()

    # The training loop.
    with contextlib.closing(batches_of(loader)) as batches:  # the loader's workers stop with the loop
        model.train()
        if start == 0 and args.eval_every:
            run_eval(0)
        t_start = t_log = time.perf_counter()
        logged_step, tokens_since_log = start, 0
        for step in range(start, steps):
            done = step + 1
            lr = lr_at(step, args.lr, args.warmup, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # This step's micro-batches; an image that became unreadable stops the run at the previous step.
            micro = [next(batches) for _ in range(args.grad_accum)]
            error = next((b["error"] for b in micro if "error" in b), None)
            if all_reduce(torch.tensor(float(error is not None), device=device), dist.ReduceOp.MAX).item():
                if step > start:
                    save(step)
                fail(f"{error or 'an image of another process cannot be read'}; stopped before step {done}"
                     + (f", saved at step {step}" if step > start else "") + ": fix the data and --resume")
            micro = [{k: v.to(device) for k, v in b.items()} for b in micro]
            n_targets = all_reduce(torch.tensor(sum(int(count_targets(b["labels"])) for b in micro), device=device))

            # Forward and backward over the micro-batches; gradients are of the step's mean loss.
            loss_sum = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                last = i == args.grad_accum - 1  # DDP all-reduces gradients on the last micro-batch only
                ddp_waits = WORLD > 1 and not args.fsdp and not last
                with (loss_model.no_sync() if ddp_waits else contextlib.nullcontext()), autocast:
                    loss = loss_model(**batch)
                scaler.scale(loss * WORLD / n_targets).backward()  # DDP averages over processes: the mean is global
                loss_sum += loss.detach()
                tokens_since_log += int(batch["attention_mask"].sum()) * WORLD
            loss = (all_reduce(loss_sum) / n_targets).item()

            # Clip, then the optimizer step (skipped when float16 gradients overflowed).
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
            if scaler.is_enabled() and math.isfinite(loss) and not torch.isfinite(grad_norm):
                log(f"step {done}: float16 gradients overflowed at loss scale {scaler.get_scale():g}; "
                    "step skipped, scale lowered")
            elif not math.isfinite(loss) or not torch.isfinite(grad_norm):
                fail(f"non-finite loss ({loss}) or gradient norm ({grad_norm.item()}) at step {done}; stopped "
                     "before the optimizer step, nothing saved (try a lower --lr). The last checkpoint in "
                     f"{args.out}, if any, is intact.")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            # Log, evaluate, save; stop when a signal came (in any process).
            if done == start + 1:
                log(f"memory of process 0: weights {held(model.parameters()):.2f} MiB, optimizer state "
                    f"{held(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)):.2f} MiB")
            if done % args.log_every == 0 or done == steps:
                now = time.perf_counter()
                per_step_s = (now - t_log) / (done - logged_step)
                memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
                minutes_left = (steps - done) * (now - t_start) / (done - start) / 60
                log(f"step {done}/{steps}: loss {loss:.4f}, lr {lr:.2e}, {tokens_since_log / (now - t_log):.0f} tok/s, "
                    f"{per_step_s:.2f} s/step{memory}, {minutes_left:.1f} min left")
                append_metrics(metrics_file, dict(step=done, loss=loss, lr=lr, seconds_per_step=per_step_s))
                t_log, logged_step, tokens_since_log = now, done, 0
            if args.eval_every and done % args.eval_every == 0 and done != steps:
                run_eval(done)
            stop = all_reduce(torch.tensor(float(STOP[0] if STOP else 0), device=device), dist.ReduceOp.MAX).item()
            if stop or done == steps or (args.save_every and done % args.save_every == 0):
                save(done)
            if stop:
                log(f"stopped at step {done}; continue with --resume")
                sys.exit(128 + int(stop))  # 130 after Ctrl-C, 143 after SIGTERM: not a finished run

    # Final evaluation; the merged model.
    run_eval(steps)
    if args.merge and RANK == 0:
        save_merged(args.out / "merged", source, model, args.no_final_softcap)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
