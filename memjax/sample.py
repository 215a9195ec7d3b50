"""`python -m memjax.sample --workdir runs/quick --prompt "def " [--max_new_tokens 200 --temperature 0.8]`

Decodes from the latest checkpoint of a run (or `--step`), with the run's own config and tokenizer.
"""

import sys

import jax
import jax.numpy as jnp
from absl import app, flags
from absl import logging as absl_logging

from memjax import checkpoint, config
from memjax.data import get_tokenizer
from memjax.models import factory
from memjax.sampling import generate

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by memjax.train.")
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy; otherwise softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample only among the k most likely tokens (0 = all).")
_NUM = flags.DEFINE_integer("num_samples", 1, "Independent continuations of the prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.mark_flag_as_required("workdir")


def sample_text(workdir: str, prompt: str, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
                num_samples: int = 1, seed: int = 0, step: int | None = None) -> list[str]:
    cfg = config.load_config(workdir)
    tokenizer = get_tokenizer(cfg.data, workdir)
    vocab_size = config.resolve_vocab_size(cfg.model, tokenizer.vocab_size)
    graphdef, abstract_params = factory.abstract(cfg.model, vocab_size)
    params, _ = checkpoint.load_params(workdir, abstract_params, step)
    ids = tokenizer.encode(prompt)
    if len(ids) == 0:  # an empty prompt starts as a new document does: after an EOS
        ids = [tokenizer.eos_id]
    prompt_BxP = jnp.tile(jnp.asarray(ids, jnp.int32)[None], (num_samples, 1))
    out_BxN = generate(graphdef, params, prompt_BxP, jax.random.key(seed), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k)
    return [tokenizer.decode([int(t) for t in row]) for row in jax.device_get(out_BxN)]


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        texts = sample_text(_WORKDIR.value, _PROMPT.value, max_new_tokens=_MAX_NEW.value,
                            temperature=_TEMPERATURE.value, top_k=_TOP_K.value, num_samples=_NUM.value,
                            seed=_SEED.value, step=_STEP.value)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    for i, text in enumerate(texts):
        print(f"--- sample {i} ---\n{_PROMPT.value}{text}")


if __name__ == "__main__":
    app.run(main)
