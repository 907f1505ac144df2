"""Fine-tune PaliGemma on your own JSONL data. By default only the decoder's attention trains.

    python train.py --data dataset/_annotations.train.jsonl --out ckpt/
    python train.py --data dataset/_annotations.train.jsonl --out ckpt/ --trainable lora      # PEFT adapters
    python train.py --data dataset/_annotations.train.jsonl --out ckpt/ --trainable lora --quantize nf4  # QLoRA
    torchrun --nproc_per_node=4 train.py --data train.jsonl --out ckpt/      # data-parallel, 4 GPUs
    torchrun --nproc_per_node=8 train.py --data train.jsonl --out ckpt/ --fsdp   # sharded, for 10B / 28B

The loss is the mean next-token cross-entropy over the suffix and <eos> tokens of the batch, with the
output head applied only at those positions (paligemma.SuffixLossSum, summed over the micro-batches and
processes of a step before it is divided). Trainable weights (or LoRA adapters, lora.py) are kept in
float32 and the frozen ones in the compute dtype (or in 4 bits with --quantize nf4, nf4.py), with autocast
(and loss scaling in float16, for GPUs without bfloat16). Evaluation scores greedy answers (metrics.py):
exact match, COCO box mAP for detect and segment prompts, mask IoU for segment prompts with a VQ-VAE;
detect and segment answers are generated under their grammar (detections.AnswerConstraint). What a run
reports (progress, metrics.jsonl, TensorBoard, W&B, the model card) is report.py's.

Nothing is lost: bad data and options are refused before training starts (data.py); --out receives
crash-consistent checkpoints in the official layout or PEFT's (checkpoint.py), never over its source
model nor over an earlier run unless --resume or --overwrite says so; Ctrl-C, SIGTERM or SIGHUP saves at
the end of the current step and exits with 130 / 143 / 129, and a second Ctrl-C stops at once (run.py);
a non-finite loss stops before anything is written.

The file reads as the script runs: the learning rate, evaluation, the options, the pieces of a run
(the model, the data, the optimizer resumed), the training step, then the run itself: prepare, build,
train, finish, and `main`, which calls them in that order.

What it is not: a general trainer. One dataset at a time, AdamW or SGD, a cosine schedule.
"""

import argparse
import contextlib
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from checkpoint import (check_out_folder, check_resume, load_optimizer_state, lock_out_folder, prepare_out_folder,
                        read_train_state, resume_options, run_options, save_merged, starting_point)
from cli import DefaultsFormatter, add_device_options, fail, log, number, parse_given
from data import Draws, batches_until_closed, default_val_file, micro_batches, read_datasets, training_loader
from detections import AnswerConstraint, AnswerTokens
from lora import ATTENTION, MLP, add_lora, load_adapter
from metrics import score_answers
from paligemma import TRAINABLE, PaliGemma, SuffixLossSum, count_targets
from processor import MAX_PIXELS, Processor, load_image
from report import Progress, Reporter, card_of, check_hub, push, require
from run import (Run, check_images, evaluate_together, leave, log_memory, memory_is_enough, save_together, setup,
                 shard, stop_now, stop_on_signals, training_module)
from vqvae import VQVAE

# ----------------------------------------------------------------------------------------------
# The learning rate schedule


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
             max_new_tokens: int, device, autocast, vae=None, constrain: bool = True, repeat_iou: float = 0.9,
             stop=lambda: False) -> tuple[dict | None, list[tuple]]:
    """The validation loss, and greedy answers to the prompts alone scored by metrics.score_answers (COCO box
    mAP, mask IoU, exact match); with `constrain`, detect and segment answers follow their grammar
    (detections.AnswerConstraint: always well-formed, a repeated object ends the answer). Returns the
    metrics (None when `stop()` said to stop) and the first 16 examples as (image, prefix, answer, target)."""
    model.eval()
    loss_sum, n_targets, at_limit, cut, rows, shown = 0.0, 0, 0, 0, [], []
    tokens = AnswerTokens(processor.tokenizer)
    for i in range(0, len(examples), batch_size):
        if stop():
            model.train()
            return None, shown
        chunk = examples[i:i + batch_size]
        images, prefixes = [load_image(e["image"]) for e in chunk], [e["prefix"] for e in chunk]
        pixels = {"pixel_values": processor.pixels(images).to(device)}  # one image preprocessing for both
        batch = {k: v.to(device) for k, v in processor.tokens(prefixes, [e["suffix"] for e in chunk], max_len).items()}
        prompts = {k: v.to(device) for k, v in processor.tokens(prefixes).items()}  # what the model answers
        grammar = AnswerConstraint.for_prompts(prefixes, tokens, model.config.text_config.vocab_size, repeat_iou) \
            if constrain else None
        with autocast:
            loss_sum += SuffixLossSum(model)(**batch, **pixels).item()
            new = model.generate(prompts["input_ids"], pixels["pixel_values"], prompts["attention_mask"],
                                 max_new_tokens=max_new_tokens, constrain=grammar)
        n_targets += int(count_targets(batch["labels"]))
        if new.shape[1] == max_new_tokens:  # rows that wrote no <eos> were cut by the limit
            at_limit += int((new != model.config.eos_token_id).all(1).sum())
        answers = [grammar.answer(r, ids, processor.decode) if grammar else processor.decode(ids)
                   for r, ids in enumerate(new.tolist())]
        cut += sum(row is not None and row.cut is not None for row in grammar.rows) if grammar else 0
        rows += [(e["prefix"], answer, e["suffix"], image.size) for e, image, answer in zip(chunk, images, answers)]
        shown += [(image, e["prefix"], answer, e["suffix"]) for e, image, answer in zip(chunk, images, answers)]
        del shown[16:]
    model.train()
    metrics = dict(val_loss=loss_sum / max(n_targets, 1), answers_at_token_limit=at_limit) | score_answers(rows, vae)
    return metrics | ({"repeated_objects_cut": cut} if constrain and "map50" in metrics else {}), shown


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


def options() -> argparse.ArgumentParser:
    """train.py's options, each checked for its type and range as it is parsed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsFormatter)
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
    p.add_argument("--quantize", choices=["nf4"], default=None, help="keep the frozen linear weights in 4 bits "
                   "(NF4, as bitsandbytes): with --trainable lora (QLoRA) or attn")
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
    p.add_argument("--max-image-pixels", type=number(int, 1), default=MAX_PIXELS,
                   help="larger images are refused (PIL's limit against decompression bombs)")
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
    p.add_argument("--no-constrain", action="store_true", help="evaluation: let detect and segment answers run free "
                   "(by default they follow PaliGemma's answer grammar, detections.AnswerConstraint)")
    p.add_argument("--repeat-iou", type=number(float, 0, 1, above=True), default=0.9,
                   help="evaluation: an object with an earlier one's label and IoU >= this ends the answer")
    p.add_argument("--shuffle-objects", action="store_true",
                   help="detect and segment answers: the objects in another order each epoch")
    p.add_argument("--save-every", type=number(int, 0), default=0, help="save every N steps (0: only at the end)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files in OUT/tensorboard/")
    p.add_argument("--wandb", metavar="PROJECT", default=None, help="also log to this Weights & Biases project")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="at the end, upload the checkpoint (or adapter) and its model card to this hub repo")
    p.add_argument("--hub-private", action="store_true", help="with --push-to-hub: create the repo private")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The options, checked together, and the names of those the command line gives (--resume keeps the
    others)."""
    p = options()
    args, given = parse_given(p, argv)
    lora_options = {"--lora-rank": args.lora_rank, "--lora-alpha": args.lora_alpha, "--lora-targets": args.lora_targets,
                    "--lora-dropout": args.lora_dropout, "--rslora": args.rslora or None, "--merge": args.merge or None}
    if args.trainable != "lora" and (lora_given := [k for k, v in lora_options.items() if v is not None]):
        p.error(f"{', '.join(lora_given)} only with --trainable lora")
    if args.quantize and (args.trainable in ("all", "llm") or args.fsdp):
        p.error("--quantize keeps frozen weights in 4 bits: it takes --trainable lora or attn, and not --fsdp")
    if args.fsdp and (args.merge or args.dtype == "float16"):
        p.error("--fsdp does not take --merge (merge the saved adapter with lora.merge_lora in one process) "
                "nor --dtype float16 (use bfloat16)")
    if args.trainable == "lora" and args.no_final_softcap and not args.merge:
        p.error("--no-final-softcap with --trainable lora needs --merge: the adapter alone is served on the base "
                "model's config, which has the soft-cap")
    if args.trainable == "lora":
        args.lora_rank, args.lora_alpha = args.lora_rank or 8, args.lora_alpha or 16.0
        args.lora_targets, args.lora_dropout = args.lora_targets or ATTENTION, args.lora_dropout or 0.0
    return args, given


# ----------------------------------------------------------------------------------------------
# The steps of a run


def read_vae(path: str | None, val_set: list[dict]) -> VQVAE | None:
    """--vae's VQ-VAE, or None (and one line when segment prompts will be scored without their masks)."""
    if path is None and any(e["prefix"].startswith("segment") for e in val_set):
        log("the validation data has segment prompts: their masks are scored (mask IoU) only with --vae")
    try:
        return VQVAE.from_pretrained(path) if path else None
    except (OSError, ValueError) as e:
        fail(f"--vae: {e}")


def build_model(args, run: Run, source: Path) -> tuple[PaliGemma, SuffixLossSum, list[nn.Parameter]]:
    """The model with its trainable parameters in float32 (read from the checkpoint's own precision) and
    the rest frozen in the compute dtype; with LoRA, the whole base is frozen and the adapters are new
    (or, on --resume, read from --out). Then the training step's root module, sharded under --fsdp."""
    learns = TRAINABLE.get(args.trainable, lambda name: False)
    device = torch.device("cpu") if args.fsdp else run.device  # --fsdp moves each process's shards
    try:
        quantize = (lambda layer: not learns(f"{layer}.weight")) if args.quantize else None  # nf4: the frozen ones
        model = PaliGemma.from_pretrained(source, dtype=lambda name: torch.float32 if learns(name) else run.dtype,
                                          device=device, quantize=quantize)
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


def read_data(args, processor: Processor, world: int, val_file: Path | None) -> tuple[list[dict], list[dict], int]:
    """The training and validation examples (data.read_datasets), and the number of steps."""
    train_set, val_set = read_datasets(args.data, val_file, processor, args.max_len, args.skip_bad, args.eval_examples,
                                       args.max_image_pixels)
    per_step = args.batch_size * args.grad_accum * world
    if len(train_set) < per_step:
        fail(f"{len(train_set)} training examples are fewer than one step's batch of {per_step}")
    return train_set, val_set, args.steps or max(1, int(args.epochs * len(train_set) // per_step))


def optimizer_and_resume(args, run: Run, model, params, steps: int, saved: tuple[dict, str] | None):
    """The optimizer and the float16 loss scaler, with their state read back from `saved` (read_train_state's
    state and file) under --resume, and what prepare_out_folder needs of it ({"step", "file", "optimizer",
    "wandb_id"}, or None)."""
    kind = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    optimizer = kind(params, lr=args.lr, weight_decay=args.weight_decay)
    # float16 gradients underflow without loss scaling (bfloat16 has float32's range and needs none)
    scaler = torch.amp.GradScaler(run.device.type, enabled=run.dtype == torch.float16)
    if saved is None:
        return optimizer, scaler, None
    state, state_file = saved
    check_resume(state, args.out, steps, run.world, args.fsdp)
    saved_steps = state["options"].get("steps", steps)
    if saved_steps != steps:
        log(f"--resume: the schedule now ends at step {steps} (the run's at {saved_steps}): the learning rate "
            f"at step {state['step'] + 1} is {lr_at(state['step'], args.lr, args.warmup, steps):.3g}, not "
            f"{lr_at(state['step'], args.lr, args.warmup, saved_steps):.3g}")
    load_optimizer_state(optimizer, scaler, state, args.out, model, args.fsdp, args.weight_decay)
    log(f"resumed from {args.out} at step {state['step']}")
    return optimizer, scaler, dict(step=state["step"], file=state_file, wandb_id=state.get("wandb_id"),
                                   optimizer=state["optimizer"] if args.fsdp else None)


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


def optimizer_step(optimizer, scaler, params, clip: float, loss: float, step: int, out: Path) -> float:
    """Clip, then step, unless the loss or the gradients are not finite: float16 gradients that overflowed
    skip the step (and lower the loss scale); otherwise the run stops before anything is written. Returns
    the gradients' norm before clipping."""
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
    return grad_norm.item()


@dataclass
class Loop:
    """What the training loop calls (made by `build`): the model and its optimizer, the step's module, the
    batches, and evaluation, saving and reporting bound to the run."""
    model: PaliGemma
    params: list
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loss_model: nn.Module
    autocast: torch.autocast
    loader: torch.utils.data.DataLoader
    evaluation: object  # step -> why it could not evaluate, or None
    checkpoint: object  # step -> None: saves the step
    reporter: Reporter | None
    start: int
    steps: int


def prepare(args, given: set[str]) -> tuple[Run, Path | None, tuple[dict, str] | None]:
    """Before anything is loaded: the optional packages asked for, --out, the hub, and the train state to
    resume (its options taken back into args); then the device and the processes."""
    if args.tensorboard:
        require("torch.utils.tensorboard", "--tensorboard", "tensorboard")
    if args.wandb:
        require("wandb", "--wandb", "wandb")
    val_file = args.val or default_val_file(args.data)
    check_out_folder(args.out, args.model, args.resume, args.overwrite, [args.data] + [val_file] * bool(val_file))
    if args.push_to_hub:
        check_hub(args.push_to_hub)
    saved = read_train_state(args.out, "cpu") if args.resume else None
    if saved:
        resume_options(args, given, saved[0]["options"], args.out)
    return setup(args), val_file, saved


def build(args, given: set[str], run: Run, val_file: Path | None, saved) -> Loop:
    """The tokenizer and data; the model (sharded under --fsdp before the optimizer, which must hold the
    shards); the optimizer, resumed; --out made ready and the reports opened (process 0); then what the loop
    calls, bound to them."""
    source, lora_base = starting_point(args.out, args.model, args.resume, args.trainable == "lora", "model" in given)
    try:
        processor = Processor.from_pretrained(source)
    except (OSError, ValueError) as e:
        fail(str(e))
    train_set, val_set, steps = read_data(args, processor, run.world, val_file)
    vae = read_vae(args.vae, val_set)
    model, root, params = build_model(args, run, source)
    optimizer, scaler, resumed = optimizer_and_resume(args, run, model, params, steps, saved)
    start = resumed["step"] if resumed else 0
    run.barrier()  # every process has read the train state before process 0 tidies --out
    reporter = None
    if run.rank == 0:
        prepare_out_folder(args.out, resumed, args.overwrite, args.trainable == "lora")
        reporter = Reporter(args.out, start, args.resume, args.tensorboard, args.wandb,
                            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                            resumed and resumed["wandb_id"])
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)
    order = micro_batches(len(train_set), args.batch_size, args.grad_accum, args.seed, start, steps, run.rank,
                          run.world)
    loader = training_loader(Draws(train_set, args.seed if args.shuffle_objects else None), processor, args.max_len,
                             list(order))
    stopping = run.stopped if args.fsdp else lambda: bool(run.stop)  # under --fsdp all evaluate: all stop together
    score = memory_is_enough("in evaluation", args)(functools.partial(  # each call inside the context
        evaluate, model, processor, val_set, args.batch_size, args.max_len, args.eval_max_new_tokens, run.device,
        autocast, vae, not args.no_constrain, args.repeat_iou, stopping))
    evaluation = functools.partial(evaluate_together, run, score=score, root=root, sharded=args.fsdp,
                                   reporter=reporter, vae=vae) if val_set else lambda step: None
    data = {str(args.data): len(train_set)} | ({"validation": len(val_set)} if val_set else {})
    checkpoint = functools.partial(
        save_together, run, reporter=reporter, out=args.out, model=model, optimizer=optimizer, scaler=scaler,
        source=source, lora_base=lora_base, no_final_softcap=args.no_final_softcap, sharded=args.fsdp,
        wandb_id=reporter and reporter.wandb_id, options=run_options(args, steps),
        card=reporter and functools.partial(card_of, args, run.world, lora_base or args.model, steps, data, reporter))
    loss_model = training_module(root, args.grad_checkpointing, run.world > 1 and not args.fsdp, args.compile)
    return Loop(model, params, optimizer, scaler, loss_model, autocast, loader, evaluation, checkpoint, reporter,
                start, steps)


def train(args, run: Run, loop: Loop):
    """The training loop: a step, then its log line, evaluation and save; a signal (in any process) stops it."""
    ddp, start, steps = run.world > 1 and not args.fsdp, loop.start, loop.steps
    stop_on_signals(run, args.out)
    with contextlib.closing(batches_until_closed(loop.loader)) as batches:  # the loader's workers stop with it
        loop.model.train()
        if start == 0 and args.eval_every and (why := loop.evaluation(0)):
            fail(f"{why}; stopped before step 1: fix the data")
        progress = Progress(start, steps)
        for step in range(start, steps):
            done = step + 1
            lr = lr_at(step, args.lr, args.warmup, steps)
            for group in loop.optimizer.param_groups:
                group["lr"] = lr
            micro = [next(batches) for _ in range(args.grad_accum)]
            check_images(run, micro, step, start, loop.checkpoint)
            with memory_is_enough(f"at step {done}", args):
                loss, tokens = forward_backward(run, loop.loss_model, micro, loop.scaler, loop.autocast, ddp)
                grad_norm = optimizer_step(loop.optimizer, loop.scaler, loop.params, args.clip, loss, done, args.out)
            progress.tokens += tokens

            if done == start + 1:
                log_memory(loop.model, loop.optimizer)
            if done % args.log_every == 0 or done == steps:
                line, numbers = progress.line(done, loss, lr, run.device)
                log(line)
                if loop.reporter:
                    loop.reporter.write(done, numbers | dict(grad_norm=grad_norm))
            if args.eval_every and done % args.eval_every == 0 and done != steps and (why := loop.evaluation(done)):
                loop.checkpoint(done)
                fail(f"{why}; saved at step {done}: fix the validation data and --resume")
            if run.stopped():
                stop_now(run, done, loop.checkpoint)
            if done == steps or (args.save_every and done % args.save_every == 0):
                loop.checkpoint(done)


def finish(args, run: Run, loop: Loop):
    """The final evaluation (a signal, during it or the final save, stops the run: its checkpoint is saved),
    the model card with its scores, the merged model, the upload."""
    why = None if run.stopped() else loop.evaluation(loop.steps)
    if run.stopped():
        stop_now(run, loop.steps)
    if why:
        fail(f"{why}; the checkpoint of step {loop.steps} is saved")
    if loop.reporter:
        loop.reporter.write_card(loop.checkpoint.keywords["card"]())
    if args.merge and run.rank == 0:
        save_merged(args.out / "merged", loop.checkpoint.keywords["source"], loop.model, args.no_final_softcap,
                    adapter=args.out)
    if args.push_to_hub and run.rank == 0:
        push(args.out, args.push_to_hub, args.hub_private)
    if loop.reporter:
        loop.reporter.close()
    if dist.is_initialized():
        leave(0)  # under torchrun a process ends this way: run.leave says why


def main(argv=None):
    args, given = parse_args(argv)
    try:
        run, val_file, saved = prepare(args, given)
        with lock_out_folder(args.out) if run.rank == 0 else contextlib.nullcontext():  # held until training ends
            loop = build(args, given, run, val_file, saved)
            train(args, run, loop)
            finish(args, run, loop)
    except KeyboardInterrupt:  # before the signal handlers are in place: the data check, loading
        print(f"{Path(sys.argv[0]).name}: stopped (Ctrl-C) before training began; no checkpoint was written",
              file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
