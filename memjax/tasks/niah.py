"""S-NIAH (RULER-style needle in a haystack), as text over any byte-level tokenizer (byte by default).

A needle "One of the special magic numbers for KEY is: VALUE." sits in a haystack (RULER's noise
sentences or real text lines, see filler.py) at a boundary between sentences/lines; the prompt ends
with a query, and the answer (the row's answer slot, see layout.py) is VALUE followed by ".":
  single      one needle; the query asks for its key
  multikey    the needle plus `num_distractors` needles with other keys and values
  multivalue  `num_values` needles with the same key; the answer is every value in the order they
              appear in the text, joined by ", " ("What are all the special magic numbers for KEY?")
Keys are "adjective-noun" words or uuid-like hex strings; values are `value_digits`-digit numbers
(first digit non-zero); all keys and values of an example are distinct. `depth` in [0, 1] places the
queried needle (the first value's needle for multivalue) at that fraction of the haystack; None draws
it uniformly. Other needles go to uniformly random boundaries.

Extra fields: answer_ids/prompt_len (layout.py) and depth float32 [] (where the queried needle ended up,
as a fraction of the haystack's tokens).
"""

from __future__ import annotations

import numpy as np

from memjax.data.tokenizers import ByteTokenizer
from memjax.tasks.base import TaskSource
from memjax.tasks.filler import Filler, boundary_offsets, insert_at
from memjax.tasks.layout import build_row

VARIANTS = ("single", "multikey", "multivalue")
KEY_KINDS = ("word", "uuid")
ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crimson", "curious", "dark",
    "distant", "eager", "empty", "fierce", "gentle", "golden", "hidden", "hollow", "humble", "icy", "jolly",
    "lazy", "lively", "lonely", "lucky", "mighty", "narrow", "noble", "odd", "pale", "proud", "quiet", "rapid",
    "rough", "rusty", "silent", "silver", "sleepy", "smooth", "steady", "sturdy", "sweet", "swift", "tiny",
    "velvet", "wild", "wise",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banner", "basket", "beacon", "bridge", "candle", "canyon", "castle",
    "cedar", "comet", "falcon", "feather", "forest", "garden", "glacier", "hammer", "harbor", "island",
    "kettle", "lantern", "meadow", "mirror", "needle", "orchard", "otter", "pebble", "pepper", "pillar",
    "planet", "quarry", "river", "saddle", "signal", "spider", "summit", "teapot", "thistle", "tower", "tunnel",
    "valley", "violin", "wagon", "walnut", "willow", "zephyr",
)
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUERY = "What is the special magic number for {key}? The special magic number for {key} is: "
QUERY_ALL = "What are all the special magic numbers for {key}? The special magic numbers for {key} are: "
ANSWER_END = "."
VALUE_SEP = ", "


class NIAH(TaskSource):
    def __init__(self, seq_len: int = 1024, *, variant: str = "single", haystack: str = "noise", tokenizer=None,
                 depth: float | None = None, num_distractors: int = 3, num_values: int = 4, key_kind: str = "word",
                 value_digits: int = 7, seed: int = 0, num_examples: int = 1_000_000):
        super().__init__(seq_len, seed, num_examples)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if key_kind not in KEY_KINDS:
            raise ValueError(f"key_kind must be one of {KEY_KINDS}, got {key_kind!r}")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1] or None, got {depth!r}")
        for field, value, low in (("num_distractors", num_distractors, 0), ("num_values", num_values, 1),
                                  ("value_digits", value_digits, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
        self.variant, self.depth, self.key_kind, self.value_digits = variant, depth, key_kind, int(value_digits)
        self.name = f"niah_{variant}"
        self.tokenizer = tokenizer or ByteTokenizer()
        self.filler = Filler(haystack, self.tokenizer)
        self.num_needles = {"single": 1, "multikey": 1 + num_distractors, "multivalue": num_values}[variant]
        self.num_answer_values = num_values if variant == "multivalue" else 1
        if self.num_answer_values > 9 * 10 ** (self.value_digits - 1):
            raise ValueError(f"value_digits={value_digits} has too few values for num_values={num_values}")
        if variant == "multikey" and key_kind == "word" and self.num_needles > len(ADJECTIVES) * len(NOUNS):
            raise ValueError(f"num_distractors={num_distractors} needs more distinct word keys than exist")

        # Byte lengths bound token counts: a byte-level token stands for at least one byte.
        key_bytes = 36 if key_kind == "uuid" else max(map(len, ADJECTIVES)) + 1 + max(map(len, NOUNS))
        value = "9" * self.value_digits
        needle_bytes = len(NEEDLE.format(key="k" * key_bytes, value=value)) + 1  # + the separator after it
        query = QUERY_ALL if variant == "multivalue" else QUERY
        query_bytes = len(query.format(key="k" * key_bytes))
        self.slot = len(VALUE_SEP.join([value] * self.num_answer_values) + ANSWER_END)
        need = 1 + self.num_needles * needle_bytes + query_bytes + self.slot
        if self.seq_len < need:
            raise ValueError(f"seq_len={seq_len} is too short for {self.name} (needs >= {need}: "
                             f"{self.num_needles} needle(s), the query and a {self.slot}-token answer)")

    def _key(self, rng: np.random.Generator) -> str:
        if self.key_kind == "uuid":
            h = "".join("0123456789abcdef"[i] for i in rng.integers(0, 16, 32))
            return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        return f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"

    def _distinct(self, draw, count: int) -> list:
        out = []
        while len(out) < count:
            item = draw()
            if item not in out:
                out.append(item)
        return out

    def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        enc = lambda text: np.asarray(self.tokenizer.encode(text), np.int32)  # noqa: E731
        num_keys = self.num_needles if self.variant == "multikey" else 1
        keys = self._distinct(lambda: self._key(rng), num_keys)
        low = 10 ** (self.value_digits - 1)
        values = self._distinct(lambda: str(int(rng.integers(low, 10 * low))), self.num_needles)
        needle_keys = keys if self.variant == "multikey" else keys * self.num_needles
        needles = [enc(NEEDLE.format(key=k, value=v) + self.filler.separator) for k, v in zip(needle_keys, values)]
        query = enc((QUERY_ALL if self.variant == "multivalue" else QUERY).format(key=keys[0]))

        budget = self.seq_len - self.slot - len(query) - sum(len(n) for n in needles)
        pieces = self.filler.fill(rng, budget)
        offsets = boundary_offsets(pieces)
        target_depth = rng.uniform() if self.depth is None else self.depth
        first = int(np.argmin(np.abs(offsets - target_depth * budget)))
        boundaries = [first] + [int(b) for b in rng.integers(0, len(pieces) + 1, self.num_needles - 1)]
        body = insert_at(pieces, list(zip(boundaries, needles)))

        # The answer lists values in text order: by boundary, ties in insertion order (insert_at is stable).
        order = sorted(range(self.num_needles), key=lambda i: boundaries[i])
        answer_values = [values[0]] if self.variant != "multivalue" else [values[i] for i in order]
        answer = enc(VALUE_SEP.join(answer_values) + ANSWER_END)
        body_ids = np.concatenate([*body, query]) if body else query
        out = build_row(body_ids, answer, seq_len=self.seq_len, slot=self.slot, eos_id=self.tokenizer.eos_id)
        haystack_len = budget + sum(len(n) for n in needles)
        needle_start = offsets[first] + sum(len(needles[i]) for i in order if boundaries[i] < first)
        out["depth"] = np.float32(needle_start / max(haystack_len, 1))
        return out
