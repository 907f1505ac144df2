"""Fine-tune PaliGemma on your own JSONL data. By default only the decoder's attention trains.

    python train.py --data dataset/_annotations.train.jsonl --out ckpt/
    python train.py --data dataset/_annotations.train.jsonl --out ckpt/ --trainable lora      # PEFT adapters
    torchrun --nproc_per_node=4 train.py --data train.jsonl --out ckpt/      # data-parallel, 4 GPUs
    torchrun --nproc_per_node=8 train.py --data train.jsonl --out ckpt/ --fsdp   # sharded, for 10B / 28B

The loss is the mean next-token cross-entropy over the suffix and <eos> tokens of the batch, with the
output head applied only at those positions. Trainable weights (or LoRA adapters, lora.py) are kept in
float32 and the frozen ones in the compute dtype, with autocast (and loss scaling in float16, for GPUs
without bfloat16). Evaluation scores greedy answers (metrics.py): exact match, COCO box mAP for detect
and segment prompts, mask IoU for segment prompts with a VQ-VAE.

Nothing is lost: bad data and options are refused before training starts (data.py); --out receives
crash-consistent checkpoints in the official layout or PEFT's (checkpoint.py), never over its source
model nor over an earlier run unless --resume or --overwrite says so; Ctrl-C or SIGTERM saves at the
end of the current step and exits with 130 / 143, and a second Ctrl-C stops at once; a non-finite loss
stops before anything is written.

The file reads as the script runs: the model and its loss, evaluation, the options, the steps of a run
(setup, the model, resume), the training step, then `main`.

What it is not: a general trainer. One dataset at a time, AdamW or SGD, a cosine schedule.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from checkpoint import (check_out_folder, load_optimizer_state, prepare_out_folder, read_resume_state, save_checkpoint,
                        save_merged)
from cli import add_device_options, device_and_dtype, fail, log, number
from data import batches_until_closed, default_val_file, micro_batches, read_datasets, training_loader
from lora import ATTENTION, MLP, add_lora, load_adapter, read_adapter_config
from metrics import format_scores, score_answers
from paligemma import PaliGemma, resolve_checkpoint
from processor import Processor, load_image
from vqvae import VQVAE

TRAINABLE = {  # --trainable: which parameters learn
    "attn": lambda name: name.startswith("language_model.layers.") and ".self_attn." in name,  # q, k, v, o
    "llm": lambda name: name.startswith("language_model."),
    "all": lambda name: True,
}

# ----------------------------------------------------------------------------------------------
# The model and its loss


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


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    """The number of tokens the loss is taken over: the labels other than -100 after the shift by one."""
    return (labels[:, 1:] != -100).sum()


def lr_at(step: int, lr: float, warmup: float, steps: int) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0."""
    warmup_steps = int(warmup * steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: PaliGemma, processor: Processor, examples: list[dict], batch_size: int, max_len: int,
             max_new_tokens: int, device, autocast, vae=None) -> tuple[dict, list[str]]:
    """The validation loss, and greedy answers to the prompts alone scored by metrics.score_answers (COCO box
    mAP, mask IoU, exact match). Returns the metrics and three example answers."""
    model.eval()
    loss_sum, n_targets, at_limit, rows = 0.0, 0, 0, []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        images, prefixes = [load_image(e["image"]) for e in chunk], [e["prefix"] for e in chunk]
        pixels = {"pixel_values": processor.pixels(images).to(device)}  # one image preprocessing for both
        batch = {k: v.to(device) for k, v in processor.tokens(prefixes, [e["suffix"] for e in chunk], max_len).items()}
        prompts = {k: v.to(device) for k, v in processor.tokens(prefixes).items()}  # what the model answers
        with autocast:
            loss_sum += SuffixLossSum(model)(**batch, **pixels).item()
            new = model.generate(prompts["input_ids"], pixels["pixel_values"], prompts["attention_mask"],
                                 max_new_tokens=max_new_tokens)
        n_targets += int(count_targets(batch["labels"]))
        if new.shape[1] == max_new_tokens:  # rows that wrote no <eos> were cut by the limit
            at_limit += int((new != model.config.eos_token_id).all(1).sum())
        rows += [(e["prefix"], processor.decode(row).strip(), e["suffix"], image.size)
                 for e, image, row in zip(chunk, images, new.tolist())]
    model.train()
    metrics = dict(val_loss=loss_sum / max(n_targets, 1), answers_at_token_limit=at_limit) | score_answers(rows, vae)
    return metrics, [f"  {prefix!r} -> {answer!r} (target {target!r})" for prefix, answer, target, _ in rows[:3]]


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
    add_device_options(p)
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


RESUME_MUST_MATCH = ("trainable", "optimizer", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "rslora",
                     "fsdp")  # saved in train_state.pt; --resume refuses other values


# ----------------------------------------------------------------------------------------------
# The steps of a run


@dataclass
class Run:
    """This process's place in the run (one of `world` under torchrun), and the signals it received."""
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    stop: list[int] = field(default_factory=list)  # SIGINT, SIGTERM: save at the end of the step, then stop

    def all_reduce(self, value: float, op=dist.ReduceOp.SUM) -> float:
        """Summed (or max'ed) over the processes; as it is in a single process."""
        t = torch.tensor(float(value), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(t, op)
        return t.item()

    def barrier(self):
        if dist.is_initialized():
            dist.barrier()


def setup(args) -> Run:
    """The device (one GPU per process under torchrun), the process group and the compute dtype."""
    device, dtype = device_and_dtype(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if args.fsdp and world == 1:
        fail("--fsdp shards across the processes torchrun starts: torchrun --nproc_per_node=N train.py ... --fsdp")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(args.seed)
    return Run(device, dtype, rank, world)


def checkpoint_source(out: Path, model: str, resume: bool, lora: bool) -> tuple[Path, str | None, Processor]:
    """The folder whose weights and tokenizer this run starts from: `model` (a folder, or a hub id
    downloaded), or on resume the run in `out`; with LoRA, always the base model, whose name the adapter
    records (returned second: a hub id or a folder's absolute path; None without LoRA); and its Processor."""
    patterns = ["*.json", "*.safetensors", "tokenizer.model"]
    try:
        if resume and not lora and (out / "adapter_config.json").is_file():
            raise ValueError(f"{out} holds a LoRA adapter: resume it with --trainable lora (and its --lora-* options)")
        local = Path(model).expanduser()
        base = None if not lora else read_adapter_config(out)["base_model_name_or_path"] if resume else \
            str(local.resolve()) if local.is_dir() else model
        source = out if resume and not lora else resolve_checkpoint(base or model, patterns)
        return source, base, Processor.from_pretrained(source)
    except (OSError, ValueError) as e:
        fail(str(e))


def read_vae(path: str | None) -> VQVAE | None:
    try:
        return VQVAE.from_pretrained(path) if path else None
    except (OSError, ValueError) as e:
        fail(f"--vae: {e}")


def shard(root: SuffixLossSum, world: int, device):
    """--fsdp: FSDP2 units of each SigLIP and Gemma layer, and the root with the rest (embeddings, projector,
    norms). A unit may mix float32 weights that learn with frozen ones in the compute dtype: FSDP2 gathers
    parameters of several dtypes as bytes (README: "Beyond one GPU's memory")."""
    mesh = init_device_mesh(device.type, (world,))
    for layer in [*root.model.vision_tower.encoder.layers, *root.model.language_model.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def build_model(args, run: Run, source: Path) -> tuple[PaliGemma, SuffixLossSum, list[nn.Parameter]]:
    """The model with its trainable parameters in float32 (read from the checkpoint's own precision) and
    the rest frozen in the compute dtype; with LoRA, the whole base is frozen and the adapters are new
    (or, on --resume, read from --out). Then the training step's root module, sharded under --fsdp."""
    learns = TRAINABLE.get(args.trainable, lambda name: False)
    device = torch.device("cpu") if args.fsdp else run.device  # --fsdp moves each process's shards
    try:
        model = PaliGemma.from_pretrained(source, dtype=lambda name: torch.float32 if learns(name) else run.dtype,
                                          device=device)
        for name, p in model.named_parameters():
            p.requires_grad_(learns(name))
        if args.trainable == "lora" and args.resume:
            load_adapter(model, args.out)
        elif args.trainable == "lora":
            add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets, args.lora_dropout, args.rslora)
    except (OSError, ValueError) as e:
        fail(str(e))
    if args.no_final_softcap:
        model.config.text_config.final_logit_softcapping = None
    root = SuffixLossSum(model)
    if args.fsdp:
        shard(root, run.world, run.device)
    params = [p for p in model.parameters() if p.requires_grad]
    processes = (f", {run.world} processes" if run.world > 1 else "") + (", sharded (FSDP)" if args.fsdp else "")
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {sum(p.numel() for p in params):,} "
        f"trainable ({args.trainable}), compute {run.dtype}, {run.device}{processes}")
    return model, root, params


def mib_held(tensors) -> float:
    """MiB of the tensors held by this process (of a sharded one, its shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors) / 2**20


def read_data(args, processor: Processor, world: int) -> tuple[list[dict], list[dict], int]:
    """The training and validation examples (data.read_datasets), and the number of steps."""
    val_file = args.val or default_val_file(args.data)
    train_set, val_set = read_datasets(args.data, val_file, processor, args.max_len, args.skip_bad, args.eval_examples)
    per_step = args.batch_size * args.grad_accum * world
    if len(train_set) < per_step:
        fail(f"{len(train_set)} training examples are fewer than one step's batch of {per_step}")
    return train_set, val_set, args.steps or max(1, int(args.epochs * len(train_set) // per_step))


def optimizer_and_resume(args, run: Run, model, params, steps: int):
    """The optimizer and the float16 loss scaler, with their state read back under --resume, and what
    prepare_out_folder needs of the train state ({"step", "file", "optimizer"}, or None)."""
    kind = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    optimizer = kind(params, lr=args.lr, weight_decay=args.weight_decay)
    # float16 gradients underflow without loss scaling (bfloat16 has float32's range and needs none)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    if not args.resume:
        return optimizer, scaler, None
    options = {k: getattr(args, k) for k in RESUME_MUST_MATCH}
    state, state_file = read_resume_state(args.out, run.device, options, steps, run.world, args.fsdp)
    load_optimizer_state(optimizer, state, args.out, model, args.fsdp)
    if state["scaler"] and scaler.is_enabled():  # empty when the run so far was not in float16
        scaler.load_state_dict(state["scaler"])
    log(f"resumed from {args.out} at step {state['step']}")
    return optimizer, scaler, dict(step=state["step"], file=state_file,
                                   optimizer=state["optimizer"] if args.fsdp else None)


def training_module(root: SuffixLossSum, grad_checkpointing: bool, ddp: bool, compile: bool) -> nn.Module:
    """The module the training step calls: with activation checkpointing, data parallelism (DDP; --fsdp
    has sharded the root already) and compilation as asked."""
    if grad_checkpointing:  # recompute each decoder layer's activations in backward
        for layer in root.model.language_model.layers:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    module = DistributedDataParallel(root) if ddp else root
    return torch.compile(module) if compile else module


def stop_on_signals(run: Run, out: Path):
    """Ctrl-C or SIGTERM: run.stop records it, and the loop saves at the end of the step and stops; a second
    Ctrl-C stops at once (the last checkpoint stays intact: saves are crash-consistent)."""
    def on_signal(signum, frame):
        if run.stop and signum == signal.SIGINT:
            print(f"stopped at once; the last checkpoint in {out}, if any, is intact", file=sys.stderr, flush=True)
            os._exit(130)
        run.stop.append(signum)
        log(f"{signal.Signals(signum).name}: saving at the end of this step, then stopping (Ctrl-C again: at once)")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)


def append_metrics(metrics_file: Path | None, entry: dict):
    """A line of OUT/metrics.jsonl (written by process 0, whose metrics_file is not None)."""
    if metrics_file is not None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(entry) + "\n")


# ----------------------------------------------------------------------------------------------
# The training step, and what the loop does around it


def forward_backward(run: Run, loss_model, micro: list[dict], scaler, autocast, ddp: bool) -> tuple[float, int]:
    """Gradients of the step's mean loss over its micro-batches (the mean over every process's target
    tokens). Returns the loss and the number of tokens read."""
    micro = [{k: v.to(run.device) for k, v in b.items()} for b in micro]
    n_targets = run.all_reduce(sum(int(count_targets(b["labels"])) for b in micro))
    loss_sum, tokens = torch.zeros((), device=run.device), 0
    for i, batch in enumerate(micro):
        ddp_waits = ddp and i < len(micro) - 1  # DDP all-reduces gradients on the last micro-batch only
        with (loss_model.no_sync() if ddp_waits else contextlib.nullcontext()), autocast:
            loss = loss_model(**batch)
        scaler.scale(loss * run.world / n_targets).backward()  # DDP averages over processes: the mean is global
        loss_sum += loss.detach()
        tokens += int(batch["attention_mask"].sum()) * run.world
    return run.all_reduce(loss_sum) / n_targets, tokens


def optimizer_step(optimizer, scaler, params, clip: float, loss: float, step: int, out: Path):
    """Clip, then step, unless the loss or the gradients are not finite: float16 gradients that overflowed
    skip the step (and lower the loss scale); otherwise the run stops before anything is written."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if scaler.is_enabled() and math.isfinite(loss) and not torch.isfinite(grad_norm):
        log(f"step {step}: float16 gradients overflowed at loss scale {scaler.get_scale():g}; "
            "step skipped, scale lowered")
    elif not math.isfinite(loss) or not torch.isfinite(grad_norm):
        fail(f"non-finite loss ({loss}) or gradient norm ({grad_norm.item()}) at step {step}; stopped "
             "before the optimizer step, nothing saved (try a lower --lr). The last checkpoint in "
             f"{out}, if any, is intact.")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Progress:
    """Speed and time left, measured between log lines."""
    start: int  # the step this run started from
    steps: int
    t_start: float = field(default_factory=time.perf_counter)
    t_log: float = field(default_factory=time.perf_counter)
    tokens: int = 0  # read since the last line

    def __post_init__(self):
        self.logged_step = self.start

    def line(self, done: int, loss: float, lr: float, device) -> tuple[str, float]:
        now = time.perf_counter()
        per_step = (now - self.t_log) / (done - self.logged_step)
        memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
        minutes_left = (self.steps - done) * (now - self.t_start) / (done - self.start) / 60
        speed = self.tokens / (now - self.t_log)
        text = (f"step {done}/{self.steps}: loss {loss:.4f}, lr {lr:.2e}, {speed:.0f} tok/s, "
                f"{per_step:.2f} s/step{memory}, {minutes_left:.1f} min left")
        self.t_log, self.logged_step, self.tokens = now, done, 0
        return text, per_step


def evaluate_and_log(run: Run, step: int, score, root: SuffixLossSum, sharded: bool, metrics_file: Path | None):
    """`score()` (evaluate on the validation set) in process 0, or under --fsdp in every process alike (a
    rank that skipped a layer's gather would hang the others), with the root unsharded."""
    if run.rank == 0 or sharded:
        if sharded:
            root.unshard()
        metrics, shown = score()
        if sharded:
            root.reshard()
        log(f"eval step {step}: {format_scores(metrics)}", *shown, sep="\n")
        append_metrics(metrics_file, dict(step=step, **metrics))
    run.barrier()


def save(run: Run, step: int, **checkpoint):
    """The checkpoint of `step`: written by process 0, or under --fsdp by every process (checkpoint.py)."""
    if run.rank == 0 or checkpoint["sharded"]:
        save_checkpoint(step=step, **checkpoint)
    run.barrier()


def check_images(run: Run, micro: list[dict], step: int, start: int, checkpoint):
    """An image that became unreadable since the data check (in any process) stops the run, saved at the
    step before."""
    error = next((b["error"] for b in micro if "error" in b), None)
    if run.all_reduce(error is not None, dist.ReduceOp.MAX):
        if step > start:
            checkpoint(step)
        fail(f"{error or 'an image of another process cannot be read'}; stopped before step {step + 1}"
             + (f", saved at step {step}" if step > start else "") + ": fix the data and --resume")


def log_memory(model, optimizer):
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    log(f"memory of process 0: weights {mib_held(model.parameters()):.2f} MiB, "
        f"optimizer state {mib_held(state):.2f} MiB")


def main(argv=None):
    args = parse_args(argv)

    # Setup: --out checked before anything is loaded; the device and processes; the tokenizer and data;
    # the model (sharded under --fsdp before the optimizer, which must hold the shards); the optimizer, resumed.
    check_out_folder(args.out, args.model, args.resume, args.overwrite)
    run = setup(args)
    source, lora_base, processor = checkpoint_source(args.out, args.model, args.resume, args.trainable == "lora")
    train_set, val_set, steps = read_data(args, processor, run.world)
    vae = read_vae(args.vae)
    model, root, params = build_model(args, run, source)
    optimizer, scaler, resumed = optimizer_and_resume(args, run, model, params, steps)
    start = resumed["step"] if resumed else 0
    run.barrier()  # every process has read the train state before process 0 tidies --out
    metrics_file = prepare_out_folder(args.out, resumed, args.overwrite, args.trainable == "lora") \
        if run.rank == 0 else None

    # What the loop calls: the training module, the data, evaluation and saving.
    ddp = run.world > 1 and not args.fsdp
    loss_model = training_module(root, args.grad_checkpointing, ddp, args.compile)
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)
    order = micro_batches(len(train_set), args.batch_size, args.grad_accum, args.seed, start, steps, run.rank,
                          run.world)
    loader = training_loader(train_set, processor, args.max_len, list(order))
    score = functools.partial(evaluate, model, processor, val_set, args.batch_size, args.max_len,
                              args.eval_max_new_tokens, run.device, autocast, vae)
    evaluation = functools.partial(evaluate_and_log, run, score=score, root=root, sharded=args.fsdp,
                                   metrics_file=metrics_file) if val_set else lambda step: None
    checkpoint = functools.partial(save, run, out=args.out, model=model, optimizer=optimizer, scaler=scaler,
                                   source=source, lora_base=lora_base, no_final_softcap=args.no_final_softcap,
                                   sharded=args.fsdp, options={k: getattr(args, k) for k in RESUME_MUST_MATCH})
    stop_on_signals(run, args.out)

    # The training loop: a step, then its log line, evaluation and save; a signal (in any process) stops it.
    with contextlib.closing(batches_until_closed(loader)) as batches:  # the loader's workers stop with the loop
        model.train()
        if start == 0 and args.eval_every:
            evaluation(0)
        progress = Progress(start, steps)
        for step in range(start, steps):
            done = step + 1
            lr = lr_at(step, args.lr, args.warmup, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = [next(batches) for _ in range(args.grad_accum)]
            check_images(run, micro, step, start, checkpoint)
            loss, tokens = forward_backward(run, loss_model, micro, scaler, autocast, ddp)
            optimizer_step(optimizer, scaler, params, args.clip, loss, done, args.out)
            progress.tokens += tokens

            if done == start + 1:
                log_memory(model, optimizer)
            if done % args.log_every == 0 or done == steps:
                line, per_step = progress.line(done, loss, lr, run.device)
                log(line)
                append_metrics(metrics_file, dict(step=done, loss=loss, lr=lr, seconds_per_step=per_step))
            if args.eval_every and done % args.eval_every == 0 and done != steps:
                evaluation(done)
            stop = int(run.all_reduce(run.stop[0] if run.stop else 0, dist.ReduceOp.MAX))
            if stop or done == steps or (args.save_every and done % args.save_every == 0):
                checkpoint(done)
            if stop:
                log(f"stopped at step {done}; continue with --resume")
                sys.exit(128 + stop)  # 130 after Ctrl-C, 143 after SIGTERM: not a finished run

    # Final evaluation; the merged model.
    evaluation(steps)
    if args.merge and run.rank == 0:
        save_merged(args.out / "merged", source, model, args.no_final_softcap)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
