"""Speed and memory of nanoPaliGemma next to transformers' PaliGemma, on the same random weights.

    python bench.py                  # CPU, float32: paligemma-3b-pt-224's widths, 2 layers a tower
    python bench.py --preset tiny    # a few million parameters, where per-step overhead dominates;
                                     # and the detect grammar's cost on tiny/paligemma-tiny
    python bench.py --preset full    # the whole paligemma-3b-pt-224 in bfloat16: on a CPU, its
                                     # training steps' peak memory (attention-only, LoRA, QLoRA;
                                     # 41 min, 21 GiB)
    python bench.py --preset full --compile  # a GPU: also decoding, and the training step's MFU

Both models load the same safetensors (a random transformers PaliGemma saved in a temporary folder;
nothing is downloaded). Timings alternate between the two so that the machine's drift hits both
equally; the table shows medians and ours / transformers. Peak training memory is measured in a
fresh process for each side (peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU).
"""

import argparse
import ctypes
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers

from detections import AnswerConstraint, AnswerTokens
from gemma import GemmaConfig
from lora import ATTENTION, add_lora
from nf4 import dequantize_linears
from paligemma import TRAINABLE, PaliGemma, PaliGemmaConfig, SuffixLossSum, count_targets
from processor import Processor
from run import training_module
from tiny import shapes

REAL_TEXT = dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8,
                 num_key_value_heads=1, head_dim=256)
REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14,
                   image_size=224)
# peft's: the decoder's q/k/v/o, not SigLIP's
LORA_TARGETS = rf".*language_model.*\.({'|'.join(ATTENTION)})"
PRESETS = {  # (text config, vision config, vocabulary)
    "tiny": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=64),
             dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=3, patch_size=14, image_size=224), 4096),
    "cpu": (REAL_TEXT | dict(num_hidden_layers=2), REAL_VISION | dict(num_hidden_layers=2), 257216),
    "full": (REAL_TEXT | dict(num_hidden_layers=18), REAL_VISION | dict(num_hidden_layers=27),
             257216),
}
# the grammar's cost is measured on it
TINY = Path(__file__).resolve().parent / "tiny" / "paligemma-tiny"
# text tokens in the prompt (with <bos> and "\n"), in a training suffix; tokens decoded
PROMPT, SUFFIX, NEW_TOKENS = 10, 16, 64


def make_checkpoint(folder: Path, preset: str, dtype: torch.dtype) -> transformers.PaliGemmaConfig:
    text, vision, vocab = PRESETS[preset]
    config = transformers.PaliGemmaConfig(
        text_config=dict(vocab_size=vocab, **text),
        vision_config=dict(vision_use_head=False, **vision), image_token_index=vocab - 64,
        projection_dim=text["hidden_size"], hidden_size=text["hidden_size"], vocab_size=vocab)
    torch.manual_seed(0)  # built in `dtype` (the whole model in float32 would be 12 GB)
    model = transformers.PaliGemmaForConditionalGeneration._from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    return config


def make_batch(config, batch: int, suffix: int, device) -> dict[str, torch.Tensor]:
    """Image tokens, <bos>, a prompt of random tokens and "\\n"; with a suffix, its token types and
    labels."""
    g = torch.Generator().manual_seed(batch)
    size = config.vision_config.image_size
    n_image = (size // config.vision_config.patch_size) ** 2
    text = torch.randint(4, config.image_token_index, (batch, PROMPT + suffix), generator=g)
    text[:, 0] = 2
    ids = torch.cat([torch.full((batch, n_image), config.image_token_index), text], 1)
    types = torch.zeros_like(ids)
    types[:, ids.shape[1] - suffix:] = 1
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types,
               pixel_values=torch.rand(batch, 3, size, size, generator=g) * 2 - 1)
    if suffix:
        out["labels"] = ids.masked_fill(types == 0, -100)
    return {k: v.to(device) for k, v in out.items()}


def load(side: str, folder: Path, dtype, device, quantize: str | None = None):
    """One side's model. quantize: None, or the trainable part ("attn", "lora") whose layers stay in
    full precision while every other linear layer is stored in NF4 (ours: nf4.py; transformers:
    bitsandbytes)."""
    if side == "ours":
        keep = None if quantize != "attn" else lambda layer: TRAINABLE["attn"](layer + ".")
        model = PaliGemma.from_pretrained(folder, dtype=dtype, device=device,
                                          quantize=quantize and "nf4", keep=keep)
        # decode all NEW_TOKENS, as min_new_tokens does for transformers
        model.config.eos_token_id = -1
        return model
    if quantize is None:
        model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
        return model.to(device).eval()
    keep = ["lm_head"]
    if quantize == "attn":
        keep.append(r".*language_model\.layers\.\d+\.self_attn\.[qkvo]_proj")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=keep)
    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, quantization_config=config, device_map=str(device)).eval()


def prefill(side, model, batch):
    """One forward pass over image + prompt; the next-token logits only, as generation needs."""
    names = ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
    inputs = {k: batch[k] for k in names}
    if side == "ours":
        return model.language_model.logits(model.hidden_states(**inputs)[:, -1])
    return model(**inputs, logits_to_keep=1).logits


def generate(side, model, batch, new_tokens, compiled=False):
    """Greedy generation of exactly new_tokens. compiled: for transformers, its documented way to
    compile generation (a static cache, with which generate compiles the forward pass itself); ours
    is compiled by replacing model.decode_step once (see main)."""
    if side == "ours":
        return model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                              max_new_tokens=new_tokens)
    names = ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
    inputs = {k: batch[k] for k in names}
    if compiled:
        compile_config = transformers.CompileConfig()
        compile_config._compile_all_devices = True  # generate compiles on GPUs only, unless told
        inputs |= dict(cache_implementation="static", compile_config=compile_config)
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False)


def trainer(side, model, dtype, device, mode="attn", grad_checkpointing=False):
    """A training step (forward, backward, AdamW) for either model, set up alike. attn: the
    decoder's q/k/v/o in float32 and trainable, everything else frozen; lora: rank-8 adapters on
    q/k/v/o (ours, or peft's on transformers'), the base frozen. Autocast to `dtype`; with
    grad_checkpointing, the decoder layers' activations are recomputed in backward (train.py's
    --grad-checkpointing, transformers' own). Returns the step, the optimizer and the trainable
    parameters."""
    if mode == "lora" and side == "ours":
        add_lora(model, rank=8, alpha=16)
    elif mode == "lora":
        model = peft.get_peft_model(
            model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    else:
        learns = TRAINABLE["attn"] if side == "ours" else \
            lambda name: ".language_model.layers." in name and ".self_attn." in name
        for name, p in model.named_parameters():
            p.requires_grad_(learns(name))
            if p.requires_grad:
                p.data = p.data.float()
    if side == "ours":
        loss_model = training_module(SuffixLossSum(model), grad_checkpointing, ddp=False,
                                     compile=False)
    else:
        loss_model = model
        if grad_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    model.train()

    def step(batch):
        with autocast:
            if side == "ours":
                loss = loss_model(**batch) / count_targets(batch["labels"])
            else:
                loss = loss_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, optimizer, params


def resident(device) -> tuple[float, float]:
    """This process's memory in GiB on `device`, now and at its peak: RSS on the CPU (Linux),
    allocated on a GPU (that GPU's, not cuda:0's)."""
    if device.type == "cuda":
        return (torch.cuda.memory_allocated(device) / 2**30,
                torch.cuda.max_memory_allocated(device) / 2**30)
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 2**20
                 for key in ("VmRSS", "VmHWM"))


def train_memory(side, folder, dtype, device, batch_size, mode, quantize=False,
                 grad_checkpointing=False):
    """(peak memory in GiB above what the process held before the model was built, seconds) of one
    training step, in a fresh process that loads only one side. The optimizer's state is allocated
    first (a step on zero gradients), so that the measured step holds all that every step of a run
    holds; on the CPU, the memory that loading freed is handed back to the system first
    (malloc_trim), as it is on a GPU."""
    # CUDA started first, so that "before" is this GPU's memory, not the CPU's
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.init()
    before = resident(device)[0]
    model = load(side, folder, dtype, device, mode if quantize else None)
    step, optimizer, params = trainer(side, model, dtype, device, mode, grad_checkpointing)
    batch = make_batch(transformers.PaliGemmaConfig.from_pretrained(folder), batch_size, SUFFIX,
                       device)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # what loading freed goes back to the system (glibc keeps it otherwise), on both sides
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: the peak RSS restarts from the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    sync(device)
    start = time.perf_counter()
    step(batch)
    sync(device)
    return resident(device)[1] - before, time.perf_counter() - start


def in_fresh_process(fn, *args):
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(fns: dict, repeat: int, device) -> dict[str, float]:
    """Median seconds of each function, run in turns after one warm-up call each."""
    times = {name: [] for name in fns}
    for r in range(repeat + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matvecs(device, dtype):
    """Ten large matrix-vector products, and the bytes of matrix they read: the rate at which
    weights can be read from memory, which bounds batch-1 decoding."""
    n = 8192 if device.type == "cpu" else 32768
    w, x = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
    return (lambda: [w @ x for _ in range(10)]), 10 * w.numel() * w.element_size()


# PaliGemma 2's decoders (the vision tower is SigLIP So400m in all); 28B's queries scale by
# 144**-0.5
PALIGEMMA2 = {"paligemma2-3b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                    num_attention_heads=8, num_key_value_heads=4, head_dim=256),
              "paligemma2-10b": dict(hidden_size=3584, intermediate_size=14336,
                                     num_hidden_layers=42, num_attention_heads=16,
                                     num_key_value_heads=8, head_dim=256),
              "paligemma2-28b": dict(hidden_size=4608, intermediate_size=36864,
                                     num_hidden_layers=46, num_attention_heads=32,
                                     num_key_value_heads=16, head_dim=128,
                                     query_pre_attn_scalar=144)}


def memory_per_process(model: PaliGemma, mode: str, processes: int, fsdp: bool, batch: int = 8,
                       tokens: int = 280) -> dict[str, float]:
    """GB a training process holds, from the model's shapes: frozen weights in bfloat16 (2 bytes
    each); trainable ones in float32 with their gradients and AdamW's two moments (16 bytes each);
    under FSDP all of it divided by the processes, plus one decoder layer gathered whole twice (the
    one running and the one prefetched); and activations, estimated as 34 x hidden bytes per token
    and decoder layer (Korthikanti et al., 2022, with memory-efficient attention; the frozen vision
    tower keeps none)."""
    learns = (lambda name: ".lora_" in name) if mode == "lora" else TRAINABLE["attn"]
    frozen = sum(p.numel() for n, p in model.named_parameters() if not learns(n))
    trainable = sum(p.numel() for n, p in model.named_parameters() if learns(n))
    state = 2 * frozen + 16 * trainable
    layer = model.language_model.layers[0]
    gathered = sum((4 if learns(f"language_model.layers.0.{n}") else 2) * p.numel()
                   for n, p in layer.named_parameters())
    text = model.config.text_config
    activations = 34 * text.hidden_size * batch * tokens * text.num_hidden_layers
    return dict(state=(state / processes + 2 * gathered if fsdp else state) / 1e9,
                activations=activations / 1e9)


def memory_table():
    """The README's table: GB per GPU for fine-tuning PaliGemma 2 at batch 8 per GPU, 224 px (~280
    tokens)."""
    print("GB per GPU: weights, gradients and optimizer state + activations (estimated), batch 8, "
          "224 px")
    print(f"{'':34} {'DDP, any':>10} " + " ".join(f"{f'FSDP {n}':>9}" for n in (2, 4, 8)))
    for name, text in PALIGEMMA2.items():
        config = PaliGemmaConfig(text_config=GemmaConfig(
            **text, post_norms=True, attn_logit_softcapping=50.0, final_logit_softcapping=30.0))
        for mode, what in (("attn", "attention-only"), ("lora", "LoRA r=8 q/k/v/o")):
            with torch.device("meta"):
                model = PaliGemma(config)
                if mode == "lora":
                    add_lora(model, rank=8, alpha=16)
            ddp = memory_per_process(model, mode, 1, fsdp=False)
            row = [ddp["state"] + ddp["activations"]]
            row += [sum(memory_per_process(model, mode, n, fsdp=True).values()) for n in (2, 4, 8)]
            print(f"{name + ', ' + what:34} " + " ".join(f"{v:9.1f}" for v in row)
                  + f"   (activations {ddp['activations']:.1f})")


# the training steps compared: (trainable part, every other linear layer frozen in NF4)
TRAINING = {
    "attention-only": ("attn", False),
    "LoRA r=8 q/k/v/o": ("lora", False),
    "QLoRA: LoRA r=8 q/k/v/o on NF4": ("lora", True),
    "attention-only on NF4": ("attn", True),
}


def decoding_rows(folder: Path, config, device, dtype, repeat: int,
                  compiled: bool) -> tuple[list, dict, dict, float]:
    """Loading, prefill and generation, timed in turns: (rows, decoding-step and whole-generate
    tokens/s per batch size and side, the measured memory bandwidth in bytes/s)."""
    sides, rows = ("ours", "transformers"), []
    t = alternate({s: lambda s=s: load(s, folder, dtype, device) for s in sides}, repeat, device)
    rows.append(("load (s)", t["ours"], t["transformers"]))
    models = {s: load(s, folder, dtype, device) for s in sides}
    if compiled:
        models["ours"].decode_step = torch.compile(models["ours"].decode_step)
    for b in (1, 8):
        batch = make_batch(config, b, 0, device)
        t = alternate({s: lambda s=s: prefill(s, models[s], batch) for s in sides}, repeat, device)
        rows.append((f"prefill, batch {b} (s)", t["ours"], t["transformers"]))
    decode, generated = {}, {}  # tokens/s of the decoding steps alone; of the whole generate call
    for b in (1, 8):
        batch = make_batch(config, b, 0, device)
        fns = {(s, n): lambda s=s, n=n: generate(s, models[s], batch, n, compiled)
               for s in sides for n in (1, NEW_TOKENS)}
        if b == 1:  # the memory-bandwidth bound, timed in turns with the decoding it bounds
            fns["matvec", 1], matvec_bytes = matvecs(device, dtype)
            if compiled:  # and what a user of transformers gets by default
                default = models["transformers"]
                fns |= {("default", n): lambda n=n: generate("transformers", default, batch, n)
                        for n in (1, NEW_TOKENS)}
        t = alternate(fns, repeat, device)
        if b == 1:
            bandwidth = matvec_bytes / t.pop(("matvec", 1))
        generated[b] = {s: b * NEW_TOKENS / t[s, NEW_TOKENS] for s, n in t if n == NEW_TOKENS}
        # Generating 1 token is the prefill and the first token; the difference is NEW_TOKENS - 1
        # steps.
        decode[b] = {s: b * (NEW_TOKENS - 1) / (t[s, NEW_TOKENS] - t[s, 1])
                     for s, n in t if n == NEW_TOKENS}
        rows.append((f"generate {NEW_TOKENS} tokens, batch {b} (tokens/s)", generated[b]["ours"],
                     generated[b]["transformers"]))
        rows.append(("  its decoding steps alone (tokens/s)", decode[b]["ours"],
                     decode[b]["transformers"]))
        if "default" in generated[b]:
            rows.append(("  generate vs transformers' default (eager)", generated[b]["ours"],
                         generated[b]["default"]))
            rows.append(("  decoding steps vs transformers' default", decode[b]["ours"],
                         decode[b]["default"]))
    return rows, decode, generated, bandwidth


def training_rows(folder: Path, config, device, dtype, repeat: int,
                  modes) -> tuple[list, dict, dict]:
    """Each mode's training step at batch 8, timed in turns in this process, and its peak memory
    measured in a fresh process per side: (rows, trainable parameters per mode, seconds per mode and
    side)."""
    rows, n_trainable, seconds, batch = [], {}, {}, make_batch(config, 8, SUFFIX, device)
    what = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS"
    torch.set_grad_enabled(True)
    for name in modes:
        mode, quantize = TRAINING[name]
        steps = {}
        for s in ("ours", "transformers"):
            steps[s], _, params = trainer(
                s, load(s, folder, dtype, device, mode if quantize else None), dtype, device, mode)
            n_trainable[mode] = sum(p.numel() for p in params)
        t = seconds[name] = alternate({s: lambda s=s: steps[s](batch) for s in steps}, repeat,
                                      device)
        rows.append((f"{name} train step, batch 8 (s)", t["ours"], t["transformers"]))
        steps.clear()  # free both models before the memory measurements
        memory = {s: in_fresh_process(train_memory, s, folder, dtype, device, 8, mode,
                                      quantize)[0] for s in t}
        rows.append((f"  its {what} (GiB)", memory["ours"], memory["transformers"]))
    torch.set_grad_enabled(False)
    return rows, n_trainable, seconds


def full_training_table(folder: Path, device, dtype, batch_size: int):
    """The whole paligemma-3b-pt-224: each training step of TRAINING, with and without gradient
    checkpointing, each side in a fresh process: peak memory and the step's time."""
    what = "peak GPU memory allocated"
    if device.type != "cuda":
        what = "peak RSS above the process before the model"
    print(f"\npaligemma-3b-pt-224, random weights, frozen weights in {dtype}; one training step "
          f"(AdamW, its state allocated before), batch {batch_size}, {256 + PROMPT + SUFFIX} "
          f"tokens ({PROMPT} of prompt, {SUFFIX} of suffix), each in a fresh process; {what}, GiB; "
          "seconds of the step")
    print(f"{'':52} {'ours':>8} {'theirs':>8} {'ratio':>7} {'ours s':>8} {'theirs s':>9} "
          f"{'ratio':>7}")
    for name, (mode, quantize) in TRAINING.items():
        for checkpointing in (False, True):
            (m1, s1), (m2, s2) = (in_fresh_process(train_memory, side, folder, dtype, device,
                                                   batch_size, mode, quantize, checkpointing)
                                  for side in ("ours", "transformers"))
            label = name + (", --grad-checkpointing" if checkpointing else "")
            print(f"{label:52} {m1:8.2f} {m2:8.2f} {m1 / m2:6.2f}x {s1:8.1f} {s2:9.1f} "
                  f"{s1 / s2:6.2f}x", flush=True)


def grammar_cost(device, repeat: int):
    """The detect grammar's cost (detections.AnswerConstraint, which generation applies to detect
    and segment prompts): greedy answers of tiny/paligemma-tiny to "detect circle ; square ;
    triangle" about scenes of tiny/shapes.py, with and without it, in turns; generated tokens/s at
    batch 1 and 8, prefill included."""
    model = PaliGemma.from_pretrained(TINY, device=device)
    processor = Processor.from_pretrained(TINY)
    tokens, rng = AnswerTokens(processor.tokenizer), np.random.default_rng(0)
    images = [shapes.draw(shapes.random_scene(rng), rng) for _ in range(8)]
    print(f"\n{TINY.name}: \"{shapes.ALL_SHAPES_PROMPT}\", up to {NEW_TOKENS} new tokens, medians "
          f"of {repeat}; generated tokens/s, prefill included")
    for b in (1, 8):
        prompts = [shapes.ALL_SHAPES_PROMPT] * b
        batch = {k: v.to(device) for k, v in processor(images[:b], prompts).items()}
        generated = {}

        def answer(constrained: bool):
            grammar = AnswerConstraint(prompts, tokens,
                                       model.config.text_config.vocab_size) if constrained else None
            new = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                                 max_new_tokens=NEW_TOKENS, constrain=grammar)
            generated[constrained] = int((new != processor.tokenizer.pad_id).sum())
        t = alternate({c: lambda c=c: answer(c) for c in (True, False)}, repeat, device)
        rate = {c: generated[c] / t[c] for c in t}
        print(f"batch {b}: {rate[True]:8.1f} with the grammar ({generated[True]} tokens), "
              f"{rate[False]:8.1f} without ({generated[False]} tokens): "
              f"{rate[False] / rate[True] - 1:+.1%} time per token")


# The decoding formats compared (bench.py --formats): (side, dtype of the model, quantize)
FORMATS = {
    "ours float32": ("ours", torch.float32, None), "ours bfloat16": ("ours", torch.bfloat16, None),
    "ours int8": ("ours", torch.bfloat16, "int8"), "ours int4": ("ours", torch.bfloat16, "int4"),
    "ours nf4 (dequantized once)": ("ours", torch.bfloat16, "nf4"),
    "transformers float32": ("transformers", torch.float32, None),
    "transformers bfloat16": ("transformers", torch.bfloat16, None)}


def load_format(name: str, folder: Path, device):
    side, dtype, quantize = FORMATS[name]
    if side == "transformers":
        return load(side, folder, dtype, device)
    model = PaliGemma.from_pretrained(folder, dtype=dtype, device=device, quantize=quantize)
    if quantize == "nf4":
        dequantize_linears(model)  # what infer.py and evaluate.py do with --quantize nf4
    model.config.eos_token_id = -1
    return model


def weight_bytes(model, side: str) -> int:
    """The bytes a decoding step reads: the decoder's weights and the output head, as stored."""
    if side == "transformers":
        lm = model.model.language_model
        return sum(t.nbytes for t in lm.layers.parameters()) + lm.embed_tokens.weight.nbytes
    lm = model.language_model
    head = lm.head if lm.head is not None else lm.embed_tokens
    tensors = [*lm.layers.parameters(), *lm.layers.buffers(), *head.parameters(),
               *head.buffers()]
    return sum(t.nbytes for t in tensors)


def decoding_formats(folder: Path, config, device, repeat: int):
    """Decoding steps' tokens/s of each of FORMATS at batch 1 and 8, timed in turns, each with its
    share of the memory-bandwidth limit of its own bytes; and each of ours' logits against ours in
    float32."""
    models = {name: load_format(name, folder, device) for name in FORMATS}
    batch = make_batch(config, 4, 0, device)
    names = ("input_ids", "pixel_values", "attention_mask", "token_type_ids")
    inputs = {k: batch[k] for k in names}
    reference = models["ours float32"](**inputs).float()
    print(f"\ndecoding steps, tokens/s (medians of {repeat}); share of each one's bandwidth limit "
          "at batch 1; ours' logits against ours in float32 (batch of 4 prompts)")
    print(f"{'':30} {'MiB read':>9} {'batch 1':>9} {'limit':>6} {'batch 8':>9}   "
          f"{'max |logit diff|':>17} {'mean':>9}")
    fns, matvec_bytes = {}, None
    rates = {}
    for b in (1, 8):
        batch = make_batch(config, b, 0, device)
        fns = {(name, n): lambda name=name, n=n: generate(FORMATS[name][0], models[name], batch, n)
               for name in FORMATS for n in (1, NEW_TOKENS)}
        if b == 1:
            fns["matvec", 1], matvec_bytes = matvecs(device, torch.float32)
        t = alternate(fns, repeat, device)
        if b == 1:
            bandwidth = matvec_bytes / t.pop(("matvec", 1))
        rates[b] = {name: b * (NEW_TOKENS - 1) / (t[name, NEW_TOKENS] - t[name, 1])
                    for name in FORMATS}
    for name, model in models.items():
        side = FORMATS[name][0]
        read = weight_bytes(model, side)
        diff = ""
        if side == "ours":
            d = (model(**inputs).float() - reference).abs()
            diff = f"{d.max().item():17.3g} {d.mean().item():9.3g}"
        print(f"{name:30} {read / 2**20:9.0f} {rates[1][name]:9.2f} "
              f"{rates[1][name] * read / bandwidth:6.0%} {rates[8][name]:9.2f}   {diff}")
    bf16, tf32 = rates[1]["ours bfloat16"], rates[1]["transformers float32"]
    print(f"batch 1, ratios: int8 {rates[1]['ours int8'] / bf16:.2f}x ours bfloat16; int4 "
          f"{rates[1]['ours int4'] / bf16:.2f}x ours bfloat16, {rates[1]['ours int4'] / tf32:.2f}x "
          f"transformers float32; nf4 {rates[1]['ours nf4 (dequantized once)'] / bf16:.2f}x ours "
          f"bfloat16 (bandwidth {bandwidth / 1e9:.1f} GB/s)")


def sdpa_kernels(device):
    """Which of SDPA's CUDA kernels take PaliGemma's decoder attention (8 query heads, 1 key/value
    head, head_dim 256, a boolean prefix-LM mask), as gemma.py calls it without and with the
    key/value heads expanded, and their times."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(8, 8, 282, 256, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(8, 1, 282, 256, device=device, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(282, 282, device=device, dtype=torch.bool).tril()
    mask[:266, :266] = True  # the prefix sees itself whole
    calls = {"enable_gqa=True (1 key/value head)": lambda: F.scaled_dot_product_attention(
                 q, k, v, attn_mask=mask, enable_gqa=True),
             "key/value expanded (a view)": lambda: F.scaled_dot_product_attention(
                 q, k.expand(-1, 8, -1, -1), v.expand(-1, 8, -1, -1), attn_mask=mask)}
    print("\nSDPA kernels for the decoder's prefill attention (batch 8, 282 tokens, boolean mask):")
    for what, call in calls.items():
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    seconds = alternate({0: call}, 5, device)[0]
                print(f"  {what:40} {backend.name:22} runs, {seconds * 1e3:.2f} ms")
            except RuntimeError as e:
                print(f"  {what:40} {backend.name:22} refused ({str(e).splitlines()[0][:60]})")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            sync(device)
        kernels = {e.key for e in prof.key_averages() if any(w in e.key.lower() for w in (
            "attention", "fmha", "flash", "bmm", "gemm"))}
        print(f"  {what:40} chosen by default: {', '.join(sorted(kernels))[:150]}")


def gpu_check(args):
    """bench.py --gpu-check: on one GPU in a few minutes, with paligemma-3b-pt-224's shapes (random
    weights, bfloat16): the SDPA kernels, decoding tokens/s eager / compiled (CUDA graphs) / int8 /
    int4 against transformers eager and compiled, and attention-only training's peak memory and
    FLOPs utilisation."""
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("bench.py: error: --gpu-check needs a CUDA GPU (--device cuda or cuda:N)")
        return 2
    torch.cuda.set_device(device)
    torch.set_grad_enabled(False)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    sdpa_kernels(device)
    with tempfile.TemporaryDirectory() as tmp:
        folder, dtype = Path(tmp), torch.bfloat16
        config = make_checkpoint(folder, "full", dtype)
        models = {"ours bfloat16": load("ours", folder, dtype, device),
                  "ours bfloat16, compiled": load("ours", folder, dtype, device),
                  "ours int8, compiled": load_format("ours int8", folder, device),
                  "ours int4": load_format("ours int4", folder, device),
                  "transformers bfloat16": load("transformers", folder, dtype, device)}
        for name in ("ours bfloat16, compiled", "ours int8, compiled"):
            step = models[name].decode_step
            models[name].decode_step = torch.compile(step, mode="reduce-overhead")
        side = {name: name.split()[0] for name in models}
        side["transformers, compiled"] = "transformers"
        models["transformers, compiled"] = models["transformers bfloat16"]
        batch = make_batch(config, 1, 0, device)
        fns = {(name, n): lambda name=name, n=n: generate(
                   side[name], models[name], batch, n, "compiled" in name)
               for name in models for n in (1, NEW_TOKENS)}
        t = alternate(fns, args.repeat, device)
        print(f"\ndecoding steps at batch 1, tokens/s (medians of {args.repeat}):")
        for name in models:
            print(f"  {name:32} {(NEW_TOKENS - 1) / (t[name, NEW_TOKENS] - t[name, 1]):8.1f}")
        models.clear()
        torch.set_grad_enabled(True)
        for name in ("ours", "transformers"):
            memory, seconds = in_fresh_process(train_memory, name, folder, dtype, device,
                                               args.train_batch, "attn")
            utilisation = ""
            if name == "ours":
                share = mfu(config, seconds, args.train_batch, args.peak_tflops)
                utilisation = f", {share:.1%} of {args.peak_tflops:g} TFLOPS"
            print(f"attention-only training step, batch {args.train_batch}, {name}: peak "
                  f"{memory:.2f} GiB, {seconds:.3f} s{utilisation}")


def attention_weights(text) -> int:
    """The weights of one decoder layer's q, k, v and o projections."""
    heads = 2 * text.num_attention_heads + 2 * text.num_key_value_heads
    return text.hidden_size * text.head_dim * heads


def mfu(config, seconds: float, batch: int, peak_tflops: float) -> float:
    """Model-FLOPs utilisation of an attention-only step: forward everywhere, backward through the
    decoder (input gradients) and into attention's weights."""
    text, v = config.text_config, config.vision_config
    n_image = (v.image_size // v.patch_size) ** 2
    tokens = batch * (n_image + PROMPT + SUFFIX)
    vision = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    attention = attention_weights(text)
    per_layer = attention + 3 * text.hidden_size * text.intermediate_size
    flops = (2 * batch * n_image * vision + 4 * tokens * text.num_hidden_layers * per_layer
             + 2 * tokens * text.num_hidden_layers * attention)
    return flops / seconds / (peak_tflops * 1e12)


def decoding_limit(config, dtype, bandwidth: float) -> float:
    """The memory-bandwidth limit of decoding at batch 1 (tokens/s): every decoder weight and the
    output head read once per token."""
    text = config.text_config
    per_layer = (attention_weights(text) + 3 * text.hidden_size * text.intermediate_size
                 + 2 * text.hidden_size)
    weight_bytes = ((text.num_hidden_layers * per_layer + text.vocab_size * text.hidden_size)
                    * torch.finfo(dtype).bits // 8)
    print(f"weights read per decoded token: {weight_bytes / 2**30:.2f} GiB; measured bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> limit {bandwidth / weight_bytes:.1f} tokens/s at batch 1")
    return bandwidth / weight_bytes


def options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: full on a "
                   "GPU, cpu on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each measurement and side")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding of both sides (ours: decode_step; transformers: "
                   "static cache)")
    p.add_argument("--train-batch", type=int, default=8, help="--preset full: the training steps' "
                   "batch size")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bfloat16 peak, for MFU (H100/H200: 989)")
    p.add_argument("--memory-table", action="store_true",
                   help="print the memory per GPU of fine-tuning PaliGemma 2, computed from the "
                   "shapes, and stop")
    p.add_argument("--formats", action="store_true", help="decoding in float32, bfloat16, int8, "
                   "int4 and nf4 against transformers in float32 and bfloat16, and the formats' "
                   "logits, then stop")
    p.add_argument("--gpu-check", action="store_true", help="on a GPU, in a few minutes: which "
                   "SDPA kernel runs, decoding eager / compiled / in each format against "
                   "transformers, a training step's peak memory and model-FLOPs utilisation")
    return p


def main():
    args = options().parse_args()
    if args.memory_table:
        return memory_table()
    if args.gpu_check:
        return gpu_check(args)
    device = torch.device(args.device)
    preset = args.preset or ("full" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or preset == "full" else torch.float32
    torch.set_grad_enabled(False)
    print(f"preset {preset} ({dtype}, {device}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, peft "
          f"{peft.__version__})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = make_checkpoint(folder, preset, dtype)
        if args.formats:
            return decoding_formats(folder, config, device, args.repeat)
        # decoding 3B on a few CPU cores would take hours
        if preset == "full" and device.type == "cpu":
            return full_training_table(folder, device, dtype, args.train_batch)
        rows, decode, generated, bandwidth = decoding_rows(
            folder, config, device, dtype, args.repeat, args.compile)
        modes = list(TRAINING)[:3] if preset != "full" else ["attention-only", "LoRA r=8 q/k/v/o"]
        train_rows, n_trainable, seconds = training_rows(
            folder, config, device, dtype, args.repeat, modes)
        print(f"\nmedians of {args.repeat}" + (", compiled" if args.compile else ""))
        print(f"{'':54} {'ours':>12} {'transformers':>13} {'ours/theirs':>12}")
        for what, ours, theirs in rows + train_rows:
            print(f"{what:54} {ours:12.4g} {theirs:13.4g} {ours / theirs:11.2f}x")
        limit = decoding_limit(config, dtype, bandwidth)
        print(f"Decoding steps reach: ours {decode[1]['ours'] / limit:.0%}, transformers "
              f"{decode[1]['transformers'] / limit:.0%}; whole generate calls (with the prefill): "
              f"ours {generated[1]['ours'] / limit:.0%}, transformers "
              f"{generated[1]['transformers'] / limit:.0%}")
        print(f"trainable parameters: attention only {n_trainable['attn']:,}, LoRA "
              f"{n_trainable['lora']:,}")
        # the whole paligemma-3b-pt-224 (default config), built without memory
        with torch.device("meta"):
            full = PaliGemma(PaliGemmaConfig())
        n_base = sum(p.numel() for p in full.parameters())
        n_lora = sum(full.get_parameter(name).numel() for name in add_lora(full, rank=8, alpha=16))
        print(f"paligemma-3b-pt-224 with LoRA r=8 on q/k/v/o: {n_lora:,} trainable parameters, "
              f"adapter file {n_lora * 4 / 2**20:.1f} MiB (float32); the model has {n_base:,}")
        if preset == "tiny":
            grammar_cost(device, args.repeat)
        if device.type == "cuda":
            utilisation = mfu(config, seconds["attention-only"]["ours"], 8, args.peak_tflops)
            print(f"train step model-FLOPs utilisation (ours, approximate): {utilisation:.1%} of "
                  f"{args.peak_tflops:g} TFLOPS")
            full_training_table(folder, device, dtype, args.train_batch)


if __name__ == "__main__":
    sys.exit(main())
