"""Whole documents cut into segments, one document at a time per batch lane (segment recurrence).

Each of the batch's lanes reads documents in the (shuffled, repeated) order of the split: when a lane's
document ends it takes the next one not yet taken. A document is [EOS] + its tokens + [EOS] (the
packed pipeline's convention: the first token is predicted after an EOS, the EOS after the last one),
cut into segments of `seq_len` inputs with their next-token targets; the last segment of a document is
padded and masked. A batch is `segments` consecutive segments per lane:

    inputs, targets  int32 [B, S, L]
    mask             bool  [B, S, L]   real targets (False on a document's padded tail)
    reset            bool  [B, S]      the segment is its document's first: the lane's memory restarts

The iterator's state (the next document to hand out, and each lane's document and offset) is plain
JSON, so grain's checkpoint handler saves and restores it like the packed iterator's.
"""

from __future__ import annotations

import grain
import numpy as np

from memjax.data.sources import DataError, build_source


class DocumentSegmentIterator(grain.DatasetIterator):
    def __init__(self, docs: grain.MapDataset, tokenizer, *, seq_len: int, segments: int, batch_size: int,
                 repeat: bool):
        super().__init__()
        self._docs, self._tokenizer, self._repeat = docs, tokenizer, repeat
        self._seq_len, self._segments, self._batch = seq_len, segments, batch_size
        self._next_doc = 0  # index (in the shuffled, repeated order) of the next document to hand out
        self._lanes = [None] * batch_size  # per lane: [document index, segments of it already emitted]
        self._cache: dict[int, np.ndarray] = {}  # the lanes' current documents, tokenized

    def _tokens(self, index: int) -> np.ndarray:
        if index not in self._cache:
            eos = self._tokenizer.eos_id
            ids = np.asarray(self._tokenizer.encode(self._docs[index]), np.int32)
            self._cache[index] = np.concatenate([[eos], ids, [eos]]).astype(np.int32)
        return self._cache[index]

    def _take_document(self, lane: int) -> bool:
        if not self._repeat and self._next_doc >= len(self._docs):
            return False
        self._lanes[lane] = [self._next_doc, 0]
        self._next_doc += 1
        return True

    def _segment(self, lane: int):
        """(inputs, targets, mask, reset) of the lane's next segment; None when the split is exhausted."""
        current = self._lanes[lane]
        if current is None or current[1] * self._seq_len >= len(self._tokens(current[0])) - 1:
            if current is not None:
                self._cache.pop(current[0], None)
            if not self._take_document(lane):
                return None
        index, used = self._lanes[lane]
        tokens, start, length = self._tokens(index), used * self._seq_len, self._seq_len
        piece = tokens[start : start + length + 1]
        valid = len(piece) - 1
        inputs, targets = np.zeros(length, np.int32), np.zeros(length, np.int32)
        inputs[:valid], targets[:valid] = piece[:-1], piece[1:]
        self._lanes[lane][1] += 1
        return inputs, targets, np.arange(length) < valid, used == 0

    def __next__(self) -> dict[str, np.ndarray]:
        rows = []
        for lane in range(self._batch):
            lane_rows = []
            for _ in range(self._segments):
                segment = self._segment(lane)
                if segment is None:
                    raise StopIteration  # a finite split: the final partial batch is dropped
                lane_rows.append(segment)
            rows.append(lane_rows)
        fields = ("inputs", "targets", "mask", "reset")
        return {name: np.asarray([[seg[i] for seg in lane] for lane in rows]) for i, name in enumerate(fields)}

    def get_state(self) -> dict:
        return {"next_doc": self._next_doc, "lanes": [None if lane is None else list(lane) for lane in self._lanes]}

    def set_state(self, state: dict) -> None:
        self._next_doc = int(state["next_doc"])
        self._lanes = [None if lane is None else [int(lane[0]), int(lane[1])] for lane in state["lanes"]]
        self._cache = {}

    def __str__(self) -> str:
        return f"DocumentSegmentIterator(seq_len={self._seq_len}, segments={self._segments}, batch={self._batch})"


def make_document_iterator(data_cfg, tokenizer, split: str, *, seq_len: int, segments: int, batch_size: int,
                           seed: int, shard_index: int = 0, shard_count: int = 1, shuffle: bool = True,
                           repeat: bool = True) -> DocumentSegmentIterator:
    """Batches of `segments` consecutive segments of whole documents per lane (see the module doc)."""
    if min(seq_len, segments, batch_size) <= 0:
        raise DataError(f"seq_len, segments and batch_size must be positive, got {seq_len}, {segments}, {batch_size}")
    source = build_source(data_cfg, split)
    docs = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(docs) == 0:
        raise DataError(f"shard {shard_index} of {shard_count} of the {split} split has no documents")
    if shuffle:
        docs = docs.shuffle(seed=seed % 2**32)
    if repeat:
        docs = docs.repeat()
    return DocumentSegmentIterator(docs, tokenizer, seq_len=seq_len, segments=segments, batch_size=batch_size,
                                   repeat=repeat)
