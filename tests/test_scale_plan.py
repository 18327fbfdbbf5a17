"""benchmarks/scale_plan.py keeps compiling: the real train step of Qwen2.5-0.5B on 8 fake devices."""
import math
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings, from the shard shapes."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow
def test_half_billion_plan_compiles_on_8_devices():
    import scale_plan as sp
    from gold_jax.sharding import make_mesh
    from gold_jax.train_step import make_optimizer
    p = sp.plan("qwen2.5-0.5b", (1, 8, 1), devices=jax.devices()[:8])
    # The arguments XLA reports are the sharded state and batch: count them independently.
    mesh = make_mesh(dict(data=1, fsdp=8, tensor=1), devices=jax.devices()[:8])
    cfg = sp.MODELS["qwen2.5-0.5b"].replace(dtype="bfloat16", remat="full")
    _, state = sp.abstract_state(cfg, mesh, make_optimizer(sp.opt_config(), 1000)[0])
    want = _per_device_bytes(state) + _per_device_bytes(sp.abstract_batch(mesh, rows=8))
    assert p.argument == pytest.approx(want, rel=1e-3)
    assert 0.45e9 < p.params < 0.5e9                      # Qwen2.5-0.5B: 494M parameters
    assert p.replicated < 0.01                            # only norms and biases
    assert p.total < sp.CHIPS["H100 80G"]
    assert p.collectives["all-gather"][0] > 0             # fsdp gathers the weights
    # The decoder pins its activations to the batch (sharding/activations.py): what is all-reduced is the
    # float32 gradient (one copy: XLA:CPU has no reduce-scatter), not the activations (20.7 GiB without).
    assert p.collectives["all-reduce"][1] < 1.5 * 4 * p.params
    assert "qwen2.5-0.5b" in sp.table([p]) and "1x8x1" in sp.table([p])
