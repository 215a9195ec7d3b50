"""Sharding on 8 fake CPU devices: the rules cover every parameter of every block, sharded loss and
gradients equal the single-device run, the trainer trains the same on a mesh, checkpoints restore onto
another mesh, and the mesh / multi-host settings are checked before anything compiles.

Tolerance of the equivalence checks: float32, |sharded - single| <= 2e-4 x max|single| per gradient
leaf, that max floored at 1e-4 of the largest gradient of any leaf (a sharded reduction sums in another
order), and 1e-5 relative on the loss.

CI runs the baseline (attention, swa) on data, fsdp, tensor and mixed meshes, and every other block on
the mixed mesh (data=2 x fsdp=2 x tensor=2, which shards over all three kinds of axis at once).
MEMJAX_SHARDING_MATRIX=full runs every block on all four meshes.
"""

import os

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from memjax import checkpoint, config, parallel, trainer
from memjax.data import ByteTokenizer
from memjax.models import factory, registry
from tests.helpers import ROUNDING_GROWTH, tiny_config

MESHES = {
    "data": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
    "tensor": {"data": 4, "fsdp": 1, "tensor": 2},  # tiny heads (2) allow at most 2 tensor shards
    "mixed": {"data": 2, "fsdp": 2, "tensor": 2},
}
BASELINE = ("attention", "swa")
FULL = os.environ.get("MEMJAX_SHARDING_MATRIX") == "full"


def block_config(block: str, **overrides):
    """One layer of `block` (two for the baseline) at tiny sizes, batch 8 so every mesh splits it."""
    settings = {"model.block_pattern": block, "train.batch_size": 8, "model.num_layers": 2 if block in BASELINE else 1}
    if block in ("titans_mag", "titans_mal"):
        settings[f"model.{block}.window"] = 16
    if block == "lm2":
        settings["model.lm2.segment"] = 16
    if block == "hmt":
        settings = {**settings, "model.block_pattern": "attention", "model.hmt.enabled": True,
                    "model.hmt.segment_len": 16, "model.hmt.sensory_tokens": 4, "model.hmt.cache_size": 4,
                    "model.hmt.recall_dim": 16}
    return tiny_config(**{**settings, **overrides})


def with_mesh(cfg, sizes: dict):
    for axis, size in sizes.items():
        cfg.mesh[axis] = size
    cfg.mesh.num_devices = int(np.prod(list(sizes.values())))
    return cfg


def loss_and_grads(configs: dict):
    """Loss and parameter gradients of one fixed batch for each config (name -> config, all on the same
    mesh), jitted with each run's shardings as ONE program: tracing and compiling every block separately
    would cost minutes. Each model is its own (a single-layer stack per block), so a block's gradients
    are not blurred by rounding through the layers of others."""
    runs = {name: trainer.setup(cfg, None, tokenizer=ByteTokenizer()) for name, cfg in configs.items()}
    mesh = next(iter(runs.values())).mesh
    params_sharding = {name: run.shardings["params"] for name, run in runs.items()}
    cfg = next(iter(configs.values()))
    rng = np.random.default_rng(0)
    shape = (cfg.train.batch_size, cfg.train.seq_len)
    batch_np = {"inputs": rng.integers(0, 256, shape, dtype=np.int32),
                "targets": rng.integers(0, 256, shape, dtype=np.int32)}

    def losses(all_params, batch):
        out = {}
        for name, params in all_params.items():
            logits, _ = nnx.merge(runs[name].graphdef, params)(batch["inputs"])
            out[name] = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return sum(out.values()), out

    def build():
        return {name: factory.build(c.model, runs[name].vocab_size, jax.random.key(0))[1]
                for name, c in configs.items()}

    with jax.set_mesh(mesh):
        params = jax.jit(build, out_shardings=params_sharding)()
        batch = parallel.global_batch(batch_np, mesh)
        (_, values), grads = jax.jit(jax.value_and_grad(losses, has_aux=True),
                                     in_shardings=(params_sharding, parallel.batch_sharding(mesh)))(params, batch)
    values, grads = jax.device_get((values, grads))
    return {name: (float(values[name]), grads[name], sum(any(a is not None for a in x.sharding.spec)
                                                          for x in jax.tree_util.tree_leaves(params[name])))
            for name in configs}


def assert_same(reference, sharded, *, params_sharded=True, rounding_growth=1.0):
    (loss_1, grads_1, _), (loss_n, grads_n, sharded_leaves) = reference, sharded
    # Pure data parallelism replicates every parameter (only the batch is split); other meshes must
    # split some, or the comparison would prove nothing.
    assert (sharded_leaves > 0) == params_sharded, sharded_leaves
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    overall = max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads_1))
    for (path, g1), gn in zip(jax.tree_util.tree_leaves_with_path(grads_1), jax.tree_util.tree_leaves(grads_n)):
        # A leaf whose gradient is ~1e-8 of the others' (e.g. a saturated gate) is float32 rounding noise
        # of sums in another order: its scale is floored at 1e-4 of the largest gradient.
        scale = max(float(np.max(np.abs(g1))), 1e-4 * overall)
        np.testing.assert_allclose(gn, g1, rtol=0, atol=2e-4 * scale * rounding_growth,
                                   err_msg=jax.tree_util.keystr(path))


def blocks_on(mesh: str, half: int) -> list[str]:
    """The blocks checked on `mesh`, in two halves so that parallel test workers share the work."""
    names = [name for name in sorted(registry.load()) + ["hmt"] if FULL or name in BASELINE or mesh == "mixed"]
    return names[half::2]


_REFERENCES = {}


@pytest.mark.parametrize("half", [0, 1])
@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_loss_and_gradients_equal_one_device(mesh, half):
    names = blocks_on(mesh, half)
    missing = [name for name in names if name not in _REFERENCES]
    if missing:
        single = {"data": 1, "fsdp": 1, "tensor": 1}
        _REFERENCES.update(loss_and_grads({name: with_mesh(block_config(name), single) for name in missing}))
    sharded = loss_and_grads({name: with_mesh(block_config(name), MESHES[mesh]) for name in names})
    for name in names:
        try:
            assert_same(_REFERENCES[name], sharded[name], params_sharded=mesh != "data",
                        rounding_growth=ROUNDING_GROWTH.get(name, 1.0))
        except AssertionError as err:
            raise AssertionError(f"block {name} on the {mesh} mesh: {err}") from None


# ------------------------------------------------------------------------------------------ the rules


def all_blocks_model(**overrides):
    names = sorted(registry.load())
    cfg = tiny_config(**{"model.block_pattern": ",".join(names), "model.num_layers": len(names),
                         "model.titans_mag.window": 16, "model.titans_mal.window": 16, "model.lm2.segment": 16,
                         **overrides})
    return cfg, nnx.eval_shape(lambda: factory.make_model(cfg.model, 256, nnx.Rngs(params=0)))


def test_every_parameter_of_every_block_has_a_rule_and_every_rule_is_used():
    used, rules = set(), set(parallel.RULES)
    for hmt in (False, True):
        cfg, model = all_blocks_model(**({"model.hmt.enabled": True, "model.hmt.segment_len": 16} if hmt else {}))
        axes = parallel.logical_axes(model)  # raises if a parameter declares none
        used.update(name for names in axes.values() for name in names)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        mesh = parallel.make_mesh(with_mesh(cfg, MESHES["mixed"]).mesh)
        parallel.param_specs(model, params, mesh, cfg.model)  # raises MissingRuleError on a gap
        rules.update(parallel.rules(cfg.model))
    activations = {name for name in parallel.RULES if name.startswith("act_")}
    assert used - rules == set()
    assert rules - used - activations == set(), "rules no parameter uses (a typo?)"


def test_block_axes_come_from_the_blocks_in_use_and_generic_ones_stay_generic():
    cfg = tiny_config()
    assert parallel.rules(cfg.model) == parallel.RULES  # attention only: nothing block-private
    for name, cls in registry.load().items():
        assert not set(cls.axis_rules) & set(parallel.RULES), f"{name} redefines a generic axis"
    cfg.model.block_pattern = "attention,lm2"
    assert set(parallel.rules(cfg.model)) == set(parallel.RULES) | set(registry.BLOCKS["lm2"].axis_rules)
    cfg.model.hmt.enabled = True
    assert parallel.rules(cfg.model)["hmt_recall"] == "tensor"


def test_a_logical_axis_without_a_rule_is_an_error_naming_it(monkeypatch):
    cfg, model = all_blocks_model()
    monkeypatch.delitem(parallel.RULES, "mlp")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mesh = parallel.make_mesh(with_mesh(cfg, MESHES["mixed"]).mesh)
    with pytest.raises(parallel.MissingRuleError, match=r"blocks/0/mlp/\w+/kernel: logical axis 'mlp' has no rule"):
        parallel.param_specs(model, params, mesh, cfg.model)
    monkeypatch.delitem(registry.BLOCKS["lm2"].axis_rules, "lm2_slots")  # a block's own axis: the same error
    monkeypatch.setitem(parallel.RULES, "mlp", "tensor")
    with pytest.raises(parallel.MissingRuleError, match=r"initial_memory: logical axis 'lm2_slots' has no rule"):
        parallel.param_specs(model, params, mesh, cfg.model)


def test_memory_state_is_sharded_deliberately():
    """Neural-memory initial weights split by head over `tensor`; LM2's slot matrix split by width over
    fsdp, never by slot; the value
    table as model.pkm.value_shard_axis / mode say; embeddings over vocab (tensor) x embed (fsdp)."""
    cfg = with_mesh(tiny_config(**{"model.block_pattern": "titans_lmm,lm2,pkm", "model.num_layers": 3,
                                   "model.lm2.segment": 16, "train.batch_size": 8}), MESHES["mixed"])
    specs = {jax.tree_util.keystr(path): s.spec for path, s in
             jax.tree_util.tree_leaves_with_path(
                 trainer.setup(cfg, None, tokenizer=ByteTokenizer()).shardings["params"])}
    assert specs["['blocks'][0]['memory']['initial_state'][0]"] == P("tensor", None, None)
    assert specs["['blocks'][1]['initial_memory']"] == P(None, "fsdp")
    assert specs["['blocks'][2]['memory']['values']['table']"] == P(None, "tensor")  # one leaf, shared
    assert specs["['embed']['embedding']"] == P("tensor", "fsdp")
    cfg.model.pkm.value_shard_mode = "rows"
    cfg.model.pkm.value_shard_axis = "fsdp"
    specs = trainer.setup(cfg, None, tokenizer=ByteTokenizer()).shardings["params"]
    assert specs["blocks"][2]["memory"]["values"]["table"].spec == P("fsdp", None)


def test_optimizer_moments_follow_their_parameter_and_carries_split_by_lane():
    cfg = with_mesh(tiny_config(**{"model.block_pattern": "titans_lmm", "model.num_layers": 1, "train.batch_size": 8,
                                   "train.segments_per_step": 2}), MESHES["mixed"])
    run = trainer.setup(cfg, None, tokenizer=ByteTokenizer())
    kernel = run.shardings["params"]["blocks"][0]["mlp"]["up"]["kernel"].spec
    assert kernel == P("fsdp", "tensor")
    moments = [s.spec for path, s in jax.tree_util.tree_leaves_with_path(run.shardings["opt_state"])
               if jax.tree_util.keystr(path).endswith("['blocks'][0]['mlp']['up']['kernel']")]
    assert moments == [kernel, kernel]  # Adam's mu and nu
    carry = jax.tree_util.tree_leaves(run.shardings["carry"])
    assert carry and all(s.spec in (P(("data", "fsdp")), P()) for s in carry)
    assert any(s.spec == P(("data", "fsdp")) for s in carry)
    assert run.shardings["step"].spec == P()


def test_an_indivisible_dimension_is_replicated_and_reported():
    mesh = parallel.make_mesh(with_mesh(tiny_config(), MESHES["mixed"]).mesh)
    notes = []
    assert parallel.spec((3, 8), ("heads", "embed"), parallel.RULES, mesh, where="w",
                         replicated=notes) == P(None, "fsdp")
    assert notes == ["w dim heads=3 is not divisible by tensor=2"]
    # a mesh axis serves one dimension only
    assert parallel.spec((4, 4), ("embed", "embed"), parallel.RULES, mesh) == P("fsdp", None)


# ------------------------------------------------------------------------------ mesh and multi-host


@pytest.mark.parametrize("sizes,devices,expected", [
    ({}, 8, ((1, 8, 1), (1, 1, 1))),
    ({"fsdp": 2, "tensor": 2, "data": -1}, 8, ((2, 2, 2), (1, 1, 1))),
    ({"fsdp": 1, "data": -1, "dcn_data": 2}, 8, ((4, 1, 1), (2, 1, 1))),
])
def test_mesh_sizes_resolve_auto_axes(sizes, devices, expected):
    cfg = tiny_config(**{f"mesh.{k}": v for k, v in sizes.items()})
    assert parallel.mesh_shape(cfg.mesh, devices, num_slices=2 if "dcn_data" in sizes else 1) == expected


@pytest.mark.parametrize("overrides,message", [
    ({"mesh.num_devices": 0, "mesh.data": -1}, r"config\.mesh\.fsdp: only one of .* may be -1"),
    ({"mesh.num_devices": 0, "mesh.fsdp": 3}, r"config\.mesh\.\*: data=1 x fsdp=3 x tensor=1 = 3 devices, but 8"),
    ({"mesh.num_devices": 0, "mesh.fsdp": -1, "mesh.tensor": 3}, r"config\.mesh\.fsdp: -1 cannot fill 8 devices"),
    ({"mesh.num_devices": 0, "train.batch_size": 4}, r"config\.train\.batch_size: micro-batch 4 .* 8 batch shards"),
    ({"mesh.num_devices": 16}, r"config\.mesh\.num_devices: 16 exceeds the 8 devices"),
    ({"mesh.distributed": "maybe"}, r"config\.mesh\.distributed: 'maybe' is not one of"),
])
def test_mesh_errors_name_the_field_before_anything_compiles(overrides, message):
    with pytest.raises(config.ConfigError, match=message):
        trainer.setup(tiny_config(**overrides), None, tokenizer=ByteTokenizer())


@pytest.mark.parametrize("env,expected", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_multi_process_launches_are_detected(monkeypatch, env, expected):
    for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES", "SLURM_JOB_ID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda: calls.append(1))
    assert parallel.initialize_distributed("auto") is expected
    assert calls == ([1] if expected else [])
    assert parallel.initialize_distributed("off") is False


def test_process_local_rows_become_one_global_batch():
    mesh = parallel.make_mesh(with_mesh(tiny_config(), MESHES["mixed"]).mesh)
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    batch = parallel.global_batch({"inputs": rows}, mesh)
    assert batch["inputs"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), rows)


# ------------------------------------------------------------------- the trainer and checkpoints


def train_config(mesh_sizes, **overrides):
    cfg = tiny_config(**{"model.block_pattern": "attention,pkm", "model.pkm.n_keys": 16, "model.pkm.k": 4,
                         "model.pkm.k_dim": 16, "train.batch_size": 8, "train.steps": 4, "train.log_every": 2,
                         "train.eval_every": 4, "train.checkpoint_every": 4, "optim.warmup_steps": 2, **overrides})
    return with_mesh(cfg, mesh_sizes)


def test_training_on_a_mesh_equals_one_device(tmp_path):
    one = trainer.train(train_config({"data": 1, "fsdp": 1, "tensor": 1}), str(tmp_path / "one"))
    mixed = trainer.train(train_config(MESHES["mixed"]), str(tmp_path / "mixed"))
    for key in ("learning/loss", "learning/grad_norm", "eval/loss"):
        np.testing.assert_allclose(mixed[key], one[key], rtol=1e-4, err_msg=key)


def test_checkpoint_restores_onto_other_meshes(tmp_path):
    """Saved with fsdp=8; restored with tensor=2 x fsdp=4 and on one device: identical parameters and
    optimizer state, each laid out as its own mesh says."""
    workdir = str(tmp_path / "run")
    trainer.train(train_config({"data": 1, "fsdp": 8, "tensor": 1}), workdir)
    states = {}
    for name, sizes in {"fsdp8": MESHES["fsdp"], "tensor2xfsdp4": {"data": 1, "fsdp": 4, "tensor": 2},
                        "one": {"data": 1, "fsdp": 1, "tensor": 1}}.items():
        run = trainer.setup(train_config(sizes), None, tokenizer=ByteTokenizer())
        ckpt = checkpoint.Checkpointer(checkpoint.directory(workdir), keep=0, async_save=False, read_only=True)
        with jax.set_mesh(run.mesh):
            abstract = trainer.abstract_state(run)
            state = ckpt.restore(4, abstract, trainer.make_iterator(run, "train", 0, 1))
        ckpt.close()
        for x, want in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(abstract)):
            assert x.sharding.is_equivalent_to(want.sharding, x.ndim)
        states[name] = jax.device_get(state)
    assert int(states["one"]["step"]) == 4
    for name in ("tensor2xfsdp4", "one"):
        jax.tree_util.tree_map(np.testing.assert_array_equal, states[name], states["fsdp8"])
