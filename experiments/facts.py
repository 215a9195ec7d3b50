"""Closed-book fact recall: product-key memory layers vs dense SwiGLU FFNs of equal active FLOPs.

    python experiments/facts.py [--preset quick|full] [--out DIR] [--only NAME]

A fixed world of facts (memjax.tasks.facts: a subject of a few tokens -> one attribute token, the same world
for training and held-out rows) is trained at several world sizes. Each row strings together random
facts, so in-context recall cannot answer: the attributes must be stored in the parameters. Two models
per world size, alike except for the FFN of every layer:
  dense  attention + a SwiGLU FFN whose forward FLOPs per token equal the memory layer's
         (study.matched_swiglu_width);
  pkm    attention + a product-key memory (Memory+) in place of the FFN (Berges et al. 2024's claim:
         more facts recalled at the same active compute).
Accuracy is scored by memjax.evaluate on held-out rows (other example seed, same world). Every world
is trained for at least the same number of sightings per fact (steps = sightings x facts / facts seen
per step, and no fewer than the preset's min_steps), so a larger world gets more steps and the
comparison is one of capacity, not of exposure.
Outputs under experiments/results/facts/: results.csv, facts.png (accuracy vs number of facts),
README.md. A rerun skips finished runs.
"""

from __future__ import annotations

import itertools
import math

import study

PRESETS = {
    # Two-token subjects throughout (up to 16,129 facts). With a fixed 1500 steps, 1,024 facts were learnt
    # long before the end and 65,536 (23 sightings each) by neither model, so steps follow the world size,
    # with a floor: at 100 sightings alone the small worlds got 77 and 305 steps, too few for either model
    # to fit anything (accuracy 0.16-0.50), which measured optimisation, not capacity.
    # d_model 32 (2 heads) keeps the dense model small enough to run out of room inside the grid: at d_model
    # 64 both models recalled all 16,000 facts, which measures nothing about capacity.
    "quick": dict(num_facts=(1024, 4096, 16000), sightings=100, min_steps=1200, d_model=32, num_layers=2,
                  seq_len=63, batch_size=64, lr=3e-3, pkm={"n_keys": 128, "k_dim": 32, "k": 16, "heads": 2},
                  examples=512),
    "full": dict(num_facts=(4096, 16384, 65536, 262144), sightings=500, min_steps=2000, d_model=512, num_layers=6,
                 seq_len=255, batch_size=128, lr=1e-3, pkm={"n_keys": 512, "k_dim": 256, "k": 32, "heads": 4},
                 examples=4096),
}
MIXERS = ("dense", "pkm")


def train_steps(p: dict, num_facts: int) -> int:
    """Steps that show each fact `p["sightings"]` times on average, and at least `p["min_steps"]`."""
    from memjax.tasks.facts import Facts

    task = Facts(p["seq_len"], num_facts=num_facts, subject_tokens=Facts.fewest_subject_tokens(num_facts))
    return max(p["min_steps"], math.ceil(p["sightings"] * num_facts / (p["batch_size"] * task.facts_per_row)))


def config(p: dict, mixer: str, num_facts: int):
    from memjax.tasks.facts import Facts

    options = f"num_facts={num_facts},subject_tokens={Facts.fewest_subject_tokens(num_facts)}"
    cfg = study.task_config("facts", options, seq_len=p["seq_len"], mixer="pkm", d_model=p["d_model"],
                            num_layers=p["num_layers"], steps=train_steps(p, num_facts),
                            batch_size=p["batch_size"], lr=p["lr"],
                            window=p["seq_len"], **p["pkm"])
    if mixer == "dense":  # the same model with a SwiGLU FFN of the memory layer's forward FLOPs
        cfg.model.d_ff = study.matched_swiglu_width(cfg.model)
        study.set_mixer(cfg, "attention", window=p["seq_len"])
        del cfg.optim.groups["pkm_values"]
    return cfg


def ffn_flops_per_token(mixer: str, model_cfg) -> float:
    """Forward FLOPs per token of one layer's FFN: the memory layer's, or the dense SwiGLU's 6 d d_ff."""
    return study.pkm_forward_flops(model_cfg) if mixer == "pkm" else 6 * model_cfg.d_model * model_cfg.d_ff


def main(argv=None):
    from memjax import evaluate

    args = study.parse_args("facts", __doc__, argv)
    study.quiet()
    p = PRESETS[args.preset]
    s = study.Study("facts", args.out)
    runs = []
    for num_facts, mixer in itertools.product(p["num_facts"], MIXERS):
        cfg = config(p, mixer, num_facts)

        # The defaults bind this iteration's values (read only, never mutated).
        def run(workdir, cfg=cfg, meta=dict(num_facts=num_facts, mixer=mixer)):  # noqa: B006
            trained = study.train(cfg, workdir)
            scored = evaluate.evaluate_run(workdir, "facts", [cfg.train.seq_len], examples=p["examples"],
                                           batch_size=min(p["examples"], 256))
            return {**meta, "accuracy": scored[0]["value"], "n": scored[0]["n"], "steps": cfg.train.steps,
                    "params": trained["params"],
                    "non_embedding_params": trained["non_embedding_params"], "d_ff": cfg.model.d_ff,
                    "ffn_flops_per_token": ffn_flops_per_token(meta["mixer"], cfg.model),
                    "train_loss": trained["learning/loss"], "eval_loss": trained["eval/loss"]}

        runs.append((f"facts{num_facts}_{mixer}", cfg, run))
    results = s.run_all(runs, args.only)
    s.write_csv(results)

    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    study.plot_groups(ax, results, "num_facts", "accuracy", "mixer", logx=True)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("closed-book fact recall at equal active FLOPs")
    ax.legend()
    figure = study.save_figure(fig, s.path("facts.png"))
    chance = "1/128 attributes"
    s.write_summary(f"Fact recall: memory layers vs dense FFN ({args.preset} preset)", [
        f"d_model {p['d_model']}, {p['num_layers']} layers, rows of {p['seq_len'] + 1} tokens (facts one after "
        f"another: a subject of the fewest tokens that name the world's subjects, then its attribute; two tokens "
        f"up to 16,129 facts, three beyond), batch {p['batch_size']} for {p['sightings']} sightings of each fact on "
        f"average and at least {p['min_steps']} steps (the steps column), learning rate {p['lr']}; "
        f"product-key memory {p['pkm']} in every layer; the dense "
        f"model's SwiGLU width gives the same forward FLOPs per token. "
        f"Accuracy over the facts of {p['examples']} held-out rows (chance: {chance}).",
        study.markdown_table(sorted(results, key=lambda r: (r["num_facts"], r["mixer"])),
                             ["num_facts", "mixer", "accuracy", "steps", "d_ff", "ffn_flops_per_token", "params",
                              "eval_loss", "seconds"],
                             {"accuracy": ".4f", "ffn_flops_per_token": ",.0f", "params": ",", "eval_loss": ".3f",
                              "seconds": ".0f"}),
        f"![facts]({figure.rsplit('/', 1)[-1]})",
    ])
    print(f"wrote {s.dir}")


if __name__ == "__main__":
    main()
