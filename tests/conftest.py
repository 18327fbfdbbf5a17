"""Test set-up: 8 fake CPU devices and a persistent XLA compilation cache.

XLA_FLAGS must be set before JAX is imported anywhere, which is why this
happens at the top of conftest (pytest imports it first).
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "GOLD_JAX_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

MESH_SHAPES = [(1, 1, 8), (1, 2, 4), (2, 2, 2)]  # (data, fsdp, tensor)


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 fake CPU devices, got {len(devs)}"
    return devs


# ------------------------------------------------------------------ shared tiny assets
# Imports inside the fixtures: collecting a test file that needs none of them stays cheap.

@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The cached tiny ChatML tokenizer (tests/tiny_tokenizer.py): eos <|im_end|>, pad <|pad|>."""
    from tiny_tokenizer import tiny_tokenizer as load
    return load()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: `tiny_model_dir(name, hidden=32, layers=1, seed=0)` -> an HF-format dir (Qwen3-style model
    with the tiny tokenizer), built once per argument set in this session."""
    from gold_jax.models import ModelConfig, init_model
    from gold_jax.models.hf_io import save_pretrained
    root, built = tmp_path_factory.mktemp("tiny_models"), {}

    def make(name: str = "student", *, hidden: int = 32, layers: int = 1, seed: int = 0) -> str:
        key = (name, hidden, layers, seed)
        if key not in built:
            tok = tiny_tokenizer
            cfg = ModelConfig(architecture="qwen3", vocab_size=len(tok.get_vocab()), hidden_size=hidden,
                              intermediate_size=2 * hidden, num_layers=layers, num_heads=2, num_kv_heads=1,
                              head_dim=16, qk_norm=True, max_position_embeddings=128, eos_token_id=tok.eos_token_id)
            path = str(root / f"{name}-{hidden}-{layers}-{seed}")
            save_pretrained(init_model(cfg, seed=seed), path)
            tok.save_pretrained(path)
            built[key] = path
        return built[key]
    return make


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory, tiny_model_dir):
    """A tiny student (1 layer) and teacher (2 layers) and demo-task parquet files: 64 train, 16 val rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gold_jax.demo import task
    root = tmp_path_factory.mktemp("tiny_data")
    rng = np.random.default_rng(0)
    rows = [task.make_row(rng.integers(0, 10, 4), "train", i) for i in range(64)]
    pq.write_table(pa.Table.from_pylist(rows), root / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:16]), root / "val.parquet")
    return dict(student=tiny_model_dir("student", hidden=32, layers=1, seed=1),
                teacher=tiny_model_dir("teacher", hidden=48, layers=2, seed=2),
                train=str(root / "train.parquet"), val=str(root / "val.parquet"))


@pytest.fixture(scope="session")
def tiny_run_config(tiny_assets):
    """Factory: `tiny_run_config(run_dir, **{"trainer.max_steps": 6, ...})` -> configs/tiny.py on tiny_assets,
    with dotted-key overrides."""
    import run_builder

    def make(run_dir, **over):
        return run_builder.tiny_config(run_dir, tiny_assets, **over)
    return make
