"""Fine-tune PaliGemma on your own JSONL data. By default only the decoder's attention trains.

    python train.py --data dataset/_annotations.train.jsonl --out ckpt/
    torchrun --nproc_per_node=4 train.py --data train.jsonl --out ckpt/      # data-parallel, 4 GPUs

Data: one JSON object per line, {"image": "relative/to/the/jsonl.jpg", "prefix": "answer en ...",
"suffix": "..."}: the format of Roboflow's PaliGemma export and of big_vision. The loss is the mean
next-token cross-entropy over the suffix and <eos> tokens of the batch, with the output head applied
only at those positions. Trainable weights are kept in float32 and the frozen ones in the compute
dtype, with autocast (and loss scaling in float16, for GPUs without bfloat16). `--out` receives a
checkpoint in the official Hugging Face layout (config.json, model.safetensors, tokenizer files) that
`infer.py`, `PaliGemma.from_pretrained` and transformers load, plus train_state.pt (optimizer state
and step) for `--resume`. Ctrl-C (or SIGTERM) saves at the end of the current step and stops; a
non-finite loss stops before anything is written.

What it is not: a general trainer. No LoRA, no mixed datasets, no evaluation beyond exact match and
box IoU.
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from infer import default_device
from paligemma import PaliGemma, Processor, official_state_dict, parse_detections, read_tensors, resolve_checkpoint

TRAINABLE = {  # --trainable: which parameters learn
    "attn": lambda name: name.startswith("language_model.layers.") and ".self_attn." in name,  # q, k, v, o
    "llm": lambda name: name.startswith("language_model."),
    "all": lambda name: True,
}
STOP = []  # set by SIGINT / SIGTERM: save at the end of the step, then stop


def log(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def fail(message: str):
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Data


def check_line(path: Path, number: int, line: str):
    """One JSONL line -> (example, None) or (None, "file:line: what is wrong")."""
    where = f"{path}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"{where}: not valid JSON ({e.msg})"
    if not isinstance(record, dict):
        return None, f"{where}: expected a JSON object with image, prefix and suffix"
    missing = [k for k in ("image", "prefix", "suffix") if not isinstance(record.get(k), str)]
    if missing:
        return None, f"{where}: missing or not a string: {', '.join(missing)}"
    image = path.parent / record["image"]
    if not image.is_file():
        return None, f"{where}: image {image} does not exist"
    try:
        with Image.open(image) as im:
            im.load()
    except Exception as e:  # PIL raises many types for broken files
        return None, f"{where}: image {image} cannot be decoded ({e})"
    return dict(image=image, prefix=record["prefix"], suffix=record["suffix"]), None


def read_jsonl(path: Path, skip_bad: bool) -> list[dict]:
    """All examples of a JSONL file, every line checked (images decoded) before training starts."""
    if not path.is_file():
        fail(f"{path}: no such file")
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    with ThreadPoolExecutor(8) as pool:
        checked = list(pool.map(lambda nl: check_line(path, *nl), lines))
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


def load_images(examples: list[dict]) -> list[Image.Image]:
    images = []
    for e in examples:
        with Image.open(e["image"]) as im:
            im.load()
            images.append(im)
    return images


def collate(examples: list[dict], processor: Processor, max_len: int) -> dict[str, torch.Tensor]:
    """A training batch: the prompts with their suffixes, labels on the suffixes."""
    return processor(load_images(examples), [e["prefix"] for e in examples], [e["suffix"] for e in examples], max_len=max_len)


def micro_batches(n: int, batch_size: int, grad_accum: int, world: int, rank: int, seed: int, start: int, steps: int):
    """The example indices this rank reads, micro-batch by micro-batch, from optimizer step `start` on.

    Each epoch is a permutation fixed by (seed, epoch). Optimizer step s takes the next
    batch_size * grad_accum * world examples; each micro-batch of them is split across the ranks, so the
    examples of a step do not depend on how many processes share it.
    """
    per_step = batch_size * grad_accum * world
    steps_per_epoch = n // per_step
    order, epoch = None, None
    for step in range(start, steps):
        if step // steps_per_epoch != epoch:
            epoch = step // steps_per_epoch
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        chunk = order[(step % steps_per_epoch) * per_step:][:per_step]
        for a in range(grad_accum):
            yield chunk[a * batch_size * world:(a + 1) * batch_size * world][rank::world]


# ----------------------------------------------------------------------------------------------
# Model, loss and metrics


def set_trainable(model: PaliGemma, which: str) -> list[str]:
    """Freezes all but the `which` parameters (see TRAINABLE), which move to float32; returns their names."""
    trainable = [name for name, _ in model.named_parameters() if TRAINABLE[which](name)]
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
        if name in trainable:
            p.data = p.data.float()  # master weights in float32; frozen ones stay in the compute dtype
    return trainable


class SuffixLoss(nn.Module):
    """PaliGemma and its training loss as one module, so that DDP and torch.compile see a single forward."""

    def __init__(self, model: PaliGemma):
        super().__init__()
        self.model = model

    def forward(self, input_ids, pixel_values, attention_mask, token_type_ids, labels) -> torch.Tensor:
        """Summed cross-entropy over the batch's target tokens (suffix and <eos>)."""
        h = self.model.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)  # (B, T, D)
        targets = labels[:, 1:]  # position t predicts token t + 1
        is_target = targets != -100
        logits = self.model.language_model.logits(h[:, :-1][is_target])  # (n_targets, vocab), not (B, T, vocab)
        return F.cross_entropy(logits.float(), targets[is_target], reduction="sum")


def normalize_answer(text: str) -> str:
    """VQA-style: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def box_iou(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0) * max(h, 0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_ious(predicted: str, target: str) -> list[float]:
    """For each target box, the IoU of the best unused predicted box with the same label (0 if none)."""
    predictions = parse_detections(predicted, 1, 1)
    ious = []
    for box, label in parse_detections(target, 1, 1):
        scores = [(box_iou(box, p), i) for i, (p, l) in enumerate(predictions) if l == label]
        best, i = max(scores, default=(0.0, None))
        if i is not None:
            predictions.pop(i)
        ious.append(best)
    return ious


@torch.no_grad()
def evaluate(model: PaliGemma, processor: Processor, examples: list[dict], args, device, autocast) -> dict:
    """Validation loss, and greedy answers scored: by box IoU for detect prompts, by exact match for the others."""
    model.eval()
    loss_sum, n_targets, matches, ious, shown = 0.0, 0, [], [], []
    for i in range(0, len(examples), args.batch_size):
        chunk = examples[i:i + args.batch_size]
        images, prefixes = load_images(chunk), [e["prefix"] for e in chunk]
        batch = processor(images, prefixes, [e["suffix"] for e in chunk], max_len=args.max_len)
        prompts = processor(images, prefixes)  # what the model answers: the prompts alone
        batch, prompts = ({k: v.to(device) for k, v in b.items()} for b in (batch, prompts))
        with autocast:
            loss_sum += SuffixLoss(model)(**batch).item()
            new = model.generate(prompts["input_ids"], prompts["pixel_values"], prompts["attention_mask"],
                                 max_new_tokens=args.max_len)
        n_targets += int((batch["labels"][:, 1:] != -100).sum())
        for e, row in zip(chunk, new.tolist()):
            answer = processor.decode(row).strip()
            if e["prefix"].startswith("detect"):
                ious += detection_ious(answer, e["suffix"])
            else:
                matches.append(normalize_answer(answer) == normalize_answer(e["suffix"]))
            if len(shown) < 3:
                shown.append(f"  {e['prefix']!r} -> {answer!r} (target {e['suffix']!r})")
    model.train()
    metrics = dict(val_loss=loss_sum / max(n_targets, 1))
    if matches:
        metrics["exact_match"] = sum(matches) / len(matches)
    if ious:
        metrics["mean_iou"] = sum(ious) / len(ious)
    return metrics, shown


# ----------------------------------------------------------------------------------------------
# Checkpoints


def write_atomically(path: Path, write):
    """`write(tmp_path)`, then rename over `path`: a crash leaves the old file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out: Path, source: Path, model: PaliGemma, optimizer, scaler, step: int, args):
    """An official-layout checkpoint (weights, config.json, tokenizer files) plus train_state.pt."""
    out.mkdir(parents=True, exist_ok=True)
    if source.resolve() != out.resolve():
        for f in source.iterdir():  # tokenizer.model and the other tokenizer/processor files
            if f.name == "tokenizer.model" or (f.suffix == ".json" and f.name not in ("model.safetensors.index.json", "config.json")):
                write_atomically(out / f.name, functools.partial(shutil.copyfile, f))
    config = json.loads((source / "config.json").read_text())
    if args.no_final_softcap:  # the fine-tuned model is used without the cap it was trained without
        config["text_config"]["final_logit_softcapping"] = None
    write_atomically(out / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    state = {k: v.contiguous() for k, v in official_state_dict(model).items()}
    write_atomically(out / "model.safetensors",
                     lambda tmp: save_file(state, tmp, metadata={"format": "pt", "step": str(step)}))
    write_atomically(out / "train_state.pt", lambda tmp: torch.save(
        dict(step=step, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), trainable=args.trainable), tmp))
    log(f"saved {out} at step {step}")


# ----------------------------------------------------------------------------------------------


def resolve_checkpoint_or_fail(name: str) -> Path:
    try:
        return resolve_checkpoint(name, ["*.json", "*.safetensors", "tokenizer.model"])  # weights, config, tokenizer
    except (OSError, ValueError) as e:
        fail(str(e))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="training JSONL")
    p.add_argument("--val", type=Path, default=None,
                   help="validation JSONL (default: _annotations.valid.jsonl or valid.jsonl beside --data, or ../valid/ of a train/ folder)")
    p.add_argument("--model", default="google/paligemma-3b-pt-224", help="checkpoint folder or hub id")
    p.add_argument("--out", type=Path, default=Path("out"), help="checkpoint folder to write")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--trainable", choices=sorted(TRAINABLE), default="attn", help="attn: the decoder's q/k/v/o only")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch and process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="sgd: big_vision's recipe (plain SGD, --lr 0.03)")
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with a linear warm-up, then cosine decay")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: none)")
    p.add_argument("--no-final-softcap", action="store_true",
                   help="PaliGemma 2: train (and save) without the final logit soft-cap, as big_vision's transfers do")
    p.add_argument("--max-len", type=int, default=128, help="text tokens per example, image tokens not counted")
    p.add_argument("--skip-bad", action="store_true", help="skip bad JSONL lines instead of stopping")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute decoder layers in backward: less memory")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype and dtype of frozen weights (default: bfloat16 on a GPU that supports it, else float32)")
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    p.add_argument("--seed", type=int, default=0, help="fixes the data order")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-examples", type=int, default=100, help="validation examples to evaluate")
    p.add_argument("--save-every", type=int, default=0, help="save every N steps (0: only at the end)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(args.device or default_device())
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32)
    torch.manual_seed(args.seed)

    train_set = read_jsonl(args.data, args.skip_bad)
    val_file = args.val or default_val_file(args.data)
    val_set = read_jsonl(val_file, args.skip_bad)[:args.eval_examples] if val_file else []
    log(f"data: {len(train_set)} training examples from {args.data}; "
        + (f"{len(val_set)} validation examples from {val_file}" if val_file else "no validation file"))

    if args.resume and not (args.out / "train_state.pt").is_file():
        fail(f"--resume: {args.out} holds no checkpoint written by train.py (no train_state.pt)")
    source = args.out if args.resume else resolve_checkpoint_or_fail(args.model)
    try:
        model = PaliGemma.from_pretrained(source, dtype=dtype, device=device)
        processor = Processor.from_pretrained(source)
    except (OSError, ValueError) as e:
        fail(str(e))
    if args.no_final_softcap:
        model.config.text_config.final_logit_softcapping = None
    truncated = sum(len(processor.text_tokens(e["prefix"], e["suffix"])[0]) > args.max_len for e in train_set)
    if truncated:
        log(f"data: {truncated} training example(s) longer than --max-len {args.max_len} text tokens are truncated")

    trainable = set_trainable(model, args.trainable)
    # Re-read at their stored precision: the float32 weights start from the checkpoint's values, not their rounding.
    for name, tensor in read_tensors(source, set(trainable)).items():
        model.get_parameter(name).data.copy_(tensor)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    log(f"model: {n_total:,} parameters, {n_trainable:,} trainable ({args.trainable}), compute {dtype}, {device}"
        + (f", {world} processes" if world > 1 else ""))

    per_step = args.batch_size * args.grad_accum * world
    if len(train_set) < per_step:
        fail(f"{len(train_set)} training examples are fewer than one step's batch of {per_step}")
    steps = args.steps or max(1, int(args.epochs * len(train_set) // per_step))
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    # float16 gradients underflow without loss scaling (bfloat16 has float32's range and needs none)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = 0
    if args.resume:
        state = torch.load(args.out / "train_state.pt", map_location=device)
        if state["trainable"] != args.trainable:
            fail(f"{args.out} was trained with --trainable {state['trainable']}, not {args.trainable}")
        with safe_open(args.out / "model.safetensors", framework="pt") as f:
            if int(f.metadata()["step"]) != state["step"]:
                fail(f"{args.out}: model.safetensors and train_state.pt are from different steps")
        optimizer.load_state_dict(state["optimizer"])
        if state["scaler"] and scaler.is_enabled():  # empty when the run so far was not in float16
            scaler.load_state_dict(state["scaler"])
        start = state["step"]
        log(f"resumed from {args.out} at step {start}")

    if args.grad_checkpointing:  # recompute each decoder layer's activations in backward
        for layer in model.language_model.layers:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    loss_model = SuffixLoss(model)
    if world > 1:
        loss_model = DistributedDataParallel(loss_model)
    if args.compile:
        loss_model = torch.compile(loss_model)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def lr_at(step: int) -> float:
        warmup = int(args.warmup * steps)
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=list(micro_batches(len(train_set), args.batch_size, args.grad_accum, world, rank,
                                                    args.seed, start, steps)),
        collate_fn=functools.partial(collate, processor=processor, max_len=args.max_len),
        num_workers=min(4, os.cpu_count() or 1))
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the loader's workers start, so that they inherit it
        signal.signal(sig, lambda *_: STOP.append(True))
    batches = iter(loader)
    metrics_file = args.out / "metrics.jsonl"
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)

    def record(entry: dict):
        if rank == 0:
            with open(metrics_file, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def run_eval(step: int):
        if rank == 0 and val_set:
            metrics, shown = evaluate(model, processor, val_set, args, device, autocast)
            log(f"eval step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), *shown, sep="\n")
            record(dict(step=step, **metrics))
        if world > 1:
            dist.barrier()

    model.train()
    if start == 0 and args.eval_every:
        run_eval(0)
    t_start = t_log = time.perf_counter()
    logged_step, tokens_since_log = start, 0
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        micro = [{k: v.to(device) for k, v in next(batches).items()} for _ in range(args.grad_accum)]
        n_targets = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), device=device)
        if world > 1:
            dist.all_reduce(n_targets)
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            sync = world == 1 or i == args.grad_accum - 1  # DDP all-reduces gradients on the last micro-batch only
            with (contextlib.nullcontext() if sync else loss_model.no_sync()), autocast:
                loss = loss_model(**batch)
            # DDP averages over ranks; the mean is over the global targets
            scaler.scale(loss * world / n_targets).backward()
            loss_sum += loss.detach()
            tokens_since_log += int(batch["attention_mask"].sum()) * world
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = (loss_sum / n_targets).item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
        if scaler.is_enabled() and math.isfinite(loss) and not torch.isfinite(grad_norm):
            log(f"step {step + 1}: float16 gradients overflowed at loss scale {scaler.get_scale():g}; "
                "step skipped, scale lowered")
        elif not math.isfinite(loss) or not torch.isfinite(grad_norm):
            fail(f"non-finite loss ({loss}) or gradient norm ({grad_norm.item()}) at step {step + 1}; stopped before the "
                 f"optimizer step, nothing saved (try a lower --lr). The last checkpoint in {args.out}, if any, is intact.")
        scaler.step(optimizer)  # optimizer.step(), unless float16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % args.log_every == 0 or done == steps:
            now = time.perf_counter()
            per_step_s = (now - t_log) / (done - logged_step)
            memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
            log(f"step {done}/{steps}: loss {loss:.4f}, lr {lr_at(step):.2e}, {tokens_since_log / (now - t_log):.0f} tok/s, "
                f"{per_step_s:.2f} s/step{memory}, {(steps - done) * (now - t_start) / (done - start) / 60:.1f} min left")
            record(dict(step=done, loss=loss, lr=lr_at(step), seconds_per_step=per_step_s))
            t_log, logged_step, tokens_since_log = now, done, 0
        if args.eval_every and done % args.eval_every == 0 and done != steps:
            run_eval(done)
        stop = bool(STOP)
        if world > 1:  # a signal may reach the ranks during different steps: all stop at the same one
            flag = torch.tensor(float(stop), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = flag.item() > 0
        if stop or done == steps or (args.save_every and done % args.save_every == 0):
            if rank == 0:
                save_checkpoint(args.out, source, model, optimizer, scaler, done, args)
            if world > 1:
                dist.barrier()
        if stop:
            log(f"stopped at step {done}; continue with --resume")
            break
    else:
        run_eval(steps)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
