import re

import numpy as np
import pytest

from memjax.data import BPETokenizer, ByteTokenizer
from memjax.tasks import (
    ANSWER_PAD,
    IGNORE_INDEX,
    MQAR,
    NIAH,
    TASKS,
    BabiQA,
    Facts,
    ignore_index_labels,
    make_task,
    make_task_iterator,
    metrics,
    with_answer,
)
from memjax.tasks.filler import NOISE_TEXT, corpus_lines

TOK = ByteTokenizer()
EOS = TOK.eos_id


def assert_same_example(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def differs(a, b):
    return any(not np.array_equal(a[key], b[key]) for key in a)


def row_of(example):
    """The whole T + 1 token row: inputs plus the last target."""
    return np.concatenate([example["inputs"], example["targets"][-1:]])


def check_lm_layout(example, seq_len):
    assert example["inputs"].shape == example["targets"].shape == example["weights"].shape == (seq_len,)
    assert example["inputs"].dtype == example["targets"].dtype == np.int32
    assert example["weights"].dtype == np.float32
    # targets are next-token ids everywhere, so the unmasked trainer loss is well defined
    np.testing.assert_array_equal(example["targets"][:-1], example["inputs"][1:])


# ---------------------------------------------------------------- MQAR


@pytest.mark.parametrize("seq_len,kv,vocab", [(64, 8, 256), (255, 16, 256), (4096, 64, 8192)])
def test_mqar_format_and_labels(seq_len, kv, vocab):
    task = MQAR(seq_len, vocab_size=vocab, num_kv_pairs=kv, seed=3)
    for index in range(5):
        ex = task[index]
        check_lm_layout(ex, seq_len)
        keys, values = ex["inputs"][0 : 2 * kv : 2], ex["inputs"][1 : 2 * kv : 2]
        assert len(set(keys.tolist())) == kv and len(set(values.tolist())) == kv
        assert np.all((keys >= 1) & (keys < vocab // 2)) and np.all((values >= vocab // 2) & (values < vocab))
        value_of = dict(zip(keys.tolist(), values.tolist()))
        scored = np.flatnonzero(ex["weights"])
        assert set(np.unique(ex["weights"]).tolist()) <= {0.0, 1.0}
        assert len(scored) == kv and scored.min() >= 2 * kv
        assert sorted(ex["inputs"][scored].tolist()) == sorted(keys.tolist())  # each key queried once
        assert np.all((scored - 2 * kv) % 2 == 0)  # queries sit on even offsets of the query region
        for pos in scored:
            assert ex["targets"][pos] == value_of[int(ex["inputs"][pos])]
        assert ex["inputs"].min() >= 0 and ex["inputs"].max() < vocab


def test_mqar_determinism():
    task = MQAR(128, num_kv_pairs=8, seed=1)
    assert_same_example(task[7], MQAR(128, num_kv_pairs=8, seed=1)[7])
    assert differs(task[7], task[8])
    assert differs(task[7], MQAR(128, num_kv_pairs=8, seed=2)[7])


def test_mqar_gaps_follow_power_law():
    task = MQAR(256, num_kv_pairs=8, seed=0)
    slots = (256 + 1 - 16) // 2
    gaps = np.concatenate([(np.flatnonzero(task[i]["weights"]) - 16) // 2 for i in range(200)])
    # p(i) ~ i^-0.99 puts ~70% of the mass in the first quarter; uniform gaps would put 25% there.
    assert np.mean(gaps < slots // 4) > 0.55
    assert gaps.max() < slots


def test_mqar_without_noise_and_zoology_labels():
    ex = MQAR(64, num_kv_pairs=4, random_non_queries=False)[0]
    scored = np.flatnonzero(ex["weights"])
    filled = np.zeros(64, bool)
    filled[:8], filled[scored], filled[np.minimum(scored + 1, 63)] = True, True, True
    assert np.all(ex["inputs"][~filled] == 0)
    labels = ignore_index_labels(ex["targets"], ex["weights"])
    assert np.all(labels[scored] == ex["targets"][scored]) and np.sum(labels != IGNORE_INDEX) == 4


@pytest.mark.parametrize("kwargs,field", [
    ({"seq_len": 30, "num_kv_pairs": 8}, "seq_len"),
    ({"seq_len": 512, "num_kv_pairs": 200, "vocab_size": 256}, "num_kv_pairs"),
    ({"seq_len": 64, "vocab_size": 2}, "vocab_size"),
    ({"seq_len": 64, "power_a": 0.0}, "power_a"),
    ({"seq_len": 0}, "seq_len"),
])
def test_mqar_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MQAR(**kwargs)


# ---------------------------------------------------------------- closed-book facts


@pytest.mark.parametrize("seq_len,subject_tokens", [(64, 2), (33, 1), (100, 3)])
def test_facts_format_and_labels(seq_len, subject_tokens):
    task = Facts(seq_len, num_facts=50, subject_tokens=subject_tokens, world_seed=4, seed=2)
    world = {tuple(s): a for s, a in zip(task.subjects.tolist(), task.attributes.tolist())}
    assert len(world) == 50  # distinct subjects
    assert all(1 <= t < 128 for s in world for t in s) and all(128 <= a < 256 for a in world.values())
    for index in range(5):
        ex = task[index]
        check_lm_layout(ex, seq_len)
        row, scored = row_of(ex), np.flatnonzero(ex["weights"])
        assert len(scored) == (seq_len + 1) // (subject_tokens + 1) == task.facts_per_row
        for position in scored:  # the target after a subject's last token is that subject's attribute
            subject = tuple(row[position - subject_tokens + 1: position + 1].tolist())
            assert ex["targets"][position] == world[subject]


def test_facts_world_is_shared_by_seeds_and_examples_differ():
    train, held_out = Facts(64, num_facts=30, world_seed=1, seed=0), Facts(64, num_facts=30, world_seed=1, seed=9)
    np.testing.assert_array_equal(train.subjects, held_out.subjects)
    np.testing.assert_array_equal(train.attributes, held_out.attributes)
    assert differs(train[0], held_out[0])
    assert_same_example(train[3], Facts(64, num_facts=30, world_seed=1, seed=0)[3])
    other_world = Facts(64, num_facts=30, world_seed=2, seed=0)
    assert not np.array_equal(train.subjects, other_world.subjects)


@pytest.mark.parametrize("kwargs,field", [
    ({"num_facts": 127 * 127 + 1}, "num_facts"),
    ({"num_facts": 0}, "num_facts"),
    ({"subject_tokens": 0}, "subject_tokens"),
    ({"seq_len": 1}, "seq_len"),
    ({"world_seed": -1}, "world_seed"),
])
def test_facts_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Facts(**{"seq_len": 64, **kwargs})


def test_index_out_of_range():
    task = MQAR(64, num_examples=10)
    assert len(task) == 10
    with pytest.raises(IndexError):
        task[10]


# ---------------------------------------------------------------- S-NIAH

NEEDLE_RE = re.compile(r"One of the special magic numbers for (\S+) is: (\d+)\.")
QUERY_RE = re.compile(r"What is the special magic number for (\S+)\? The special magic number for \1 is: $")
QUERY_ALL_RE = re.compile(r"What are all the special magic numbers for (\S+)\? "
                          r"The special magic numbers for \1 are: $")


def parse_niah(ex, tok=TOK):
    """(prompt text, needles [(key, value, char offset)], queried key, answer text) of an example."""
    prompt_len = int(ex["prompt_len"])
    assert ex["inputs"][0] == tok.eos_id
    prompt = tok.decode(ex["inputs"][1:prompt_len])
    answer_ids = ex["answer_ids"][ex["answer_ids"] != ANSWER_PAD]
    answer = tok.decode(answer_ids)
    # the scored targets are exactly the answer, right after the prompt
    scored = np.flatnonzero(ex["weights"])
    np.testing.assert_array_equal(scored, np.arange(prompt_len - 1, prompt_len - 1 + len(answer_ids)))
    np.testing.assert_array_equal(ex["targets"][scored], answer_ids)
    query = QUERY_RE.search(prompt) or QUERY_ALL_RE.search(prompt)
    assert query is not None, prompt[-200:]
    needles = [(m.group(1), m.group(2), m.start()) for m in NEEDLE_RE.finditer(prompt)]
    return prompt[: query.start()], needles, query.group(1), answer


@pytest.mark.parametrize("haystack", ["noise", "text"])
@pytest.mark.parametrize("seq_len", [178, 1000, 4096])
def test_niah_single(haystack, seq_len):
    task = NIAH(seq_len, haystack=haystack, seed=4)
    for index in range(4):
        ex = task[index]
        check_lm_layout(ex, seq_len)
        hay, needles, key, answer = parse_niah(ex)
        assert len(needles) == 1
        (needle_key, value, _), = needles
        assert needle_key == key and re.fullmatch(r"[a-z]+-[a-z]+", key)
        assert re.fullmatch(r"[1-9]\d{6}", value)
        assert answer == value + "."


def test_niah_multikey_and_uuid_keys():
    task = NIAH(2048, variant="multikey", num_distractors=5, key_kind="uuid", value_digits=5, haystack="text")
    for index in range(4):
        hay, needles, key, answer = parse_niah(task[index])
        assert len(needles) == 6 and len({k for k, _, _ in needles}) == 6
        assert len({v for _, v, _ in needles}) == 6
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", key)
        matching = [v for k, v, _ in needles if k == key]
        assert len(matching) == 1 and answer == matching[0] + "." and len(matching[0]) == 5


def test_niah_multivalue_answer_is_values_in_text_order():
    task = NIAH(1024, variant="multivalue", num_values=4, haystack="noise")
    for index in range(6):
        hay, needles, key, answer = parse_niah(task[index])
        assert len(needles) == 4 and all(k == key for k, _, _ in needles)
        in_text_order = [v for _, v, _ in sorted(needles, key=lambda n: n[2])]
        assert len(set(in_text_order)) == 4
        assert answer == ", ".join(in_text_order) + "."


def test_niah_noise_haystack_is_filler_sentences():
    ex = NIAH(600, haystack="noise")[0]
    hay, needles, _, _ = parse_niah(ex)
    rest = NEEDLE_RE.sub("", hay).replace("  ", " ").rstrip("\n")
    filler = " ".join([NOISE_TEXT] * 20)
    # the haystack is the filler text, cut at its end (before the query's newline)
    assert filler.startswith(rest.strip()) or filler.startswith(rest.strip()[:-1]), rest[:200]


def test_niah_text_haystack_is_corpus_lines():
    ex = NIAH(3000, haystack="text")[1]
    hay, needles, _, _ = parse_niah(ex)
    lines = hay.split("\n")[:-1]  # each piece ends in a newline
    corpus = set(line.rstrip("\n") for line in corpus_lines())
    needle_lines = [line for line in lines if NEEDLE_RE.fullmatch(line)]
    text_lines = [line for line in lines if not NEEDLE_RE.fullmatch(line)]
    assert len(needle_lines) == 1 and len(text_lines) > 20
    assert all(line in corpus for line in text_lines[:-1])  # the last one may be cut


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_niah_depth(depth):
    task = NIAH(2000, haystack="noise", depth=depth)
    for index in range(3):
        ex = task[index]
        hay, needles, _, _ = parse_niah(ex)
        where = needles[0][2] / len(hay)
        assert abs(where - depth) < 0.05 and abs(float(ex["depth"]) - depth) < 0.05


def test_niah_random_depth_covers_haystack():
    depths = [float(NIAH(512)[i]["depth"]) for i in range(40)]
    assert min(depths) < 0.25 and max(depths) > 0.75


def test_niah_determinism():
    task = NIAH(512, variant="multikey", haystack="text", seed=9)
    assert_same_example(task[3], NIAH(512, variant="multikey", haystack="text", seed=9)[3])
    assert differs(task[3], task[4])


@pytest.mark.parametrize("kwargs,field", [
    ({"seq_len": 100}, "seq_len"),
    ({"seq_len": 600, "variant": "multivalue", "num_values": 8}, "seq_len"),
    ({"seq_len": 512, "variant": "triple"}, "variant"),
    ({"seq_len": 512, "haystack": "music"}, "haystack"),
    ({"seq_len": 512, "depth": 1.5}, "depth"),
    ({"seq_len": 512, "key_kind": "emoji"}, "key_kind"),
])
def test_niah_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        NIAH(**kwargs)


# ---------------------------------------------------------------- BABILong-style bAbI

FACT_RES = {
    "move": re.compile(r"(\w+) (?:went|journeyed|travelled|moved|went back) to the (\w+)\."),
    "grab": re.compile(r"(\w+) (?:picked up|got|grabbed|took) the (\w+)(?: there)?\."),
    "drop": re.compile(r"(\w+) (?:dropped|put down|discarded|left) the (\w+)\."),
    "give": re.compile(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\."),
}
QUESTION_RE = re.compile(r"Question: (.*)\?\nAnswer: $")
WORD_COUNTS = ["none", "one", "two", "three"]
ROOMS = {"bathroom", "bedroom", "garden", "hallway", "kitchen", "office"}
LABEL_SETS = {"qa1": ROOMS, "qa2": ROOMS, "qa3": ROOMS, "qa6": {"yes", "no"}, "qa7": set(WORD_COUNTS)}


def replay(facts, question):
    """The answer to `question` from the facts alone, by an independent re-simulation."""
    place, holder, at, trail = {}, {}, {}, {}

    def locate(obj, loc):
        at[obj] = loc
        if trail.setdefault(obj, [])[-1:] != [loc]:
            trail[obj].append(loc)

    for kind, args in facts:
        if kind == "move":
            person, loc = args
            place[person] = loc
            for obj in [o for o, h in holder.items() if h == person]:
                locate(obj, loc)
        elif kind == "grab":
            person, obj = args
            assert person in place and holder.get(obj) is None
            assert at.get(obj, place[person]) == place[person]  # a known object is grabbed where it is
            holder[obj] = person
            locate(obj, place[person])
        elif kind == "drop":
            person, obj = args
            assert holder.get(obj) == person
            holder[obj] = None
        else:
            giver, obj, taker = args
            assert holder.get(obj) == giver and place[giver] == place.get(taker)
            holder[obj] = taker
    if m := re.fullmatch(r"Where is the (\w+)", question):
        return at[m.group(1)]
    if m := re.fullmatch(r"Where is (\w+)", question):
        return place[m.group(1)]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)", question):
        path = trail[m.group(1)]
        assert path.count(m.group(2)) == 1 and path.index(m.group(2)) > 0, path
        return path[path.index(m.group(2)) - 1]
    if m := re.fullmatch(r"Is (\w+) in the (\w+)", question):
        return "yes" if place[m.group(1)] == m.group(2) else "no"
    m = re.fullmatch(r"How many objects is (\w+) carrying", question)
    assert m and m.group(1) in place
    return WORD_COUNTS[sum(h == m.group(1) for h in holder.values())]


def parse_babi(ex, whole_lines=True, tok=TOK):
    """(facts [(kind, args)], question, answer text) of an example, checking its layout."""
    prompt_len = int(ex["prompt_len"])
    assert ex["inputs"][0] == tok.eos_id
    prompt = tok.decode(ex["inputs"][1:prompt_len])
    question = QUESTION_RE.search(prompt)
    assert question is not None, prompt[-100:]
    story = prompt[: question.start()]
    found = sorted((m.start(), kind, m.group(0), m.groups())
                   for kind, pattern in FACT_RES.items() for m in pattern.finditer(story))
    if whole_lines:  # in real-text filler every fact is a line of its own
        lines = set(story.split("\n"))
        assert all(text in lines for _, _, text, _ in found)
    facts = [(kind, args) for _, kind, _, args in found]
    label_ids = ex["label_ids"][int(ex["label_index"])]
    np.testing.assert_array_equal(label_ids, ex["answer_ids"])
    answer_ids = label_ids[label_ids != ANSWER_PAD]
    scored = np.flatnonzero(ex["weights"])
    np.testing.assert_array_equal(ex["targets"][scored], answer_ids)
    assert scored[0] == prompt_len - 1
    answer = tok.decode(answer_ids)
    assert answer.endswith("\n")
    return facts, question.group(1), answer[:-1]


@pytest.mark.parametrize("qa", ["qa1", "qa2", "qa3", "qa6", "qa7"])
def test_babi_answers_follow_from_the_facts(qa):
    task = BabiQA(512, task=qa, seed=5)
    labels = {TOK.decode(ids[ids != ANSWER_PAD])[:-1] for ids in task[0]["label_ids"]}
    assert labels == LABEL_SETS[qa]
    answers = []
    for index in range(25):
        ex = task[index]
        check_lm_layout(ex, 512)
        facts, question, answer = parse_babi(ex)
        assert len(facts) == task.num_facts  # every fact is a whole line of its own
        if qa in ("qa1", "qa6"):
            assert {kind for kind, _ in facts} == {"move"}
        assert replay(facts, question) == answer
        answers.append(answer)
    assert len(set(answers)) >= 2


@pytest.mark.parametrize("seq_len", [300, 4096])
@pytest.mark.parametrize("filler", ["noise", "text"])
def test_babi_lengths_and_fillers(seq_len, filler):
    task = BabiQA(seq_len, task="qa2", filler=filler, num_facts=6)
    for index in range(3):
        ex = task[index]
        check_lm_layout(ex, seq_len)
        facts, question, answer = parse_babi(ex, whole_lines=filler == "text")
        assert len(facts) == 6 and replay(facts, question) == answer


def test_babi_facts_are_scattered_through_the_filler():
    task = BabiQA(4096, task="qa1")
    starts = []
    for index in range(10):
        prompt = TOK.decode(task[index]["inputs"])
        starts += [m.start() / len(prompt) for m in FACT_RES["move"].finditer(prompt)]
    assert min(starts) < 0.2 and max(starts) > 0.8


def test_babi_label_balance():
    yes = [BabiQA(256, task="qa6")[i]["label_index"] == 0 for i in range(100)]
    assert 0.3 < np.mean(yes) < 0.7
    rooms = {int(BabiQA(256, task="qa1")[i]["label_index"]) for i in range(60)}
    assert len(rooms) >= 5


def test_babi_determinism_and_validation():
    task = BabiQA(512, task="qa3", seed=2)
    assert_same_example(task[1], BabiQA(512, task="qa3", seed=2)[1])
    assert differs(task[1], task[2])
    with pytest.raises(ValueError, match="seq_len"):
        BabiQA(256, task="qa3")
    with pytest.raises(ValueError, match="task"):
        BabiQA(512, task="qa4")
    with pytest.raises(ValueError, match="num_facts"):
        BabiQA(512, task="qa1", num_facts=0)


def test_babi_label_scoring_plumbing():
    """with_answer rebuilds the rows of each label; an oracle of the true rows picks the true label."""
    batch = next(make_task_iterator(BabiQA(400, task="qa1"), batch_size=6))
    same = with_answer(batch, batch["answer_ids"], EOS)
    for key in ("inputs", "targets", "weights"):
        np.testing.assert_array_equal(same[key], batch[key])
    oracle_BxTxV = 10.0 * np.eye(257)[batch["targets"]]
    scores = np.stack([
        metrics.sequence_logprob(oracle_BxTxV, rows["targets"], rows["weights"])
        for rows in (with_answer(batch, batch["label_ids"][:, k], EOS) for k in range(6))
    ], axis=1)
    assert scores.shape == (6, 6)
    assert metrics.label_set_accuracy(scores, batch["label_index"]) == 1.0


def test_text_tasks_with_a_bpe_tokenizer():
    bpe = BPETokenizer.train(corpus_lines()[:2000] + ("One of the special magic numbers for",) * 20, 400)
    niah = NIAH(700, variant="multikey", haystack="text", tokenizer=bpe)
    for index in range(3):
        ex = niah[index]
        check_lm_layout(ex, 700)
        _, needles, key, answer = parse_niah(ex, tok=bpe)
        assert answer == [v for k, v, _ in needles if k == key][0] + "."
    babi = BabiQA(700, task="qa2", tokenizer=bpe)
    for index in range(3):
        ex = babi[index]
        check_lm_layout(ex, 700)
        facts, question, answer = parse_babi(ex, tok=bpe)
        assert len(facts) == babi.num_facts and replay(facts, question) == answer


# ---------------------------------------------------------------- metrics


def test_mqar_accuracy():
    targets = np.array([[1, 2, 3, 4]])
    weights = np.array([[1, 0, 1, 1]], np.float32)
    predictions = np.array([[1, 0, 0, 4]])
    assert metrics.mqar_accuracy(predictions, targets, weights) == pytest.approx(2 / 3)
    logits = np.eye(5)[predictions]
    assert metrics.mqar_accuracy(logits, targets, weights) == pytest.approx(2 / 3)
    zoology_labels = np.array([[1, IGNORE_INDEX, 3, 4]])
    assert metrics.mqar_accuracy(predictions, zoology_labels) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        metrics.mqar_accuracy(predictions, targets, np.zeros((1, 4)))


def test_exact_match():
    answers = np.array([[5, 6, ANSWER_PAD], [7, 8, 9], [1, 2, 3]])
    decoded = np.array([[5, 6, 0, 0], [7, 8, 0, 0], [1, 2, 3, 9]])  # pad is not compared; extra tokens ignored
    np.testing.assert_array_equal(metrics.exact_match_per_example(decoded, answers), [True, False, True])
    assert metrics.exact_match(decoded, answers) == pytest.approx(2 / 3)
    assert not metrics.exact_match_per_example(np.array([[7, 8]]), np.array([[7, 8, 9]]))[0]  # too short


def test_teacher_forced_exact_match():
    targets = np.array([[1, 2, 3], [1, 2, 3]])
    weights = np.array([[0, 1, 1], [0, 1, 1]])
    predictions = np.array([[9, 2, 3], [1, 2, 0]])  # wrong only off the answer / wrong on the answer
    np.testing.assert_array_equal(metrics.teacher_forced_exact_match(predictions, targets, weights), [True, False])


def test_sequence_logprob_and_label_set_accuracy():
    uniform = np.zeros((1, 3, 4))
    score = metrics.sequence_logprob(uniform, np.array([[0, 1, 2]]), np.array([[0, 1, 1]]))
    np.testing.assert_allclose(score, [2 * np.log(0.25)])
    peaked = np.array([[[0.0, 50.0, 0.0]]])
    np.testing.assert_allclose(metrics.sequence_logprob(peaked, np.array([[1]]), np.array([[1]])), [0.0], atol=1e-12)
    scores = np.array([[0.0, 1.0], [2.0, 1.0], [0.0, 0.5]])
    assert metrics.label_set_accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_niah_oracle_scores_exact_match():
    ex = NIAH(300)[0]
    batch = {k: v[None] for k, v in ex.items()}
    assert metrics.teacher_forced_exact_match(batch["targets"], batch["targets"], batch["weights"])[0]
    wrong = batch["targets"].copy()
    wrong[0, int(ex["prompt_len"]) + 2] += 1
    assert not metrics.teacher_forced_exact_match(wrong, batch["targets"], batch["weights"])[0]


# ---------------------------------------------------------------- registry and batching


def test_registry_builds_every_task_at_several_lengths():
    for name in TASKS:
        for seq_len in (512, 4096):
            task = make_task(name, seq_len)
            check_lm_layout(task[0], seq_len)
            assert task[0]["weights"].sum() > 0
    with pytest.raises(ValueError, match="unknown task"):
        make_task("niah_double", 512)
    with pytest.raises(ValueError, match="colour"):
        make_task("mqar", 64, colour="red")


def test_task_iterator():
    task = MQAR(64, num_kv_pairs=4, num_examples=10)
    batches = list(make_task_iterator(task, batch_size=4))
    assert len(batches) == 2  # the partial batch is dropped
    assert batches[0]["inputs"].shape == (4, 64) and batches[0]["weights"].dtype == np.float32
    np.testing.assert_array_equal(batches[1]["inputs"][0], task[4]["inputs"])

    shuffled = list(make_task_iterator(task, batch_size=5, shuffle=True, seed=3))
    again = list(make_task_iterator(task, batch_size=5, shuffle=True, seed=3))
    for a, b in zip(shuffled, again):
        assert_same_example(a, b)
    seen = sorted(int(np.flatnonzero([np.array_equal(r, task[i]["inputs"]) for i in range(10)])[0])
                  for b in shuffled for r in b["inputs"])
    assert seen == list(range(10))

    shard = next(make_task_iterator(task, batch_size=2, shard_index=1, shard_count=2))
    np.testing.assert_array_equal(shard["inputs"][1], task[3]["inputs"])

    iterator = make_task_iterator(task, batch_size=3, repeat=True, shuffle=True)
    next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(4)]  # crosses the epoch boundary
    iterator.set_state(state)
    for a in expected:
        assert_same_example(a, next(iterator))


def test_batches_of_text_tasks_stack():
    batch = next(make_task_iterator(NIAH(300, variant="multivalue", num_values=2), batch_size=3))
    assert batch["answer_ids"].shape == (3, 17) and batch["prompt_len"].shape == (3,)
    assert np.all(batch["prompt_len"] == 300 + 1 - 17)
