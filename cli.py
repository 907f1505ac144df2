"""What the command-line tools (train.py, infer.py) share: an error is one line on stderr and exit
code 2, as argparse has it, and numeric options are checked for their range when they are parsed."""

import argparse
import math
import sys
from pathlib import Path


def fail(message: str):
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


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
