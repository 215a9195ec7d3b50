"""Training on generated tasks (data.source = "task"), memjax.evaluate, and the experiments' plumbing."""

import csv
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import config, evaluate, parallel, trainer
from memjax.data import ByteTokenizer
from memjax.data.task_batches import parse_task_options
from memjax.metrics import read_jsonl
from memjax.models import factory
from memjax.tasks import make_task, make_task_iterator, metrics, scoring, with_answer
from memjax.tasks.facts import Facts
from tests.helpers import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import facts  # noqa: E402
import scaling  # noqa: E402
import study  # noqa: E402

MQAR_OPTIONS = "vocab_size=64,num_kv_pairs=4"
EOS = ByteTokenizer().eos_id


def mqar_config(**overrides):
    return tiny_config(**{"data.source": "task", "data.task": "mqar", "data.task_options": MQAR_OPTIONS,
                          "train.steps": 20, "train.eval_every": 10, "train.checkpoint_every": 10, **overrides})


@pytest.fixture(scope="module")
def mqar_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mqar_run")
    result = trainer.train(mqar_config(), str(workdir))
    return workdir, result


def test_task_options_parse_to_typed_values():
    assert parse_task_options("num_kv_pairs=8, vocab_size=256,power_a=0.5,haystack=noise,depth=none,x=true") == {
        "num_kv_pairs": 8, "vocab_size": 256, "power_a": 0.5, "haystack": "noise", "depth": None, "x": True}
    assert parse_task_options("") == {}
    for bad, match in (("num_kv_pairs", "key=value"), ("a=1,a=2", "twice"), ("seq_len=5", "framework")):
        with pytest.raises(ValueError, match=match):
            parse_task_options(bad)


@pytest.mark.parametrize("overrides, field", [
    ({"data.task": "mqar2"}, "data.task"),
    ({"data.task_options": "num_kv_pairs"}, "data.task_options"),
    ({"data.task_options": "colour=red"}, "data.task_options"),
    ({"data.task_options": "num_kv_pairs=16"}, "data.task_options"),  # seq_len 32 is too short for 16 pairs
    ({"data.task_eval_seed": 0}, "data.task_eval_seed"),
    ({"data.tokenizer": "bpe"}, "data.tokenizer"),
])
def test_task_config_errors_name_the_field(overrides, field):
    with pytest.raises(config.ConfigError, match=rf"config\.{field}"):
        config.validate(mqar_config(**overrides))


def test_masked_loss_is_the_weighted_mean_of_the_scored_targets():
    cfg = mqar_config(**{"train.grad_accum_steps": 2})
    run = trainer.setup(cfg, None)
    state = trainer.initial_state(run)
    batch = next(make_task_iterator(make_task("mqar", 32, vocab_size=64, num_kv_pairs=4), batch_size=4))
    batch = {k: batch[k] for k in ("inputs", "targets", "weights")}
    batch["weights"][0, :] = 0.0  # a row with nothing scored, and rows with different counts
    batch["weights"][1, 3] = 1.0

    logits = np.asarray(nnx.merge(run.graphdef, state["params"])(jnp.asarray(batch["inputs"]))[0], np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    expected = (nll * batch["weights"]).sum() / batch["weights"].sum()

    nats, count, _ = jax.jit(lambda p, b: trainer.loss_sums(run.graphdef, p, b, jnp.ones(run.vocab_size)))(
        state["params"], batch)
    assert float(count) == batch["weights"].sum()
    assert float(nats) / float(count) == pytest.approx(expected, rel=1e-5)
    # The train step's loss: over both micro-batches, not the mean of their means.
    _, stats = trainer.make_train_step(run)(state, parallel.global_batch(batch, run.mesh))
    assert float(stats["loss"]) == pytest.approx(expected, rel=1e-5)
    unweighted = {k: batch[k] for k in ("inputs", "targets")}
    _, stats = trainer.make_train_step(run)(trainer.initial_state(run), parallel.global_batch(unweighted, run.mesh))
    assert float(stats["loss"]) == pytest.approx(nll.mean(), rel=1e-5)


def test_training_on_mqar_logs_the_task_metric(mqar_run):
    workdir, result = mqar_run
    evals = [r for r in read_jsonl(str(workdir / "metrics.jsonl")) if "eval/mqar_accuracy" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert all(0.0 <= r["eval/mqar_accuracy"] <= 1.0 for r in evals)
    assert 0.0 <= result["eval/mqar_accuracy"] <= 1.0 and np.isfinite(result["eval/loss"])


def test_task_training_on_a_sharded_mesh(tmp_path):
    # bAbI's metric re-batches the host rows (one forward pass per label) onto the 2-device mesh.
    cfg = mqar_config(**{"data.task": "babi_qa6", "data.task_options": "num_facts=2", "train.seq_len": 160,
                         "train.steps": 2, "train.eval_every": 2, "train.eval_batches": 1, "mesh.num_devices": 2,
                         "optim.warmup_steps": 1})
    result = trainer.train(cfg, str(tmp_path))
    assert 0.0 <= result["eval/label_accuracy"] <= 1.0 and np.isfinite(result["eval/loss"])


def test_scorer_matches_the_task_metrics():
    cfg = tiny_config()
    graphdef, params = factory.build(cfg.model, 264, jax.random.key(1))
    mesh = parallel.single_device_mesh()
    forward = jax.jit(lambda ids: nnx.merge(graphdef, params)(ids)[0])
    for name, length, options in (("mqar", 32, {"vocab_size": 64, "num_kv_pairs": 4}),
                                  ("facts", 32, {"num_facts": 40}),
                                  ("niah_single", 200, {"value_digits": 1}),
                                  ("babi_qa6", 160, {"num_facts": 2})):
        task = make_task(name, length, **options)
        batch = next(make_task_iterator(task, batch_size=4))
        correct, scored = scoring.TaskScorer(graphdef, name, mesh, pad_id=EOS).counts(params, batch)
        if name in ("mqar", "facts"):
            expected = metrics.mqar_accuracy(forward(batch["inputs"]), batch["targets"], batch["weights"])
        elif name.startswith("niah"):
            expected = metrics.teacher_forced_exact_match(forward(batch["inputs"]), batch["targets"],
                                                          batch["weights"]).mean()
        else:
            scores = np.stack([metrics.sequence_logprob(forward(b["inputs"]), b["targets"], b["weights"])
                               for b in (with_answer(batch, batch["label_ids"][:, k], EOS)
                                         for k in range(batch["label_ids"].shape[1]))], axis=1)
            expected = metrics.label_set_accuracy(scores, batch["label_index"])
        assert correct / scored == pytest.approx(expected), name


def test_evaluate_cli_writes_one_row_per_length(mqar_run, tmp_path):
    workdir, _ = mqar_run
    out = tmp_path / "mqar.csv"
    evaluate.main(["--workdir", str(workdir), "--task", "mqar", "--lengths", "32,64", "--examples", "12",
                   "--batch_size", "8", "--out", str(out)])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], r["length"], r["metric"], r["n"], r["step"]) for r in rows] == [
        ("mqar", "32", "mqar_accuracy", "16", "20"), ("mqar", "64", "mqar_accuracy", "16", "20")]
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)

    rows = evaluate.evaluate_run(str(workdir), "niah_single", [256], examples=4, batch_size=4,
                                 task_options="value_digits=2", depths=[0.0, 1.0], progress=False)
    assert [(r["length"], r["depth"], r["metric"]) for r in rows] == [(256, 0.0, "exact_match"),
                                                                     (256, 1.0, "exact_match")]


@pytest.mark.parametrize("args, message", [
    (["--task", "mqar9", "--lengths", "32"], "unknown task"),
    (["--task", "mqar", "--lengths", "8"], "too short"),
    (["--task", "babi_qa1", "--lengths", "64"], "too short"),
    (["--task", "mqar", "--lengths", "32", "--depths", "0.5"], "niah"),
])
def test_evaluate_cli_errors(mqar_run, args, message, capsys):
    workdir, _ = mqar_run
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--workdir", str(workdir), *args])


def test_evaluate_without_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        evaluate.main(["--workdir", str(tmp_path), "--task", "mqar", "--lengths", "32"])
    (tmp_path / "config.json").write_text(mqar_config().to_json())
    with pytest.raises(SystemExit, match="no checkpoint"):
        evaluate.main(["--workdir", str(tmp_path), "--task", "mqar", "--lengths", "32"])


def test_power_law_fit_recovers_known_parameters():
    n = np.geomspace(5e4, 3e6, 6)
    fit = scaling.fit_power_law(n, 1.2 + 30.0 * n**-0.35)
    assert fit["E"] == pytest.approx(1.2, rel=1e-3)
    assert fit["A"] == pytest.approx(30.0, rel=1e-2)
    assert fit["alpha"] == pytest.approx(0.35, rel=1e-3)
    noisy = (1.2 + 30.0 * n**-0.35) * np.exp(np.random.default_rng(0).normal(0, 0.003, n.size))
    boot = scaling.bootstrap_fit(n, noisy, samples=30)
    assert boot["alpha_lo"] <= boot["alpha"] <= boot["alpha_hi"] and boot["bootstrap_samples"] > 20


def test_study_skips_finished_runs_of_the_same_config(tmp_path):
    s = study.Study("demo", str(tmp_path))
    calls = []

    def run(name, fail=False, steps=10):
        cfg = tiny_config(**{"train.steps": steps})

        def fn(workdir):
            calls.append(name)
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, "config.json"), "w") as f:  # as the trainer does
                f.write(cfg.to_json())
            if fail:
                raise RuntimeError("interrupted")
            return {"value": len(name)}
        return name, cfg, fn

    with pytest.raises(RuntimeError):
        s.run_all([run("a"), run("bb", fail=True)])
    assert calls == ["a", "bb"] and s.result("a")["value"] == 1 and s.result("bb") is None
    results = s.run_all([run("a"), run("bb")])
    assert calls == ["a", "bb", "bb"]  # "a" was finished, "bb" runs again
    assert [r["value"] for r in results] == [1, 2]
    s.run_all([run("a"), run("bb")])
    assert len(calls) == 3
    assert [r["run"] for r in s.run_all([run("a"), run("c")], only="zz")] == ["a"]  # c is not run
    assert len(calls) == 3
    with open(s.write_csv(results), newline="") as f:
        assert [r["run"] for r in csv.DictReader(f)] == ["a", "bb"]
    # A finished run is not reused under a changed config, and nothing runs before the error.
    with pytest.raises(ValueError, match=r"bb \(train\.steps: 10 -> 20\).*Delete"):
        s.run_all([run("c"), run("a"), run("bb", steps=20)])
    assert len(calls) == 3


def test_facts_steps_give_each_fact_its_sightings_with_a_floor():
    p = dict(facts.PRESETS["quick"], sightings=100, seq_len=63, batch_size=64, min_steps=50)
    # two-token subjects: 64 // 3 = 21 facts per row, 1344 per step
    fewest = Facts.fewest_subject_tokens
    assert fewest(16000) == 2 and fewest(16129) == 2 and fewest(16130) == 3 and fewest(127) == 1
    assert facts.train_steps(p, 16000) == 1191  # ceil(100 * 16000 / 1344)
    assert facts.train_steps(p, 1344) == 100
    assert facts.train_steps(dict(p, sightings=500), 1344) == 500
    assert facts.train_steps(p, 100) == 50  # 8 steps of sightings, raised to the floor


def test_facts_rows_report_their_own_ffn_flops():
    """Each row's FFN FLOPs are its own model's: the dense row's SwiGLU, not the memory layer's."""
    p = facts.PRESETS["quick"]
    dense, pkm = facts.config(p, "dense", 1024), facts.config(p, "pkm", 1024)
    assert facts.ffn_flops_per_token("dense", dense.model) == 6 * dense.model.d_model * dense.model.d_ff
    assert facts.ffn_flops_per_token("pkm", pkm.model) == study.pkm_forward_flops(pkm.model)
    assert dense.model.d_ff == study.matched_swiglu_width(pkm.model)


def test_best_over_lrs_takes_the_best_mean_over_seeds_and_reports_the_spread(tmp_path):
    rows = [{"mixer": m, "lr": lr, "seed": seed, "accuracy": acc} for m, lr, seed, acc in (
        ("attention", 1e-3, 0, 0.2), ("attention", 1e-3, 1, 1.0),  # mean 0.6, best single run
        ("attention", 3e-3, 0, 0.7), ("attention", 3e-3, 1, 0.9),  # mean 0.8: the best learning rate
        ("swa", 1e-3, 0, 0.05))]
    best = {r["mixer"]: r for r in study.best_over_lrs(rows, ("mixer",), "accuracy")}
    assert best["attention"]["lr"] == 3e-3 and best["attention"]["accuracy"] == pytest.approx(0.8)
    assert (best["attention"]["accuracy_min"], best["attention"]["accuracy_max"]) == (0.7, 0.9)
    assert best["attention"]["accuracy_std"] == pytest.approx(0.1)
    assert [r["seed"] for r in best["attention"]["runs"]] == [0, 1] and best["attention"]["lrs_tried"] == 2
    assert best["swa"]["seeds"] == 1 and best["swa"]["accuracy_std"] == 0
    with open(tmp_path / "metrics.jsonl", "w") as f:  # a resumed run may log a step again: the last counts
        for step, acc in ((20, 0.5), (10, 0.1), (20, 0.6)):
            f.write(json.dumps({"step": step, "eval/mqar_accuracy": acc}) + "\n")
        f.write(json.dumps({"step": 30, "learning/loss": 1.0}) + "\n")
    assert study.curve(str(tmp_path), "eval/mqar_accuracy") == [[10, 0.1], [20, 0.6]]
