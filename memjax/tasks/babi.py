"""BABILong-style QA: a small bAbI-like world simulator, its facts scattered into filler text.

The world has people, locations and objects. Every action is legal in the simulated state, so the
answer is correct by construction, and the story only asks what the facts determine: a person acts only
after a fact has put them somewhere, and an object's location is known from the moment it is picked up.
  move  "Mary went to the kitchen."          grab  "Mary picked up the apple." (same place, free object)
  drop  "Mary dropped the apple."            give  "Mary gave the apple to John." (same place)
Tasks (bAbI numbering) and their label sets:
  qa1  single supporting fact   moves only           "Where is Mary?"                          locations
  qa2  two supporting facts     moves, grabs, drops  "Where is the apple?"                     locations
  qa3  three supporting facts   moves, grabs, drops  "Where was the apple before the kitchen?" locations
  qa6  yes/no questions         moves only           "Is Mary in the kitchen?" (half yes)      yes, no
  qa7  counting                 all four actions     "How many objects is Mary carrying?"      none..three
qa3 asks about a location that occurs once in the object's known trajectory (consecutive repeats
merged), never its first one, so "before" has one answer. Facts go, in story order, to random
boundaries of the filler (each a line of its own in real text, a sentence among the noise sentences),
then come "Question: ...?\\nAnswer: " and the label with a newline.

Extra fields: answer_ids/prompt_len (layout.py), label_index int32 [] and label_ids int32 [K, slot]
(each label's answer tokens, padded with -1), for scoring over the label set with layout.with_answer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from memjax.data.tokenizers import ByteTokenizer
from memjax.tasks.base import TaskSource
from memjax.tasks.filler import Filler, insert_at
from memjax.tasks.layout import build_row, padded

PEOPLE = ("Mary", "John", "Sandra", "Daniel")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
OBJECTS = ("apple", "football", "milk", "book")
COUNTS = ("none", "one", "two", "three")
MAX_CARRY = len(COUNTS) - 1
TEMPLATES = {
    "move": ("{p} went to the {x}.", "{p} journeyed to the {x}.", "{p} travelled to the {x}.",
             "{p} moved to the {x}.", "{p} went back to the {x}."),
    "grab": ("{p} picked up the {x}.", "{p} got the {x}.", "{p} grabbed the {x}.", "{p} took the {x}.",
             "{p} got the {x} there."),
    "drop": ("{p} dropped the {x}.", "{p} put down the {x}.", "{p} discarded the {x}.", "{p} left the {x}."),
    "give": ("{p} gave the {x} to {q}.", "{p} handed the {x} to {q}.", "{p} passed the {x} to {q}."),
}
QUESTIONS = {
    "qa1": "Where is {p}", "qa2": "Where is the {o}", "qa3": "Where was the {o} before the {l}",
    "qa6": "Is {p} in the {l}", "qa7": "How many objects is {p} carrying",
}
PROMPT = "Question: {}?\nAnswer: "
ANSWER_END = "\n"
# Per task: the label set, the actions with their draw weights, and the default story length.
SPECS = {
    "qa1": (LOCATIONS, {"move": 1.0}, 6),
    "qa2": (LOCATIONS, {"move": 0.5, "grab": 0.3, "drop": 0.2}, 10),
    "qa3": (LOCATIONS, {"move": 0.5, "grab": 0.35, "drop": 0.15}, 12),
    "qa6": (("yes", "no"), {"move": 1.0}, 6),
    "qa7": (COUNTS, {"move": 0.3, "grab": 0.45, "drop": 0.1, "give": 0.15}, 10),
}


@dataclasses.dataclass
class World:
    """The true state; `place[p] is None` until a fact has moved person p somewhere."""

    object_at: dict  # object -> location (hidden until the object is first picked up)
    place: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(PEOPLE))
    holder: dict = dataclasses.field(default_factory=lambda: dict.fromkeys(OBJECTS))
    trail: dict = dataclasses.field(default_factory=lambda: {o: [] for o in OBJECTS})  # known locations
    handlers: set = dataclasses.field(default_factory=set)  # people who have held an object

    def carried(self, person: str) -> list[str]:
        return [o for o in OBJECTS if self.holder[o] == person]

    def legal(self, kind: str) -> list[tuple]:
        placed = [p for p in PEOPLE if self.place[p] is not None]
        if kind == "move":
            return [(p, loc) for p in PEOPLE for loc in LOCATIONS if loc != self.place[p]]
        if kind == "grab":
            return [(p, o) for p in placed for o in OBJECTS if self.holder[o] is None
                    and self.object_at[o] == self.place[p] and len(self.carried(p)) < MAX_CARRY]
        if kind == "drop":
            return [(self.holder[o], o) for o in OBJECTS if self.holder[o] is not None]
        return [(self.holder[o], o, q) for o in OBJECTS for q in placed if self.holder[o] not in (None, q)
                and self.place[q] == self.place[self.holder[o]] and len(self.carried(q)) < MAX_CARRY]

    def apply(self, kind: str, action: tuple) -> None:
        if kind == "move":
            person, loc = action
            self.place[person] = loc
            for o in self.carried(person):
                self._locate(o, loc)
        elif kind == "grab":
            person, o = action
            self.holder[o] = person
            self.handlers.add(person)
            self._locate(o, self.place[person])
        elif kind == "drop":
            self.holder[action[1]] = None
        else:
            self.holder[action[1]] = action[2]
            self.handlers.add(action[2])

    def _locate(self, o: str, loc: str) -> None:
        self.object_at[o] = loc
        if not self.trail[o] or self.trail[o][-1] != loc:
            self.trail[o].append(loc)


def fact_text(rng: np.random.Generator, kind: str, action: tuple) -> str:
    template = TEMPLATES[kind][rng.integers(len(TEMPLATES[kind]))]
    return template.format(p=action[0], x=action[1], q=action[2] if kind == "give" else "")


def simulate(rng: np.random.Generator, actions: dict, num_facts: int) -> tuple[World, list[str]]:
    world = World(object_at={o: LOCATIONS[rng.integers(len(LOCATIONS))] for o in OBJECTS})
    kinds, weights = list(actions), np.asarray(list(actions.values()))
    facts = []
    for _ in range(num_facts):
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        options = world.legal(kind)
        if not options:  # e.g. a drop with nobody carrying anything
            kind, options = "move", world.legal("move")
        action = options[rng.integers(len(options))]
        world.apply(kind, action)
        facts.append(fact_text(rng, kind, action))
    return world, facts


def ask(rng: np.random.Generator, task: str, world: World) -> tuple[str, str] | None:
    """(question, answer) about the final state, or None when the story supports no question."""
    placed = [p for p in PEOPLE if world.place[p] is not None]
    if task == "qa1":
        p = placed[rng.integers(len(placed))]
        return QUESTIONS[task].format(p=p), world.place[p]
    if task == "qa6":
        p = placed[rng.integers(len(placed))]
        elsewhere = [x for x in LOCATIONS if x != world.place[p]]
        asked = world.place[p] if rng.uniform() < 0.5 else elsewhere[rng.integers(len(elsewhere))]
        return QUESTIONS[task].format(p=p, l=asked), "yes" if asked == world.place[p] else "no"
    if task == "qa2":
        known = [o for o in OBJECTS if world.trail[o]]
        if not known:
            return None
        o = known[rng.integers(len(known))]
        return QUESTIONS[task].format(o=o), world.object_at[o]
    if task == "qa3":
        cases = [(o, i) for o in OBJECTS for i, loc in enumerate(world.trail[o]) if i > 0
                 and world.trail[o].count(loc) == 1]
        if not cases:
            return None
        o, i = cases[rng.integers(len(cases))]
        return QUESTIONS[task].format(o=o, l=world.trail[o][i]), world.trail[o][i - 1]
    # qa7: ask about someone who has held an object (so "none" means counting a drop or a give) when
    # anyone has, and draw the count first among those present, so "none" does not swamp the label set.
    placed = [p for p in placed if p in world.handlers] or placed
    counts = sorted({len(world.carried(p)) for p in placed})
    count = counts[rng.integers(len(counts))]
    chosen = [p for p in placed if len(world.carried(p)) == count]
    return QUESTIONS[task].format(p=chosen[rng.integers(len(chosen))]), COUNTS[count]


class BabiQA(TaskSource):
    def __init__(self, seq_len: int = 1024, *, task: str = "qa1", filler: str = "text", tokenizer=None,
                 num_facts: int | None = None, seed: int = 0, num_examples: int = 1_000_000):
        super().__init__(seq_len, seed, num_examples)
        if task not in SPECS:
            raise ValueError(f"task must be one of {tuple(SPECS)}, got {task!r}")
        self.task, self.name = task, f"babi_{task}"
        self.labels, self.actions, default_facts = SPECS[task]
        self.num_facts = default_facts if num_facts is None else num_facts
        if not isinstance(self.num_facts, (int, np.integer)) or self.num_facts < 1:
            raise ValueError(f"num_facts must be a positive integer, got {num_facts!r}")
        self.tokenizer = tokenizer or ByteTokenizer()
        self.filler = Filler(filler, self.tokenizer)
        self.pad_id = self.tokenizer.eos_id
        label_tokens = [np.asarray(self.tokenizer.encode(label + ANSWER_END), np.int32) for label in self.labels]
        self.slot = max(len(t) for t in label_tokens)
        self.label_ids = np.stack([padded(t, self.slot) for t in label_tokens])

        # Byte lengths bound token counts (a byte-level token stands for at least one byte).
        longest = lambda *groups: max((w for g in groups for w in g), key=len)  # noqa: E731
        person, thing = longest(PEOPLE), longest(LOCATIONS, OBJECTS)
        fact_bytes = 1 + max(len(t.format(p=person, x=thing, q=person)) for kind in self.actions
                             for t in TEMPLATES[kind])
        question = QUESTIONS[task].format(p=person, o=longest(OBJECTS), l=longest(LOCATIONS))
        question_bytes = len(PROMPT.format(question))
        need = 1 + self.num_facts * fact_bytes + question_bytes + self.slot
        if self.seq_len < need:
            raise ValueError(f"seq_len={seq_len} is too short for {self.name} with num_facts={self.num_facts} "
                             f"(needs >= {need}); lower num_facts or raise seq_len")

    def story(self, rng: np.random.Generator) -> tuple[list[str], str, str]:
        """(facts, question, answer); stories that support no question are drawn again."""
        for _ in range(1000):
            world, facts = simulate(rng, self.actions, self.num_facts)
            qa = ask(rng, self.task, world)
            if qa is not None:
                return facts, *qa
        raise RuntimeError(f"{self.name}: no answerable story in 1000 draws; raise num_facts")

    def example(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        enc = lambda text: np.asarray(self.tokenizer.encode(text), np.int32)  # noqa: E731
        facts, question, answer = self.story(rng)
        fact_ids = [enc(f + self.filler.separator) for f in facts]
        question_ids = enc(PROMPT.format(question))
        budget = self.seq_len - self.slot - len(question_ids) - sum(len(f) for f in fact_ids)
        pieces = self.filler.fill(rng, budget)
        boundaries = np.sort(rng.integers(0, len(pieces) + 1, len(facts)))
        body = insert_at(pieces, list(zip(boundaries.tolist(), fact_ids)))
        label_index = self.labels.index(answer)
        answer_ids = self.label_ids[label_index][self.label_ids[label_index] >= 0]
        out = build_row(np.concatenate([*body, question_ids]), answer_ids, seq_len=self.seq_len, slot=self.slot,
                        eos_id=self.pad_id)
        out["label_index"] = np.int32(label_index)
        out["label_ids"] = self.label_ids.copy()
        return out
