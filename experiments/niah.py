"""Needle in a haystack (S-NIAH): exact match vs context length for sliding-window attention against
the Titans memory hybrids, trained at a short length and tested up to 8x (quick) or 16x (full) beyond.

    python experiments/niah.py [--preset quick|full] [--out DIR] [--only NAME]

Each mixer trains on niah_single (RULER's noise haystack, memjax.tasks) at `train_len` tokens, with
sliding windows shorter than that, so the needle is mostly out of the window's reach: the memory must
carry it. Scored by memjax.evaluate (exact match of the greedily decoded value, one teacher-forced
pass) at every length. Outputs under experiments/results/niah/: results.csv, niah.png (exact match vs
length, log x; dashed: the training length), README.md. A rerun skips finished runs.
"""

import study

PRESETS = {
    # Minutes on 2 CPU cores: a small model, short values (4 digits), noise haystack.
    "quick": dict(tasks=("niah_single",), options={"niah_single": "value_digits=4"}, train_len=256,
                  lengths=(256, 512, 1024, 2048), mixers=("swa", "titans_mag", "titans_mal"), seeds=(0,),
                  model=dict(d_model=64, num_layers=2, steps=1000, batch_size=16, lr=3e-3, window=32, evals=5),
                  examples=64, eval_batch_size=16),
    # The figure of Titans / ATLAS: 1K training, 1x-16x tests, three needle variants, LM2 and full
    # attention (which degrades beyond its training length) as references.
    "full": dict(tasks=("niah_single", "niah_multikey", "niah_multivalue"), options={}, train_len=1024,
                 lengths=(1024, 2048, 4096, 8192, 16384),
                 mixers=("swa", "titans_mag", "titans_mal", "lm2", "attention"), seeds=(0, 1),
                 model=dict(d_model=256, num_layers=4, steps=10_000, batch_size=32, lr=1e-3, window=128, evals=10),
                 examples=256, eval_batch_size=8),
}

if __name__ == "__main__":
    study.length_study("niah", __doc__, PRESETS)
