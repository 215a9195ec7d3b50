"""Concatenate token sequences and cut the stream into fixed-length rows.

grain.experimental.ConcatThenSplitIterDataset does the same, but its state holds tuples that it
compares with `==` against tuples; after grain's own JSON checkpointing turns them into lists it
restores the wrong position. This iterator's state is plain JSON: the parent's state just before
the document the next row starts in, plus how many tokens of that document are already used.
"""

from __future__ import annotations

import copy

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
    """Rows of exactly `row_len` tokens from 1-D int arrays; a final partial row is dropped."""

    def __init__(self, parent: grain.IterDataset, row_len: int):
        super().__init__(parent)
        if row_len <= 0:
            raise ValueError(f"row_len must be positive, got {row_len}")
        self._row_len = row_len

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._row_len)

    def __str__(self) -> str:
        return f"PackIterDataset(row_len={self._row_len})"


class _PackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, row_len: int):
        super().__init__(parent)
        self._row_len = row_len
        self._doc: np.ndarray | None = None  # the document the next row starts in
        self._doc_state = None  # parent state from just before `_doc` was read
        self._used = 0  # tokens of `_doc` already emitted

    def _next_doc(self) -> None:
        self._doc_state = copy.deepcopy(self._parent.get_state())
        self._doc = np.asarray(next(self._parent)).reshape(-1)
        self._used = 0

    def __next__(self) -> np.ndarray:
        pieces, need = [], self._row_len
        while need:
            if self._doc is None or self._used == len(self._doc):
                self._doc = None
                self._next_doc()  # StopIteration here drops the partial row, as documented
            take = min(need, len(self._doc) - self._used)
            pieces.append(self._doc[self._used : self._used + take])
            self._used += take
            need -= take
        return np.concatenate(pieces)

    def get_state(self) -> dict:
        if self._doc is None or self._used == len(self._doc):
            return {"parent": copy.deepcopy(self._parent.get_state()), "used": 0}
        return {"parent": copy.deepcopy(self._doc_state), "used": self._used}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._doc = None
        if state["used"]:
            self._next_doc()
            self._used = int(state["used"])

    def __str__(self) -> str:
        return f"_PackIterator(row_len={self._row_len})"
