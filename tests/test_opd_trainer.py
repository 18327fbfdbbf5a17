"""End-to-end OPD runs on the tiny models: metrics, staleness, per-row λ counts, resume under one_step_off."""
import os

import numpy as np
import pytest
import run_builder

from gold_jax.losses.diagnostics import NAMES
from gold_jax.metrics import read_jsonl
from gold_jax.onpolicy import draw_rows


def run(cfg):
    from gold_jax.trainer import Trainer
    return Trainer(cfg).run()


def _rows(run_dir):
    return read_jsonl(os.path.join(run_dir, "metrics.jsonl"))


@pytest.mark.slow   # 29 s: a second end-to-end trainer run; OPD's loss tests stay in the default suite
def test_opd_one_step_off_logs_staleness_ratio_and_diagnostics(tiny_run_config, tmp_path):
    cfg = tiny_run_config(tmp_path, **{"trainer.max_steps": 4, "gold.lmbda": 1.0, "gold.loss": "opd",
                                       "gold.importance_correction": True, "trainer.scheduler": "one_step_off",
                                       "checkpoint.enabled": False, "trainer.eval_every": 0})
    run(cfg)
    recs = _rows(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    # Step 0's batch is made with θ_0 before update 0; every later batch one update before it is trained.
    assert [r["gold/staleness"] for r in recs] == [0.0, 1.0, 1.0, 1.0]
    for r in recs:
        assert r["gold/on_policy_ratio"] == 1.0 and r["gold/is_on_policy"] == 1.0
        assert np.isfinite(r["actor/jsd_loss"]) and np.isfinite(r["actor/jsd_loss/on_policy"])
        assert "actor/jsd_loss/off_policy" not in r   # λ = 1: no dataset rows, no JSD computed
        assert 0 < r["gold/importance_ratio/mean"] <= r["gold/importance_ratio/max"]
        for name in NAMES:
            assert np.isfinite(r[f"{name}/on_policy"]) and f"{name}/off_policy" not in r
        assert 0 < r["teacher/topk_mass/on_policy"] <= 1 and 0 <= r["gold/topk_overlap/on_policy"] <= 1
        assert r["teacher/sampled_token_logprob/on_policy"] < 0
    # Staleness 0 at step 1: θ is the sampler's, so the ratio is 1 up to the engines' rounding.
    assert abs(recs[0]["gold/importance_ratio/mean"] - 1.0) < 1e-3


def test_per_sample_lmbda_counts_rows_exactly(tiny_run_config, tmp_path):
    steps, lmbda = 4, 0.5
    cfg = tiny_run_config(tmp_path, **{"trainer.max_steps": steps, "gold.lmbda": lmbda, "gold.loss": "opd",
                                       "gold.lmbda_granularity": "sample", "gold.opd_offpolicy_weight": 0.5,
                                       "trainer.grad_accum_steps": 2, "trainer.global_batch_size": 16,
                                       "trainer.scheduler": "one_step_off", "checkpoint.enabled": False,
                                       "trainer.eval_every": 0})
    run(cfg)
    recs = _rows(tmp_path)
    b = cfg.trainer.global_batch_size
    # The producer's RNG (seeded as in Trainer._build) draws one coin per row, batch after batch.
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 1]))
    coins = [draw_rows(rng, lmbda, "sample", b) for _ in range(steps)]
    want = np.cumsum([c.sum() for c in coins]) / (b * np.arange(1, steps + 1))
    np.testing.assert_array_equal([r["gold/on_policy_ratio"] for r in recs], want)
    np.testing.assert_array_equal([r["gold/is_on_policy"] for r in recs], [c.mean() for c in coins])
    mixed = [r for r, c in zip(recs, coins) if 0 < c.sum() < b]
    assert mixed, "no batch mixed both kinds of rows: the test cannot see the split"
    for r in mixed:
        assert np.isfinite(r["actor/jsd_loss/on_policy"]) and np.isfinite(r["actor/jsd_loss/off_policy"])
        assert np.isfinite(r["teacher/topk_mass/off_policy"]) and np.isfinite(r["gold/topk_overlap/on_policy"])


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["one_step_off", "two_step_off"])
def test_per_sample_lmbda_resume_after_sigkill_is_bitwise(tiny_run_config, tmp_path, scheduler):
    over = {"trainer.max_steps": 6, "gold.lmbda": 0.5, "gold.lmbda_granularity": "sample", "gold.loss": "opd",
            "gold.importance_correction": True, "trainer.scheduler": scheduler, "checkpoint.every": 2,
            "trainer.eval_every": 0}
    ref_dir, kill_dir = run_builder.ref_and_killed_runs(tiny_run_config, tmp_path, over, step=3)
    ref, got = _rows(ref_dir), _rows(kill_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    keys = ("actor/jsd_loss", "gold/on_policy_ratio", "gold/is_on_policy", "gold/staleness",
            "gold/importance_ratio/mean", "actor/jsd_loss/on_policy")
    for a, b in zip(ref, got):
        for k in keys:
            assert (k in a) == (k in b), (a["step"], k)
            if k in a:
                assert a[k] == b[k], (a["step"], k, a[k], b[k])


def test_bad_opd_config_names_the_key(tiny_run_config, tmp_path):
    from gold_jax import config as config_lib
    for over, key in (({"gold.loss": "kl"}, "gold.loss"), ({"gold.importance_cap": 0.0}, "gold.importance_cap"),
                      ({"gold.lmbda_granularity": "token"}, "gold.lmbda_granularity"),
                      ({"gold.opd_offpolicy_weight": -1.0}, "gold.opd_offpolicy_weight"),
                      ({"gold.lmbda_granularity": "sample", "gold.seq_kd": True}, "gold.lmbda_granularity")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            config_lib.validate(tiny_run_config(tmp_path, **over))
