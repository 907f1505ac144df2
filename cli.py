"""What the tools (train.py, infer.py, evaluate.py, convert.py, report.py, bench.py) and the library
code under them share: the user's mistakes, printing, and the options that mean the same everywhere.

    UserError    what library code raises for something the user can fix (a file, a line of data, an
                 option, the memory asked for); a tool's `main` turns it into `fail`
    fail         one line on stderr, "TOOL: error: ...", and exit code 2, as argparse has it
    log          print, by process 0 only under torchrun
    number       an argparse type: a number checked for its range as it is parsed
    add_*        options shared by the tools, each defined here once

What it is not: a tool. Library modules may import it; of this project it imports processor.py's
image limit only.
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch
from PIL import Image

from processor import MAX_PIXELS


class UserError(Exception):
    """Something the user can fix, said in one line that names the file, line or option; `details`
    are lines that come before it (the first bad lines of a data file)."""

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = details or []


def fail(message: str, details: list[str] | None = None):
    print_error(message, details)
    sys.exit(2)


def print_error(message: str, details: list[str] | None = None):
    for line in details or []:
        print(line, file=sys.stderr)
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)


def log(*args, **kwargs):
    """print, by process 0 only under torchrun (which sets RANK in each process's environment)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args, **kwargs, flush=True)


def number(kind=float, low=-math.inf, high=math.inf, above=False):
    """An argparse type: a finite `kind` (int or float) in [low, high], or in (low, high] with
    `above`."""
    what = "an integer" if kind is int else "a number"
    if high < math.inf:
        bounds = f"in {'(' if above else '['}{low:g}, {high:g}]"
    else:
        bounds = f"{'>' if above else '>='} {low:g}"

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
        shown = action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
        if action.option_strings and shown:
            default = action.default
            if isinstance(default, tuple):
                default = ",".join(default)
            text += f" (default: {default})"
        return text


def parse_given(p: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, set[str]]:
    """The parsed options, and the names of those the command line gives (the others keep their
    defaults: argparse sets a default only where the namespace has no value yet)."""
    args = p.parse_args(argv)
    unset = object()
    probe = p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return args, {name for name, value in vars(probe).items() if value is not unset}


# ----------------------------------------------------------------------------------------------
# Options shared by the tools


def add_device_options(p: argparse.ArgumentParser):
    p.add_argument("--device", default=None, help="default: cuda, then mps, then cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype, and that of the frozen weights (default: bfloat16 on a GPU "
                   "that supports it, else float32)")


def add_image_limit(p: argparse.ArgumentParser):
    p.add_argument("--max-image-pixels", type=number(int, 1), default=MAX_PIXELS,
                   help="larger images are refused (PIL's limit against decompression bombs)")


def add_answer_options(p: argparse.ArgumentParser):
    """How detect and segment answers are generated (detections.AnswerConstraint)."""
    p.add_argument("--no-constrain", action="store_true", help="let detect and segment answers run "
                   "free (by default they can only take PaliGemma's form: boxes, "
                   "<seg> tokens, the prompt's labels, ' ; ')")
    p.add_argument("--repeat-iou", type=number(float, 0, 1, above=True), default=0.9,
                   help="an object with an earlier one's label and IoU >= this ends the answer")


def add_vae_option(p: argparse.ArgumentParser):
    p.add_argument("--vae", default=None, help="the VQ-VAE npz that decodes <seg> tokens into "
                   "masks (vae-oid.npz; default: big_vision's, from "
                   "the hub, where masks are drawn)")


def add_quantize_option(p: argparse.ArgumentParser, formats: list[str], help: str):
    p.add_argument("--quantize", choices=formats, default=None, help=help)


def add_model_options(p: argparse.ArgumentParser, formats: list[str]):
    """A fine-tuned model to answer with (infer.py, evaluate.py): --model, --adapter, --quantize."""
    p.add_argument("--model", default="google/paligemma-3b-pt-224",
                   help="checkpoint folder or hub id; a folder holding a LoRA adapter loads its "
                   "base and applies it")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder (PEFT's format) to apply to --model")
    add_quantize_option(p, formats, "int8 or int4: the decoder's weights in 8 or 4 bits, for "
                        "faster decoding (quantize.py); nf4: a QLoRA run's base as it was "
                        "trained, dequantized once")


def use_own_image_limit():
    """In a tool's process, PIL's own guard against decompression bombs (a warning at
    Image.MAX_IMAGE_PIXELS, an error at twice it) gives way to processor.load_image's, which reads
    an image's size from its header and refuses one over --max-image-pixels before decoding it, in
    one line."""
    Image.MAX_IMAGE_PIXELS = None


# ----------------------------------------------------------------------------------------------
# --device and --dtype


def resolve_device(name: str | None = None) -> torch.device:
    """The device called `name`, checked to exist here; by default cuda, then mps, then cpu."""
    if name is None:
        mps = torch.backends.mps.is_available()
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (e.g. cpu, cuda, cuda:1, "
                        "mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name!r}: this machine has no CUDA GPU (or this torch build has "
                        "no CUDA)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                        "GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name!r}: MPS (Apple GPUs) is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name!r}: only cpu, cuda and mps are supported")
    return device


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype as torch's; a device this machine lacks is a UserError. The default
    dtype: bfloat16 on a CUDA GPU that supports it, else float32."""
    device = resolve_device(device)
    if dtype:
        return device, getattr(torch, dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, torch.float32
