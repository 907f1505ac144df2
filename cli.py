"""What the command-line tools (train.py, infer.py, data.py, bench.py) share: an error is one line on
stderr and exit code 2, as argparse has it; numeric options are checked for their range when they are
parsed; --device and --dtype mean the same everywhere; under torchrun only process 0 prints."""

import argparse
import math
import os
import sys
from pathlib import Path

import torch


def fail(message: str):
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def log(*args, **kwargs):
    """print, by process 0 only under torchrun (which sets RANK in each process's environment)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs, flush=True)


def number(kind=float, low=-math.inf, high=math.inf, above=False):
    """An argparse type: a finite `kind` (int or float) in [low, high], or in (low, high] with `above`."""
    what = "an integer" if kind is int else "a number"
    bounds = f"in {'(' if above else '['}{low:g}, {high:g}]" if high < math.inf else f"{'>' if above else '>='} {low:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low or value > high or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {what} {bounds}, not {text}")
        return value
    return parse


class DefaultsFormatter(argparse.HelpFormatter):
    """--help shows each option's default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            default = ",".join(action.default) if isinstance(action.default, tuple) else action.default
            text += f" (default: {default})"
        return text


def parse_given(p: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, set[str]]:
    """The parsed options, and the names of those the command line gives (the others keep their defaults:
    argparse sets a default only where the namespace has no value yet)."""
    args = p.parse_args(argv)
    unset = object()
    probe = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return args, {name for name, value in vars(probe).items() if value is not unset}


def add_device_options(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype, and that of the frozen weights (default: bfloat16 on a GPU that supports it, "
                   "else float32)")


def resolve_device(name: str | None = None) -> torch.device:
    """The device called `name`, checked to exist here; by default cuda, then mps, then cpu."""
    if name is None:
        mps = torch.backends.mps.is_available()
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: this machine has no CUDA GPU (or this torch build has no CUDA)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS (Apple GPUs) is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r}: only cpu, cuda and mps are supported")
    return device


def device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype of a parsed command line; a device this machine lacks is a one-line error.
    The default dtype: bfloat16 on a CUDA GPU that supports it, else float32."""
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        fail(f"--{e}")
    if args.dtype:
        return device, getattr(torch, args.dtype)
    return device, torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
