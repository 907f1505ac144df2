"""LoRA for PaliGemma (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021), in
PEFT's files.

A frozen linear layer W learns through a low-rank update instead of its own weights:

    y = W x + s * B(A(dropout(x)))     A (r, in): Kaiming-uniform
                                       B (out, r): zeros, so training starts at W
                                       s = alpha / r, or alpha / sqrt(r) with rsLoRA
                                           (Kalajdzievski, 2023)

add_lora     wraps the language model's linear layers named in `targets` (q/k/v/o by default;
             SigLIP's q/k/v_proj are left alone) and freezes everything else
adapter_config, adapter_state
             what PEFT writes in adapter_config.json and adapter_model.safetensors
             (checkpoint.save_adapter writes the files), which transformers + peft (and vLLM) load
             onto the official checkpoint
load_adapter reads such a folder, also one written by peft itself or under transformers <= 4.51's
             names
merge_lora   folds s * B @ A into W and removes the wrappers: a plain PaliGemma again

The adapters' parameters keep PEFT's names (`q_proj.lora_A.weight`); the wrapped layer becomes
`q_proj.base_layer`, as in PEFT, and merge_lora puts it back. The frozen layer may be stored in 4
bits (nf4.py: QLoRA). Shape letters: r rank, in/out the layer's features.
Imports torch and safetensors only.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
RANK, ALPHA, DROPOUT = 8, 16.0, 0.0  # the defaults (PEFT's are 8, 8 and 0): r=8 on q/k/v/o, scale 2
# PEFT prefixes its keys with base_model.model. and then transformers' module names, which are ours
# below `model.` since transformers 4.52; before, the language model was language_model.model.
PEFT_NAMES = {"base_model.model.model.language_model.": "language_model.",
              "base_model.model.language_model.model.": "language_model.",  # transformers <= 4.51
              "base_model.model.model.vision_tower.vision_model.": "vision_tower.",
              "base_model.model.model.vision_tower.": "vision_tower.",
              "base_model.model.vision_tower.vision_model.": "vision_tower."}


class LoRALinear(nn.Module):
    """A frozen linear layer (`base_layer`: an nn.Linear, or nf4.NF4Linear for QLoRA) with a
    trainable low-rank update beside it."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = alpha / (math.sqrt(rank) if rslora else rank)
        self.dropout = nn.Dropout(dropout)
        device = base.weight.device  # NF4Linear's weight: its packed codes
        float32 = dict(bias=False, device=device, dtype=torch.float32)
        self.lora_A = nn.Linear(self.in_features, rank, **float32)  # (r, in)
        self.lora_B = nn.Linear(rank, self.out_features, **float32)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        # x in the adapters' dtype; under autocast, in autocast's: a cast there would keep one more
        # copy of x for backward per layer
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x)))
        return (y + update * self.scale).to(y.dtype)


def _is_linear(m: nn.Module) -> bool:
    """An nn.Linear, or a layer that computes like one (nf4.NF4Linear), not yet wrapped."""
    linear = hasattr(m, "in_features") and hasattr(m, "out_features")
    return linear and not isinstance(m, LoRALinear)


def _wrap(model: nn.Module, name: str, **lora) -> LoRALinear:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    wrapped = LoRALinear(getattr(parent, child), **lora)
    setattr(parent, child, wrapped)
    return wrapped


def add_lora(model: nn.Module, rank: int = RANK, alpha: float = ALPHA, targets=ATTENTION,
             dropout: float = DROPOUT, rslora: bool = False) -> list[str]:
    """Wraps the language model's linear layers whose names end in one of `targets` and freezes
    every other parameter; returns the names of the trainable tensors (each layer's lora_A and
    lora_B)."""
    if unknown := set(targets) - set(ATTENTION + MLP):
        raise ValueError(f"LoRA targets {sorted(unknown)}: the decoder's linear layers are "
                         f"{', '.join(ATTENTION + MLP)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, not {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if n.startswith("language_model.")
             and _is_linear(m) and n.rpartition(".")[2] in targets]
    for name in names:
        _wrap(model, name, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora)
    return [n for n, p in model.named_parameters() if ".lora_" in n]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_config(model: nn.Module, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it, for the model's LoRA layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (add_lora or load_adapter adds them)")
    first = next(iter(layers.values()))
    targets = sorted({name.rpartition(".")[2] for name in layers})
    return dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
                r=first.rank, lora_alpha=first.alpha, use_rslora=first.rslora,
                lora_dropout=first.dropout.p, bias="none",
                target_modules=f".*language_model.*\\.({'|'.join(targets)})", fan_in_fan_out=False,
                use_dora=False, modules_to_save=None, init_lora_weights=True, inference_mode=True)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's names (transformers >= 4.52), in float32."""
    to_peft = {"language_model.": "base_model.model.model.language_model.",
               "vision_tower.": "base_model.model.model.vision_tower."}
    state = {}
    for name, p in model.named_parameters():
        if ".lora_" in name:
            prefix = next(p for p in to_peft if name.startswith(p))
            state[to_peft[prefix] + name[len(prefix):]] = p.detach().float().contiguous()
    return state


def read_adapter_config(folder) -> dict:
    """adapter_config.json of a folder, checked to be a LoRA that this file implements."""
    path = Path(folder) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} holds no adapter (no adapter_config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply to be an adapter's config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, not {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    base = config.get("base_model_name_or_path")
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise ValueError(f"{path}: base_model_name_or_path is {json.dumps(base)}, not the name of "
                         "a model")
    unsupported = {"bias": "none", "use_dora": False, "fan_in_fan_out": False,
                   "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                   "layers_to_transform": None}
    for key, plain in unsupported.items():
        if config.get(key, plain) not in (plain, []):  # peft writes [] or null for "all layers"
            raise ValueError(f"{path}: {key} = {config[key]!r} is not supported (only plain LoRA: "
                             f"{key} = {plain!r})")
    if not isinstance(config.get("r"), int) or config["r"] < 1 \
            or not isinstance(config.get("lora_alpha"), (int, float)):
        raise ValueError(f"{path}: r must be an integer >= 1 and lora_alpha a number")
    return config


def adapter_base(folder) -> str:
    """The base model an adapter folder records (its base_model_name_or_path)."""
    if not (base := read_adapter_config(folder).get("base_model_name_or_path")):
        raise ValueError(f"{Path(folder) / 'adapter_config.json'} names no base model "
                         "(base_model_name_or_path): write it there, or apply the adapter to a "
                         "base you name (infer.py --model BASE --adapter)")
    return base


def load_adapter(model: nn.Module, folder) -> list[str]:
    """Applies the adapter in `folder` (PEFT's format) to `model`, strictly: every tensor must
    belong to a linear layer of the model, with its shape, and every adapted layer must get both A
    and B. Wraps exactly the layers the file adapts; returns the names of the adapters' tensors."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    file = folder / "adapter_model.safetensors"
    tensors = {}
    try:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as e:  # missing, truncated or not safetensors
        raise ValueError(f"{file}: cannot be read ({e})") from None
    modules = dict(model.named_modules())
    layers, bad = {}, []  # our layer name -> {"lora_A": tensor, "lora_B": tensor}
    for key, tensor in tensors.items():
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        prefix = next((p for p in PEFT_NAMES if key.startswith(p)), None)
        name = m and prefix and PEFT_NAMES[prefix] + m.group(1)[len(prefix):]
        if not (_is_linear(modules.get(name)) or isinstance(modules.get(name), LoRALinear)):
            bad.append(key)
            continue
        layers.setdefault(name, {})[m.group(2)] = tensor
    if bad:
        raise ValueError(f"{file}: {len(bad)} tensor(s) match no linear layer of the model: "
                         f"{', '.join(bad[:5])}")
    for name, pair in layers.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{file}: {name} has {' and '.join(pair)} but not both lora_A and "
                             "lora_B")
        layer = modules[name]
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{name} has a LoRA adapter already; merge_lora it first")
        rank = config["r"]
        expected = {"lora_A": (rank, layer.in_features), "lora_B": (layer.out_features, rank)}
        for which, tensor in pair.items():
            if tuple(tensor.shape) != expected[which]:
                raise ValueError(f"{file}: {name}.{which} has shape {list(tensor.shape)}, expected "
                                 f"{list(expected[which])} (rank {rank})")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, pair in layers.items():
        wrapped = _wrap(model, name, rank=config["r"], alpha=config["lora_alpha"],
                        dropout=config.get("lora_dropout", 0.0),
                        rslora=config.get("use_rslora", False))
        with torch.no_grad():
            wrapped.lora_A.weight.copy_(pair["lora_A"])
            wrapped.lora_B.weight.copy_(pair["lora_B"])
    return [n for n, p in model.named_parameters() if ".lora_" in n]


@torch.no_grad()
def merged_weight(layer: LoRALinear, weight: torch.Tensor) -> torch.Tensor:
    """W + s * B @ A for the frozen weight W (out, in) of `layer`, computed in float32, in W's
    dtype."""
    delta = layer.lora_B.weight.float() @ layer.lora_A.weight.float() * layer.scale  # (out, in)
    return (weight.float() + delta.to(weight.device)).to(weight.dtype)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """W + s * B @ A, computed in float32, in place of every LoRA layer (a plain nn.Linear again). A
    4-bit base layer is refused: its weights are not the original ones (load the base in full
    precision and apply the adapter to it first, as train.py --merge does)."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if not isinstance(base, nn.Linear):
            raise ValueError(f"{name} is a {type(base).__name__}: LoRA merges into full-precision "
                             "weights only")
        base.weight = nn.Parameter(merged_weight(layer, base.weight), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    return model
