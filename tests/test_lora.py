"""LoRA students (models/lora.py): merged weights vs a float64 reference, PEFT parity, trainer runs, export."""
from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gold_jax.models import ModelConfig, init_model
from gold_jax.models import lora

ALL = lora.TARGETS


def _randomised(adapters, seed=1, std=0.05):
    """Adapters with non-zero B (B starts at zero: the update would be 0 and every check trivial)."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def qwen2():
    cfg = ModelConfig(architecture="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True)
    base = init_model(cfg, seed=3)
    base_state = jax.tree.map(np.asarray, nnx.state(base))
    st = lora.LoraStudent(base, lora.LoraSpec(4, 8.0, 0.0, ALL))
    return st, base_state, _randomised(st.adapters)


def test_merged_weights_are_base_plus_scaled_low_rank_update_float64(qwen2):
    st, base, ad = qwen2
    merged = nnx.state(st.merged_model(ad))
    scale = 8.0 / 4
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    for i in range(2):
        for owner, t in [("self_attn", x) for x in "qkvo"] + [("mlp", x) for x in ("gate", "up", "down")]:
            w = base["layers"][i][owner][f"{t}_proj"].get_value()
            a = ad["layers"][i][owner][f"{t}_lora"]["lora"]
            ref = f64(w) + scale * (f64(a["lora_a"].get_value()) @ f64(a["lora_b"].get_value())).reshape(w.shape)
            got = merged["layers"][i][owner][f"{t}_proj"].get_value()
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, atol=1e-6, err_msg=f"layer {i} {t}")
    for name, lname in (("lm_head", "lm_head_lora"), ("embed_tokens", "embed_lora")):
        a = ad[lname]["lora"]
        ref = f64(base[name].get_value()) + scale * f64(a["lora_a"].get_value()) @ f64(a["lora_b"].get_value())
        np.testing.assert_allclose(np.asarray(merged[name].get_value(), np.float64), ref, atol=1e-6, err_msg=name)
    # The base state itself is untouched by the merge.
    np.testing.assert_array_equal(np.asarray(st.frozen["lm_head"].get_value()), base["lm_head"].get_value())


def test_unmerged_forward_equals_merged_and_head_update_float64(qwen2):
    st, base, ad = qwen2
    ids = (jnp.arange(24).reshape(2, 12) * 7) % 64
    mask = jnp.ones_like(ids).at[0, :3].set(0)
    model = nnx.merge(st.graphdef, ad, st.frozen)
    got = np.asarray(model(ids, mask), np.float64)
    np.testing.assert_allclose(got, np.asarray(st.merged_model(ad)(ids, mask)), atol=2e-5)
    # The head: logits = h · (W + alpha/r·A·B) in float64 from the adapted model's hidden states.
    h = np.asarray(model.hidden(ids, mask), np.float64)
    a = ad["lm_head_lora"]["lora"]
    w = base["lm_head"].get_value().astype(np.float64) + 2.0 * (
        np.asarray(a["lora_a"].get_value(), np.float64) @ np.asarray(a["lora_b"].get_value(), np.float64))
    np.testing.assert_allclose(got, h @ w, atol=1e-5)
    # And the adapters change the output (the check above cannot pass on a zero update).
    plain = nnx.merge(st.base_graphdef, nnx.state(nnx.merge(st.graphdef, st.adapters, st.frozen), lora.BASE))
    assert np.abs(np.asarray(plain(ids, mask)) - got).max() > 1e-3


def test_adapters_follow_the_sharding_rules(qwen2):
    from gold_jax.models.partition import state_shardings
    from gold_jax.sharding import make_mesh
    st, _, _ = qwen2
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    sh = state_shardings(nnx.merge(st.graphdef, st.adapters, st.frozen), mesh)
    q = sh["layers"][0]["self_attn"]["q_lora"]["lora"]
    assert q["lora_a"].get_value().spec == jax.sharding.PartitionSpec("fsdp", None)
    assert q["lora_b"].get_value().spec == jax.sharding.PartitionSpec(None, "tensor")


@pytest.mark.parametrize("key,value,needle", [
    ("rank", -1, "config.model.lora.rank=-1"), ("alpha", 0.0, "config.model.lora.alpha=0.0"),
    ("dropout", 1.0, "config.model.lora.dropout=1.0"), ("targets", "q,qkv", "config.model.lora.targets='q,qkv'"),
])
def test_bad_lora_config_names_the_key(key, value, needle):
    from gold_jax.config import base_config, validate
    c = base_config()
    c.model.lora.rank = 8
    c.model.lora[key] = value
    with pytest.raises(ValueError) as e:
        validate(c)
    assert needle in str(e.value)


def test_lm_head_target_on_a_tied_model_fails_naming_the_key():
    cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"config.model.lora.targets: 'lm_head' does not exist"):
        lora.attach(init_model(cfg), lora.LoraSpec(2, 4.0, 0.0, ("q", "lm_head")))


def test_peft_loads_the_exported_adapter_with_the_same_logits(tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from gold_jax.lora_export import save_peft
    from gold_jax.models.hf_io import load_pretrained
    base_dir = tiny_model_dir("student", hidden=32, layers=1, seed=1)
    spec = lora.LoraSpec(4, 8.0, 0.1, ALL)
    st = lora.LoraStudent(load_pretrained(base_dir), spec)
    ad = _randomised(st.adapters)
    model = nnx.merge(st.graphdef, ad, st.frozen)
    model.eval()   # dropout off, as peft in eval mode
    out = save_peft(model, spec, base_dir, str(tmp_path / "adapter"))
    ids = np.array([[1, 5, 9, 2, 7, 3, 8, 4], [6, 2, 2, 9, 1, 1, 5, 3]])
    mask = np.ones_like(ids)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        plain = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        pm = peft.PeftModel.from_pretrained(hf, out).eval()
        theirs = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(theirs - plain).max() > 1e-3, "peft did not apply the adapter"
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


# ---------------------------------------------------------------- trainer runs
def _lora_cfg(tiny_run_config, run_dir, **over):
    kw = {"trainer.max_steps": 3, "checkpoint.every": 0, "model.lora.rank": 4, "model.lora.alpha": 8.0,
          "model.lora.targets": "q,k,v,o,gate,up,down,lm_head", "trainer.scheduler": "sync",
          "optimizer.lr": 3e-2}
    kw.update(over)
    return tiny_run_config(run_dir, **kw)


@pytest.fixture(scope="module")
def lora_run(tiny_run_config, tmp_path_factory):
    """3 LoRA steps (rank 4, sync scheduler, JAX engine) on the tiny student; the Trainer kept for inspection."""
    from gold_jax.trainer import Trainer
    run_dir = tmp_path_factory.mktemp("lora_run")
    cfg = _lora_cfg(tiny_run_config, run_dir)
    t = Trainer(cfg)
    base = jax.tree.map(np.asarray, t.lora.frozen)
    last = t.run()
    return dict(dir=run_dir, trainer=t, base=base, last=last, cfg=cfg)


def test_lora_run_trains_only_the_adapters(lora_run):
    t = lora_run["trainer"]
    assert np.isfinite(lora_run["last"]["actor/jsd_loss"])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(t.state.params)]
    assert paths and all("lora_a" in p or "lora_b" in p for p in paths), paths
    n_adapter = sum(x.size for x in jax.tree.leaves(t.state.params))
    n_opt = sum(x.size for x in jax.tree.leaves(t.state.opt_state))
    assert n_opt <= 2 * n_adapter + 8, "optimizer state holds more than Adam's two moments of the adapters"
    n_base = sum(x.size for x in jax.tree.leaves(t.lora.frozen) if jnp.issubdtype(x.dtype, jnp.floating))
    assert n_adapter < n_base / 4
    # The base weights did not move; the adapters did (B starts at zero).
    jax.tree.map(np.testing.assert_array_equal, lora_run["base"], jax.tree.map(np.asarray, t.lora.frozen))
    b = t.state.params["lm_head_lora"]["lora"]["lora_b"].get_value()
    assert np.abs(np.asarray(b)).max() > 0


def test_lora_export_peft_and_merged(lora_run, tmp_path):
    from gold_jax import export
    from gold_jax.models.hf_io import load_pretrained
    run_dir = str(lora_run["dir"])
    import subprocess
    import sys
    out = str(tmp_path / "peft")   # the command line as documented: --lora-format peft
    r = subprocess.run([sys.executable, "-m", "gold_jax.export", "--run", run_dir, "--out", out, "--lora-format",
                        "peft"], capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    merged_dir = export.export(run_dir, str(tmp_path / "merged"), merged=True)
    ids, mask = jnp.asarray([[3, 4, 5, 6, 7]]), jnp.ones((1, 5), jnp.int32)
    t = lora_run["trainer"]
    want = np.asarray(t.lora.merged_model(t.state.params)(ids, mask))
    np.testing.assert_allclose(np.asarray(load_pretrained(merged_dir)(ids, mask)), want, atol=1e-5)
    with pytest.raises(ValueError, match="not a LoRA run|exclude"):
        export.export(run_dir, str(tmp_path / "x"), lora_format="peft", merged=True)


def test_lora_checkpoint_against_another_base_fails_naming_the_path(lora_run, tiny_assets, tmp_path):
    import json
    from gold_jax import export
    run_dir = tmp_path / "moved"
    shutil.copytree(lora_run["dir"], run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    other = tiny_assets["teacher"]
    cfg["model"]["student_path"] = other
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        export.export(str(run_dir), str(tmp_path / "out"), lora_format="peft")
    assert other in str(e.value) and "different model" in str(e.value)


@pytest.mark.slow
def test_lora_resume_is_exact(tiny_run_config, tmp_path):
    """4 steps straight vs 2 steps, then a fresh Trainer resumed to 4: the same adapters and optimizer state."""
    from gold_jax.trainer import Trainer
    over = {"trainer.max_steps": 4, "checkpoint.every": 2, "model.lora.dropout": 0.1,
            "trainer.scheduler": "one_step_off"}
    a = Trainer(_lora_cfg(tiny_run_config, tmp_path / "a", **over))
    a.run()
    b = Trainer(_lora_cfg(tiny_run_config, tmp_path / "b", **over))
    while b.step < 2:
        b.train_one()
    b.save()
    b.close()
    c = Trainer(_lora_cfg(tiny_run_config, tmp_path / "b", **over))
    assert c.step == 2
    c.run()
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(c.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
