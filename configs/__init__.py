"""Experiment configs, one file each (big_vision style): `get_config(arg=None)`.

Run one with `python -m gold_jax.train --config configs/gold.py` (ml_collections loads it by path);
import one with `from configs import gold` (tests, benchmarks, and configs built on another).
"""
