"""The language-model input pipeline: documents -> tokens -> packed rows -> batches."""

from __future__ import annotations

import atexit
import weakref

import grain
import numpy as np

from memjax.data.packing import PackIterDataset
from memjax.data.sources import DataError, build_source

# Documents are tokenized in groups: HF's encode_batch runs in parallel outside the GIL, which
# per-document encode calls in grain's read threads do not. A group becomes one token array (its
# documents each followed by EOS), which is all the packer needs.
_GROUP_DOCS = 16
# Read threads work on several groups at once; the output order does not depend on them. The
# buffer is in groups, kept small because one document can be a whole book.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)


class _EncodeGroup:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._eos = np.array([tokenizer.eos_id], dtype=np.int32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        encode_batch = getattr(self._tokenizer, "encode_batch", None)
        encoded = encode_batch(texts) if encode_batch else [self._tokenizer.encode(t) for t in texts]
        return np.concatenate([piece for ids in encoded for piece in (ids.astype(np.int32, copy=False), self._eos)])


# grain's prefetch iterator closes itself in __del__, which for one still alive at interpreter exit
# runs after module teardown and prints a traceback. So close open iterators at exit and make the
# late close a no-op.
_open_iterators: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
    for iterator in list(_open_iterators):
        iterator.close()
        iterator.close = lambda: None


def _shift(rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}


def make_lm_iterator(
    data_cfg,
    tokenizer,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shard_index: int = 0,
    shard_count: int = 1,
    shuffle: bool = True,
    repeat: bool = True,
) -> grain.DatasetIterator:
    """Batches {"inputs", "targets"}: int32 [batch_size, seq_len], targets = inputs shifted by one.

    Documents (each followed by EOS) are concatenated and cut into rows of seq_len + 1 tokens, so a
    row may span documents and a long document spans rows. This process reads documents
    `shard_index::shard_count`. With repeat=False the stream is finite and drops the final partial
    row and batch. The iterator's get_state()/set_state() resume the exact stream.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise DataError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index {shard_index} is not in [0, {shard_count})")
    source = build_source(data_cfg, split)
    docs = grain.MapDataset.source(source)[shard_index::shard_count]
    if repeat and len(docs) == 0:
        raise DataError(
            f"shard {shard_index} of {shard_count} of the {split} split has no documents "
            f"({len(source)} documents in all); use fewer processes or more documents"
        )
    if shuffle:
        # Shuffling before an infinite repeat draws a fresh order each epoch (seed + epoch).
        docs = docs.shuffle(seed=seed % 2**32)
    if repeat:
        docs = docs.repeat()
    groups = docs.batch(_GROUP_DOCS, batch_fn=list)
    tokens = groups.map(_EncodeGroup(tokenizer)).to_iter_dataset(_READ_OPTIONS)
    batches = PackIterDataset(tokens, seq_len + 1).batch(batch_size, drop_remainder=True).map(_shift)
    if data_cfg.prefetch > 0:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=data_cfg.prefetch)
    iterator = iter(batches)
    _open_iterators.add(iterator)
    return iterator
