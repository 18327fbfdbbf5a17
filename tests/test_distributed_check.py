"""The cross-process agreement check (distributed.agree_kv) against an in-memory key-value store.

The 2-process end-to-end checks are in test_multiprocess.py (slow); these pin the messages and the
deadline without starting processes.
"""
import json
import time

import numpy as np
import pytest

from gold_jax import onpolicy
from gold_jax.distributed import agree_kv
from gold_jax.rollout.per_host import drop_axes
from jax.sharding import PartitionSpec as P


class FakeKV:
    """The subset of JAX's DistributedRuntimeClient that agree_kv uses."""

    def __init__(self, preset=None):
        self.store = dict(preset or {})
        self.waited_ms = []

    def key_value_set(self, key, value):
        self.store[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        self.waited_ms.append(timeout_ms)
        if key not in self.store:
            raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
        return self.store[key]


VALUES = {"step": 3, "end_of_data": 0, "coin": 1, "row_coins": 0, "rng": 12345}


def test_agreeing_processes_pass():
    kv = FakeKV({"k/1": json.dumps(VALUES)})
    agree_kv(kv, 0, 2, "k", dict(VALUES), "the decisions", 5.0)
    assert json.loads(kv.store["k/0"]) == VALUES and kv.waited_ms == [5000]


def test_disagreement_names_every_process_and_value():
    kv = FakeKV({"k/1": json.dumps({**VALUES, "coin": 0})})
    with pytest.raises(RuntimeError) as e:
        agree_kv(kv, 0, 2, "k", dict(VALUES), "the decisions", 5.0)
    msg = str(e.value)
    assert "processes disagree on the decisions" in msg
    assert "process 0: {" in msg and "'coin': 1" in msg and "process 1: {" in msg and "'coin': 0" in msg


def test_missing_process_fails_after_the_deadline():
    kv = FakeKV({"k/1": json.dumps(VALUES)})
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"process\(es\) \[2\] did not report the decisions within 0.5s"):
        agree_kv(kv, 0, 3, "k", dict(VALUES), "the decisions", 0.5)
    assert time.perf_counter() - t0 < 60 and kv.waited_ms == [500, 500]


def test_global_row_coins_are_the_one_process_draws():
    """One process: the same draws as before (resume-compatible); the slice is this process's rows."""
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    mine, every = onpolicy.draw_global_rows(a, 0.5, 6)
    np.testing.assert_array_equal(mine, onpolicy.draw_rows(b, 0.5, "sample", 6))
    np.testing.assert_array_equal(mine, every)
    assert a.bit_generator.state == b.bit_generator.state


def test_decision_tracks_the_coin_and_the_rng():
    rng = np.random.default_rng(0)
    d = onpolicy.decision(2, True, None, False, rng)
    assert d["coin"] == 1 and d["step"] == 2 and d["end_of_data"] == 0
    assert onpolicy.decision(2, False, None, False, rng)["coin"] == 0
    rng.random()
    assert onpolicy.decision(2, True, None, False, rng)["rng"] != d["rng"]
    rows = np.array([True, False, True])
    assert onpolicy.decision(2, True, rows, False, rng)["row_coins"] != onpolicy.decision(
        2, True, ~rows, False, rng)["row_coins"]


def test_drop_axes():
    assert drop_axes(P(("data", "fsdp"), "tensor"), ("data",)) == P("fsdp", "tensor")
    assert drop_axes(P("data", None), ("data",)) == P(None, None)
    assert drop_axes(P(("data", "fsdp", "tensor")), ("fsdp",)) == P(("data", "tensor"))


@pytest.mark.parametrize("key,value,message", [("rollout.engine", "vllm", "per-host vLLM rollout is not built"),
                                               ("rollout.n_devices", 2, "reserved rollout devices are single-host")])
def test_multi_process_refuses_single_host_rollout(monkeypatch, key, value, message):
    from gold_jax import distributed
    from gold_jax.config import base_config
    cfg = base_config()
    cfg.gold.lmbda = 0.5
    distributed.check_rollout_supported(cfg)   # the JAX engine samples per host: accepted
    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    distributed.check_rollout_supported(cfg)
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ValueError, match=message):
        distributed.check_rollout_supported(cfg)
