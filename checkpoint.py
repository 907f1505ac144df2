"""What train.py writes and reads back, crash-consistently: checkpoints, adapters, the train state.

OUT holds config.json, model.safetensors (its step in the metadata) and the tokenizer files, or,
with LoRA, adapter_config.json and adapter_model.safetensors (the base model is elsewhere); and
train_state.pt (step, optimizer and loss-scale state, random-number state, the run's options). These
are the official layout and PEFT's: transformers, peft and this project's loaders read them.

    save_checkpoint, save_adapter, save_merged     the files, each written whole
    starting_point, read_train_state, check_resume, load_optimizer_state      --resume
    check_out_folder, lock_out_folder, prepare_out_folder      --out before and as a run starts

Every file is written to a temporary name, flushed to disk and renamed over the old one
(files.write_atomically), so a file is always whole. The weights
and the train state of a step are made consistent by the order of the renames: the new train state
goes in beside the old one as train_state.next.pt, then the weights, then the new state takes the
old one's name. Killed at any instant, OUT holds weights of step N-1 or N, and a train state of the
same step; `read_train_state` finds it, and the next run finishes or removes what a kill left.

What it is not: the training loop (train.py), which decides when to save and which options carry
over on --resume. Mistakes a user can fix are raised as cli.UserError. Under --fsdp every process
calls `save_checkpoint`: the optimizer state is saved sharded by torch.distributed.checkpoint into
OUT/optimizer-stepN/, and the weights are gathered to process 0 one tensor at a time.
"""

import contextlib
import errno
import fcntl
import functools
import json
import math
import os
import shutil
import stat
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from cli import UserError, log
from files import fsync_folder, write_atomically, write_json
from lora import adapter_base, adapter_config, adapter_state, lora_layers, merged_weight
from quantize import QUANTIZED
from paligemma import checkpoint_index, official_name, official_state_dict, resolve_checkpoint

WEIGHTS = ("model.safetensors", "adapter_model.safetensors")  # a full checkpoint's, an adapter's
# what an earlier run leaves
CHECKPOINT_FILES = (*WEIGHTS, "model.safetensors.index.json", "train_state.pt")
NEXT_STATE = "train_state.next.pt"
# files, not folders
REPORTS = ("metrics.jsonl", "metrics.png", "README.md", "config.json", *WEIGHTS, "train_state.pt")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.int64: "I64"}



def checkpoint_weights(model, source: Path) -> dict[str, "torch.Tensor | Stored"]:
    """The model's tensors under the official names; a 4-bit layer's weight as `source` (the
    checkpoint it was read from) stores it, in full precision, read as it is written (its codes are
    no checkpoint's)."""
    quantized = {name for name, m in model.named_modules() if isinstance(m, QUANTIZED)}
    if not quantized:
        return official_state_dict(model)
    index = checkpoint_index(source)  # our name -> (key, file, shape)
    weights = {}
    for name, t in model.state_dict().items():
        layer, _, what = name.rpartition(".")
        if layer not in quantized or what == "bias":
            weights[official_name(name)] = t
        elif what == "weight":
            weights[official_name(name)] = Stored(index[name][1], index[name][0])
    return weights


def write_config(folder: Path, source: Path, no_final_softcap: bool):
    """config.json and the tokenizer files of the checkpoint being fine-tuned, into `folder`."""
    # tokenizer.model and the other tokenizer/processor files
    if source.resolve() != folder.resolve():
        for f in source.iterdir():
            if f.name == "tokenizer.model" or (f.suffix == ".json" and f.name not in (
                    "model.safetensors.index.json", "config.json", "adapter_config.json")):
                write_atomically(folder / f.name, functools.partial(shutil.copyfile, f))
    config = json.loads((source / "config.json").read_text())
    if no_final_softcap:  # the fine-tuned model is used without the cap it was trained without
        config["text_config"]["final_logit_softcapping"] = None
    write_json(folder / "config.json", config)


def save_adapter(folder: Path, model, base_model: str, metadata: dict[str, str] | None = None):
    """adapter_config.json and adapter_model.safetensors in `folder`, as `PeftModel.save_pretrained`
    writes them, each file whole. base_model: the checkpoint the adapter belongs to (a hub id or a
    folder), as peft records it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = adapter_state(model)
    write_json(folder / "adapter_config.json", adapter_config(model, base_model))
    metadata = metadata or {"format": "pt"}
    write_atomically(folder / WEIGHTS[1], lambda tmp: write_safetensors(tmp, weights, metadata))


def save_checkpoint(out: Path, step: int, model, optimizer, scaler, *, source: Path,
                    lora_base: str | None, options: dict, no_final_softcap: bool, sharded: bool,
                    wandb_id: str | None = None):
    """The weights (an official-layout checkpoint, or with `lora_base` the adapter in PEFT's format)
    plus the train state of `step`, crash-consistent (see the module docstring). A failed write (a
    full disk) stops the run with the previous checkpoint intact. Under --fsdp (`sharded`) every
    process calls it."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0 and not out.is_dir():
        log(f"{out} was deleted during training; it is made again for the checkpoint of step "
            f"{step}")
        out.mkdir(parents=True, exist_ok=True)
    weights = checkpoint_weights(model, source) if lora_base is None else adapter_state(model)
    metadata = {"format": "pt", "step": str(step)}
    step_written = False
    try:
        if sharded:  # the sharded optimizer state first: the train state names its folder
            dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)},
                     checkpoint_id=out / f"optimizer-step{step}")
        if rank != 0:
            for t in weights.values():
                unsharded(t)  # take part in process 0's gathering
            return
        state = dict(step=step,
                     optimizer=f"optimizer-step{step}" if sharded else optimizer.state_dict(),
                     scaler=scaler.state_dict(), options=options, processes=world,
                     wandb_id=wandb_id, rng=random_state())
        if lora_base is None:
            write_config(out, source, no_final_softcap)
        else:
            write_json(out / "adapter_config.json", adapter_config(model, lora_base))
        write_atomically(out / NEXT_STATE, lambda tmp: torch.save(state, tmp))
        weights_file = out / WEIGHTS[lora_base is not None]
        write_atomically(weights_file, lambda tmp: write_safetensors(tmp, weights, metadata))
        step_written = True  # from here on, NEXT_STATE is the train state of the weights
        os.replace(out / NEXT_STATE, out / "train_state.pt")
        fsync_folder(out)
        # the optimizer states before
        remove_leftovers(out, keep=state["optimizer"] if sharded else None)
    except OSError as e:
        if not step_written and rank == 0:
            (out / NEXT_STATE).unlink(missing_ok=True)
        raise UserError(f"cannot save the checkpoint of step {step} in {out} ({e.strerror or e}); "
                        "the checkpoint it held before, if any, is intact")
    log(f"saved {out} at step {step}")


def save_merged(folder: Path, source: Path, model, no_final_softcap: bool):
    """The base with its LoRA adapters folded in (W + s * B @ A), as an official-layout checkpoint
    in `folder`, in the dtypes of `source` (the checkpoint the base was read from): each adapted
    weight is read from it as stored and merged in float32, every other tensor copied from it as
    stored, whatever precision (or 4 bits) the base was trained in. No adapter files: transformers
    with peft installed would apply an adapter found beside config.json a second time."""
    layers = lora_layers(model)
    try:
        weights = {}
        for name, (key, file, _) in checkpoint_index(source).items():
            layer = layers.get(name.removesuffix(".weight"))
            stored = Stored(file, key)
            weights[official_name(name)] = merged_weight(layer, stored.load()) if layer else stored
        folder.mkdir(exist_ok=True)
        write_config(folder, source, no_final_softcap)
        pt = {"format": "pt"}
        write_atomically(folder / WEIGHTS[0], lambda tmp: write_safetensors(tmp, weights, pt))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write the merged model into {folder} "
                        f"({getattr(e, 'strerror', None) or e}); "
                        "the adapter is saved") from None
    log(f"saved the merged model in {folder}: {len(layers)} layers merged into {source}'s weights "
        "as it stores them")


# ----------------------------------------------------------------------------------------------
# Reading back: --resume (train.py decides which options carry over)


def starting_point(out: Path, model: str, resume: bool, lora: bool,
                   model_given: bool) -> tuple[Path, str | None]:
    """The folder whose weights and tokenizer a run starts from: `model` (a folder, or a hub id
    downloaded), or on resume the run in `out`; with LoRA, always the base model, whose name the
    adapter records (returned second: a hub id or a folder's absolute path; None without LoRA). An
    adapter resumed with a --model (`model_given`) other than its base is refused."""
    try:
        if resume and not lora and (out / "adapter_config.json").is_file():
            raise ValueError(f"{out} holds a LoRA adapter: resume it with --trainable lora (and "
                             "its --lora-* options)")
        local = Path(model).expanduser()
        named = str(local.resolve()) if local.is_dir() else model
        base = None if not lora else adapter_base(out) if resume else named
        if lora and resume and model_given and named != base:
            raise ValueError(f"{out} is an adapter of {base}, not of --model {model}: leave "
                             "--model out to resume it")
        source = out if resume and not lora else resolve_checkpoint(
            base or model, ["*.json", "*.safetensors", "tokenizer.model"])
        return source, base
    except (OSError, ValueError) as e:
        raise UserError(str(e)) from None


def read_train_state(out: Path, device) -> tuple[dict, str]:
    """The train state of the step of the weights in `out`, and its file's name: train_state.pt, or
    train_state.next.pt when a kill interrupted the save between its last two renames."""
    weights = out / next((name for name in WEIGHTS if (out / name).is_file()), WEIGHTS[0])
    try:
        with safe_open(weights, framework="pt") as f:
            step = int((f.metadata() or {})["step"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        what = f"cannot be read ({e})"
        if isinstance(e, (KeyError, ValueError)):
            what = "has no step in its metadata"
        raise UserError(f"--resume: {weights} {what}: it was not written by train.py")
    for name in ("train_state.pt", NEXT_STATE):
        if not (out / name).is_file():
            continue
        try:
            state = torch.load(out / name, map_location=device, weights_only=True)
        except Exception as e:
            # truncated or not a torch file: pickle, zip and torch raise many types
            raise UserError(f"--resume: {out / name} cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})")
        if state.get("step") == step:
            needed = ("optimizer", "scaler", "options", "processes")
            if missing := [k for k in needed if k not in state]:
                raise UserError(f"--resume: {out / name} has no {', '.join(missing)}: it was not "
                                "written by this train.py")
            return state, name
    raise UserError(f"--resume: {out} holds weights of step {step} but no train state of that step")


def check_resume(state: dict, out: Path, steps: int, world: int, sharded: bool):
    """A train state against the run that resumes it: more `steps` than it has done, and under
    --fsdp (`sharded`) as many processes as saved its optimizer state."""
    if state["step"] >= steps:
        raise UserError(f"--resume: {out} is at step {state['step']} already; ask for more --steps "
                        "than that")
    if sharded and state["processes"] != world:
        raise UserError(f"--resume: {out} was saved by {state['processes']} processes under "
                        f"--fsdp, and its optimizer state is sharded {state['processes']} ways: "
                        f"resume with torchrun --nproc_per_node={state['processes']}, not {world}")


def load_optimizer_state(optimizer, scaler, state: dict, out: Path, model, sharded: bool,
                         weight_decay: float):
    """The optimizer's and the loss scaler's state from a train state: in it, or (--fsdp) each
    process's optimizer shard read from the optimizer-stepN/ folder it names; with this run's
    `weight_decay`. And the random-number state (dropout's draws), as it was after the step
    saved."""
    if sharded:
        shards = {"optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.load(shards, checkpoint_id=out / state["optimizer"])
        set_optimizer_state_dict(model, optimizer, shards["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    # the saved state would bring back the run's own weight decay
    for group in optimizer.param_groups:
        group["weight_decay"] = weight_decay
    if state["scaler"] and scaler.is_enabled():  # empty when the run so far was not in float16
        scaler.load_state_dict(state["scaler"])
    restore_random_state(state)


def random_state() -> dict:
    """torch's random-number state (the CPU's, and each GPU's once CUDA has started): what dropout
    draws next. Saved with the train state so that a resumed run draws what an uninterrupted one
    would."""
    cuda_started = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda = torch.cuda.get_rng_state_all() if cuda_started else []
    return dict(cpu=torch.get_rng_state(), cuda=cuda)


def restore_random_state(state: dict):
    """The random-number state that random_state saved (a train state of an older train.py has
    none)."""
    if rng := state.get("rng"):
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def remove_leftovers(out: Path, keep: str | None = None):
    """Temporary files of a save that a kill interrupted, a train state that never took effect, and
    the sharded optimizer states (optimizer-stepN/) but the one to `keep`."""
    for f in out.glob(".*.tmp"):
        f.unlink()
    (out / NEXT_STATE).unlink(missing_ok=True)
    for folder in out.glob("optimizer-step*"):
        if folder.name != keep:
            shutil.rmtree(folder)


# ----------------------------------------------------------------------------------------------
# --out, before a run and as it starts


def check_out_folder(out: Path, model: str, resume: bool, overwrite: bool, data: list[Path]):
    """--out against --model, the data and what it holds, before anything is loaded: never the
    source model, the folder of a data file, a file, or unwritable; an earlier run's checkpoint only
    with --resume or --overwrite."""
    if out.is_symlink() and not out.exists():
        raise UserError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not "
                        "exist")
    given, out, source = out, out.resolve(), Path(model).expanduser().resolve()
    if not resume and Path(model).expanduser().is_dir() and (
            out == source or out.is_relative_to(source) or source.is_relative_to(out)):
        raise UserError(f"--out {given} and --model {model} are the same folder or one holds the "
                        "other: the checkpoint being fine-tuned would be overwritten; choose "
                        "another --out")
    if holds := [f for f in data if f.resolve().is_relative_to(out)]:
        raise UserError(f"--out {given} holds the data file {holds[0]}: the checkpoint would be "
                        "written among the data; choose another --out")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"--out {given}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {given}: {existing} is not writable (permission denied)")
    if folders := [name for name in REPORTS if (out / name).is_dir()]:
        raise UserError(f"--out {given}: {out / folders[0]} is a folder; train.py writes a file "
                        "there: remove it")
    if (out / "eval").exists() and not (out / "eval").is_dir():
        raise UserError(f"--out {given}: {out / 'eval'} is a file; train.py writes its evaluation "
                        "pictures in a folder of that name: remove it")
    present = [name for name in CHECKPOINT_FILES if (out / name).exists()]
    if resume and not any((out / name).is_file() for name in WEIGHTS):
        raise UserError(f"--resume: {given} holds no checkpoint written by train.py (no "
                        f"{' or '.join(WEIGHTS)})")
    if resume and overwrite:
        raise UserError("--resume continues the checkpoint in --out and --overwrite replaces it: "
                        "give one of them")
    if present and not resume and not overwrite:
        raise UserError(f"--out {given} holds a checkpoint ({', '.join(present)}): continue it "
                        "with --resume, replace it with --overwrite, or choose another --out")


def lock_out_folder(out: Path):
    """Creates --out and holds a lock on OUT/train.lock for as long as this process lives (the
    kernel releases it when the process ends, even by kill -9): a second run into the same --out is
    refused. A POSIX record lock (lockf): the DataLoader's forked workers do not inherit it, so a
    killed run leaves none. The lock file is opened without following a symbolic link (one could
    point at a user's file, which writing the process id would destroy), and must be a regular
    file."""
    path = out / "train.lock"
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"--out {out}: {path} is a symbolic link (to {os.readlink(path)}); "
                            "train.py writes its lock there: remove the link") from None
        raise UserError(f"--out {out}: {path} cannot be created ({e.strerror or e})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"--out {out}: {path} is not a regular file; train.py keeps its lock "
                        "there: remove it")
    lock = os.fdopen(fd, "r+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = lock.read().strip() or "unknown"
        lock.close()
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise UserError(f"--out {out} is in use by another train.py run (process {holder}); "
                            "wait for it to end, or choose another --out") from None
        raise UserError(f"--out {out}: {path} cannot be locked ({e.strerror or e}): its file "
                        "system may not support locks (NFS without a lock daemon); choose an "
                        "--out on a local disk") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock  # kept open: the lock lasts as long as the file object


def prepare_out_folder(out: Path, resumed: dict | None, overwrite: bool, lora: bool):
    """--out made ready for this run: a save that a kill interrupted finished, its leftovers
    removed; with `overwrite`, what of the earlier run this one would not replace (its train state,
    a sharded model, weights of the other kind: an adapter beside a config.json is taken for base +
    adapter). `resumed`: {"step", "file", "optimizer"} of the train state read back, or None."""
    out.mkdir(parents=True, exist_ok=True)
    if resumed and resumed["file"] == NEXT_STATE:
        os.replace(out / NEXT_STATE, out / "train_state.pt")
    remove_leftovers(out, keep=resumed and resumed["optimizer"])
    if overwrite:
        other = ["model.safetensors", "config.json"]
        if not lora:
            other = ["adapter_model.safetensors", "adapter_config.json"]
        stale = ["train_state.pt", "model.safetensors.index.json", *other]
        with contextlib.suppress(Exception):  # the shards a readable index names
            stale += json.loads((out / stale[1]).read_text())["weight_map"].values()
        removed = [name for name in dict.fromkeys(stale) if (out / name).is_file()]
        for name in removed:
            (out / name).unlink()
        removed_note = f"; removed {', '.join(removed)}" if removed else ""
        log(f"--overwrite: {out}'s earlier run is replaced{removed_note}")


# ----------------------------------------------------------------------------------------------
# Plumbing: safetensors written tensor by tensor


def unsharded(t: torch.Tensor) -> torch.Tensor:
    """A tensor as it is, or one sharded by --fsdp gathered whole (every process must take part)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class Stored(NamedTuple):
    """A tensor left where a safetensors file stores it, read only when it is written out."""
    file: Path
    key: str

    def header(self) -> tuple[str, list[int], int]:
        """Its dtype (safetensors' name), shape and size in bytes."""
        with safe_open(self.file, framework="pt") as f:
            s = f.get_slice(self.key)
            dtype, shape = s.get_dtype(), s.get_shape()
        return dtype, shape, math.prod(shape) * {"F64": 8, "F32": 4, "I64": 8, "BF16": 2,
                                                 "F16": 2}[dtype]

    def load(self) -> torch.Tensor:
        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(self.key)


def write_safetensors(path: Path, tensors: dict[str, "torch.Tensor | Stored"],
                      metadata: dict[str, str]):
    """The safetensors format, written tensor by tensor: an 8-byte header length, a JSON header of
    names, dtypes, shapes and byte ranges, then the bytes. (safetensors' own save_file writes
    through a temporary file of its own, with a random name and mode 0600.)"""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        dtype, shape, size = t.header() if isinstance(t, Stored) else \
            (SAFETENSORS_DTYPES[t.dtype], list(t.shape), t.numel() * t.element_size())
        header[name] = dict(dtype=dtype, shape=shape, data_offsets=[offset, offset + size])
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for t in tensors.values():
            t = t.load() if isinstance(t, Stored) else unsharded(t)
            f.write(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().data)
