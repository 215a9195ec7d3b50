import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memjax import checkpoint, trainer
from memjax.data import ByteTokenizer
from memjax.metrics import read_jsonl
from memjax.models import factory
from memjax.sample import sample_text
from memjax.sampling import generate
from tests.helpers import tiny_config


def final_params(workdir, cfg):
    _, abstract = factory.abstract(cfg.model, 264)
    return checkpoint.load_params(str(workdir), abstract)


def losses(workdir):
    return {r["step"]: r["learning/loss"] for r in read_jsonl(str(workdir / "metrics.jsonl")) if "learning/loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    cfg = tiny_config(**{"train.steps": 40, "train.eval_every": 10})
    result = trainer.train(cfg, str(workdir))
    return workdir, cfg, result


def test_smoke_train_loss_falls_and_outputs_exist(trained):
    workdir, cfg, result = trained
    records = read_jsonl(str(workdir / "metrics.jsonl"))
    train_losses = [r["learning/loss"] for r in records if "learning/loss" in r]
    eval_losses = [r["eval/loss"] for r in records if "eval/loss" in r]
    assert train_losses[-1] < train_losses[0] - 1.0
    assert eval_losses[-1] < eval_losses[0]
    assert {"perf/tokens_per_sec", "perf/mfu", "learning/grad_norm", "learning/lr"} <= set(records[0])
    assert 0 < result["perf/mfu"] < 1
    assert result["eval/bits_per_byte"] == pytest.approx(result["eval/loss"] / np.log(2), rel=0.05)
    assert list((workdir / "tensorboard").iterdir())
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [20, 30, 40]


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    overrides = {"train.steps": 16, "train.log_every": 1, "train.checkpoint_every": 0, "train.eval_every": 100}
    cfg = tiny_config(**overrides)
    trainer.train(cfg, str(tmp_path / "straight"))

    cfg_stop = tiny_config(**overrides, **{"train.stop_at_step": 8, "train.async_checkpoint": True})
    trainer.train(cfg_stop, str(tmp_path / "resumed"))
    assert final_params(tmp_path / "resumed", cfg)[1] == 8
    trainer.train(tiny_config(**overrides), str(tmp_path / "resumed"))

    straight, straight_step = final_params(tmp_path / "straight", cfg)
    resumed, resumed_step = final_params(tmp_path / "resumed", cfg)
    assert straight_step == resumed_step == 16
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_gradient_accumulation_matches_the_full_batch_gradient(tmp_path):
    cfg = tiny_config()
    run = trainer.setup(cfg, None, tokenizer=ByteTokenizer())
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.integers(0, 257, (4, 32)), jnp.int32) for k in ("inputs", "targets")}
    _, stats_full = trainer.make_train_step(run)(trainer.init_state(run), batch)
    cfg.train.grad_accum_steps = 2
    run2 = trainer.setup(cfg, None, tokenizer=ByteTokenizer())
    _, stats_accum = trainer.make_train_step(run2)(trainer.init_state(run2), batch)
    np.testing.assert_allclose(stats_full["loss"], stats_accum["loss"], rtol=1e-5)
    np.testing.assert_allclose(stats_full["grad_norm"], stats_accum["grad_norm"], rtol=1e-4)


def test_init_from_starts_from_another_runs_parameters(trained, tmp_path):
    workdir, cfg, _ = trained
    # One step at warm-up lr 0 leaves the parameters as loaded (decoupled decay is scaled by lr too).
    cfg_new = tiny_config(**{"train.steps": 1, "optim.warmup_steps": 1, "train.init_from": str(workdir),
                             "train.eval_batches": 0})
    trainer.train(cfg_new, str(tmp_path))
    source, _ = final_params(workdir, cfg)
    started, _ = final_params(tmp_path, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(source), jax.tree_util.tree_leaves(started)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_greedy_decoding_equals_argmax_of_full_forward_passes(trained):
    workdir, cfg, _ = trained
    params, _ = final_params(workdir, cfg)
    graphdef, _ = factory.abstract(cfg.model, 264)
    prompt = jnp.asarray([list(b"def f(x):"), list(b"import os")], jnp.int32)
    out = generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=6)
    model = nnx.merge(graphdef, params)
    ids = prompt
    for _ in range(6):  # the reference: no cache, recompute everything
        logits, _ = model(ids)
        ids = jnp.concatenate([ids, jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ids[:, prompt.shape[1]:]))


def test_sampling_from_a_checkpoint(trained):
    workdir, _, _ = trained
    greedy = sample_text(str(workdir), "def ", max_new_tokens=12)
    assert len(greedy) == 1 and isinstance(greedy[0], str)
    samples = sample_text(str(workdir), "def ", max_new_tokens=12, temperature=1.0, top_k=20, num_samples=3, seed=1)
    assert len(samples) == 3 and len(set(samples)) > 1
    assert sample_text(str(workdir), "def ", max_new_tokens=12, temperature=1.0, seed=4) == \
        sample_text(str(workdir), "def ", max_new_tokens=12, temperature=1.0, seed=4)


def test_bpe_run_trains_its_tokenizer_into_the_workdir_and_samples_with_it(tmp_path):
    cfg = tiny_config(**{"data.tokenizer": "bpe", "data.bpe_vocab_size": 320, "data.bpe_train_bytes": 300_000,
                         "train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4,
                         "optim.warmup_steps": 2})
    result = trainer.train(cfg, str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    # A BPE token covers several bytes, so bits per byte are well below bits per token.
    assert result["eval/bits_per_byte"] < 0.95 * result["eval/loss"] / np.log(2)
    text = sample_text(str(tmp_path), "import ", max_new_tokens=5)[0]
    assert isinstance(text, str)


def test_command_line_reports_a_bad_config_before_doing_anything(tmp_path):
    import subprocess
    import sys

    workdir = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "memjax.train", "--config", "configs/quickstart.py", "--workdir", str(workdir),
         "--config.model.num_heads=3"],
        capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]), timeout=120,
    )
    assert proc.returncode != 0
    assert "config.model.num_heads: 3 heads do not divide model.d_model=128" in proc.stderr
    assert not workdir.exists()
