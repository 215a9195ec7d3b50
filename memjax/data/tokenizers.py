"""Tokenizers: raw bytes, or a byte-level BPE trained with HF `tokenizers`.

Both are byte-level, so any string round-trips and `token_bytes` (the UTF-8 bytes each id stands
for) is exact, which is what makes bits-per-byte comparable across tokenizers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np
import tokenizers as hf

from memjax.data.sources import DataError, build_source

EOS_TOKEN = "<|eos|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    token_bytes: np.ndarray  # int32 [vocab_size]; 0 for special tokens

    def encode(self, text: str) -> np.ndarray: ...  # int32, no EOS appended

    def decode(self, ids) -> str: ...  # skips special ids; invalid UTF-8 becomes U+FFFD

    def describe(self) -> str: ...


class ByteTokenizer:
    name = "byte"
    vocab_size = 257
    eos_id = 256

    def __init__(self):
        self.token_bytes = np.array([1] * 256 + [0], dtype=np.int32)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        # Model vocabularies may be padded past 257; those ids carry no text.
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8)).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return "byte (256 bytes + EOS)"


def _byte_level_alphabet() -> dict[str, int]:
    """The printable character ByteLevel uses for each byte (GPT-2's table), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class BPETokenizer:
    name = "bpe"

    def __init__(self, tokenizer: hf.Tokenizer, origin: str = "(in memory)"):
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise DataError(f"tokenizer {origin} has no {EOS_TOKEN} token; train it with memjax.data.train_tokenizer")
        # Text that happens to contain "<|eos|>" must stay text, not become a document boundary.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.origin = origin
        self.eos_id = eos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.token_bytes = self._token_bytes(origin)

    def _token_bytes(self, origin: str) -> np.ndarray:
        # Decoding ids one at a time would turn partial UTF-8 sequences into U+FFFD and miscount.
        alphabet = _byte_level_alphabet()
        specials = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        out = np.zeros(self.vocab_size, dtype=np.int32)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if i in specials or piece is None:
                continue
            if any(c not in alphabet for c in piece):
                raise DataError(f"tokenizer {origin}: token {i} ({piece!r}) is not byte-level BPE")
            out[i] = len(piece)
        return out

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        if vocab_size < 257:
            raise DataError(f"BPE vocab_size must be >= 257 (256 bytes + EOS), got {vocab_size}")
        tok = hf.Tokenizer(hf.models.BPE())
        tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = hf.decoders.ByteLevel()
        trainer = hf.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS_TOKEN],
            # All 256 bytes up front, so no input can ever be out of vocabulary.
            initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # Several processes may save the same file; a rename never exposes a half-written one.
        tmp = f"{path}.tmp{os.getpid()}"
        self._tok.save(tmp)
        os.replace(tmp, path)
        self.origin = path

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        if not os.path.isfile(path):
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            tok = hf.Tokenizer.from_file(path)
        except Exception as err:  # tokenizers raises a bare Exception on parse errors
            raise DataError(f"tokenizer file {path} is not a valid tokenizers JSON file ({err})") from None
        return cls(tok, origin=path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Like encode for each text, but in parallel threads outside the GIL."""
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)

    def describe(self) -> str:
        return f"bpe (vocab {self.vocab_size}, {self.origin})"


def sample_texts(source, max_bytes: int) -> Iterator[str]:
    """Documents of `source` in a fixed pseudo-random order until about `max_bytes` of UTF-8."""
    # A fixed permutation rather than file order, so a small budget still covers every directory.
    order = np.random.default_rng(0).permutation(len(source))
    total = 0
    for i in order:
        if total >= max_bytes:
            return
        text = source[int(i)]
        total += len(text.encode("utf-8"))
        yield text


def get_tokenizer(data_cfg, workdir: str | None) -> Tokenizer:
    """The configured tokenizer; a BPE one is loaded, resumed from `workdir`, or trained there."""
    kind = data_cfg.tokenizer
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise DataError(f"unknown data.tokenizer {kind!r}; expected 'byte' or 'bpe'")
    if data_cfg.tokenizer_path:
        return BPETokenizer.load(os.path.expanduser(data_cfg.tokenizer_path))
    saved = os.path.join(workdir, "tokenizer.json") if workdir else None
    if saved and os.path.isfile(saved):
        return BPETokenizer.load(saved)
    texts = sample_texts(build_source(data_cfg, "train"), int(data_cfg.bpe_train_bytes))
    tokenizer = BPETokenizer.train(texts, int(data_cfg.bpe_vocab_size))
    if saved:
        tokenizer.save(saved)
    return tokenizer
