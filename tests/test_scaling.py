"""experiments/scaling.py: the L(x) fit and its bootstrap, the ordering of two curves, the presets' run
plans, the full preset's config file, and the whole pipeline on a tiny grid."""

import csv
import importlib.util
import math
import os
import sys

import numpy as np
import pytest

from memjax.config import validate
from memjax.models import factory
from tests.helpers import config_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import scaling  # noqa: E402

TRUTH = {"E": 1.7, "A": 60.0, "alpha": 0.4}


def _noisy_points(seed: int, noise: float, n=None):
    """Runs on a known curve with multiplicative noise; the two smallest sizes twice (two seeds)."""
    n = np.geomspace(8e3, 4e5, 6) if n is None else n
    n = np.concatenate([n[:2], n])
    rng = np.random.default_rng(seed)
    return n, scaling.power_law(TRUTH, n) * np.exp(noise * rng.standard_normal(len(n)))


def test_fit_recovers_a_known_power_law():
    n, loss = _noisy_points(0, 0.0)
    fit = scaling.fit_power_law(n, loss)
    for key, value in TRUTH.items():
        assert fit[key] == pytest.approx(value, rel=1e-3), key
    n, loss = _noisy_points(0, 0.002)  # the run-to-run spread of the quick preset's seeds
    fit = scaling.fit_power_law(n, loss)
    assert fit["alpha"] == pytest.approx(TRUTH["alpha"], abs=0.1)
    assert fit["E"] == pytest.approx(TRUTH["E"], abs=0.1)


def test_fit_starts_from_a_grid_and_keeps_the_best():
    n, loss = _noisy_points(1, 0.0)
    grid = scaling.start_grid(n, loss)
    assert len(grid) >= 50 and len({round(s[2], 6) for s in grid}) >= 5  # several exponents
    bad_start = [(math.log(0.01), math.log(1e-3), 4.9)]
    assert scaling.fit_power_law(n, loss, starts=bad_start)["objective"] > scaling.fit_power_law(n, loss)["objective"]


def test_bootstrap_interval_covers_the_truth_and_narrows_with_less_noise():
    n, loss = _noisy_points(2, 0.004)
    wide = scaling.bootstrap_fit(n, loss, samples=150, seed=0)
    for key, value in TRUTH.items():
        assert wide[f"{key}_lo"] <= value <= wide[f"{key}_hi"], (key, wide[f"{key}_lo"], wide[f"{key}_hi"])
        assert wide[f"{key}_lo"] <= wide[key] <= wide[f"{key}_hi"]
    assert wide["level"] == 0.9 and wide["bootstrap_samples"] >= 140
    n, loss = _noisy_points(2, 0.0005)
    narrow = scaling.bootstrap_fit(n, loss, samples=150, seed=0)
    assert narrow["alpha_hi"] - narrow["alpha_lo"] < wide["alpha_hi"] - wide["alpha_lo"]
    lo, hi = scaling.band(narrow, n)
    assert np.all(lo <= hi) and np.all(lo <= scaling.power_law(TRUTH, n) * 1.01)


def test_resamples_with_fewer_than_three_sizes_are_skipped():
    fit = scaling.bootstrap_fit([1e4, 1e4, 2e4, 4e4], [3.0, 3.01, 2.8, 2.6], samples=50, seed=0)
    assert fit["bootstrap_samples"] < 50
    assert all(len(d) for d in fit["draws"])


def _synthetic_results(curves: dict, noise: float = 0.002, seed: int = 0) -> list[dict]:
    """What study.run_all returns for the quick design, with bits/byte from known curves: a sweep at the
    two smallest sizes (3e-3 best, 1e-2 worse), their second seed, and four larger sizes."""
    rng = np.random.default_rng(seed)
    rows = []
    for mixer, curve in curves.items():
        for i, n in enumerate(np.geomspace(1e4, 4e5, 6)):
            loss = float(scaling.power_law(curve, n))
            runs = [("sweep", 3e-3, 0, loss), ("sweep", 1e-2, 0, loss + 0.3), ("seed", 3e-3, 1, loss)] if i < 2 \
                else [("size", 3e-3 * (16 * 2**i / 32) ** -0.5, 0, loss)]
            for phase, lr, s, value in runs:
                rows.append({"mixer": mixer, "d_model": 16 * 2**i, "num_layers": 2, "lr": lr, "seed": s,
                             "phase": phase, "tokens": 1e6 * (n / 3e4) ** 0.5, "non_embedding_params": int(n),
                             "flops": 6 * n * 1e6 * (n / 3e4) ** 0.5,
                             "eval/bits_per_byte": value * math.exp(noise * rng.standard_normal())})
    return rows


def test_points_keep_the_chosen_lr_and_every_seed():
    points = scaling.points_of(_synthetic_results({"a": TRUTH}))
    assert len(points) == 8  # 6 sizes, 2 seeds at the two smallest; the sweep's worse lr left out
    assert {p["lr"] for p in points if p["d_model"] <= 32} == {3e-3}


def test_summary_orders_separated_curves_and_not_equal_ones(tmp_path):
    low = dict(TRUTH, E=TRUTH["E"] - 0.15)
    results = _synthetic_results({"low": low, "high": TRUTH, "same": TRUTH})
    study = scaling.study.Study("scaling", str(tmp_path))
    p = dict(scaling.PRESETS["quick"], bootstrap=60)
    scaling.summarize(results, p, "quick", study)
    with open(tmp_path / "comparisons.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_pair = {}
    for row in rows:
        by_pair.setdefault((row["axis"], row["a"], row["b"]), []).append(row)
    assert {axis for axis, *_ in by_pair} == {"N", "C"}
    low_high = by_pair.get(("N", "low", "high")) or by_pair["N", "high", "low"]
    assert all(r["verdict"] == "low below high" for r in low_high)
    assert all(min(float(r["P(L_a<L_b)"]), 1 - float(r["P(L_a<L_b)"])) <= 0.05 for r in low_high)
    assert any(r["verdict"] == "not ordered at 90%" for r in by_pair["N", "high", "same"])
    summary = (tmp_path / "README.md").read_text()
    assert "low below high" in summary and "E = " in summary and "alpha = " in summary
    assert (tmp_path / "scaling.png").stat().st_size > 10_000
    with open(tmp_path / "fits.csv", encoding="utf-8") as f:
        fits = {(r["x"], r["mixer"]): r for r in csv.DictReader(f)}
    assert float(fits["N", "high"]["alpha_lo"]) <= TRUTH["alpha"] <= float(fits["N", "high"]["alpha_hi"])


def test_transfer_lr_follows_the_width_rule():
    assert scaling.transfer_lr({16: 1e-2, 32: 1e-2 / math.sqrt(2)}, 64, -0.5) == pytest.approx(5e-3)
    assert scaling.transfer_lr({16: 3e-3}, 512, 0.0) == pytest.approx(3e-3)


def test_quick_plan_has_the_issue_design():
    p = scaling.PRESETS["quick"]
    sweep = scaling.plan(p)
    assert all(meta["phase"] == "sweep" for *_, meta in sweep)  # the rest waits for the sweep's results
    finished = [{**meta, "run": name, "eval/bits_per_byte": 2.0 + 0.1 * (meta["lr"] != 3e-3)}
                for name, _, meta in sweep]
    runs = scaling.plan(p, finished)
    assert set(p["mixers"]) >= {"attention", "swa", "titans_mag"}
    for mixer in p["mixers"]:
        mine = [(cfg, meta) for _, cfg, meta in runs if meta["mixer"] == mixer]
        sizes = sorted({scaling.non_embedding_params(cfg) for cfg, _ in mine})
        assert len(sizes) >= 6 and sizes[-1] / sizes[0] >= 30, (mixer, sizes)
        for cfg, meta in mine:
            n = scaling.non_embedding_params(cfg)
            step = cfg.train.batch_size * cfg.train.seq_len
            assert meta["tokens"] == pytest.approx(scaling.quick_tokens(n), abs=step)
            assert meta["flops"] == pytest.approx(meta["flops_per_token"] * meta["tokens"])
        seeds = {}
        for cfg, meta in mine:
            if meta["phase"] != "sweep" or meta["lr"] == 3e-3:
                seeds.setdefault(scaling.non_embedding_params(cfg), set()).add(meta["seed"])
        assert [len(seeds[n]) for n in sizes] == [2, 2, 1, 1, 1, 1]
        lrs = {meta["d_model"]: meta["lr"] for _, meta in mine if meta["phase"] == "size"}
        assert lrs and all(lr == pytest.approx(3e-3 * (16 * 24) ** 0.25 / d**0.5) for d, lr in lrs.items())
    names = [name for name, *_ in runs]
    assert len(names) == len(set(names))


def test_full_preset_configs_are_the_papers_sizes():
    # memjax.train / memjax.aot read "configs/scaling_full.py:<mixer>,<size>" through ml_collections,
    # which passes the text after the colon to get_config.
    spec = importlib.util.spec_from_file_location("scaling_full", config_file("scaling_full"))
    scaling_full = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling_full)
    # Gated DeltaNet and HOPE take the Transformer++ shapes: 5-8% more parameters (their layers are wider).
    for mixer, rel in (("titans_mag", 0.05), ("attention", 0.05), ("gated_deltanet", 0.1), ("hope", 0.1)):
        for size, billions, tokens in (("170m", 0.17, 15e9), ("340m", 0.34, 15e9), ("760m", 0.76, 30e9)):
            cfg = scaling_full.get_config(f"{mixer},{size}")
            validate(cfg)
            total = factory.count_params(factory.abstract(cfg.model, 32768)[1])
            assert total == pytest.approx(billions * 1e9, rel=rel), (mixer, size, total)
            assert cfg.train.seq_len == 4096 and cfg.model.block_pattern == mixer and cfg.optim.lr == 4e-4
            assert cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len == pytest.approx(tokens, rel=1e-4)
    with pytest.raises(ValueError, match="scaling_full.py"):
        scaling_full.get_config("mamba,170m")


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_on_a_tiny_grid(tmp_path, monkeypatch):
    tiny = dict(scaling.PRESETS["quick"], mixers=("attention",), seq_len=32, window=8, batch_size=2, eval_batches=1,
                shapes=lambda mixer: [(8, 1, 1, 0, None), (16, 1, 1, 0, None), (24, 1, 1, 0, None)],
                tokens=lambda n: 20 * 2 * 32, sweep_lrs=(3e-3, 1e-2), sweep_sizes=1, bootstrap=20)
    monkeypatch.setitem(scaling.PRESETS, "quick", tiny)
    run_config = scaling.run_config

    def on_one_device(*args):
        cfg = run_config(*args)
        cfg.mesh.num_devices, cfg.train.progress_bar, cfg.train.async_checkpoint = 1, False, False
        return cfg

    monkeypatch.setattr(scaling, "run_config", on_one_device)
    scaling.main(["--out", str(tmp_path)])
    with open(tmp_path / "results.csv", encoding="utf-8") as f:
        results = list(csv.DictReader(f))
    assert len(results) == 5  # 2 lrs at the smallest size, its second seed, 2 larger sizes
    assert all(np.isfinite(float(r["eval/bits_per_byte"])) for r in results)
    assert (tmp_path / "scaling.png").exists() and "alpha = " in (tmp_path / "README.md").read_text()
