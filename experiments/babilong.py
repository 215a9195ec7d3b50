"""BABILong-style QA: label accuracy vs context length for sliding-window attention against the Titans
memory hybrids, trained at a short length and tested far beyond it.

    python experiments/babilong.py [--preset quick|full] [--out DIR] [--only NAME]

bAbI facts ("Mary went to the kitchen.") scattered through real text (the stdlib corpus lines) with a
question at the end (memjax.tasks.babi). Each mixer trains on the task at `train_len`, then
memjax.evaluate scores it at every length by the best-scoring answer of the task's label set (chance:
1/6 for qa1-qa3, 1/2 for qa6, 1/4 for qa7). Outputs under experiments/results/babilong/: results.csv,
babilong.png (accuracy vs length, log x, one panel per task), README.md. A rerun skips finished runs.
"""

import study

PRESETS = {
    # Minutes on 2 CPU cores: qa1 (single supporting fact) with 4 facts, a small model.
    "quick": dict(tasks=("babi_qa1",), options={"babi_qa1": "num_facts=4"}, train_len=256,
                  lengths=(256, 512, 1024, 2048), mixers=("swa", "titans_mag", "titans_mal"), seeds=(0,),
                  model=dict(d_model=64, num_layers=2, steps=1000, batch_size=16, lr=3e-3, window=32, evals=5),
                  examples=64, eval_batch_size=16),
    # BABILong's figure: qa1-qa3 from 1K training up to 16K, LM2 and full attention as references.
    "full": dict(tasks=("babi_qa1", "babi_qa2", "babi_qa3"), options={}, train_len=1024,
                 lengths=(1024, 2048, 4096, 8192, 16384),
                 mixers=("swa", "titans_mag", "titans_mal", "lm2", "attention"), seeds=(0, 1),
                 model=dict(d_model=256, num_layers=4, steps=10_000, batch_size=32, lr=1e-3, window=128, evals=10),
                 examples=256, eval_batch_size=8),
}

if __name__ == "__main__":
    study.length_study("babilong", __doc__, PRESETS)
