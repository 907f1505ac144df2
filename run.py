"""What the processes of a training run share: their place under torchrun, the signals that stop
them, the memory they hold.

    Run               this process's device, compute dtype, rank and world (torchrun sets RANK,
                      WORLD_SIZE and LOCAL_RANK), the signals received; all_reduce, barrier: no-ops
                      in one process
    setup             the process group (NCCL on GPUs, gloo on the CPU), one GPU per process
    shard             --fsdp: FSDP2 units of each SigLIP and Gemma layer, then the root
    training_module   the step's module: decoder layers recomputed in backward, DDP, torch.compile,
                      as asked
    unsharded_for     --fsdp: the root's weights gathered whole for an evaluation
    stop_on_signals   Ctrl-C, SIGTERM, SIGHUP: recorded, so that the loop saves at the end of the
                      step and stops (stop_now raises Stopped); a second Ctrl-C ends the process at
                      once
    leave             how a tool ends its process (under torchrun: without Python's teardown, which
                      can abort it)
    check_images      an image gone in any process stops every process, saved
    memory_is_enough  out of memory as one line (a cli.UserError) that says what to lower

What it is not: the training loop (train.py), which evaluates and saves in step across the
processes.
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

from cli import UserError, device_and_dtype, log


@dataclass
class Run:
    """This process's place in the run (one of `world` under torchrun), and the signals it
    received."""
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world: int = 1
    # SIGINT, SIGTERM: save at the end of the step, then stop
    stop: list[int] = field(default_factory=list)

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


def setup(device: str | None, dtype: str | None, seed: int, fsdp: bool) -> Run:
    """The device (--device; one GPU per process under torchrun), the process group and the compute
    dtype (--dtype), the random numbers seeded."""
    device, dtype = device_and_dtype(device, dtype)
    # set by torchrun
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if fsdp and world == 1:
        raise UserError("--fsdp shards across the processes torchrun starts: "
                        "torchrun --nproc_per_node=N train.py ... --fsdp")
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(seed)
    return Run(device, dtype, rank, world)


def shard(root, world: int, device):
    """--fsdp: FSDP2 units of each SigLIP and Gemma layer, and the root with the rest (embeddings,
    projector, norms). A unit may mix float32 weights that learn with frozen ones in the compute
    dtype: FSDP2 gathers parameters of several dtypes as bytes (README: "Beyond one GPU's
    memory")."""
    mesh = init_device_mesh(device.type, (world,))
    for layer in [*root.model.vision_tower.encoder.layers, *root.model.language_model.layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)


def stop_on_signals(run: Run, out: Path):
    """Ctrl-C, SIGTERM or SIGHUP (a closed terminal): run.stop records it, and the loop (or the
    evaluation) stops, saves at the end of the step, and exits; a second Ctrl-C stops at once (the
    last checkpoint stays intact: saves are crash-consistent)."""
    def on_signal(signum, frame):
        if run.stop and signum == signal.SIGINT:
            print(f"stopped at once; the last checkpoint in {out}, if any, is intact",
                  file=sys.stderr, flush=True)
            os._exit(130)
        run.stop.append(signum)
        log(f"{signal.Signals(signum).name}: saving at the end of this step, then stopping (Ctrl-C "
            "again: at once)")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


class Stopped(Exception):
    """A signal stopped the run, saved: the tool ends the process with `code` (130 / 143 / 129)."""

    def __init__(self, code: int):
        super().__init__(f"stopped by signal {code - 128}")
        self.code = code


def stop_now(run: Run, step: int, save=None):
    """After a signal (in any process): `save(step)` (unless saved), and Stopped: not finished."""
    if save:
        save(step)
    log(f"stopped at step {step}; continue with --resume")
    raise Stopped(128 + run.stopped())


def leave(code: int):
    """Ends the process with `code`. Under torchrun, the process group is destroyed and the process
    exits without Python's teardown: FSDP2's device mesh stays cached inside
    torch.distributed.tensor (and DDP's Reducer holds the group), so gloo's threads would still be
    running while the interpreter and its C++ objects are torn down, which now and then aborts the
    process (SIGABRT, "terminate called without an active exception") or hangs it. All is written by
    then; the kernel releases the out folder's lock."""
    if not dist.is_initialized():
        sys.exit(code)
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def training_module(root: nn.Module, grad_checkpointing: bool, ddp: bool,
                    compile: bool) -> nn.Module:
    """The module the training step calls, around `root` (paligemma.SuffixLossSum: the model and its
    loss): with activation checkpointing, data parallelism (DDP; --fsdp has sharded the root
    already) and compilation as asked."""
    if grad_checkpointing:  # recompute each decoder layer's activations in backward
        for layer in root.model.language_model.layers:
            layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward,
                                              use_reentrant=False)
    module = DistributedDataParallel(root) if ddp else root
    return torch.compile(module) if compile else module


@contextlib.contextmanager
def unsharded_for(root, sharded: bool):
    """Under --fsdp (`sharded`), the root's parameters gathered whole inside, sharded again
    after."""
    if sharded:
        root.unshard()
    try:
        yield
    finally:
        if sharded:
            root.reshard()


def check_images(run: Run, micro: list[dict], step: int, start: int, save):
    """An image that became unreadable since the data check (in any process) stops the run, saved at
    the step before (`save(step)`)."""
    error = next((b["error"] for b in micro if "error" in b), None)
    if run.all_reduce(error is not None, dist.ReduceOp.MAX):
        if step > start:
            save(step)
        raise UserError(f"{error or 'an image of another process cannot be read'}; stopped before "
                        f"step {step + 1}"
             + (f", saved at step {step}" if step > start else "") + ": fix the data and --resume")


@contextlib.contextmanager
def memory_is_enough(what: str, hints: list[str], out: Path):
    """Out of memory inside (torch's CPU or CUDA allocator) is one line that says what to lower
    (`hints`)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise UserError(f"out of memory {what} ({str(e).splitlines()[0][:120]}): "
                        f"{', or '.join(hints)}; the last "
                        f"checkpoint in {out}, if any, is intact") from None


def mib_held(tensors) -> float:
    """MiB of the tensors held by this process (of a sharded one, its shard)."""
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors) / 2**20


def log_memory(model, optimizer):
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    log(f"memory of process 0: weights {mib_held(model.parameters()):.2f} MiB, "
        f"optimizer state {mib_held(state):.2f} MiB")
