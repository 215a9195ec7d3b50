"""Serving a trained run at another chunk size: memjax.evaluate --chunk and experiments/serve_chunk.py."""

import os
import sys

import numpy as np
import pytest
from flax import nnx

from memjax import checkpoint, config, evaluate, trainer
from memjax.metrics import read_jsonl
from memjax.models import factory
from memjax.tasks.scoring import EvaluationError
from tests.helpers import tiny_config

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import serve_chunk  # noqa: E402

TITANS = {"model.block_pattern": "titans_lmm", "model.titans_lmm.chunk": 4, "model.titans_lmm.memory_depth": 1,
          "model.titans_lmm.heads": 2, "train.steps": 10, "train.eval_every": 10, "train.checkpoint_every": 10}


@pytest.fixture(scope="module")
def titans_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("titans_run"))
    trainer.train(tiny_config(**TITANS, **{"data.source": "task", "data.task": "mqar",
                                           "data.task_options": "vocab_size=64,num_kv_pairs=4"}), workdir)
    return workdir


def test_serve_config_sets_every_chunked_block_and_refuses_what_cannot_run():
    cfg = tiny_config(**{"model.block_pattern": "titans_lmm,attention,titans_mag", "model.num_layers": 3,
                              "model.titans_mag.window": 8})
    served = evaluate.serve_config(cfg, 8)
    assert (served.model.titans_lmm.chunk, served.model.titans_mag.chunk) == (8, 8)
    assert cfg.model.titans_lmm.chunk != 8  # the run's config is left alone
    assert evaluate.chunked_blocks(served.model) == ["titans_lmm", "titans_mag"]
    with pytest.raises(EvaluationError, match="no chunk setting"):
        evaluate.serve_config(tiny_config(), 8)
    with pytest.raises(EvaluationError, match="positive"):
        evaluate.serve_config(cfg, 0)
    mac = tiny_config(**{"model.block_pattern": "titans_mac", "model.titans_mac.segment": 16,
                         "model.titans_mac.chunk": 4})
    with pytest.raises(EvaluationError, match="--chunk 3.*segment"):
        evaluate.serve_config(mac, 3)


def test_evaluate_at_the_training_chunk_is_the_run_and_another_chunk_changes_it(titans_run):
    kwargs = dict(examples=8, batch_size=4, progress=False)
    as_trained = evaluate.evaluate_run(titans_run, "mqar", [32], **kwargs)
    same = evaluate.evaluate_run(titans_run, "mqar", [32], chunk=4, **kwargs)
    assert same[0]["value"] == as_trained[0]["value"]
    assert (as_trained[0]["chunk"], same[0]["chunk"]) == ("", 4)

    cfg = config.load_config(titans_run)
    run = trainer.setup(cfg, None)
    params, _ = checkpoint.load_params(titans_run, factory.abstract(cfg.model, run.vocab_size)[1])
    ids_BxT = np.random.default_rng(0).integers(0, 64, size=(2, 32))

    def logits_at(chunk):
        graphdef, _ = factory.abstract(evaluate.serve_config(cfg, chunk).model, run.vocab_size)
        return np.asarray(nnx.merge(graphdef, params)(ids_BxT)[0])

    logits = {chunk: logits_at(chunk) for chunk in (1, 4, 16)}
    # The memory's chunk is part of the function it computes: gradients are taken at the chunk start.
    assert not np.allclose(logits[1], logits[4], atol=1e-4)
    assert not np.allclose(logits[16], logits[4], atol=1e-4)
    # Tokens 0-3 form the first chunk at chunk 4 and the start of the first at chunk 16: both take
    # their gradients at the initial state and read causally, so their logits agree.
    np.testing.assert_allclose(logits[16][:, :4], logits[4][:, :4], rtol=1e-5, atol=1e-5)


def test_serve_chunk_study_scores_each_serving_chunk(titans_run):
    losses = serve_chunk.serve_losses(titans_run, (1, 4, 32))
    assert set(losses) == {1, 4, 32}
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    assert len(set(losses.values())) == 3
    logged = [r for r in read_jsonl(os.path.join(titans_run, "metrics.jsonl")) if "eval/loss" in r]
    # Served at its own chunk, the run's validation loss is the trainer's own evaluation at the last step.
    assert losses[4] == pytest.approx(logged[-1]["eval/loss"], rel=1e-5)


def test_serve_chunk_runs_scale_the_inner_step_to_their_chunk():
    p = serve_chunk.PRESETS["quick"]
    steps = {chunk: serve_chunk.run_config(p, chunk, 0).model[serve_chunk.MIXER].theta_max for chunk in (2, 4, 16)}
    assert steps == {2: 0.5, 4: 0.5, 16: 0.125}
    config.validate(serve_chunk.run_config(p, 16, 0))
