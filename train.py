"""Fine-tune PaliGemma on your own JSONL data. By default only the decoder's attention trains.

    python train.py --data dataset/_annotations.train.jsonl --out ckpt/
    python train.py --data train.jsonl --out ckpt/ --trainable lora                  # PEFT adapters
    python train.py --data train.jsonl --out ckpt/ --trainable lora --quantize nf4   # QLoRA
    torchrun --nproc_per_node=4 train.py --data train.jsonl --out ckpt/     # data-parallel, 4 GPUs
    torchrun --nproc_per_node=8 train.py --data train.jsonl --out ckpt/ --fsdp   # sharded: 10B, 28B

The loss is the mean next-token cross-entropy over the suffix and <eos> tokens of the batch, with
the output head applied only at those positions (paligemma.SuffixLossSum, summed over the
micro-batches and processes of a step before it is divided). Trainable weights (or LoRA adapters,
lora.py) are kept in float32 and the frozen ones in the compute dtype (or in 4 bits with --quantize
nf4, nf4.py), with autocast (and loss scaling in float16, for GPUs without bfloat16). Evaluation
generates greedy answers to the validation prompts and scores each by its task (answers.py,
metrics.py).

Nothing is lost: bad data and options are refused before training starts (data.py); --out receives
crash-consistent checkpoints in the official layout or PEFT's (checkpoint.py), never over its source
model nor over an earlier run unless --resume or --overwrite says so; Ctrl-C, SIGTERM or SIGHUP
saves at the end of the current step and exits with 130 / 143 / 129, and a second Ctrl-C stops at
once (run.py); a non-finite loss stops before anything is written.

The file reads top-down: `main`, the training loop and its step; then how a run is built (the model,
the data, the optimizer resumed, --out made ready), evaluated and saved; the options last, each with
what --resume does with it.

What it is not: a general trainer. One dataset at a time, AdamW or SGD, a cosine schedule.
"""

import argparse
import contextlib
import functools
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import lora
from answers import evaluate as answer_and_score, read_vae
from checkpoint import (check_out_folder, check_resume, load_optimizer_state, lock_out_folder,
                        prepare_out_folder, read_train_state, save_checkpoint, save_merged,
                        starting_point)
from cli import (DefaultsFormatter, UserError, add_answer_options, add_device_options,
                 add_image_limit, add_quantize_option, add_vae_option, log, number, parse_given,
                 print_error, use_own_image_limit)
from data import (Draws, batches_until_closed, default_val_file, micro_batches, read_datasets,
                  training_loader)
from paligemma import TRAINABLE, PaliGemma, SuffixLossSum, count_targets
from processor import Processor
from report import Progress, Reporter, check_hub, model_card, push, require
from run import (Run, Stopped, check_images, leave, log_memory, memory_is_enough, setup, shard,
                 stop_now, stop_on_signals, training_module, unsharded_for)
from vqvae import VQVAE


def main(argv=None):
    args, given = parse_args(argv)
    use_own_image_limit()
    try:
        run, val_file, saved = prepare(args, given)
        # held until training ends
        with lock_out_folder(args.out) if run.rank == 0 else contextlib.nullcontext():
            loop = build(args, given, run, val_file, saved)
            train(loop)
            finish(loop)
    except Stopped as e:  # a signal: saved at the end of the step
        leave(e.code)
    except UserError as e:
        print_error(str(e), e.details)
        # sys.exit, or under torchrun the end without Python's teardown (run.leave says why)
        leave(2)
    except KeyboardInterrupt:  # before the signal handlers are in place: the data check, loading
        print(f"{Path(sys.argv[0]).name}: stopped (Ctrl-C) before training began; no checkpoint "
              "was written", file=sys.stderr, flush=True)
        sys.exit(130)
    if dist.is_initialized():
        leave(0)  # under torchrun a process ends this way: run.leave says why


def train(loop: "Loop"):
    """The training loop: a step, then its log line, evaluation and save; a signal (in any process)
    stops it at the end of the step, saved."""
    args, run, steps = loop.args, loop.run, loop.steps
    stop_on_signals(run, args.out)
    # the loader's workers stop with it
    with contextlib.closing(batches_until_closed(loop.loader)) as batches:
        loop.model.train()
        if loop.start == 0 and args.eval_every and (why := evaluate(loop, 0)):
            raise UserError(f"{why}; stopped before step 1: fix the data")
        progress = Progress(loop.start, steps)
        for step in range(loop.start, steps):
            done = step + 1
            lr = lr_at(step, args.lr, args.warmup, steps)
            for group in loop.optimizer.param_groups:
                group["lr"] = lr
            micro = [next(batches) for _ in range(args.grad_accum)]
            check_images(run, micro, step, loop.start, functools.partial(save, loop))
            with memory_is_enough(f"at step {done}", memory_hints(args), args.out):
                loss, tokens = forward_backward(loop, micro)
                grad_norm = optimizer_step(loop, loss, done)
            progress.tokens += tokens

            if done == loop.start + 1:
                log_memory(loop.model, loop.optimizer)
            if done % args.log_every == 0 or done == steps:
                line, numbers = progress.line(done, loss, lr, run.device)
                log(line)
                if loop.reporter:
                    loop.reporter.write(done, numbers | dict(grad_norm=grad_norm))
            evaluating = args.eval_every and done % args.eval_every == 0 and done != steps
            if evaluating and (why := evaluate(loop, done)):
                save(loop, done)
                raise UserError(f"{why}; saved at step {done}: fix the validation data and "
                                "--resume")
            if run.stopped():
                stop_now(run, done, functools.partial(save, loop))
            if done == steps or (args.save_every and done % args.save_every == 0):
                save(loop, done)


def finish(loop: "Loop"):
    """The final evaluation (a signal, during it or the final save, stops the run: its checkpoint is
    saved), the model card with its scores, the merged model, the upload."""
    args, run = loop.args, loop.run
    why = None if run.stopped() else evaluate(loop, loop.steps)
    if run.stopped():
        stop_now(run, loop.steps)
    if why:
        raise UserError(f"{why}; the checkpoint of step {loop.steps} is saved")
    if loop.reporter:
        loop.reporter.write_card(card(loop))
    if args.merge and run.rank == 0:
        save_merged(args.out / "merged", loop.source, loop.model, args.no_final_softcap)
    if args.push_to_hub and run.rank == 0:
        push(args.out, args.push_to_hub, args.hub_private)
    if loop.reporter:
        loop.reporter.close()


# ----------------------------------------------------------------------------------------------
# The training step


def forward_backward(loop: "Loop", micro: list[dict]) -> tuple[float, int]:
    """Gradients of the step's mean loss over its micro-batches (the mean over every process's
    target tokens). Returns the loss and the number of tokens read."""
    run = loop.run
    micro = [{k: v.to(run.device) for k, v in b.items()} for b in micro]
    n_targets = run.all_reduce(sum(int(count_targets(b["labels"])) for b in micro))
    ddp = run.world > 1 and not loop.args.fsdp
    loss_sum, tokens = torch.zeros((), device=run.device), 0
    for i, batch in enumerate(micro):
        # DDP all-reduces gradients on the last micro-batch only
        ddp_waits = ddp and i < len(micro) - 1
        with (loop.loss_model.no_sync() if ddp_waits else contextlib.nullcontext()), loop.autocast:
            loss = loop.loss_model(**batch)
        # DDP averages over processes: the mean is taken over every process's targets
        loop.scaler.scale(loss * run.world / n_targets).backward()
        loss_sum += loss.detach()
        tokens += int(batch["attention_mask"].sum()) * run.world
    return run.all_reduce(loss_sum) / n_targets, tokens


def optimizer_step(loop: "Loop", loss: float, step: int) -> float:
    """Clip, then step, unless the loss or the gradients are not finite: float16 gradients that
    overflowed skip the step (and lower the loss scale); otherwise the run stops before anything is
    written. Returns the gradients' norm before clipping."""
    optimizer, scaler, clip = loop.optimizer, loop.scaler, loop.args.clip
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(loop.params, clip if clip > 0 else float("inf"))
    if scaler.is_enabled() and math.isfinite(loss) and not torch.isfinite(grad_norm):
        log(f"step {step}: float16 gradients overflowed at loss scale {scaler.get_scale():g}; "
            "step skipped, scale lowered")
    elif not math.isfinite(loss) or not torch.isfinite(grad_norm):
        raise UserError(f"non-finite loss ({loss}) or gradient norm ({grad_norm.item()}) at step "
                        f"{step}; stopped before the optimizer step, nothing saved (try a lower "
                        f"--lr). The last checkpoint in {loop.args.out}, if any, is intact.")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()


def lr_at(step: int, lr: float, warmup: float, steps: int) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0."""
    warmup_steps = int(warmup * steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


# ----------------------------------------------------------------------------------------------
# Building a run


@dataclass
class Loop:
    """What a run trains with, made by `build`."""
    args: argparse.Namespace
    run: Run
    model: PaliGemma
    root: SuffixLossSum  # the model and its loss: what --fsdp shards
    loss_model: nn.Module  # the root as the step calls it: checkpointed, DDP, compiled, as asked
    params: list[nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    loader: torch.utils.data.DataLoader
    processor: Processor
    val_set: list[dict]
    vae: VQVAE | None
    source: Path  # the checkpoint the weights (or with LoRA, the base) were read from
    lora_base: str | None  # with LoRA, the base model the adapter records
    data: dict[str, int]  # examples per file, for the model card
    options: dict  # what train_state.pt keeps of the options (run_options)
    reporter: Reporter | None  # process 0's
    start: int
    steps: int


def prepare(args, given: set[str]) -> tuple[Run, Path | None, tuple[dict, str] | None]:
    """Before anything is loaded: the optional packages asked for, --out, the hub, and the train
    state to resume (its options taken back into args); then the device and the processes."""
    if args.tensorboard:
        require("torch.utils.tensorboard", "--tensorboard", "tensorboard")
    if args.wandb:
        require("wandb", "--wandb", "wandb")
    val_file = args.val or default_val_file(args.data)
    check_out_folder(args.out, args.model, args.resume, args.overwrite,
                     [args.data] + [val_file] * bool(val_file))
    if args.push_to_hub:
        check_hub(args.push_to_hub)
    saved = read_train_state(args.out, "cpu") if args.resume else None
    if saved:
        resume_options(args, given, saved[0]["options"], args.out)
    return setup(args.device, args.dtype, args.seed, args.fsdp), val_file, saved


def build(args, given: set[str], run: Run, val_file: Path | None, saved) -> Loop:
    """The tokenizer and data; the model (sharded under --fsdp before the optimizer, which must hold
    the shards); the optimizer, resumed; --out made ready and the reports opened (process 0)."""
    lora_run = args.trainable == "lora"
    source, lora_base = starting_point(args.out, args.model, args.resume, lora_run,
                                       "model" in given)
    try:
        processor = Processor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    train_set, val_set = read_datasets(args.data, val_file, processor, args.max_len, args.skip_bad,
                                       args.eval_examples, args.max_image_pixels)
    steps = count_steps(args, len(train_set), run.world)
    vae = read_vae(args.vae, val_set)
    model, root, params = build_model(args, run, source)
    optimizer, scaler, resumed = optimizer_and_resume(args, run, model, params, steps, saved)
    start = resumed["step"] if resumed else 0
    run.barrier()  # every process has read the train state before process 0 tidies --out
    reporter = None
    if run.rank == 0:
        prepare_out_folder(args.out, resumed, args.overwrite, lora_run)
        reporter = Reporter(
            args.out, start, args.resume, args.tensorboard, args.wandb,
            {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            resumed and resumed["wandb_id"])
    order = micro_batches(len(train_set), args.batch_size, args.grad_accum, args.seed, start, steps,
                          run.rank, run.world)
    draws = Draws(train_set, args.seed if args.shuffle_objects else None)
    data = {str(args.data): len(train_set)} | ({"validation": len(val_set)} if val_set else {})
    loss_model = training_module(root, args.grad_checkpointing, run.world > 1 and not args.fsdp,
                                 args.compile)
    autocast = torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype != torch.float32)
    return Loop(args=args, run=run, model=model, root=root, loss_model=loss_model, params=params,
                optimizer=optimizer, scaler=scaler, autocast=autocast, processor=processor,
                loader=training_loader(draws, processor, args.max_len, list(order), args.seed),
                val_set=val_set, vae=vae, source=source, lora_base=lora_base, data=data,
                options=run_options(args, steps), reporter=reporter, start=start, steps=steps)


def count_steps(args, n_examples: int, world: int) -> int:
    """--steps, or the steps of --epochs over the training examples."""
    per_step = args.batch_size * args.grad_accum * world
    if n_examples < per_step:
        raise UserError(f"{n_examples} training examples are fewer than one step's batch of "
                        f"{per_step}")
    return args.steps or max(1, int(args.epochs * n_examples // per_step))


def build_model(args, run: Run, source: Path
                ) -> tuple[PaliGemma, SuffixLossSum, list[nn.Parameter]]:
    """The model with its trainable parameters in float32 (read from the checkpoint's own precision)
    and the rest frozen in the compute dtype; with LoRA, the whole base is frozen and the adapters
    are new (or, on --resume, read from --out). Then the training step's root module, sharded under
    --fsdp."""
    learns = TRAINABLE.get(args.trainable, lambda name: False)
    device = torch.device("cpu") if args.fsdp else run.device  # --fsdp moves each process's shards
    try:
        # --quantize nf4: the frozen linear layers
        model = PaliGemma.from_pretrained(
            source, dtype=lambda name: torch.float32 if learns(name) else run.dtype, device=device,
            quantize=args.quantize, keep=lambda layer: learns(f"{layer}.weight"))
        for name, p in model.named_parameters():
            p.requires_grad_(learns(name))
        if args.trainable == "lora" and args.resume:
            lora.load_adapter(model, args.out)
        elif args.trainable == "lora":
            lora.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets,
                          args.lora_dropout, args.rslora)
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None
    if args.no_final_softcap:
        model.config.text_config.final_logit_softcapping = None
    root = SuffixLossSum(model)
    if args.fsdp:
        shard(root, run.world, run.device)
    params = [p for p in model.parameters() if p.requires_grad]
    processes = ((f", {run.world} processes" if run.world > 1 else "")
                 + (", sharded (FSDP)" if args.fsdp else ""))
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{sum(p.numel() for p in params):,} trainable ({args.trainable}), compute {run.dtype}, "
        f"{run.device}{processes}")
    return model, root, params


def optimizer_and_resume(args, run: Run, model, params, steps: int, saved: tuple[dict, str] | None):
    """The optimizer and the float16 loss scaler, with their state read back from `saved`
    (read_train_state's state and file) under --resume, and what prepare_out_folder needs of it
    ({"step", "file", "optimizer", "wandb_id"}, or None)."""
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
        log(f"--resume: the schedule now ends at step {steps} (the run's at {saved_steps}): the "
            f"learning rate at step {state['step'] + 1} is "
            f"{lr_at(state['step'], args.lr, args.warmup, steps):.3g}, not "
            f"{lr_at(state['step'], args.lr, args.warmup, saved_steps):.3g}")
    load_optimizer_state(optimizer, scaler, state, args.out, model, args.fsdp, args.weight_decay)
    log(f"resumed from {args.out} at step {state['step']}")
    return optimizer, scaler, dict(step=state["step"], file=state_file,
                                   wandb_id=state.get("wandb_id"),
                                   optimizer=state["optimizer"] if args.fsdp else None)


# ----------------------------------------------------------------------------------------------
# Evaluating and saving, in step across the processes


def evaluate(loop: Loop, step: int) -> str | None:
    """answers.evaluate on the validation set, in process 0, or under --fsdp in every process alike
    (a rank that skipped a layer's gather would hang the others) with the root unsharded; process 0
    reports it. Returns why it could not be done (an image gone), or None."""
    args, run, why, metrics = loop.args, loop.run, None, None
    if not loop.val_set:
        return None
    if run.rank == 0 or args.fsdp:
        # under --fsdp all evaluate: all stop together
        stopping = run.stopped if args.fsdp else lambda: bool(run.stop)
        enough = memory_is_enough("in evaluation", memory_hints(args), args.out)
        with unsharded_for(loop.root, args.fsdp), enough:
            try:
                metrics, shown = answer_and_score(
                    loop.model, loop.processor, loop.val_set, args.batch_size, args.max_len,
                    args.eval_max_new_tokens, run.device, loop.autocast, loop.vae,
                    not args.no_constrain, args.repeat_iou, stopping)
            except ValueError as e:
                # load_image: a validation image gone or changed since the check
                why = f"evaluation at step {step}: image {e}"
        if why is None and metrics is not None and run.rank == 0:
            loop.reporter.evaluation(step, metrics, shown, loop.vae)
    run.barrier()
    return why


def save(loop: Loop, step: int):
    """The checkpoint of `step` (checkpoint.save_checkpoint): written by process 0, or under --fsdp
    by every process; then process 0 writes the model card as OUT/README.md."""
    args, run = loop.args, loop.run
    if run.rank == 0 or args.fsdp:
        save_checkpoint(args.out, step, loop.model, loop.optimizer, loop.scaler, source=loop.source,
                        lora_base=loop.lora_base, options=loop.options,
                        no_final_softcap=args.no_final_softcap, sharded=args.fsdp,
                        wandb_id=loop.reporter and loop.reporter.wandb_id)
    if loop.reporter:
        loop.reporter.write_card(card(loop))
    run.barrier()


def card(loop: Loop) -> str:
    """The model card of the run now, with its last evaluation's scores (report.model_card)."""
    args = loop.args
    lora_run = args.trainable == "lora"
    adapter = (args.lora_rank, args.lora_alpha, args.lora_targets) if lora_run else None
    return model_card(loop.lora_base or args.model, adapter is not None, dict(
        name=args.out.name, trainable=args.trainable, lora=adapter, quantize=args.quantize,
        steps=loop.steps, batch=args.batch_size * args.grad_accum * loop.run.world, lr=args.lr,
        data=loop.data),
                      loop.reporter.last_evaluation)


# ----------------------------------------------------------------------------------------------
# Options: each checked for its type and range as it is parsed, and with what --resume does with it


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--data", type=Path, required=True, help="training JSONL")
    p.add_argument("--val", type=Path, default=None,
                   help="validation JSONL (default: _annotations.valid.jsonl or valid.jsonl beside "
                   "--data, or ../valid/ of a train/ folder)")
    p.add_argument("--model", default="google/paligemma-3b-pt-224",
                   help="checkpoint folder or hub id")
    p.add_argument("--out", type=Path, default=Path("out"), help="checkpoint folder to write")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint that --out holds by a new run")
    add_recipe_options(p)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip bad JSONL lines instead of stopping")
    add_image_limit(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state across the "
                   "processes (FSDP2) instead of replicating the model in each")
    add_device_options(p)
    p.add_argument("--log-every", type=number(int, 1), default=10)
    p.add_argument("--eval-every", type=number(int, 0), default=0,
                   help="evaluate every N steps (0: at the end)")
    p.add_argument("--eval-examples", type=number(int, 0), default=100,
                   help="validation examples to evaluate")
    p.add_argument("--eval-max-new-tokens", type=number(int, 1), default=128,
                   help="the longest answer generated in evaluation")
    add_vae_option(p)
    add_answer_options(p)
    p.add_argument("--save-every", type=number(int, 0), default=0,
                   help="save every N steps (0: only at the end)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files in OUT/tensorboard/")
    p.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log to this Weights & Biases project")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="at the end, upload the checkpoint (or adapter) and its model card to this "
                   "hub repo")
    p.add_argument("--hub-private", action="store_true",
                   help="with --push-to-hub: create the repo private")
    return p


def add_recipe_options(p: argparse.ArgumentParser):
    """What is trained and how: the options that decide the weights a run ends with."""
    p.add_argument("--trainable", choices=[*TRAINABLE, "lora"], default="attn",
                   help="attn: the decoder's q/k/v/o; llm: the decoder; all; lora: low-rank "
                   "adapters (--lora-*)")
    add_lora_options(p)
    add_quantize_option(p, ["nf4"], "keep the frozen linear weights in 4 bits (NF4, as "
                        "bitsandbytes): with --trainable lora (QLoRA) or attn")
    p.add_argument("--steps", type=number(int, 1), default=None,
                   help="optimizer steps (default: --epochs)")
    p.add_argument("--epochs", type=number(float, 0, above=True), default=1.0)
    p.add_argument("--batch-size", type=number(int, 1), default=8,
                   help="examples per micro-batch and process")
    p.add_argument("--grad-accum", type=number(int, 1), default=1,
                   help="micro-batches per optimizer step")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="sgd: big_vision's recipe (plain SGD, --lr 0.03)")
    p.add_argument("--lr", type=number(float, 0), default=2e-5)
    p.add_argument("--weight-decay", type=number(float, 0), default=0.0)
    p.add_argument("--warmup", type=number(float, 0, 1), default=0.1,
                   help="fraction of the steps with a linear warm-up, then cosine decay")
    p.add_argument("--clip", type=number(float, 0), default=1.0,
                   help="gradient norm clipping (0: none)")
    p.add_argument("--no-final-softcap", action="store_true",
                   help="PaliGemma 2: train (and save) without the final logit soft-cap, as "
                   "big_vision's transfers do")
    p.add_argument("--max-len", type=number(int, 1), default=128,
                   help="text tokens per example, image tokens not counted")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute decoder layers in backward: less memory")
    p.add_argument("--seed", type=int, default=0, help="fixes the data order")
    p.add_argument("--shuffle-objects", action="store_true",
                   help="detect and segment answers: the objects in another order each epoch")


def add_lora_options(p: argparse.ArgumentParser):
    """--trainable lora's options; their defaults are lora.py's."""
    p.add_argument("--lora-rank", type=number(int, 1), default=None,
                   help=f"LoRA rank r (default {lora.RANK})")
    p.add_argument("--lora-alpha", type=number(float, 0, above=True), default=None,
                   help=f"LoRA scale alpha; the update is scaled by alpha / r (default "
                   f"{lora.ALPHA:g})")
    p.add_argument("--lora-targets", type=lora_targets, default=None,
                   help=f"comma-separated, of {', '.join(lora.ATTENTION + lora.MLP)} "
                   f"(default: {','.join(lora.ATTENTION)})")
    p.add_argument("--lora-dropout", type=number(float, 0, 0.99), default=None,
                   help=f"on the adapters' input (default {lora.DROPOUT:g})")
    p.add_argument("--rslora", action="store_true",
                   help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    p.add_argument("--merge", action="store_true",
                   help="LoRA: also write the merged model into OUT/merged/")


# What --resume does with each option. train_state.pt keeps the run's options; an option the command
# line does not give takes the run's value again; one it gives with another value is refused (naming
# both values) if it must match, and applied (and said, in one line) if it may change. The others
# belong to this command line alone: where and how this process runs, evaluates, reports and shares.
RESUME_MUST_MATCH = ("trainable", "optimizer", "lora_rank", "lora_alpha", "lora_targets",
                     "lora_dropout", "rslora", "fsdp", "quantize", "batch_size", "grad_accum",
                     "no_final_softcap")
RESUME_MAY_CHANGE = ("lr", "weight_decay", "warmup", "clip", "max_len", "seed", "steps", "data",
                     "shuffle_objects")
RESUME_NOT_KEPT = ("val", "model", "out", "resume", "overwrite", "merge", "epochs", "skip_bad",
                   "max_image_pixels", "grad_checkpointing", "compile", "device", "dtype",
                   "log_every", "eval_every", "eval_examples", "eval_max_new_tokens", "vae",
                   "no_constrain", "repeat_iou", "save_every", "tensorboard", "wandb",
                   "push_to_hub", "hub_private")


def parse_args(argv=None) -> tuple[argparse.Namespace, set[str]]:
    """The options, checked together, and the names of those the command line gives (--resume keeps
    the others)."""
    p = options()
    args, given = parse_given(p, argv)
    lora_options = {"--lora-rank": args.lora_rank, "--lora-alpha": args.lora_alpha,
                    "--lora-targets": args.lora_targets, "--lora-dropout": args.lora_dropout,
                    "--rslora": args.rslora or None, "--merge": args.merge or None}
    lora_given = [k for k, v in lora_options.items() if v is not None]
    if args.trainable != "lora" and lora_given:
        p.error(f"{', '.join(lora_given)} only with --trainable lora")
    if args.quantize and (args.trainable in ("all", "llm") or args.fsdp):
        p.error("--quantize keeps frozen weights in 4 bits: it takes --trainable lora or attn, and "
                "not --fsdp")
    if args.fsdp and (args.merge or args.dtype == "float16"):
        p.error("--fsdp does not take --merge (merge the saved adapter with lora.merge_lora in one "
                "process) nor --dtype float16 (use bfloat16)")
    if args.trainable == "lora" and args.no_final_softcap and not args.merge:
        p.error("--no-final-softcap with --trainable lora needs --merge: the adapter alone is "
                "served on the base model's config, which has the soft-cap")
    if args.trainable == "lora":
        args.lora_rank, args.lora_alpha = args.lora_rank or lora.RANK, args.lora_alpha or lora.ALPHA
        args.lora_targets = args.lora_targets or lora.ATTENTION
        args.lora_dropout = args.lora_dropout if args.lora_dropout is not None else lora.DROPOUT
    return args, given


def lora_targets(text: str) -> tuple[str, ...]:
    """--lora-targets: comma-separated names of the decoder's linear layers."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in lora.ATTENTION + lora.MLP]
    if not names or unknown:
        what = f"{', '.join(unknown)}: not one of" if unknown else f"{text!r} names none of"
        raise argparse.ArgumentTypeError(f"{what} the decoder's linear layers "
                                         f"{', '.join(lora.ATTENTION + lora.MLP)}")
    return names


def memory_hints(args) -> list[str]:
    """What to lower, or add, when memory runs out."""
    hints = [f"lower --batch-size ({args.batch_size})"]
    if not args.grad_checkpointing:
        hints.append("add --grad-checkpointing")
    if not args.quantize and args.trainable in ("lora", "attn"):
        hints.append("add --quantize nf4")
    return hints


def run_options(args, steps: int) -> dict:
    """What train_state.pt keeps of the options: RESUME_MUST_MATCH and RESUME_MAY_CHANGE, the data's
    digest."""
    options = {k: getattr(args, k) for k in RESUME_MUST_MATCH + RESUME_MAY_CHANGE}
    data_sha256 = hashlib.sha256(args.data.read_bytes()).hexdigest()
    return options | dict(steps=steps, data=str(args.data), data_sha256=data_sha256)


def resume_options(args, given: set[str], saved: dict, out: Path):
    """The run's options again: each saved one not given takes its saved value (but --fsdp, which is
    how the run is launched); one given with another value is refused, or applied with one line (the
    steps: where the schedule is known, optimizer_and_resume)."""
    show = lambda v: ",".join(v) if isinstance(v, tuple) else v  # noqa: E731
    given = given | ({"steps"} if "epochs" in given else set())
    for name in (n for n in RESUME_MUST_MATCH + RESUME_MAY_CHANGE if n in saved):
        if name not in given and name != "fsdp":
            setattr(args, name, Path(saved[name]) if name == "data" else saved[name])
            continue
        now = getattr(args, name)
        if name in RESUME_MUST_MATCH and now != saved[name]:
            raise UserError(f"{out} was trained with --{name.replace('_', '-')} "
                            f"{show(saved[name])}, not {show(now)}")
        elif name == "data" and (hashlib.sha256(now.read_bytes()).hexdigest()
                                 != saved["data_sha256"]):
            log(f"--resume: {now} is not the data the run began with ({saved['data']}, other lines "
                "now): the remaining steps draw from it as it is")
        elif name not in ("data", "steps") and now != saved[name]:
            log(f"--resume: --{name.replace('_', '-')} {show(now)} from here on (the run had "
                f"{show(saved[name])})")


if __name__ == "__main__":
    main()
