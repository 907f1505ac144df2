"""Speed and memory of nanoPaliGemma next to transformers' PaliGemma, on the same random weights.

    python bench.py                          # CPU, float32: paligemma-3b-pt-224's widths, 2 layers per tower
    python bench.py --preset tiny            # a few million parameters, where per-step overhead dominates
    python bench.py --preset full --compile  # a GPU: the whole paligemma-3b-pt-224 in bfloat16

Both models load the same safetensors (a random transformers PaliGemma saved in a temporary folder;
nothing is downloaded). Timings alternate between the two so that the machine's drift hits both
equally; the table shows medians and ours / transformers. Peak training memory is measured in a fresh
process for each side (peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU).
"""

import argparse
import multiprocessing
import re
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import peft
import torch
import transformers

from gemma import GemmaConfig
from lora import ATTENTION, add_lora
from paligemma import PaliGemma, PaliGemmaConfig
from train import TRAINABLE, SuffixLossSum, count_targets

REAL_TEXT = dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1, head_dim=256)
REAL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14, image_size=224)
LORA_TARGETS = rf".*language_model.*\.({'|'.join(ATTENTION)})"  # peft's: the decoder's q/k/v/o, not SigLIP's
PRESETS = {  # (text config, vision config, vocabulary)
    "tiny": (dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=64),
             dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3, patch_size=14,
                  image_size=224), 4096),
    "cpu": (REAL_TEXT | dict(num_hidden_layers=2), REAL_VISION | dict(num_hidden_layers=2), 257216),
    "full": (REAL_TEXT | dict(num_hidden_layers=18), REAL_VISION | dict(num_hidden_layers=27), 257216),
}
# text tokens in the prompt (with <bos> and "\n"), in a training suffix; tokens decoded
PROMPT, SUFFIX, NEW_TOKENS = 10, 16, 64


def make_checkpoint(folder: Path, preset: str, dtype: torch.dtype) -> transformers.PaliGemmaConfig:
    text, vision, vocab = PRESETS[preset]
    config = transformers.PaliGemmaConfig(
        text_config=dict(vocab_size=vocab, **text), vision_config=dict(vision_use_head=False, **vision),
        image_token_index=vocab - 64, projection_dim=text["hidden_size"], hidden_size=text["hidden_size"],
        vocab_size=vocab)
    torch.manual_seed(0)
    transformers.PaliGemmaForConditionalGeneration(config).to(dtype).save_pretrained(folder)
    return config


def make_batch(config, batch: int, suffix: int, device) -> dict[str, torch.Tensor]:
    """Image tokens, <bos>, a prompt of random tokens and "\\n"; with a suffix, its token types and labels."""
    g = torch.Generator().manual_seed(batch)
    n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    text = torch.randint(4, config.image_token_index, (batch, PROMPT + suffix), generator=g)
    text[:, 0] = 2
    ids = torch.cat([torch.full((batch, n_image), config.image_token_index), text], 1)
    types = torch.zeros_like(ids)
    types[:, ids.shape[1] - suffix:] = 1
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types,
               pixel_values=torch.rand(batch, 3, config.vision_config.image_size, config.vision_config.image_size,
                                       generator=g) * 2 - 1)
    if suffix:
        out["labels"] = ids.masked_fill(types == 0, -100)
    return {k: v.to(device) for k, v in out.items()}


def load(side: str, folder: Path, dtype, device):
    if side == "ours":
        model = PaliGemma.from_pretrained(folder, dtype=dtype, device=device)
        model.config.eos_token_id = -1  # decode all NEW_TOKENS, as min_new_tokens does for transformers
        return model
    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()


def prefill(side, model, batch):
    """One forward pass over image + prompt; the next-token logits only, as generation needs."""
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")}
    if side == "ours":
        return model.language_model.logits(model.hidden_states(**inputs)[:, -1])
    return model(**inputs, logits_to_keep=1).logits


def generate(side, model, batch, new_tokens, compiled=False):
    """Greedy generation of exactly new_tokens. compiled: for transformers, its documented way to compile
    generation (a static cache, with which generate compiles the forward pass itself); ours is compiled
    by replacing model.decode_step once (see main)."""
    if side == "ours":
        return model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                              max_new_tokens=new_tokens)
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")}
    if compiled:
        compile_config = transformers.CompileConfig()
        compile_config._compile_all_devices = True  # generate compiles on GPUs only, unless told
        inputs |= dict(cache_implementation="static", compile_config=compile_config)
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def trainer(side, model, dtype, device, mode="attn"):
    """A training step (forward, backward, AdamW) for either model, set up alike. attn: the decoder's
    q/k/v/o in float32 and trainable, everything else frozen; lora: rank-8 adapters on q/k/v/o (ours, or
    peft's on transformers'), the base frozen. Autocast to `dtype`."""
    if mode == "lora" and side == "ours":
        add_lora(model, rank=8, alpha=16)
    elif mode == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS))
    else:
        learns = TRAINABLE["attn"] if side == "ours" else \
            lambda name: ".language_model.layers." in name and ".self_attn." in name
        for name, p in model.named_parameters():
            p.requires_grad_(learns(name))
            if p.requires_grad:
                p.data = p.data.float()
    loss_model = SuffixLossSum(model) if side == "ours" else model
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
    return step, sum(p.numel() for p in params)


def train_memory(side, folder, dtype, device, batch_size, mode) -> float:
    """Peak memory (GiB) during two training steps, in a fresh process that has loaded only one side."""
    model = load(side, folder, dtype, device)
    step, _ = trainer(side, model, dtype, device, mode)
    batch = make_batch(transformers.PaliGemmaConfig.from_pretrained(folder), batch_size, SUFFIX, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts from the current RSS
    for _ in range(2):
        step(batch)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 2**20


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
    """Ten large matrix-vector products, and the bytes of matrix they read: the rate at which weights can
    be read from memory, which bounds batch-1 decoding."""
    n = 8192 if device.type == "cpu" else 32768
    w, x = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, device=device, dtype=dtype)
    return (lambda: [w @ x for _ in range(10)]), 10 * w.numel() * w.element_size()


# PaliGemma 2's decoders (the vision tower is SigLIP So400m in all); 28B's queries scale by 144**-0.5
PALIGEMMA2 = {"paligemma2-3b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                    num_attention_heads=8, num_key_value_heads=4, head_dim=256),
              "paligemma2-10b": dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                     num_attention_heads=16, num_key_value_heads=8, head_dim=256),
              "paligemma2-28b": dict(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                                     num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                     query_pre_attn_scalar=144)}


def memory_per_process(model: PaliGemma, mode: str, processes: int, fsdp: bool, batch: int = 8,
                       tokens: int = 280) -> dict[str, float]:
    """GB a training process holds, from the model's shapes: frozen weights in bfloat16 (2 bytes each);
    trainable ones in float32 with their gradients and AdamW's two moments (16 bytes each); under FSDP
    all of it divided by the processes, plus one decoder layer gathered whole twice (the one running and
    the one prefetched); and activations, estimated as 34 x hidden bytes per token and decoder layer
    (Korthikanti et al., 2022, with memory-efficient attention; the frozen vision tower keeps none)."""
    learns = (lambda name: ".lora_" in name) if mode == "lora" else TRAINABLE["attn"]
    frozen = sum(p.numel() for n, p in model.named_parameters() if not learns(n))
    trainable = sum(p.numel() for n, p in model.named_parameters() if learns(n))
    state = 2 * frozen + 16 * trainable
    layer = model.language_model.layers[0]
    gathered = sum((4 if learns(f"language_model.layers.0.{n}") else 2) * p.numel()
                   for n, p in layer.named_parameters())
    text = model.config.text_config
    activations = 34 * text.hidden_size * batch * tokens * text.num_hidden_layers
    return dict(state=(state / processes + 2 * gathered if fsdp else state) / 1e9, activations=activations / 1e9)


def memory_table():
    """The README's table: GB per GPU for fine-tuning PaliGemma 2 at batch 8 per GPU, 224 px (~280 tokens)."""
    print("GB per GPU: weights, gradients and optimizer state + activations (estimated), batch 8, 224 px")
    print(f"{'':34} {'DDP, any':>10} " + " ".join(f"{f'FSDP {n}':>9}" for n in (2, 4, 8)))
    for name, text in PALIGEMMA2.items():
        config = PaliGemmaConfig(text_config=GemmaConfig(**text, post_norms=True, attn_logit_softcapping=50.0,
                                                         final_logit_softcapping=30.0))
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: full on a GPU, cpu on a CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each measurement and side")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding of both sides (ours: decode_step; transformers: static cache)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bfloat16 peak, for MFU (H100/H200: 989)")
    p.add_argument("--memory-table", action="store_true",
                   help="print the memory per GPU of fine-tuning PaliGemma 2, computed from the shapes, and stop")
    args = p.parse_args()
    if args.memory_table:
        return memory_table()
    device = torch.device(args.device)
    preset = args.preset or ("full" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_grad_enabled(False)
    rows = []  # (what, ours, transformers)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = make_checkpoint(folder, preset, dtype)
        sides = ("ours", "transformers")
        t = alternate({s: lambda s=s: load(s, folder, dtype, device) for s in sides}, args.repeat, device)
        rows.append(("load (s)", t["ours"], t["transformers"]))
        models = {s: load(s, folder, dtype, device) for s in sides}
        if args.compile:
            models["ours"].decode_step = torch.compile(models["ours"].decode_step)

        for b in (1, 8):
            batch = make_batch(config, b, 0, device)
            t = alternate({s: lambda s=s: prefill(s, models[s], batch) for s in sides}, args.repeat, device)
            rows.append((f"prefill, batch {b} (s)", t["ours"], t["transformers"]))
        decode, generated = {}, {}  # tokens/s of the decoding steps alone; of the whole generate call
        for b in (1, 8):
            batch = make_batch(config, b, 0, device)
            fns = {(s, n): lambda s=s, n=n: generate(s, models[s], batch, n, args.compile)
                   for s in sides for n in (1, NEW_TOKENS)}
            if b == 1:  # the memory-bandwidth bound, timed in turns with the decoding it bounds
                fns["matvec", 1], matvec_bytes = matvecs(device, dtype)
                if args.compile:  # and what a user of transformers gets by default
                    fns |= {("default", n): lambda n=n: generate("transformers", models["transformers"], batch, n)
                            for n in (1, NEW_TOKENS)}
            t = alternate(fns, args.repeat, device)
            if b == 1:
                bw = matvec_bytes / t.pop(("matvec", 1))
            generated[b] = {s: b * NEW_TOKENS / t[s, NEW_TOKENS] for s, n in t if n == NEW_TOKENS}
            # Generating 1 token is the prefill and the first token; the difference is NEW_TOKENS - 1 steps.
            decode[b] = {s: b * (NEW_TOKENS - 1) / (t[s, NEW_TOKENS] - t[s, 1]) for s, n in t if n == NEW_TOKENS}
            rows.append((f"generate {NEW_TOKENS} tokens, batch {b} (tokens/s)",
                         generated[b]["ours"], generated[b]["transformers"]))
            rows.append(("  its decoding steps alone (tokens/s)", decode[b]["ours"], decode[b]["transformers"]))
            if "default" in generated[b]:
                rows.append(("  generate vs transformers' default (eager)", generated[b]["ours"],
                             generated[b]["default"]))
                rows.append(("  decoding steps vs transformers' default", decode[b]["ours"], decode[b]["default"]))

        torch.set_grad_enabled(True)
        batch = make_batch(config, 8, SUFFIX, device)
        what = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS"
        n_trainable, train_time = {}, {}
        for mode, name in (("attn", "attention-only"), ("lora", "LoRA r=8 q/k/v/o")):
            steps = {}
            for s in sides:
                if s not in models:  # freed after the attention-only row: LoRA starts from the checkpoint again
                    models[s] = load(s, folder, dtype, device)
                steps[s], n_trainable[mode] = trainer(s, models[s], dtype, device, mode)
            t = train_time[mode] = alternate({s: lambda s=s: steps[s](batch) for s in sides}, args.repeat, device)
            rows.append((f"{name} train step, batch 8 (s)", t["ours"], t["transformers"]))
            models.clear(), steps.clear()  # free both models before the memory measurements
            memory = {}
            for s in sides:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    memory[s] = pool.submit(train_memory, s, folder, dtype, device, 8, mode).result()
            rows.append((f"  its {what} (GiB)", memory["ours"], memory["transformers"]))

    print(f"\npreset {preset} ({dtype}, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}); medians of {args.repeat}"
          + (", compiled" if args.compile else ""))
    print(f"{'':48} {'ours':>12} {'transformers':>13} {'ours/theirs':>12}")
    for what, ours, theirs in rows:
        print(f"{what:48} {ours:12.4g} {theirs:13.4g} {ours / theirs:11.2f}x")

    # The memory-bandwidth limit of decoding at batch 1: every decoder weight and the output head once per token.
    text = config.text_config
    per_layer = text.hidden_size * text.head_dim * (2 * text.num_attention_heads + 2 * text.num_key_value_heads) \
        + 3 * text.hidden_size * text.intermediate_size + 2 * text.hidden_size
    weight_bytes = (text.num_hidden_layers * per_layer + text.vocab_size * text.hidden_size) \
        * torch.finfo(dtype).bits // 8
    limit = bw / weight_bytes
    print(f"\nweights read per decoded token: {weight_bytes / 2**30:.2f} GiB; measured bandwidth {bw / 1e9:.1f} GB/s "
          f"-> limit {limit:.1f} tokens/s at batch 1. Decoding steps reach: ours {decode[1]['ours'] / limit:.0%}, "
          f"transformers {decode[1]['transformers'] / limit:.0%}; whole generate calls (with the prefill): "
          f"ours {generated[1]['ours'] / limit:.0%}, transformers {generated[1]['transformers'] / limit:.0%}")
    print(f"trainable parameters: attention only {n_trainable['attn']:,}, LoRA {n_trainable['lora']:,}")
    with torch.device("meta"):  # the whole paligemma-3b-pt-224 (default config), built without memory
        full = PaliGemma(PaliGemmaConfig())
    n_base = sum(p.numel() for p in full.parameters())
    n_lora = sum(full.get_parameter(name).numel() for name in add_lora(full, rank=8, alpha=16))
    print(f"paligemma-3b-pt-224 with LoRA r=8 on q/k/v/o: {n_lora:,} trainable parameters, adapter file "
          f"{n_lora * 4 / 2**20:.1f} MiB (float32); the model has {n_base:,}")
    if device.type == "cuda":
        n_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        tokens = 8 * (n_image + PROMPT + SUFFIX)
        decoder = text.num_hidden_layers * per_layer
        v = config.vision_config
        vision = v.num_hidden_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
        # forward everywhere; backward: input gradients through the decoder, weight gradients of attention only
        flops = 2 * 8 * n_image * vision + 4 * tokens * decoder + 2 * tokens * n_trainable["attn"]
        mfu = flops / train_time["attn"]["ours"] / (args.peak_tflops * 1e12)
        print(f"train step model-FLOPs utilisation (ours, approximate): {mfu:.1%} of {args.peak_tflops:g} TFLOPS")


if __name__ == "__main__":
    main()
