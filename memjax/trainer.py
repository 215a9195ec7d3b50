"""The training loop: build, resume, step, evaluate, log, checkpoint."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from memjax import checkpoint, config, flops, metrics, optim, parallel, reliability, segments
from memjax.data import get_tokenizer, make_document_iterator, make_lm_iterator, task_batches
from memjax.models import factory
from memjax.tasks.scoring import TaskScorer

log = logging.getLogger("memjax")


@dataclass
class Run:
    """Everything a run builds from its config before the first step."""

    cfg: object
    tokenizer: object
    vocab_size: int
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    shardings: dict  # NamedSharding of every train-state leaf (same tree as abstract_state)
    abstract: dict  # the train state as ShapeDtypeStructs carrying those shardings


def abstract_state(run: Run) -> dict:
    """The train state as ShapeDtypeStructs carrying their shardings (what restores and AOT use)."""
    return run.abstract


def setup(cfg, workdir: str | None, tokenizer=None, devices=None) -> Run:
    """Validates the config, loads the tokenizer (unless given), builds the abstract model and optimizer,
    the device mesh (over `devices`, default all) and the train state's shardings."""
    devices = jax.devices() if devices is None else devices
    config.validate(cfg, len(devices), parallel.slice_count(devices))
    if workdir:
        reliability.check_resume_config(workdir, cfg)
        if cfg.data.tokenizer == "bpe" and not cfg.data.tokenizer_path:
            os.makedirs(workdir, exist_ok=True)  # the BPE tokenizer trained here is saved into it
    tokenizer = tokenizer or get_tokenizer(cfg.data, workdir)
    vocab_size = config.resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    if workdir:
        reliability.check_resume_tokenizer(workdir, vocab_size, tokenizer, cfg.train.checkpoint_dir)
    if cfg.data.source == "task":  # a task's token ids (e.g. MQAR's) must fit the embedding
        task_vocab = getattr(task_batches.config_task(cfg, "train", tokenizer), "vocab_size", 0)
        if task_vocab > vocab_size:
            raise config.ConfigError(f"config.data.task_options: {cfg.data.task} draws token ids below {task_vocab}, "
                                     f"beyond the model's vocabulary of {vocab_size}; raise model.vocab_size")
    graphdef, abstract_params = factory.abstract(cfg.model, vocab_size)
    model = factory.abstract_model(cfg.model, vocab_size)
    tx = optim.make(cfg.optim, model, cfg.train.steps)
    mesh = parallel.make_mesh(cfg.mesh, devices)
    run = Run(cfg, tokenizer, vocab_size, graphdef, tx, optim.schedule(cfg.optim, cfg.train.steps), mesh, {}, {})
    params_spec, replicated = parallel.param_specs(model, abstract_params, mesh, cfg.model)
    for message in replicated:
        log.warning("replicated, not sharded: %s", message)
    abstract = jax.eval_shape(lambda: init_state(run))  # traced once per run: it builds the whole model
    if workdir:
        check_resume_structure(run, workdir, abstract, model)
    run.shardings = parallel.named(mesh, parallel.state_specs(abstract, params_spec, mesh))
    run.abstract = parallel.with_shardings(abstract, run.shardings)
    return run


def check_resume_structure(run: Run, workdir: str, abstract: dict, model) -> None:
    """Before any restore: refuses a resume whose config gives the train state another structure than
    the one its checkpoints hold (e.g. optim.clip_norm switched off drops the clipping state, a new
    parameter group adds one), naming the settings that changed. Settings that keep the structure
    (steps, cadences, learning rate, schedule, ...) may change freely."""
    saved = reliability.saved_config(workdir, run.cfg)
    if saved is None:
        return
    changes = reliability.config_changes(saved, run.cfg)
    if all(reliability.is_free_on_resume(key) for key, _, _ in changes):
        return
    import ml_collections

    try:  # the saved config's train state, around the same parameters (the model config is checked equal)
        old_cfg = ml_collections.ConfigDict(saved)
        old_tx = optim.make(old_cfg.optim, model, old_cfg.train.steps)
        old_run = Run(old_cfg, run.tokenizer, run.vocab_size, run.graphdef, old_tx,
                      optim.schedule(old_cfg.optim, old_cfg.train.steps), run.mesh, {}, {})
        old = jax.eval_shape(lambda p: init_state(old_run, p), abstract["params"])
    except Exception as err:  # noqa: BLE001 - a config of an older memjax may not build; the restore decides
        log.debug("cannot rebuild the saved config's train state (%s); the restore will tell", err)
        return
    leaves = lambda tree: [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]  # noqa: E731
    if (jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(abstract)
            and leaves(old) == leaves(abstract)):
        return
    named = [c for c in changes if not reliability.is_free_on_resume(c[0])] or changes
    raise config.ConfigError(reliability.resume_refusal(workdir, named))


def initial_state(run: Run, params=None) -> dict:
    """A fresh train state, created directly in its shardings (never whole on one device)."""
    if params is None:
        return jax.jit(lambda: init_state(run), out_shardings=run.shardings)()
    return jax.jit(lambda p: init_state(run, p), out_shardings=run.shardings)(params)


def init_state(run: Run, params=None) -> dict:
    key = jax.random.key(run.cfg.seed)
    if params is None:
        _, params = factory.build(run.cfg.model, run.vocab_size, key)
    state = {
        "params": params,
        "opt_state": run.tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(key),
        "nonfinite": reliability.initial_guard_state(),
    }
    if run.cfg.train.segments_per_step:  # the lanes' memories, carried from step to step and checkpointed
        state["carry"] = initial_carry(run, params, run.cfg.train.batch_size)
    return state


def initial_carry(run: Run, params, batch_size: int) -> dict | None:
    return nnx.merge(run.graphdef, params).init_carry(batch_size)


def loss_sums(graphdef, params, batch, token_bytes) -> tuple[jax.Array, jax.Array | int, jax.Array]:
    """Summed cross-entropy (nats), token count and byte count of the targets; a batch with `weights`
    (a task's scored positions) gives the weighted sums, so only scored targets count."""
    logits_BxTxV, _ = nnx.merge(graphdef, params)(batch["inputs"])
    nats_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
    bytes_BxT = jnp.take(token_bytes, batch["targets"])
    if "weights" in batch:
        w_BxT = batch["weights"]
        return (nats_BxT * w_BxT).sum(), w_BxT.sum(), (bytes_BxT * w_BxT).sum()
    return nats_BxT.sum(), nats_BxT.size, bytes_BxT.sum()


def target_bytes(run: Run) -> jax.Array:
    """Bytes of text per token id [vocab_size] (ids beyond the tokenizer's: 0), for bits per byte."""
    token_bytes = jnp.asarray(run.tokenizer.token_bytes, jnp.float32)
    return jnp.pad(token_bytes, (0, run.vocab_size - token_bytes.shape[0]))


def make_train_step(run: Run) -> Callable:
    t = run.cfg.train
    accum = t.grad_accum_steps

    def mean_loss(params, batch, loss_scale, weight_total=None):
        logits_BxTxV, _ = nnx.merge(run.graphdef, params)(batch["inputs"])
        nats_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
        if weight_total is None:
            return nats_BxT.mean() * loss_scale
        # A task's loss: the scored targets' cross-entropy over the step's total weight (weight_total
        # is that over grad_accum_steps), so the micro-batches add up to one weighted mean.
        return (nats_BxT * batch["weights"]).sum() / weight_total * loss_scale

    grad_fn = jax.value_and_grad(mean_loss)

    def document_loss(params, batch, carry, loss_scale):
        nats, count, _, carry = segments.document_loss_sums(
            nnx.merge(run.graphdef, params), batch, carry, bptt=t.bptt_segments,
            reset=not t.carry_across_documents, remat=t.remat_segments)
        return nats / jnp.maximum(count, 1) * loss_scale, carry

    document_grad_fn = jax.value_and_grad(document_loss, has_aux=True)

    def train_step(state, batch):
        step = state["step"] + 1  # the step being taken, 1-based as logged
        loss_scale = jnp.where(step == t.inject_nan_at_step, jnp.nan, 1.0) if t.inject_nan_at_step else 1.0
        carry, weight_total = None, None
        if "weights" in batch:
            weight_total = batch["weights"].sum()
            weight_total = jnp.where(weight_total > 0, weight_total, 1.0) / accum  # nothing scored: loss 0
        if t.segments_per_step:  # validate() ensures accum == 1
            (loss, carry), grads = document_grad_fn(state["params"], batch, state["carry"], loss_scale)
        elif accum == 1:
            loss, grads = grad_fn(state["params"], batch, loss_scale, weight_total)
        else:
            micro = jax.tree_util.tree_map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

            def add_micro(carry, micro_batch):
                loss_i, grads_i = grad_fn(state["params"], micro_batch, loss_scale, weight_total)
                return jax.tree_util.tree_map(jnp.add, carry, (loss_i, grads_i)), None

            zeros = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state["params"]))
            (loss, grads), _ = jax.lax.scan(add_micro, zeros, micro)
            loss, grads = jax.tree_util.tree_map(lambda x: x / accum, (loss, grads))
        stats = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": run.lr_schedule(state["step"])}
        apply, guard = reliability.guard_update(state["nonfinite"], step, stats, halt=t.nonfinite == "halt")
        updates, opt_state = run.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A non-finite step leaves parameters and optimizer moments exactly as they were.
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)
        new_state = {
            **state,
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": step,
            "nonfinite": guard,
        }
        if carry is not None:
            new_state["carry"] = keep(carry, state["carry"])
        return new_state, stats

    replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, in_shardings=(run.shardings, parallel.batch_sharding(run.mesh)),
                   out_shardings=(run.shardings, replicated), donate_argnums=0)


def evaluate(eval_fn, params, batches, carry=None) -> dict[str, float]:
    """Loss, bits/byte and perplexity over the batches; with a carry (document batches), eval_fn also
    takes and returns it, so the lanes' memories run on from batch to batch."""
    nats = tokens = n_bytes = 0.0
    for batch in batches:
        if carry is None:
            s_nats, s_tokens, s_bytes = eval_fn(params, batch)
        else:
            s_nats, s_tokens, s_bytes, carry = eval_fn(params, batch, carry)
        nats, tokens, n_bytes = nats + float(s_nats), tokens + float(s_tokens), n_bytes + float(s_bytes)
    loss = nats / tokens
    return {
        "eval/loss": loss,
        "eval/bits_per_byte": nats / math.log(2) / max(n_bytes, 1.0),
        "eval/perplexity": math.exp(min(loss, 50.0)),
    }


def make_iterator(run: Run, split: str, shard_index: int, shard_count: int, *, shuffle: bool = True,
                  repeat: bool = True) -> Iterator[dict]:
    """Packed rows, whole documents in segments (train.segments_per_step > 0), or a generated task's
    examples (data.source = "task"; evaluation batches keep the fields its metric needs)."""
    t = run.cfg.train
    if run.cfg.data.source == "task":
        return task_batches.make_task_lm_iterator(
            run.cfg, run.tokenizer, split, batch_size=t.batch_size // shard_count, shard_index=shard_index,
            shard_count=shard_count, shuffle=shuffle, repeat=repeat,
            fields=task_batches.MODEL_FIELDS if split == "train" else None)
    common = dict(seq_len=t.seq_len, batch_size=t.batch_size // shard_count, seed=run.cfg.seed,
                  shard_index=shard_index, shard_count=shard_count, shuffle=shuffle, repeat=repeat)
    if t.segments_per_step:
        return make_document_iterator(run.cfg.data, run.tokenizer, split, segments=t.segments_per_step, **common)
    return make_lm_iterator(run.cfg.data, run.tokenizer, split, **common)


def validation_batches(run: Run, shard_index: int = 0, shard_count: int = 1) -> list[dict]:
    """The run's evaluation batches (train.eval_batches of the validation split, in order), as numpy."""
    t = run.cfg.train
    iterator = make_iterator(run, "validation", shard_index, shard_count, shuffle=False, repeat=False)
    batches = []
    for batch in iterator:
        if len(batches) == t.eval_batches:
            break
        batches.append(batch)
    if t.eval_batches and not batches:
        raise config.ConfigError(
            "config.train.eval_batches: the validation split holds less than one batch "
            f"({t.batch_size} x {t.seq_len + 1} tokens); raise data.val_fraction, set data.val_paths, or set 0"
        )
    return batches


def train(cfg, workdir: str) -> dict[str, float]:
    """Trains (resuming from `workdir` if it holds checkpoints); returns the last logged metrics."""
    reliability.check_workdir(workdir)
    # One lock per run: hosts of a multi-host run may share the workdir (e.g. NFS under SLURM). An
    # existing workdir is locked before the slow setup (tokenizer, data, tracing), so a second run on it
    # is told at once; a new one only once the data checks pass, so a bad config leaves nothing behind.
    primary = jax.process_index() == 0
    lock = reliability.WorkdirLock(workdir) if primary and os.path.isdir(workdir) else None
    try:
        run = setup(cfg, workdir)
        shard_index, shard_count = jax.process_index(), jax.process_count()
        # Data problems surface here, before the workdir is touched.
        train_iter = make_iterator(run, "train", shard_index, shard_count)
        eval_batches = validation_batches(run, shard_index, shard_count)
        if primary and lock is None:
            lock = reliability.WorkdirLock(workdir)
        os.makedirs(workdir, exist_ok=True)
        with jax.set_mesh(run.mesh):  # the sharded bag and activation constraints read it at trace time
            return _train_locked(run, workdir, train_iter, eval_batches)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(run: Run, workdir: str, train_iter, eval_batches) -> dict[str, float]:
    cfg, t = run.cfg, run.cfg.train
    ckpt = checkpoint.Checkpointer(checkpoint.directory(workdir, t.checkpoint_dir), keep=t.keep_checkpoints,
                                   async_save=t.async_checkpoint)
    abstract = abstract_state(run)
    try:
        restored = ckpt.restore_latest(abstract, train_iter, restart=t.restart)
    except BaseException:
        ckpt.close()
        raise
    # Only now, with the run's state settled, does this config become the run's config: a launch that
    # is refused above leaves the saved one (what the next launch is compared against) untouched.
    if jax.process_index() == 0:
        reliability.write_atomically(os.path.join(workdir, "config.json"), cfg.to_json(indent=2))
        reliability.write_run_info(workdir, cfg, run.vocab_size, run.tokenizer)
        # Records past the resumed step describe steps about to be trained again.
        metrics.keep_steps_up_to(workdir, restored[1] if restored is not None else 0)
    if restored is not None:
        state, latest = restored
        log.info("resumed from %s at step %d", ckpt.directory, latest)
    elif t.init_from:
        params, source_step = checkpoint.load_params(t.init_from, abstract["params"])
        state = initial_state(run, params)
        log.info("initialised parameters from %s (step %d)", t.init_from, source_step)
    else:
        state = initial_state(run)
    log.info("mesh %s over %d devices", dict(run.mesh.shape), run.mesh.size)

    n_params = factory.count_params(state["params"])
    flops_per_token = factory.flops_per_token(cfg.model, run.vocab_size, t.seq_len)
    peak, peak_source = flops.device_peak(cfg.model.dtype)
    peak *= run.mesh.size
    log.info("model: %s parameters, %.3g FLOPs/token; peak %.3g FLOP/s (%s)", f"{n_params:,}", flops_per_token, peak,
             peak_source)

    train_step = make_train_step(run)
    token_bytes = target_bytes(run)
    host_eval_batches = eval_batches  # this process's rows, as numpy: what the task metric takes
    eval_batches = [parallel.global_batch(b, run.mesh) for b in eval_batches]
    scorer = (TaskScorer(run.graphdef, cfg.data.task, run.mesh, run.tokenizer.eos_id)
              if cfg.data.source == "task" else None)
    if t.segments_per_step:
        eval_fn = jax.jit(lambda params, batch, carry: segments.document_loss_sums(
            nnx.merge(run.graphdef, params), batch, carry, reset=not t.carry_across_documents,
            token_bytes=token_bytes))
        # The blocks' diagnostics look at each segment alone.
        diagnostic_batches = [{"inputs": b["inputs"].reshape(-1, t.seq_len)} for b in eval_batches]
    else:
        eval_fn = jax.jit(lambda params, batch: loss_sums(run.graphdef, params, batch, token_bytes))
        diagnostic_batches = eval_batches
    writer = metrics.MetricsWriter(workdir)
    tokens_per_step = t.batch_size * t.seq_len * max(t.segments_per_step, 1)
    last_stop = min(t.stop_at_step or t.steps, t.steps)

    def check_nonfinite():
        reliability.check_guard(state["nonfinite"], t.nonfinite, t.max_skipped_steps)

    step = int(state["step"])
    bar = tqdm(total=t.steps, initial=step, unit="step", dynamic_ncols=True, disable=not t.progress_bar)
    pending, interval_start, last = [], time.perf_counter(), {}
    try:
        with reliability.StopRequest() as stop_request:
            while step < last_stop and not stop_request:
                batch = parallel.global_batch(next(train_iter), run.mesh)
                state, stats = train_step(state, batch)
                step += 1
                pending.append(stats)
                bar.update(1)
                if step % t.log_every == 0 or step == last_stop or stop_request:
                    last = _log_interval(writer, step, jax.device_get(pending), time.perf_counter() - interval_start,
                                         tokens_per_step, flops_per_token, peak, state)
                    bar.set_postfix(loss=f"{last['learning/loss']:.3f}", tok_s=f"{last['perf/tokens_per_sec']:,.0f}")
                    pending, interval_start = [], time.perf_counter()
                    check_nonfinite()
                if eval_batches and (step % t.eval_every == 0 or step == t.steps):
                    eval_carry = (initial_carry(run, state["params"], eval_batches[0]["inputs"].shape[0])
                                  if t.segments_per_step else None)
                    eval_metrics = evaluate(eval_fn, state["params"], eval_batches, eval_carry)
                    eval_metrics.update(factory.eval_metrics(cfg.model, run.graphdef, state["params"],
                                                             diagnostic_batches))
                    if scorer is not None:  # e.g. eval/mqar_accuracy
                        eval_metrics[f"eval/{scorer.metric}"] = scorer.score(state["params"], host_eval_batches)
                    writer.write(step, eval_metrics)
                    last.update(eval_metrics)
                    shown = {k: v for k, v in eval_metrics.items() if "/layer" not in k}  # per-layer ones: tensorboard
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
                    interval_start = time.perf_counter()  # keep eval time out of tokens/s
                if step == last_stop or stop_request or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    check_nonfinite()  # never checkpoint a state the policy rejects
                    ckpt.save(step, state, train_iter)
            if stop_request:
                log.warning("stopped by %s at step %d after saving a checkpoint; launch again to resume",
                            stop_request.signal_name, step)
    finally:
        bar.close()
        ckpt.wait()  # an async save in flight completes before the process exits
        ckpt.close()
        writer.close()
    if step < t.steps and not stop_request:
        log.info("stopped at step %d of %d (train.stop_at_step); the next launch resumes", step, t.steps)
    return last


def _log_interval(writer, step, stats, elapsed, tokens_per_step, flops_per_token, peak, state) -> dict:
    finite_losses = [s["loss"] for s in stats if np.isfinite(s["loss"])]
    finite_norms = [s["grad_norm"] for s in stats if np.isfinite(s["grad_norm"])]
    tokens_per_sec = len(stats) * tokens_per_step / elapsed
    record = {
        "learning/loss": float(np.mean(finite_losses)) if finite_losses else float("nan"),
        "learning/grad_norm": float(np.mean(finite_norms)) if finite_norms else float("nan"),
        "learning/lr": float(stats[-1]["lr"]),
        "learning/skipped_steps": float(state["nonfinite"]["skipped"]),
        "perf/tokens_per_sec": tokens_per_sec,
        "perf/step_time": elapsed / len(stats),
        "perf/mfu": tokens_per_sec * flops_per_token / peak,
    }
    writer.write(step, record)
    return record
