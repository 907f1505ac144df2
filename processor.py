r"""What goes into PaliGemma and what comes out: image files, images and prompts as tensors, token
ids as text.

    image file --load_image--> PIL image --Processor.pixels--> pixel_values (B, 3, S, S) in [-1, 1]
    prefix, suffix --Processor.tokens--> input_ids, attention_mask, token_type_ids, labels (B, T)
    new token ids --Processor.decode--> "<loc0123><loc0045><loc0400><loc0321> cat" (detections.py
                                        reads it)

The layout of a prompt is the checkpoints' (and transformers' PaliGemmaProcessor's):

    <image> x N   <bos>  prefix "\n"   [suffix <eos>]     (left-padded with <pad> to the longest)
    token_type_ids: 0 ...................  1 ...........
    labels:      -100 ...................  suffix ids, eos  (only when suffixes are given)

What it is not: the model (paligemma.py), the reading of boxes and masks in answers (detections.py)
or training data (data.py). It needs sentencepiece, PIL and numpy besides torch.
"""

import errno
import re
import stat
from pathlib import Path

import numpy as np
import sentencepiece
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from detections import LOC, SEG, name_problem, prompt_names
from paligemma import read_config, resolve_checkpoint


# PIL's own limit (a decompression bomb beyond); load_image checks it itself
MAX_PIXELS = 89_478_485
KINDS = {stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
         stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def load_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An image file, decoded and turned upright as its EXIF orientation says (as phones write them,
    and as every viewer shows them); a file that cannot be used is a ValueError that names it and
    says why.

    An image over `max_pixels` is refused from its header, before it is decoded. PIL's own guard
    (Image.MAX_IMAGE_PIXELS: a warning above it, an error above twice it) applies too unless the
    caller lifts it, as the tools do (cli.use_own_image_limit): this module changes no global of
    PIL's."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise ValueError(f"{path}: is a directory, not an image file")
        if not stat.S_ISREG(mode):  # reading a FIFO would wait forever
            raise ValueError(f"{path}: is {next(k for test, k in KINDS.items() if test(mode))}, "
                             "not an image file")
        if path.stat().st_size == 0:
            raise ValueError(f"{path}: is an empty file")
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:  # the header only: nothing is decoded yet
                raise ValueError(f"{path}: is {image.width} x {image.height} pixels, more than the "
                                 f"limit of {max_pixels:,} (--max-image-pixels raises it)")
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except PermissionError:
        raise ValueError(f"{path}: permission denied") from None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise ValueError(f"{str(path)[:60]}...: file name too long for this system") from None
        raise ValueError(f"{path}: cannot be decoded as an image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e} (PIL.Image.MAX_IMAGE_PIXELS is PIL's limit)") from None
    except (UnidentifiedImageError, SyntaxError, EOFError) as e:  # PIL's decoders raise these too
        raise ValueError(f"{path}: cannot be decoded as an image ({e})") from None
    except ValueError as e:
        raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: cannot be decoded "
                         f"({e})") from None


def prompt_problem(prefix: str) -> str | None:
    """Why a prompt cannot be given to the model, or None: one that writes the image's place itself
    ("<image>caption en", as transformers' documentation writes prompts: the processor places the
    image tokens, and here "<image>" would be read as text), or a detect or segment prompt with a
    class name that its answers cannot write (detections.name_problem)."""
    if "<image>" in prefix:
        return ("it holds <image>: the image's tokens are placed before every prompt; give the "
                "prompt without it")
    for name in (prompt_names(prefix) or (False, []))[1]:
        if why := name_problem(name):
            return f"the class name {name!r}: {why}"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency over white; 16-bit and 32-bit images scaled to 8
    bits.

    PIL's own conversion (and so transformers' processor) clips 16-bit and 32-bit pixels to 0..255,
    which makes most such images all white or all black. Here 16-bit ones (I;16) are divided by 257
    (0..65535 -> 0..255), and 32-bit integer (I) and float (F) ones, which have no fixed range, are
    scaled from their own minimum and maximum.
    """
    if not isinstance(image, Image.Image):
        hint = ""
        if isinstance(image, (str, Path)):
            hint = ": open files with processor.load_image (or PIL.Image.open)"
        raise TypeError(f"expected a PIL image, got {type(image).__name__}{hint}")
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round()
                                .astype(np.uint8))
    elif image.mode in ("I", "F"):
        a = np.asarray(image, dtype=np.float64)
        low, high = a.min(), a.max()
        scaled = (a - low) / (high - low) * 255 if high > low else np.zeros_like(a)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)),
                                      image.convert("RGBA"))
    return image.convert("RGB")


class Tokenizer:
    """Gemma's SentencePiece model, plus the tokens PaliGemma adds.

    `<loc0000>`..`<loc1023>` (box coordinates) and `<seg000>`..`<seg127>` (mask codes) are pieces of
    the SentencePiece model; they are split out of the text before SentencePiece sees the rest, so
    that they always become one token each. `<image>` is not a piece: its id comes from the model's
    config.
    """

    SPECIAL = re.compile(f"({LOC}|{SEG})")

    def __init__(self, model_file, image_token_id: int):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_file}: not a readable SentencePiece model "
                             f"({str(e).strip()})") from None
        self.image_token_id = image_token_id
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        special = [f"<loc{k:04d}>" for k in range(1024)] + [f"<seg{k:03d}>" for k in range(128)]
        missing = [piece for piece in special if self.sp.piece_to_id(piece) == self.sp.unk_id()]
        if missing:
            more = ""
            if len(missing) > 1:
                more = f" (nor {len(missing) - 1} more of the 1024 <loc> and 128 <seg>)"
            raise ValueError(f"{model_file} is not a PaliGemma tokenizer: it has no {missing[0]} "
                             f"piece{more}")

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, part in enumerate(self.SPECIAL.split(text)):  # odd parts are <loc>/<seg> tokens
            ids += [self.sp.piece_to_id(part)] if i % 2 else self.sp.encode(part)
        return ids

    def decode(self, ids) -> str:
        """Text of the ids, without <pad>, <bos>, <eos>, <image> and ids past the vocabulary (the
        embedding has spare rows); <loc>/<seg> tokens are kept as text."""
        skip = {self.pad_id, self.bos_id, self.eos_id}
        size = self.sp.get_piece_size()
        pieces = [self.sp.id_to_piece(i) for i in ids if i not in skip and 0 <= i < size]
        text, run = "", []
        for piece in pieces:
            if self.SPECIAL.fullmatch(piece):
                text, run = text + self.sp.decode_pieces(run) + piece, []
            else:
                run.append(piece)
        return text + self.sp.decode_pieces(run)


class Processor:
    """Images and prompts to model inputs, laid out as the checkpoints were trained (see the module
    docstring). Images are converted to RGB (`to_rgb`), resized to the model's square resolution
    with bicubic resampling, and scaled to [-1, 1]."""

    def __init__(self, tokenizer: Tokenizer, image_size: int, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens

    @classmethod
    def from_pretrained(cls, name_or_dir) -> "Processor":
        folder = resolve_checkpoint(name_or_dir, ["config.json", "tokenizer.model"])
        if not (folder / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{folder} has no tokenizer.model (the SentencePiece model)")
        config = read_config(folder / "config.json")
        tokenizer = Tokenizer(folder / "tokenizer.model", config.image_token_index)
        pieces, vocab = tokenizer.sp.get_piece_size(), config.text_config.vocab_size
        # its ids would fall outside the embedding or on <image>
        if pieces > min(vocab, config.image_token_index):
            raise ValueError(f"{folder / 'tokenizer.model'} has {pieces} pieces, more than the "
                             f"model's vocabulary below <image> ({config.image_token_index}; "
                             f"vocab_size {vocab}): another model's?")
        return cls(tokenizer, config.vision_config.image_size, config.vision_config.num_patches)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """A PIL image of any size and mode -> (3, S, S) float32 in [-1, 1]."""
        image = to_rgb(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
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

    def __call__(self, images, prefixes, suffixes=None,
                 max_len: int | None = None) -> dict[str, torch.Tensor]:
        """One image per prompt. Returns input_ids, attention_mask, token_type_ids (B, T), labels
        (B, T) when suffixes are given, and pixel_values (B, 3, S, S)."""
        for name, texts in (("prefixes", prefixes), ("suffixes", suffixes)):
            if isinstance(texts, str):
                raise TypeError(f"{name} must be a list of strings, one per image, not a string")
        if not len(images):
            raise ValueError("no examples: give at least one image and its prefix")
        if len(images) != len(prefixes) or (suffixes is not None
                                            and len(suffixes) != len(prefixes)):
            raise ValueError(f"got {len(images)} images, {len(prefixes)} prefixes"
                             + ("" if suffixes is None else f" and {len(suffixes)} suffixes")
                             + ": one of each per example")
        return self.tokens(prefixes, suffixes, max_len) | {"pixel_values": self.pixels(images)}

    def pixels(self, images) -> torch.Tensor:
        """PIL images -> pixel_values (B, 3, S, S)."""
        return torch.stack([self.preprocess_image(im) for im in images])

    def tokens(self, prefixes, suffixes=None,
               max_len: int | None = None) -> dict[str, torch.Tensor]:
        """The prompts (and answers) of a batch, each after its image's tokens, left-padded:
        input_ids, attention_mask, token_type_ids (B, T), and labels (B, T) when suffixes are given.
        With `max_len`, text tokens past max_len are cut (the end of the suffix goes first); image
        tokens are not counted."""
        for prefix in prefixes:
            if why := prompt_problem(prefix):
                raise ValueError(f"prompt {prefix!r}: {why}")
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
        batch = dict(input_ids=input_ids, attention_mask=attention_mask,
                     token_type_ids=token_type_ids)
        if suffixes is not None:
            batch["labels"] = input_ids.masked_fill(token_type_ids == 0, -100)
        return batch

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])
