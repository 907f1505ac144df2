r"""PaliGemma: a SigLIP vision tower, a linear projector and a Gemma decoder.

PaliGemma (Beyer et al., "PaliGemma: A versatile 3B VLM for transfer", 2024) reads an image and a
text prompt (the *prefix*) and writes text (the *suffix*):

    image (B, 3, 224, 224) --SigLIP (siglip.py)--> (B, 256, 1152) --multi_modal_projector--> (B, 256, 2048)
                                                                                  |
    tokens:  <image> x 256   <bos> prefix "\n"   suffix <eos>                      v  written into the
             \_______________ prefix: full attention ____/ \_ causal _/     <image> positions
                                        |
                                        v
                              Gemma decoder (gemma.py) --> logits (B, T, 257216)

This file holds what is PaliGemma-specific: the configuration read from a checkpoint's
`config.json`, the merge of image features into the token embeddings (image features are *not*
scaled by sqrt(hidden), text embeddings are), the prefix-LM attention mask, 1-based positions,
strict loading of the Hugging Face safetensors, and the processor (image preprocessing and the
prompt's token layout) with its SentencePiece tokenizer.

What it is not: a training loop (train.py) or a command-line tool (infer.py).
"""

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from PIL import Image
from safetensors import safe_open
import torch.nn.functional as F
from torch import nn

from gemma import Gemma, GemmaConfig, KVCache
from siglip import SiglipConfig, SiglipVisionModel


# ----------------------------------------------------------------------------------------------
# Configuration


def _dataclass_from_dict(cls, d: dict):
    """Fills the fields of `cls` found in `d`; every other key of a transformers config is ignored."""
    return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


GEMMA2_DEFAULTS = dict(query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096)


@dataclass
class PaliGemmaConfig:
    vision_config: SiglipConfig = field(default_factory=SiglipConfig)
    text_config: GemmaConfig = field(default_factory=GemmaConfig)
    image_token_index: int = 257152  # <image>, the first id after the 257152 SentencePiece pieces
    pad_token_id: int = 0  # what generate writes after <eos>
    eos_token_id: int = 1  # where generate stops a row

    @classmethod
    def from_json(cls, path) -> "PaliGemmaConfig":
        d = json.loads(Path(path).read_text())
        text = dict(d.get("text_config", {}))
        text.setdefault("rope_theta", text.get("rope_parameters", {}).get("rope_theta", GemmaConfig.rope_theta))
        if text.get("model_type") == "gemma2":  # PaliGemma 2; absent fields take transformers' Gemma2Config defaults
            text = GEMMA2_DEFAULTS | {"layer_types": [("sliding_attention", "full_attention")[i % 2] for i in
                                                      range(text.get("num_hidden_layers", GemmaConfig.num_hidden_layers))]} | text
            text["post_norms"] = True
        return cls(
            vision_config=_dataclass_from_dict(SiglipConfig, d.get("vision_config", {})),
            text_config=_dataclass_from_dict(GemmaConfig, text),
            **{k: d[k] for k in ("image_token_index", "pad_token_id", "eos_token_id") if k in d},
        )


# ----------------------------------------------------------------------------------------------
# The model


def prefix_lm_mask(attention_mask: torch.Tensor, token_type_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor:
    """PaliGemma's attention mask, in big_vision's formulation.

    attention_mask (B, T): 1 for real tokens, 0 for padding.
    token_type_ids (B, T): 0 for the prefix (image tokens, <bos>, prompt, "\\n"), 1 for the suffix.
    Returns (B, 1, T, T) bool, True where query i may attend to key j.

    Every suffix token starts a new causal step; the prefix is step 0. A query sees the keys whose step
    is not later than its own: the prefix sees all of the prefix (bidirectional), a suffix token sees
    the prefix and the suffix up to itself (causal). Padding is never attended to.

    With a sliding window (Gemma 2's local layers, as transformers has them), causal attention reaches
    back fewer than `sliding_window` positions, while the prefix still sees all of itself.
    """
    step = token_type_ids.cumsum(-1)  # (B, T)
    visible = step[:, None, :] <= step[:, :, None]  # (B, T_query, T_key)
    if sliding_window is not None:
        i = torch.arange(step.shape[1], device=step.device)
        in_prefix = step == 0
        visible &= (i[:, None] - i[None, :] < sliding_window) | (in_prefix[:, :, None] & in_prefix[:, None, :])
    return (visible & attention_mask.bool()[:, None, :])[:, None]


class PaliGemma(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.multi_modal_projector = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.language_model = Gemma(config.text_config)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, D) with the projected image features in the <image> positions."""
        is_image = input_ids == self.config.image_token_index  # (B, T)
        x = self.language_model.embed(input_ids.masked_fill(is_image, 0))  # <image> may lie outside the vocabulary
        weight = self.multi_modal_projector.weight
        features = self.multi_modal_projector(self.vision_tower(pixel_values.to(weight.dtype)))  # (B, N, D)
        if is_image.sum() != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} <image> tokens, but {features.shape[0]} image(s) give "
                f"{features.shape[0]} x {features.shape[1]} features: each prompt needs one image and "
                f"{features.shape[1]} <image> tokens (use the Processor to build input_ids)"
            )
        return x.masked_scatter(is_image[..., None], features.to(x.dtype))  # patches in row-major order

    def masks(self, attention_mask, token_type_ids) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The prefix-LM mask, and its sliding-window variant when the decoder has one (PaliGemma 2).
        None and None when every token may see every token (no padding, no suffix, no window reached)."""
        window = self.config.text_config.sliding_window
        T = attention_mask.shape[1]
        if attention_mask.all() and not token_type_ids.any() and (window is None or T <= window):
            return None, None
        return (prefix_lm_mask(attention_mask, token_type_ids),
                None if window is None else prefix_lm_mask(attention_mask, token_type_ids, window))

    def hidden_states(self, input_ids, pixel_values, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """The decoder's final hidden states (B, T, D), before the output head."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:  # no suffix: the whole input is the prefix
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embed(input_ids, pixel_values)
        positions = attention_mask.long().cumsum(-1)  # 1-based as in transformers, and left padding is skipped
        mask, sliding_mask = self.masks(attention_mask, token_type_ids)
        return self.language_model(x, positions, mask, sliding_mask=sliding_mask)

    def forward(self, input_ids, pixel_values, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """input_ids (B, T), pixel_values (B, 3, H, W), attention_mask and token_type_ids (B, T) -> logits (B, T, vocab)."""
        return self.language_model.logits(self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids))

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values, attention_mask=None, max_new_tokens: int = 64,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> torch.Tensor:
        """Continues each (left-padded) prompt; returns the new token ids (B, n), n <= max_new_tokens.

        The image is encoded once and the whole prompt (all prefix: bidirectional) is prefilled into the
        KV-cache in one pass; then one token per step attends to everything before it. A row that has
        written <eos> gets <pad> from then on, and the loop ends when every row has. Greedy when
        temperature is 0; otherwise sampled after temperature, top-k and top-p, reproducibly given a seed.
        """
        B, T = input_ids.shape
        max_len = self.config.text_config.max_position_embeddings
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
        if T + max_new_tokens > max_len:
            raise ValueError(f"the prompt is {T} tokens long and {max_new_tokens} new tokens are asked for: "
                             f"together more than the model's {max_len} positions")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm, device = self.language_model, input_ids.device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        x = self.embed(input_ids, pixel_values)  # (B, T, D)
        S = T + max_new_tokens - 1  # cache slots: the prompt, then every new token but the last (never fed)
        cache = KVCache(lm.config, B, S, x.dtype, device)
        masks = self.masks(attention_mask, torch.zeros_like(input_ids))  # (B, 1, T, T) or None: the prompt is all prefix
        mask, sliding_mask = (None if m is None else F.pad(m, (0, S - T)) for m in masks)  # (B, 1, T, S)
        positions = attention_mask.long().cumsum(-1)  # (B, T)
        h = lm(x, positions, mask, cache, torch.arange(T, device=device), sliding_mask)
        logits = lm.logits(h[:, -1])  # (B, vocab): the head only where the next token is read
        # Cache slots holding keys to attend to: the prompt's real tokens, then every generated token.
        visible = F.pad(attention_mask.bool(), (0, S - T), value=True)  # (B, S)
        position, slot = positions[:, -1:], torch.tensor([T - 1], device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            token = sample(logits.float(), temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(done, self.config.pad_token_id)
            out.append(token)
            done |= token == self.config.eos_token_id
            if done.all() or step == max_new_tokens - 1:
                break
            position, slot = position + 1, slot + 1
            logits = self.decode_step(token, position, slot, visible, cache)
        return torch.stack(out, dim=1)

    def decode_step(self, token, position, slot, visible, cache: KVCache) -> torch.Tensor:
        """One new token per row: token (B,), position (B, 1), its cache slot (1,), visible slots (B, S)
        -> next-token logits (B, vocab). Shapes do not change from step to step, so that
        `model.decode_step = torch.compile(model.decode_step)` compiles it once."""
        lm = self.language_model
        slots = torch.arange(visible.shape[1], device=visible.device)
        mask = (visible & (slots <= slot))[:, None, None, :]  # (B, 1, 1, S): the slots written so far
        window = lm.config.sliding_window
        sliding_mask = None if window is None else mask & (slot - slots < window)
        return lm.logits(lm(lm.embed(token[:, None]), position, mask, cache, slot, sliding_mask)[:, -1])

    @classmethod
    def from_pretrained(cls, name_or_dir, dtype: torch.dtype = torch.float32, device="cpu") -> "PaliGemma":
        """Loads a Hugging Face-format checkpoint from a local folder or a hub id, strictly.

        Every tensor the model needs must be in the checkpoint with the right shape, and nothing else may
        be there but the unused pooling head and the tied lm_head. Tensors are read one at a time and
        converted straight to `dtype` on `device`.
        """
        folder = resolve_checkpoint(name_or_dir, ["config.json", "*.safetensors", "model.safetensors.index.json"])
        config = PaliGemmaConfig.from_json(folder / "config.json")
        with torch.device("meta"):  # no memory is allocated until the weights are read
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {}  # our name -> (file, checkpoint key, shape)
        for file, keys in _checkpoint_files(folder).items():
            with safe_open(file, framework="pt") as f:
                for key in keys:
                    if not _our_name(key).startswith(UNUSED_PREFIXES):
                        found[_our_name(key)] = (file, key, tuple(f.get_slice(key).get_shape()))
        missing = sorted(expected.keys() - found.keys())
        unexpected = sorted(found[n][1] for n in found.keys() - expected.keys())
        wrong = sorted(f"{found[n][1]} {list(found[n][2])} (expected {list(expected[n])})"
                       for n in found.keys() & expected.keys() if found[n][2] != expected[n])
        problems = [f"{what}: {_listing(names)}" for what, names in
                    (("missing tensors", missing), ("unexpected tensors", unexpected), ("wrong shapes", wrong)) if names]
        if problems:
            raise ValueError(f"checkpoint {folder} does not match its config.json: " + "; ".join(problems))
        model.load_state_dict(read_tensors(folder, expected.keys(), dtype, device), strict=True, assign=True)
        return model.eval()


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator=None) -> torch.Tensor:
    """(B, vocab) -> (B,). Greedy at temperature 0; else temperature first, then top-k, then top-p (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def parse_detections(text: str, width: int, height: int) -> list[tuple[tuple[float, float, float, float], str]]:
    """`<locY1><locX1><locY2><locX2> label ; ...` -> [((x1, y1, x2, y2) in pixels, label)].

    Coordinates are in 1024ths of the image's height (y) and width (x), y first. Whatever cannot be read
    as four loc tokens and a label is skipped; segmentation tokens after a box are ignored.
    """
    detections = []
    for m in DETECTION.finditer(text):
        y1, x1, y2, x2 = (int(v) / 1024 for v in m.groups()[:4])
        if y2 > y1 and x2 > x1:
            detections.append(((x1 * width, y1 * height, x2 * width, y2 * height), m.group(5).strip()))
    return detections


DETECTION = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>(?:<seg\d{3}>)*([^;<]*)")


# ----------------------------------------------------------------------------------------------
# Checkpoints: the official layout nests the towers one level deeper than our modules.

CHECKPOINT_PREFIXES = {  # checkpoint key prefix -> our parameter prefix
    "vision_tower.vision_model.": "vision_tower.",  # transformers 5 writes a fresh model without `vision_model.`
    "language_model.model.": "language_model.",
    "multi_modal_projector.linear.": "multi_modal_projector.",
}
UNUSED_PREFIXES = ("vision_tower.head.", "lm_head.", "language_model.lm_head.")  # SigLIP's pooling head; the tied head


def _rename(key: str, prefixes: dict[str, str]) -> str:
    return next((new + key[len(old):] for old, new in prefixes.items() if key.startswith(old)), key)


def _our_name(key: str) -> str:
    return _rename(key, CHECKPOINT_PREFIXES)


def official_state_dict(model: PaliGemma) -> dict[str, torch.Tensor]:
    """The model's tensors under the names of the official checkpoints, the layout `from_pretrained` reads."""
    to_official = {ours: official for official, ours in CHECKPOINT_PREFIXES.items()}
    return {_rename(key, to_official): value for key, value in model.state_dict().items()}


def _listing(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def read_tensors(folder: Path, names, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """{our name: tensor} for the `names` found in the checkpoint in folder, read one at a time and
    converted to dtype (None: as stored) on device."""
    tensors = {}
    for file, keys in _checkpoint_files(folder).items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                if _our_name(key) in names:
                    tensors[_our_name(key)] = f.get_tensor(key).to(device=device, dtype=dtype)
    return tensors


def _checkpoint_files(folder: Path) -> dict[Path, list[str]]:
    """{safetensors file: its tensor names} for a single-file or a sharded (indexed) checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = {}
        for key, file in json.loads(index.read_text())["weight_map"].items():
            files.setdefault(folder / file, []).append(key)
        return files
    single = folder / "model.safetensors"
    if single.exists():
        with safe_open(single, framework="pt") as f:
            return {single: list(f.keys())}
    raise FileNotFoundError(f"{folder} holds no weights: neither model.safetensors nor model.safetensors.index.json")


def resolve_checkpoint(name_or_dir, patterns: list[str]) -> Path:
    """A local folder as it is, or a hub id (e.g. google/paligemma-3b-pt-224) downloaded to the local cache."""
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} is not a PaliGemma checkpoint: it has no config.json")
        return path
    if path.exists() or str(name_or_dir).startswith((".", "/", "~")) or str(name_or_dir).count("/") != 1:
        raise FileNotFoundError(f"{name_or_dir}: no such checkpoint folder (nor a hub id of the form owner/name)")
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(str(name_or_dir), allow_patterns=patterns))
    except Exception as e:  # network, gating, authentication, missing repo: the hub library raises many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(
            f"{name_or_dir} is not a local folder and could not be fetched from the Hugging Face hub ({reason}). "
            "PaliGemma checkpoints are gated: accept the licence on the model's page and run `huggingface-cli login`, "
            "or pass the path of a downloaded checkpoint folder."
        ) from None


# ----------------------------------------------------------------------------------------------
# Tokenizer and processor


class Tokenizer:
    """Gemma's SentencePiece model, plus the tokens PaliGemma adds.

    `<loc0000>`..`<loc1023>` (box coordinates) and `<seg000>`..`<seg127>` (mask codes) are pieces of the
    SentencePiece model; they are split out of the text before SentencePiece sees the rest, so that they
    always become one token each. `<image>` is not a piece: its id comes from the model's config.
    """

    SPECIAL = re.compile(r"(<loc\d{4}>|<seg\d{3}>)")

    def __init__(self, model_file, image_token_id: int):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.image_token_id = image_token_id
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        for piece in ("<loc0000>", "<loc1023>", "<seg000>", "<seg127>"):
            if self.sp.piece_to_id(piece) == self.sp.unk_id():
                raise ValueError(f"{model_file} is not a PaliGemma tokenizer: it has no {piece} piece")

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self.SPECIAL.split(text)):  # odd parts are <loc>/<seg> tokens
            ids += [self.sp.piece_to_id(part)] if i % 2 else self.sp.encode(part)
        return ids

    def decode(self, ids) -> str:
        """Text of the ids, without <pad>, <bos>, <eos>, <image> and ids past the vocabulary (the embedding
        has spare rows); <loc>/<seg> tokens are kept as text."""
        skip = {self.pad_id, self.bos_id, self.eos_id}
        pieces = [self.sp.id_to_piece(i) for i in ids if i not in skip and 0 <= i < self.sp.get_piece_size()]
        text, run = "", []
        for piece in pieces:
            if self.SPECIAL.fullmatch(piece):
                text, run = text + self.sp.decode_pieces(run) + piece, []
            else:
                run.append(piece)
        return text + self.sp.decode_pieces(run)


class Processor:
    """Images and prompts to model inputs, laid out as the checkpoints were trained:

        <image> x N   <bos>  prefix "\\n"   [suffix <eos>]     (left-padded with <pad> to the batch's longest)
        token_type_ids: 0 ...................  1 ...........
        labels:      -100 ...................  suffix ids, eos  (only when suffixes are given)

    Images are converted to RGB (transparency over white), resized to the model's square resolution with
    bicubic resampling, and scaled to [-1, 1].
    """

    def __init__(self, tokenizer: Tokenizer, image_size: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    @classmethod
    def from_pretrained(cls, name_or_dir) -> "Processor":
        folder = resolve_checkpoint(name_or_dir, ["config.json", "tokenizer.model"])
        if not (folder / "tokenizer.model").exists():
            raise FileNotFoundError(f"{folder} has no tokenizer.model (the SentencePiece model)")
        config = PaliGemmaConfig.from_json(folder / "config.json")
        tokenizer = Tokenizer(folder / "tokenizer.model", config.image_token_index)
        return cls(tokenizer, config.vision_config.image_size, config.vision_config.num_patches)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """A PIL image of any size and mode -> (3, S, S) float32 in [-1, 1]."""
        if "A" in image.getbands() or "transparency" in image.info:
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (S, S, 3) in [0, 1]
        return ((x - 0.5) / 0.5).permute(2, 0, 1)

    def text_tokens(self, prefix: str, suffix: str | None = None) -> tuple[list[int], list[int]]:
        """One example's text, <bos> prefix "\\n" [suffix <eos>], as (ids, token types)."""
        tok = self.tokenizer
        ids = [tok.bos_id] + tok.encode(prefix + "\n")
        types = [0] * len(ids)
        if suffix is not None:
            suffix_ids = tok.encode(suffix) + [tok.eos_id]
            ids, types = ids + suffix_ids, types + [1] * len(suffix_ids)
        return ids, types

    def __call__(self, images, prefixes, suffixes=None, max_len: int | None = None) -> dict[str, torch.Tensor]:
        """One image per prompt. Returns input_ids, attention_mask, token_type_ids (B, T),
        pixel_values (B, 3, S, S), and labels (B, T) when suffixes are given. With `max_len`, text tokens
        past max_len are cut (the end of the suffix goes first); the image tokens are not counted."""
        if len(images) != len(prefixes) or (suffixes is not None and len(suffixes) != len(prefixes)):
            raise ValueError(f"got {len(images)} images, {len(prefixes)} prefixes"
                             + ("" if suffixes is None else f" and {len(suffixes)} suffixes") + ": one of each per example")
        image_ids = [self.tokenizer.image_token_id] * self.num_image_tokens
        rows = []  # (ids, token types)
        for i, prefix in enumerate(prefixes):
            ids, types = self.text_tokens(prefix, None if suffixes is None else suffixes[i])
            rows.append((image_ids + ids[:max_len], [0] * len(image_ids) + types[:max_len]))
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (ids, types) in enumerate(rows):  # left padding: the real tokens end at T
            input_ids[i, T - len(ids):] = torch.tensor(ids)
            attention_mask[i, T - len(ids):] = 1
            token_type_ids[i, T - len(ids):] = torch.tensor(types)
        batch = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     pixel_values=torch.stack([self.preprocess_image(im) for im in images]))
        if suffixes is not None:
            batch["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)
        return batch

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])
