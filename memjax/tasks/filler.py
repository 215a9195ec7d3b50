"""Haystack filler for the text tasks, as token pieces that end at sentence or line boundaries.

  noise  RULER's repeated filler sentences, always in the same order
  text   consecutive lines of real text (the Python stdlib sources that memjax trains on by default),
         from a random line of a bounded, cached sample of the corpus; wraps around, so any length works

Needles and facts are inserted only between pieces, so they never split a sentence or a line.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np

from memjax.data.sources import StdlibSource
from memjax.data.tokenizers import sample_texts

NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLERS = ("noise", "text")
# Enough lines that examples rarely share filler, small enough to read in well under a second.
CORPUS_BYTES = 2_000_000


@functools.lru_cache(maxsize=2)
def corpus_lines(max_bytes: int = CORPUS_BYTES) -> tuple[str, ...]:
    """Lines (each ending in a newline) of about `max_bytes` of the stdlib corpus, in a fixed order."""
    lines = []
    for text in sample_texts(StdlibSource(lambda key: True), max_bytes):
        lines.extend(line.rstrip("\r\n") + "\n" for line in text.splitlines())
    return tuple(lines)


class Filler:
    """Exactly `budget` tokens of filler, as pieces; a cut last piece still ends in a newline."""

    def __init__(self, kind: str, tokenizer):
        if kind not in FILLERS:
            raise ValueError(f"filler/haystack must be one of {FILLERS}, got {kind!r}")
        self.kind, self.tokenizer = kind, tokenizer
        # What ends an inserted sentence (needle, fact) so it reads like its neighbours.
        self.separator = " " if kind == "noise" else "\n"
        self.newline_ids = np.asarray(tokenizer.encode("\n"), np.int32)
        if len(self.newline_ids) != 1:
            raise ValueError(f"tokenizer {tokenizer.describe()} encodes a newline as {len(self.newline_ids)} tokens")
        if kind == "noise":
            sentences = [s.strip() + "." for s in NOISE_TEXT.split(".") if s.strip()]
            self._noise = [np.asarray(tokenizer.encode(s + " "), np.int32) for s in sentences]
        else:
            self._lines = corpus_lines()

    def _pieces(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        if self.kind == "noise":
            while True:
                yield from self._noise
        start = int(rng.integers(len(self._lines)))
        for i in range(start, start + 10 * len(self._lines)):
            yield np.asarray(self.tokenizer.encode(self._lines[i % len(self._lines)]), np.int32)
        raise RuntimeError("filler corpus lines encode to no tokens")

    def fill(self, rng: np.random.Generator, budget: int) -> list[np.ndarray]:
        pieces, need = [], budget
        for piece in self._pieces(rng):
            if need == 0:
                break
            if len(piece) > need:  # cut the last piece and end it on a newline
                piece = np.concatenate([piece[: need - 1], self.newline_ids])
            pieces.append(piece)
            need -= len(piece)
        return pieces


def insert_at(pieces: list[np.ndarray], inserts: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
    """`pieces` with each (boundary, piece) of `inserts` placed before pieces[boundary] (stable)."""
    out, ordered = [], sorted(range(len(inserts)), key=lambda i: inserts[i][0])
    next_insert = 0
    for boundary in range(len(pieces) + 1):
        while next_insert < len(ordered) and inserts[ordered[next_insert]][0] == boundary:
            out.append(inserts[ordered[next_insert]][1])
            next_insert += 1
        if boundary < len(pieces):
            out.append(pieces[boundary])
    return out


def boundary_offsets(pieces: list[np.ndarray]) -> np.ndarray:
    """Token offset of every boundary between pieces (len(pieces) + 1 of them)."""
    return np.concatenate([[0], np.cumsum([len(p) for p in pieces], dtype=np.int64)])
