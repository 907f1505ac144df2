"""Weight formats of linear layers: one file each, and this registry, the one place that knows them.

    format  file     bits a weight    for                       its layers' product
    nf4     nf4.py   4.13             QLoRA: the frozen base    dequantized, then a matmul
    int8    int8.py  8 (+ a scale)    decoding: half of bf16's  torch's int8 weight-only kernel
    int4    int4.py  4 (+ 2 / group)  decoding: a quarter       torch's int4 kernel (tinygemm, CUDA)

Each format is a module class with `fits(in, out)` (whether its kernel takes the widths),
`state(weight name, weight)` (the layer's tensors, quantized from the full-precision weight as it is
read) and `forward`. A new format is one file and one row of FORMATS.

`quantize_linears` replaces, in a model on the meta device, the linear layers a format takes by its
empty modules, for PaliGemma.from_pretrained to fill as it reads the checkpoint; `add_output_head`
gives int8 and int4 models a quantized copy of the output head, which is tied to the embedding (the
lookup keeps the embedding as it is). nf4 takes every linear layer (SigLIP's, the projector, the
decoder's); int8 and int4 the decoder's layers and the head, which decoding reads at every token. A
layer whose widths a format's kernel cannot take stays in the next format that can (int4 -> int8),
and `describe` says how many layers are in which.

What it is not: checkpoints. A saved checkpoint keeps the full-precision weights it was read from
(checkpoint.py); a quantized model is quantized again as it is loaded. Imports torch only.
"""

from collections import Counter

from torch import nn

from int4 import Int4Linear
from int8 import Int8Linear
from nf4 import NF4Linear

FORMATS = {"nf4": NF4Linear, "int8": Int8Linear, "int4": Int4Linear}
QUANTIZED = tuple(FORMATS.values())  # the modules a checkpoint saves from their source's weights
FALLBACK = {"int4": "int8"}  # where a layer goes whose widths a format's kernel cannot take
LAYERS = {  # the layers a format takes, by name
    "nf4": lambda name: True,
    "int8": lambda name: name.startswith("language_model.layers."),
    "int4": lambda name: name.startswith("language_model.layers."),
}


def quantize_linears(model: nn.Module, format: str, dtype_of, keep=None,
                     device="cpu") -> dict[str, nn.Module]:
    """Replaces the linear layers of a model on the meta device that `format` takes (LAYERS), but
    those `keep(name)` keeps, by that format's empty modules (or its fallback's, where its kernel
    cannot take the widths), of the dtype `dtype_of(weight name)`; returns them by their weights'
    names, for a loader to fill (module.state) as it reads the weights onto `device`."""
    if format not in FORMATS:
        raise ValueError(f"quantize must be one of {', '.join(FORMATS)}, not {format!r}")
    layers = {}
    for name, m in list(model.named_modules()):
        kept = keep is not None and keep(name)
        if type(m) is not nn.Linear or not LAYERS[format](name) or kept:
            continue
        kind = format
        while not FORMATS[kind].fits(m.in_features, m.out_features):
            kind = FALLBACK[kind]
        options = dict(runs_on=str(device)) if kind == "int4" else {}
        layer = FORMATS[kind](m.in_features, m.out_features, m.bias is not None,
                              dtype_of(f"{name}.weight"), "meta", **options)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        layers[f"{name}.weight"] = layer
    return layers


def add_output_head(model: nn.Module, format: str):
    """int8 and int4: the output head (the embedding, transposed) gets a quantized copy of its own,
    which Gemma.logits uses; the embedding lookup keeps the embedding. The copy is not saved (its
    buffers are not in the state dict): it is made again from the embedding at every load."""
    if format not in ("int8", "int4"):
        return
    lm = model.language_model
    embedding = lm.embed_tokens.weight  # (V, D)
    vocab, hidden = embedding.shape
    kind = format if FORMATS[format].fits(hidden, vocab) else FALLBACK[format]
    options = dict(runs_on=str(embedding.device)) if kind == "int4" else {}
    head = FORMATS[kind](hidden, vocab, False, embedding.dtype, embedding.device, persistent=False,
                         **options)
    # "head.weight", "head.scales", ...
    for key, value in head.state("head.weight", embedding).items():
        setattr(head, key.rpartition(".")[2], value)
    lm.head = head


def describe(model: nn.Module) -> str:
    """How many linear layers are in which format, e.g. "int4: 127 layers, bfloat16: 110 layers"."""
    def kind(m):
        return m.name if isinstance(m, QUANTIZED) else str(m.weight.dtype).removeprefix("torch.")
    counts = Counter(kind(m) for m in model.modules() if isinstance(m, (nn.Linear, *QUANTIZED)))
    return ", ".join(f"{kind}: {n} layers" for kind, n in counts.most_common())
