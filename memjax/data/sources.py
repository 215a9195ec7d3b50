"""Document sources: grain random-access sources whose items are one document (`str`) each.

Kinds (`data.source`):
  stdlib       the `.py` files of the running interpreter's standard library (no download needed);
               the corpus therefore depends on the Python version.
  text         `data.paths` globs; each file is one document.
  jsonl        `data.paths` globs; each non-blank line is a JSON object holding a document in
               field `data.jsonl_field`.
  arrayrecord  `data.paths` globs; each record is the UTF-8 bytes of one document.

Train/validation split: unless `data.val_paths` is set, every document has a stable key and goes to
validation when `split_of(key, data.val_fraction)` says so (sha256 of the key mapped to [0, 1)).
Hashing keys rather than positions keeps the split fixed when files are added or reordered. Keys:
  stdlib and text   the file path relative to the stdlib root / to the glob's fixed leading
                    directory (so moving the data directory keeps the split),
  jsonl             "<relative path>:<line number>" (1-based),
  arrayrecord       "<relative path>:<record index>" (0-based).
With `data.val_paths`, validation is exactly those files and train is every `data.paths` file that
is not also a validation file; nothing is hashed.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import re
import sysconfig

import numpy as np
from tqdm import tqdm

SPLITS = ("train", "validation")
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_GLOB_MAGIC = re.compile(r"[*?[]")
# Reading every user text file once up front is cheap at user scale; beyond this we only sniff.
_FULL_UTF8_CHECK_BYTES = 256 * 2**20
_SNIFF_BYTES = 64 * 2**10
# Checking every JSONL line runs at roughly 100-300 MB/s; below this it is too quick for a progress bar.
_JSONL_PROGRESS_BYTES = 64 * 2**20


class DataError(ValueError):
    """A problem with the data configuration or the data files themselves."""


def split_of(key: str, val_fraction: float) -> str:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if u < val_fraction else "train"


def stdlib_files() -> tuple[str, list[str]]:
    """(stdlib root, sorted relative POSIX paths of its non-empty `.py` files)."""
    root = sysconfig.get_paths()["stdlib"]
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            path = os.path.join(dirpath, name)
            # Empty files (mostly __init__.py) would only add lone EOS tokens.
            if name.endswith(".py") and os.path.isfile(path) and os.path.getsize(path) > 0:
                rels.append(os.path.relpath(path, root).replace(os.sep, "/"))
    if not rels:
        raise DataError(f"data.source='stdlib': no .py files found under {root}")
    return root, sorted(rels)


def _glob_base(pattern: str) -> str:
    if not _GLOB_MAGIC.search(pattern):
        return os.path.dirname(pattern)
    fixed = []
    for part in pattern.split(os.sep):
        if _GLOB_MAGIC.search(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or os.curdir


def expand_globs(spec: str, field: str) -> list[tuple[str, str]]:
    """[(path, key)] for comma-separated globs, in glob order then sorted; duplicates dropped."""
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    if not patterns:
        raise DataError(f"data.{field} is empty; give comma-separated file globs")
    out, seen = [], set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"data.{field}: glob {pattern!r} matched no files")
        base = _glob_base(expanded)
        for path in matches:
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            if os.path.getsize(path) == 0:
                raise DataError(f"data file {path} is empty")
            out.append((path, os.path.relpath(path, base).replace(os.sep, "/")))
    return out


def _check_utf8(files: list[tuple[str, str]]) -> None:
    full = sum(os.path.getsize(p) for p, _ in files) <= _FULL_UTF8_CHECK_BYTES
    for path, _ in files:
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(path, "rb") as f:
            data = f.read() if full else f.read(_SNIFF_BYTES)
        try:
            # A sniffed prefix may end mid-character, so only a full read is final.
            decoder.decode(data, final=full)
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not valid UTF-8 text ({err})") from None


class StdlibSource:
    def __init__(self, keep):
        self.root, rels = stdlib_files()
        self.keys = [r for r in rels if keep(r)]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> str:
        path = os.path.join(self.root, *self.keys[index].split("/"))
        # A handful of stdlib files (encoding tests) are deliberately not UTF-8.
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def __repr__(self) -> str:
        return f"StdlibSource({len(self)} files under {self.root})"


class TextFileSource:
    def __init__(self, files: list[tuple[str, str]], keep):
        kept = [(p, key) for p, key in files if keep(key)]
        _check_utf8(kept)
        self.paths = [p for p, _ in kept]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> str:
        path = self.paths[index]
        with open(path, "rb") as f:
            data = f.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not valid UTF-8 text ({err})") from None

    def __repr__(self) -> str:
        return f"TextFileSource({len(self)} files)"


class JsonlSource:
    """Random access through a (start, end) byte-offset index of every non-blank line."""

    def __init__(self, files: list[tuple[str, str]], keep, field: str):
        self.paths = [p for p, _ in files]
        self.field = field
        index = []  # arrays of (file, start, end, line number)
        total = sum(os.path.getsize(p) for p, _ in files)
        # Every line is checked before training starts: a bad line deep in a file would otherwise stop
        # the run whenever the shuffled stream first reaches it, hours in.
        with tqdm(total=total, unit="B", unit_scale=True, desc="checking JSONL", leave=False,
                  disable=total < _JSONL_PROGRESS_BYTES) as bar:
            for file_idx, (path, key) in enumerate(files):
                lines = _checked_jsonl_lines(path, field, bar)
                if not len(lines):
                    raise DataError(f"data file {path} holds no JSON lines")
                kept = lines[[keep(f"{key}:{n}") for n in lines[:, 2]]]
                index.append(np.column_stack([np.full(len(kept), file_idx, np.int64), kept]))
        self.index = np.concatenate(index).reshape(-1, 4) if index else np.zeros((0, 4), np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> str:
        return self._parse(*(int(v) for v in self.index[index]))

    def _parse(self, file_idx: int, start: int, end: int, line_no: int) -> str:
        path = self.paths[file_idx]
        with open(path, "rb") as f:
            f.seek(start)
            line = f.read(end - start)
        return _document_of(line, self.field, f"{path}:{line_no}")

    def __repr__(self) -> str:
        return f"JsonlSource({len(self)} lines in {len(self.paths)} files)"


def _document_of(line: bytes, field: str, where: str) -> str:
    try:
        obj = json.loads(line)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{where}: invalid JSON ({err})") from None
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{where}: no field {field!r} (data.jsonl_field); found {keys}")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
    return text


# (real path, size, mtime, field) -> line offsets: the train and validation splits read the same files.
_checked_jsonl: dict[tuple, np.ndarray] = {}


def _checked_jsonl_lines(path: str, field: str, bar) -> np.ndarray:
    """[lines, 3] int64: (start, end, line number) of every non-blank line, each parsed once to check it holds a string
    in `field`; a bad line raises DataError naming path:line."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns, field)
    if key in _checked_jsonl:
        bar.update(stat.st_size)
        return _checked_jsonl[key]
    out, offset = [], 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            body = line.rstrip(b"\r\n")
            if body.strip():
                _document_of(body, field, f"{path}:{line_no}")
                out.append((offset, offset + len(body), line_no))
            offset += len(line)
            bar.update(len(line))
    _checked_jsonl[key] = np.asarray(out, dtype=np.int64).reshape(-1, 3)
    return _checked_jsonl[key]


class ArrayRecordSource:
    def __init__(self, files: list[tuple[str, str]], keep):
        # Imported here so the other source kinds work without the array_record wheel.
        from array_record.python import array_record_data_source, array_record_module

        self.paths = [p for p, _ in files]
        counts, index = [], []
        for file_idx, (path, key) in enumerate(files):
            try:
                reader = array_record_module.ArrayRecordReader(path)
                n = reader.num_records()
                reader.close()
            except Exception as err:  # the C++ reader raises assorted exception types
                raise DataError(f"{path} is not a readable ArrayRecord file ({err})") from None
            if n == 0:
                raise DataError(f"data file {path} holds no records")
            first = sum(counts)
            index.extend((first + i, file_idx, i) for i in range(n) if keep(f"{key}:{i}"))
            counts.append(n)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 3)
        self._records = array_record_data_source.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> str:
        global_idx, file_idx, record = (int(v) for v in self.index[index])
        try:
            return self._records[global_idx].decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{self.paths[file_idx]}:{record}: record is not UTF-8 ({err})") from None

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self)} records in {len(self.paths)} files)"


def build_source(data_cfg, split: str) -> StdlibSource | TextFileSource | JsonlSource | ArrayRecordSource:
    """The documents of `split` ("train" or "validation") as a random-access source."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    kind = data_cfg.source
    val_fraction = float(data_cfg.val_fraction)
    hashed = lambda key: split_of(key, val_fraction) == split  # noqa: E731
    if kind == "stdlib":
        if data_cfg.val_paths:
            raise DataError("data.val_paths needs data.source text, jsonl or arrayrecord, not stdlib")
        source = StdlibSource(hashed)
    elif kind in ("text", "jsonl", "arrayrecord"):
        files, keep = _select_files(data_cfg, split, hashed)
        if kind == "text":
            source = TextFileSource(files, keep)
        elif kind == "jsonl":
            source = JsonlSource(files, keep, data_cfg.jsonl_field)
        else:
            source = ArrayRecordSource(files, keep)
    else:
        raise DataError(f"unknown data.source {kind!r}; expected stdlib, text, jsonl or arrayrecord")
    if len(source) == 0:
        raise DataError(
            f"the {split} split of data.source={kind!r} has no documents "
            f"(data.val_fraction={val_fraction}); set data.val_paths or change data.val_fraction"
        )
    return source


def _select_files(data_cfg, split, hashed):
    if not data_cfg.val_paths:
        return expand_globs(data_cfg.paths, "paths"), hashed
    val_files = expand_globs(data_cfg.val_paths, "val_paths")
    if split == "validation":
        return val_files, lambda key: True
    # A broad train glob often also matches the validation files; never train on those.
    val_real = {os.path.realpath(p) for p, _ in val_files}
    train = [(p, k) for p, k in expand_globs(data_cfg.paths, "paths") if os.path.realpath(p) not in val_real]
    return train, lambda key: True
