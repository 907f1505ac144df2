"""Files written whole: the one way this project writes a file that a user keeps.

A file is written to a temporary name beside it, flushed to disk, then renamed over the old one, so
that a reader (or a run killed at any instant) sees the old file or the new one, never half of one.
`new_output` checks, before any work, that an output file may be written where the user asked.

What it is not: the order in which a checkpoint's files are renamed (checkpoint.py). Standard
library only, so that any module may use it.
"""

import json
import os
from pathlib import Path


def write_atomically(path: Path, write):
    """`write(tmp_path)`, flushed to disk, then renamed over `path`: a crash leaves the old file
    whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str):
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, value):
    write_text(path, json.dumps(value, indent=2))


def write_jsonl(path: Path, records):
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def fsync_folder(folder: Path):
    """The renames in `folder` reach the disk (they are already safe from a killed process)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def new_output(out: Path, overwrite: bool, inputs=(), what: str = "--out") -> str | None:
    """Why `out` cannot be written as a new output file, or None: never one of `inputs`, a folder,
    in a folder that is missing or not writable, nor a file already there unless `overwrite`."""
    if any(out.resolve() == Path(i).resolve() for i in inputs):
        return f"{what} {out} is one of the input files; choose another {what}"
    if out.is_dir():
        return f"{what} {out} is a folder; give a file name"
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        return f"{what} {out}: {out.parent} is not a writable folder"
    if out.exists() and not overwrite:
        return f"{what} {out} exists: replace it with --overwrite, or choose another {what}"
    return None
