import itertools
import json

import ml_collections
import numpy as np
import pytest

from memjax.data import (
    BPETokenizer,
    ByteTokenizer,
    DataError,
    build_source,
    get_tokenizer,
    make_lm_iterator,
    split_of,
)
from memjax.data.sources import stdlib_files

EOS = ByteTokenizer.eos_id
DOCS = [
    "alpha beta gamma\n",
    "naïve café — ünïcödé ✓\n",
    "x",
    "def f(x):\n    return x * 2\n" * 3,
    "日本語のテキスト\n",
    "omega",
]


def data_cfg(**overrides):
    cfg = {
        "source": "stdlib",
        "paths": "",
        "val_paths": "",
        "jsonl_field": "text",
        "val_fraction": 0.05,
        "tokenizer": "byte",
        "tokenizer_path": "",
        "bpe_vocab_size": 4096,
        "bpe_train_bytes": 20_000_000,
        "prefetch": 2,
    }
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture
def corpus(tmp_path):
    """DOCS as text files (sorted names = DOCS order) plus a held-out validation file."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i, doc in enumerate(DOCS):
        (d / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "val.txt").write_text("held out\n", encoding="utf-8")
    return data_cfg(source="text", paths=str(d / "*.txt"), val_paths=str(tmp_path / "val.txt"))


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def rows_of(batches):
    """The packed token stream: each row is inputs plus its last target."""
    return np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1).reshape(-1) for b in batches])


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_split_of():
    assert split_of("a/b.py", 0.0) == "train"
    assert split_of("a/b.py", 1.0) == "validation"
    keys = [f"k{i}" for i in range(2000)]
    frac = np.mean([split_of(k, 0.1) == "validation" for k in keys])
    assert 0.07 < frac < 0.13
    assert [split_of(k, 0.1) for k in keys] == [split_of(k, 0.1) for k in keys]


def test_stdlib_deterministic_and_split():
    root, files = stdlib_files()
    assert files == sorted(files) == stdlib_files()[1]
    assert all(f.endswith(".py") for f in files)
    assert not any(p in f.split("/") for f in files for p in ("site-packages", "dist-packages", "__pycache__"))
    train, val = build_source(data_cfg(), "train"), build_source(data_cfg(), "validation")
    assert len(train) > 0 and len(val) > 0
    assert set(train.keys).isdisjoint(val.keys)
    assert sorted(train.keys + val.keys) == files
    assert build_source(data_cfg(), "validation").keys == val.keys
    assert isinstance(val[0], str) and len(val[0]) > 0


@pytest.mark.parametrize("prefetch", [0, 2])
def test_packing_keeps_every_byte_in_order(corpus, prefetch):
    corpus.prefetch = prefetch
    seq_len, batch_size = 7, 2
    it = make_lm_iterator(corpus, ByteTokenizer(), "train", seq_len=seq_len, batch_size=batch_size, seed=0,
                          shuffle=False, repeat=False)
    batches = list(it)
    assert batches
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (batch_size, seq_len)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
    stream = rows_of(batches)
    expected = np.concatenate([np.append(np.frombuffer(d.encode(), np.uint8), EOS) for d in DOCS]).astype(np.int32)
    # Only the final partial batch is dropped.
    assert len(expected) - batch_size * (seq_len + 1) < len(stream) <= len(expected)
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    # Targets are inputs shifted by one within each packed row.
    for b in batches:
        np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])


def test_validation_split_from_val_paths(corpus):
    it = make_lm_iterator(corpus, ByteTokenizer(), "validation", seq_len=3, batch_size=1, seed=0, shuffle=False,
                          repeat=False)
    stream = rows_of(list(it))
    assert ByteTokenizer().decode(stream) == "held out\n"[: len(stream)]


def test_determinism_and_epochs(corpus):
    def first(seed, n=20):
        it = make_lm_iterator(corpus, ByteTokenizer(), "train", seq_len=16, batch_size=2, seed=seed)
        return take(it, n)

    a = first(0)
    assert_same(a, first(0))
    assert not all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, first(1)))
    # 20 batches x 34 tokens span several epochs of this ~190-token corpus: each epoch is a
    # permutation of the documents, and a fresh one.
    docs = _split_stream(rows_of(a))
    epochs = [docs[i : i + len(DOCS)] for i in range(0, len(docs) - len(DOCS) + 1, len(DOCS))]
    assert len(epochs) >= 3
    assert all(sorted(e) == sorted(DOCS) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_stdlib_determinism():
    cfg = data_cfg()
    run = lambda seed: take(make_lm_iterator(cfg, ByteTokenizer(), "train", seq_len=64, batch_size=4, seed=seed), 3)  # noqa: E731
    a = run(3)
    assert_same(a, run(3))
    assert not np.array_equal(a[0]["inputs"], run(4)[0]["inputs"])


@pytest.mark.parametrize("source", ["stdlib", "text"])
def test_checkpoint_resumes_exact_stream(corpus, source):
    cfg = data_cfg() if source == "stdlib" else corpus
    make = lambda: make_lm_iterator(cfg, ByteTokenizer(), "train", seq_len=32, batch_size=3, seed=7)  # noqa: E731
    it = make()
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # grain checkpoints states as JSON
    expected = take(it, 5)
    restored = make()
    take(restored, 2)  # set_state must also work on an iterator that already ran
    restored.set_state(state)
    assert_same(take(restored, 5), expected)
    fresh = make()
    fresh.set_state(state)
    assert_same(take(fresh, 5), expected)


def test_process_shards_are_disjoint(corpus):
    def docs(shard):
        it = make_lm_iterator(
            corpus, ByteTokenizer(), "train", seq_len=1, batch_size=1, seed=0,
            shard_index=shard, shard_count=2, shuffle=False, repeat=False,
        )
        return _split_docs(it)

    assert docs(0) == DOCS[0::2] and docs(1) == DOCS[1::2]


def _split_stream(stream):
    """Complete EOS-terminated documents of a token stream that starts at a document boundary."""
    cuts = np.flatnonzero(stream == EOS)
    return [ByteTokenizer().decode(s) for s in np.split(stream, cuts + 1)[:-1]]


def _split_docs(it):
    return _split_stream(rows_of(list(it)))


def test_empty_shard_with_repeat_errors(tmp_path):
    (tmp_path / "a.txt").write_text("only one document")
    cfg = data_cfg(source="text", paths=str(tmp_path / "a.txt"), val_fraction=0.0)
    with pytest.raises(DataError, match="shard 1 of 2"):
        make_lm_iterator(cfg, ByteTokenizer(), "train", seq_len=4, batch_size=1, seed=0, shard_index=1, shard_count=2)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 日本 🎉"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(np.append(ids, [tok.eos_id, 300])) == text  # specials and padded ids skipped
    assert tok.decode([0xC3]) == "\ufffd"
    assert tok.vocab_size == 257 and tok.token_bytes.shape == (257,) and tok.token_bytes[tok.eos_id] == 0


def test_bpe_train_save_load(tmp_path):
    texts = DOCS * 20 + ["the quick brown fox jumps over the lazy dog\n" * 5] * 20
    tok = BPETokenizer.train(texts, vocab_size=320)
    path = str(tmp_path / "sub" / "tok.json")
    tok.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.vocab_size == tok.vocab_size and loaded.eos_id == tok.eos_id
    for text in ["héllo wörld ✓ 日本 🎉", "never seen: ŧĦ∑ \x00\t", "a literal <|eos|> stays text", ""]:
        ids = loaded.encode(text)
        assert ids.dtype == np.int32 and loaded.eos_id not in ids
        assert loaded.decode(ids) == text
        assert loaded.token_bytes[ids].sum() == len(text.encode("utf-8"))
    assert loaded.token_bytes[loaded.eos_id] == 0
    assert loaded.decode(np.append(loaded.encode("ab"), loaded.eos_id)) == "ab"
    with pytest.raises(DataError, match="missing.json"):
        BPETokenizer.load(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        BPETokenizer.load(str(tmp_path / "bad.json"))


def test_get_tokenizer_trains_then_resumes(corpus, tmp_path):
    corpus.update({"tokenizer": "bpe", "bpe_vocab_size": 300, "bpe_train_bytes": 10_000})
    workdir = str(tmp_path / "run")
    tok = get_tokenizer(corpus, workdir)
    assert (tmp_path / "run" / "tokenizer.json").exists()
    again = get_tokenizer(corpus, workdir)
    assert again.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(again.encode(DOCS[1]), tok.encode(DOCS[1]))
    corpus.tokenizer_path = str(tmp_path / "run" / "tokenizer.json")
    assert get_tokenizer(corpus, None).vocab_size == tok.vocab_size
    assert isinstance(get_tokenizer(data_cfg(), None), ByteTokenizer)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_source(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS[:3])] + [""])
    write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in DOCS[3:]])
    cfg = data_cfg(source="jsonl", paths=str(tmp_path / "*.jsonl"), val_fraction=0.0)
    source = build_source(cfg, "train")
    assert [source[i] for i in range(len(source))] == DOCS
    it = make_lm_iterator(cfg, ByteTokenizer(), "train", seq_len=3, batch_size=1, seed=0, shuffle=False, repeat=False)
    assert _split_docs(it) == DOCS  # 192 tokens: exactly 48 rows of 4, nothing dropped


def test_jsonl_errors(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"a\.jsonl:1: no field 'text'"):
        build_source(data_cfg(source="jsonl", paths=str(tmp_path / "a.jsonl"), val_fraction=0.0), "train")
    # Every line is checked when the source is built, not when training first reaches it.
    write_jsonl(tmp_path / "b.jsonl", [{"text": "ok"}] * 50 + ["{broken", {"other": 1}])
    with pytest.raises(DataError, match=r"b\.jsonl:51: invalid JSON"):
        build_source(data_cfg(source="jsonl", paths=str(tmp_path / "b.jsonl"), val_fraction=0.0), "train")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}] * 50 + [{"other": 1}])
    with pytest.raises(DataError, match=r"c\.jsonl:51: no field 'text'"):
        build_source(data_cfg(source="jsonl", paths=str(tmp_path / "c.jsonl"), val_fraction=0.0), "train")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}] * 50 + [{"text": 7}])
    with pytest.raises(DataError, match=r"d\.jsonl:51: field 'text' is int, not a string"):
        build_source(data_cfg(source="jsonl", paths=str(tmp_path / "d.jsonl"), val_fraction=0.0), "train")


def test_arrayrecord_source(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    for name, docs in [("a.arrayrecord", DOCS[:4]), ("b.arrayrecord", DOCS[4:])]:
        writer = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
        for d in docs:
            writer.write(d.encode("utf-8"))
        writer.close()
    cfg = data_cfg(source="arrayrecord", paths=str(tmp_path / "*.arrayrecord"), val_fraction=0.0)
    source = build_source(cfg, "train")
    assert [source[i] for i in range(len(source))] == DOCS
    val = data_cfg(source="arrayrecord", paths=str(tmp_path / "a.arrayrecord"),
                   val_paths=str(tmp_path / "b.arrayrecord"))
    assert len(build_source(val, "train")) == 4 and len(build_source(val, "validation")) == 2


def test_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"glob '.*nothing-\*\.txt' matched no files"):
        build_source(data_cfg(source="text", paths=str(tmp_path / "nothing-*.txt")), "train")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        build_source(data_cfg(source="text", paths=str(tmp_path / "empty.txt")), "train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8"):
        build_source(data_cfg(source="text", paths=str(tmp_path / "bad" / "*.txt"), val_fraction=0.0), "train")
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match=r"validation split .* no documents.*val_paths"):
        build_source(data_cfg(source="text", paths=str(tmp_path / "one.txt"), val_fraction=1e-9), "validation")
    with pytest.raises(DataError, match="unknown data.source 'csv'"):
        build_source(data_cfg(source="csv"), "train")
