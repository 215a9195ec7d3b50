"""The config schema and its validation.

`base_config()` is the schema: every key a config may have, with its default and type. Config files
start from it (`cfg = base_config()`) and change values. `validate(cfg)` runs before anything is
built or compiled and raises one `ConfigError` naming the offending field.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys
from typing import Any

import ml_collections

from memjax.models import registry


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field."""


COMPUTE_DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant")
DATA_SOURCES = ("stdlib", "text", "jsonl", "arrayrecord", "task")
TOKENIZERS = ("byte", "bpe")
NONFINITE_POLICIES = ("halt", "skip")
DISTRIBUTED_MODES = ("auto", "on", "off")

# Keys under these paths are free names (e.g. parameter groups); each value follows the sub-schema.
_FREE_KEY_SCHEMAS = {
    "optim.groups": {"pattern": "", "lr_mult": 1.0, "weight_decay": 0.0},
}


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0

    cfg.model = ml_collections.ConfigDict()
    cfg.model.vocab_size = 0  # 0: the tokenizer's vocabulary, rounded up to a multiple of 8
    cfg.model.d_model = 256
    cfg.model.num_layers = 4
    cfg.model.num_heads = 4
    cfg.model.d_ff = 0  # 0: SwiGLU width 8/3 * d_model rounded up to a multiple of 64
    # Comma-separated block names from the registry, cycled over the layers ("swa,swa,attention").
    cfg.model.block_pattern = "attention"
    cfg.model.tie_embeddings = True
    cfg.model.rope_base = 10_000.0
    cfg.model.norm_eps = 1e-6
    cfg.model.init_std = 0.02
    cfg.model.dtype = "float32"  # compute dtype; parameters stay float32
    # Each block's settings and each wrapper's (e.g. `hmt`: the decoder wrapped in the Hierarchical Memory
    # Transformer, off unless `enabled`), from their classes (memjax.models.registry).
    for name, defaults in registry.config_sections().items():
        cfg.model[name] = ml_collections.ConfigDict(defaults)

    cfg.train = ml_collections.ConfigDict()
    cfg.train.seq_len = 256
    cfg.train.batch_size = 16  # global, per optimizer step
    cfg.train.grad_accum_steps = 1
    cfg.train.steps = 1000
    cfg.train.stop_at_step = 0  # >0: checkpoint and exit at this step (the schedule still spans `steps`)
    cfg.train.log_every = 10
    cfg.train.eval_every = 200
    cfg.train.eval_batches = 8
    cfg.train.checkpoint_every = 200
    cfg.train.keep_checkpoints = 3  # the newest this many are kept; 0 keeps every checkpoint
    cfg.train.async_checkpoint = True
    cfg.train.init_from = ""  # workdir of another run: start from its latest parameters
    # A workdir whose every checkpoint was proven corrupt (and moved to <step>.corrupt) refuses to start
    # over from step 0 unless this is set: a silent restart would look like a resume.
    cfg.train.restart = False
    # Where checkpoints go (default <workdir>/checkpoints); may be a gs:// bucket shared by all hosts.
    cfg.train.checkpoint_dir = ""
    cfg.train.progress_bar = True
    # Non-finite loss or gradient norm: the update is never applied; "halt" stops the run with an error
    # naming the step, "skip" goes on and fails once more than `max_skipped_steps` steps were skipped.
    cfg.train.nonfinite = "halt"
    cfg.train.max_skipped_steps = 10
    cfg.train.inject_nan_at_step = 0  # fault-injection drill: make this step's loss NaN (0 = off)
    # Segment recurrence over long documents (memjax.segments). >0: each of the batch's lanes reads whole
    # documents in order, cut into segments of seq_len tokens; a step processes this many consecutive
    # segments per lane, carrying each block's memory (init_carry) from segment to segment and from step
    # to step, reset where a lane's next document starts. 0: packed rows, nothing carried.
    cfg.train.segments_per_step = 0
    cfg.train.bptt_segments = 0  # gradients flow through at most this many segments (0 = all of a step's)
    cfg.train.carry_across_documents = False  # keep the memory at a document boundary instead of resetting
    cfg.train.remat_segments = False  # recompute each segment's activations in the backward pass

    cfg.optim = ml_collections.ConfigDict()
    cfg.optim.lr = 3e-3
    cfg.optim.schedule = "cosine"
    cfg.optim.warmup_steps = 100  # clamped to train.steps (with a warning) for shorter runs
    cfg.optim.min_lr_ratio = 0.1
    cfg.optim.b1 = 0.9
    cfg.optim.b2 = 0.95
    cfg.optim.eps = 1e-8
    cfg.optim.weight_decay = 0.1  # applied to matrices (ndim >= 2) outside any group
    cfg.optim.clip_norm = 1.0  # 0 disables
    # name -> {pattern: regex on the "/"-joined parameter path, lr_mult, weight_decay}; first match wins.
    cfg.optim.groups = ml_collections.ConfigDict()
    cfg.optim.groups.embeddings = ml_collections.ConfigDict(
        {"pattern": r"(^|/)embed/", "lr_mult": 1.0, "weight_decay": 0.0}  # also under an HMT backbone/
    )

    # The device mesh (memjax.parallel): within-slice sizes of the data / fsdp / tensor axes and their
    # across-slice (DCN) multiples; -1 = whatever the devices leave (at most one -1 in each group).
    cfg.mesh = ml_collections.ConfigDict()
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1  # FSDP over every device by default: the batch and the weights are split
    cfg.mesh.tensor = 1
    cfg.mesh.dcn_data = 1
    cfg.mesh.dcn_fsdp = 1
    cfg.mesh.dcn_tensor = 1
    cfg.mesh.num_devices = 0  # use the first this many devices (0 = all of them)
    # Multi-process start (jax.distributed.initialize): "auto" when the environment is a TPU pod, a
    # multi-task SLURM job, mpirun or has JAX_COORDINATOR_ADDRESS; "on" always; "off" never.
    cfg.mesh.distributed = "auto"

    cfg.data = ml_collections.ConfigDict()
    cfg.data.source = "stdlib"
    cfg.data.paths = ""  # comma-separated globs for text / jsonl / arrayrecord
    cfg.data.val_paths = ""  # explicit validation files; otherwise a hash split of documents
    cfg.data.jsonl_field = "text"
    cfg.data.val_fraction = 0.05
    cfg.data.tokenizer = "byte"
    cfg.data.tokenizer_path = ""
    cfg.data.bpe_vocab_size = 4096
    cfg.data.bpe_train_bytes = 20_000_000
    cfg.data.prefetch = 2
    # data.source = "task": a generated task of memjax.tasks (memjax/data/task_batches.py). Its
    # examples depend only on a task seed and their index: training uses `seed`, evaluation
    # `task_eval_seed`, so the two must differ.
    cfg.data.task = ""  # e.g. "mqar", "niah_single", "babi_qa1"
    cfg.data.task_options = ""  # the task's options as "key=value,...", e.g. "num_kv_pairs=8,vocab_size=256"
    cfg.data.task_eval_seed = 1_000_000
    return cfg


def _type_ok(expected: Any, value: Any) -> bool:
    if isinstance(expected, bool):
        return isinstance(value, bool)
    if isinstance(expected, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(expected, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(expected))


def _unknown_key(field: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"config.{field}: unknown key{hint}")


def _check_keys(schema: Any, cfg: Any, path: str) -> None:
    for key in cfg.keys():
        field = f"{path}.{key}" if path else key
        if key not in schema:
            raise _unknown_key(field, key, schema.keys())
        expected, value = schema[key], cfg[key]
        if field in _FREE_KEY_SCHEMAS:
            if not isinstance(value, (dict, ml_collections.ConfigDict)):
                raise ConfigError(f"config.{field}: expected a dict of groups, got {type(value).__name__}")
            for name in value.keys():
                _check_keys(_FREE_KEY_SCHEMAS[field], value[name], f"{field}.{name}")
                missing = set(_FREE_KEY_SCHEMAS[field]) - set(value[name].keys())
                if missing:
                    raise ConfigError(f"config.{field}.{name}: missing {sorted(missing)}")
        elif isinstance(expected, (dict, ml_collections.ConfigDict)):
            if not isinstance(value, (dict, ml_collections.ConfigDict)):
                raise ConfigError(f"config.{field}: expected a section, got {type(value).__name__}")
            _check_keys(expected, value, field)
        elif not _type_ok(expected, value):
            raise ConfigError(
                f"config.{field}: expected {type(expected).__name__}, got {type(value).__name__} {value!r}"
            )


def check_override(path: str) -> None:
    """Raises ConfigError naming a `--config.<path>` override that the schema lacks, with the
    did-you-mean of `validate` (ml_collections would otherwise raise a KeyError deep in flag parsing)."""
    node, field, parts = base_config(), "", path.split(".")
    for i, key in enumerate(parts):
        field = f"{field}.{key}" if field else key
        if field in _FREE_KEY_SCHEMAS:
            # The next part is a free name (a group the config file defines), then its sub-schema.
            schema = _FREE_KEY_SCHEMAS[field]
            if len(parts) > i + 2 and parts[i + 2] not in schema:
                raise _unknown_key(".".join(parts[: i + 3]), parts[i + 2], schema)
            return
        known = node.keys() if isinstance(node, ml_collections.ConfigDict) else ()
        if key not in known:
            raise _unknown_key(field, key, known)
        node = node[key]


def _check_command_line(argv: list[str], flag_name: str) -> list[str]:
    """Raises ConfigError for a missing config file or an unknown override key; the override paths."""
    override = re.compile(rf"^--?(?:no)?{flag_name}\.([^=]+)")
    paths = []
    for i, arg in enumerate(argv):
        given = re.match(rf"^--?{flag_name}(=|$)", arg)
        if given:
            path = arg.split("=", 1)[1] if given.group(1) else (argv[i + 1] if i + 1 < len(argv) else "")
            path = path.split(":", 1)[0]  # "file.py:arg" passes arg to get_config
            if path and not os.path.isfile(path):
                what = "is a directory, not a config file" if os.path.isdir(path) else "no such file"
                raise ConfigError(f"--{flag_name}: {what}: {path}")
        match = override.match(arg)
        if match:
            check_override(match.group(1))
            paths.append(match.group(1))
    return paths


def parse_command_line(argv: list[str], flag_name: str = "config") -> list[str]:
    """The flags parser of the command lines that take `--config` (app.run(main, flags_parser=this)):
    a missing config file or an unknown `--config.*` key stops with one line naming it; the rest is
    absl's own parsing."""
    from absl import app

    try:
        overrides = _check_command_line(argv, flag_name)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    try:
        return app.parse_flags_with_usage(argv)
    except (KeyError, AttributeError) as err:
        # The schema allows the key but the config file does not define it: a free name such as a
        # parameter group (`--config.optim.groups.<name>.lr_mult`), which a command line cannot add.
        missing = re.search(r"'([^'\\]+)", str(err))
        path = next((p for p in overrides if missing and missing.group(1) in p.split(".")), None)
        if path is None:
            raise
        sys.exit(f"error: config.{path}: the config file defines no {missing.group(1)!r} to override; "
                 "add it in the config file")


def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {message}")


def _one_of(value: str, options: tuple[str, ...], field: str) -> None:
    _require(value in options, field, f"{value!r} is not one of {list(options)}")


def validate(cfg: ml_collections.ConfigDict, num_devices: int | None = None, num_slices: int = 1) -> None:
    """Raises ConfigError naming the first field that cannot work; with the device count (and slice
    count), also checks the mesh against them."""
    _check_keys(base_config(), cfg, "")
    m, t, o, d = cfg.model, cfg.train, cfg.optim, cfg.data

    for field in ("d_model", "num_layers", "num_heads"):
        _require(m[field] > 0, f"model.{field}", f"must be positive, got {m[field]}")
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer)")
    _require(m.d_ff >= 0, "model.d_ff", "must be >= 0 (0 = auto)")
    _require(
        m.d_model % m.num_heads == 0,
        "model.num_heads",
        f"{m.num_heads} heads do not divide model.d_model={m.d_model}",
    )
    _require((m.d_model // m.num_heads) % 2 == 0, "model.num_heads", "head dim must be even for RoPE")
    _one_of(m.dtype, COMPUTE_DTYPES, "model.dtype")
    names = registry.block_names(m)
    _require(bool(names), "model.block_pattern", "is empty")
    # Every name of the pattern, also those that num_layers never reaches: a typo there is still a typo.
    for name in registry.pattern_names(m):
        close = difflib.get_close_matches(name, list(registry.BLOCKS), n=1)
        _require(
            name in registry.BLOCKS,
            "model.block_pattern",
            f"unknown block {name!r}" + (f" (did you mean '{close[0]}'?)" if close else "")
            + f"; registered: {sorted(registry.BLOCKS)}",
        )
    for name in sorted(set(names)):
        registry.BLOCKS[name].validate(cfg, _require)
    wrappers = registry.enabled_wrappers(m)
    _require(len(wrappers) <= 1, f"model.{wrappers[-1]}.enabled" if wrappers else "model",
             f"only one wrapper can be enabled, got {wrappers}")
    for name in wrappers:
        registry.WRAPPERS[name].validate(cfg, _require)

    for field in ("seq_len", "batch_size", "grad_accum_steps", "steps", "log_every", "eval_every"):
        _require(t[field] > 0, f"train.{field}", f"must be positive, got {t[field]}")
    _one_of(t.nonfinite, NONFINITE_POLICIES, "train.nonfinite")
    for field in ("eval_batches", "checkpoint_every", "keep_checkpoints", "stop_at_step", "max_skipped_steps",
                  "inject_nan_at_step"):
        _require(t[field] >= 0, f"train.{field}", f"must be >= 0, got {t[field]}")
    _require(
        t.batch_size % t.grad_accum_steps == 0,
        "train.grad_accum_steps",
        f"{t.grad_accum_steps} does not divide train.batch_size={t.batch_size}",
    )
    for field in ("segments_per_step", "bptt_segments"):
        _require(t[field] >= 0, f"train.{field}", f"must be >= 0, got {t[field]}")
    if t.segments_per_step:
        _require(t.grad_accum_steps == 1, "train.grad_accum_steps",
                 "must be 1 with train.segments_per_step > 0 (each lane's memory runs through the whole batch)")
        _require(t.bptt_segments <= t.segments_per_step, "train.bptt_segments",
                 f"{t.bptt_segments} exceeds train.segments_per_step={t.segments_per_step}")
    else:
        for field in ("bptt_segments", "carry_across_documents", "remat_segments"):
            _require(not t[field], f"train.{field}", "only applies with train.segments_per_step > 0")
    _one_of(cfg.mesh.distributed, DISTRIBUTED_MODES, "mesh.distributed")
    _require(cfg.mesh.num_devices >= 0, "mesh.num_devices", f"must be >= 0 (0 = all), got {cfg.mesh.num_devices}")
    if num_devices:
        _require(cfg.mesh.num_devices <= num_devices, "mesh.num_devices",
                 f"{cfg.mesh.num_devices} exceeds the {num_devices} devices present")
        num_devices = cfg.mesh.num_devices or num_devices
        from memjax import parallel  # lazily: it imports flax

        try:
            ici, dcn = parallel.mesh_shape(cfg.mesh, num_devices, num_slices)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        sizes = {axis: i * d for axis, i, d in zip(parallel.MESH_AXES, ici, dcn)}
        lanes = sizes["data"] * sizes["fsdp"]
        micro = t.batch_size // t.grad_accum_steps
        _require(
            micro % lanes == 0,
            "train.batch_size",
            f"micro-batch {micro} (batch_size / grad_accum_steps) is not divisible by the {lanes} batch "
            f"shards of the mesh (data={sizes['data']} x fsdp={sizes['fsdp']})",
        )

    _require(o.lr > 0, "optim.lr", f"must be positive, got {o.lr}")
    _one_of(o.schedule, SCHEDULES, "optim.schedule")
    # Longer than the run is fine: optim.schedule clamps it to train.steps (a short trial of a big config).
    _require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optim.min_lr_ratio", "must lie in [0, 1]")
    _require(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, "optim.b1", "Adam betas must lie in [0, 1)")
    _require(o.weight_decay >= 0 and o.clip_norm >= 0, "optim.weight_decay", "weight decay and clip_norm must be >= 0")
    for name, group in o.groups.items():
        _require(group.lr_mult >= 0, f"optim.groups.{name}.lr_mult", "must be >= 0")
        try:
            re.compile(group.pattern)
        except re.error as err:
            raise ConfigError(f"config.optim.groups.{name}.pattern: invalid regex ({err})") from None

    _one_of(d.source, DATA_SOURCES, "data.source")
    _one_of(d.tokenizer, TOKENIZERS, "data.tokenizer")
    _require(
        d.source in ("stdlib", "task") or bool(d.paths.strip()),
        "data.paths",
        f"data.source={d.source!r} needs data.paths (comma-separated globs)",
    )
    _require(0.0 < d.val_fraction < 1.0 or bool(d.val_paths), "data.val_fraction", "must lie in (0, 1)")
    _require(d.bpe_vocab_size >= 260, "data.bpe_vocab_size", "must be >= 260 (bytes + specials)")
    _require(d.prefetch >= 0, "data.prefetch", "must be >= 0")
    if d.source == "task":
        _validate_task(cfg)


def _validate_task(cfg) -> None:
    from memjax.data import task_batches  # lazily: it imports grain and the task generators

    d = cfg.data
    _one_of(d.task, tuple(sorted(task_batches.TASKS)), "data.task")
    try:
        options = task_batches.parse_task_options(d.task_options)
    except ValueError as err:
        raise ConfigError(f"config.data.task_options: {err}") from None
    _require(cfg.seed >= 0, "seed", "must be >= 0 with data.source='task' (it seeds the training examples)")
    _require(d.task_eval_seed >= 0 and d.task_eval_seed != cfg.seed, "data.task_eval_seed",
             f"{d.task_eval_seed} must be >= 0 and differ from seed={cfg.seed}, "
             "or evaluation repeats training examples")
    _require(d.tokenizer == "byte" or bool(d.tokenizer_path), "data.tokenizer",
             "data.source='task' needs the byte tokenizer or a data.tokenizer_path "
             "(there is no corpus to train one on)")
    _require(not cfg.train.segments_per_step, "train.segments_per_step",
             "must be 0 with data.source='task' (a task's examples are rows, not documents)")
    try:  # the task's own checks: its options, and whether train.seq_len holds an example
        task_batches.build_task(d.task, cfg.train.seq_len, options, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"config.data.task_options: {d.task} at train.seq_len={cfg.train.seq_len}: {err}") from None


def load_config(path: str) -> ml_collections.ConfigDict:
    """The config at `path`: a run directory's (its config.json, as the run was trained) or a config
    file's (its `get_config()`)."""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return ml_collections.ConfigDict(json.load(f))
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def resolve_vocab_size(model_cfg, tokenizer_vocab: int) -> int:
    """The embedding size: the config's, or the tokenizer's rounded up to a multiple of 8."""
    if model_cfg.vocab_size == 0:
        return -(-tokenizer_vocab // 8) * 8
    if model_cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"config.model.vocab_size: {model_cfg.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokenizer_vocab}); set 0 to size it from the tokenizer"
        )
    return model_cfg.vocab_size
