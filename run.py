"""What the processes of a training run share: their place under torchrun, the signals that stop them, the
memory they hold.

    Run               this process's device, compute dtype, rank and world (torchrun sets RANK, WORLD_SIZE
                      and LOCAL_RANK), the signals received; all_reduce, barrier: no-ops in one process
    setup             the process group (NCCL on GPUs, gloo on the CPU), one GPU per process
    shard             --fsdp: FSDP2 units of each SigLIP and Gemma layer, then the root
    training_module   the step's module: decoder layers recomputed in backward, DDP, torch.compile, as asked
    stop_on_signals   Ctrl-C, SIGTERM, SIGHUP: recorded, so that the loop saves at the end of the step and stops
    leave             the end of a process (under torchrun: without Python's teardown, which can abort it)
    evaluate_together, save_together, check_images
                      what the processes do at a step in step with each other (under --fsdp all of them)
    memory_is_enough  out of memory as one line that says what to lower

What it is not: the training loop (train.py).
"""

import contextlib
import functools
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from checkpoint import save_checkpoint
from cli import device_and_dtype, fail, log


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

    def stopped(self) -> int:
        """The signal any process received (0: none), the same in all."""
        return int(self.all_reduce(self.stop[0] if self.stop else 0, dist.ReduceOp.MAX))


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


def shard(root, world: int, device):
    """--fsdp: FSDP2 units of each SigLIP and Gemma layer, and the root with the rest (embeddings, projector,
    norms). A unit may mix float32 weights that learn with frozen ones in the compute dtype: FSDP2 gathers
    parameters of several dtypes as bytes (README: "Beyond one GPU's memory")."""
    mesh = init_device_mesh(device.type, (world,))
    for layer in [*root.model.vision_tower.encoder.layers, *root.model.language_model.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def stop_on_signals(run: Run, out: Path):
    """Ctrl-C, SIGTERM or SIGHUP (a closed terminal): run.stop records it, and the loop (or the evaluation)
    stops, saves at the end of the step, and exits; a second Ctrl-C stops at once (the last checkpoint stays
    intact: saves are crash-consistent)."""
    def on_signal(signum, frame):
        if run.stop and signum == signal.SIGINT:
            print(f"stopped at once; the last checkpoint in {out}, if any, is intact", file=sys.stderr, flush=True)
            os._exit(130)
        run.stop.append(signum)
        log(f"{signal.Signals(signum).name}: saving at the end of this step, then stopping (Ctrl-C again: at once)")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


def stop_now(run: Run, step: int, checkpoint=None):
    """After a signal (in any process): save `step` (unless saved) and exit 130 / 143 / 129: not finished."""
    if checkpoint:
        checkpoint(step)
    log(f"stopped at step {step}; continue with --resume")
    leave(128 + run.stopped())


def leave(code: int):
    """Ends the process with `code`. Under torchrun, the process group is destroyed and the process exits
    without Python's teardown: FSDP2's device mesh stays cached inside torch.distributed.tensor (and DDP's
    Reducer holds the group), so gloo's threads would still be running while the interpreter and its C++
    objects are torn down, which now and then aborts the process (SIGABRT, "terminate called without an
    active exception") or hangs it. All is written by then; the kernel releases the out folder's lock."""
    if not dist.is_initialized():
        sys.exit(code)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def training_module(root: nn.Module, grad_checkpointing: bool, ddp: bool, compile: bool) -> nn.Module:
    """The module the training step calls, around `root` (paligemma.SuffixLossSum: the model and its loss): with
    activation checkpointing, data parallelism (DDP; --fsdp has sharded the root already) and compilation
    as asked."""
    if grad_checkpointing:  # recompute each decoder layer's activations in backward
        for layer in root.model.language_model.layers:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    module = DistributedDataParallel(root) if ddp else root
    return torch.compile(module) if compile else module


def evaluate_together(run: Run, step: int, score, root, sharded: bool, reporter, vae=None) -> str | None:
    """`score()` (train.evaluate on the validation set) in process 0, or under --fsdp in every process alike (a
    rank that skipped a layer's gather would hang the others) with the root unsharded; process 0 reports it.
    Returns why it could not be done (an image gone), or None."""
    why = None
    if run.rank == 0 or sharded:
        if sharded:
            root.unshard()
        try:
            metrics, shown = score()
        except ValueError as e:  # load_image: a validation image gone or changed since the check
            why = f"evaluation at step {step}: image {e}"
        if sharded:
            root.reshard()
        if why is None and metrics is not None and run.rank == 0:
            reporter.evaluation(step, metrics, shown, vae)
    run.barrier()
    return why


def save_together(run: Run, step: int, reporter=None, card=None, **checkpoint):
    """The checkpoint of `step` (checkpoint.save_checkpoint): written by process 0, or under --fsdp by every
    process; then process 0 writes the model card, `card()`, as OUT/README.md."""
    if run.rank == 0 or checkpoint["sharded"]:
        save_checkpoint(step=step, **checkpoint)
    if run.rank == 0 and card:
        reporter.write_card(card())
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


@contextlib.contextmanager
def memory_is_enough(what: str, args):
    """Out of memory inside (torch's CPU or CUDA allocator) is one line that says what to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        hints = [f"lower --batch-size ({args.batch_size})"]
        if not args.grad_checkpointing:
            hints.append("add --grad-checkpointing")
        if not args.quantize and args.trainable in ("lora", "attn"):
            hints.append("add --quantize nf4")
        fail(f"out of memory {what} ({str(e).splitlines()[0][:120]}): {', or '.join(hints)}; the last checkpoint "
             f"in {args.out}, if any, is intact")


def mib_held(tensors) -> float:
    """MiB of the tensors held by this process (of a sharded one, its shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors) / 2**20


def log_memory(model, optimizer):
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    log(f"memory of process 0: weights {mib_held(model.parameters()):.2f} MiB, "
        f"optimizer state {mib_held(state):.2f} MiB")
