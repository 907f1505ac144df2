"""What a training run leaves for the people who watch it and the ones it is shared with.

    the printed lines    a training step's loss, learning rate, speed and time left (Progress)
    OUT/metrics.jsonl    every log line and evaluation, one JSON object a line (always)
    OUT/metrics.png      the training loss, the validation loss and each score against the step,
                         redrawn at every evaluation (with matplotlib); `python report.py OUT` draws
                         it for any run
    OUT/tensorboard/     TensorBoard's event files (--tensorboard; then tensorboard --logdir
                         OUT/tensorboard)
    OUT/wandb/           a Weights & Biases run (--wandb PROJECT; WANDB_MODE=offline works as W&B
                         documents)
    OUT/README.md        the model card: the hub's front matter, what was trained, the last scores,
                         how to load it
    --push-to-hub        the checkpoint or adapter folder uploaded with huggingface_hub at the end

TensorBoard, W&B, matplotlib and huggingface_hub are optional: each is imported only when asked for,
and a missing one is refused before training starts in one line that says what to install. Under
torchrun only process 0 reports. What it is not: the training loop (train.py) or the checkpoint
(checkpoint.py).
"""

import argparse
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli import UserError, fail, log
from drawing import evaluation_picture
from files import write_atomically, write_text
from metrics import format_scores

# metrics.png: these, then each task's metrics of PANEL_METRICS that the run has
PANELS = ("loss", "val_loss")
PANEL_METRICS = ("cider", "bleu4", "vqa_accuracy", "anls", "cer", "exact_match", "map50",
                 "map50_95", "miou", "mask_iou", "repeated_boxes", "malformed_answers")


@dataclass
class Progress:
    """The printed line of a training step: speed and time left, measured between lines."""
    start: int  # the step this run started from
    steps: int
    t_start: float = field(default_factory=time.perf_counter)
    t_log: float = field(default_factory=time.perf_counter)
    tokens: int = 0  # read since the last line

    def __post_init__(self):
        self.logged_step = self.start

    def line(self, done: int, loss: float, lr: float, device) -> tuple[str, dict]:
        """The line, and its numbers for the reports."""
        now = time.perf_counter()
        per_step = (now - self.t_log) / (done - self.logged_step)
        memory = ""
        if device.type == "cuda":
            memory = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        minutes_left = (self.steps - done) * (now - self.t_start) / (done - self.start) / 60
        speed = self.tokens / (now - self.t_log)
        text = (f"step {done}/{self.steps}: loss {loss:.4f}, lr {lr:.2e}, {speed:.0f} tok/s, "
                f"{per_step:.2f} s/step{memory}, {minutes_left:.1f} min left")
        numbers = dict(loss=loss, lr=lr, seconds_per_step=per_step, tokens_per_second=speed)
        self.t_log, self.logged_step, self.tokens = now, done, 0
        return text, numbers


def require(module: str, option: str, package: str):
    """The module, or a one-line error (exit 2) saying what to install."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UserError(f"{option} needs the {package} package: pip install {package}") from None


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl, each a JSON object with its step; a last line cut short (a kill
    or a full disk mid-write) is dropped, and said."""
    try:
        lines = path.read_text(encoding="utf-8",
                               errors="replace").splitlines() if path.exists() else []
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    entries = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise UserError(f"{path}:{n}: not valid JSON; it is not a metrics file written by "
                                "train.py") from None
            log(f"{path}:{n}: its last line was cut short (a kill or a full disk while writing "
                "it); dropped")
            continue
        step = entry.get("step") if isinstance(entry, dict) else None
        if type(step) is not int:
            raise UserError(f"{path}:{n}: not a JSON object with a step; it is not a metrics file "
                            "written by train.py")
        entries.append(entry)
    return entries


class Reporter:
    """Where process 0 sends a run's numbers: metrics.jsonl, and TensorBoard and W&B when asked. A
    resumed run continues the same curves: the lines after the step resumed from are dropped,
    TensorBoard purges its events after it, and the W&B run of the same id (kept in train_state.pt)
    is resumed."""

    def __init__(self, out: Path, start: int, resume: bool, tensorboard: bool,
                 wandb_project: str | None, config: dict, wandb_id: str | None = None):
        self.out, self.metrics_file = out, out / "metrics.jsonl"
        kept = []
        if resume:
            kept = [e for e in read_metrics(self.metrics_file) if e.get("step", 0) <= start]
        write_atomically(self.metrics_file,
                         lambda tmp: tmp.write_text("".join(json.dumps(e) + "\n" for e in kept)))
        self.last_evaluation = next((e for e in reversed(kept) if "val_loss" in e), None)
        self.tensorboard = self.wandb = None
        if tensorboard:
            writer = require("torch.utils.tensorboard", "--tensorboard",
                             "tensorboard").SummaryWriter
            self.tensorboard = writer(str(out / "tensorboard"),
                                      purge_step=start + 1 if start else None)
        if wandb_project:
            wandb = require("wandb", "--wandb", "wandb")
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out), id=wandb_id,
                                    resume="allow")
        self.plot_missing = False

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb else None

    def write(self, step: int, entry: dict, picture: Path | None = None):
        """A line of metrics.jsonl, and the numbers in it (per-label APs as label/AP) to TensorBoard
        and W&B; an evaluation's picture too. A failed write (a full disk) stops the run in one
        line."""
        try:
            if not self.out.is_dir():
                log(f"{self.out} was deleted during training; it is made again")
                self.out.mkdir(parents=True)
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(dict(step=step, **entry)) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.metrics_file} ({e.strerror or e}); the last "
                            f"checkpoint in {self.out}, if any, is intact")
        scalars = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
        scalars |= {f"{task}AP@50:95/{label}": ap for task, label, ap in ap_per_label(entry)}
        if self.tensorboard:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
            if picture:
                self.tensorboard.add_image("evaluation", image_array(picture), step,
                                           dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb:
            import wandb
            self.wandb.log(scalars | ({"evaluation": wandb.Image(str(picture))} if picture else {}),
                           step=step)
        if "val_loss" in entry:
            self.last_evaluation = dict(step=step, **entry)
            self.plot()

    def evaluation(self, step: int, metrics: dict, shown: list[tuple], vae=None):
        """An evaluation: its picture in OUT/eval/step-N.jpg (drawing.evaluation_picture), its
        scores and three answers printed, its numbers written."""
        picture = self.out / "eval" / f"step-{step}.jpg"
        try:
            picture.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(
                picture,
                lambda tmp: evaluation_picture(shown, vae).save(tmp, format="JPEG", quality=90))
        except OSError as e:
            raise UserError(f"cannot write {picture} ({e.strerror or e}); the last checkpoint in "
                            f"{self.out}, if any, is intact") from None
        examples = [f"  {prefix!r} -> {answer.strip()!r} (target {target!r})"
                    for _, prefix, answer, target in shown[:3]]
        log(f"eval step {step}: {format_scores(metrics)}", f"  picture: {picture}", *examples,
            sep="\n")
        self.write(step, metrics, picture)

    def write_card(self, card: str):
        """OUT/README.md: with every save, and after the final evaluation with its scores."""
        try:
            write_text(self.out / "README.md", card)
        except OSError as e:
            raise UserError(f"cannot write {self.out / 'README.md'} ({e.strerror or e}); the "
                            "checkpoint is saved")

    def plot(self):
        """OUT/metrics.png, redrawn from metrics.jsonl; without matplotlib, one line once saying how
        to get it."""
        try:
            plot_metrics(self.metrics_file, self.out / "metrics.png")
        except OSError as e:
            raise UserError(f"cannot write {self.out / 'metrics.png'} ({e.strerror or e}); the "
                            "last checkpoint in "
                            f"{self.out}, if any, is intact") from None
        except ImportError:
            if not self.plot_missing:
                log("metrics.png is not drawn: pip install matplotlib (then python report.py OUT "
                    "draws it)")
            self.plot_missing = True

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


def image_array(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def plot_metrics(metrics_file: Path, png: Path) -> int:
    """One panel per metric of PANELS and per task's metric of PANEL_METRICS that the run has,
    against the step; returns the number of panels."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    entries = read_metrics(metrics_file)
    keys = dict.fromkeys(k for e in entries for k in e)
    panels = [name for name in PANELS if name in keys]
    panels += [name for name in keys if name.rpartition("/")[2] in PANEL_METRICS and "/" in name]
    if not panels:
        return 0
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, name in zip(axes[0], panels):
        points = [(e["step"], e[name]) for e in entries if name in e and e[name] != -1]
        ax.plot(*zip(*points), marker="." if name != "loss" else None) if points else None
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    write_atomically(png, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return len(panels)


# ----------------------------------------------------------------------------------------------
# The model card, and the upload


def ap_per_label(scores: dict) -> list[tuple[str, str, float]]:
    """("detect/", label, AP@50:95) for each label of each task whose scores list AP per label."""
    return [(key.removesuffix("ap50_95"), label, ap) for key, per_label in scores.items()
            if key.endswith("/ap50_95") and isinstance(per_label, dict)
            for label, ap in per_label.items()]


def cell(text: str) -> str:
    """Text in a cell of a Markdown table: its pipes escaped, so that the row keeps its columns."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def model_card(base_model: str, adapter: bool, run: dict, scores: dict | None) -> str:
    """OUT/README.md. run: trainable, lora (rank, alpha, targets) or None, quantize, steps, batch,
    lr, data (file: examples), and for the load examples the folder's name."""
    tags = ["paligemma", "nanopaligemma", "image-text-to-text"]
    tags += ["lora", "peft"] if adapter else []
    tags += ["qlora"] * bool(adapter and run["quantize"])
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) and not Path(base_model).exists()
    front = ({"base_model": base_model} if hub_id else {}) | {
        "library_name": "peft" if adapter else "transformers", "pipeline_tag": "image-text-to-text",
        "license": "gemma", "tags": tags}
    lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in front.items()), "---", "",
             f"# {run['name']}", "",
             f"PaliGemma fine-tuned from `{base_model}` with nanoPaliGemma's train.py.", "",
             "## What was trained", ""]
    trained = {"lora": "LoRA adapters", "attn": "the decoder's attention (q/k/v/o)",
               "llm": "the decoder", "all": "the whole model"}[run["trainable"]]
    if run["lora"]:
        rank, alpha, targets = run["lora"]
        trained += f", rank {rank}, alpha {alpha}, on {', '.join(targets)}"
    frozen = "in 4 bits (NF4, double quantization)" if run["quantize"] else "as loaded"
    lines += [f"- trainable: {trained}", f"- frozen weights: {frozen}",
              f"- {run['steps']} steps of {run['batch']} examples, learning rate {run['lr']:g}",
              *(f"- data: `{name}`, {count} examples" for name, count in run["data"].items()), ""]
    if scores:
        numbers = {k: v for k, v in scores.items() if isinstance(v, (int, float)) and k != "step"}
        lines += [f"## Scores at step {scores.get('step')}", "", "| metric | value |", "|---|---|",
                  *(f"| {cell(k)} | {v:.4f} |" if isinstance(v, float) else f"| {cell(k)} | {v} |"
                    for k, v in numbers.items()),
                  *(f"| {task}AP@50:95 {cell(label)} | {ap:.4f} |"
                    for task, label, ap in ap_per_label(scores)), ""]
    folder = run["name"]
    lines += [
        "## Use", "", "With nanoPaliGemma (from the repository's folder):", "", "```bash",
        f"python infer.py --model {shlex.quote(folder)} --image cat.jpg --prompt 'caption en'",
        "```", ""]
    if adapter:
        lines += ["With transformers and peft:", "", "```python", "from peft import PeftModel",
                  "from transformers import PaliGemmaForConditionalGeneration",
                  f"base = PaliGemmaForConditionalGeneration.from_pretrained({base_model!r})",
                  f"model = PeftModel.from_pretrained(base, {folder!r})", "```", ""]
    else:
        lines += ["With transformers:", "", "```python",
                  "from transformers import PaliGemmaForConditionalGeneration",
                  f"model = PaliGemmaForConditionalGeneration.from_pretrained({folder!r})", "```",
                  ""]
    return "\n".join(lines)


# not train_state.pt, the optimizer's shards, merged/ or the W&B files
UPLOADED = ("*.safetensors", "*.json", "tokenizer.model", "README.md", "metrics.jsonl",
            "metrics.png", "eval/*.jpg", "tensorboard/*")


def check_hub(repo_id: str):
    """Before training: the repo id's form, and a token to upload with (the hub itself is asked at
    the end)."""
    hub = require("huggingface_hub", "--push-to-hub", "huggingface-hub")
    # a submodule: not an attribute until it is imported
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise UserError(f"--push-to-hub {repo_id!r}: not a repo id of the form owner/name ({e})")
    if "/" not in repo_id or hub.get_token() is None:
        what = ("give owner/name" if "/" not in repo_id else
                "no Hugging Face token: run huggingface-cli login, or set HF_TOKEN")
        raise UserError(f"--push-to-hub {repo_id}: {what}")


def push(out: Path, repo_id: str, private: bool) -> str:
    """Uploads the checkpoint in `out` (see UPLOADED) to the hub; a failure is one line (exit 2),
    and the local checkpoint is untouched."""
    import huggingface_hub

    files = sorted(str(p.relative_to(out)) for pattern in UPLOADED for p in out.glob(pattern)
                   if p.is_file())
    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True)
        huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(out), allow_patterns=files,
                                      commit_message="nanoPaliGemma: fine-tuned checkpoint")
    except Exception as e:
        # network, authentication, permissions: the hub library raises many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({reason[:200]}); the "
                        f"checkpoint in {out} is complete and untouched: push it later with "
                        f"huggingface-cli upload {repo_id} {out}")
    log(f"pushed {len(files)} files of {out} to https://huggingface.co/{repo_id}")
    return repo_id


def main(argv=None):
    p = argparse.ArgumentParser(description="Draws OUT/metrics.png from OUT/metrics.jsonl of a "
                                "train.py run.")
    p.add_argument("out", type=Path, help="the run's --out folder")
    args = p.parse_args(argv)
    try:
        if not (args.out / "metrics.jsonl").is_file():
            raise UserError(f"{args.out} holds no metrics.jsonl (the --out folder of a train.py "
                            "run)")
        require("matplotlib", "drawing metrics.png", "matplotlib")
        panels = plot_metrics(args.out / "metrics.jsonl", args.out / "metrics.png")
    except UserError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write {args.out / 'metrics.png'} ({e.strerror or e})")
    print(f"{args.out / 'metrics.png'}: {panels} panels" if panels else f"{args.out}: no metrics "
          "to draw yet")


if __name__ == "__main__":
    sys.exit(main())
